//! Network namespaces from the test's side: run code inside one (setns on a
//! thread of its own, so /sys/fs/bpf stays visible), real TCP connections
//! between namespaces, an "external" host on the fabric, and cleanup of
//! everything a test's agents made under one prefix.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
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
pub fn can_connect(from: &str, ip: Ipv4Addr, port: u16, timeout: Duration) -> anyhow::Result<bool> {
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
        let l = TcpListener::bind(("0.0.0.0", port))?;
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

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir("/var/run/netns") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("{}-", self.0)) {
                    let _ = Command::new("ip").args(["netns", "del", &name]).output();
                }
            }
        }
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/{}", self.0));
    }
}
