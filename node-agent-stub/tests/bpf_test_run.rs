//! bpf/policy.c on synthetic frames through BPF_PROG_TEST_RUN: no
//! namespace, no interface. Needs root (CAP_BPF) and bpffs, like the agent.
//! The test run's skb arrives on the loopback device (ifindex 1), so the
//! endpoint under test is registered at ifindex 1.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use aya::programs::{TestRun, TestRunOptions};
use node_agent_stub::datapath::*;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;

fn frame(proto: u8, src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut f = vec![0u8; 14];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let l4_len = match proto {
        TCP => 20,
        UDP | ICMP => 8,
        _ => 0,
    };
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    f.extend_from_slice(&ip);
    let mut l4 = vec![0u8; l4_len];
    if proto == TCP || proto == UDP {
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
    }
    f.extend_from_slice(&l4);
    f
}

struct Bench {
    dp: Datapath,
    dir: std::path::PathBuf,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bench(name: &str) -> Bench {
    ensure_bpffs().expect("bpffs");
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/cilium-rs-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    Bench { dp: Datapath::load(&dir).expect("load"), dir }
}

fn run(dp: &Datapath, prog: &str, data: &[u8]) -> u32 {
    let opts = TestRunOptions { data_in: Some(data), ..Default::default() };
    dp.program(prog).test_run(opts).expect("test run").return_value
}

const POD: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 5);
const PEER_A: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 7);
const PEER_B: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 8);
const EP: u32 = 42;

fn setup(dp: &mut Datapath, ingress: bool, egress: bool) {
    dp.set_endpoint(
        1,
        EndpointValue {
            endpoint_id: EP,
            identity: 1000,
            ingress_enforce: ingress as u8,
            egress_enforce: egress as u8,
            pad: [0; 2],
        },
    )
    .unwrap();
    let ipcache: BTreeMap<(Ipv4Addr, u8), u32> = [
        ((POD, 32), 1000),
        ((PEER_A, 32), 2001),
        ((PEER_B, 32), 2002),
        ((Ipv4Addr::new(192, 0, 2, 0), 24), 16_777_217),
    ]
    .into();
    dp.sync_ipcache(&ipcache).unwrap();
}

fn allow(id: u32, port: u16, proto: u8, dir: u8) -> (PolicyKey, PolicyValue) {
    (PolicyKey { endpoint_id: EP, identity: id, dport: port, proto, direction: dir }, PolicyValue::default())
}

fn deny(id: u32, port: u16, proto: u8, dir: u8) -> (PolicyKey, PolicyValue) {
    (
        PolicyKey { endpoint_id: EP, identity: id, dport: port, proto, direction: dir },
        PolicyValue { deny: 1, pad: [0; 3] },
    )
}

fn counter(dp: &mut Datapath, dir: u8, reason: u8) -> u64 {
    dp.metrics()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k.endpoint_id == EP && k.direction == dir && k.reason == reason)
        .map(|(_, v)| v.packets)
        .unwrap_or(0)
}

#[test]
fn default_allow_until_selected_then_default_deny() {
    let mut b = bench("default");
    let f = frame(TCP, PEER_A, POD, 40000, 80);
    assert_eq!(run(&b.dp, "to_container", &f), TC_ACT_OK, "no endpoint registered: not ours");
    setup(&mut b.dp, false, false);
    assert_eq!(run(&b.dp, "to_container", &f), TC_ACT_OK);
    assert_eq!(counter(&mut b.dp, DIR_INGRESS, REASON_NO_POLICY), 1);
    setup(&mut b.dp, true, false);
    assert_eq!(run(&b.dp, "to_container", &frame(TCP, PEER_B, POD, 40001, 80)), TC_ACT_SHOT, "selected: default deny");
    assert_eq!(counter(&mut b.dp, DIR_INGRESS, REASON_NOT_ALLOWED), 1);
    // Egress is not enforced: the pod may still send.
    assert_eq!(run(&b.dp, "from_container", &frame(TCP, POD, PEER_B, 40002, 443)), TC_ACT_OK);
}

#[test]
fn l3_l4_allow_and_deny_wins() {
    let mut b = bench("l4");
    setup(&mut b.dp, true, true);
    let want: BTreeMap<_, _> = [allow(2001, 80, TCP, DIR_INGRESS), allow(0, 53, UDP, DIR_EGRESS)].into();
    b.dp.sync_policy(EP, &want).unwrap();
    assert_eq!(run(&b.dp, "to_container", &frame(TCP, PEER_A, POD, 40000, 80)), TC_ACT_OK, "allowed identity and port");
    assert_eq!(run(&b.dp, "to_container", &frame(TCP, PEER_A, POD, 40000, 81)), TC_ACT_SHOT, "other port");
    assert_eq!(run(&b.dp, "to_container", &frame(UDP, PEER_A, POD, 40000, 80)), TC_ACT_SHOT, "other protocol");
    assert_eq!(run(&b.dp, "to_container", &frame(TCP, PEER_B, POD, 40000, 80)), TC_ACT_SHOT, "other identity");
    assert_eq!(
        run(&b.dp, "from_container", &frame(UDP, POD, PEER_B, 40000, 53)),
        TC_ACT_OK,
        "egress to any peer on 53/udp"
    );
    assert_eq!(run(&b.dp, "from_container", &frame(TCP, POD, PEER_B, 40000, 53)), TC_ACT_SHOT);

    // Allow everything from anyone, deny PEER_A on 80: the deny wins.
    let want: BTreeMap<_, _> = [allow(0, 0, 0, DIR_INGRESS), deny(2001, 80, TCP, DIR_INGRESS)].into();
    b.dp.sync_policy(EP, &want).unwrap();
    assert_eq!(run(&b.dp, "to_container", &frame(TCP, PEER_A, POD, 41000, 80)), TC_ACT_SHOT, "deny beats allow-all");
    assert_eq!(run(&b.dp, "to_container", &frame(TCP, PEER_A, POD, 41000, 8080)), TC_ACT_OK);
    assert_eq!(run(&b.dp, "to_container", &frame(TCP, PEER_B, POD, 41000, 80)), TC_ACT_OK);
    assert!(counter(&mut b.dp, DIR_INGRESS, REASON_DENIED_BY_RULE) >= 1);
    // sync_policy removed the stale entries of the first policy.
    assert_eq!(
        run(&b.dp, "from_container", &frame(UDP, POD, PEER_B, 40000, 53)),
        TC_ACT_SHOT,
        "stale egress allow removed"
    );
}

#[test]
fn cidr_and_world_identities() {
    let mut b = bench("cidr");
    setup(&mut b.dp, true, false);
    let want: BTreeMap<_, _> = [allow(16_777_217, 0, 0, DIR_INGRESS)].into();
    b.dp.sync_policy(EP, &want).unwrap();
    assert_eq!(
        run(&b.dp, "to_container", &frame(TCP, Ipv4Addr::new(192, 0, 2, 77), POD, 1, 22)),
        TC_ACT_OK,
        "in 192.0.2.0/24"
    );
    assert_eq!(
        run(&b.dp, "to_container", &frame(TCP, Ipv4Addr::new(198, 51, 100, 1), POD, 1, 22)),
        TC_ACT_SHOT,
        "world"
    );
    let want: BTreeMap<_, _> = [allow(IDENTITY_WORLD, 0, 0, DIR_INGRESS)].into();
    b.dp.sync_policy(EP, &want).unwrap();
    assert_eq!(
        run(&b.dp, "to_container", &frame(TCP, Ipv4Addr::new(198, 51, 100, 1), POD, 1, 22)),
        TC_ACT_OK,
        "world allowed"
    );
}

#[test]
fn replies_of_allowed_connections_pass() {
    let mut b = bench("ct");
    setup(&mut b.dp, true, true);
    let want: BTreeMap<_, _> = [allow(2001, 80, TCP, DIR_EGRESS), allow(0, 0, ICMP, DIR_EGRESS)].into();
    b.dp.sync_policy(EP, &want).unwrap();
    // The reply before any request: dropped (ingress enforced, nothing allowed).
    assert_eq!(run(&b.dp, "to_container", &frame(TCP, PEER_A, POD, 80, 45000)), TC_ACT_SHOT);
    assert_eq!(run(&b.dp, "from_container", &frame(TCP, POD, PEER_A, 45000, 80)), TC_ACT_OK, "request allowed");
    assert_eq!(run(&b.dp, "to_container", &frame(TCP, PEER_A, POD, 80, 45000)), TC_ACT_OK, "its reply passes");
    assert_eq!(counter(&mut b.dp, DIR_INGRESS, REASON_REPLY), 1);
    assert_eq!(run(&b.dp, "to_container", &frame(TCP, PEER_A, POD, 80, 45001)), TC_ACT_SHOT, "not a reply");
    assert_eq!(run(&b.dp, "from_container", &frame(ICMP, POD, PEER_B, 0, 0)), TC_ACT_OK, "ping out");
    assert_eq!(run(&b.dp, "to_container", &frame(ICMP, PEER_B, POD, 0, 0)), TC_ACT_OK, "pong back");
}

#[test]
fn non_ip_passes_and_truncated_ip_drops() {
    let mut b = bench("parse");
    setup(&mut b.dp, true, true);
    let mut arp = vec![0u8; 42];
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(run(&b.dp, "to_container", &arp), TC_ACT_OK);
    let mut short = frame(TCP, PEER_A, POD, 1, 80);
    short.truncate(14 + 20 + 2);
    assert_eq!(run(&b.dp, "to_container", &short), TC_ACT_SHOT);
}

#[test]
fn maps_survive_a_reload_from_the_same_pins() {
    let mut b = bench("reload");
    setup(&mut b.dp, true, false);
    b.dp.sync_policy(EP, &[allow(2001, 80, TCP, DIR_INGRESS)].into()).unwrap();
    // A second loader (a restarted agent) sees the same state.
    let again = Datapath::load(&b.dir).unwrap();
    assert_eq!(run(&again, "to_container", &frame(TCP, PEER_A, POD, 40000, 80)), TC_ACT_OK);
    assert_eq!(run(&again, "to_container", &frame(TCP, PEER_B, POD, 40000, 80)), TC_ACT_SHOT);
}
