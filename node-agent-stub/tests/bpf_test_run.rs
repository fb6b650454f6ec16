//! bpf/policy.c on synthetic frames through BPF_PROG_TEST_RUN: no
//! namespace, no interface. Needs root (CAP_BPF) and bpffs, like the agent.
//! Policies are compiled by the shared engine (cilium-policy), installed in
//! the maps as the agent installs them, and judged by the kernel.

mod common;

use cilium_crds::policy::CiliumNetworkPolicy;
use cilium_policy::engine::{Selections, Universe};
use cilium_policy::identity::{LOCAL_FLAG, cidr_labels};
use cilium_policy::parse::parse_cnp;
use cilium_policy::{Config, EndpointPolicy, LabelSet, MapKey, Prefix};
use common::*;
use node_agent_stub::datapath::*;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

const POD: &str = "10.0.1.5";
const WEB: &str = "10.0.2.7";
const OTHER: &str = "10.0.2.8";
const POD6: &str = "fd00::1:5";
const WEB6: &str = "fd00::2:7";
const SUBJECT: u32 = 1000;
const WEB_ID: u32 = 2001;
const OTHER_ID: u32 = 2002;

/// A small cluster: the subject (app=db), web (app=web), other (app=x),
/// all in namespace default; CIDR identities for `cidrs` (their prefixes
/// go into the ipcache too).
fn compiled(spec: serde_json::Value, cidrs: &[&str]) -> (EndpointPolicy, Vec<(String, u32)>) {
    let mut u = Universe::new(Config::default());
    let pod = |app: &str| {
        LabelSet::parse([
            format!("k8s:app={app}").as_str(),
            "k8s:io.kubernetes.pod.namespace=default",
            "k8s:io.cilium.k8s.policy.cluster=default",
        ])
    };
    u.identities.insert(SUBJECT, pod("db"));
    u.identities.insert(WEB_ID, pod("web"));
    u.identities.insert(OTHER_ID, pod("x"));
    let mut ipc: Vec<(String, u32)> = vec![
        (POD.into(), SUBJECT),
        (WEB.into(), WEB_ID),
        (OTHER.into(), OTHER_ID),
        (POD6.into(), SUBJECT),
        (WEB6.into(), WEB_ID),
    ];
    for (i, c) in cidrs.iter().enumerate() {
        let id = LOCAL_FLAG | (i as u32 + 1);
        u.identities.insert(id, cidr_labels(&u.cfg, &Prefix::parse(c, false).unwrap()));
        ipc.push((c.to_string(), id));
    }
    let p: CiliumNetworkPolicy =
        serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "default"}, "spec": spec})).unwrap();
    let entries = parse_cnp(&p, &Config::default()).expect("valid policy").entries;
    let mut sel = Selections::new(&u);
    (cilium_policy::compile(&u.identities[&SUBJECT], &[], &entries, &mut sel), ipc)
}

fn load(name: &str, spec: serde_json::Value, cidrs: &[&str]) -> Bench {
    let mut b = bench(name);
    let (policy, ipc) = compiled(spec, cidrs);
    let entries: Vec<(&str, u32)> = ipc.iter().map(|(p, id)| (p.as_str(), *id)).collect();
    ipcache(&mut b.dp, &entries);
    install(&mut b.dp, &policy);
    b
}

fn tcp(src: &str, dst: &str, dport: u16) -> Pkt {
    Pkt::new(TCP, src, dst, 40000, dport)
}

#[test]
fn default_allow_until_selected_then_default_deny() {
    let mut b = bench("default");
    let p = tcp(WEB, POD, 80);
    assert!(allowed(&b.dp, DIR_INGRESS, &p), "no endpoint registered: not ours");
    ipcache(&mut b.dp, &[(POD, SUBJECT), (WEB, WEB_ID)]);
    set_endpoint(&mut b.dp, false, false, ENDPOINT_READY);
    assert!(allowed(&b.dp, DIR_INGRESS, &p));
    assert_eq!(counter(&mut b.dp, DIR_INGRESS, REASON_NO_POLICY), 1);
    set_endpoint(&mut b.dp, true, false, ENDPOINT_READY);
    assert!(!allowed(&b.dp, DIR_INGRESS, &tcp(OTHER, POD, 80)), "selected: default deny");
    assert_eq!(counter(&mut b.dp, DIR_INGRESS, REASON_NOT_ALLOWED), 1);
    assert!(allowed(&b.dp, DIR_EGRESS, &tcp(POD, OTHER, 443)), "egress not enforced");
}

#[test]
fn a_port_without_protocol_allows_and_denies_tcp_udp_sctp() {
    let b = load(
        "anyproto",
        json!({"endpointSelector": {"matchLabels": {"app": "db"}},
               "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}], "toPorts": [{"ports": [{"port": "80"}]}]}]}),
        &[],
    );
    for proto in [TCP, UDP, SCTP] {
        assert!(allowed(&b.dp, DIR_INGRESS, &Pkt::new(proto, WEB, POD, 1, 80)), "proto {proto}");
        assert!(!allowed(&b.dp, DIR_INGRESS, &Pkt::new(proto, WEB, POD, 1, 81)), "proto {proto} port 81");
    }
    assert!(!allowed(&b.dp, DIR_INGRESS, &tcp(OTHER, POD, 80)));
    let b = load(
        "anyproto-deny",
        json!({"endpointSelector": {"matchLabels": {"app": "db"}},
               "ingress": [{"fromEntities": ["all"]}],
               "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}], "toPorts": [{"ports": [{"port": "80"}]}]}]}),
        &[],
    );
    for proto in [TCP, UDP, SCTP] {
        assert!(!allowed(&b.dp, DIR_INGRESS, &Pkt::new(proto, WEB, POD, 1, 80)), "deny, proto {proto}");
    }
    assert!(allowed(&b.dp, DIR_INGRESS, &tcp(WEB, POD, 81)));
    assert!(allowed(&b.dp, DIR_INGRESS, &tcp(OTHER, POD, 80)));
}

#[test]
fn port_ranges_deny_inside_allow() {
    let b = load(
        "ranges",
        json!({"endpointSelector": {"matchLabels": {"app": "db"}},
               "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}], "toPorts": [{"ports": [{"port": "8000", "endPort": 8080, "protocol": "TCP"}]}]}],
               "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}], "toPorts": [{"ports": [{"port": "8010", "endPort": 8019}]}]}]}),
        &[],
    );
    for (port, want) in [
        (7999, false),
        (8000, true),
        (8009, true),
        (8010, false),
        (8019, false),
        (8020, true),
        (8080, true),
        (8081, false),
    ] {
        assert_eq!(allowed(&b.dp, DIR_INGRESS, &tcp(WEB, POD, port)), want, "port {port}");
    }
}

#[test]
fn cidr_rules_select_by_containment_and_excepts_carve_out() {
    // A broad allow stays broad next to narrower prefixes; a deny of a /28
    // except one /32 spares the /32.
    let cidrs = ["198.51.100.0/24", "198.51.100.0/28", "198.51.100.5/32"];
    let b = load(
        "cidr",
        json!({"endpointSelector": {"matchLabels": {"app": "db"}},
               "egress": [{"toCIDR": ["198.51.100.0/24"]}],
               "egressDeny": [{"toCIDRSet": [{"cidr": "198.51.100.0/28", "except": ["198.51.100.5/32"]}]}]}),
        &cidrs,
    );
    assert!(allowed(&b.dp, DIR_EGRESS, &tcp(POD, "198.51.100.200", 443)), "inside the /24");
    assert!(!allowed(&b.dp, DIR_EGRESS, &tcp(POD, "198.51.100.3", 443)), "inside the denied /28");
    assert!(allowed(&b.dp, DIR_EGRESS, &tcp(POD, "198.51.100.5", 443)), "the except");
    assert!(!allowed(&b.dp, DIR_EGRESS, &tcp(POD, "203.0.113.1", 443)), "world");
}

#[test]
fn default_deny_off_still_denies() {
    let b = load(
        "dd-off",
        json!({"endpointSelector": {"matchLabels": {"app": "db"}},
               "enableDefaultDeny": {"ingress": false},
               "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}]}]}),
        &[],
    );
    assert!(!allowed(&b.dp, DIR_INGRESS, &tcp(WEB, POD, 80)));
    assert!(allowed(&b.dp, DIR_INGRESS, &tcp(OTHER, POD, 80)));
}

#[test]
fn icmp_types_and_echo_tracking() {
    let b = load(
        "icmp",
        json!({"endpointSelector": {"matchLabels": {"app": "db"}},
               "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}], "icmps": [{"fields": [{"type": 8}]}]}],
               "egress": [{"toEndpoints": [{"matchLabels": {"app": "x"}}]}]}),
        &[],
    );
    let ping = Pkt::icmp(WEB, POD, 8, 77);
    assert!(!allowed(&b.dp, DIR_INGRESS, &Pkt::icmp(WEB, POD, 13, 77)), "timestamp is not echo");
    assert!(allowed(&b.dp, DIR_INGRESS, &ping), "echo request allowed");
    assert!(allowed(&b.dp, DIR_EGRESS, &Pkt::icmp(POD, WEB, 0, 77)), "its reply, same identifier");
    assert!(!allowed(&b.dp, DIR_EGRESS, &Pkt::icmp(POD, WEB, 0, 78)), "a reply with another identifier");
    // The regression: after web pinged us, our own echo request to web is
    // not a "reply" (egress allows only app=x).
    assert!(!allowed(&b.dp, DIR_EGRESS, &Pkt::icmp(POD, WEB, 8, 77)), "a request is never a reply");
    // An echo reply the policy did not ask for, with no request before it.
    assert!(!allowed(&b.dp, DIR_INGRESS, &Pkt::icmp(OTHER, POD, 0, 5)));
}

#[test]
fn tcp_replies_are_tracked_per_endpoint_and_direction() {
    let b = load(
        "ct",
        json!({"endpointSelector": {"matchLabels": {"app": "db"}},
               "egress": [{"toEndpoints": [{"matchLabels": {"app": "web"}}], "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}],
               "ingress": [{}]}),
        &[],
    );
    let req = tcp(POD, WEB, 80);
    assert!(!allowed(&b.dp, DIR_INGRESS, &req.reply()), "a reply before any request");
    assert!(allowed(&b.dp, DIR_EGRESS, &req));
    assert!(allowed(&b.dp, DIR_INGRESS, &req.reply()), "its reply");
    assert!(!allowed(&b.dp, DIR_INGRESS, &tcp(WEB, POD, 40000)), "a new connection from web");
    assert!(!allowed(&b.dp, DIR_INGRESS, &Pkt::new(TCP, WEB, POD, 80, 40001)), "another port pair");
    assert!(!allowed(&b.dp, DIR_INGRESS, &Pkt::new(UDP, WEB, POD, 80, 40000)), "another protocol");
}

#[test]
fn icmp_errors_about_tracked_connections_are_related() {
    let mut b = load(
        "related",
        json!({"endpointSelector": {"matchLabels": {"app": "db"}},
               "egress": [{"toEndpoints": [{"matchLabels": {"app": "web"}}], "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]},
                          {"toEndpoints": [{"matchLabels": {"app": "web"}}], "icmps": [{"fields": [{"type": 8}]}]}],
               "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}], "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]}]}),
        &[],
    );
    let conn = tcp(POD, WEB, 80);
    // The policy allows nothing from OTHER, a third host.
    assert!(!allowed_frame(&b.dp, DIR_INGRESS, &icmp_error(WEB, POD, 3, &conn)), "no connection yet");
    assert!(allowed(&b.dp, DIR_EGRESS, &conn));
    assert!(allowed_frame(&b.dp, DIR_INGRESS, &icmp_error(WEB, POD, 3, &conn)), "unreachable about it");
    assert!(allowed_frame(&b.dp, DIR_INGRESS, &icmp_error(WEB, POD, 11, &conn)), "time exceeded about it");
    assert!(allowed_frame(&b.dp, DIR_INGRESS, &icmp_error(WEB, POD, 12, &conn)), "parameter problem");
    // Only the connection's peer speaks for it: a third host quoting it is
    // judged by policy (it could otherwise smuggle anything in an error).
    assert!(!allowed_frame(&b.dp, DIR_INGRESS, &icmp_error(OTHER, POD, 3, &conn)), "a third host");
    assert!(!allowed_frame(&b.dp, DIR_INGRESS, &icmp_error(OTHER, POD, 3, &tcp(POD, WEB, 81))), "another port");
    assert!(!allowed_frame(&b.dp, DIR_INGRESS, &icmp_error(OTHER, POD, 3, &tcp(POD, OTHER, 80))), "another peer");
    assert!(!allowed_frame(&b.dp, DIR_INGRESS, &icmp_error(OTHER, POD, 5, &conn)), "a redirect is no error");
    assert!(!allowed_frame(&b.dp, DIR_EGRESS, &icmp_error(POD, OTHER, 3, &conn)), "not the way it was quoted");
    // A connection web opened (ingress UDP 53): the pod's port
    // unreachable about it leaves, and an error about the pod's reply
    // comes back.
    let dns = Pkt::new(UDP, WEB, POD, 5353, 53);
    assert!(allowed(&b.dp, DIR_INGRESS, &dns));
    assert!(allowed_frame(&b.dp, DIR_EGRESS, &icmp_error(POD, WEB, 3, &dns)), "the pod's port unreachable");
    assert!(!allowed_frame(&b.dp, DIR_EGRESS, &icmp_error(POD, WEB, 3, &Pkt::new(UDP, WEB, POD, 5353, 54))));
    assert!(allowed_frame(&b.dp, DIR_INGRESS, &icmp_error(WEB, POD, 3, &dns.reply())), "about the reply");
    // The pod cannot send "errors" quoting a live connection to anyone else.
    assert!(!allowed_frame(&b.dp, DIR_EGRESS, &icmp_error(POD, OTHER, 3, &dns)), "an error to a third host");
    // An echo request's error, by identifier.
    assert!(allowed(&b.dp, DIR_EGRESS, &Pkt::icmp(POD, WEB, 8, 99)));
    assert!(allowed_frame(&b.dp, DIR_INGRESS, &icmp_error(WEB, POD, 3, &Pkt::icmp(POD, WEB, 8, 99))));
    assert!(!allowed_frame(&b.dp, DIR_INGRESS, &icmp_error(WEB, POD, 3, &Pkt::icmp(POD, WEB, 8, 100))));
    // IPv6: packet too big (the path MTU of a TCP connection).
    let conn6 = tcp(POD6, WEB6, 80);
    assert!(!allowed_frame(&b.dp, DIR_INGRESS, &icmp_error(WEB6, POD6, 2, &conn6)), "no connection yet");
    assert!(allowed(&b.dp, DIR_EGRESS, &conn6));
    assert!(allowed_frame(&b.dp, DIR_INGRESS, &icmp_error(WEB6, POD6, 2, &conn6)), "packet too big");
    assert!(allowed_frame(&b.dp, DIR_INGRESS, &icmp_error(WEB6, POD6, 1, &conn6)), "unreachable");
    assert!(!allowed_frame(&b.dp, DIR_INGRESS, &icmp_error(WEB6, POD6, 2, &tcp(POD6, WEB6, 81))), "another port");
    assert_eq!(counter(&mut b.dp, DIR_INGRESS, REASON_RELATED), 7);
    assert_eq!(counter(&mut b.dp, DIR_EGRESS, REASON_RELATED), 1);
}

#[test]
fn every_frame_gets_a_verdict() {
    let mut b = load(
        "frames",
        json!({"endpointSelector": {"matchLabels": {"app": "db"}},
               "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}], "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}),
        &[],
    );
    let mut arp = vec![0u8; 42];
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(run_frame(&b.dp, "to_container", &arp), TC_ACT_OK, "ARP");
    let mut lldp = vec![0u8; 60];
    lldp[12..14].copy_from_slice(&0x88ccu16.to_be_bytes());
    assert_eq!(run_frame(&b.dp, "to_container", &lldp), TC_ACT_SHOT, "other ethertypes in an enforced direction");
    assert_eq!(run_frame(&b.dp, "from_container", &lldp), TC_ACT_OK, "not enforced");
    let mut short = tcp(WEB, POD, 80).frame();
    short.truncate(14 + 20 + 2);
    assert_eq!(run_frame(&b.dp, "to_container", &short), TC_ACT_SHOT, "truncated");
    // IPv6 gets the same rules as IPv4.
    assert!(allowed(&b.dp, DIR_INGRESS, &tcp(WEB6, POD6, 80)));
    assert!(!allowed(&b.dp, DIR_INGRESS, &tcp(WEB6, POD6, 81)));
    assert!(!allowed(&b.dp, DIR_INGRESS, &tcp("2001:db8::9", POD6, 80)), "IPv6 world");
    assert!(!allowed(&b.dp, DIR_INGRESS, &Pkt::icmp(WEB6, POD6, 128, 1)), "ICMPv6 echo not allowed");
    assert!(allowed(&b.dp, DIR_INGRESS, &Pkt::icmp(WEB6, POD6, 135, 0)), "neighbour solicitation");
    assert!(counter(&mut b.dp, DIR_INGRESS, REASON_UNSUPPORTED_L3) >= 1);
}

#[test]
fn a_failed_endpoint_drops_everything() {
    let mut b = load("failed", json!({"endpointSelector": {}, "ingress": [{"fromEntities": ["all"]}]}), &[]);
    assert!(allowed(&b.dp, DIR_INGRESS, &tcp(WEB, POD, 80)));
    set_endpoint(&mut b.dp, true, false, ENDPOINT_FAILED);
    assert!(!allowed(&b.dp, DIR_INGRESS, &tcp(WEB, POD, 80)));
    assert!(!allowed(&b.dp, DIR_EGRESS, &tcp(POD, WEB, 80)));
    assert_eq!(counter(&mut b.dp, DIR_INGRESS, REASON_ENDPOINT_NOT_READY), 1);
}

fn entry(peer: u32, port: u16) -> PolicyEntry {
    PolicyEntry { direction: DIR_INGRESS, key: MapKey { peer, proto: TCP, port, plen: 16 } }
}

#[test]
fn a_full_map_is_reported_and_loses_no_removal() {
    let mut b = bench("full");
    // Another endpoint takes all but 10 slots.
    let filler: std::collections::BTreeMap<PolicyEntry, bool> =
        (0..POLICY_MAP_SIZE - 10).map(|i| (entry(5000 + i / 60000, (i % 60000) as u16 + 1), false)).collect();
    b.dp.sync_policy(7, &filler).expect("filler fits");
    let want: std::collections::BTreeMap<PolicyEntry, bool> = (1..=20).map(|p| (entry(WEB_ID, p), false)).collect();
    assert!(b.dp.sync_policy(EP, &want).is_err(), "20 entries into 10 free slots");
    // What is in memory is what is in the kernel, entry for entry.
    let kernel = b.dp.policy_entries().unwrap();
    assert_eq!(kernel.get(&EP), b.dp.endpoint_policy(EP));
    assert_eq!(kernel[&EP].len(), 10);
    // Shrinking the policy after the failure still removes the stale entries.
    let smaller: std::collections::BTreeMap<PolicyEntry, bool> = (1..=5).map(|p| (entry(WEB_ID, p), false)).collect();
    b.dp.sync_policy(EP, &smaller).expect("fits now");
    assert_eq!(b.dp.policy_entries().unwrap()[&EP], smaller);
}

#[test]
fn maps_survive_a_reload_from_the_same_pins() {
    let b = load(
        "reload",
        json!({"endpointSelector": {"matchLabels": {"app": "db"}},
               "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}], "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}),
        &[],
    );
    let mut again = Datapath::load(&b.dir).unwrap();
    assert!(allowed(&again, DIR_INGRESS, &tcp(WEB, POD, 80)));
    assert!(!allowed(&again, DIR_INGRESS, &tcp(OTHER, POD, 80)));
    assert!(again.endpoint_policy(EP).is_some_and(|e| !e.is_empty()), "the entries are read back");
    assert!(again.ipcache_entries().unwrap().len() >= 5);
}

/// Every event waiting in the ring buffer.
fn drain(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        out.push(Event::from_bytes(&item).expect("an event"));
    }
    out
}

#[test]
fn drops_and_asked_verdicts_are_events_and_a_full_buffer_is_counted() {
    let b = load(
        "events",
        json!({"endpointSelector": {"matchLabels": {"app": "db"}},
               "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}], "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}],
               "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "x"}}], "toPorts": [{"ports": [{"port": "443"}]}]}]}),
        &[],
    );
    let mut ring = Datapath::pinned_events(&b.dir).unwrap();
    // Default: drops only.
    assert!(allowed(&b.dp, DIR_INGRESS, &tcp(WEB, POD, 80)));
    assert!(!allowed(&b.dp, DIR_INGRESS, &tcp(OTHER, POD, 80)));
    assert!(!allowed(&b.dp, DIR_INGRESS, &tcp(OTHER, POD, 443)));
    let ev = drain(&mut ring);
    assert_eq!(ev.len(), 2, "two drops, no event for the allowed packet: {ev:?}");
    let (d, r) = (&ev[0], &ev[1]);
    assert_eq!((d.endpoint_id, d.identity, d.peer_identity), (EP, 1000, OTHER_ID));
    assert_eq!((d.direction, d.reason, d.matched), (DIR_INGRESS, REASON_NOT_ALLOWED, MATCH_NONE));
    assert_eq!((ip_of(&d.saddr).to_string(), ip_of(&d.daddr).to_string()), (OTHER.to_string(), POD.to_string()));
    assert_eq!((d.proto, d.sport, d.dport), (TCP, 40000, 80));
    assert!(d.len > 0 && d.ts_ns > 0);
    assert_eq!((r.reason, r.matched, r.dport), (REASON_DENIED_BY_RULE, MATCH_PEER, 443));
    // Verdicts asked for: the allowed packet and its reply too.
    Datapath::set_event_flags(&b.dir, EVENTS_VERDICTS).unwrap();
    let p = tcp(WEB, POD, 80);
    assert!(allowed(&b.dp, DIR_INGRESS, &p));
    assert!(allowed(&b.dp, DIR_EGRESS, &p.reply()));
    let ev = drain(&mut ring);
    assert_eq!(
        ev.iter().map(|e| (e.reason, e.matched, e.peer_identity)).collect::<Vec<_>>(),
        vec![(REASON_ALLOWED_BY_POLICY, MATCH_PEER, WEB_ID), (REASON_REPLY, MATCH_NONE, WEB_ID)]
    );
    // Drops turned off: nothing.
    Datapath::set_event_flags(&b.dir, EVENTS_NO_DROPS).unwrap();
    assert!(!allowed(&b.dp, DIR_INGRESS, &tcp(OTHER, POD, 80)));
    assert!(drain(&mut ring).is_empty());
    // A full buffer: the rest are counted as lost, none silently.
    Datapath::set_event_flags(&b.dir, 0).unwrap();
    let per_event = std::mem::size_of::<Event>() as u64 + 8; // record header
    let fits = u64::from(EVENTS_RING_SIZE) / per_event;
    let sent = fits + 100;
    for _ in 0..sent {
        run(&b.dp, DIR_INGRESS, &tcp(OTHER, POD, 80));
    }
    let lost = Datapath::pinned_events_lost(&b.dir).unwrap();
    let got = drain(&mut ring).len() as u64;
    assert_eq!(got + lost, sent, "every drop is an event or counted lost");
    assert!(lost >= 100, "{lost} lost");
}

/// The agent's reader under a flood: every event reaches the client or is
/// reported to it as lost (none unaccounted), and after the flood a single
/// drop is still delivered (the reader never stalls on a missed wakeup).
#[test]
fn monitor_reader_accounts_for_every_event_and_never_stalls() {
    use node_agent_stub::monitor::{Message, Monitor};
    let b = load(
        "reader",
        json!({"endpointSelector": {"matchLabels": {"app": "db"}},
               "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}]}]}),
        &[],
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let monitor = Monitor::new("node-a", b.dir.clone());
    rt.spawn(monitor.clone().run_reader());
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut sub = monitor.subscribe(false);
    let (flows, lost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (f, l) = (flows.clone(), lost.clone());
    rt.spawn(async move {
        while let Some(m) = sub.next().await {
            match &*m {
                Message::Flow(_) => f.fetch_add(1, Ordering::SeqCst),
                Message::LostEvents { num_events_lost, .. } => l.fetch_add(*num_events_lost, Ordering::SeqCst),
            };
        }
    });
    let drop = tcp(OTHER, POD, 80).frame();
    let prog = b.dp.program("to_container");
    let sent = 200_000u64;
    for _ in 0..sent / 10_000 {
        let opts = aya::programs::TestRunOptions { data_in: Some(&drop), repeat: 10_000, ..Default::default() };
        aya::programs::TestRun::test_run(prog, opts).unwrap();
    }
    let settled = |want: u64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while flows.load(Ordering::SeqCst) + lost.load(Ordering::SeqCst) < want && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        (flows.load(Ordering::SeqCst), lost.load(Ordering::SeqCst))
    };
    let (got, gone) = settled(sent);
    assert_eq!(got + gone, sent, "{got} delivered + {gone} reported lost of {sent}");
    assert!(got > 0 && gone > 0, "a flood beyond the ring buffer: {got} delivered, {gone} lost");
    // Quiet, then one more drop: delivered at once (not by the reader's
    // once-a-second tick).
    std::thread::sleep(std::time::Duration::from_millis(300));
    let t0 = std::time::Instant::now();
    assert!(!allowed(&b.dp, DIR_INGRESS, &tcp(OTHER, POD, 80)));
    let (after, gone_after) = settled(sent + 1);
    assert_eq!((after, gone_after), (got + 1, gone), "the drop after the flood");
    assert!(t0.elapsed() < std::time::Duration::from_millis(300), "delivered after {:?}", t0.elapsed());
}
