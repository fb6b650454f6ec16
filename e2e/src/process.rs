//! Running this workspace's binaries (operator, agents) as real processes.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cluster::{ControlPlane, free_port, http_get_plain};
use crate::tools;

/// Makes the child die with the thread that spawned it (a killed test
/// process leaves nothing behind).
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl only asks the kernel to kill the child with its parent
    // thread.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// A process of ours with its log file; killed (SIGKILL) when dropped.
pub struct Process {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Process {
    /// Spawns `cmd`, stdout+stderr to `<dir>/<name>.log`.
    pub fn spawn(name: &str, dir: &Path, cmd: &mut Command) -> anyhow::Result<Process> {
        Process::spawn_logged(name, dir, cmd, false)
    }

    /// Like [`Process::spawn`]; with `append` the log of an earlier run of
    /// the same name is kept and continued.
    fn spawn_logged(name: &str, dir: &Path, cmd: &mut Command, append: bool) -> anyhow::Result<Process> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new().create(true).write(true).append(append).truncate(!append).open(&log)?;
        cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        die_with_parent(cmd);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        crate::shutdown::register_pid(child.id());
        Ok(Process { name: name.to_string(), child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        crate::shutdown::unregister_pid(self.child.id());
    }
}

/// CPU seconds (user + system) process `pid` has used so far, from
/// `/proc/<pid>/stat`; a benchmark takes the difference over its work.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name (which may hold spaces): state is
    // the 3rd field overall, utime the 14th, stime the 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> { Ok(fields.get(i).context("short /proc stat")?.parse::<f64>()?) };
    // SAFETY: sysconf(3) has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) / hz)
}

/// A `/proc/<pid>/status` field in KiB: `VmRSS` (resident now) or
/// `VmHWM` (the peak).
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// The value of the first line of an exposition `text` that starts with
/// `sample`: a metric name, with its `{labels}` when it has any.
pub fn sample_value(text: &str, sample: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(sample))?.rsplit(' ').next()?.parse().ok()
}

/// A running cilium-operator replica.
pub struct Operator {
    pub proc: Process,
    pub health_addr: String,
    pub metrics_addr: String,
}

impl Operator {
    /// Starts `cilium-operator` against `cp` with loopback health/metrics
    /// ports, the given namespace, and extra `--flag=value` arguments.
    pub fn start(cp: &ControlPlane, name: &str, namespace: &str, extra: &[String]) -> anyhow::Result<Operator> {
        let mut args = vec!["--cluster-pool-ipv4-cidr=10.0.0.0/8".to_string()];
        args.extend_from_slice(extra);
        Operator::start_with(cp, name, namespace, &cp.kubeconfig, &args)
    }

    /// Like [`Operator::start`], authenticated by `kubeconfig` and with no
    /// default pool (e.g. configured by `--config-dir` only).
    pub fn start_with(
        cp: &ControlPlane,
        name: &str,
        namespace: &str,
        kubeconfig: &Path,
        extra: &[String],
    ) -> anyhow::Result<Operator> {
        let mut cmd = Command::new(tools::workspace_bin("cilium-operator")?);
        cmd.args(extra).env("CILIUM_LOG_FILTER", "info");
        Operator::spawn(cp, name, namespace, kubeconfig, cmd)
    }

    /// Upstream Cilium's `cilium-operator-generic` (built by
    /// `scripts/build-upstream.sh`) against `cp`, for side-by-side
    /// benchmarks: the same namespace and loopback health/metrics ports,
    /// plus `extra` upstream flags.
    /// Settings that make upstream's operator run as ours does in the
    /// benchmarks: cluster-pool IPAM, IPv4 only (the binary's default is
    /// dual stack), no client rate limit (ours has none), CRDs not
    /// registered by it (ours are applied first; the same formats).
    pub const UPSTREAM_AS_OURS: &'static [&'static str] = &[
        "--ipam=cluster-pool",
        "--enable-ipv4=true",
        "--enable-ipv6=false",
        "--skip-crd-creation=true",
        "--operator-k8s-client-qps=100000",
        "--operator-k8s-client-burst=200000",
    ];

    pub fn start_upstream(
        cp: &ControlPlane,
        name: &str,
        namespace: &str,
        extra: &[String],
    ) -> anyhow::Result<Operator> {
        let mut cmd = Command::new(tools::tool("cilium-operator-generic")?);
        cmd.arg("--enable-metrics").args(extra);
        Operator::spawn(cp, name, namespace, &cp.kubeconfig, cmd)
    }

    /// Either operator (the same flag names) with loopback health and
    /// metrics ports.
    fn spawn(
        cp: &ControlPlane,
        name: &str,
        namespace: &str,
        kubeconfig: &Path,
        mut cmd: Command,
    ) -> anyhow::Result<Operator> {
        let health_addr = format!("127.0.0.1:{}", free_port());
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        cmd.arg(format!("--k8s-kubeconfig-path={}", kubeconfig.display()))
            .arg(format!("--k8s-namespace={namespace}"))
            .arg(format!("--operator-api-serve-addr={health_addr}"))
            .arg(format!("--operator-prometheus-serve-addr={metrics_addr}"));
        let proc = Process::spawn(name, cp.dir(), &mut cmd)?;
        Ok(Operator { proc, health_addr, metrics_addr })
    }

    /// `/healthz` body, if it answers 200.
    pub fn healthz(&self) -> Option<String> {
        http_get_plain(&self.health_addr, "/healthz").ok()
    }

    pub fn is_leader(&self) -> bool {
        self.healthz().is_some_and(|b| b.contains("leader") && !b.contains("standby"))
    }

    pub fn metrics(&self) -> anyhow::Result<String> {
        http_get_plain(&self.metrics_addr, "/metrics")
    }

    /// The value of one exposed sample (see [`sample_value`]), if served.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        sample_value(&self.metrics().ok()?, sample)
    }

    /// SIGTERM, then waits up to 15 s for the exit.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        self.proc.signal(libc::SIGTERM);
        self.proc
            .wait_exit(Duration::from_secs(15))
            .with_context(|| format!("{} did not stop after SIGTERM", self.proc.name))
    }

    /// Waits until `/healthz` answers 200.
    pub fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.proc.try_exit() {
                anyhow::bail!("{} exited ({s}):\n{}", self.proc.name, self.proc.log_text());
            }
            if self.healthz().is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::bail!("{} not healthy after {timeout:?}:\n{}", self.proc.name, self.proc.log_text())
    }
}

/// A running cilium-node-agent, playing one node of the simulated topology
/// (network namespaces `<prefix>-<node>`, `<prefix>-fabric`, and one per pod).
pub struct Agent {
    pub proc: Process,
    pub node: String,
    pub metrics_addr: String,
    /// The agent's API socket (`ciliumctl monitor --host unix://...`).
    pub socket: PathBuf,
    args: Vec<String>,
    dir: PathBuf,
    /// `nsenter` arguments: the namespaces the process runs in (a real
    /// node's), empty for the test's own.
    enter: Vec<String>,
}

impl Agent {
    /// Starts the agent of `node` at `node_ip` (CIDR notation) with every
    /// namespace, pin and state under `prefix`.
    pub fn start(
        cp: &ControlPlane,
        node: &str,
        node_ip: &str,
        prefix: &str,
        extra: &[String],
    ) -> anyhow::Result<Agent> {
        Agent::start_with(cp, node, node_ip, prefix, &cp.kubeconfig, extra)
    }

    /// Like [`Agent::start`], authenticated by `kubeconfig`. `{node}` in
    /// an `extra` flag is replaced by the node's name.
    pub fn start_with(
        cp: &ControlPlane,
        node: &str,
        node_ip: &str,
        prefix: &str,
        kubeconfig: &Path,
        extra: &[String],
    ) -> anyhow::Result<Agent> {
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let socket = cp.dir().join(format!("agent-{node}.sock"));
        let mut args = vec![
            format!("--socket-path={}", socket.display()),
            format!("--node-name={node}"),
            format!("--node-ip={node_ip}"),
            format!("--netns-prefix={prefix}"),
            format!("--k8s-kubeconfig-path={}", kubeconfig.display()),
            format!("--prometheus-serve-addr={metrics_addr}"),
            format!("--state-dir={}", cp.dir().join(format!("agent-{node}")).display()),
        ];
        // `{node}` in a flag stands for this node's name (per-node paths).
        args.extend(extra.iter().map(|f| f.replace("{node}", node)));
        let proc = Agent::spawn(node, &args, cp.dir(), &[], false)?;
        let dir = cp.dir().to_path_buf();
        Ok(Agent { proc, node: node.to_string(), metrics_addr, socket, args, dir, enter: Vec::new() })
    }

    /// The agent of a real node (`realnode`): run in the node's network
    /// and mount namespaces as a host-network pod would be
    /// (`--node-netns=host`), reaching the API server on the nodes'
    /// gateway, its metrics on `node_ip:9962`.
    pub fn start_on_node(
        cp: &ControlPlane,
        node: &crate::realnode::RealNode,
        node_ip: std::net::Ipv4Addr,
        prefix: &str,
        extra: &[String],
    ) -> anyhow::Result<Agent> {
        let enter = node.nsenter_args();
        let node = node.name.as_str();
        let metrics_addr = format!("{node_ip}:9962");
        let socket = cp.dir().join(format!("agent-{node}.sock"));
        let mut args = vec![
            format!("--socket-path={}", socket.display()),
            format!("--node-name={node}"),
            format!("--node-ip={node_ip}/32"),
            "--node-netns=host".to_string(),
            format!("--netns-prefix={prefix}"),
            format!("--k8s-kubeconfig-path={}", cp.kubeconfig_for_nodes()?.display()),
            format!("--prometheus-serve-addr={metrics_addr}"),
            format!("--state-dir={}", cp.dir().join(format!("agent-{node}")).display()),
        ];
        args.extend(extra.iter().map(|f| f.replace("{node}", node)));
        let proc = Agent::spawn(node, &args, cp.dir(), &enter, false)?;
        let dir = cp.dir().to_path_buf();
        Ok(Agent { proc, node: node.to_string(), metrics_addr, socket, args, dir, enter })
    }

    fn spawn(node: &str, args: &[String], dir: &Path, enter: &[String], append: bool) -> anyhow::Result<Process> {
        let agent = tools::workspace_bin("cilium-node-agent")?;
        let mut cmd = if enter.is_empty() {
            Command::new(agent)
        } else {
            let mut c = Command::new("nsenter");
            c.args(enter).arg("--").arg(agent);
            c
        };
        cmd.args(args).env("CILIUM_LOG_FILTER", "info");
        Process::spawn_logged(&format!("agent-{node}"), dir, &mut cmd, append)
    }

    /// Starts the agent process again with the same arguments (after a kill).
    pub fn respawn(&mut self) -> anyhow::Result<()> {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        // The same log, continued.
        self.proc = Agent::spawn(&self.node, &self.args, &self.dir, &self.enter, true)?;
        Ok(())
    }

    /// Waits until /healthz answers 200 (caches synced, enforcing).
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.proc.try_exit() {
                anyhow::bail!("{} exited ({s}):\n{}", self.proc.name, self.proc.log_text());
            }
            if http_get_plain(&self.metrics_addr, "/healthz").is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::bail!("{} not ready after {timeout:?}:\n{}", self.proc.name, self.proc.log_text())
    }

    pub fn metrics(&self) -> anyhow::Result<String> {
        http_get_plain(&self.metrics_addr, "/metrics")
    }
}
