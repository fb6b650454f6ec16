//! IPAM benchmark: N CiliumNodes created at once (default 2,000), time until
//! every one has a pod CIDR from the operator, per-node latency (creation
//! acknowledged -> CIDR seen on the watch) and the operator's peak RSS.
//!
//! Baseline, measured in the same run on a fresh control plane: a minimal
//! client that creates the same nodes with the same concurrency and writes
//! each one's pod CIDR itself with one server-side apply patch right after
//! creating it (per-node latency: creation acknowledged -> patch
//! acknowledged).
//!
//! Upstream, when `scripts/build-upstream.sh` has built it: Cilium's own
//! cilium-operator-generic with the same pool and mask on a fresh control
//! plane, the same nodes, measured the same way (its lines read "vs
//! upstream").
//!
//! Usage: `cargo run --release -p e2e --bin bench-ipam -- [nodes]`
//! (`BENCH_IPAM_DEADLINE=<seconds>`: how long to wait for every CIDR, 300).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use cilium_crds::CiliumNode;
use e2e::process::{cpu_seconds, status_kib};
use e2e::{ControlPlane, Operator, Options};
use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

const CONCURRENCY: usize = 16;

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(2000);
    eprintln!("bench-ipam: {n} CiliumNodes, client concurrency {CONCURRENCY}");

    let cp = ControlPlane::start(Options::default())?;
    cp.apply_crds()?;
    let base = e2e::block_on(baseline(&cp, n))?;
    drop(cp);
    eprintln!("baseline done: {:.2}s", base.total.as_secs_f64());

    let cp = ControlPlane::start(Options::default())?;
    let mut op = Operator::start(
        &cp,
        "bench-operator",
        "kube-system",
        &["--cluster-pool-ipv4-cidr=10.0.0.0/8".into(), "--cluster-pool-ipv4-mask-size=24".into()],
    )?;
    op.wait_healthy(Duration::from_secs(60))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !op.is_leader() {
        ensure!(Instant::now() < deadline, "operator did not lead");
        std::thread::sleep(Duration::from_millis(100));
    }
    let cpu0 = cpu_seconds(op.proc.pid())?;
    let ours = e2e::block_on(with_operator(&cp, n))?;
    let cpu = cpu_seconds(op.proc.pid())? - cpu0;
    let rss_kib = status_kib(op.proc.pid(), "VmHWM")?;
    ensure!(!op.proc.log_text().contains("panicked"), "operator panicked");

    drop(op);
    drop(cp);

    // Upstream's cilium-operator-generic, when scripts/build-upstream.sh
    // built it: the same pool and mask, on a fresh control plane; once with
    // its defaults (a client rate limit of 100 requests/s, burst 200), once
    // without a client rate limit, as ours runs.
    let mut upstream = Vec::new();
    if e2e::tools::tool("cilium-operator-generic").is_ok() {
        let unlimited: &[&str] = &["--operator-k8s-client-qps=100000", "--operator-k8s-client-burst=200000"];
        for (what, extra) in
            [("upstream cilium-operator-generic", &[][..]), ("upstream, client rate limit off", unlimited)]
        {
            let cp = ControlPlane::start(Options::default())?;
            let mut args: Vec<String> = vec![
                "--ipam=cluster-pool".into(),
                // The binary's default is dual stack (Helm's is not).
                "--enable-ipv4=true".into(),
                "--enable-ipv6=false".into(),
                "--cluster-pool-ipv4-cidr=10.0.0.0/8".into(),
                "--cluster-pool-ipv4-mask-size=24".into(),
            ];
            args.extend(extra.iter().map(|a| a.to_string()));
            let mut up = Operator::start_upstream(&cp, "bench-upstream", "kube-system", &args)?;
            up.wait_healthy(Duration::from_secs(120))?;
            e2e::block_on(wait_for_crd_and_lease(&cp))?;
            let log_tail = |up: &Operator| {
                let text = up.proc.log_text();
                text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
            };
            let up_cpu0 = cpu_seconds(up.proc.pid())?;
            let run = e2e::block_on(with_operator(&cp, n))
                .map_err(|e| e.context(format!("upstream operator log:\n{}", log_tail(&up))))?;
            let up_cpu = cpu_seconds(up.proc.pid())? - up_cpu0;
            let rss = status_kib(up.proc.pid(), "VmHWM")?;
            upstream.push((what, run, rss, up_cpu));
        }
    } else {
        eprintln!("upstream cilium-operator-generic not built (scripts/build-upstream.sh): no upstream arm");
    }

    let ratio = ours.total.as_secs_f64() / base.total.as_secs_f64();
    println!("\nIPAM benchmark ({n} CiliumNodes created at once, concurrency {CONCURRENCY})");
    println!("{:<28} {:>10} {:>10} {:>10}", "", "total s", "p50 ms", "p99 ms");
    println!(
        "{:<28} {:>10.2} {:>10.1} {:>10.1}",
        "operator (create -> CIDR)",
        ours.total.as_secs_f64(),
        ours.p(50),
        ours.p(99)
    );
    println!(
        "{:<28} {:>10.2} {:>10.1} {:>10.1}",
        "baseline (create + patch)",
        base.total.as_secs_f64(),
        base.p(50),
        base.p(99)
    );
    println!("ratio (operator / baseline total): {ratio:.2} (target <= 1.5)");
    println!("operator peak RSS: {:.1} MiB", rss_kib as f64 / 1024.0);
    println!("operator CPU seconds over the burst: {cpu:.2}");
    println!("\nFor docs/benchmarks.md:");
    println!(
        "- ipam: time until {n} CiliumNodes have pod CIDRs = {:.2} s (baseline {:.2}, ratio {ratio:.2})",
        ours.total.as_secs_f64(),
        base.total.as_secs_f64()
    );
    println!(
        "- ipam: per-node latency p50 = {:.1} ms (baseline {:.1}, ratio {:.2})",
        ours.p(50),
        base.p(50),
        ours.p(50) / base.p(50)
    );
    println!(
        "- ipam: per-node latency p99 = {:.1} ms (baseline {:.1}, ratio {:.2})",
        ours.p(99),
        base.p(99),
        ours.p(99) / base.p(99)
    );
    println!(
        "- ipam: operator peak RSS after {n} nodes = {:.1} MiB (baseline n/a, ratio n/a)",
        rss_kib as f64 / 1024.0
    );
    for (what, up, up_rss, up_cpu) in upstream {
        println!(
            "- ipam: operator CPU seconds for {n} nodes vs {what} = {cpu:.2} s (baseline {up_cpu:.2} s, ratio {:.2})",
            cpu / up_cpu
        );
        let t = |r: &Run| r.total.as_secs_f64();
        println!(
            "- ipam: time until {n} CiliumNodes have pod CIDRs vs {what} = {:.2} s (baseline {:.2} s, ratio {:.3})",
            t(&ours),
            t(&up),
            t(&ours) / t(&up)
        );
        for pct in [50, 99] {
            println!(
                "- ipam: per-node latency p{pct} vs {what} = {:.1} ms (baseline {:.1} ms, ratio {:.3})",
                ours.p(pct),
                up.p(pct),
                ours.p(pct) / up.p(pct)
            );
        }
        println!(
            "- ipam: operator peak RSS after {n} nodes vs {what} = {:.1} MiB (baseline {:.1} MiB, ratio {:.2})",
            rss_kib as f64 / 1024.0,
            up_rss as f64 / 1024.0,
            rss_kib as f64 / up_rss as f64
        );
    }
    Ok(())
}

/// Upstream's operator registers its CRDs and takes the Lease itself: wait
/// for both before creating nodes.
async fn wait_for_crd_and_lease(cp: &ControlPlane) -> anyhow::Result<()> {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let client = cp.client().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, "kube-system");
    e2e::eventually("upstream's CiliumNode CRD and its Lease", Duration::from_secs(120), || async {
        let established = crds.get_opt("ciliumnodes.cilium.io").await?.is_some_and(|c| {
            c.status
                .iter()
                .flat_map(|s| s.conditions.iter().flatten())
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        let led = leases
            .get_opt("cilium-operator-resource-lock")
            .await?
            .and_then(|l| l.spec?.holder_identity)
            .is_some_and(|h| !h.is_empty());
        Ok((established && led).then_some(()))
    })
    .await
}

struct Run {
    total: Duration,
    latencies_ms: Vec<f64>,
}

impl Run {
    fn p(&self, pct: usize) -> f64 {
        let mut v = self.latencies_ms.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let idx = ((v.len() * pct).div_ceil(100)).saturating_sub(1).min(v.len() - 1);
        v[idx]
    }
}

fn node(name: &str) -> CiliumNode {
    serde_json::from_value(json!({ "metadata": { "name": name }, "spec": {} })).expect("node")
}

async fn baseline(cp: &ControlPlane, n: usize) -> anyhow::Result<Run> {
    let api: Api<CiliumNode> = Api::all(cp.client().await?);
    let start = Instant::now();
    let latencies: Vec<anyhow::Result<f64>> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let name = format!("node-{i:05}");
                api.create(&PostParams::default(), &node(&name)).await?;
                let created = Instant::now();
                let cidr = format!("10.{}.{}.0/24", i / 256, i % 256);
                let body = cilium_crds::apply_body::<CiliumNode>(json!({
                    "metadata": { "name": name },
                    "spec": { "ipam": { "podCIDRs": [cidr] } },
                }));
                api.patch(&name, &PatchParams::apply("bench-baseline").force(), &Patch::Apply(&body)).await?;
                Ok(created.elapsed().as_secs_f64() * 1000.0)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let total = start.elapsed();
    let latencies_ms = latencies.into_iter().collect::<anyhow::Result<Vec<f64>>>()?;
    Ok(Run { total, latencies_ms })
}

async fn with_operator(cp: &ControlPlane, n: usize) -> anyhow::Result<Run> {
    let api: Api<CiliumNode> = Api::all(cp.client().await?);
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch = {
        let seen = seen.clone();
        let api = api.clone();
        tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default()).applied_objects().boxed();
            while let Some(node) = stream.try_next().await? {
                if !node.pod_cidrs().is_empty() {
                    let name = node.metadata.name.clone().unwrap_or_default();
                    seen.lock().unwrap().entry(name).or_insert_with(Instant::now);
                }
            }
            anyhow::Ok(())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    let created: Vec<anyhow::Result<(String, Instant)>> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let name = format!("node-{i:05}");
                api.create(&PostParams::default(), &node(&name)).await?;
                Ok((name, Instant::now()))
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let created = created.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let deadline = Instant::now()
        + Duration::from_secs(std::env::var("BENCH_IPAM_DEADLINE").ok().and_then(|v| v.parse().ok()).unwrap_or(300));
    loop {
        if seen.lock().unwrap().len() >= n {
            break;
        }
        ensure!(Instant::now() < deadline, "only {} of {n} nodes got CIDRs", seen.lock().unwrap().len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watch.abort();
    let seen = seen.lock().unwrap();
    let last = *seen.values().max().context("no nodes")?;
    let mut latencies_ms = Vec::with_capacity(n);
    for (name, at) in created {
        let got = seen.get(&name).with_context(|| format!("{name} never got a CIDR"))?;
        latencies_ms.push(got.saturating_duration_since(at).as_secs_f64() * 1000.0);
    }
    Ok(Run { total: last.duration_since(start), latencies_ms })
}
