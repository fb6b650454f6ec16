//! Node-to-node health, as upstream's cilium-health: every node answers
//! on TCP port 4240 on its node address and on its health endpoint (a
//! namespace with an address from the node's pod CIDR, published in its
//! CiliumNode's `spec.health`); every agent probes every node's address
//! and health endpoint with ICMP echo and a TCP connection on an interval.
//! The results are served on the agent's API (`/v1/health`, `ciliumctl
//! health`) and as `cilium_unreachable_nodes` and
//! `cilium_unreachable_health_endpoints` (upstream's names).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

/// Upstream's cilium-health port.
pub const HEALTH_PORT: u16 = 4240;
/// The health endpoint's interface on the node (upstream's name).
pub const HEALTH_IFNAME: &str = "lxc_health";

/// A node to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub node_ip: IpAddr,
    pub health_ip: Option<IpAddr>,
}

/// The result of one probe.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Probe {
    pub ok: bool,
    /// Round trip (ICMP) or connection time (TCP), when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Probe {
    fn of(r: Result<Duration, String>) -> Probe {
        match r {
            Ok(d) => Probe { ok: true, latency_ms: Some(d.as_secs_f64() * 1000.0), error: None },
            Err(e) => Probe { ok: false, latency_ms: None, error: Some(e) },
        }
    }
}

/// ICMP and TCP to one address.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Reach {
    pub ip: String,
    pub icmp: Probe,
    pub tcp: Probe,
}

impl Reach {
    pub fn ok(&self) -> bool {
        self.icmp.ok && self.tcp.ok
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct NodeHealth {
    pub name: String,
    pub node: Reach,
    /// None: the node publishes no health endpoint (yet).
    pub endpoint: Option<Reach>,
}

/// What `/v1/health` answers.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Report {
    /// The node probing.
    pub from: String,
    pub interval_seconds: f64,
    /// When the last round ended (RFC 3339); None before the first.
    pub updated: Option<String>,
    pub nodes: Vec<NodeHealth>,
}

impl Report {
    /// Nodes whose address failed a probe, and nodes whose health
    /// endpoint failed one or is missing.
    pub fn unreachable(&self) -> (usize, usize) {
        let nodes = self.nodes.iter().filter(|n| !n.node.ok()).count();
        let endpoints = self.nodes.iter().filter(|n| !n.endpoint.as_ref().is_some_and(Reach::ok)).count();
        (nodes, endpoints)
    }

    pub fn metrics(&self) -> String {
        let (nodes, endpoints) = self.unreachable();
        format!(
            "# HELP cilium_unreachable_nodes Number of nodes that cannot be reached (ICMP or TCP to the node address)\n\
             # TYPE cilium_unreachable_nodes gauge\ncilium_unreachable_nodes {nodes}\n\
             # HELP cilium_unreachable_health_endpoints Number of health endpoints that cannot be reached\n\
             # TYPE cilium_unreachable_health_endpoints gauge\ncilium_unreachable_health_endpoints {endpoints}\n"
        )
    }
}

/// Runs `f` on a new thread inside the network namespace at `netns`
/// (threads it spawns stay there too).
pub fn spawn_in_netns(
    name: &str,
    netns: &Path,
    f: impl FnOnce() + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let ns = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new().name(name.into()).spawn(move || {
        // SAFETY: setns(2) on this fresh thread only.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let _ = tx.send(Err(std::io::Error::last_os_error().to_string()));
            return;
        }
        let _ = tx.send(Ok(()));
        f();
    })?;
    rx.recv().context("health thread")?.map_err(|e| anyhow::anyhow!("setns into {}: {e}", netns.display()))?;
    Ok(handle)
}

/// Answers TCP on `HEALTH_PORT` (all addresses of the namespace at
/// `netns`) with an HTTP 200, for the life of the process.
pub fn serve(netns: &Path) -> anyhow::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_in_netns("health-responder", netns, move || {
        let l = match TcpListener::bind(("0.0.0.0", HEALTH_PORT)) {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        };
        let _ = tx.send(Ok(()));
        for mut s in l.incoming().map_while(Result::ok) {
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    })?;
    rx.recv()
        .context("health responder")?
        .map_err(|e| anyhow::anyhow!("health responder on port {HEALTH_PORT} in {}: {e}", netns.display()))
}

fn tcp_probe(ip: IpAddr, timeout: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    TcpStream::connect_timeout(&SocketAddr::new(ip, HEALTH_PORT), timeout).map_err(|e| e.to_string())?;
    Ok(t0.elapsed())
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One ICMP echo to `ip` (IPv4) on a raw socket; the round trip.
fn icmp_probe(ip: Ipv4Addr, ident: u16, seq: u16, timeout: Duration) -> Result<Duration, String> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(format!("raw socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh socket we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut pkt = [0u8; 16];
    pkt[0] = 8; // echo request
    pkt[4..6].copy_from_slice(&ident.to_be_bytes());
    pkt[6..8].copy_from_slice(&seq.to_be_bytes());
    pkt[8..16].copy_from_slice(b"ciliumrs");
    let c = checksum(&pkt);
    pkt[2..4].copy_from_slice(&c.to_be_bytes());
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let t0 = Instant::now();
    // SAFETY: valid buffer and address for the call's duration.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(format!("send: {}", std::io::Error::last_os_error()));
    }
    let mut buf = [0u8; 1500];
    loop {
        let left = timeout.saturating_sub(t0.elapsed());
        if left.is_zero() {
            return Err(format!("no echo reply within {} ms", timeout.as_millis()));
        }
        let tv = libc::timeval { tv_sec: left.as_secs() as _, tv_usec: left.subsec_micros().max(1) as _ };
        // SAFETY: a valid timeval for SO_RCVTIMEO.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        // SAFETY: buf is ours and large enough.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                continue;
            }
            return Err(format!("receive: {e}"));
        }
        let b = &buf[..n as usize];
        // A raw IPv4 socket gets the IP header too.
        let ihl = usize::from(b.first().copied().unwrap_or(0) & 0xf) * 4;
        let (Some(src), Some(icmp)) = (b.get(12..16), b.get(ihl..ihl + 8)) else { continue };
        let from = Ipv4Addr::new(src[0], src[1], src[2], src[3]);
        if from == ip && icmp[0] == 0 && icmp[4..6] == ident.to_be_bytes() && icmp[6..8] == seq.to_be_bytes() {
            return Ok(t0.elapsed());
        }
    }
}

/// ICMP and TCP to `ip`, both at once.
fn reach(ip: IpAddr, ident: u16, seq: u16, timeout: Duration) -> Reach {
    std::thread::scope(|s| {
        let tcp = s.spawn(move || Probe::of(tcp_probe(ip, timeout)));
        let icmp = match ip {
            IpAddr::V4(v4) => Probe::of(icmp_probe(v4, ident, seq, timeout)),
            IpAddr::V6(_) => Probe { ok: true, latency_ms: None, error: Some("ICMPv6 not probed".into()) },
        };
        let tcp = tcp.join().unwrap_or_else(|_| Probe::of(Err("probe thread failed".into())));
        Reach { ip: ip.to_string(), icmp, tcp }
    })
}

/// Probes every target once, every probe at once (a round takes at most
/// `timeout`); the thread calling it must be in the node's network
/// namespace.
pub fn probe_all(targets: &[Target], round: u16, timeout: Duration) -> Vec<NodeHealth> {
    std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                // One echo identifier per address: replies are told apart.
                let ident = (std::process::id() as u16).wrapping_add((i as u16).wrapping_mul(2));
                let node = s.spawn(move || reach(t.node_ip, ident, round, timeout));
                let endpoint = t.health_ip.map(|ip| s.spawn(move || reach(ip, ident.wrapping_add(1), round, timeout)));
                (t, node, endpoint)
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|(t, node, endpoint)| {
                Some(NodeHealth {
                    name: t.name.clone(),
                    node: node.join().ok()?,
                    endpoint: match endpoint {
                        Some(h) => Some(h.join().ok()?),
                        None => None,
                    },
                })
            })
            .collect()
    })
}

/// The shared state: targets written by the agent, the report by the
/// prober.
#[derive(Default)]
pub struct Health {
    pub targets: Mutex<Vec<Target>>,
    pub report: Mutex<Report>,
}

/// Probes the targets every `interval` from inside `node_netns`, for the
/// life of the process.
pub fn start_prober(health: Arc<Health>, node: &str, node_netns: &Path, interval: Duration) -> anyhow::Result<()> {
    let node = node.to_string();
    {
        let mut r = health.report.lock().expect("health report");
        r.from = node.clone();
        r.interval_seconds = interval.as_secs_f64();
    }
    spawn_in_netns("health-prober", node_netns, move || {
        // A round ends well within its interval even when every probe
        // times out.
        let timeout = (interval / 2).clamp(Duration::from_millis(100), Duration::from_secs(2));
        let mut round: u16 = 0;
        loop {
            let t0 = Instant::now();
            let targets = health.targets.lock().expect("health targets").clone();
            let mut nodes = probe_all(&targets, round, timeout);
            nodes.sort_by(|a, b| a.name.cmp(&b.name));
            {
                let mut r = health.report.lock().expect("health report");
                r.nodes = nodes;
                r.updated = Some(jiff::Timestamp::now().to_string());
            }
            round = round.wrapping_add(1);
            std::thread::sleep(interval.saturating_sub(t0.elapsed()));
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reach(ok: bool) -> Reach {
        let p = Probe { ok, latency_ms: ok.then_some(0.1), error: (!ok).then(|| "timed out".into()) };
        Reach { ip: "192.168.210.12".into(), icmp: p.clone(), tcp: p }
    }

    #[test]
    fn unreachable_counts_nodes_and_endpoints_apart() {
        let r = Report {
            nodes: vec![
                NodeHealth { name: "a".into(), node: reach(true), endpoint: Some(reach(true)) },
                NodeHealth { name: "b".into(), node: reach(false), endpoint: Some(reach(false)) },
                NodeHealth { name: "c".into(), node: reach(true), endpoint: None },
            ],
            ..Default::default()
        };
        assert_eq!(r.unreachable(), (1, 2));
        let m = r.metrics();
        assert!(m.contains("cilium_unreachable_nodes 1\n"));
        assert!(m.contains("cilium_unreachable_health_endpoints 2\n"));
    }

    #[test]
    fn icmp_checksum() {
        // An echo request with id 1, seq 1 and no data: 0xf7fd.
        let pkt = [8u8, 0, 0, 0, 0, 1, 0, 1];
        assert_eq!(checksum(&pkt), 0xf7fd);
    }
}
