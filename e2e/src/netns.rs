//! Network namespaces from the test's side: run code inside one (setns on a
//! thread of its own, so /sys/fs/bpf stays visible), real TCP connections
//! between namespaces, an "external" host on the fabric, and cleanup of
//! everything a test's agents made under one prefix.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

/// Whether network namespace `name` exists.
pub fn exists(name: &str) -> bool {
    std::path::Path::new("/var/run/netns").join(name).exists()
}

/// Runs `f` on a new thread inside network namespace `name`.
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    let file = std::fs::File::open(format!("/var/run/netns/{name}")).with_context(|| format!("netns {name}"))?;
    std::thread::spawn(move || {
        // SAFETY: setns(2) on this thread only.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(anyhow::anyhow!("setns: {}", std::io::Error::last_os_error()));
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
}

/// Whether a TCP connection from namespace `from` to `ip:port` completes
/// within `timeout` (a dropped SYN times out).
pub fn can_connect(from: &str, ip: impl Into<IpAddr>, port: u16, timeout: Duration) -> anyhow::Result<bool> {
    let ip = ip.into();
    in_netns(from, move || TcpStream::connect_timeout(&SocketAddr::from((ip, port)), timeout).is_ok())
}

/// A TCP server accepting (and closing) connections on `port` in `ns`
/// until dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

pub fn serve(ns: &str, port: u16) -> anyhow::Result<Server> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let listener = in_netns(ns, move || -> anyhow::Result<TcpListener> {
        // Both families where the namespace has IPv6 (a dual-stack pod),
        // IPv4 alone otherwise.
        let l = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).or_else(|_| TcpListener::bind(("0.0.0.0", port)))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })??;
    std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((s, _)) => drop(s),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    Ok(Server { stop })
}

/// A UDP echo server on `port` in `ns` until dropped.
pub fn serve_udp(ns: &str, port: u16) -> anyhow::Result<Server> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let sock = in_netns(ns, move || -> anyhow::Result<UdpSocket> {
        let s = UdpSocket::bind(("0.0.0.0", port))?;
        s.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(s)
    })??;
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while !flag.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    });
    Ok(Server { stop })
}

/// Whether a UDP datagram from namespace `from` to `ip:port` is echoed back
/// within `timeout`.
pub fn udp_roundtrip(from: &str, ip: Ipv4Addr, port: u16, timeout: Duration) -> anyhow::Result<bool> {
    in_netns(from, move || -> anyhow::Result<bool> {
        let s = UdpSocket::bind(("0.0.0.0", 0))?;
        s.set_read_timeout(Some(timeout))?;
        s.send_to(b"ping", (ip, port))?;
        let mut buf = [0u8; 16];
        Ok(matches!(s.recv_from(&mut buf), Ok((4, _))))
    })?
}

/// Whether a UDP datagram from `from` to `ip:port` (nothing listening)
/// comes back refused: the ICMP port unreachable reached the sender's
/// connected socket within `timeout`.
pub fn udp_refused(from: &str, ip: Ipv4Addr, port: u16, timeout: Duration) -> anyhow::Result<bool> {
    in_netns(from, move || -> anyhow::Result<bool> {
        let s = UdpSocket::bind(("0.0.0.0", 0))?;
        s.connect((ip, port))?;
        s.set_read_timeout(Some(timeout))?;
        s.send(b"anyone?")?;
        let mut buf = [0u8; 16];
        Ok(matches!(s.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused))
    })?
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether an ICMP echo request from namespace `from` to `ip` (identifier
/// `id`) gets its echo reply within `timeout` (a raw socket: no `ping`
/// binary needed).
pub fn ping(from: &str, ip: Ipv4Addr, id: u16, timeout: Duration) -> anyhow::Result<bool> {
    in_netns(from, move || -> anyhow::Result<bool> {
        // SAFETY: plain socket calls on a descriptor this closure owns.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        if fd < 0 {
            bail!("raw socket: {}", std::io::Error::last_os_error());
        }
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut pkt = [0u8; 16];
        pkt[0] = 8;
        pkt[4..6].copy_from_slice(&id.to_be_bytes());
        pkt[6..8].copy_from_slice(&1u16.to_be_bytes());
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip.octets()) },
            sin_zero: [0; 8],
        };
        let sent = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if sent < 0 {
            bail!("sendto: {}", std::io::Error::last_os_error());
        }
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = [0u8; 1500];
        while std::time::Instant::now() < deadline {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) } <= 0 {
                break;
            }
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 28 {
                continue;
            }
            // An IPv4 header, then ICMP: type 0 (echo reply) with our id from ip.
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            let icmp = &buf[ihl..n as usize];
            let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
            if src == ip && icmp.len() >= 8 && icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() {
                return Ok(true);
            }
        }
        Ok(false)
    })?
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A host outside the cluster: namespace `<prefix>-<name>` on the fabric
/// bridge with `addr` (CIDR notation), routing `routes` (prefix, via).
pub fn external_host(prefix: &str, name: &str, addr: &str, routes: &[(String, Ipv4Addr)]) -> anyhow::Result<String> {
    let ns = format!("{prefix}-{name}");
    let fabric = format!("{prefix}-fabric");
    ip(&["netns", "add", &ns])?;
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    let fab_side = format!("x{}", &name[..name.len().min(12)]);
    ip(&["-n", &fabric, "link", "add", &fab_side, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
    ip(&["-n", &fabric, "link", "set", &fab_side, "master", "br0", "up"])?;
    ip(&["-n", &ns, "addr", "add", addr, "dev", "eth0"])?;
    ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
    for (dst, via) in routes {
        ip(&["-n", &ns, "route", "replace", dst, "via", &via.to_string()])?;
    }
    Ok(ns)
}

/// Deletes every namespace named `<prefix>-*` and the bpffs directory
/// `/sys/fs/bpf/<prefix>` (unpinning maps and links).
pub struct Cleanup(pub String);

impl Cleanup {
    /// Removes `<prefix>-*` namespaces and `/sys/fs/bpf/<prefix>` when
    /// dropped, or on SIGINT/SIGTERM (see `shutdown`).
    pub fn new(prefix: String) -> Cleanup {
        crate::shutdown::register_prefix(&prefix);
        Cleanup(prefix)
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_prefix(&self.0);
        crate::shutdown::unregister_prefix(&self.0);
    }
}

/// Deletes every namespace named `<prefix>-*` and `/sys/fs/bpf/<prefix>`.
pub fn remove_prefix(prefix: &str) {
    if let Ok(entries) = std::fs::read_dir("/var/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{prefix}-")) {
                let _ = Command::new("ip").args(["netns", "del", &name]).output();
            }
        }
    }
    let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/{prefix}"));
}
