//! Shared by the kernel tests: synthetic frames, a datapath loaded under a
//! private bpffs directory, and BPF_PROG_TEST_RUN. Needs root (CAP_BPF).
//! The test run's skb arrives on the loopback device (ifindex 1), so the
//! endpoint under test is registered at ifindex 1.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use aya::programs::{TestRun, TestRunOptions};
use cilium_policy::{EndpointPolicy, Prefix};
use node_agent_stub::datapath::*;

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
pub const EP: u32 = 42;

/// An IP packet to build: addresses of either family, the L4 protocol, and
/// ports (TCP/UDP/SCTP) or type and echo identifier (ICMP/ICMPv6).
#[derive(Clone, Copy, Debug)]
pub struct Pkt {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
}

impl Pkt {
    pub fn new(proto: u8, src: &str, dst: &str, sport: u16, dport: u16) -> Pkt {
        Pkt { proto, src: src.parse().unwrap(), dst: dst.parse().unwrap(), sport, dport, tcp_flags: 0x02 }
    }
    /// ICMP(v6) with `ty` and echo identifier `id`.
    pub fn icmp(src: &str, dst: &str, ty: u8, id: u16) -> Pkt {
        let src: IpAddr = src.parse().unwrap();
        let proto = if src.is_ipv4() { ICMP } else { ICMPV6 };
        Pkt { proto, src, dst: dst.parse().unwrap(), sport: u16::from(ty), dport: id, tcp_flags: 0 }
    }
    pub fn reply(&self) -> Pkt {
        Pkt { src: self.dst, dst: self.src, sport: self.dport, dport: self.sport, tcp_flags: 0x12, ..*self }
    }

    pub fn frame(&self) -> Vec<u8> {
        let mut l4 = match self.proto {
            TCP => {
                let mut h = vec![0u8; 20];
                h[12] = 5 << 4;
                h[13] = self.tcp_flags;
                h
            }
            UDP | SCTP => vec![0u8; 12],
            ICMP | ICMPV6 => vec![0u8; 8],
            _ => vec![0u8; 8],
        };
        match self.proto {
            TCP | UDP | SCTP => {
                l4[0..2].copy_from_slice(&self.sport.to_be_bytes());
                l4[2..4].copy_from_slice(&self.dport.to_be_bytes());
            }
            ICMP | ICMPV6 => {
                l4[0] = self.sport as u8;
                l4[4..6].copy_from_slice(&self.dport.to_be_bytes());
            }
            _ => {}
        }
        let mut f = vec![0u8; 14];
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
                let mut ip = [0u8; 20];
                ip[0] = 0x45;
                ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
                ip[8] = 64;
                ip[9] = self.proto;
                ip[12..16].copy_from_slice(&s.octets());
                ip[16..20].copy_from_slice(&d.octets());
                f.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
                let mut ip = [0u8; 40];
                ip[0] = 0x60;
                ip[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
                ip[6] = self.proto;
                ip[7] = 64;
                ip[8..24].copy_from_slice(&s.octets());
                ip[24..40].copy_from_slice(&d.octets());
                f.extend_from_slice(&ip);
            }
            _ => panic!("mixed families"),
        }
        f.extend_from_slice(&l4);
        f
    }
}

/// An ICMP (ICMPv6 for IPv6) error of type `ty` from `src` to `dst`
/// quoting `quoted` (its IP header and first 8 bytes of L4), as routers
/// and hosts send them.
pub fn icmp_error(src: &str, dst: &str, ty: u8, quoted: &Pkt) -> Vec<u8> {
    let inner = quoted.frame();
    let ip_len = if quoted.src.is_ipv4() { 20 } else { 40 };
    let quote = &inner[14..(14 + ip_len + 8).min(inner.len())];
    let src: IpAddr = src.parse().unwrap();
    let outer = Pkt {
        proto: if src.is_ipv4() { ICMP } else { ICMPV6 },
        src,
        dst: dst.parse().unwrap(),
        sport: u16::from(ty),
        dport: 0,
        tcp_flags: 0,
    };
    let mut f = outer.frame();
    // The outer frame ends with the 8-byte ICMP header: the quote follows,
    // and the IP length grows by it.
    f.extend_from_slice(quote);
    if outer.src.is_ipv4() {
        let total = (f.len() - 14) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
    } else {
        let payload = (f.len() - 14 - 40) as u16;
        f[18..20].copy_from_slice(&payload.to_be_bytes());
    }
    f
}

pub fn allowed_frame(dp: &Datapath, dir: u8, frame: &[u8]) -> bool {
    run_frame(dp, if dir == DIR_INGRESS { "to_container" } else { "from_container" }, frame) == TC_ACT_OK
}

pub struct Bench {
    pub dp: Datapath,
    pub dir: std::path::PathBuf,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn bench(name: &str) -> Bench {
    ensure_bpffs().expect("bpffs");
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/cilium-rs-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    Bench { dp: Datapath::load(&dir).expect("load"), dir }
}

pub fn run_frame(dp: &Datapath, prog: &str, data: &[u8]) -> u32 {
    let opts = TestRunOptions { data_in: Some(data), ..Default::default() };
    dp.program(prog).test_run(opts).expect("test run").return_value
}

/// Ingress of the endpoint: `to_container`; egress: `from_container`.
pub fn run(dp: &Datapath, dir: u8, p: &Pkt) -> u32 {
    run_frame(dp, if dir == DIR_INGRESS { "to_container" } else { "from_container" }, &p.frame())
}

pub fn allowed(dp: &Datapath, dir: u8, p: &Pkt) -> bool {
    run(dp, dir, p) == TC_ACT_OK
}

pub fn set_endpoint(dp: &mut Datapath, ingress: bool, egress: bool, state: u8) {
    dp.set_endpoint(
        1,
        EndpointValue {
            endpoint_id: EP,
            identity: 1000,
            ingress_enforce: u8::from(ingress),
            egress_enforce: u8::from(egress),
            state,
            pad: 0,
        },
    )
    .unwrap();
}

/// The ipcache of the tests: world for both families (as the agent
/// installs it) plus `entries` (`prefix`, identity).
pub fn ipcache(dp: &mut Datapath, entries: &[(&str, u32)]) {
    let mut want: BTreeMap<Prefix, u32> = BTreeMap::new();
    want.insert(Prefix::parse("0.0.0.0/0", false).unwrap(), 2);
    want.insert(Prefix::parse("::/0", false).unwrap(), 2);
    for (p, id) in entries {
        want.insert(Prefix::parse(p, true).unwrap(), *id);
    }
    dp.sync_ipcache(&want).unwrap();
}

/// Writes an engine-compiled policy for endpoint EP (both directions).
pub fn install(dp: &mut Datapath, policy: &EndpointPolicy) {
    set_endpoint(dp, policy.ingress.enforced, policy.egress.enforced, ENDPOINT_READY);
    let mut entries = BTreeMap::new();
    for (direction, d) in [(DIR_INGRESS, &policy.ingress), (DIR_EGRESS, &policy.egress)] {
        entries.extend(d.entries.iter().map(|(key, deny)| (PolicyEntry { direction, key: *key }, *deny)));
    }
    dp.sync_policy(EP, &entries).unwrap();
}

pub fn counter(dp: &mut Datapath, dir: u8, reason: u8) -> u64 {
    dp.metrics()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k.endpoint_id == EP && k.direction == dir && k.reason == reason)
        .map(|(_, v)| v.packets)
        .unwrap_or(0)
}
