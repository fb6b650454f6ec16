//! The simulated topology, made with iproute2 only inside namespaces we
//! create: one fabric namespace with a bridge, one namespace per node (its
//! `eth0` on the fabric, routes to the other nodes' pod CIDRs), one per pod
//! (`eth0` with the pod IP/32 and a default route via 169.254.1.1, which the
//! node answers on the pod's veth). No address is ever put in the root
//! namespace.
//!
//! Dual stack (an IPv6 pod CIDR on the CiliumNode): the node's `eth0` also
//! gets an IPv6 fabric address ([`node_ipv6`]), a pod also its /128, with
//! a default route via `fe80::1`, which the node answers on the pod's veth.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

/// The link-local gateway every pod routes through.
pub const GATEWAY: &str = "169.254.1.1";
/// The IPv6 link-local gateway of dual-stack pods.
pub const GATEWAY6: &str = "fe80::1";

/// A node's IPv6 fabric address: `fd00:fab::` plus its IPv4 address, so
/// every node derives it alone and the fabric's /64 is on-link for all.
pub fn node_ipv6(v4: Ipv4Addr) -> Ipv6Addr {
    let [a, b, c, d] = v4.octets();
    Ipv6Addr::new(0xfd00, 0x0fab, 0, 0, 0, 0, u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]))
}

/// The file of a named namespace; the empty name is the agent's own
/// namespace (a real node's, `--node-netns=host`).
pub fn path(name: &str) -> PathBuf {
    if name.is_empty() {
        return PathBuf::from("/proc/self/ns/net");
    }
    PathBuf::from("/var/run/netns").join(name)
}

pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Runs `ip ARGS`; "File exists" is success when `idempotent`. A leading
/// `-n ""` (the agent's own namespace) is dropped.
fn ip(args: &[&str], idempotent: bool) -> anyhow::Result<String> {
    let args = match args {
        ["-n", "", rest @ ..] => rest,
        _ => args,
    };
    run_ip(Command::new("ip").args(args), &format!("ip {}", args.join(" ")), idempotent)
}

/// Runs `ip ARGS` inside the network namespace at `path`: a container
/// runtime's sandbox, which need not be under /var/run/netns.
fn ip_at(path: &str, args: &[&str], idempotent: bool) -> anyhow::Result<String> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={path}")).arg("ip").args(args);
    run_ip(&mut cmd, &format!("(in {path}) ip {}", args.join(" ")), idempotent)
}

fn run_ip(cmd: &mut Command, what: &str, idempotent: bool) -> anyhow::Result<String> {
    let out = cmd.output().context("running ip (iproute2)")?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || (idempotent && (err.contains("File exists") || err.contains("already assigned"))) {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    bail!("{what}: {}", err.trim())
}

fn sysctl(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let file = format!("/proc/sys/{}", key.replace('.', "/"));
    if ns.is_empty() {
        // In a pod /proc/sys is read-only; the chart mounts the node's
        // /proc/sys/net at /host/proc/sys/net (upstream's volume), which
        // shows the settings of the agent's own (the node's) namespace.
        let host = format!("/host{file}");
        let file = if std::path::Path::new("/host/proc/sys/net").exists() { host } else { file };
        return std::fs::write(&file, value).with_context(|| format!("sysctl {key}={value} ({file})"));
    }
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", &format!("echo {value} > {file}")])
        .output()
        .context("running ip netns exec")?;
    if !out.status.success() {
        bail!("sysctl {key}={value} in {ns}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Whether `path` is a namespace (an nsfs file), not just the file a
/// namespace would be mounted on.
fn is_namespace(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const NSFS_MAGIC: libc::__fsword_t = 0x6e73_6673;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: statfs(2) with a NUL-terminated path and a zeroed buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == NSFS_MAGIC }
}

pub fn add(name: &str) -> anyhow::Result<()> {
    let file = path(name);
    if file.exists() && !is_namespace(&file) {
        // Either another agent of this host is making it (the shared
        // fabric: for a moment the file exists before it is a namespace),
        // or it is the mount point of a namespace that ended with its
        // maker: an agent container restarted (its mounts were its own)
        // leaves an empty file nobody can open. Wait briefly, then take the
        // name over.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while !is_namespace(&file) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        if !is_namespace(&file) {
            tracing::info!(netns = %name, "replacing a stale network namespace file");
            std::fs::remove_file(&file).with_context(|| format!("removing stale {}", file.display()))?;
        }
    }
    if !exists(name) {
        ip(&["netns", "add", name], true)?;
    }
    // Another agent of this host may be making the same namespace (the
    // shared fabric): its file exists before it is a namespace, and entering
    // it fails with EINVAL for that moment. Wait for it, briefly.
    let mut tries = 0;
    loop {
        match ip(&["-n", name, "link", "set", "lo", "up"], false) {
            Ok(_) => return Ok(()),
            Err(e) if tries < 40 && e.to_string().contains("Invalid argument") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

pub fn delete(name: &str) -> anyhow::Result<()> {
    if exists(name) {
        ip(&["netns", "del", name], false)?;
    }
    Ok(())
}

/// Short, stable interface names (at most 15 bytes).
pub fn ifname(prefix: &str, seed: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in seed.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{prefix}{:08x}", h as u32)
}

/// The fabric namespace and its bridge.
pub fn ensure_fabric(fabric: &str) -> anyhow::Result<()> {
    add(fabric)?;
    ip(&["-n", fabric, "link", "add", "br0", "type", "bridge"], true)?;
    ip(&["-n", fabric, "link", "set", "br0", "up"], false)?;
    Ok(())
}

/// The node namespace, wired to the fabric with `node_ip` (CIDR notation).
/// On a real node (`node_ns` empty) the interfaces and addresses are the
/// node's own: only forwarding is turned on.
pub fn ensure_node(node_ns: &str, fabric: &str, node_ip: &str) -> anyhow::Result<()> {
    if node_ns.is_empty() {
        return sysctl(node_ns, "net.ipv4.ip_forward", "1");
    }
    ensure_fabric(fabric)?;
    add(node_ns)?;
    let has_eth0 = ip(&["-n", node_ns, "link", "show", "dev", "eth0"], false).is_ok();
    if !has_eth0 {
        let fab_side = ifname("n", node_ns);
        ip(&["-n", fabric, "link", "add", &fab_side, "type", "veth", "peer", "name", "eth0", "netns", node_ns], false)?;
        ip(&["-n", fabric, "link", "set", &fab_side, "master", "br0", "up"], false)?;
    }
    ip(&["-n", node_ns, "addr", "add", node_ip, "dev", "eth0"], true)?;
    ip(&["-n", node_ns, "link", "set", "eth0", "up"], false)?;
    sysctl(node_ns, "net.ipv4.ip_forward", "1")?;
    Ok(())
}

/// Dual stack on a node: its IPv6 fabric address and IPv6 forwarding.
pub fn ensure_node_ipv6(node_ns: &str, node_ip6: Ipv6Addr) -> anyhow::Result<()> {
    sysctl(node_ns, "net.ipv6.conf.all.forwarding", "1")?;
    if node_ns.is_empty() {
        return Ok(());
    }
    ip(&["-n", node_ns, "-6", "addr", "add", &format!("{node_ip6}/64"), "dev", "eth0", "nodad"], true)?;
    Ok(())
}

/// Routes a remote node's pod CIDR through its node IP (of the CIDR's
/// family).
/// (On a real node the kernel picks the interface that reaches `via`.)
pub fn route_via(node_ns: &str, cidr: &str, via: IpAddr) -> anyhow::Result<()> {
    let via = via.to_string();
    if node_ns.is_empty() {
        ip(&["route", "replace", cidr, "via", &via], false)?;
    } else {
        ip(&["-n", node_ns, "route", "replace", cidr, "via", &via, "dev", "eth0"], false)?;
    }
    Ok(())
}

pub fn delete_route(node_ns: &str, cidr: &str) {
    let _ = ip(&["-n", node_ns, "route", "del", cidr], false);
}

/// A pod namespace behind `lxc` in the node namespace, with `pod_ip`;
/// the node side stays down (see [`plug_pod`]) so that no packet passes
/// before the datapath is attached. Existing pieces (an agent restart) are
/// kept.
pub fn make_pod(
    node_ns: &str,
    pod_ns: &str,
    lxc: &str,
    pod_ip: Ipv4Addr,
    pod_ip6: Option<Ipv6Addr>,
) -> anyhow::Result<()> {
    add(pod_ns)?;
    let host_route = format!("{pod_ip}/32");
    if ip(&["-n", node_ns, "link", "show", "dev", lxc], false).is_err() {
        ip(&["-n", node_ns, "link", "add", lxc, "type", "veth", "peer", "name", "eth0", "netns", pod_ns], false)?;
    }
    ip(&["-n", node_ns, "addr", "add", &format!("{GATEWAY}/32"), "dev", lxc], true)?;
    ip(&["-n", pod_ns, "addr", "add", &host_route, "dev", "eth0"], true)?;
    ip(&["-n", pod_ns, "link", "set", "eth0", "up"], false)?;
    ip(&["-n", pod_ns, "route", "replace", GATEWAY, "dev", "eth0", "scope", "link"], false)?;
    ip(&["-n", pod_ns, "route", "replace", "default", "via", GATEWAY, "dev", "eth0"], false)?;
    if let Some(ip6) = pod_ip6 {
        ip(&["-n", node_ns, "-6", "addr", "add", &format!("{GATEWAY6}/64"), "dev", lxc, "nodad"], true)?;
        ip(&["-n", pod_ns, "-6", "addr", "add", &format!("{ip6}/128"), "dev", "eth0", "nodad"], true)?;
        ip(&["-n", pod_ns, "-6", "route", "replace", "default", "via", GATEWAY6, "dev", "eth0"], false)?;
    }
    Ok(())
}

/// A container runtime's sandbox (the network namespace at `sandbox`,
/// made by the runtime) plugged as [`make_pod`] plugs ours: a veth whose
/// peer is moved into the sandbox and named `ifname`, the pod's addresses
/// and routes on it; the node side stays down until [`plug_pod`]. Each step
/// is skipped when done already (an agent restart, a retried ADD).
pub fn make_cni(
    node_ns: &str,
    sandbox: &str,
    lxc: &str,
    ifname: &str,
    pod_ip: Ipv4Addr,
    pod_ip6: Option<Ipv6Addr>,
) -> anyhow::Result<()> {
    if !std::path::Path::new(sandbox).exists() {
        bail!("the sandbox's network namespace {sandbox} does not exist");
    }
    let tmp = self::ifname("tmp", lxc);
    let has = |at: Option<&str>, dev: &str| match at {
        None => ip(&["-n", node_ns, "link", "show", "dev", dev], false).is_ok(),
        Some(path) => ip_at(path, &["link", "show", "dev", dev], false).is_ok(),
    };
    if !has(None, lxc) {
        ip(&["-n", node_ns, "link", "add", lxc, "type", "veth", "peer", "name", &tmp], false)?;
    }
    if has(None, &tmp) {
        ip(&["-n", node_ns, "link", "set", &tmp, "netns", sandbox], false)?;
    }
    if !has(Some(sandbox), ifname) {
        ip_at(sandbox, &["link", "set", &tmp, "name", ifname], false)?;
    }
    ip(&["-n", node_ns, "addr", "add", &format!("{GATEWAY}/32"), "dev", lxc], true)?;
    ip_at(sandbox, &["addr", "add", &format!("{pod_ip}/32"), "dev", ifname], true)?;
    ip_at(sandbox, &["link", "set", "lo", "up"], false)?;
    ip_at(sandbox, &["link", "set", ifname, "up"], false)?;
    ip_at(sandbox, &["route", "replace", GATEWAY, "dev", ifname, "scope", "link"], false)?;
    ip_at(sandbox, &["route", "replace", "default", "via", GATEWAY, "dev", ifname], false)?;
    if let Some(ip6) = pod_ip6 {
        ip(&["-n", node_ns, "-6", "addr", "add", &format!("{GATEWAY6}/64"), "dev", lxc, "nodad"], true)?;
        ip_at(sandbox, &["-6", "addr", "add", &format!("{ip6}/128"), "dev", ifname, "nodad"], true)?;
        ip_at(sandbox, &["-6", "route", "replace", "default", "via", GATEWAY6, "dev", ifname], false)?;
    }
    Ok(())
}

/// The MAC address of `dev` in the namespace at `sandbox`.
pub fn mac_at(sandbox: &str, dev: &str) -> anyhow::Result<String> {
    let out = ip_at(sandbox, &["-j", "link", "show", "dev", dev], false)?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing ip -j output")?;
    v.get(0).and_then(|l| l["address"].as_str()).map(str::to_string).context("no address in ip -j output")
}

/// Whether `dev` in the namespace at `sandbox` holds `addr`.
pub fn has_address_at(sandbox: &str, dev: &str, addr: Ipv4Addr) -> bool {
    ip_at(sandbox, &["-j", "addr", "show", "dev", dev], false)
        .ok()
        .and_then(|out| serde_json::from_str::<serde_json::Value>(&out).ok())
        .is_some_and(|v| {
            v.get(0)
                .and_then(|l| l["addr_info"].as_array())
                .into_iter()
                .flatten()
                .any(|a| a["local"].as_str() == Some(&addr.to_string()))
        })
}

/// Removes a pod's veth (both ends) from the node, if it is there.
pub fn delete_link(node_ns: &str, lxc: &str) -> anyhow::Result<()> {
    if ip(&["-n", node_ns, "link", "show", "dev", lxc], false).is_ok() {
        ip(&["-n", node_ns, "link", "del", lxc], false)?;
    }
    Ok(())
}

/// Brings the node side of a pod up and routes its address to it.
pub fn plug_pod(node_ns: &str, lxc: &str, pod_ip: Ipv4Addr, pod_ip6: Option<Ipv6Addr>) -> anyhow::Result<()> {
    ip(&["-n", node_ns, "link", "set", lxc, "up"], false)?;
    ip(&["-n", node_ns, "route", "replace", &format!("{pod_ip}/32"), "dev", lxc], false)?;
    if let Some(ip6) = pod_ip6 {
        ip(&["-n", node_ns, "-6", "route", "replace", &format!("{ip6}/128"), "dev", lxc], false)?;
    }
    Ok(())
}

/// The ifindex of `dev` in namespace `ns`.
pub fn ifindex(ns: &str, dev: &str) -> anyhow::Result<u32> {
    let out = ip(&["-n", ns, "-j", "link", "show", "dev", dev], false)?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing ip -j output")?;
    v.get(0).and_then(|l| l["ifindex"].as_u64()).map(|i| i as u32).context("no ifindex in ip -j output")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_is_told_from_the_file_it_would_be_mounted_on() {
        assert!(is_namespace(std::path::Path::new("/proc/self/ns/net")));
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("cilium-health");
        std::fs::write(&stale, b"").unwrap();
        assert!(!is_namespace(&stale), "an empty mount point is not a namespace");
        assert!(!is_namespace(&dir.path().join("missing")));
    }
}
