// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// cilium-rs endpoint policy datapath: two tc programs attached (TCX) to the
// node-side veth of every pod.
//
//   from_container  tc ingress of the node-side veth: packets the pod sends
//                   (the endpoint's EGRESS policy)
//   to_container    tc egress of the node-side veth: packets to the pod
//                   (the endpoint's INGRESS policy)
//
// Every frame gets a verdict. ARP and IPv6 neighbour discovery pass (the
// network needs them, as upstream's datapath answers them itself); any
// other non-IP frame is dropped in an enforced direction. For IPv4 and
// IPv6:
//
// 1. A reply to a connection this endpoint allowed earlier in the other
//    direction passes (connection tracking per endpoint and direction, with
//    TCP/UDP/SCTP ports and the ICMP echo identifier; only echo replies are
//    replies; entries expire). So does an ICMP error (destination
//    unreachable, packet too big, time exceeded, parameter problem) whose
//    quoted packet belongs to such a connection, in either direction,
//    sent by the connection's peer ("related": upstream ties such errors
//    to the connection's own address pair, so a third host or a crafted
//    error to another address cannot use it).
// 2. Otherwise the peer's identity comes from the ipcache (longest prefix
//    match; user space installs the world identities as ::ffff:0:0/96 and
//    ::/0) and the policy map decides: it is a longest-prefix-match map
//    keyed by (endpoint, peer identity, direction, protocol, port prefix),
//    looked up under the peer's identity, then under identity 0 (any peer).
//    A hit gives allow or deny; a miss gives the direction's default
//    (deny when enforced). The user-space engine (policy/) distills the
//    entries so that this lookup is upstream's verdict.
//
// Every drop, and every verdict while user space asks for them, is also
// written as a `struct event` to the `cilium_events` ring buffer (the
// agent's monitor reads it); an event that finds the buffer full is
// counted in `cilium_events_lost`, never lost silently.
//
// IPv4 addresses are handled as IPv4-mapped IPv6 addresses everywhere.
// Map layouts are mirrored by #[repr(C)] types in
// node-agent-stub/src/datapath.rs; every map is pinned by name so that an
// agent restart keeps enforcing with the same state.

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define IDENTITY_WORLD 2

#define DIR_INGRESS 0
#define DIR_EGRESS 1

// Reasons in the metrics map (mirrored in datapath.rs).
#define REASON_ALLOWED_BY_POLICY 0
#define REASON_NO_POLICY 1
#define REASON_REPLY 2
#define REASON_ARP 3
#define REASON_NDP 4
#define REASON_RELATED 5
#define REASON_DENIED_BY_RULE 10
#define REASON_NOT_ALLOWED 11
#define REASON_MALFORMED 12
#define REASON_UNSUPPORTED_L3 13
#define REASON_ENDPOINT_NOT_READY 14

#define ENDPOINT_READY 0
#define ENDPOINT_FAILED 1

#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_ICMPV6 58
#define PROTO_SCTP 132

// Connection lifetimes (upstream's defaults).
#define NS_PER_SEC 1000000000ULL
#define CT_LIFETIME_TCP (21600ULL * NS_PER_SEC)
#define CT_LIFETIME_SYN (60ULL * NS_PER_SEC)
#define CT_LIFETIME_CLOSE (10ULL * NS_PER_SEC)
#define CT_LIFETIME_NONTCP (60ULL * NS_PER_SEC)

struct ipcache_key {
	__u32 prefixlen;
	__u8 addr[16]; // IPv6, or IPv4-mapped
};

struct ipcache_value {
	__u32 identity;
};

struct endpoint_key {
	__u32 ifindex; // of the node-side veth
};

struct endpoint_value {
	__u32 endpoint_id;
	__u32 identity;
	__u8 ingress_enforce;
	__u8 egress_enforce;
	__u8 state; // ENDPOINT_*
	__u8 pad;
};

// Longest prefix match over the bytes after prefixlen: endpoint, identity
// and direction always match exactly (72 bits); then the protocol (0 in
// an entry of prefix 72: every protocol), then the port (big endian).
struct policy_key {
	__u32 prefixlen;
	__u32 endpoint_id;
	__u32 identity; // 0: any peer
	__u8 direction;
	__u8 proto;
	__u16 dport; // network byte order; the ICMP type for ICMP
};

struct policy_value {
	__u8 deny;
	__u8 pad[3];
};

struct ct_key {
	__u32 endpoint_id;
	__u8 direction; // of the packet that opened the connection
	__u8 proto;
	__u16 pad;
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport; // ICMP echo: the identifier, in both ports
	__u16 dport;
};

struct ct_value {
	__u64 expires_ns;
	__u32 reply_seen;
	__u32 pad;
};

struct metrics_key {
	__u32 endpoint_id;
	__u8 direction;
	__u8 reason;
	__u8 pad[2];
};

struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

// What decided a verdict (events only).
#define MATCH_NONE 0     // no policy entry: conntrack, default, or before policy
#define MATCH_PEER 1     // the entry of the peer's identity
#define MATCH_ANY_PEER 2 // the entry for any peer (identity 0)

// One event on the ring buffer (mirrored in datapath.rs).
struct event {
	__u64 ts_ns; // bpf_ktime_get_ns()
	__u32 endpoint_id;
	__u32 identity;      // the endpoint's
	__u32 peer_identity; // from the ipcache; 0 when the frame has no address
	__u32 len;
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport; // host byte order (ICMP echo: the identifier)
	__u16 dport; // host byte order (ICMP: the type)
	__u8 proto;
	__u8 direction;
	__u8 reason;
	__u8 match; // MATCH_*
};

// Flags in cilium_events_config (0: drops only).
#define EVENTS_NO_DROPS 1
#define EVENTS_VERDICTS 2

struct events_config {
	__u32 flags;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20); // EVENTS_RING_SIZE in datapath.rs
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilium_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct events_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilium_events_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilium_events_lost SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilium_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_value);
	__uint(max_entries, 4096);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilium_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(max_entries, 262144); // POLICY_MAP_SIZE in datapath.rs
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilium_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilium_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct metrics_key);
	__type(value, struct metrics_value);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cilium_metrics SEC(".maps");

// The packet an ICMP error quotes (its addresses, protocol and ports or
// echo identifier).
struct quoted {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport, dport; // network byte order (ICMP echo: the identifier)
	__u8 proto;
	__u8 pad[3];
};

struct tuple {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport, dport; // network byte order (ICMP echo: the identifier)
	__u16 policy_port;  // host byte order: dport, or the ICMP type
	__u8 proto;
	__u8 icmp_type;
	__u8 flags; // TCP flags
	__u8 echo;  // 1: echo request, 2: echo reply
	__u8 ndp;   // an IPv6 neighbour discovery message
	__u8 related; // an ICMP error quoting a packet: `quoted` is set
	__u8 has_addr; // saddr and daddr were read
	struct quoted quoted;
};

#define ECHO_REQUEST 1
#define ECHO_REPLY 2

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04

static __always_inline void map_v4(__u8 *dst, __u32 addr)
{
	__builtin_memset(dst, 0, 10);
	dst[10] = 0xff;
	dst[11] = 0xff;
	__builtin_memcpy(dst + 12, &addr, 4);
}

// An ICMP error's quoted packet (IP header and the first 8 bytes after
// it) at `off`: sets t->quoted and t->related when it is TCP, UDP, SCTP
// or an echo request; anything else leaves the error unrelated.
static __always_inline void parse_quoted(struct __sk_buff *skb, __u32 off, struct tuple *t, int v6)
{
	struct quoted *q = &t->quoted;
	__u32 l4;
	if (v6) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
			return;
		__builtin_memcpy(q->saddr, &ip6.saddr, 16);
		__builtin_memcpy(q->daddr, &ip6.daddr, 16);
		q->proto = ip6.nexthdr;
		l4 = off + sizeof(ip6);
	} else {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
			return;
		if (ip.ihl < 5 || ip.version != 4)
			return;
		map_v4(q->saddr, ip.saddr);
		map_v4(q->daddr, ip.daddr);
		q->proto = ip.protocol;
		l4 = off + ((__u32)ip.ihl & 0xf) * 4;
	}
	if (q->proto == PROTO_TCP || q->proto == PROTO_UDP || q->proto == PROTO_SCTP) {
		__u16 ports[2];
		if (bpf_skb_load_bytes(skb, l4, ports, 4) < 0)
			return;
		q->sport = ports[0];
		q->dport = ports[1];
	} else if (q->proto == (v6 ? PROTO_ICMPV6 : PROTO_ICMP)) {
		__u8 h[6];
		if (bpf_skb_load_bytes(skb, l4, h, 6) < 0)
			return;
		if (h[0] != (v6 ? 128 : 8))
			return; // only echo requests open connections
		__u16 id;
		__builtin_memcpy(&id, h + 4, 2);
		q->sport = id;
		q->dport = id;
	} else {
		return;
	}
	t->related = 1;
}

// Reads the L4 header at `off` into t. Returns 0, or -1 when truncated.
static __always_inline int parse_l4(struct __sk_buff *skb, __u32 off, struct tuple *t, int v6)
{
	if (t->proto == PROTO_TCP || t->proto == PROTO_UDP || t->proto == PROTO_SCTP) {
		__u16 ports[2];
		if (bpf_skb_load_bytes(skb, off, ports, 4) < 0)
			return -1;
		t->sport = ports[0];
		t->dport = ports[1];
		t->policy_port = bpf_ntohs(ports[1]);
		if (t->proto == PROTO_TCP) {
			__u8 flags;
			if (bpf_skb_load_bytes(skb, off + 13, &flags, 1) < 0)
				return -1;
			t->flags = flags;
		}
		return 0;
	}
	if (t->proto == PROTO_ICMP || t->proto == PROTO_ICMPV6) {
		// type, code, checksum, then (echo) identifier, sequence
		__u8 hdr[6];
		if (bpf_skb_load_bytes(skb, off, hdr, 6) < 0)
			return -1;
		t->icmp_type = hdr[0];
		t->policy_port = hdr[0];
		__u8 req = v6 ? 128 : 8, rep = v6 ? 129 : 0;
		if (hdr[0] == req || hdr[0] == rep) {
			t->echo = hdr[0] == req ? ECHO_REQUEST : ECHO_REPLY;
			__u16 id;
			__builtin_memcpy(&id, hdr + 4, 2);
			t->sport = id;
			t->dport = id;
		}
		if (v6 && hdr[0] >= 133 && hdr[0] <= 137)
			t->ndp = 1;
		// Errors: v4 unreachable 3, time exceeded 11, parameter problem
		// 12; v6 unreachable 1, packet too big 2, time exceeded 3,
		// parameter problem 4. The quoted packet follows the 8-byte
		// ICMP header.
		if (v6 ? (hdr[0] >= 1 && hdr[0] <= 4) : (hdr[0] == 3 || hdr[0] == 11 || hdr[0] == 12))
			parse_quoted(skb, off + 8, t, v6);
		return 0;
	}
	return 0;
}

#define IPV6_MAX_EXT 6

// 1: parsed, -1: malformed or unsupported (dropped when enforced).
static __always_inline int parse_ipv6(struct __sk_buff *skb, struct tuple *t)
{
	struct ipv6hdr ip6;
	__u32 off = ETH_HLEN;
	if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
		return -1;
	__builtin_memcpy(t->saddr, &ip6.saddr, 16);
	__builtin_memcpy(t->daddr, &ip6.daddr, 16);
	t->has_addr = 1;
	off += sizeof(ip6);
	__u8 nh = ip6.nexthdr;
	int last_fragment_only = 0;
#pragma unroll
	for (int i = 0; i < IPV6_MAX_EXT; i++) {
		if (nh == 0 || nh == 43 || nh == 60) { // hop-by-hop, routing, destination options
			__u8 h[2];
			if (bpf_skb_load_bytes(skb, off, h, 2) < 0)
				return -1;
			nh = h[0];
			off += ((__u32)h[1] + 1) * 8;
		} else if (nh == 44) { // fragment
			__u8 h[4];
			if (bpf_skb_load_bytes(skb, off, h, 4) < 0)
				return -1;
			nh = h[0];
			__u16 frag_off = ((__u16)h[2] << 8 | h[3]) & 0xfff8;
			if (frag_off)
				last_fragment_only = 1;
			off += 8;
		} else if (nh == 51) { // authentication header
			__u8 h[2];
			if (bpf_skb_load_bytes(skb, off, h, 2) < 0)
				return -1;
			nh = h[0];
			off += ((__u32)h[1] + 2) * 4;
		} else {
			break;
		}
	}
	if (nh == 0 || nh == 43 || nh == 60 || nh == 44 || nh == 51)
		return -1; // too many extension headers: no verdict without the L4 header
	t->proto = nh;
	if (last_fragment_only)
		return 1; // later fragments carry no L4 header: judged on L3 only
	return parse_l4(skb, off, t, 1) < 0 ? -1 : 1;
}

// 1: parsed, -1: malformed.
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct tuple *t)
{
	struct iphdr ip;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return -1;
	if (ip.ihl < 5 || ip.version != 4)
		return -1;
	map_v4(t->saddr, ip.saddr);
	map_v4(t->daddr, ip.daddr);
	t->has_addr = 1;
	t->proto = ip.protocol;
	if (ip.frag_off & bpf_htons(0x1fff))
		return 1; // later fragments carry no L4 header: judged on L3 only
	return parse_l4(skb, ETH_HLEN + ip.ihl * 4, t, 0) < 0 ? -1 : 1;
}

static __always_inline __u32 identity_of(const __u8 *addr)
{
	struct ipcache_key k = { .prefixlen = 128 };
	__builtin_memcpy(k.addr, addr, 16);
	struct ipcache_value *v = bpf_map_lookup_elem(&cilium_ipcache, &k);
	// User space installs the world prefixes, so a miss means an ipcache
	// not written yet: world, never identity 0 (which means "any peer").
	return v ? v->identity : IDENTITY_WORLD;
}

static __always_inline void count(__u32 endpoint_id, __u8 direction, __u8 reason, __u32 len)
{
	struct metrics_key k = { .endpoint_id = endpoint_id, .direction = direction, .reason = reason };
	struct metrics_value *v = bpf_map_lookup_elem(&cilium_metrics, &k);
	if (v) {
		__sync_fetch_and_add(&v->packets, 1);
		__sync_fetch_and_add(&v->bytes, len);
		return;
	}
	struct metrics_value init = { .packets = 1, .bytes = len };
	bpf_map_update_elem(&cilium_metrics, &k, &init, BPF_NOEXIST);
}

// The verdict as a reason code; *match says which entry decided.
static __always_inline __u8 decide(struct endpoint_value *ep, __u8 dir, __u32 peer, struct tuple *t, __u8 *match)
{
	struct policy_key k = {
		.prefixlen = 96,
		.endpoint_id = ep->endpoint_id,
		.identity = peer,
		.direction = dir,
		.proto = t->proto,
		.dport = bpf_htons(t->policy_port),
	};
	struct policy_value *v = bpf_map_lookup_elem(&cilium_policy, &k);
	*match = MATCH_PEER;
	if (!v) {
		k.identity = 0;
		v = bpf_map_lookup_elem(&cilium_policy, &k);
		*match = MATCH_ANY_PEER;
	}
	if (v)
		return v->deny ? REASON_DENIED_BY_RULE : REASON_ALLOWED_BY_POLICY;
	*match = MATCH_NONE;
	__u8 enforce = dir == DIR_INGRESS ? ep->ingress_enforce : ep->egress_enforce;
	return enforce ? REASON_NOT_ALLOWED : REASON_NO_POLICY;
}

// A conntrack key from a packet's addresses and ports, as seen in its
// own direction, or reversed (the key its reply would have).
static __always_inline void ct_key_fill(struct ct_key *k, __u32 ep, __u8 dir, __u8 proto, const __u8 *saddr,
					const __u8 *daddr, __u16 sport, __u16 dport, int reverse)
{
	k->endpoint_id = ep;
	k->direction = dir;
	k->proto = proto;
	k->pad = 0;
	__builtin_memcpy(k->saddr, reverse ? daddr : saddr, 16);
	__builtin_memcpy(k->daddr, reverse ? saddr : daddr, 16);
	k->sport = reverse ? dport : sport;
	k->dport = reverse ? sport : dport;
}

static __always_inline void ct_key_of(struct ct_key *k, __u32 ep, __u8 dir, struct tuple *t, int reverse)
{
	ct_key_fill(k, ep, dir, t->proto, t->saddr, t->daddr, t->sport, t->dport, reverse);
}

// Whether `k` is a live connection.
static __always_inline int ct_live(struct ct_key *k)
{
	struct ct_value *v = bpf_map_lookup_elem(&cilium_ct, k);
	return v && v->expires_ns >= bpf_ktime_get_ns();
}

// Whether two 16-byte addresses are equal.
static __always_inline int addr_eq(const __u8 *a, const __u8 *b)
{
	__u32 x[4], y[4];
	__builtin_memcpy(x, a, 16);
	__builtin_memcpy(y, b, 16);
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

// An ICMP error about a packet of a live connection: the quoted packet
// went the other way than the error, so it is either the connection's
// opening direction as quoted (a connection opened in the other
// direction) or its reply direction (one opened in this direction).
static __always_inline int is_related(__u32 ep, __u8 dir, struct tuple *t)
{
	if (!t->related)
		return 0;
	struct ct_key k;
	struct quoted *q = &t->quoted;
	// From the connection's peer only: the quoted packet went from this
	// error's destination to its source.
	if (!addr_eq(t->saddr, q->daddr) || !addr_eq(t->daddr, q->saddr))
		return 0;
	ct_key_fill(&k, ep, dir == DIR_INGRESS ? DIR_EGRESS : DIR_INGRESS, q->proto, q->saddr, q->daddr, q->sport, q->dport, 0);
	if (ct_live(&k))
		return 1;
	ct_key_fill(&k, ep, dir, q->proto, q->saddr, q->daddr, q->sport, q->dport, 1);
	return ct_live(&k);
}

static __always_inline __u64 lifetime(struct tuple *t, int reply_seen)
{
	if (t->proto != PROTO_TCP)
		return CT_LIFETIME_NONTCP;
	if (t->flags & (TCP_FIN | TCP_RST))
		return CT_LIFETIME_CLOSE;
	return reply_seen ? CT_LIFETIME_TCP : CT_LIFETIME_SYN;
}

static __always_inline int tracked(struct tuple *t)
{
	if (t->proto == PROTO_TCP || t->proto == PROTO_UDP || t->proto == PROTO_SCTP)
		return 1;
	return t->echo != 0;
}

// A reply to a connection this endpoint opened in the other direction.
static __always_inline int is_reply(__u32 ep, __u8 dir, struct tuple *t)
{
	if (!tracked(t) || t->echo == ECHO_REQUEST)
		return 0;
	struct ct_key k;
	ct_key_of(&k, ep, dir == DIR_INGRESS ? DIR_EGRESS : DIR_INGRESS, t, 1);
	struct ct_value *v = bpf_map_lookup_elem(&cilium_ct, &k);
	__u64 now = bpf_ktime_get_ns();
	if (!v || v->expires_ns < now)
		return 0;
	v->reply_seen = 1;
	v->expires_ns = now + lifetime(t, 1);
	return 1;
}

static __always_inline void track(__u32 ep, __u8 dir, struct tuple *t)
{
	// Echo replies never open a connection; other ICMP is not tracked.
	if (!tracked(t) || t->echo == ECHO_REPLY)
		return;
	struct ct_key k;
	ct_key_of(&k, ep, dir, t, 0);
	__u64 now = bpf_ktime_get_ns();
	struct ct_value *v = bpf_map_lookup_elem(&cilium_ct, &k);
	if (v) {
		v->expires_ns = now + lifetime(t, v->reply_seen);
		return;
	}
	struct ct_value nv = { .expires_ns = now + lifetime(t, 0) };
	bpf_map_update_elem(&cilium_ct, &k, &nv, BPF_ANY);
}

// An event for this verdict when one is wanted: every drop unless user
// space turned drops off, every other verdict only while it asks for
// them. `peer` is the peer's identity when already known, else 0 (looked
// up here, only when an event is written).
static __always_inline void emit(struct __sk_buff *skb, struct endpoint_value *ep, __u8 dir, __u8 reason,
				 struct tuple *t, int has_addr, __u32 peer, __u8 match)
{
	__u32 zero = 0;
	struct events_config *c = bpf_map_lookup_elem(&cilium_events_config, &zero);
	__u32 flags = c ? c->flags : 0;
	if (reason >= REASON_DENIED_BY_RULE ? (flags & EVENTS_NO_DROPS) : !(flags & EVENTS_VERDICTS))
		return;
	if (has_addr && !peer)
		peer = identity_of(dir == DIR_INGRESS ? t->saddr : t->daddr);
	struct event *e = bpf_ringbuf_reserve(&cilium_events, sizeof(*e), 0);
	if (!e) {
		__u64 *lost = bpf_map_lookup_elem(&cilium_events_lost, &zero);
		if (lost)
			__sync_fetch_and_add(lost, 1);
		return;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->endpoint_id = ep->endpoint_id;
	e->identity = ep->identity;
	e->peer_identity = peer;
	e->len = skb->len;
	__builtin_memcpy(e->saddr, t->saddr, 16);
	__builtin_memcpy(e->daddr, t->daddr, 16);
	e->sport = bpf_ntohs(t->sport);
	e->dport = t->policy_port;
	e->proto = t->proto;
	e->direction = dir;
	e->reason = reason;
	e->match = match;
	bpf_ringbuf_submit(e, 0);
}

static __always_inline int verdict_of(struct __sk_buff *skb, struct endpoint_value *ep, __u8 dir, __u8 reason,
				      struct tuple *t, int has_addr, __u32 peer, __u8 match)
{
	count(ep->endpoint_id, dir, reason, skb->len);
	emit(skb, ep, dir, reason, t, has_addr, peer, match);
	return reason >= REASON_DENIED_BY_RULE ? TC_ACT_SHOT : TC_ACT_OK;
}

static __always_inline int handle(struct __sk_buff *skb, __u8 dir)
{
	struct endpoint_key ek = { .ifindex = skb->ifindex };
	struct endpoint_value *ep = bpf_map_lookup_elem(&cilium_endpoints, &ek);
	if (!ep)
		return TC_ACT_OK;
	__u8 enforce = dir == DIR_INGRESS ? ep->ingress_enforce : ep->egress_enforce;

	struct tuple t = {};
	int p = 0;
	if (skb->protocol == bpf_htons(ETH_P_IP))
		p = parse_ipv4(skb, &t);
	else if (skb->protocol == bpf_htons(ETH_P_IPV6))
		p = parse_ipv6(skb, &t);
	int has_addr = t.has_addr;
	if (ep->state != ENDPOINT_READY)
		return verdict_of(skb, ep, dir, REASON_ENDPOINT_NOT_READY, &t, has_addr, 0, MATCH_NONE);
	if (skb->protocol == bpf_htons(ETH_P_ARP))
		return verdict_of(skb, ep, dir, REASON_ARP, &t, 0, 0, MATCH_NONE);
	if (p == 0)
		return verdict_of(skb, ep, dir, enforce ? REASON_UNSUPPORTED_L3 : REASON_NO_POLICY, &t, 0, 0, MATCH_NONE);
	if (p < 0)
		return verdict_of(skb, ep, dir, enforce ? REASON_MALFORMED : REASON_NO_POLICY, &t, has_addr, 0, MATCH_NONE);
	if (t.ndp)
		return verdict_of(skb, ep, dir, REASON_NDP, &t, 1, 0, MATCH_NONE);
	if (is_reply(ep->endpoint_id, dir, &t))
		return verdict_of(skb, ep, dir, REASON_REPLY, &t, 1, 0, MATCH_NONE);
	if (is_related(ep->endpoint_id, dir, &t))
		return verdict_of(skb, ep, dir, REASON_RELATED, &t, 1, 0, MATCH_NONE);
	__u32 peer = identity_of(dir == DIR_INGRESS ? t.saddr : t.daddr);
	__u8 match = MATCH_NONE;
	__u8 reason = decide(ep, dir, peer, &t, &match);
	if (reason < REASON_DENIED_BY_RULE)
		track(ep->endpoint_id, dir, &t);
	return verdict_of(skb, ep, dir, reason, &t, 1, peer, match);
}

SEC("classifier")
int from_container(struct __sk_buff *skb)
{
	return handle(skb, DIR_EGRESS);
}

SEC("classifier")
int to_container(struct __sk_buff *skb)
{
	return handle(skb, DIR_INGRESS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
