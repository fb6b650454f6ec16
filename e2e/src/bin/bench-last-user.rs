//! Time from the last user of an identity going away to its deletion, with
//! the default intervals (`identity-gc-interval` 15m, `identity-heartbeat-
//! timeout` 30m, rate limit 2500/min), ours against upstream's
//! cilium-operator-generic, CRD and kvstore modes, in one run.
//!
//! Four arms run at once, each with its own control plane (and etcd for
//! kvstore) so that no operator sees another's objects: ours and upstream's
//! in CRD mode, ours and upstream's in kvstore mode. Each arm has
//! `USERS.len()` identities, each with one user: a Pod and its
//! CiliumEndpoint (CRD), or a node's `value/` key (kvstore). The operator
//! starts with every identity in use; the users go one by one at the
//! offsets in `USERS` from the operator's start (spread over one GC
//! interval, as users go at any time in a real cluster), and a watch times
//! each identity's deletion from its user's going. An identity deleted
//! before its user went fails the run.
//!
//! Takes about 50 minutes (upstream's CRD mode deletes 30 to 45 minutes
//! after the last user). Usage (root): `target/release/bench-last-user
//! [--quick]`; `--quick` checks the harness in two minutes with every time
//! divided by 60 (interval 15 s, timeout 30 s, users at 1, 6 and 11 s).
//! Upstream's arms need `scripts/build-upstream.sh`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use cilium_crds::{CiliumEndpoint, CiliumIdentity};
use cilium_identity::Labels;
use cilium_identity_alloc::crd::identity_object;
use cilium_identity_alloc::kvstore::{PREFIX, id_key, value_prefix};
use e2e::{ControlPlane, Etcd, Operator, Options};
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, PostParams};
use serde_json::json;

const NS: &str = "bench";
/// When each identity's user goes, from the operator's start.
const USERS: [Duration; 3] = [Duration::from_secs(60), Duration::from_secs(360), Duration::from_secs(660)];
/// How long an arm waits for its deletions after the last user went.
const PATIENCE: Duration = Duration::from_secs(70 * 60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Mode {
    Crd,
    Kvstore,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Who {
    Ours,
    Upstream,
}

struct Arm {
    /// Every time divided by this (1, or 60 with `--quick`).
    scale: u32,
    mode: Mode,
    who: Who,
    cp: ControlPlane,
    etcd: Option<Etcd>,
}

fn main() -> anyhow::Result<()> {
    let scale = if std::env::args().any(|a| a == "--quick") { 60 } else { 1 };
    let upstream = e2e::tools::tool("cilium-operator-generic").is_ok();
    if !upstream {
        eprintln!("upstream cilium-operator-generic not built (scripts/build-upstream.sh): ours only");
    }
    let mut arms = Vec::new();
    for mode in [Mode::Crd, Mode::Kvstore] {
        for who in [Who::Ours, Who::Upstream] {
            if who == Who::Upstream && !upstream {
                continue;
            }
            let cp = ControlPlane::start(Options::default())?;
            cp.apply_crds()?;
            let etcd = if mode == Mode::Kvstore { Some(Etcd::start()?) } else { None };
            arms.push(Arm { scale, mode, who, cp, etcd });
        }
    }
    for arm in &arms {
        e2e::block_on(users(arm))?;
    }
    // Start every operator, then run the arms together.
    let mut ops = Vec::new();
    for arm in &arms {
        ops.push((start_operator(arm)?, Instant::now()));
    }
    eprintln!(
        "{} operators started; users go at {:?} s from each start; this takes about {} minutes",
        ops.len(),
        USERS.map(|d| d.as_secs_f64() / scale as f64),
        50 / scale + 1
    );
    let results = e2e::block_on(async {
        let runs = arms.iter().zip(&ops).map(|(arm, (op, started))| async move {
            let r = run_arm(arm, *started).await;
            (arm, op, r)
        });
        futures::future::join_all(runs).await
    });
    let mut lines = Vec::new();
    let mut medians: HashMap<(Who, Mode), f64> = HashMap::new();
    for (arm, op, r) in results {
        let latencies = r.with_context(|| {
            format!(
                "{:?} {:?}: {}",
                arm.who,
                arm.mode,
                op.proc.log_text().lines().rev().take(20).collect::<Vec<_>>().join("\n")
            )
        })?;
        let mut sorted = latencies.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        eprintln!(
            "{:?} {:?}: last user -> deletion {} min (median {:.1})",
            arm.who,
            arm.mode,
            latencies.iter().map(|l| format!("{:.1}", l / 60.0)).collect::<Vec<_>>().join(", "),
            median / 60.0
        );
        medians.insert((arm.who, arm.mode), median);
    }
    for mode in [Mode::Crd, Mode::Kvstore] {
        let (Some(ours), Some(up)) = (medians.get(&(Who::Ours, mode)), medians.get(&(Who::Upstream, mode))) else {
            continue;
        };
        let what = if mode == Mode::Crd { "CiliumIdentity" } else { "kvstore identity" };
        lines.push(format!(
            "- identity-gc: last user gone to {what} deleted, default intervals (median of {}) = {:.1} min (baseline {:.1} min upstream cilium-operator-generic, ratio {:.2})",
            USERS.len(),
            ours / 60.0,
            up / 60.0,
            ours / up
        ));
    }
    println!("\nFor docs/benchmarks.md:");
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

fn labels(i: usize) -> Labels {
    Labels::from_k8s(NS, [("app", format!("last-user-{i}").as_str())])
}

fn id_of(i: usize) -> u32 {
    1000 + i as u32
}

/// The identities and their users, before the operator starts.
async fn users(arm: &Arm) -> anyhow::Result<()> {
    let client = arm.cp.client().await?;
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": NS } }))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    match (arm.mode, &arm.etcd) {
        (Mode::Crd, _) => {
            let ids: Api<CiliumIdentity> = Api::all(client.clone());
            let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
            let ceps: Api<CiliumEndpoint> = Api::namespaced(client.clone(), NS);
            for i in 0..USERS.len() {
                ids.create(&PostParams::default(), &identity_object(id_of(i), &labels(i))).await?;
                let name = format!("user-{i}");
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": { "name": name, "namespace": NS, "labels": { "app": format!("last-user-{i}") } },
                    "spec": { "containers": [{ "name": "app", "image": "example/app:1.0" }] }
                }))?;
                let uid = pods.create(&PostParams::default(), &pod).await?.metadata.uid.unwrap_or_default();
                let cep: CiliumEndpoint = serde_json::from_value(json!({
                    "metadata": { "name": name, "namespace": NS,
                        "ownerReferences": [{ "apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid }] },
                    "status": { "id": i + 1, "state": "ready", "identity": { "id": id_of(i) },
                        "networking": { "node": "node-1", "addressing": [{ "ipv4": format!("10.0.0.{}", i + 1) }] } }
                }))?;
                ceps.create(&PostParams::default(), &cep).await?;
            }
        }
        (Mode::Kvstore, Some(etcd)) => {
            let mut c = etcd_client::Client::connect([etcd.endpoint.as_str()], None).await?;
            for i in 0..USERS.len() {
                let key = labels(i).key_string();
                c.put(id_key(id_of(i)), key.clone(), None).await?;
                c.put(value_key(&key), id_of(i).to_string(), None).await?;
            }
        }
        (Mode::Kvstore, None) => anyhow::bail!("a kvstore arm without etcd"),
    }
    Ok(())
}

/// The one node's value key that uses the identity with these labels.
fn value_key(labels_key: &str) -> String {
    format!("{}10.0.0.1", value_prefix(labels_key))
}

/// The operator with every identity setting at its default; IPAM and the
/// rest as in the other benchmarks.
fn start_operator(arm: &Arm) -> anyhow::Result<Operator> {
    let mut args: Vec<String> = match (arm.mode, &arm.etcd) {
        (Mode::Crd, _) => vec!["--identity-allocation-mode=crd".into()],
        (Mode::Kvstore, Some(etcd)) => vec![
            "--identity-allocation-mode=kvstore".into(),
            "--kvstore=etcd".into(),
            format!("--kvstore-opt=etcd.address={}", etcd.endpoint),
        ],
        (Mode::Kvstore, None) => anyhow::bail!("a kvstore arm without etcd"),
    };
    if arm.scale != 1 {
        args.push(format!("--identity-gc-interval={}s", 15 * 60 / arm.scale));
        args.push(format!("--identity-heartbeat-timeout={}s", 30 * 60 / arm.scale));
    }
    let name = format!("last-user-{:?}-{:?}", arm.who, arm.mode).to_lowercase();
    match arm.who {
        Who::Ours => Operator::start(&arm.cp, &name, "kube-system", &args),
        Who::Upstream => {
            args.push("--cluster-pool-ipv4-cidr=10.0.0.0/8".into());
            args.extend(Operator::UPSTREAM_AS_OURS.iter().map(|a| a.to_string()));
            Operator::start_upstream(&arm.cp, &name, "kube-system", &args)
        }
    }
}

/// Takes each user away at its offset from `started` and returns, per
/// identity, seconds from its user's going to its deletion.
async fn run_arm(arm: &Arm, started: Instant) -> anyhow::Result<Vec<f64>> {
    let deletions = watch_deletions(arm).await?;
    let mut gone_at = Vec::new();
    for (i, at) in USERS.iter().enumerate() {
        tokio::time::sleep_until((started + *at / arm.scale).into()).await;
        ensure!(
            !deletions.lock().expect("deletions").contains_key(&id_of(i)),
            "identity {} deleted while its user was still there",
            id_of(i)
        );
        take_user_away(arm, i).await?;
        gone_at.push(Instant::now());
        eprintln!("{:?} {:?}: user of {} gone", arm.who, arm.mode, id_of(i));
    }
    let deadline = Instant::now() + PATIENCE / arm.scale;
    loop {
        {
            let d = deletions.lock().expect("deletions");
            if (0..USERS.len()).all(|i| d.contains_key(&id_of(i))) {
                return Ok((0..USERS.len()).map(|i| d[&id_of(i)].duration_since(gone_at[i]).as_secs_f64()).collect());
            }
        }
        ensure!(Instant::now() < deadline, "not every identity deleted {:?} after its user went", PATIENCE / arm.scale);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

type Deletions = std::sync::Arc<std::sync::Mutex<HashMap<u32, Instant>>>;

/// The time each identity's deletion is seen, by ID (a Kubernetes watch of
/// CiliumIdentities, or an etcd watch of `id/` keys).
async fn watch_deletions(arm: &Arm) -> anyhow::Result<Deletions> {
    let seen: Deletions = Default::default();
    let out = seen.clone();
    match (arm.mode, &arm.etcd) {
        (Mode::Crd, _) => {
            let api: Api<CiliumIdentity> = Api::all(arm.cp.client().await?);
            tokio::spawn(async move {
                use kube::runtime::watcher;
                let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()));
                while let Some(ev) = stream.try_next().await? {
                    if let watcher::Event::Delete(i) = ev
                        && let Some(id) = i.metadata.name.and_then(|n| n.parse().ok())
                    {
                        seen.lock().expect("deletions").insert(id, Instant::now());
                    }
                }
                anyhow::Ok(())
            });
        }
        (Mode::Kvstore, Some(etcd)) => {
            let mut c = etcd_client::Client::connect([etcd.endpoint.as_str()], None).await?;
            let mut stream =
                c.watch(format!("{PREFIX}id/"), Some(etcd_client::WatchOptions::new().with_prefix())).await?;
            tokio::spawn(async move {
                let _keep = c;
                while let Some(resp) = stream.message().await? {
                    for ev in resp.events() {
                        if ev.event_type() == etcd_client::EventType::Delete
                            && let Some(id) = ev
                                .kv()
                                .and_then(|kv| kv.key_str().ok())
                                .and_then(|k| k.rsplit('/').next())
                                .and_then(|s| s.parse().ok())
                        {
                            seen.lock().expect("deletions").insert(id, Instant::now());
                        }
                    }
                }
                anyhow::Ok(())
            });
        }
        (Mode::Kvstore, None) => anyhow::bail!("a kvstore arm without etcd"),
    }
    Ok(out)
}

/// What an agent does when the last pod with these labels goes: the Pod
/// and its CiliumEndpoint deleted (CRD), its node's value key deleted
/// (kvstore).
async fn take_user_away(arm: &Arm, i: usize) -> anyhow::Result<()> {
    match (arm.mode, &arm.etcd) {
        (Mode::Crd, _) => {
            let client = arm.cp.client().await?;
            let name = format!("user-{i}");
            Api::<CiliumEndpoint>::namespaced(client.clone(), NS).delete(&name, &Default::default()).await?;
            Api::<Pod>::namespaced(client, NS).delete(&name, &Default::default()).await?;
        }
        (Mode::Kvstore, Some(etcd)) => {
            let mut c = etcd_client::Client::connect([etcd.endpoint.as_str()], None).await?;
            let r = c.delete(value_key(&labels(i).key_string()), None).await?;
            ensure!(r.deleted() == 1, "the value key of {} was not there", id_of(i));
        }
        (Mode::Kvstore, None) => anyhow::bail!("a kvstore arm without etcd"),
    }
    Ok(())
}
