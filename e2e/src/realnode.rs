//! Real nodes on one machine: per node a containerd (Debian's, with runc)
//! and a kubelet, both in the node's network namespace on the fabric
//! bridge, with their own state directories, cgroup root, CNI directories
//! (our `cilium-cni` and the reference `loopback`) and images imported from
//! OCI archives written without an engine (`scripts/oci-image.py`). The host
//! has one leg on the fabric (`.1` of the control plane's [`NodesSubnet`],
//! one per process), where the API server listens for the kubelets
//! (`Options::real_nodes`).
//!
//! Each node has its own mount view, as kind's node containers do: a
//! process holding a private mount namespace where the node's own
//! directories are bound over `/etc/cni/net.d`, `/opt/cni/bin`,
//! `/var/run/cilium` and `/var/run/netns` (so the chart's hostPath volumes
//! are per node), `/var/lib/kubelet` and the pods' log directories, made
//! shared for the pods' mount propagation. containerd, the kubelet and
//! everything they start live in it; it goes away with them, and with it
//! the sandboxes' and the agent's namespace mounts: what is left is in the
//! node's directory, whichever process made it. One cluster of real nodes
//! runs at a time per process ([`exclusive`]: each is heavy); processes
//! (the demo, the tests) each have their own fabric subnet.
//!
//! What this machine needs, found by trying: cgroup v1 (`failCgroupV1:
//! false`), the cgroup root made in every v1 hierarchy; no
//! CAP_SYS_RESOURCE, so containerd must not lower `oom_score_adj`
//! (`restrict_oom_score_adj`).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::cluster::{ControlPlane, NodesSubnet};
use crate::process::Process;
use crate::tools;

/// The images every node has (imported, never pulled).
pub const PAUSE_IMAGE: &str = "localhost/cilium-rs/pause:1";
pub const BUSYBOX_IMAGE: &str = "localhost/cilium-rs/busybox:1";

static EXCLUSIVE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Held by a test for as long as its real nodes run.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Directories of the node's own, bound over these paths in its mount
/// namespace.
/// (A kubelet removes the log directories of pods it does not run, and
/// keeps its device-plugin socket in /var/lib/kubelet whatever its root
/// directory: each needs its own.)
const NODE_PATHS: &[(&str, &str)] = &[
    ("cni/net.d", "/etc/cni/net.d"),
    ("cni/bin", "/opt/cni/bin"),
    ("run-cilium", "/var/run/cilium"),
    ("netns", "/var/run/netns"),
    ("log/pods", "/var/log/pods"),
    ("log/containers", "/var/log/containers"),
    ("var-lib-kubelet", "/var/lib/kubelet"),
];

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(args))
}

/// The fabric namespace `<prefix>-fabric` with its bridge (as the agents
/// make it) and the host's leg on it: a veth whose root end holds the
/// gateway of `cp`'s [`NodesSubnet`]. Removing the fabric namespace
/// removes the leg.
pub fn fabric_with_host_leg(cp: &ControlPlane, prefix: &str) -> anyhow::Result<()> {
    let subnet: &NodesSubnet = cp.nodes_subnet();
    let fabric = format!("{prefix}-fabric");
    if !Path::new("/var/run/netns").join(&fabric).exists() {
        ip(&["netns", "add", &fabric])?;
    }
    ip(&["-n", &fabric, "link", "set", "lo", "up"])?;
    if ip(&["-n", &fabric, "link", "show", "br0"]).is_err() {
        ip(&["-n", &fabric, "link", "add", "br0", "type", "bridge"])?;
    }
    ip(&["-n", &fabric, "link", "set", "br0", "up"])?;
    let host = format!("{}h", &prefix[..prefix.len().min(13)]);
    if ip(&["link", "show", &host]).is_err() {
        ip(&["link", "add", &host, "type", "veth", "peer", "name", "hostleg", "netns", &fabric])?;
    }
    ip(&["-n", &fabric, "link", "set", "hostleg", "master", "br0", "up"])?;
    let _ = ip(&["addr", "add", &format!("{}/24", subnet.gateway()), "dev", &host]);
    ip(&["link", "set", &host, "up"])?;
    Ok(())
}

/// The pause and busybox images as OCI archives in `dir`.
pub fn build_images(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let script = tools::workspace_root().join("scripts/oci-image.py");
    let busybox = "/bin/busybox";
    ensure!(Path::new(busybox).exists(), "{busybox} missing: apt-get install busybox-static (scripts/setup.sh)");
    let mut out = Vec::new();
    for (name, entry) in [
        // The sandbox's process: waits, reaps, ends on TERM.
        (
            PAUSE_IMAGE,
            vec![
                "--entrypoint=/bin/sh",
                "--cmd=-c",
                "--cmd=trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done",
            ],
        ),
        (BUSYBOX_IMAGE, vec!["--cmd=/bin/sh"]),
    ] {
        let tar = dir.join(format!("{}.tar", name.rsplit('/').next().unwrap_or(name).replace(':', "-")));
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .arg(format!("--name={name}"))
            .arg(format!("--out={}", tar.display()))
            .arg(format!("--file={busybox}:/bin/busybox"))
            .arg(format!("--busybox-links={busybox}"))
            .args(["--dir=/tmp", "--dir=/proc", "--dir=/sys", "--dir=/dev", "--dir=/etc", "--dir=/var/www"])
            .args(entry);
        run(&mut cmd)?;
        out.push(tar);
    }
    Ok(out)
}

/// The chart's default image (`image.repository` and the chart's
/// appVersion): this workspace's binaries, stripped, with the libraries
/// they link, `ip`, `nsenter` and busybox (the init containers' shell).
pub fn build_cilium_image(dir: &Path) -> anyhow::Result<(String, PathBuf)> {
    let chart = std::fs::read_to_string(tools::workspace_root().join("charts/cilium/Chart.yaml"))?;
    let version = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .context("no appVersion in Chart.yaml")?;
    let name = format!("localhost/cilium-rs:{version}");
    let tar = dir.join("cilium-rs.tar");
    let mut cmd = Command::new("python3");
    cmd.arg(tools::workspace_root().join("scripts/oci-image.py"))
        .arg(format!("--name={name}"))
        .arg(format!("--out={}", tar.display()))
        .args(["--strip", "--with-libs"]);
    for bin in ["cilium-operator", "cilium-node-agent", "cilium-cni", "ciliumctl"] {
        cmd.arg(format!("--file={}:/usr/bin/{bin}", tools::workspace_bin(bin)?.display()));
    }
    for tool in ["/usr/bin/ip", "/usr/bin/nsenter"] {
        cmd.arg(format!("--file={tool}:{tool}"));
    }
    cmd.args(["--file=/bin/busybox:/bin/busybox", "--busybox-links=/bin/busybox"])
        .args(["--dir=/tmp", "--dir=/proc", "--dir=/sys", "--dir=/dev", "--dir=/etc", "--dir=/run"])
        // iproute2 keeps named namespaces in /run/netns; the chart mounts
        // the node's at /var/run/netns.
        .arg("--link=/var/run:../run");
    run(&mut cmd)?;
    Ok((name, tar))
}

/// How a node's kubelet registers.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    /// Register with `node.cilium.io/agent-not-ready:NoExecute`, as
    /// upstream's install guides tell: no pod but the agent's (which
    /// tolerates it) runs until the operator sees the agent Ready.
    pub agent_not_ready_taint: bool,
}

/// A node: its containerd and kubelet, in its network namespace.
pub struct RealNode {
    pub name: String,
    pub netns: String,
    pub dir: PathBuf,
    /// Where the runtime looks for plugins and network configurations (the
    /// agent writes its conflist into `cni_conf`).
    pub cni_bin: PathBuf,
    pub cni_conf: PathBuf,
    cgroup_root: String,
    socket: PathBuf,
    /// The process holding the node's mount namespace.
    mounts: Option<Process>,
    remains: std::sync::Arc<Remains>,
    /// The shutdown hook cleaning `remains` on a signal.
    hook: u64,
    containerd: Option<Process>,
    pub kubelet: Option<Process>,
}

impl RealNode {
    /// Starts containerd (and imports `images`) and the kubelet of `name`
    /// in namespace `netns`, which is on the fabric at `node_ip`.
    pub fn start(
        cp: &ControlPlane,
        prefix: &str,
        name: &str,
        netns: &str,
        node_ip: Ipv4Addr,
        images: &[PathBuf],
        opts: &NodeOptions,
    ) -> anyhow::Result<RealNode> {
        let dir = cp.dir().join(format!("node-{name}"));
        let cni_bin = dir.join("cni/bin");
        let cni_conf = dir.join("cni/net.d");
        for d in [&cni_bin, &cni_conf] {
            std::fs::create_dir_all(d)?;
        }
        std::fs::copy(tools::workspace_bin("cilium-cni")?, cni_bin.join("cilium-cni"))?;
        let loopback = Path::new("/usr/lib/cni/loopback");
        ensure!(loopback.exists(), "{} missing: apt-get install containernetworking-plugins", loopback.display());
        std::fs::copy(loopback, cni_bin.join("loopback"))?;
        let remains = std::sync::Arc::new(Remains {
            dir: dir.clone(),
            cgroup_root: format!("cilium-rs-{prefix}-{name}"),
            socket: dir.join("containerd/containerd.sock"),
        });
        let hook = {
            let remains = remains.clone();
            crate::shutdown::register_hook(std::sync::Arc::new(move || remains.clean()))
        };
        let mut node = RealNode {
            name: name.to_string(),
            netns: netns.to_string(),
            cgroup_root: remains.cgroup_root.clone(),
            socket: remains.socket.clone(),
            dir,
            cni_bin,
            cni_conf,
            mounts: None,
            remains,
            hook,
            containerd: None,
            kubelet: None,
        };
        node.make_mount_namespace()?;
        node.make_cgroup_root()?;
        node.start_containerd()?;
        for image in images {
            run(node.ctr().args(["images", "import"]).arg(image))?;
        }
        node.start_kubelet(cp, node_ip, opts)?;
        Ok(node)
    }

    fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg(format!("--address={}", self.socket.display())).args(["--namespace", "k8s.io"]);
        cmd
    }

    /// `nsenter` arguments entering the node's network and mount
    /// namespaces.
    pub fn nsenter_args(&self) -> Vec<String> {
        let mut args = vec![format!("--net=/var/run/netns/{}", self.netns)];
        if let Some(m) = &self.mounts {
            args.push(format!("--mount=/proc/{}/ns/mnt", m.pid()));
        }
        args
    }

    /// `program` in the node's network and mount namespaces.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(self.nsenter_args()).arg("--").arg(program);
        cmd
    }

    /// The node's mount namespace: its directories bound over the paths of
    /// [`NODE_PATHS`] (made on the host when missing, empty), then every
    /// mount shared within the namespace.
    fn make_mount_namespace(&mut self) -> anyhow::Result<()> {
        let mut script = String::from("set -e\n");
        for (own, at) in NODE_PATHS {
            let own = self.dir.join(own);
            std::fs::create_dir_all(&own)?;
            std::fs::create_dir_all(at).with_context(|| format!("creating {at}"))?;
            script += &format!("mount --bind '{}' '{at}'\n", own.display());
        }
        let ready = self.dir.join("mounts-ready");
        script += &format!("mount --make-rshared /\ntouch '{}'\nexec sleep 2147483647\n", ready.display());
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c", &script]);
        let mut proc = Process::spawn(&format!("mounts-{}", self.name), &self.dir, &mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            if let Some(s) = proc.try_exit() {
                bail!("the mount namespace of {} failed ({s}):\n{}", self.name, proc.log_text());
            }
            ensure!(Instant::now() < deadline, "the mount namespace of {} not ready after 10 s", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
        self.mounts = Some(proc);
        Ok(())
    }

    /// The cgroup v1 hierarchies (`unified`, the v2 one, is left out).
    fn hierarchies() -> Vec<PathBuf> {
        RealNode::all_hierarchies().into_iter().filter(|p| p.file_name().is_some_and(|n| n != "unified")).collect()
    }

    /// Every hierarchy, v2 included (runc also makes the containers'
    /// cgroups there).
    fn all_hierarchies() -> Vec<PathBuf> {
        std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect()
    }

    /// The kubelet's cgroup root, in every cgroup v1 hierarchy (it refuses
    /// to start when one lacks it), cpuset filled from the parent.
    fn make_cgroup_root(&self) -> anyhow::Result<()> {
        for h in RealNode::hierarchies() {
            let d = h.join(&self.cgroup_root);
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            if h.ends_with("cpuset") {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = std::fs::read_to_string(h.join(f))?;
                    std::fs::write(d.join(f), v.trim())?;
                }
            }
        }
        Ok(())
    }

    fn start_containerd(&mut self) -> anyhow::Result<()> {
        let d = self.dir.join("containerd");
        std::fs::create_dir_all(&d)?;
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            socket = self.socket.display(),
            opt = d.join("opt").display(),
        );
        let file = d.join("config.toml");
        std::fs::write(&file, config)?;
        let mut cmd = self.command("containerd");
        cmd.arg(format!("--config={}", file.display()));
        let mut proc = Process::spawn(&format!("containerd-{}", self.name), &self.dir, &mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket.exists() || self.ctr().arg("version").output().map(|o| !o.status.success()).unwrap_or(true) {
            if let Some(s) = proc.try_exit() {
                bail!("containerd of {} exited ({s}):\n{}", self.name, proc.log_text());
            }
            ensure!(
                Instant::now() < deadline,
                "containerd of {} not serving after 30 s:\n{}",
                self.name,
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.containerd = Some(proc);
        Ok(())
    }

    fn start_kubelet(&mut self, cp: &ControlPlane, node_ip: Ipv4Addr, opts: &NodeOptions) -> anyhow::Result<()> {
        let d = self.dir.join("kubelet");
        std::fs::create_dir_all(&d)?;
        let config = format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup_root}
containerRuntimeEndpoint: unix://{socket}
failSwapOn: false
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
localStorageCapacityIsolation: false
resolvConf: ""
serializeImagePulls: false
maxPods: 110
{taints}"#,
            cgroup_root = self.cgroup_root,
            socket = self.socket.display(),
            taints = if opts.agent_not_ready_taint {
                "registerWithTaints:\n- key: node.cilium.io/agent-not-ready\n  value: \"true\"\n  effect: NoExecute\n"
            } else {
                ""
            },
        );
        let file = d.join("config.yaml");
        std::fs::write(&file, config)?;
        let mut cmd = self.command(tools::tool("kubelet")?.to_str().context("kubelet path")?);
        cmd.arg(format!("--config={}", file.display()))
            .arg(format!("--kubeconfig={}", cp.kubeconfig_for_nodes()?.display()))
            .arg(format!("--hostname-override={}", self.name))
            .arg(format!("--node-ip={node_ip}"))
            .arg(format!("--root-dir={}", d.join("root").display()))
            .arg(format!("--cert-dir={}", d.join("pki").display()))
            .arg("--v=0");
        self.kubelet = Some(Process::spawn(&format!("kubelet-{}", self.name), &self.dir, &mut cmd)?);
        Ok(())
    }

    /// The last `n` lines of the kubelet's and containerd's logs.
    pub fn log_tails(&self, n: usize) -> String {
        [&self.kubelet, &self.containerd]
            .into_iter()
            .flatten()
            .map(|p| {
                let text = p.log_text();
                let lines: Vec<&str> = text.lines().collect();
                format!("--- {}:\n{}\n", p.name, lines[lines.len().saturating_sub(n)..].join("\n"))
            })
            .collect()
    }
}

/// What a node leaves behind its processes (the pods' containers and
/// containerd's shims, cgroups, mounts, sandbox files): removed when the
/// node is dropped, or by the shutdown hook on SIGINT/SIGTERM.
struct Remains {
    dir: PathBuf,
    cgroup_root: String,
    socket: PathBuf,
}

impl Remains {
    /// Everything, once the node's own processes are stopped.
    fn clean(&self) {
        self.kill_cgroup_processes();
        self.kill_shims();
        self.unmount_all();
        self.remove_cgroups();
    }

    /// Every process in the node's cgroups (the pods' containers).
    fn kill_cgroup_processes(&self) {
        for h in RealNode::all_hierarchies() {
            let root = h.join(&self.cgroup_root);
            for procs in walk(&root).into_iter().map(|d| d.join("cgroup.procs")) {
                for pid in std::fs::read_to_string(procs).unwrap_or_default().lines() {
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        // SAFETY: kill(2) on a process of this node's pods.
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                        }
                    }
                }
            }
        }
    }

    /// containerd's shims for this node (they outlive containerd).
    fn kill_shims(&self) {
        let sock = self.socket.display().to_string();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("containerd-shim") && cmdline.contains(&sock) {
                // SAFETY: kill(2) on a shim of this node's containerd.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }

    fn unmount_all(&self) {
        let under = self.dir.display().to_string();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&under))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            if let Ok(c) = std::ffi::CString::new(m) {
                // SAFETY: umount2(2) of a mount under this node's directory.
                unsafe {
                    libc::umount2(c.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
    }

    fn remove_cgroups(&self) {
        for _ in 0..20 {
            let mut left = 0;
            for h in RealNode::all_hierarchies() {
                let mut dirs = walk(&h.join(&self.cgroup_root));
                dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
                for d in dirs {
                    if std::fs::remove_dir(&d).is_err() && d.exists() {
                        left += 1;
                    }
                }
            }
            if left == 0 {
                return;
            }
            self.kill_cgroup_processes();
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `root` and every directory below it.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        if !d.is_dir() {
            continue;
        }
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(e.path());
            }
        }
        out.push(d);
    }
    out
}

impl Drop for RealNode {
    /// The kubelet, every pod's process, the shims and containerd go; then
    /// the node's mount namespace (every mount in it ends with its last
    /// process), its cgroups and sandbox files.
    fn drop(&mut self) {
        if let Some(mut k) = self.kubelet.take() {
            k.signal(libc::SIGTERM);
            k.wait_exit(Duration::from_secs(5));
        }
        self.remains.kill_cgroup_processes();
        self.remains.kill_shims();
        if let Some(mut c) = self.containerd.take() {
            c.signal(libc::SIGTERM);
            c.wait_exit(Duration::from_secs(5));
        }
        self.mounts.take();
        self.remains.clean();
        crate::shutdown::unregister_hook(self.hook);
    }
}

/// `helm VERB cilium charts/cilium -n kube-system` with what this machine
/// needs (images imported, not pulled; the API server's address for the
/// host network; no CAP_SYS_RESOURCE to give), pods from the pool
/// 10.220.0.0/16, and `extra` arguments.
pub fn helm(cp: &ControlPlane, verb: &str, extra: &[&str]) -> anyhow::Result<()> {
    let chart = tools::workspace_root().join("charts/cilium");
    let out = Command::new(tools::tool("helm")?)
        .arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
        .args([verb, "cilium"])
        .arg(&chart)
        .args(["-n", "kube-system", "--wait=false"])
        .args(["--set", "image.pullPolicy=Never", "--set", "operator.image.pullPolicy=Never"])
        .args(["--set", &format!("k8sServiceHost={}", cp.nodes_subnet().gateway())])
        .args(["--set", &format!("k8sServicePort={}", cp.port())])
        .args(["--set", &format!("ipam.operator.clusterPoolIPv4PodCIDRList={{{HELM_POOL}}}")])
        // This machine's root lacks CAP_SYS_RESOURCE: no container gets it.
        .args(["--set", "securityContext.capabilities.ciliumAgent={BPF,NET_ADMIN,SYS_ADMIN,PERFMON}"])
        .args(extra)
        .stdin(Stdio::null())
        .output()?;
    ensure!(out.status.success(), "helm {verb}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// The pod CIDR pool [`helm`] installs with.
pub const HELM_POOL: &str = "10.220.0.0/16";

/// Waits until the chart's agent DaemonSet is Ready on `nodes` nodes and
/// its two operator replicas are available.
pub fn wait_cilium_ready(cp: &ControlPlane, nodes: i32, timeout: Duration) -> anyhow::Result<()> {
    use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
    use kube::api::Api;
    crate::block_on(async {
        let client = cp.client().await?;
        let ds: Api<DaemonSet> = Api::namespaced(client.clone(), "kube-system");
        let deploys: Api<Deployment> = Api::namespaced(client, "kube-system");
        crate::eventually("agent DaemonSet Ready on every node", timeout, || async {
            let st = ds.get("cilium").await?.status.context("no DaemonSet status")?;
            anyhow::ensure!(
                st.number_ready == nodes,
                "{} of {} agents ready",
                st.number_ready,
                st.desired_number_scheduled
            );
            Ok(Some(()))
        })
        .await?;
        crate::eventually("operator Deployment available", timeout, || async {
            let st = deploys.get("cilium-operator").await?.status.context("no Deployment status")?;
            let ready = st.ready_replicas.unwrap_or(0);
            anyhow::ensure!(ready == 2, "{ready} of 2 operators ready");
            Ok(Some(()))
        })
        .await
    })
}

/// The pins the chart's agents make (`/sys/fs/bpf/cilium-rs/<node>`),
/// removed when dropped or on SIGINT/SIGTERM.
pub struct Pins(Vec<PathBuf>);

impl Pins {
    pub fn new(nodes: &[String]) -> Pins {
        let dirs: Vec<PathBuf> = nodes.iter().map(|n| Path::new("/sys/fs/bpf/cilium-rs").join(n)).collect();
        for d in &dirs {
            crate::shutdown::register_dir(d.clone());
        }
        Pins(dirs)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
            crate::shutdown::unregister_dir(d);
        }
    }
}
