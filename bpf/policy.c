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
// Semantics (Cilium's): an endpoint allows everything in a direction until
// a policy selects it in that direction (enforce flag), then only what an
// allow entry matches; a deny entry wins over any allow entry. The peer's
// security identity comes from the ipcache (longest prefix match on the
// peer address; unknown addresses are "world", identity 2). Replies of an
// allowed connection pass through a small connection tracker.
//
// Map layouts are mirrored by #[repr(C)] types in
// node-agent-stub/src/datapath.rs; every map is pinned by name so that an
// agent restart keeps enforcing with the same state.

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
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
#define REASON_DENIED_BY_RULE 10
#define REASON_NOT_ALLOWED 11

struct ipcache_key {
	__u32 prefixlen;
	__u32 addr; // network byte order
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
	__u8 pad[2];
};

struct policy_key {
	__u32 endpoint_id;
	__u32 identity; // 0: any peer
	__u16 dport;    // host byte order; 0: any port
	__u8 proto;     // IPPROTO_*; 0: any protocol
	__u8 direction; // DIR_*
};

struct policy_value {
	__u8 deny;
	__u8 pad[3];
};

struct ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct ct_value {
	__u64 created_ns;
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
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(max_entries, 262144);
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

struct tuple {
	__u32 saddr, daddr;
	__u16 sport, dport; // host byte order
	__u8 proto;
};

// 0: not IPv4 (let it pass), 1: parsed, -1: malformed.
static __always_inline int parse(struct __sk_buff *skb, struct tuple *t)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return -1;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return -1;
	if (ip->ihl < 5)
		return -1;
	t->saddr = ip->saddr;
	t->daddr = ip->daddr;
	t->proto = ip->protocol;
	t->sport = 0;
	t->dport = 0;
	if (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) {
		// Fragments after the first carry no ports: judged on L3 only.
		if (ip->frag_off & bpf_htons(0x1fff))
			return 1;
		__u16 *ports = (void *)ip + ip->ihl * 4;
		if ((void *)(ports + 2) > end)
			return -1;
		t->sport = bpf_ntohs(ports[0]);
		t->dport = bpf_ntohs(ports[1]);
	}
	return 1;
}

static __always_inline __u32 identity_of(__u32 addr)
{
	struct ipcache_key k = { .prefixlen = 32, .addr = addr };
	struct ipcache_value *v = bpf_map_lookup_elem(&cilium_ipcache, &k);
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

// 0: no entry, 1: allow, 2: deny.
static __always_inline int entry(__u32 ep, __u32 id, __u16 port, __u8 proto, __u8 dir)
{
	struct policy_key k = { .endpoint_id = ep, .identity = id, .dport = port, .proto = proto, .direction = dir };
	struct policy_value *v = bpf_map_lookup_elem(&cilium_policy, &k);
	if (!v)
		return 0;
	return v->deny ? 2 : 1;
}

// The verdict as a reason code.
static __always_inline __u8 decide(struct endpoint_value *ep, __u8 dir, __u32 peer, __u16 port, __u8 proto)
{
	__u8 enforce = dir == DIR_INGRESS ? ep->ingress_enforce : ep->egress_enforce;
	if (!enforce)
		return REASON_NO_POLICY;
	int r[6];
	r[0] = entry(ep->endpoint_id, peer, port, proto, dir);
	r[1] = entry(ep->endpoint_id, peer, 0, proto, dir);
	r[2] = entry(ep->endpoint_id, peer, 0, 0, dir);
	r[3] = entry(ep->endpoint_id, 0, port, proto, dir);
	r[4] = entry(ep->endpoint_id, 0, 0, proto, dir);
	r[5] = entry(ep->endpoint_id, 0, 0, 0, dir);
	int allowed = 0;
#pragma unroll
	for (int i = 0; i < 6; i++) {
		if (r[i] == 2)
			return REASON_DENIED_BY_RULE;
		if (r[i] == 1)
			allowed = 1;
	}
	return allowed ? REASON_ALLOWED_BY_POLICY : REASON_NOT_ALLOWED;
}

static __always_inline int handle(struct __sk_buff *skb, __u8 dir)
{
	struct endpoint_key ek = { .ifindex = skb->ifindex };
	struct endpoint_value *ep = bpf_map_lookup_elem(&cilium_endpoints, &ek);
	if (!ep)
		return TC_ACT_OK;
	struct tuple t = {};
	int p = parse(skb, &t);
	if (p == 0)
		return TC_ACT_OK;
	if (p < 0) {
		count(ep->endpoint_id, dir, REASON_NOT_ALLOWED, skb->len);
		return TC_ACT_SHOT;
	}
	// A reply to a connection allowed earlier (either direction).
	struct ct_key reverse = { .saddr = t.daddr, .daddr = t.saddr, .sport = t.dport, .dport = t.sport, .proto = t.proto };
	if (bpf_map_lookup_elem(&cilium_ct, &reverse)) {
		count(ep->endpoint_id, dir, REASON_REPLY, skb->len);
		return TC_ACT_OK;
	}
	__u32 peer = identity_of(dir == DIR_INGRESS ? t.saddr : t.daddr);
	__u8 reason = decide(ep, dir, peer, t.dport, t.proto);
	count(ep->endpoint_id, dir, reason, skb->len);
	if (reason >= REASON_DENIED_BY_RULE)
		return TC_ACT_SHOT;
	struct ct_key forward = { .saddr = t.saddr, .daddr = t.daddr, .sport = t.sport, .dport = t.dport, .proto = t.proto };
	struct ct_value cv = { .created_ns = bpf_ktime_get_ns() };
	bpf_map_update_elem(&cilium_ct, &forward, &cv, BPF_ANY);
	return TC_ACT_OK;
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
