//! A real local control plane: etcd + kube-apiserver (+ optionally
//! kube-controller-manager) on random 127.0.0.1 ports, with certificates
//! made by `openssl` in a temporary directory.
//!
//! The binaries come from `.tools/bin` (made by `scripts/setup.sh`). Every
//! process started here is stopped when the [`ControlPlane`] is dropped, and
//! also dies with the thread that started it (PR_SET_PDEATHSIG): start it
//! from the main thread.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::tools;

/// Options for [`ControlPlane::start`].
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Also run kube-controller-manager (ownerReference garbage collection,
    /// namespace deletion, service-account tokens).
    pub controller_manager: bool,
    /// Write an audit log (Metadata level, every request) to
    /// [`ControlPlane::audit_log`]: who was refused what (RBAC tests).
    pub audit: bool,
    /// Real nodes (kubelets in network namespaces): the API server also
    /// listens on the host's leg on the nodes' fabric ([`NodesSubnet`],
    /// see `realnode`) and reaches kubelets by their InternalIP;
    /// kube-scheduler runs, and kube-controller-manager (implied) also runs
    /// the Deployment, ReplicaSet, DaemonSet, node lifecycle (which lifts
    /// the not-ready taint kubelets register with) and root CA publisher
    /// controllers; pods get service-account tokens.
    pub real_nodes: bool,
}

/// The real nodes' fabric subnet of one control plane
/// (`Options::real_nodes`): `192.168.<octet>.0/24`, the first of 220..=239
/// no other process holds (a lock file each, released when the process
/// ends), so that the demo and the tests can run real nodes at the same
/// time. The host's leg on it holds `.1`, where kubelets and host-network
/// pods reach the API server.
pub struct NodesSubnet {
    pub octet: u8,
    _lock: std::fs::File,
}

impl NodesSubnet {
    fn take() -> anyhow::Result<NodesSubnet> {
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all("/run/lock")?;
        for octet in 220..=239u8 {
            let path = format!("/run/lock/cilium-rs-nodes-192.168.{octet}.lock");
            let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
            // SAFETY: flock(2) on a file descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(NodesSubnet { octet, _lock: file });
            }
        }
        bail!("every real-node subnet 192.168.220-239.0/24 is held by another process")
    }

    /// `192.168.<octet>.<host>`.
    pub fn ip(&self, host: u8) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(192, 168, self.octet, host)
    }

    /// The host's leg: where the nodes reach the API server.
    pub fn gateway(&self) -> std::net::Ipv4Addr {
        self.ip(1)
    }
}

/// One running process we started, with its log file.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, dir: &Path, cmd: &mut Command) -> anyhow::Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to
        // SIGKILL the child when the thread that spawned it exits.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        crate::shutdown::register_pid(child.id());
        Ok(Proc { name, child, log })
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// SIGTERM, then SIGKILL after `grace`.
    fn stop(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        // SAFETY: plain kill(2) on a child we own and have not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
///
/// Ports come from 20000..32000, below the kernel's ephemeral range
/// (32768..61000): a port the kernel picked (`bind :0`) may be handed out
/// again as the local port of an outgoing connection before the server that
/// was given it binds it. Each port is handed out once per process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    // Start somewhere different in each process (pid-based).
    let _ = NEXT.compare_exchange(0, 1 + std::process::id() % SPAN, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A real etcd on random loopback ports, restartable on the same data
/// directory and ports.
pub struct Etcd {
    proc: Option<Proc>,
    /// `http://127.0.0.1:<port>`
    pub endpoint: String,
    dir: PathBuf,
    peer_port: u16,
    _tmp: Option<tempfile::TempDir>,
}

impl Etcd {
    /// Starts etcd with its data and log in a temporary directory of its own.
    pub fn start() -> anyhow::Result<Etcd> {
        let tmp = tempfile::Builder::new().prefix("cilium-rs-etcd.").tempdir()?;
        crate::shutdown::register_dir(tmp.path().to_path_buf());
        let mut e = Etcd::start_in(tmp.path())?;
        e._tmp = Some(tmp);
        Ok(e)
    }

    /// Starts etcd with its data (`etcd-data`) and log (`etcd.log`) in `dir`.
    pub fn start_in(dir: &Path) -> anyhow::Result<Etcd> {
        let mut e = Etcd {
            proc: None,
            endpoint: format!("http://127.0.0.1:{}", free_port()),
            dir: dir.to_path_buf(),
            peer_port: free_port(),
            _tmp: None,
        };
        e.spawn()?;
        Ok(e)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let data = self.dir.join("etcd-data");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(tools::tool("etcd")?);
        cmd.arg("--name=cp")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={}", self.endpoint))
            .arg(format!("--advertise-client-urls={}", self.endpoint))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=cp={peer}"))
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        let mut proc = Proc::spawn("etcd", &self.dir, &mut cmd)?;
        let addr = self.endpoint.trim_start_matches("http://").to_string();
        wait_until(&mut proc, Duration::from_secs(20), || {
            http_get_plain(&addr, "/health").is_ok_and(|b| b.contains("true"))
        })?;
        self.proc = Some(proc);
        Ok(())
    }

    /// Stops etcd (SIGTERM).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(10));
        }
    }

    /// Starts a stopped etcd again on the same data and ports.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }

    /// An `etcdctl` (API v3) command pointed at this etcd.
    pub fn etcdctl(&self) -> anyhow::Result<Command> {
        let mut cmd = Command::new(tools::tool("etcdctl")?);
        cmd.env("ETCDCTL_API", "3").arg(format!("--endpoints={}", self.endpoint)).stdin(Stdio::null());
        Ok(cmd)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The version the kube-apiserver in use reports (`v1.35.4`), once per
/// process: which tier a log comes from.
fn apiserver_version() -> &'static str {
    static V: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        let out = tools::tool("kube-apiserver").and_then(|p| Ok(Command::new(p).arg("--version").output()?));
        match out {
            Ok(o) => String::from_utf8_lossy(&o.stdout).trim().trim_start_matches("Kubernetes ").to_string(),
            Err(e) => format!("(version unknown: {e})"),
        }
    })
}

/// A running etcd + kube-apiserver (+ kube-controller-manager).
pub struct ControlPlane {
    dir: tempfile::TempDir,
    etcd: Option<Etcd>,
    apiserver: Option<Proc>,
    kcm: Option<Proc>,
    scheduler: Option<Proc>,
    /// `http://127.0.0.1:<port>` of etcd.
    pub etcd_endpoint: String,
    /// `https://127.0.0.1:<port>` of the API server.
    pub server: String,
    /// Admin kubeconfig (O=system:masters).
    pub kubeconfig: PathBuf,
    apiserver_port: u16,
    audit: bool,
    real_nodes: bool,
    /// With real nodes: their fabric's subnet.
    pub nodes: Option<NodesSubnet>,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver and waits until `/readyz` answers ok.
    pub fn start(opts: Options) -> anyhow::Result<ControlPlane> {
        let t0 = Instant::now();
        let dir = tempfile::Builder::new().prefix("cilium-rs-cp.").tempdir()?;
        crate::shutdown::register_dir(dir.path().to_path_buf());
        let nodes = if opts.real_nodes { Some(NodesSubnet::take()?) } else { None };
        make_certs(dir.path(), nodes.as_ref().map(NodesSubnet::gateway))?;
        let etcd = Etcd::start_in(dir.path())?;
        let apiserver_port = free_port();
        let etcd_endpoint = etcd.endpoint.clone();
        let mut cp = ControlPlane {
            kubeconfig: dir.path().join("admin.kubeconfig"),
            server: format!("https://127.0.0.1:{apiserver_port}"),
            etcd_endpoint,
            dir,
            etcd: Some(etcd),
            apiserver: None,
            kcm: None,
            scheduler: None,
            apiserver_port,
            audit: opts.audit,
            real_nodes: opts.real_nodes,
            nodes,
        };
        cp.write_kubeconfig()?;
        cp.start_apiserver()?;
        if opts.controller_manager || opts.real_nodes {
            cp.start_controller_manager()?;
        }
        if opts.real_nodes {
            cp.start_scheduler()?;
        }
        eprintln!(
            "[control-plane] etcd {} + kube-apiserver {} {} ready in {:.1}s (dir {})",
            cp.etcd_endpoint,
            apiserver_version(),
            cp.server,
            t0.elapsed().as_secs_f64(),
            cp.dir.path().display()
        );
        Ok(cp)
    }

    /// The API server's audit log (JSON lines) when started with `audit`.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    fn audit_args(&self) -> anyhow::Result<Vec<String>> {
        if !self.audit {
            return Ok(Vec::new());
        }
        let policy = self.dir.path().join("audit-policy.yaml");
        std::fs::write(
            &policy,
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n",
        )?;
        Ok(vec![
            format!("--audit-policy-file={}", policy.display()),
            format!("--audit-log-path={}", self.audit_log().display()),
            "--audit-log-format=json".into(),
        ])
    }

    /// The directory holding certificates, kubeconfig and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn start_apiserver(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path();
        let p = |f: &str| d.join(f).display().to_string();
        let mut cmd = Command::new(tools::tool("kube-apiserver")?);
        cmd.arg(format!("--etcd-servers={}", self.etcd_endpoint))
            .arg(if self.real_nodes { "--bind-address=0.0.0.0" } else { "--bind-address=127.0.0.1" })
            .arg("--advertise-address=127.0.0.1")
            .args(self.real_nodes.then_some("--kubelet-preferred-address-types=InternalIP"))
            .arg(format!("--secure-port={}", self.apiserver_port))
            .arg(format!("--cert-dir={}", p("apiserver-certs")))
            .arg(format!("--tls-cert-file={}", p("apiserver.crt")))
            .arg(format!("--tls-private-key-file={}", p("apiserver.key")))
            .arg(format!("--client-ca-file={}", p("ca.crt")))
            .arg(format!("--service-account-key-file={}", p("sa.pub")))
            .arg(format!("--service-account-signing-key-file={}", p("sa.key")))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg("--authorization-mode=RBAC")
            // Pods get service-account tokens only where kubelets run them.
            .args((!self.real_nodes).then_some("--disable-admission-plugins=ServiceAccount"))
            .arg("--endpoint-reconciler-type=none")
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--allow-privileged=true")
            .arg("--profiling=false")
            .args(self.audit_args()?)
            .arg("--v=0");
        let mut proc = Proc::spawn("kube-apiserver", d, &mut cmd)?;
        let kubectl = tools::tool("kubectl")?;
        let kubeconfig = self.kubeconfig.clone();
        wait_until(&mut proc, Duration::from_secs(60), || {
            Command::new(&kubectl)
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .args(["get", "--raw", "/readyz"])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "ok")
        })?;
        self.apiserver = Some(proc);
        Ok(())
    }

    fn start_controller_manager(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path();
        let mut cmd = Command::new(tools::tool("kube-controller-manager")?);
        let controllers = if self.real_nodes {
            "namespace,garbagecollector,serviceaccount,serviceaccount-token,deployment,replicaset,daemonset,nodelifecycle,root-ca-cert-publisher"
        } else {
            "namespace,garbagecollector,serviceaccount,serviceaccount-token"
        };
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--controllers={controllers}"))
            .arg(format!("--service-account-private-key-file={}", d.join("sa.key").display()))
            .arg(format!("--root-ca-file={}", d.join("ca.crt").display()))
            .arg("--bind-address=127.0.0.1")
            .arg("--secure-port=0")
            .arg("--leader-elect=false")
            .arg("--v=0");
        self.kcm = Some(spawn_and_settle("kube-controller-manager", d, &mut cmd)?);
        Ok(())
    }

    fn start_scheduler(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path();
        let mut cmd = Command::new(tools::tool("kube-scheduler")?);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--authentication-kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--authorization-kubeconfig={}", self.kubeconfig.display()))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={}", free_port()))
            .arg("--leader-elect=false")
            .arg("--v=0");
        self.scheduler = Some(spawn_and_settle("kube-scheduler", d, &mut cmd)?);
        Ok(())
    }

    /// The real nodes' fabric subnet (a control plane started with
    /// `real_nodes`).
    pub fn nodes_subnet(&self) -> &NodesSubnet {
        self.nodes.as_ref().expect("a control plane started with Options::real_nodes")
    }

    /// The API server's port.
    pub fn port(&self) -> u16 {
        self.apiserver_port
    }

    /// The API server's address as the real nodes reach it.
    pub fn server_for_nodes(&self) -> String {
        format!("https://{}:{}", self.nodes_subnet().gateway(), self.apiserver_port)
    }

    /// A kubeconfig like the admin one, for the real nodes' address.
    pub fn kubeconfig_for_nodes(&self) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join("nodes.kubeconfig");
        let text = std::fs::read_to_string(&self.kubeconfig)?.replace(&self.server, &self.server_for_nodes());
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Stops kube-apiserver (SIGTERM) and starts it again on the same port and
    /// etcd; returns once it is ready.
    pub fn restart_apiserver(&mut self) -> anyhow::Result<()> {
        if let Some(mut p) = self.apiserver.take() {
            p.stop(Duration::from_secs(10));
        }
        self.start_apiserver()
    }

    /// A kubeconfig authenticating with a bearer `token` (e.g. a
    /// ServiceAccount token from the TokenRequest API), written as `<name>.kubeconfig`.
    pub fn token_kubeconfig(&self, name: &str, token: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        let cfg = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: local\n  context:\n    cluster: local\n    user: {name}\ncurrent-context: local\n",
            server = self.server,
            ca = self.dir.path().join("ca.crt").display(),
        );
        std::fs::write(&path, cfg)?;
        Ok(path)
    }

    fn write_kubeconfig(&self) -> anyhow::Result<()> {
        let d = self.dir.path();
        let cfg = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: local\n  context:\n    cluster: local\n    user: admin\ncurrent-context: local\n",
            server = self.server,
            ca = d.join("ca.crt").display(),
            crt = d.join("admin.crt").display(),
            key = d.join("admin.key").display(),
        );
        std::fs::write(&self.kubeconfig, cfg)?;
        Ok(())
    }

    /// A kube client authenticated as cluster admin.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Applies this workspace's CRD manifests (`crds/`, server-side) and
    /// waits until they are Established, as the operator would.
    pub fn apply_crds(&self) -> anyhow::Result<()> {
        let dir = crate::tools::workspace_root().join("crds");
        let out = self.kubectl()?.args(["apply", "--server-side", "-f"]).arg(&dir).output()?;
        ensure!(out.status.success(), "applying CRDs: {}", String::from_utf8_lossy(&out.stderr));
        let out =
            self.kubectl()?.args(["wait", "--for=condition=Established", "--timeout=60s", "crd", "--all"]).output()?;
        ensure!(out.status.success(), "waiting for CRDs: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let mut child = self
            .kubectl()?
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().context("stdin")?.write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// A `kubectl` command pointed at this control plane.
    pub fn kubectl(&self) -> anyhow::Result<Command> {
        let mut cmd = Command::new(tools::tool("kubectl")?);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()));
        cmd.stdin(Stdio::null());
        Ok(cmd)
    }

    /// The last `lines` lines of every log in the control plane's directory
    /// (its own components and the processes tests started there), for
    /// failure reports.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        let mut logs: Vec<_> = std::fs::read_dir(self.dir.path())
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "log"))
                    .collect()
            })
            .unwrap_or_default();
        logs.sort();
        for p in logs {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {} (last {lines} lines)\n", p.display()));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// The last lines of a component's log (`etcd`, `kube-apiserver`, ...).
    pub fn log_tail(&self, name: &str) -> String {
        [self.etcd.as_ref().and_then(|e| e.proc.as_ref()), self.apiserver.as_ref(), self.kcm.as_ref()]
            .into_iter()
            .flatten()
            .find(|p| p.name == name)
            .map(|p| p.log_tail())
            .unwrap_or_default()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for p in [&mut self.scheduler, &mut self.kcm, &mut self.apiserver].into_iter().flatten() {
            p.stop(Duration::from_secs(5));
        }
        // etcd stops last, when its field drops.
    }
}

/// Spawns a component without a health port: gives it a moment and checks
/// it stays up.
fn spawn_and_settle(name: &'static str, dir: &Path, cmd: &mut Command) -> anyhow::Result<Proc> {
    let mut proc = Proc::spawn(name, dir, cmd)?;
    std::thread::sleep(Duration::from_millis(500));
    if let Some(status) = proc.exited() {
        bail!("{name} exited ({status}):\n{}", proc.log_tail());
    }
    Ok(proc)
}

/// Polls `ready` every 200 ms until it returns true; fails early with the
/// process's log when it exits.
fn wait_until(proc: &mut Proc, timeout: Duration, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = proc.exited() {
            bail!("{} exited during start-up ({status}); last log lines:\n{}", proc.name, proc.log_tail());
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} not ready after {timeout:?}; last log lines:\n{}", proc.name, proc.log_tail());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A minimal HTTP/1.0 GET over plain TCP, returning the body.
pub fn http_get_plain(addr: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("GET {addr}{path}: {status}");
    }
    Ok(body.to_string())
}

/// CA, API-server serving cert (IP SAN 127.0.0.1), admin client cert
/// (O=system:masters) and the service-account key pair.
fn make_certs(dir: &Path, nodes_gateway: Option<std::net::Ipv4Addr>) -> anyhow::Result<()> {
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .context("running openssl (apt-get install openssl)")?;
        if !out.status.success() {
            bail!("openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let gateway = nodes_gateway.map(|g| format!(",IP:{g}")).unwrap_or_default();
    std::fs::write(
        dir.join("san.ext"),
        format!(
            "subjectAltName=IP:127.0.0.1{gateway},DNS:localhost,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n"
        ),
    )?;
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3",
        "-subj",
        "/CN=cilium-rs-test-ca",
    ])?;
    for (name, subj, ext) in
        [("apiserver", "/CN=kube-apiserver", "san.ext"), ("admin", "/O=system:masters/CN=admin", "client.ext")]
    {
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subj,
        ])?;
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "3",
            "-extfile",
            ext,
        ])?;
    }
    run(&["genrsa", "-out", "sa.key", "2048"])?;
    run(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    Ok(())
}
