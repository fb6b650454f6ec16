//! The main job on an embedded default: the Star Wars demo of the Cilium
//! docs on a local cluster of real nodes. A control plane (etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler), two nodes
//! (each a kubelet with its own containerd in its own network namespace),
//! `helm install cilium charts/cilium -n kube-system` (our operator and
//! agents run as pods from an image of this build's binaries, imported
//! without a registry; the agents network the pods through cilium-cni),
//! the http-sw-app workload placed by the scheduler, then the L3/L4 policy
//! `rule1.yaml` applied with kubectl. It prints which landings (`kubectl
//! exec` from the tiefighter and the xwing) got through and which were
//! dropped by the eBPF programs, and a status. `--keep` leaves everything
//! running until Ctrl-C and prints a KUBECONFIG.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use e2e::netns::{Cleanup, external_host};
use e2e::realnode::{NodeOptions, Pins, RealNode, build_cilium_image, build_images, fabric_with_host_leg};
use e2e::{ControlPlane, Options, tools};

fn main() {
    // Ctrl-C / SIGTERM: stop every process started and remove every
    // namespace, pin, cgroup and temporary directory made (also with
    // --keep).
    e2e::shutdown::install();
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
    ensure!(unsafe { libc::geteuid() } == 0, "the demo needs root (network namespaces, containers and eBPF)");
    let prefix = format!("demo{}", std::process::id() % 10000);
    let _cleanup = Cleanup::new(prefix.clone());
    step(t0, "starting etcd, kube-apiserver, kube-controller-manager and kube-scheduler");
    let cp = ControlPlane::start(Options { real_nodes: true, ..Default::default() })?;
    fabric_with_host_leg(&cp, &prefix)?;
    step(t0, "building the images (pause, busybox, and the chart's localhost/cilium-rs from this build)");
    let mut images = build_images(cp.dir())?;
    let (image, tar) = build_cilium_image(cp.dir())?;
    images.push(tar);
    let names: Vec<String> = ["1", "2"].iter().map(|n| format!("{prefix}-{n}")).collect();
    let _pins = Pins::new(&names);
    step(
        t0,
        &format!(
            "starting {} and {} (kubelet + containerd each; registered with the agent-not-ready taint)",
            names[0], names[1]
        ),
    );
    let mut nodes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let ip = cp.nodes_subnet().ip(11 + i as u8);
        let netns = external_host(&prefix, name, &format!("{ip}/24"), &[])?;
        let opts = NodeOptions { agent_not_ready_taint: true };
        nodes.push(RealNode::start(&cp, &prefix, name, &netns, ip, &images, &opts)?);
    }
    let result = (|| -> anyhow::Result<()> {
        step(t0, &format!("$ helm install cilium charts/cilium -n kube-system   (image {image}, imported)"));
        e2e::realnode::helm(&cp, "install", &[])?;
        e2e::realnode::wait_cilium_ready(&cp, nodes.len() as i32, Duration::from_secs(240))?;
        step(t0, "agents Ready on both nodes; the operator lifted the agent-not-ready taints");
        let app = tools::workspace_root().join("e2e/fixtures/starwars/http-sw-app.yaml");
        step(t0, "$ kubectl apply -f e2e/fixtures/starwars/http-sw-app.yaml   (deathstar x2, tiefighter, xwing)");
        kubectl(&cp, &["apply", "-f", app.to_str().unwrap_or_default()])?;
        let ships = wait_running(&cp, Duration::from_secs(180))?;
        step(t0, "ready: every ship tries to land on each deathstar (kubectl exec ... nc <deathstar>:80)\n");
        print!("{}", kubectl(&cp, &["get", "pods", "-o", "wide"])?);
        println!();
        let deathstars: Vec<&Ship> = ships.iter().filter(|s| s.name.starts_with("deathstar")).collect();
        landings(&cp, &deathstars, "Before any policy")?;

        let rule = tools::workspace_root().join("e2e/fixtures/starwars/rule1.yaml");
        println!("\n$ kubectl apply -f e2e/fixtures/starwars/rule1.yaml   (only org=empire may land, port 80/TCP)");
        let applied = Instant::now();
        kubectl(&cp, &["apply", "-f", rule.to_str().unwrap_or_default()])?;
        // Enforced when the xwing can no longer land.
        while land(&cp, "xwing", deathstars[0].ip)? {
            ensure!(applied.elapsed() < Duration::from_secs(30), "rule1 not enforced after 30s");
        }
        println!("enforced {:.1} s after kubectl apply\n", applied.elapsed().as_secs_f64());
        landings(&cp, &deathstars, "With rule1")?;

        println!();
        let ctl = tools::workspace_bin("ciliumctl")?;
        let why_dropped = [
            "policy".to_string(),
            "trace".into(),
            "--src".into(),
            "default/xwing".into(),
            "--dst".into(),
            format!("default/{}", deathstars[0].name),
            "--dport".into(),
            "80/tcp".into(),
            "--color".into(),
            "never".into(),
        ];
        let status = ["status", "--color", "never"].map(String::from);
        let endpoints = ["endpoint", "list", "--color", "never"].map(String::from);
        for args in [&status[..], &endpoints[..], &why_dropped[..]] {
            println!("$ ciliumctl {}", args.join(" "));
            let out = std::process::Command::new(&ctl).args(args).env("KUBECONFIG", &cp.kubeconfig).output()?;
            print!("{}", String::from_utf8_lossy(&out.stdout));
            println!();
        }
        println!("Datapath counters (each node's agent, /metrics on port 9962, drops):");
        for (i, name) in names.iter().enumerate() {
            let addr = format!("{}:9962", cp.nodes_subnet().ip(11 + i as u8));
            let metrics = e2e::cluster::http_get_plain(&addr, "/metrics").unwrap_or_default();
            for l in metrics.lines().filter(|l| l.starts_with("cilium_drop_count_total{")) {
                println!("  {name}  {l}");
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        let logs: String = nodes.iter().map(|n| n.log_tails(10)).collect();
        return Err(e.context(format!("{logs}{}", cp.log_tails(5))));
    }
    step(t0, "done");
    if keep {
        println!("\nexport KUBECONFIG={}\n(Ctrl-C to stop everything)", cp.kubeconfig.display());
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    Ok(())
}

struct Ship {
    name: String,
    node: String,
    ip: Ipv4Addr,
}

/// Waits until the deathstars, the tiefighter and the xwing are Running
/// with addresses.
fn wait_running(cp: &ControlPlane, timeout: Duration) -> anyhow::Result<Vec<Ship>> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = kubectl(
            cp,
            &[
                "get",
                "pods",
                "-l",
                "org in (empire,alliance)",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.status.phase} {.status.podIP}{'\\n'}{end}",
            ],
        )?;
        let ships: Vec<Ship> = out
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                match f[..] {
                    [name, node, "Running", ip] => {
                        Some(Ship { name: name.into(), node: node.into(), ip: ip.parse().ok()? })
                    }
                    _ => None,
                }
            })
            .collect();
        if ships.len() == 4 && out.lines().count() == 4 {
            return Ok(ships);
        }
        ensure!(Instant::now() < deadline, "the ships are not all Running after {timeout:?}:\n{out}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Whether `ship` lands on `ip`: its `nc` gets the deathstar's answer.
fn land(cp: &ControlPlane, ship: &str, ip: Ipv4Addr) -> anyhow::Result<bool> {
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 1 {ip} 80");
    let out = cp.kubectl()?.args(["exec", ship, "--", "/bin/sh", "-c", &script]).output().context("kubectl exec")?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("Ship landed"))
}

fn landings(cp: &ControlPlane, deathstars: &[&Ship], title: &str) -> anyhow::Result<()> {
    println!("{title}:");
    println!("  {:<12} {:<28} {:<22} {:<18} RESULT", "SHIP", "DEATHSTAR", "NODE", "ADDRESS");
    for ship in ["tiefighter", "xwing"] {
        for ds in deathstars {
            let result = if land(cp, ship, ds.ip)? { "landed (allowed)" } else { "DROPPED by policy" };
            println!("  {:<12} {:<28} {:<22} {:<18} {result}", ship, ds.name, ds.node, format!("{}:80", ds.ip));
        }
    }
    Ok(())
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> anyhow::Result<String> {
    let out = cp.kubectl()?.args(args).stdin(std::process::Stdio::null()).output().context("running kubectl")?;
    ensure!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
