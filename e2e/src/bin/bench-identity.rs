//! Identity benchmarks, each next to a baseline measured in the same run:
//!
//! 1. reclaiming N stale CiliumIdentities (unused, marked long ago) with the
//!    rate limit off: one operator GC pass vs. a minimal client deleting the
//!    same objects with the same preconditions one at a time and 32 at a
//!    time (the server's limit), and vs. upstream's cilium-operator-generic
//!    (when `scripts/build-upstream.sh` built it; deletions timed from the
//!    first to the last as a watch sees them, for both operators);
//! 2. the same for N kvstore identities (the deleting round) vs. raw etcd
//!    deletes one at a time and 32 at a time;
//! 3. with the default rate limit (2500/min), 6,000 stale identities
//!    (`--rate-stale=N`): time from the first deletion to the last,
//!    deletions in the two minutes after the first (vs. the configured
//!    5000), the most in any 60 s (vs. the configured 2500) and CPU
//!    seconds, ours and upstream's;
//! 4. allocation throughput of 1,000 distinct label sets per backend vs. raw
//!    creates (CiliumIdentity objects / etcd puts, with IDs outside the
//!    cluster range so they never collide) one by one.
//!
//! 5. the kvstore GC at 200,000 keys (50,000 `id/` keys, 150,000 value
//!    keys; 12,500 IDs unused): the deleting round vs. the least any
//!    collector must do, paged reads of both prefixes and one delete per
//!    unused ID.
//! 6. stage 3 in kvstore mode: 6,000 stale `id/` keys at the default rate
//!    limit, ours and upstream's (its etcd client limit off, as ours has
//!    none), both collecting every 10 s.
//!
//! Usage: `cargo run --release -p e2e --bin bench-identity -- [N] [--stages=1,2,3,4,5,6] [--rate-stale=6000]`

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use cilium_crds::CiliumIdentity;
use cilium_identity::Labels;
use cilium_identity_alloc::crd::{CrdAllocator, identity_object};
use cilium_identity_alloc::doublewrite::{DoubleWriteAllocator, ReadFrom};
use cilium_identity_alloc::kvstore::{KvstoreAllocator, PREFIX};
use e2e::process::cpu_seconds;
use e2e::{ControlPlane, Etcd, Operator, Options};
use futures::StreamExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};

const ALLOCATIONS: usize = 1000;

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(20_000);
    // `--stages=1,2,3,4,5,6` (default: all) selects the benchmarks to run.
    let stages: Vec<u8> = std::env::args()
        .find_map(|a| a.strip_prefix("--stages=").map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect()))
        .unwrap_or_else(|| vec![1, 2, 3, 4, 5, 6]);
    let rate_window = stages.contains(&3) && !std::env::args().any(|a| a == "--skip-rate-window");
    let mut lines = Vec::new();

    // 1. CRD reclaim.
    let cp = ControlPlane::start(Options::default())?;
    let mut boot = Operator::start(&cp, "bench-crds", "kube-system", &["--identity-gc-interval=0".into()])?;
    boot.wait_healthy(Duration::from_secs(60))?;
    drop(boot);
    if stages.contains(&1) {
        let r = e2e::block_on(crd_reclaim(&cp, n))?;
        eprintln!(
            "CRD reclaim: pass {:.2}s (deletions seen over {:.2}s), raw one at a time {:.2}s, raw 32 in flight {:.2}s, upstream {}",
            r.pass,
            r.watched,
            r.one_at_a_time,
            r.in_flight_32,
            r.upstream.as_ref().map_or("-".into(), |u| format!("{:.2}s", u.watched))
        );
        lines.push(format!(
            "- identity-gc: reclaim {n} stale CiliumIdentities (rate limit off) = {:.2} s (baseline {:.2} s raw deletes one at a time, ratio {:.2})",
            r.pass,
            r.one_at_a_time,
            r.pass / r.one_at_a_time
        ));
        lines.push(format!(
            "- identity-gc: reclaim {n} stale CiliumIdentities (rate limit off) = {:.2} s (baseline {:.2} s raw deletes 32 in flight, ratio {:.2})",
            r.pass,
            r.in_flight_32,
            r.pass / r.in_flight_32
        ));
        if let Some(up) = r.upstream {
            lines.push(format!(
                "- identity-gc: deletions of {n} stale CiliumIdentities, first to last as a watch sees them (rate limit off) = {:.2} s (baseline {:.2} s upstream cilium-operator-generic, ratio {:.2})",
                r.watched,
                up.watched,
                r.watched / up.watched
            ));
            lines.push(format!(
                "- identity-gc: operator CPU seconds from start to the last of {n} CiliumIdentity deletions (rate limit off) = {:.2} s (baseline {:.2} s upstream cilium-operator-generic, ratio {:.2})",
                r.cpu,
                up.cpu,
                r.cpu / up.cpu
            ));
        }
    }

    // 2. kvstore reclaim.
    let etcd = Etcd::start()?;
    if stages.contains(&2) {
        let r = e2e::block_on(kv_reclaim(&cp, &etcd, n))?;
        let (kv_gc, kv_base, kv_32) = (r.round, r.one_at_a_time, r.in_flight_32);
        eprintln!(
            "kvstore reclaim: round {kv_gc:.2}s (deletions seen over {:.2}s), raw one at a time {kv_base:.2}s, raw 32 in flight {kv_32:.2}s, upstream {}",
            r.watched,
            r.upstream.as_ref().map_or("-".into(), |u| format!("{:.2}s", u.watched))
        );
        if let Some(up) = &r.upstream {
            lines.push(format!(
                "- identity-gc: deletions of {n} stale kvstore identities, first to last as an etcd watch sees them (rate limit off) = {:.2} s (baseline {:.2} s upstream cilium-operator-generic, ratio {:.2})",
                r.watched,
                up.watched,
                r.watched / up.watched
            ));
            lines.push(format!(
                "- identity-gc: operator CPU seconds from start to the last of {n} kvstore identity deletions (rate limit off) = {:.2} s (baseline {:.2} s upstream cilium-operator-generic, ratio {:.2})",
                r.cpu,
                up.cpu,
                r.cpu / up.cpu
            ));
        }
        lines.push(format!(
            "- identity-gc: reclaim {n} stale kvstore identities (rate limit off) = {kv_gc:.2} s (baseline {kv_base:.2} s raw etcd deletes one at a time, ratio {:.2})",
            kv_gc / kv_base
        ));
        lines.push(format!(
            "- identity-gc: reclaim {n} stale kvstore identities (rate limit off) = {kv_gc:.2} s (baseline {kv_32:.2} s raw etcd deletes 32 in flight, ratio {:.2})",
            kv_gc / kv_32
        ));
    }

    // 3. Default rate limit, CRD mode.
    if rate_window {
        let (ours, up) = e2e::block_on(default_rate_limit(&cp, rate_stale()))?;
        lines.extend(rate_limit_lines("CiliumIdentities", &ours, up.as_ref()));
    }
    // 6. Default rate limit, kvstore mode.
    if stages.contains(&6) {
        let (ours, up) = e2e::block_on(kv_default_rate_limit(&cp, &etcd, rate_stale()))?;
        lines.extend(rate_limit_lines("kvstore identities", &ours, up.as_ref()));
    }

    // 4. Allocation throughput.
    let throughput = if stages.contains(&4) { e2e::block_on(allocation_throughput(&cp, &etcd))? } else { Vec::new() };
    for (backend, ours, base) in throughput {
        eprintln!("allocation {backend}: {ours:.0}/s, baseline {base:.0}/s");
        lines.push(format!(
            "- identity-alloc: {ALLOCATIONS} distinct label sets, {backend} backend = {ours:.0} allocations/s (baseline {base:.0} raw writes/s, ratio {:.2})",
            ours / base
        ));
    }
    // 5. kvstore GC at 200k keys.
    if stages.contains(&5) {
        let big = Etcd::start()?;
        let (round, base, total) = e2e::block_on(kv_gc_200k(&cp, &big))?;
        eprintln!("kvstore GC at {total} keys: round {round:.2}s, baseline {base:.2}s");
        lines.push(format!(
            "- identity-gc: kvstore GC deleting round over {total} keys (12500 unused IDs, rate limit off) = {round:.2} s (baseline {base:.2} s paged reads + raw deletes, ratio {:.2})",
            round / base
        ));
    }
    println!("\nFor docs/benchmarks.md:");
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

fn stale_mark() -> String {
    "2020-01-01T00:00:00Z".into()
}

async fn create_identities(cp: &ControlPlane, prefix: &str, n: usize, marked: bool) -> anyhow::Result<()> {
    let api: Api<CiliumIdentity> = Api::all(cp.client().await?);
    let results: Vec<Result<_, kube::Error>> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let mut obj = identity_object(
                256 + i as u32,
                &Labels::from_k8s("bench", [("app", format!("{prefix}-{i}").as_str())]),
            );
            if marked {
                obj.metadata.annotations =
                    Some([(cilium_identity_alloc::HEARTBEAT_ANNOTATION.to_string(), stale_mark())].into());
            }
            async move { api.create(&PostParams::default(), &obj).await }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}

/// Waits for the operator's log line of a GC run that deleted `n`
/// identities (`what` = "identity GC run done" or "kvstore identity GC run
/// done") and returns its `seconds` field.
fn wait_run_seconds(op: &Operator, what: &str, n: usize, timeout: Duration) -> anyhow::Result<f64> {
    let deadline = Instant::now() + timeout;
    loop {
        let log = op.proc.log_text();
        let clean: String = strip_ansi(&log);
        if let Some(line) = clean.lines().find(|l| l.contains(what) && l.contains(&format!(" deleted={n} "))) {
            let secs = line.split("seconds=").nth(1).context("no seconds field")?;
            return Ok(secs
                .trim()
                .trim_matches('"')
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .trim_matches('"')
                .parse()?);
        }
        ensure!(Instant::now() < deadline, "no GC run deleted {n}:\n{}", &clean[clean.len().saturating_sub(3000)..]);
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Stage 1's figures, in seconds.
struct CrdReclaim {
    /// Our deleting pass as the operator logs it.
    pass: f64,
    /// Our deletions from the first to the last as a watch sees them.
    watched: f64,
    /// CPU seconds from our start to the last deletion.
    cpu: f64,
    one_at_a_time: f64,
    in_flight_32: f64,
    /// Upstream's figures, when it is built.
    upstream: Option<Upstream>,
}

/// Deletes every CiliumIdentity with uid + resourceVersion preconditions
/// after one list, `in_flight` at a time; returns seconds.
async fn raw_crd_deletes(api: &Api<CiliumIdentity>, in_flight: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let list = api.list(&ListParams::default()).await?;
    let results: Vec<Result<_, kube::Error>> = futures::stream::iter(list.items)
        .map(|i| {
            let api = api.clone();
            async move {
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: i.metadata.uid.clone(),
                        resource_version: i.metadata.resource_version.clone(),
                    }),
                    ..Default::default()
                };
                api.delete(i.metadata.name.as_deref().unwrap_or_default(), &dp).await
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(started.elapsed().as_secs_f64())
}

async fn crd_reclaim(cp: &ControlPlane, n: usize) -> anyhow::Result<CrdReclaim> {
    let api: Api<CiliumIdentity> = Api::all(cp.client().await?);
    create_identities(cp, "stale", n, true).await?;
    eprintln!("created {n} stale CiliumIdentities");
    let watch = e2e::watch_deletions(api.clone(), n);
    let op = Operator::start(
        cp,
        "bench-crd-gc",
        "kube-system",
        &["--identity-gc-interval=1h".into(), "--identity-gc-rate-limit=100000000".into()],
    )?;
    let pass = wait_run_seconds(&op, "identity GC run done", n, Duration::from_secs(900))?;
    let watched = tokio::time::timeout(Duration::from_secs(60), watch)
        .await
        .map_err(|_| anyhow::anyhow!("the watch did not see {n} deletions"))???;
    let cpu = cpu_seconds(op.proc.pid())?;
    drop(op);
    // Baselines: the same objects again, deleted with uid +
    // resourceVersion preconditions after one list, one at a time, then 32
    // at a time (how fast the server goes).
    create_identities(cp, "stale2", n, true).await?;
    let one_at_a_time = raw_crd_deletes(&api, 1).await?;
    create_identities(cp, "stale3", n, true).await?;
    let in_flight_32 = raw_crd_deletes(&api, 32).await?;
    // Upstream, rate limit off too (client and GC); only the deletions are
    // timed, as for ours.
    let upstream = if e2e::tools::tool("cilium-operator-generic").is_ok() {
        create_identities(cp, "stale4", n, false).await?;
        let watch = e2e::watch_deletions(api.clone(), n);
        let op = Operator::start_upstream(
            cp,
            "bench-upstream-crd-gc",
            "kube-system",
            &upstream_crd_gc_args(&["--identity-gc-rate-limit=100000000"]),
        )?;
        let watched = tokio::time::timeout(Duration::from_secs(900), watch).await.map_err(|_| {
            let log = op.proc.log_text();
            anyhow::anyhow!(
                "upstream did not delete {n} identities in 900 s:\n{}",
                &log[log.len().saturating_sub(3000)..]
            )
        })???;
        let up_cpu = cpu_seconds(op.proc.pid())?;
        drop(op);
        Some(Upstream { watched, cpu: up_cpu })
    } else {
        eprintln!("upstream cilium-operator-generic not built (scripts/build-upstream.sh): no upstream arm");
        None
    };
    Ok(CrdReclaim { pass, watched, cpu, one_at_a_time, in_flight_32, upstream })
}

/// Upstream's CRD-mode GC as the benchmarks run it, plus `extra`. It gives
/// every identity a fresh heartbeat when it starts and marks before it
/// deletes: a 1 s heartbeat timeout and a 5 s interval make its third pass
/// the deleting one.
fn upstream_crd_gc_args(extra: &[&str]) -> Vec<String> {
    ["--identity-allocation-mode=crd", "--identity-gc-interval=5s", "--identity-heartbeat-timeout=1s"]
        .iter()
        .chain(extra)
        .chain(&["--cluster-pool-ipv4-cidr=10.0.0.0/8"])
        .chain(Operator::UPSTREAM_AS_OURS)
        .map(|a| a.to_string())
        .collect()
}

/// Upstream's flags for the kvstore GC on `etcd`, settings as ours: its
/// etcd client's own limit (`etcd.qps`, 20 requests/s by default) is off, as
/// ours has no such limit; `extra` gives the interval and GC rate limit.
fn upstream_kv_gc_args(etcd: &Etcd, extra: &[&str]) -> Vec<String> {
    let kvstore = format!("--kvstore-opt=etcd.address={},etcd.qps=100000", etcd.endpoint);
    ["--identity-allocation-mode=kvstore", "--kvstore=etcd", kvstore.as_str()]
        .into_iter()
        .chain(extra.iter().copied())
        .chain(["--cluster-pool-ipv4-cidr=10.0.0.0/8"])
        .chain(Operator::UPSTREAM_AS_OURS.iter().copied())
        .map(|a| a.to_string())
        .collect()
}

/// Our operator collecting kvstore identities on `etcd`; `extra` gives the
/// interval and GC rate limit.
fn kv_gc_operator(cp: &ControlPlane, etcd: &Etcd, name: &str, extra: &[&str]) -> anyhow::Result<Operator> {
    let kvstore = format!("--kvstore-opt=etcd.address={}", etcd.endpoint);
    let args: Vec<String> = ["--identity-allocation-mode=kvstore", "--kvstore=etcd", kvstore.as_str()]
        .into_iter()
        .chain(extra.iter().copied())
        .map(|a| a.to_string())
        .collect();
    Operator::start(cp, name, "kube-system", &args)
}

/// Every 5 s, rate limit off: stages 2 and 5, ours and upstream's.
const KV_GC_FAST: &[&str] = &["--identity-gc-interval=5s", "--identity-gc-rate-limit=100000000"];

async fn kv_reclaim(cp: &ControlPlane, etcd: &Etcd, n: usize) -> anyhow::Result<KvReclaim> {
    let mut c = etcd_client::Client::connect([etcd.endpoint.as_str()], None).await?;
    for i in 0..n {
        c.put(format!("{PREFIX}id/{}", 256 + i), format!("k8s:app=kv-{i};"), None).await?;
    }
    eprintln!("created {n} stale kvstore identities");
    let watch = watch_kv_deletions(etcd, n).await?;
    let op = kv_gc_operator(cp, etcd, "bench-kv-gc", KV_GC_FAST)?;
    let round = wait_run_seconds(&op, "kvstore identity GC run done", n, Duration::from_secs(900))?;
    let watched = first_to_last(
        &tokio::time::timeout(Duration::from_secs(60), watch)
            .await
            .map_err(|_| anyhow::anyhow!("the etcd watch did not see {n} deletions"))???,
    );
    let cpu = cpu_seconds(op.proc.pid())?;
    drop(op);
    // Baselines: list, then one plain delete per key (the reads the GC
    // makes per key are not counted), one at a time, then 32 in flight.
    let mut raw = Vec::new();
    for in_flight in [1, 32] {
        for i in 0..n {
            c.put(format!("{PREFIX}id/{}", 256 + i), format!("k8s:app=kv-{i};"), None).await?;
        }
        let started = Instant::now();
        let keys =
            c.get(format!("{PREFIX}id/"), Some(etcd_client::GetOptions::new().with_prefix().with_keys_only())).await?;
        let keys: Vec<Vec<u8>> = keys.kvs().iter().map(|kv| kv.key().to_vec()).collect();
        let results: Vec<Result<_, etcd_client::Error>> = futures::stream::iter(keys)
            .map(|k| {
                let mut c = c.clone();
                async move { c.delete(k, None).await }
            })
            .buffer_unordered(in_flight)
            .collect()
            .await;
        for r in results {
            r?;
        }
        raw.push(started.elapsed().as_secs_f64());
    }
    // Upstream, rate limit off, the same 5 s interval: its deleting round
    // timed from the first deletion to the last as an etcd watch sees them,
    // as ours.
    let upstream = if e2e::tools::tool("cilium-operator-generic").is_ok() {
        for i in 0..n {
            c.put(format!("{PREFIX}id/{}", 256 + i), format!("k8s:app=kv-{i};"), None).await?;
        }
        let watch = watch_kv_deletions(etcd, n).await?;
        let op = Operator::start_upstream(
            cp,
            "bench-upstream-kv-gc",
            "kube-system",
            &upstream_kv_gc_args(etcd, KV_GC_FAST),
        )?;
        let watched =
            first_to_last(&tokio::time::timeout(Duration::from_secs(900), watch).await.map_err(|_| {
                let log = op.proc.log_text();
                anyhow::anyhow!(
                    "upstream did not delete {n} kvstore identities in 900 s:\n{}",
                    &log[log.len().saturating_sub(3000)..]
                )
            })???);
        let up_cpu = cpu_seconds(op.proc.pid())?;
        drop(op);
        Some(Upstream { watched, cpu: up_cpu })
    } else {
        None
    };
    Ok(KvReclaim { round, watched, cpu, one_at_a_time: raw[0], in_flight_32: raw[1], upstream })
}

/// Stage 2's figures, in seconds (as [`CrdReclaim`]).
struct KvReclaim {
    round: f64,
    watched: f64,
    cpu: f64,
    one_at_a_time: f64,
    in_flight_32: f64,
    upstream: Option<Upstream>,
}

/// Upstream's arm: its deletions from the first to the last as a watch
/// sees them, and the CPU seconds it used from its start to the last.
struct Upstream {
    watched: f64,
    cpu: f64,
}

/// Watches deletions of `id/` keys until `n` are seen; returns when each
/// was seen. Returns once the watch is established.
async fn watch_kv_deletions(
    etcd: &Etcd,
    n: usize,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<Vec<Instant>>>> {
    let mut c = etcd_client::Client::connect([etcd.endpoint.as_str()], None).await?;
    let mut stream = c.watch(format!("{PREFIX}id/"), Some(etcd_client::WatchOptions::new().with_prefix())).await?;
    Ok(tokio::spawn(async move {
        let _keep = c;
        let mut seen = Vec::with_capacity(n);
        while let Some(resp) = stream.message().await? {
            for ev in resp.events() {
                if ev.event_type() == etcd_client::EventType::Delete {
                    seen.push(Instant::now());
                    if seen.len() == n {
                        return Ok(seen);
                    }
                }
            }
        }
        anyhow::bail!("the etcd watch ended after {} deletions", seen.len())
    }))
}

/// Seconds from the first of `times` to the last.
fn first_to_last(times: &[Instant]) -> f64 {
    match (times.first(), times.last()) {
        (Some(first), Some(last)) => last.duration_since(*first).as_secs_f64(),
        _ => 0.0,
    }
}

const BIG_IDS: u32 = 50_000;
const BIG_USED: u32 = 37_500;
const BIG_NODES: u32 = 4;

async fn put_big(c: &mut etcd_client::Client, from: u32, to: u32, values: bool) -> anyhow::Result<()> {
    use cilium_identity_alloc::kvstore::{id_key, value_prefix};
    let label = |i: u32| format!("k8s:app=big-{i:05};k8s:io.kubernetes.pod.namespace=default;");
    let all: Vec<u32> = (from..to).collect();
    for chunk in all.chunks(24) {
        let mut ops = Vec::new();
        for &i in chunk {
            ops.push(etcd_client::TxnOp::put(id_key(256 + i), label(i), None));
            if values && i < BIG_USED {
                for n in 0..BIG_NODES {
                    ops.push(etcd_client::TxnOp::put(
                        format!("{}10.0.0.{n}", value_prefix(&label(i))),
                        (256 + i).to_string(),
                        None,
                    ));
                }
            }
        }
        c.txn(etcd_client::Txn::new().and_then(ops)).await?;
    }
    Ok(())
}

/// Returns (deleting round seconds, baseline seconds, keys).
async fn kv_gc_200k(cp: &ControlPlane, etcd: &Etcd) -> anyhow::Result<(f64, f64, u32)> {
    let mut c = etcd_client::Client::connect([etcd.endpoint.as_str()], None).await?;
    put_big(&mut c, 0, BIG_IDS, true).await?;
    let total = BIG_IDS + BIG_USED * BIG_NODES;
    eprintln!("created {total} kvstore keys");
    let op = kv_gc_operator(cp, etcd, "bench-kv-gc-200k", KV_GC_FAST)?;
    let unused = (BIG_IDS - BIG_USED) as usize;
    let round = wait_run_seconds(&op, "kvstore identity GC run done", unused, Duration::from_secs(900))?;
    drop(op);
    put_big(&mut c, BIG_USED, BIG_IDS, false).await?;
    // Baseline: what any collector must do at least: read both prefixes
    // (paged: one read is over the gRPC limit) and delete each unused ID.
    let started = Instant::now();
    let page = |prefix: String, keys_only: bool| {
        let mut c = c.clone();
        async move {
            let mut end = prefix.clone().into_bytes();
            *end.last_mut().expect("prefix") += 1;
            let mut from = prefix.into_bytes();
            let mut out: Vec<(String, String)> = Vec::new();
            loop {
                let mut o = etcd_client::GetOptions::new().with_range(end.clone()).with_limit(2000);
                if keys_only {
                    o = o.with_keys_only();
                }
                let r = c.get(from.clone(), Some(o)).await?;
                for kv in r.kvs() {
                    out.push((kv.key_str()?.to_string(), kv.value_str()?.to_string()));
                }
                if !r.more() {
                    return anyhow::Ok(out);
                }
                from = r.kvs().last().map(|kv| kv.key().to_vec()).unwrap_or_default();
                from.push(0);
            }
        }
    };
    let ids = page(format!("{PREFIX}id/"), false).await?;
    let values = page(format!("{PREFIX}value/"), true).await?;
    let used: std::collections::HashSet<String> = values
        .iter()
        .filter_map(|(k, _)| k.strip_prefix(&format!("{PREFIX}value/"))?.rsplit_once('/').map(|(l, _)| l.to_string()))
        .collect();
    let mut deleted = 0;
    for (k, v) in &ids {
        if !used.contains(v) {
            c.delete(k.as_str(), None).await?;
            deleted += 1;
        }
    }
    ensure!(deleted == unused, "baseline deleted {deleted}, want {unused}");
    Ok((round, started.elapsed().as_secs_f64(), total))
}

/// Stage 3 and 6 figures for one operator, from every deletion as a watch sees
/// it.
struct RateWindow {
    /// Seconds from the first deletion to the last.
    reclaim: f64,
    /// Deletions in the two minutes after the first.
    first_two_minutes: usize,
    /// The most deletions in any 60 s.
    most_in_a_minute: usize,
    /// The operator's CPU seconds from its start to the last deletion.
    cpu: f64,
    /// Deletions seen.
    deleted: usize,
}

/// Stale identities for stages 3 and 6: 6,000 (more than two windows of
/// the default limit), or `--rate-stale=N`.
fn rate_stale() -> usize {
    std::env::args().find_map(|a| a.strip_prefix("--rate-stale=").and_then(|n| n.parse().ok())).unwrap_or(6000)
}

impl RateWindow {
    fn new(times: &[Instant], cpu: f64) -> RateWindow {
        let first = times.first().copied();
        RateWindow {
            reclaim: first_to_last(times),
            first_two_minutes: first
                .map_or(0, |first| times.iter().filter(|t| t.duration_since(first) < Duration::from_secs(120)).count()),
            most_in_a_minute: e2e::most_in_any_window(times, Duration::from_secs(60)),
            cpu,
            deleted: times.len(),
        }
    }
}

/// Stages 3 and 6's lines for docs/benchmarks.md: ours against the
/// configured limit and against upstream's (when it ran).
fn rate_limit_lines(what: &str, ours: &RateWindow, up: Option<&RateWindow>) -> Vec<String> {
    for (who, r) in [("ours", Some(ours)), ("upstream", up)] {
        if let Some(r) = r {
            eprintln!(
                "default rate limit, {what}, {who}: {} reclaimed over {:.1}s, {} in the first 2 minutes, at most {} in any 60 s, {:.2} CPU s",
                r.deleted, r.reclaim, r.first_two_minutes, r.most_in_a_minute, r.cpu
            );
        }
    }
    // Two windows of the limit, or all when fewer are stale.
    let two_windows = ours.deleted.min(5000);
    let mut lines = vec![
        format!(
            "- identity-gc: {what} deleted in a 2-minute window at the default limit = {} identities (baseline {two_windows} configured, ratio {:.3})",
            ours.first_two_minutes,
            ours.first_two_minutes as f64 / two_windows as f64
        ),
        format!(
            "- identity-gc: most {what} deleted in any 60 s at the default limit = {} identities (baseline 2500 configured, ratio {:.3})",
            ours.most_in_a_minute,
            ours.most_in_a_minute as f64 / 2500.0
        ),
    ];
    // The least time in which `deleted` deletions fit when no 60 s holds
    // more than 2,500: 2,500 at once, the next 2,500 a minute later, ...
    let least = ours.deleted.div_ceil(2500).saturating_sub(1) as f64 * 60.0;
    if least > 0.0 {
        lines.push(format!(
            "- identity-gc: reclaim {} stale {what} at the default limit, first to last deletion = {:.1} s (baseline {least:.1} s the least that keeps 2500 in any 60 s, ratio {:.2})",
            ours.deleted,
            ours.reclaim,
            ours.reclaim / least
        ));
    }
    if let Some(up) = up {
        lines.push(format!(
            "- identity-gc: reclaim {} stale {what} at the default limit, first to last deletion = {:.1} s (baseline {:.1} s upstream cilium-operator-generic, ratio {:.2})",
            ours.deleted,
            ours.reclaim,
            up.reclaim,
            ours.reclaim / up.reclaim
        ));
        lines.push(format!(
            "- identity-gc: most {what} deleted in any 60 s at the default limit = {} identities (baseline {} upstream cilium-operator-generic, ratio {:.2})",
            ours.most_in_a_minute,
            up.most_in_a_minute,
            ours.most_in_a_minute as f64 / up.most_in_a_minute as f64
        ));
        lines.push(format!(
            "- identity-gc: operator CPU seconds from start to the last of {} {what} deleted at the default limit = {:.2} s (baseline {:.2} s upstream cilium-operator-generic, ratio {:.2})",
            ours.deleted,
            ours.cpu,
            up.cpu,
            ours.cpu / up.cpu
        ));
    }
    lines
}

/// `n` stale identities reclaimed at the default rate limit (2500
/// per 1m) by ours, then by upstream's on the same control plane (with the
/// 5 s interval and 1 s heartbeat timeout of stage 1, so that it starts
/// deleting soon).
async fn default_rate_limit(cp: &ControlPlane, n: usize) -> anyhow::Result<(RateWindow, Option<RateWindow>)> {
    let api: Api<CiliumIdentity> = Api::all(cp.client().await?);
    create_identities(cp, "rate", n, true).await?;
    let watch = e2e::watch_deletion_times(api.clone(), n);
    let op = Operator::start(cp, "bench-rate", "kube-system", &["--identity-gc-interval=10s".into()])?;
    let ours = wait_deletions(watch, op, n).await?;
    let upstream = if e2e::tools::tool("cilium-operator-generic").is_ok() {
        create_identities(cp, "rate-up", n, false).await?;
        let watch = e2e::watch_deletion_times(api.clone(), n);
        let op = Operator::start_upstream(cp, "bench-upstream-rate", "kube-system", &upstream_crd_gc_args(&[]))?;
        Some(wait_deletions(watch, op, n).await?)
    } else {
        None
    };
    Ok((ours, upstream))
}

/// The figures of `op`'s deletions as `watch` sees them, within 5 minutes
/// plus a minute per 2,500 deletions; `op` is stopped after (its log tail
/// in the error otherwise).
async fn wait_deletions(
    watch: tokio::task::JoinHandle<anyhow::Result<Vec<Instant>>>,
    op: Operator,
    n: usize,
) -> anyhow::Result<RateWindow> {
    let limit = Duration::from_secs(300 + 60 * n as u64 / 2500);
    let times = tokio::time::timeout(limit, watch).await.map_err(|_| {
        let log = op.proc.log_text();
        anyhow::anyhow!(
            "{n} identities not deleted in {} s:\n{}",
            limit.as_secs(),
            &log[log.len().saturating_sub(3000)..]
        )
    })???;
    let cpu = cpu_seconds(op.proc.pid())?;
    drop(op);
    Ok(RateWindow::new(&times, cpu))
}

/// Stage 6: `n` stale kvstore identities (`id/` keys without
/// value keys) reclaimed at the default rate limit by ours, then by
/// upstream's, each collecting every 10 s (the deleting round is the second,
/// for both) on the same etcd.
async fn kv_default_rate_limit(
    cp: &ControlPlane,
    etcd: &Etcd,
    n: usize,
) -> anyhow::Result<(RateWindow, Option<RateWindow>)> {
    let mut c = etcd_client::Client::connect([etcd.endpoint.as_str()], None).await?;
    let stale = async |c: &mut etcd_client::Client| -> anyhow::Result<()> {
        for i in 0..n {
            c.put(format!("{PREFIX}id/{}", 256 + i), format!("k8s:app=rate-{i};"), None).await?;
        }
        Ok(())
    };
    stale(&mut c).await?;
    let watch = watch_kv_deletions(etcd, n).await?;
    let op = kv_gc_operator(cp, etcd, "bench-kv-rate", &["--identity-gc-interval=10s"])?;
    let ours = wait_deletions(watch, op, n).await?;
    let upstream = if e2e::tools::tool("cilium-operator-generic").is_ok() {
        stale(&mut c).await?;
        let watch = watch_kv_deletions(etcd, n).await?;
        let op = Operator::start_upstream(
            cp,
            "bench-upstream-kv-rate",
            "kube-system",
            &upstream_kv_gc_args(etcd, &["--identity-gc-interval=10s"]),
        )?;
        Some(wait_deletions(watch, op, n).await?)
    } else {
        None
    };
    Ok((ours, upstream))
}

/// (backend, allocations/s, baseline writes/s).
async fn allocation_throughput(cp: &ControlPlane, etcd: &Etcd) -> anyhow::Result<Vec<(&'static str, f64, f64)>> {
    let client = cp.client().await?;
    let connect = || etcd_client::Client::connect([etcd.endpoint.as_str()], None);
    let sets = |tag: &str| -> Vec<Labels> {
        (0..ALLOCATIONS).map(|i| Labels::from_k8s("bench", [("app", format!("{tag}-{i}").as_str())])).collect()
    };
    let mut out = Vec::new();

    let crd = CrdAllocator::new(client.clone(), 256..=65535, "bench");
    let t = Instant::now();
    for l in sets("crd") {
        crd.allocate(&l).await?;
    }
    let ours = ALLOCATIONS as f64 / t.elapsed().as_secs_f64();
    let api: Api<CiliumIdentity> = Api::all(client.clone());
    let t = Instant::now();
    for (i, l) in sets("crd-raw").iter().enumerate() {
        api.create(&PostParams::default(), &identity_object(70_000 + i as u32, l)).await?;
    }
    out.push(("crd", ours, ALLOCATIONS as f64 / t.elapsed().as_secs_f64()));

    let kv = KvstoreAllocator::new(connect().await?, 256..=65535, "192.0.2.1").await?;
    let t = Instant::now();
    for l in sets("kv") {
        kv.allocate(&l).await?;
    }
    let ours = ALLOCATIONS as f64 / t.elapsed().as_secs_f64();
    let mut c = connect().await?;
    let t = Instant::now();
    for (i, l) in sets("kv-raw").iter().enumerate() {
        c.put(format!("{PREFIX}id/{}", 80_000 + i), l.key_string(), None).await?;
    }
    out.push(("kvstore", ours, ALLOCATIONS as f64 / t.elapsed().as_secs_f64()));

    let dw = DoubleWriteAllocator::new(
        CrdAllocator::new(client.clone(), 256..=65535, "bench-dw"),
        KvstoreAllocator::new(connect().await?, 256..=65535, "192.0.2.2").await?,
        ReadFrom::Kvstore,
    );
    let t = Instant::now();
    for l in sets("dw") {
        dw.allocate(&l).await?;
    }
    let ours = ALLOCATIONS as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (i, l) in sets("dw-raw").iter().enumerate() {
        api.create(&PostParams::default(), &identity_object(90_000 + i as u32, l)).await?;
        c.put(format!("{PREFIX}id/{}", 90_000 + i), l.key_string(), None).await?;
    }
    out.push(("double-write", ours, ALLOCATIONS as f64 / t.elapsed().as_secs_f64()));
    Ok(out)
}
