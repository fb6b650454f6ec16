//! Pod start-up on real nodes: the time from a pod's creation (the API
//! server's acknowledgement) to a watch seeing it Running with an address,
//! for N pods created at once (16 requests in flight) and placed by the
//! scheduler on two nodes (kubelet + containerd each). Our arm: cilium-cni
//! with our agents (release builds, as host processes in the nodes, as the
//! chart runs them) and the operator's IPAM. Baseline, on the same nodes in
//! the same run: the CNI project's reference `bridge` + `host-local`
//! plugins (Debian's containernetworking-plugins). Rounds alternate the two
//! arms; the figures are medians over rounds.
//!
//! Usage (root): `target/release/bench-pods [pods] [rounds]` (default 100,
//! 3). Build first: `cargo build --release -p e2e -p cilium-operator -p
//! node-agent-stub -p cilium-cni --bins`.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use e2e::netns::{Cleanup, external_host};
use e2e::realnode::{BUSYBOX_IMAGE, NodeOptions, RealNode, build_images, fabric_with_host_leg};
use e2e::{Agent, ControlPlane, Operator, Options, block_on, eventually};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

const NODES: &[&str] = &["bench-a", "bench-b"];
const POOL: &str = "10.210.0.0/16";
const CILIUM_CONF: &str = "05-cilium.conflist";
const BRIDGE_CONF: &str = "10-bridge.conflist";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Arm {
    Cilium,
    Bridge,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::Cilium => "cilium",
            Arm::Bridge => "bridge",
        }
    }
}

/// One arm's round: per-pod latencies (sorted) and the time until all ran.
struct Round {
    latencies: Vec<Duration>,
    all: Duration,
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(100);
    let rounds: usize = std::env::args().nth(2).map(|s| s.parse()).transpose()?.unwrap_or(3);
    eprintln!("bench-pods: {n} pods on {} nodes, {rounds} rounds of each arm", NODES.len());
    let _exclusive = e2e::realnode::exclusive();
    let cp = ControlPlane::start(Options { real_nodes: true, ..Default::default() })?;
    let prefix = format!("bp{}", std::process::id() % 10000);
    let _cleanup = Cleanup::new(prefix.clone());
    fabric_with_host_leg(&cp, &prefix)?;
    let images = build_images(cp.dir())?;
    let mut operator =
        Operator::start(&cp, "operator-bench", "kube-system", &[format!("--cluster-pool-ipv4-cidr={POOL}")])?;
    operator.wait_healthy(Duration::from_secs(60))?;
    let mut nodes = Vec::new();
    for (i, name) in NODES.iter().enumerate() {
        let ip = cp.nodes_subnet().ip(31 + i as u8);
        let netns = external_host(&prefix, name, &format!("{ip}/24"), &[])?;
        nodes.push(RealNode::start(&cp, &prefix, name, &netns, ip, &images, &NodeOptions::default())?);
    }
    block_on(async {
        let api: Api<Node> = Api::all(cp.client().await?);
        for name in NODES {
            eventually(&format!("Node {name} registered"), Duration::from_secs(60), || async {
                Ok(api.get_opt(name).await?.map(|_| ()))
            })
            .await?;
        }
        anyhow::Ok(())
    })?;
    let mut agents = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let ip = cp.nodes_subnet().ip(31 + i as u8);
        let flags = ["--cni".to_string(), format!("--write-cni-conf-when-ready=/etc/cni/net.d/{CILIUM_CONF}")];
        let mut agent = Agent::start_on_node(&cp, node, ip, &prefix, &flags)?;
        agent.wait_ready(Duration::from_secs(60))?;
        agents.push(agent);
    }
    // The agents' conflists (to put back after each bridge round) and the
    // reference plugins with a range per node.
    let mut cilium_confs = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let path = node.cni_conf.join(CILIUM_CONF);
        let conf = block_on(eventually(&format!("{} written", path.display()), Duration::from_secs(30), || async {
            Ok(std::fs::read(&path).ok())
        }))?;
        cilium_confs.push(conf);
        for plugin in ["bridge", "host-local"] {
            let from = Path::new("/usr/lib/cni").join(plugin);
            ensure!(from.exists(), "{} missing: apt-get install containernetworking-plugins", from.display());
            std::fs::copy(&from, node.cni_bin.join(plugin))?;
        }
        let bridge = json!({
            "cniVersion": "1.0.0",
            "name": "bench-bridge",
            "plugins": [{
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": bridge_range(i) }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": node.dir.join("host-local").display().to_string(),
                },
            }],
        });
        std::fs::write(node.cni_conf.join(BRIDGE_CONF), serde_json::to_vec_pretty(&bridge)?)?;
    }

    let mut results: HashMap<&str, Vec<Round>> = HashMap::new();
    for round in 0..rounds {
        for arm in [Arm::Bridge, Arm::Cilium] {
            // The runtime reads the first configuration by name: ours
            // (05-) while it is there, else the bridge's (10-).
            for (node, conf) in nodes.iter().zip(&cilium_confs) {
                let path = node.cni_conf.join(CILIUM_CONF);
                match arm {
                    Arm::Cilium => std::fs::write(&path, conf)?,
                    Arm::Bridge => std::fs::remove_file(&path)?,
                }
            }
            block_on(warm_up(&cp, arm))?;
            let r = block_on(burst(&cp, n, &format!("r{round}-{}", arm.name())))?;
            eprintln!(
                "round {}: {:>6}: p50 {:.0} ms, p99 {:.0} ms, all {n} Running in {:.2} s",
                round + 1,
                arm.name(),
                ms(percentile(&r.latencies, 50)),
                ms(percentile(&r.latencies, 99)),
                r.all.as_secs_f64()
            );
            results.entry(arm.name()).or_default().push(r);
            block_on(delete_all(&cp))?;
        }
    }
    drop(agents);

    let median = |arm: &str, f: &dyn Fn(&Round) -> f64| -> f64 {
        let mut v: Vec<f64> = results[arm].iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let figure = |what: &str, unit: &str, f: &dyn Fn(&Round) -> f64| {
        let (ours, base) = (median("cilium", f), median("bridge", f));
        println!("- pods: {what} = {ours:.1} {unit} (baseline {base:.1}, ratio {:.2})", ours / base);
    };
    println!("# {n} pods on {} real nodes, median of {rounds} rounds; baseline: bridge + host-local", NODES.len());
    figure("create -> Running p50", "ms", &|r| ms(percentile(&r.latencies, 50)));
    figure("create -> Running p99", "ms", &|r| ms(percentile(&r.latencies, 99)));
    figure(&format!("time until {n} pods Running"), "s", &|r| r.all.as_secs_f64());
    for arm in ["cilium", "bridge"] {
        let all: Vec<String> = results[arm].iter().map(|r| format!("{:.2}", r.all.as_secs_f64())).collect();
        let p99: Vec<String> =
            results[arm].iter().map(|r| format!("{:.0}", ms(percentile(&r.latencies, 99)))).collect();
        println!("#   {arm}: all Running {} s; p99 {} ms", all.join("/"), p99.join("/"));
    }
    Ok(())
}

/// The bridge arm's range on node `i`.
fn bridge_range(i: usize) -> String {
    format!("10.250.{i}.0/24")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `p`th percentile of sorted `v` (nearest rank).
fn percentile(v: &[Duration], p: usize) -> Duration {
    let rank = (v.len() * p).div_ceil(100).max(1);
    v[rank - 1]
}

fn pod(name: &str, labels: serde_json::Value, node: Option<&str>) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": "default", "labels": labels },
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "c",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"],
            }],
        },
    }))?)
}

fn running_ip(p: &Pod) -> Option<Ipv4Addr> {
    let s = p.status.as_ref()?;
    if s.phase.as_deref() != Some("Running") {
        return None;
    }
    s.pod_ip.as_deref()?.parse().ok()
}

/// One pod per node until each gets an address of `arm`'s (the runtime
/// reloads its configuration on a file change, not at once); also warms
/// the nodes up.
async fn warm_up(cp: &ControlPlane, arm: Arm) -> anyhow::Result<()> {
    let api: Api<Pod> = Api::namespaced(cp.client().await?, "default");
    let deadline = Instant::now() + Duration::from_secs(120);
    for (i, node) in NODES.iter().enumerate() {
        let want = match arm {
            Arm::Cilium => POOL.to_string(),
            Arm::Bridge => bridge_range(i),
        };
        for attempt in 0.. {
            ensure!(Instant::now() < deadline, "{node}: pods do not get addresses from {want}");
            let name = format!("warm-{node}-{attempt}");
            api.create(&PostParams::default(), &pod(&name, json!({ "bench": "warm" }), Some(node))?).await?;
            let ip = eventually(&format!("{name} Running"), Duration::from_secs(60), || async {
                Ok(api.get_opt(&name).await?.as_ref().and_then(running_ip))
            })
            .await?;
            api.delete(&name, &DeleteParams::default()).await?;
            if e2e::in_cidr(ip, &want) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(())
}

/// Creates `n` pods (16 requests in flight) and waits for all Running.
async fn burst(cp: &ControlPlane, n: usize, label: &str) -> anyhow::Result<Round> {
    let client = cp.client().await?;
    let api: Api<Pod> = Api::namespaced(client, "default");
    // Watch first: every Running is seen after its create returned.
    let running: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen = running.clone();
    let watch = watcher(api.clone(), watcher::Config::default().labels(&format!("bench={label}")))
        .applied_objects()
        .try_for_each(move |p| {
            if running_ip(&p).is_some() {
                let name = p.metadata.name.clone().unwrap_or_default();
                seen.lock().expect("running").entry(name).or_insert_with(Instant::now);
            }
            futures::future::ready(Ok(()))
        });
    let watch = tokio::spawn(watch);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    let created: Vec<(String, Instant)> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let name = format!("{label}-{i}");
                api.create(&PostParams::default(), &pod(&name, json!({ "bench": label }), None)?).await?;
                anyhow::Ok((name, Instant::now()))
            }
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let done = running.lock().expect("running").len();
        if done >= n {
            break;
        }
        ensure!(Instant::now() < deadline, "{done} of {n} pods Running after 300 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watch.abort();
    let running = running.lock().expect("running").clone();
    let mut latencies = Vec::with_capacity(n);
    let mut last = t0;
    for (name, at) in &created {
        let ran = running.get(name).with_context(|| format!("{name} never seen Running"))?;
        latencies.push(ran.saturating_duration_since(*at));
        last = last.max(*ran);
    }
    latencies.sort();
    Ok(Round { latencies, all: last - t0 })
}

/// Deletes every pod in `default` and waits until they are gone: a
/// kubelet lets a pod go once it has stopped its sandbox (the plugins'
/// DEL), so the next round starts on quiet nodes.
async fn delete_all(cp: &ControlPlane) -> anyhow::Result<()> {
    let api: Api<Pod> = Api::namespaced(cp.client().await?, "default");
    api.delete_collection(&DeleteParams::default(), &ListParams::default()).await?;
    eventually("all pods gone", Duration::from_secs(300), || async {
        let left = api.list(&ListParams::default()).await?.items.len();
        anyhow::ensure!(left == 0, "{left} pods left");
        Ok(Some(()))
    })
    .await
}
