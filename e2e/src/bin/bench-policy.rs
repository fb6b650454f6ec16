//! Policy enforcement latency with real packets: N endpoints (default 200:
//! 100 targets and 100 clients on two simulated nodes) and P policies
//! (default 100), applied one after another. For policy i, client i probes
//! target i:80 with 5 ms TCP connects; the latency is from the API create of
//! the policy (what `kubectl apply` sends) to the first probe whose SYN was
//! dropped. Baseline, same run: from the same create to the policy's ADDED
//! event on a plain watch (what any agent must wait for). Also the agents'
//! RSS at the end.
//!
//! Usage: `cargo build --release --workspace --bins && target/release/bench-policy [ENDPOINTS] [POLICIES]` (root)

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use cilium_crds::policy::CiliumNetworkPolicy;
use e2e::netns::{Cleanup, in_netns};
use e2e::{Agent, ControlPlane, Operator, Options};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let endpoints: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(200);
    let policies: usize = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(100);
    let pairs = endpoints / 2;
    ensure!(policies <= pairs, "need at least 2 endpoints per policy");
    let prefix = format!("bp{}", std::process::id() % 10000);
    let _cleanup = Cleanup::new(prefix.clone());
    let cp = ControlPlane::start(Options::default())?;
    let mut op = Operator::start(
        &cp,
        "bench-policy-operator",
        "kube-system",
        &["--cluster-pool-ipv4-cidr=10.200.0.0/16".into()],
    )?;
    op.wait_healthy(Duration::from_secs(60))?;
    let nodes = ["node-a", "node-b"];
    e2e::block_on(async {
        let c = cp.client().await?;
        for n in nodes {
            let node: Node = serde_json::from_value(json!({ "metadata": { "name": n } }))?;
            Api::<Node>::all(c.clone()).create(&PostParams::default(), &node).await?;
        }
        anyhow::Ok(())
    })?;
    let mut agents = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        agents.push(Agent::start(&cp, n, &format!("192.168.210.{}/24", 11 + i), &prefix, &[])?);
    }
    for a in &mut agents {
        a.wait_ready(Duration::from_secs(60))?;
    }
    let t0 = Instant::now();
    let ips = e2e::block_on(create_pods(&cp, pairs))?;
    eprintln!("{} endpoints ready in {:.1}s", pairs * 2, t0.elapsed().as_secs_f64());
    let ns = |role: &str, i: usize| format!("{prefix}-{}-default-{role}-{i}", nodes[i % 2]);
    // Targets listen on 80 (blocking accept threads; the process exits at the end).
    for i in 0..pairs {
        let l = in_netns(&ns("target", i), || TcpListener::bind(("0.0.0.0", 80)))??;
        std::thread::spawn(move || {
            for s in l.incoming() {
                drop(s);
            }
        });
    }
    let mut ours = Vec::new();
    let mut base = Vec::new();
    for i in 0..policies {
        let target = ips[&format!("target-{i}")];
        let from = ns("client", i);
        // Reachable before the policy.
        ensure!(
            in_netns(&from, move || TcpStream::connect_timeout(
                &SocketAddr::from((target, 80)),
                Duration::from_secs(1)
            )
            .is_ok())?,
            "client-{i} cannot reach target-{i} before its policy"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let prober = std::thread::spawn(move || {
            let r = in_netns(&from, move || -> Option<Instant> {
                let deadline = Instant::now() + Duration::from_secs(30);
                let _ = tx.send(());
                while Instant::now() < deadline {
                    let start = Instant::now();
                    if TcpStream::connect_timeout(&SocketAddr::from((target, 80)), Duration::from_millis(5)).is_err() {
                        return Some(start);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                None
            });
            r.ok().flatten()
        });
        rx.recv()?;
        let (created, seen) = e2e::block_on(create_policy(&cp, i))?;
        let dropped = prober
            .join()
            .map_err(|_| anyhow::anyhow!("prober panicked"))?
            .with_context(|| format!("policy {i} never enforced"))?;
        let ms = dropped.saturating_duration_since(created).as_secs_f64() * 1000.0;
        ours.push(ms);
        base.push(seen.saturating_duration_since(created).as_secs_f64() * 1000.0);
        if i % 10 == 9 {
            eprintln!("{} policies: last {ms:.1} ms", i + 1);
        }
    }
    let rss: Vec<(String, f64, f64)> = agents
        .iter()
        .map(|a| {
            let status = std::fs::read_to_string(format!("/proc/{}/status", a.proc.pid())).unwrap_or_default();
            let kib = |k: &str| {
                status
                    .lines()
                    .find(|l| l.starts_with(k))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                    .unwrap_or(0.0)
                    / 1024.0
            };
            (a.node.clone(), kib("VmRSS:"), kib("VmHWM:"))
        })
        .collect();
    let (p50, p99, max) = stats(&mut ours);
    let (b50, b99, _) = stats(&mut base);
    println!("\nFor docs/benchmarks.md:");
    println!(
        "- datapath: policy apply to enforcement seen by packets, p50 over {policies} policies and {} endpoints = {p50:.1} ms (baseline {b50:.1} ms create-to-watch-event, ratio {:.2})",
        pairs * 2,
        p50 / b50.max(0.001)
    );
    println!(
        "- datapath: policy apply to enforcement seen by packets, p99 over {policies} policies and {} endpoints = {p99:.1} ms (baseline {b99:.1} ms create-to-watch-event, ratio {:.2})",
        pairs * 2,
        p99 / b99.max(0.001)
    );
    println!("(max {max:.1} ms)");
    for (node, now, peak) in rss {
        println!(
            "- datapath: agent RSS with {} local endpoints and {policies} policies ({node}) = {now:.1} MiB (peak {peak:.1} MiB)",
            pairs
        );
    }
    drop(op);
    Ok(())
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.5), at(0.99), v[v.len() - 1])
}

async fn create_pods(cp: &ControlPlane, pairs: usize) -> anyhow::Result<std::collections::BTreeMap<String, Ipv4Addr>> {
    let pods: Api<Pod> = Api::namespaced(cp.client().await?, "default");
    let nodes = ["node-a", "node-b"];
    let specs: Vec<(String, serde_json::Value)> = (0..pairs)
        .flat_map(|i| {
            [("target", format!("t{i}")), ("client", format!("c{i}"))].map(|(role, app)| {
                let name = format!("{role}-{i}");
                let body = json!({
                    "metadata": { "name": name, "labels": { "app": app, "role": role } },
                    "spec": { "nodeName": nodes[i % 2], "containers": [{ "name": "c", "image": "busybox" }] }
                });
                (name, body)
            })
        })
        .collect();
    futures::stream::iter(specs.iter())
        .map(|(_, b)| {
            let pods = pods.clone();
            async move {
                let p: Pod = serde_json::from_value(b.clone())?;
                pods.create(&PostParams::default(), &p).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let list = pods.list(&Default::default()).await?;
        let ips: std::collections::BTreeMap<String, Ipv4Addr> = list
            .items
            .iter()
            .filter_map(|p| Some((p.metadata.name.clone()?, p.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?)))
            .collect();
        if ips.len() == specs.len() {
            return Ok(ips);
        }
        ensure!(Instant::now() < deadline, "only {} of {} pods got an IP", ips.len(), specs.len());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Creates policy i (target-i may only be reached by a label nobody has)
/// and returns (when the create was sent, when a plain watch saw it).
async fn create_policy(cp: &ControlPlane, i: usize) -> anyhow::Result<(Instant, Instant)> {
    let client = cp.client().await?;
    let api: Api<CiliumNetworkPolicy> = Api::namespaced(client, "default");
    let name = format!("bench-{i}");
    let mut events = watcher(api.clone(), watcher::Config::default().fields(&format!("metadata.name={name}"))).boxed();
    // The watch is established once its (empty) initial list is done.
    while let Some(ev) = events.next().await {
        if matches!(ev, Ok(watcher::Event::InitDone)) {
            break;
        }
    }
    let policy: CiliumNetworkPolicy = serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "endpointSelector": { "matchLabels": { "app": format!("t{i}") } },
            "ingress": [{ "fromEndpoints": [{ "matchLabels": { "app": format!("nobody-{i}") } }] }]
        }
    }))?;
    let pp = PostParams::default();
    let created = Instant::now();
    let create = api.create(&pp, &policy);
    let seen = async {
        while let Some(ev) = events.next().await {
            if matches!(ev, Ok(watcher::Event::Apply(_))) {
                return Instant::now();
            }
        }
        Instant::now()
    };
    let (r, seen) = tokio::join!(create, seen);
    r?;
    Ok((created, seen))
}
