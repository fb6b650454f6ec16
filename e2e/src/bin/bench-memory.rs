//! Operator memory per pod, ours against upstream's cilium-operator-generic
//! in the same run: the steady-state RSS of each operator with N pods and
//! their CiliumEndpoints, 1,000 Nodes with their CiliumNodes and 200
//! identities, at several N (default 10,000, 20,000 and 40,000), and the
//! slope of a least-squares line through the sizes in bytes per pod.
//!
//! Steady state: the operator (alone against the cluster) is started, runs
//! 3 endpoint GC and 3 identity GC passes (both every 10 s), then its RSS
//! is read 3 times 2 s apart: the median counts. Both operators get the same
//! settings: cluster-pool IPAM (10.0.0.0/8, /24), CRD identity mode, the
//! same GC intervals; upstream without its client rate limit (ours has
//! none) and without registering CRDs (ours are applied first; the same
//! `cilium.io/v2` formats).
//!
//! Usage (root): `target/release/bench-memory [--nodes=1000] [N ...]` (one
//! size gives no slope: `--nodes=5000 100000` is upstream's published
//! maximum). Upstream's arm needs
//! `scripts/build-upstream.sh`.

use std::time::{Duration, Instant};

use anyhow::ensure;
use cilium_crds::{CiliumEndpoint, CiliumIdentity, CiliumNode};
use e2e::process::{cpu_seconds, status_kib};
use e2e::{ControlPlane, Operator, Options};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, PostParams};
use serde_json::json;

const NS: &str = "bench";
/// Nodes (and CiliumNodes): 1,000, or `--nodes=N`.
fn node_count() -> usize {
    static NODES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *NODES.get_or_init(|| {
        std::env::args().find_map(|a| a.strip_prefix("--nodes=").and_then(|n| n.parse().ok())).unwrap_or(1000)
    })
}
const IDENTITIES: usize = 200;
const CONCURRENCY: usize = 32;
const GC_INTERVAL_S: u64 = 10;

fn main() -> anyhow::Result<()> {
    let mut sizes: Vec<usize> =
        std::env::args().skip(1).filter(|a| !a.starts_with("--")).map(|s| s.parse()).collect::<Result<_, _>>()?;
    if sizes.is_empty() {
        sizes = vec![10_000, 20_000, 40_000];
    }
    sizes.sort();
    let upstream = e2e::tools::tool("cilium-operator-generic").is_ok();
    if !upstream {
        eprintln!("upstream cilium-operator-generic not built (scripts/build-upstream.sh): ours only");
    }
    let cp = ControlPlane::start(Options::default())?;
    cp.apply_crds()?;
    let t = Instant::now();
    e2e::block_on(base_objects(&cp))?;
    eprintln!(
        "created {} Nodes + CiliumNodes and {IDENTITIES} identities in {:.1}s",
        node_count(),
        t.elapsed().as_secs_f64()
    );

    // (pods, ours, upstream)
    let mut rows: Vec<(usize, Steady, Option<Steady>)> = Vec::new();
    let mut have = 0;
    for &n in &sizes {
        let t = Instant::now();
        e2e::block_on(fill(&cp, have, n))?;
        eprintln!("{n} pods + CEPs in the cluster (added {} in {:.1}s)", n - have, t.elapsed().as_secs_f64());
        have = n;
        let ours = steady_rss(&cp, Arm::Ours)?;
        let up = if upstream { Some(steady_rss(&cp, Arm::Upstream)?) } else { None };
        eprintln!(
            "  {n} pods: ours {:.1} MiB {:.2} CPU s, upstream {}",
            ours.kib as f64 / 1024.0,
            ours.cpu,
            up.map_or("-".into(), |u| format!("{:.1} MiB {:.2} CPU s", u.kib as f64 / 1024.0, u.cpu))
        );
        rows.push((n, ours, up));
    }

    println!(
        "\nOperator memory ({} nodes, {IDENTITIES} identities; steady RSS, median of 3 readings after 3 GC passes)",
        node_count()
    );
    println!("{:>8} {:>12} {:>14} {:>12} {:>14}", "pods", "ours MiB", "upstream MiB", "ours CPU s", "upstream CPU s");
    for (n, ours, up) in &rows {
        let (up_mib, up_cpu) =
            up.map_or(("-".into(), "-".into()), |u| (format!("{:.1}", u.kib as f64 / 1024.0), format!("{:.2}", u.cpu)));
        println!("{n:>8} {:>12.1} {up_mib:>14} {:>12.2} {up_cpu:>14}", ours.kib as f64 / 1024.0, ours.cpu);
    }
    let xs: Vec<f64> = rows.iter().map(|r| r.0 as f64).collect();
    if rows.len() < 2 {
        println!("\nFor docs/benchmarks.md:");
        for (n, ours, up) in &rows {
            let Some(up) = up else { continue };
            println!(
                "- memory: operator RSS at {n} pods and {} nodes = {:.1} MiB (baseline {:.1} upstream, ratio {:.2})",
                node_count(),
                ours.kib as f64 / 1024.0,
                up.kib as f64 / 1024.0,
                ours.kib as f64 / up.kib as f64
            );
            println!(
                "- memory: operator CPU seconds from start through 3 endpoint and 3 identity GC passes at {n} pods and {} nodes = {:.2} s (baseline {:.2} s upstream, ratio {:.2})",
                node_count(),
                ours.cpu,
                up.cpu,
                ours.cpu / up.cpu
            );
        }
        return Ok(());
    }
    let ours_slope = slope(&xs, &rows.iter().map(|r| r.1.kib as f64 * 1024.0).collect::<Vec<_>>());
    println!("\nFor docs/benchmarks.md:");
    let range = format!("{}-{} pods", sizes[0], sizes[sizes.len() - 1]);
    if rows.iter().all(|r| r.2.is_some()) {
        let up_slope = slope(&xs, &rows.iter().map(|r| r.2.map_or(0.0, |u| u.kib as f64 * 1024.0)).collect::<Vec<_>>());
        println!(
            "- memory: operator RSS slope over {range} (pod + CEP) = {ours_slope:.0} bytes/pod (baseline {up_slope:.0} upstream cilium-operator-generic, ratio {:.2})",
            ours_slope / up_slope
        );
        for (n, ours, up) in &rows {
            let Some(up) = up else { continue };
            println!(
                "- memory: operator RSS at {n} pods = {:.1} MiB (baseline {:.1} upstream, ratio {:.2})",
                ours.kib as f64 / 1024.0,
                up.kib as f64 / 1024.0,
                ours.kib as f64 / up.kib as f64
            );
        }
        for (n, ours, up) in &rows {
            let Some(up) = up else { continue };
            println!(
                "- memory: operator CPU seconds from start through 3 endpoint and 3 identity GC passes at {n} pods = {:.2} s (baseline {:.2} s upstream, ratio {:.2})",
                ours.cpu,
                up.cpu,
                ours.cpu / up.cpu
            );
        }
    } else {
        println!("- memory: operator RSS slope over {range} (pod + CEP) = {ours_slope:.0} bytes/pod");
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Arm {
    Ours,
    Upstream,
}

/// Least-squares slope of `ys` over `xs`.
fn slope(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let cov: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    cov / var
}

/// One operator's steady state.
#[derive(Clone, Copy)]
struct Steady {
    /// Median of 3 VmRSS readings.
    kib: u64,
    /// CPU seconds from its start to the first reading.
    cpu: f64,
}

/// Starts one operator, waits for 3 endpoint GC and 3 identity GC passes,
/// returns the median of 3 VmRSS readings and the CPU seconds used until
/// then, stops it.
fn steady_rss(cp: &ControlPlane, arm: Arm) -> anyhow::Result<Steady> {
    let mut args: Vec<String> = vec![
        "--cluster-pool-ipv4-cidr=10.0.0.0/8".into(),
        "--cluster-pool-ipv4-mask-size=24".into(),
        "--identity-allocation-mode=crd".into(),
        format!("--cilium-endpoint-gc-interval={GC_INTERVAL_S}s"),
        format!("--identity-gc-interval={GC_INTERVAL_S}s"),
        "--nodes-gc-interval=5m".into(),
    ];
    let mut op = match arm {
        Arm::Ours => Operator::start(cp, "bench-ours", "kube-system", &args)?,
        Arm::Upstream => {
            args.extend(Operator::UPSTREAM_AS_OURS.iter().map(|a| a.to_string()));
            Operator::start_upstream(cp, "bench-upstream", "kube-system", &args)?
        }
    };
    op.wait_healthy(Duration::from_secs(600))?;
    let started = Instant::now();
    // Identity GC passes (both count them, upstream as a gauge without
    // `_total`); endpoint GC passes: ours counts them, upstream does not, so
    // 3 intervals after the first identity pass (both GCs start together).
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let runs = op.metrics().map(|m| identity_gc_runs(&m)).unwrap_or(0.0);
        let cep_runs = match arm {
            Arm::Ours => op.metric("cilium_operator_endpoint_gc_runs_total").unwrap_or(0.0),
            Arm::Upstream => (started.elapsed().as_secs() / GC_INTERVAL_S) as f64,
        };
        if runs >= 3.0 && cep_runs >= 3.0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no 3 GC passes after 600 s (identity {runs}, endpoint {cep_runs}):\n{}",
            tail(&op)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let cpu = cpu_seconds(op.proc.pid())?;
    let mut readings = Vec::new();
    for i in 0..3 {
        if i > 0 {
            std::thread::sleep(Duration::from_secs(2));
        }
        readings.push(status_kib(op.proc.pid(), "VmRSS")?);
    }
    readings.sort();
    ensure!(!op.proc.log_text().contains("panicked"), "operator panicked:\n{}", tail(&op));
    // Upstream at 100,000 pods did not exit within 15 s of SIGTERM: say so,
    // and the drop kills it; the readings are taken.
    if let Err(e) = op.stop() {
        eprintln!("  {e:#}: killed");
    }
    Ok(Steady { kib: readings[1], cpu })
}

fn tail(op: &Operator) -> String {
    let text = op.proc.log_text();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The sum of `cilium_operator_identity_gc_runs{...}` samples (ours a
/// counter with `_total`, upstream's a gauge without).
fn identity_gc_runs(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("cilium_operator_identity_gc_runs"))
        .filter(|l| l.contains("outcome=\"success\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The namespace, the Nodes with their CiliumNodes, the identities.
async fn base_objects(cp: &ControlPlane) -> anyhow::Result<()> {
    let client = cp.client().await?;
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": NS } }))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let cnodes: Api<CiliumNode> = Api::all(client.clone());
    let ids: Api<CiliumIdentity> = Api::all(client.clone());
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..node_count().max(IDENTITIES))
        .map(|i| {
            let (nodes, cnodes, ids) = (nodes.clone(), cnodes.clone(), ids.clone());
            async move {
                if i < node_count() {
                    let name = format!("node-{i:04}");
                    let ip = format!("192.0.{}.{}", i / 250, i % 250 + 1);
                    let node: Node = serde_json::from_value(json!({
                        "metadata": { "name": name, "labels": { "kubernetes.io/hostname": name } },
                        "status": { "addresses": [{ "type": "InternalIP", "address": ip }] }
                    }))?;
                    let uid = nodes.create(&PostParams::default(), &node).await?.metadata.uid.unwrap_or_default();
                    let cn: CiliumNode = serde_json::from_value(json!({
                        "metadata": { "name": name,
                            "ownerReferences": [{ "apiVersion": "v1", "kind": "Node", "name": name, "uid": uid }] },
                        "spec": { "addresses": [{ "type": "InternalIP", "ip": ip }] }
                    }))?;
                    cnodes.create(&PostParams::default(), &cn).await?;
                }
                if i < IDENTITIES {
                    let app = format!("app-{i}");
                    let id: CiliumIdentity = serde_json::from_value(json!({
                        "metadata": { "name": (1000 + i).to_string(),
                            "labels": { "app": app, "io.kubernetes.pod.namespace": NS } },
                        "security-labels": { "k8s:app": app, "k8s:io.kubernetes.pod.namespace": NS }
                    }))?;
                    ids.create(&PostParams::default(), &id).await?;
                }
                Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Pods `from..to` and their CEPs (owned by the pods; each on one of the
/// nodes, with one of the identities).
async fn fill(cp: &ControlPlane, from: usize, to: usize) -> anyhow::Result<()> {
    let client = cp.client().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let ceps: Api<CiliumEndpoint> = Api::namespaced(client.clone(), NS);
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(from..to)
        .map(|i| {
            let (pods, ceps) = (pods.clone(), ceps.clone());
            async move {
                let name = format!("pod-{i:06}");
                let node = format!("node-{:04}", i % node_count());
                let app = format!("app-{}", i % IDENTITIES);
                let ip = format!("10.{}.{}.{}", (i % node_count()) / 256, (i % node_count()) % 256, i / node_count() % 250 + 1);
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": { "name": name, "namespace": NS, "labels": { "app": app, "tier": "web" } },
                    "spec": { "nodeName": node,
                        "containers": [{ "name": "app", "image": "example/app:1.0", "ports": [{ "containerPort": 8080 }] }] }
                }))?;
                let uid = pods.create(&PostParams::default(), &pod).await?.metadata.uid.unwrap_or_default();
                let cep: CiliumEndpoint = serde_json::from_value(json!({
                    "metadata": { "name": name, "namespace": NS,
                        "ownerReferences": [{ "apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid }] },
                    "status": { "id": i % 4096 + 1, "state": "ready",
                        "identity": { "id": 1000 + i % IDENTITIES, "labels": [format!("k8s:app={app}")] },
                        "networking": { "node": format!("192.0.{}.{}", (i % node_count()) / 250, (i % node_count()) % 250 + 1),
                            "addressing": [{ "ipv4": ip }] } }
                }))?;
                ceps.create(&PostParams::default(), &cep).await?;
                Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}
