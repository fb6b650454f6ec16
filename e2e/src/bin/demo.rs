//! The main job on an embedded default: the Star Wars demo of the Cilium
//! docs on a local cluster made of namespaces. A control plane (etcd +
//! kube-apiserver + kube-controller-manager), two cilium-operator replicas,
//! three cilium-node-agents (one network namespace per node, joined by a
//! fabric namespace), a deathstar on two nodes, a tiefighter and an xwing;
//! then the L3/L4 policy `e2e/fixtures/starwars/rule1.yaml` applied with
//! kubectl. It prints which landings got through and which were dropped by
//! the eBPF programs, and a status. `--keep` leaves everything running until
//! Ctrl-C and prints a KUBECONFIG.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use e2e::netns::{Cleanup, can_connect, serve};
use e2e::{Agent, ControlPlane, Operator, Options, tools};

fn main() {
    // Ctrl-C / SIGTERM: stop every process started and remove every
    // namespace, pin and temporary directory made (also with --keep).
    e2e::shutdown::install();
    if let Err(e) = run() {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn step(t0: Instant, msg: &str) {
    eprintln!("[{:>5.1}s] {msg}", t0.elapsed().as_secs_f64());
}

const SHIPS: &[(&str, &str, &str, &str)] = &[
    // name, node, org, class
    ("deathstar-1", "node-1", "empire", "deathstar"),
    ("deathstar-2", "node-2", "empire", "deathstar"),
    ("tiefighter", "node-3", "empire", "tiefighter"),
    ("xwing", "node-2", "alliance", "xwing"),
];

fn run() -> anyhow::Result<()> {
    let keep = std::env::args().any(|a| a == "--keep");
    let t0 = Instant::now();
    ensure!(unsafe { libc::geteuid() } == 0, "the demo needs root (network namespaces and eBPF)");
    let prefix = format!("demo{}", std::process::id() % 10000);
    let _cleanup = Cleanup::new(prefix.clone());
    step(t0, "starting etcd, kube-apiserver and kube-controller-manager on 127.0.0.1");
    let cp = ControlPlane::start(Options { controller_manager: true, ..Default::default() })?;
    step(t0, "starting two cilium-operator replicas (pod CIDR pool 10.200.0.0/16, /24 per node)");
    let pool = ["--cluster-pool-ipv4-cidr=10.200.0.0/16".to_string()];
    let mut ops = vec![
        Operator::start(&cp, "cilium-operator-1", "kube-system", &pool)?,
        Operator::start(&cp, "cilium-operator-2", "kube-system", &pool)?,
    ];
    for op in &mut ops {
        op.wait_healthy(Duration::from_secs(60))?;
    }
    kubectl(
        &cp,
        &[
            "create",
            "configmap",
            "cilium-config",
            "-n",
            "kube-system",
            "--from-literal=cluster-pool-ipv4-cidr=10.200.0.0/16",
        ],
    )?;
    step(t0, "starting three cilium-node-agents (node-1..3: a network namespace each, joined by a fabric namespace)");
    let mut agents = Vec::new();
    for (i, n) in ["node-1", "node-2", "node-3"].iter().enumerate() {
        cp.apply(&format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {n}\n"))?;
        agents.push(Agent::start(&cp, n, &format!("192.168.210.{}/24", 11 + i), &prefix, &[])?);
    }
    for a in &mut agents {
        a.wait_ready(Duration::from_secs(60))?;
    }
    step(t0, "creating the deathstar (on node-1 and node-2), a tiefighter (node-3) and an xwing (node-2)");
    for (name, node, org, class) in SHIPS {
        cp.apply(
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    org: {org}\n    class: {class}\nspec:\n  nodeName: {node}\n  containers:\n  - name: ship\n    image: docker.io/cilium/starwars\n"
            ),
        )?;
    }
    let mut ips = std::collections::BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for (name, ..) in SHIPS {
        loop {
            let ip = kubectl(&cp, &["get", "pod", name, "-o", "jsonpath={.status.podIP}"])?;
            if let Ok(ip) = ip.trim().parse::<Ipv4Addr>() {
                ips.insert(*name, ip);
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{name} got no IP:\n{}",
                agents.iter().map(|a| a.proc.log_text()).collect::<String>()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let ns = |name: &str| {
        let node = SHIPS.iter().find(|s| s.0 == name).map(|s| s.1).unwrap_or("?");
        format!("{prefix}-{node}-default-{name}")
    };
    let _servers = [serve(&ns("deathstar-1"), 80)?, serve(&ns("deathstar-2"), 80)?];
    step(t0, "ready: every ship tries to land (TCP connect to port 80 of each deathstar)\n");
    landings(&ips, &ns, "Before any policy")?;

    let rule = tools::workspace_root().join("e2e/fixtures/starwars/rule1.yaml");
    println!("\n$ kubectl apply -f e2e/fixtures/starwars/rule1.yaml   (only org=empire may land, port 80/TCP)");
    let applied = Instant::now();
    kubectl(&cp, &["apply", "-f", rule.to_str().unwrap_or_default()])?;
    // Enforced when the xwing can no longer land.
    while can_connect(&ns("xwing"), ips["deathstar-1"], 80, Duration::from_millis(300))? {
        ensure!(applied.elapsed() < Duration::from_secs(30), "rule1 not enforced after 30s");
    }
    println!("enforced {:.0} ms after kubectl apply\n", applied.elapsed().as_secs_f64() * 1000.0);
    landings(&ips, &ns, "With rule1")?;

    println!();
    let ctl = tools::workspace_bin("ciliumctl")?;
    let why_dropped = [
        "policy",
        "trace",
        "--src",
        "default/xwing",
        "--dst",
        "default/deathstar-1",
        "--dport",
        "80/tcp",
        "--color",
        "never",
    ];
    for args in [&["status", "--color", "never"][..], &["endpoint", "list", "--color", "never"][..], &why_dropped[..]] {
        println!("$ ciliumctl {}", args.join(" "));
        let out = std::process::Command::new(&ctl).args(args).env("KUBECONFIG", &cp.kubeconfig).output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        println!();
    }
    println!("Datapath counters (cilium-node-agent /metrics, drops):");
    for a in &agents {
        for l in a.metrics()?.lines().filter(|l| l.starts_with("cilium_drop_count_total{")) {
            println!("  {}  {l}", a.node);
        }
    }
    if keep {
        println!("\nexport KUBECONFIG={}\n(Ctrl-C to stop everything)", cp.kubeconfig.display());
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    drop(ops);
    Ok(())
}

fn landings(
    ips: &std::collections::BTreeMap<&str, Ipv4Addr>,
    ns: &dyn Fn(&str) -> String,
    title: &str,
) -> anyhow::Result<()> {
    println!("{title}:");
    println!("  {:<12} {:<14} {:<18} RESULT", "SHIP", "DEATHSTAR", "ADDRESS");
    for ship in ["tiefighter", "xwing"] {
        for ds in ["deathstar-1", "deathstar-2"] {
            let ok = can_connect(&ns(ship), ips[ds], 80, Duration::from_millis(800))?;
            let result = if ok { "landed (allowed)" } else { "DROPPED by policy" };
            println!("  {:<12} {:<14} {:<18} {result}", ship, ds, format!("{}:80", ips[ds]));
        }
    }
    Ok(())
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> anyhow::Result<String> {
    let out = cp.kubectl()?.args(args).stdin(std::process::Stdio::null()).output().context("running kubectl")?;
    ensure!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
