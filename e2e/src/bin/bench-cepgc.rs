//! Endpoint GC benchmark: the operator's memory with N Pods and N
//! CiliumEndpoints in the cluster against an empty cluster (one reading;
//! `bench-memory` measures the slope properly), and the time of one GC pass
//! over N CEPs of which a quarter are orphans against a minimal client
//! deleting the same number of CEPs 16 and 32 at a time, and against
//! upstream's cilium-operator-generic (when `scripts/build-upstream.sh`
//! built it) on the same objects (both timed from the first deletion to
//! the last as a watch sees them).
//!
//! Usage: `cargo run --release -p e2e --bin bench-cepgc -- [pods]` (default
//! 20,000).

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use cilium_crds::CiliumEndpoint;
use e2e::process::status_kib;
use e2e::{ControlPlane, Operator, Options};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

const NS: &str = "bench";
const CONCURRENCY: usize = 32;

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(20_000);
    let orphans = n / 4;
    eprintln!("bench-cepgc: {n} pods + {n} CiliumEndpoints, {orphans} orphans");
    let cp = ControlPlane::start(Options::default())?;
    let flags = ["--cilium-endpoint-gc-interval=1h".to_string(), "--nodes-gc-interval=1h".to_string()];

    // 1. Empty cluster.
    let mut op = Operator::start(&cp, "bench-empty", "kube-system", &flags)?;
    let empty_kib = settle(&mut op)?;
    op.stop()?;

    // 2. Fill: N pods, N CEPs owned by them.
    let t = Instant::now();
    let uids = e2e::block_on(fill(&cp, n))?;
    eprintln!("created {n} pods and {n} CEPs in {:.1}s", t.elapsed().as_secs_f64());
    let filled_at = Instant::now();

    // 3. Full cluster, no orphans: memory.
    let mut op = Operator::start(&cp, "bench-full", "kube-system", &flags)?;
    let full_kib = settle(&mut op)?;
    let full_peak_kib = status_kib(op.proc.pid(), "VmHWM")?;
    op.stop()?;

    // 4. Orphans: delete a quarter of the pods, then one pass. The GC
    // leaves CEPs younger than one interval alone (their pod may not be in
    // its cache yet, upstream #42413): a 10 s interval, and every CEP older.
    e2e::block_on(delete_pods(&cp, &uids[..orphans]))?;
    let gc_interval = Duration::from_secs(10);
    std::thread::sleep((filled_at + gc_interval + Duration::from_secs(1)).saturating_duration_since(Instant::now()));
    let gc_flags = [format!("--cilium-endpoint-gc-interval={}s", gc_interval.as_secs()), flags[1].clone()];
    let watch = watch_deletions(cp.kubeconfig.clone(), orphans);
    std::thread::sleep(Duration::from_secs(1)); // its initial list
    let mut op = Operator::start(&cp, "bench-gc", "kube-system", &gc_flags)?;
    op.wait_healthy(Duration::from_secs(60))?;
    let pass = wait_pass_seconds(&op, 1.0)?;
    let watched = watch.join().map_err(|_| anyhow::anyhow!("watch thread panicked"))??;
    let cpu = e2e::process::cpu_seconds(op.proc.pid())?;
    let remaining = e2e::block_on(count_ceps(&cp))?;
    ensure!(remaining == n - orphans, "{remaining} CEPs left, expected {}", n - orphans);
    ensure!(!op.proc.log_text().contains("panicked"));
    drop(op);

    // 5. Baselines: a minimal client deleting as many CEPs, 16 at a time
    // (as the operator) and 32 at a time (how fast the server goes).
    let base = e2e::block_on(raw_deletes(&cp, &uids[orphans..2 * orphans], 16))?;
    let base32 = e2e::block_on(raw_deletes(&cp, &uids[2 * orphans..3 * orphans], 32))?;
    drop(cp);

    // 6. Upstream's cilium-operator-generic on a fresh control plane with
    // the same objects and orphans, the same interval, no client rate
    // limit: its pass timed from the first deletion to the last as a watch
    // sees them (it reports no pass duration), as ours is above.
    let upstream = if e2e::tools::tool("cilium-operator-generic").is_ok() {
        let cp = ControlPlane::start(Options::default())?;
        let mut boot = Operator::start(&cp, "bench-crds", "kube-system", &["--identity-gc-interval=0".into()])?;
        boot.wait_healthy(Duration::from_secs(60))?;
        boot.stop()?;
        let uids = e2e::block_on(fill(&cp, n))?;
        let filled_at = Instant::now();
        e2e::block_on(delete_pods(&cp, &uids[..orphans]))?;
        std::thread::sleep(
            (filled_at + gc_interval + Duration::from_secs(1)).saturating_duration_since(Instant::now()),
        );
        let watch = watch_deletions(cp.kubeconfig.clone(), orphans);
        std::thread::sleep(Duration::from_secs(1)); // its initial list
        let mut args: Vec<String> = vec![
            format!("--cilium-endpoint-gc-interval={}s", gc_interval.as_secs()),
            "--nodes-gc-interval=1h".into(),
            "--identity-gc-interval=1h".into(),
            "--cluster-pool-ipv4-cidr=10.0.0.0/8".into(),
        ];
        args.extend(Operator::UPSTREAM_AS_OURS.iter().map(|a| a.to_string()));
        let up = Operator::start_upstream(&cp, "bench-upstream-gc", "kube-system", &args)?;
        let watched = watch.join().map_err(|_| anyhow::anyhow!("watch thread panicked"))?.map_err(|e| {
            let log = up.proc.log_text();
            e.context(format!("upstream log:\n{}", &log[log.len().saturating_sub(3000)..]))
        })?;
        let up_cpu = e2e::process::cpu_seconds(up.proc.pid())?;
        let remaining = e2e::block_on(count_ceps(&cp))?;
        ensure!(remaining == n - orphans, "upstream left {remaining} CEPs, expected {}", n - orphans);
        Some((watched, up_cpu))
    } else {
        eprintln!("upstream cilium-operator-generic not built (scripts/build-upstream.sh): no upstream arm");
        None
    };

    let per_pod = (full_kib.saturating_sub(empty_kib)) as f64 * 1024.0 / n as f64;
    println!("\nEndpoint GC benchmark ({n} pods, {n} CEPs, {orphans} orphans)");
    println!("operator RSS empty cluster        {:>10.1} MiB", empty_kib as f64 / 1024.0);
    println!(
        "operator RSS {n} pods + CEPs   {:>10.1} MiB (peak {:.1} MiB)",
        full_kib as f64 / 1024.0,
        full_peak_kib as f64 / 1024.0
    );
    println!(
        "bytes per pod (pod + its CEP)     {per_pod:>10.0}  (one reading; bench-memory fits the slope against upstream)"
    );
    println!("GC pass, {n} CEPs / {orphans} orphans {pass:>8.2} s (deletions seen over {watched:.2} s)");
    println!("raw deletes of {orphans} CEPs, 16 in flight {base:>8.2} s");
    println!("raw deletes of {orphans} CEPs, 32 in flight {base32:>8.2} s");
    println!("operator CPU, start to last deletion {cpu:>8.2} s");
    if let Some((up, up_cpu)) = upstream {
        println!("upstream pass (deletions seen over)  {up:>8.2} s");
        println!("upstream CPU, start to last deletion {up_cpu:>8.2} s");
    }
    println!("\nFor docs/benchmarks.md:");
    println!(
        "- endpoint-gc: operator RSS with {n} pods + {n} CEPs = {:.1} MiB (baseline {:.1} MiB empty cluster, ratio {:.2})",
        full_kib as f64 / 1024.0,
        empty_kib as f64 / 1024.0,
        full_kib as f64 / empty_kib as f64
    );
    println!(
        "- endpoint-gc: one GC pass over {n} CEPs with {orphans} orphans = {pass:.2} s (baseline {base:.2} s raw deletes 16 in flight, ratio {:.2})",
        pass / base
    );
    println!(
        "- endpoint-gc: one GC pass over {n} CEPs with {orphans} orphans = {pass:.2} s (baseline {base32:.2} s raw deletes 32 in flight, ratio {:.2})",
        pass / base32
    );
    if let Some((up, up_cpu)) = upstream {
        println!(
            "- endpoint-gc: one GC pass over {n} CEPs with {orphans} orphans, first to last deletion as a watch sees them = {watched:.2} s (baseline {up:.2} s upstream cilium-operator-generic, ratio {:.2})",
            watched / up
        );
        println!(
            "- endpoint-gc: operator CPU seconds from start to the last of {orphans} deletions over {n} CEPs = {cpu:.2} s (baseline {up_cpu:.2} s upstream cilium-operator-generic, ratio {:.2})",
            cpu / up_cpu
        );
    }
    Ok(())
}

/// Waits for the first GC pass, lets the allocator settle, returns VmRSS.
fn settle(op: &mut Operator) -> anyhow::Result<u64> {
    op.wait_healthy(Duration::from_secs(120))?;
    wait_pass_seconds(op, 1.0)?;
    std::thread::sleep(Duration::from_secs(3));
    status_kib(op.proc.pid(), "VmRSS")
}

/// Waits until `runs` passes are done; returns the last pass's duration.
fn wait_pass_seconds(op: &Operator, runs: f64) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if op.metric("cilium_operator_endpoint_gc_runs_total").unwrap_or(0.0) >= runs {
            return op.metric("cilium_operator_endpoint_gc_last_run_duration_seconds").context("no duration");
        }
        ensure!(Instant::now() < deadline, "no GC pass:\n{}", op.proc.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Creates the pods and their CEPs; returns (pod name, pod uid) in order.
async fn fill(cp: &ControlPlane, n: usize) -> anyhow::Result<Vec<(String, String)>> {
    let client = cp.client().await?;
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": NS } }))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let ceps: Api<CiliumEndpoint> = Api::namespaced(client.clone(), NS);
    let created: Vec<anyhow::Result<(String, String)>> = futures::stream::iter(0..n)
        .map(|i| {
            let (pods, ceps) = (pods.clone(), ceps.clone());
            async move {
                let name = format!("pod-{i:05}");
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": { "name": name, "namespace": NS, "labels": { "app": format!("app-{}", i % 50), "tier": "web" } },
                    "spec": { "containers": [{ "name": "app", "image": "example/app:1.0", "ports": [{ "containerPort": 8080 }] }] }
                }))?;
                let uid = pods.create(&PostParams::default(), &pod).await?.metadata.uid.unwrap_or_default();
                let cep: CiliumEndpoint = serde_json::from_value(json!({
                    "metadata": { "name": name, "namespace": NS,
                        "ownerReferences": [{ "apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid }] },
                    "status": { "id": i, "state": "ready", "identity": { "id": 1000 + (i % 50) },
                        "networking": { "node": "node-1", "addressing": [{ "ipv4": format!("10.0.{}.{}", i / 250, i % 250 + 1) }] } }
                }))?;
                ceps.create(&PostParams::default(), &cep).await?;
                Ok((name, uid))
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut out = created.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    out.sort();
    Ok(out)
}

async fn delete_pods(cp: &ControlPlane, which: &[(String, String)]) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(cp.client().await?, NS);
    let results: Vec<Result<_, kube::Error>> =
        futures::stream::iter(which.iter().cloned())
            .map(|(name, _)| {
                let pods = pods.clone();
                async move {
                    pods.delete(&name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
    for r in results {
        r?;
    }
    Ok(())
}

async fn count_ceps(cp: &ControlPlane) -> anyhow::Result<usize> {
    let ceps: Api<CiliumEndpoint> = Api::namespaced(cp.client().await?, NS);
    Ok(ceps.list_metadata(&ListParams::default()).await?.items.len())
}

/// Watches CiliumEndpoint deletions (in a thread of its own) until `n` are
/// seen; returns the time from the first to the last.
fn watch_deletions(kubeconfig: std::path::PathBuf, n: usize) -> std::thread::JoinHandle<anyhow::Result<f64>> {
    std::thread::spawn(move || {
        e2e::block_on(async move {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
            let api: Api<CiliumEndpoint> = Api::namespaced(kube::Client::try_from(config)?, NS);
            let watch = e2e::watch_deletions(api, n);
            tokio::time::timeout(Duration::from_secs(900), watch)
                .await
                .map_err(|_| anyhow::anyhow!("{n} CEP deletions not seen in 900 s"))??
        })
    })
}

/// Deletes CEPs directly (uid precondition, background), `in_flight` at a
/// time; returns seconds.
async fn raw_deletes(cp: &ControlPlane, which: &[(String, String)], in_flight: usize) -> anyhow::Result<f64> {
    let ceps: Api<CiliumEndpoint> = Api::namespaced(cp.client().await?, NS);
    let list = ceps.list_metadata(&ListParams::default()).await?;
    let uids: std::collections::HashMap<String, String> =
        list.items.into_iter().filter_map(|c| Some((c.metadata.name?, c.metadata.uid?))).collect();
    let started = Instant::now();
    let results: Vec<Result<_, kube::Error>> = futures::stream::iter(which.iter().cloned())
        .map(|(name, _)| {
            let ceps = ceps.clone();
            let uid = uids.get(&name).cloned();
            async move {
                let dp = DeleteParams {
                    preconditions: Some(kube::api::Preconditions { uid, resource_version: None }),
                    propagation_policy: Some(kube::api::PropagationPolicy::Background),
                    ..Default::default()
                };
                ceps.delete(&name, &dp).await
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    let took = started.elapsed().as_secs_f64();
    for r in results {
        r?;
    }
    Ok(took)
}
