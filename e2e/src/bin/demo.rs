//! The main job on an embedded default: a local control plane (etcd +
//! kube-apiserver + kube-controller-manager), two cilium-operator replicas,
//! and a status a person can read. `--keep` leaves everything running until
//! Ctrl-C and prints a KUBECONFIG to use with kubectl.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use e2e::{ControlPlane, Operator, Options};

fn main() {
    if let Err(e) = run() {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn step(t0: Instant, msg: &str) {
    eprintln!("[{:>5.1}s] {msg}", t0.elapsed().as_secs_f64());
}

fn run() -> anyhow::Result<()> {
    let keep = std::env::args().any(|a| a == "--keep");
    let t0 = Instant::now();
    step(t0, "starting etcd, kube-apiserver and kube-controller-manager on 127.0.0.1");
    let cp = ControlPlane::start(Options { controller_manager: true, ..Default::default() })?;
    step(
        t0,
        "starting two cilium-operator replicas (leader election on Lease kube-system/cilium-operator-resource-lock)",
    );
    let mut ops = vec![
        Operator::start(&cp, "cilium-operator-1", "kube-system", &[])?,
        Operator::start(&cp, "cilium-operator-2", "kube-system", &[])?,
    ];
    for op in &mut ops {
        op.wait_healthy(Duration::from_secs(60))?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ops.iter().any(|o| o.is_leader()) {
        ensure!(Instant::now() < deadline, "no leader elected within 30s");
        std::thread::sleep(Duration::from_millis(200));
    }
    step(t0, "ready\n");
    print_status(&cp, &ops)?;
    if keep {
        println!("\nexport KUBECONFIG={}\n(Ctrl-C to stop everything)", cp.kubeconfig.display());
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    Ok(())
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> anyhow::Result<String> {
    let out = cp.kubectl()?.args(args).output().context("running kubectl")?;
    ensure!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn metric(text: &str, name: &str) -> String {
    text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()).unwrap_or("-").to_string()
}

fn print_status(cp: &ControlPlane, ops: &[Operator]) -> anyhow::Result<()> {
    println!("Control plane");
    println!("  kube-apiserver   {}", cp.server);
    println!("  etcd             {}", cp.etcd_endpoint);
    println!("  kubeconfig       {}", cp.kubeconfig.display());
    println!();
    println!("Cilium CRDs (cilium.io/v2)");
    let crds = kubectl(
        cp,
        &[
            "get",
            "crd",
            "-o",
            "custom-columns=NAME:.metadata.name,ESTABLISHED:.status.conditions[?(@.type==\"Established\")].status",
        ],
    )?;
    for line in crds.lines() {
        println!("  {line}");
    }
    println!();
    let lease: serde_json::Value = serde_json::from_str(&kubectl(
        cp,
        &["get", "lease", "-n", "kube-system", "cilium-operator-resource-lock", "-o", "json"],
    )?)?;
    println!("Operator replicas");
    println!("  {:<20} {:<8} {:<10} {:<22} {:<22}", "NAME", "PID", "ROLE", "HEALTH", "METRICS");
    for op in ops {
        let role = if op.is_leader() { "leader" } else { "standby" };
        let health = op.healthz().map(|h| h.trim().to_string()).unwrap_or_else(|| "DOWN".into());
        println!(
            "  {:<20} {:<8} {:<10} {:<22} {:<22}",
            op.proc.name,
            op.proc.pid(),
            role,
            format!("{health}"),
            format!("http://{}/metrics", op.metrics_addr)
        );
    }
    println!();
    println!("Leader lease kube-system/cilium-operator-resource-lock");
    println!("  holder           {}", lease["spec"]["holderIdentity"].as_str().unwrap_or("-"));
    println!("  duration         {}s", lease["spec"]["leaseDurationSeconds"]);
    println!("  transitions      {}", lease["spec"]["leaseTransitions"]);
    if let Some(leader) = ops.iter().find(|o| o.is_leader()) {
        let text = leader.metrics()?;
        println!();
        println!("Leader metrics (excerpt)");
        for name in
            ["cilium_operator_is_leader", "cilium_operator_build_info", "cilium_operator_crds_established_time_seconds"]
        {
            println!("  {name:<48} {}", metric(&text, name));
        }
    }
    Ok(())
}
