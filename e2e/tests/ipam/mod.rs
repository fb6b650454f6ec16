//! Cluster-pool IPAM and CiliumNode GC through the real operator. Each test
//! starts its own control plane: CiliumNodes are cluster-scoped, and only
//! one IPAM leader may own them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, ensure};
use cilium_crds::CiliumNode;
use e2e::process::sample_value;
use e2e::{ControlPlane, Operator, Options, block_on, eventually};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

pub fn node(name: &str) -> Node {
    serde_json::from_value(json!({ "metadata": { "name": name } })).expect("node")
}

pub fn cilium_node(name: &str, pod_cidrs: &[&str]) -> CiliumNode {
    let mut v = json!({ "metadata": { "name": name }, "spec": {} });
    if !pod_cidrs.is_empty() {
        v["spec"]["ipam"] = json!({ "podCIDRs": pod_cidrs });
    }
    serde_json::from_value(v).expect("cilium node")
}

fn operator_error(n: &CiliumNode) -> Option<String> {
    n.status.as_ref()?.ipam.as_ref()?.operator_status.as_ref()?.error.clone()
}

/// Pod CIDRs of every CiliumNode.
pub async fn all_pod_cidrs(api: &Api<CiliumNode>) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|n| (n.metadata.name.clone().unwrap_or_default(), n.pod_cidrs().to_vec()))
        .collect())
}

/// Fails if a CIDR is held by two nodes.
pub fn assert_no_duplicates(cidrs: &BTreeMap<String, Vec<String>>) -> anyhow::Result<()> {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (node, list) in cidrs {
        for c in list {
            if let Some(other) = seen.insert(c, node) {
                anyhow::bail!("{c} is held by both {other} and {node}");
            }
        }
    }
    Ok(())
}

async fn wait_cidr(api: &Api<CiliumNode>, name: &str) -> anyhow::Result<String> {
    eventually(&format!("a pod CIDR on {name}"), Duration::from_secs(30), || async {
        Ok(api.get(name).await?.pod_cidrs().first().cloned())
    })
    .await
}

async fn wait_error(api: &Api<CiliumNode>, name: &str, needle: &str) -> anyhow::Result<String> {
    eventually(&format!("an IPAM error containing {needle:?} on {name}"), Duration::from_secs(30), || async {
        Ok(operator_error(&api.get(name).await?).filter(|e| e.contains(needle)))
    })
    .await
}

/// Nodes get CIDRs; exhaustion is loud (status, Event, metric); extending
/// the pool list recovers the waiting node; CIDRs outside every pool or held
/// twice are refused precisely; a deleted Node's CiliumNode is collected
/// and its CIDR reused.
pub fn allocation_exhaustion_extension_and_gc(_shared: &ControlPlane) -> anyhow::Result<()> {
    let cp = ControlPlane::start(Options { controller_manager: true, ..Default::default() })?;
    let small_pool = ["--cluster-pool-ipv4-cidr=10.10.0.0/23".to_string(), "--cluster-pool-ipv4-mask-size=24".into()];
    let gc = "--nodes-gc-interval=2s".to_string();
    let mut op = Operator::start(
        &cp,
        "operator-ipam-1",
        "kube-system",
        &[small_pool[0].clone(), small_pool[1].clone(), gc.clone()],
    )?;
    op.wait_healthy(Duration::from_secs(60))?;
    let result = block_on(async {
        let client = cp.client().await?;
        let nodes: Api<Node> = Api::all(client.clone());
        let cns: Api<CiliumNode> = Api::all(client.clone());
        let pp = PostParams::default();
        for n in ["n1", "n2", "n3", "outsider", "dup", "n4"] {
            nodes.create(&pp, &node(n)).await?;
        }
        for n in ["n1", "n2", "n3"] {
            cns.create(&pp, &cilium_node(n, &[])).await?;
        }
        let c1 = wait_cidr(&cns, "n1").await?;
        let c2 = wait_cidr(&cns, "n2").await?;
        ensure!(c1 != c2, "n1 and n2 both got {c1}");
        let both: BTreeSet<&str> = [c1.as_str(), c2.as_str()].into();
        ensure!(both == ["10.10.0.0/24", "10.10.1.0/24"].into(), "unexpected CIDRs {both:?}");

        // Exhaustion: status, Event, metric, log.
        ensure!(wait_error(&cns, "n3", "allocator full").await? == "allocator full");
        ensure!(cns.get("n3").await?.pod_cidrs().is_empty());
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(client.clone());
        eventually("a PodCIDRPoolExhausted Event for n3", Duration::from_secs(15), || async {
            let list = events.list(&ListParams::default()).await?;
            Ok(list.items.into_iter().find(|e| {
                e.reason.as_deref() == Some("PodCIDRPoolExhausted")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("n3")
            }))
        })
        .await?;
        // ... and `kubectl describe` finds it on the (cluster-scoped) node.
        let out = cp.kubectl()?.args(["describe", "ciliumnode", "n3"]).output()?;
        let described = String::from_utf8_lossy(&out.stdout);
        ensure!(described.contains("PodCIDRPoolExhausted"), "kubectl describe ciliumnode n3:\n{described}");
        let text = op.metrics()?;
        ensure!(
            sample_value(&text, "cilium_operator_ipam_exhausted_total{family=\"ipv4\"}").unwrap_or(0.0) >= 1.0,
            "{text}"
        );
        ensure!(
            sample_value(&text, "cilium_operator_ipam_pool_available{pool=\"10.10.0.0/23\",family=\"ipv4\"}")
                == Some(0.0),
            "{text}"
        );
        ensure!(sample_value(&text, "cilium_operator_ipam_nodes_waiting") == Some(1.0), "{text}");
        ensure!(op.proc.log_text().contains("allocator full"), "no exhaustion warning in the log");

        // Extend the pool list (append) and restart: n3 recovers.
        op.stop()?;
        // Meanwhile another writer (as upstream's operator writes it, an
        // update under its own field manager) leaves an error on n3: ours
        // must clear it all the same.
        let stale = serde_json::json!({ "status": { "ipam": { "operator-status": { "error": "stale error from upstream" } } } });
        let other =
            kube::api::PatchParams { field_manager: Some("cilium-operator-generic".into()), ..Default::default() };
        cns.patch_status("n3", &other, &kube::api::Patch::Merge(&stale)).await?;
        ensure!(operator_error(&cns.get("n3").await?).as_deref() == Some("stale error from upstream"));
        let mut op2 = Operator::start(
            &cp,
            "operator-ipam-2",
            "kube-system",
            &["--cluster-pool-ipv4-cidr=10.10.0.0/23,10.20.0.0/24".into(), small_pool[1].clone(), gc.clone()],
        )?;
        op2.wait_healthy(Duration::from_secs(60))?;
        ensure!(wait_cidr(&cns, "n3").await? == "10.20.0.0/24");
        eventually("n3's error cleared", Duration::from_secs(15), || async {
            Ok(operator_error(&cns.get("n3").await?).is_none().then_some(()))
        })
        .await?;
        ensure!(cns.get("n1").await?.pod_cidrs() == [c1.clone()], "n1 lost its CIDR across the restart");
        ensure!(cns.get("n2").await?.pod_cidrs() == [c2.clone()], "n2 lost its CIDR across the restart");

        // Refusals: outside every pool, and a CIDR another node holds.
        cns.create(&pp, &cilium_node("outsider", &["192.168.77.0/24"])).await?;
        let e = wait_error(&cns, "outsider", "192.168.77.0/24").await?;
        ensure!(e.contains("not inside any IPv4 pool"), "{e}");
        cns.create(&pp, &cilium_node("dup", &[c2.as_str()])).await?;
        let e = wait_error(&cns, "dup", "already allocated").await?;
        ensure!(e.contains("node n2"), "{e}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        ensure!(cns.get("outsider").await?.pod_cidrs() == ["192.168.77.0/24"], "outsider was re-assigned");
        ensure!(cns.get("dup").await?.pod_cidrs() == [c2.clone()], "dup was re-assigned");

        // Node n1 deleted -> CiliumNode GC (two runs) -> CIDR reused by n4.
        nodes.delete("n1", &DeleteParams::default()).await?;
        eventually("CiliumNode n1 collected", Duration::from_secs(30), || async {
            Ok(cns.get_opt("n1").await?.is_none().then_some(()))
        })
        .await?;
        cns.create(&pp, &cilium_node("n4", &[])).await?;
        let c4 = wait_cidr(&cns, "n4").await?;
        ensure!(c4 == c1, "n4 got {c4}, expected n1's released {c1}");
        assert_no_duplicates(&all_pod_cidrs(&cns).await?.into_iter().filter(|(n, _)| n != "dup").collect())?;
        let text = op2.metrics()?;
        ensure!(sample_value(&text, "cilium_operator_ipam_nodes_gc_deleted_total").unwrap_or(0.0) >= 1.0, "{text}");
        ensure!(!op2.proc.log_text().contains("panicked"), "operator panicked");

        // Removing a pool in use is refused: n2 keeps 10.10.x, gets an error
        // naming it, and the operator says why in one log line.
        op2.stop()?;
        let mut op3 = Operator::start(
            &cp,
            "operator-ipam-3",
            "kube-system",
            &["--cluster-pool-ipv4-cidr=10.20.0.0/24".into(), small_pool[1].clone(), gc.clone()],
        )?;
        op3.wait_healthy(Duration::from_secs(60))?;
        let e = wait_error(&cns, "n2", &c2).await?;
        ensure!(e.contains("not inside any IPv4 pool"), "{e}");
        ensure!(cns.get("n2").await?.pod_cidrs() == [c2.clone()], "n2 was re-assigned after its pool was removed");
        eventually("the removed-pool log line", Duration::from_secs(10), || async {
            Ok(op3.proc.log_text().contains("pools can only be extended by appending").then_some(()))
        })
        .await?;
        anyhow::Ok(())
    });
    result.map_err(|e| e.context(cp.log_tails(25)))
}

/// Two replicas, a burst of 500 CiliumNodes, and the leader killed with
/// SIGKILL three times mid-burst: every node ends with a CIDR, no CIDR is
/// held twice, no replica panics. Short lease timings keep the test fast
/// (takeover timing itself is tested in the skeleton tests).
pub fn failover_chaos_burst(_shared: &ControlPlane) -> anyhow::Result<()> {
    const NODES: usize = 2000;
    const KILLS: usize = 10;
    let cp = ControlPlane::start(Options::default())?;
    let flags: Vec<String> = [
        "--cluster-pool-ipv4-cidr=10.0.0.0/12",
        "--cluster-pool-ipv4-mask-size=24",
        "--leader-election-lease-duration=4s",
        "--leader-election-renew-deadline=3s",
        "--leader-election-retry-period=1s",
    ]
    .map(String::from)
    .to_vec();
    let mut replicas = vec![
        Operator::start(&cp, "chaos-0", "kube-system", &flags)?,
        Operator::start(&cp, "chaos-1", "kube-system", &flags)?,
    ];
    for r in &mut replicas {
        r.wait_healthy(Duration::from_secs(60))?;
    }
    let mut started = 2;
    let result = block_on(async {
        let client = cp.client().await?;
        let cns: Api<CiliumNode> = Api::all(client.clone());
        let creator = {
            let cns = cns.clone();
            tokio::spawn(async move {
                use futures::StreamExt;
                futures::stream::iter(0..NODES)
                    .map(|i| {
                        let cns = cns.clone();
                        async move {
                            cns.create(&PostParams::default(), &cilium_node(&format!("chaos-{i:04}"), &[]))
                                .await
                        }
                    })
                    .buffer_unordered(8)
                    .collect::<Vec<_>>()
                    .await
            })
        };
        for kill in 0..KILLS {
            // Let some allocation happen under this leader, then kill it.
            let target = (kill + 1) * NODES / (KILLS + 2);
            eventually(&format!("{target} nodes with CIDRs"), Duration::from_secs(60), || async {
                let n = all_pod_cidrs(&cns).await?.values().filter(|c| !c.is_empty()).count();
                Ok((n >= target).then_some(()))
            })
            .await?;
            let leader = eventually("a leader", Duration::from_secs(30), || {
                let idx = replicas.iter().position(|r| r.is_leader());
                async move { Ok(idx) }
            })
            .await?;
            // Alternately a clean SIGTERM (duties drain, then the lease is
            // released) and a kill -9 (the lease expires).
            let sig = if kill % 2 == 0 { libc::SIGTERM } else { libc::SIGKILL };
            replicas[leader].proc.signal(sig);
            replicas[leader].proc.wait_exit(Duration::from_secs(30)).context("stopped leader still running")?;
            let mid = all_pod_cidrs(&cns).await?;
            assert_no_duplicates(&mid).with_context(|| format!("after leader stop {}", kill + 1))?;
            let old = replicas.remove(leader);
            ensure!(!old.proc.log_text().contains("panicked"), "{} panicked", old.proc.name);
            let mut fresh = Operator::start(&cp, &format!("chaos-{started}"), "kube-system", &flags)?;
            started += 1;
            fresh.wait_healthy(Duration::from_secs(60))?;
            replicas.push(fresh);
        }
        let created = creator.await?;
        let failed: Vec<String> = created.into_iter().filter_map(|r| r.err().map(|e| e.to_string())).collect();
        ensure!(failed.is_empty(), "creating CiliumNodes failed: {failed:?}");
        let final_state = eventually("every node with a CIDR", Duration::from_secs(120), || async {
            let all = all_pod_cidrs(&cns).await?;
            Ok((all.len() == NODES && all.values().all(|c| c.len() == 1)).then_some(all))
        })
        .await?;
        assert_no_duplicates(&final_state)?;
        for r in &replicas {
            ensure!(!r.proc.log_text().contains("panicked"), "{} panicked", r.proc.name);
        }
        eprintln!(
            "failover chaos: {NODES} nodes, {KILLS} leader stops (SIGTERM and kill -9 alternately) survived, all allocated, 0 duplicates"
        );
        anyhow::Ok(())
    });
    result.map_err(|e| e.context(cp.log_tails(15)))
}

/// CiliumNodes any agent (or user) can write: duplicates in the list, a
/// wrong mask, host bits, a node being deleted while the operator
/// restarts, a node changing its CIDRs. The operator never panics, and no
/// new node ever gets a CIDR that overlaps anything another node shows.
pub fn odd_nodes_never_get_overlapping_cidrs(_shared: &ControlPlane) -> anyhow::Result<()> {
    let cp = ControlPlane::start(Options::default())?;
    let pool = vec!["--cluster-pool-ipv4-cidr=10.30.0.0/21".to_string(), "--cluster-pool-ipv4-mask-size=24".into()];
    let mut op = Operator::start(&cp, "operator-odd-1", "kube-system", &pool)?;
    op.wait_healthy(Duration::from_secs(60))?;
    let result = block_on(async {
        let client = cp.client().await?;
        let cns: Api<CiliumNode> = Api::all(client.clone());
        let pp = PostParams::default();
        // [A, B, A]: the first agent's panic. Accepted (written back once).
        cns.create(&pp, &cilium_node("dups", &["10.30.0.0/24", "10.30.1.0/24", "10.30.0.0/24"])).await?;
        // A /23 with mask /24: refused, but both /24s inside stay in use.
        cns.create(&pp, &cilium_node("wide", &["10.30.2.0/23"])).await?;
        wait_error(&cns, "wide", "does not have the per-node mask size").await?;
        // Host bits: read as 10.30.4.0/24, as upstream reads it.
        cns.create(&pp, &cilium_node("hostbits", &["10.30.4.9/24"])).await?;
        eventually("hostbits read as 10.30.4.0/24", Duration::from_secs(20), || async {
            Ok((cns.get("hostbits").await?.pod_cidrs() == ["10.30.4.0/24"]).then_some(()))
        })
        .await?;
        eventually("dups written back without the repeat", Duration::from_secs(20), || async {
            Ok((cns.get("dups").await?.pod_cidrs() == ["10.30.0.0/24", "10.30.1.0/24"]).then_some(()))
        })
        .await?;
        // A node being deleted (a finalizer holds it) still uses its CIDR.
        let mut term = cilium_node("terminating", &["10.30.5.0/24"]);
        term.metadata.finalizers = Some(vec!["example.com/hold".into()]);
        cns.create(&pp, &term).await?;
        cns.delete("terminating", &DeleteParams::default()).await?;
        anyhow::Ok(())
    });
    result?;
    // A restart: the terminating node is seen only in the relist.
    op.stop()?;
    let mut op = Operator::start(&cp, "operator-odd-2", "kube-system", &pool)?;
    op.wait_healthy(Duration::from_secs(60))?;
    let result = block_on(async {
        let client = cp.client().await?;
        let cns: Api<CiliumNode> = Api::all(client.clone());
        let pp = PostParams::default();
        for n in ["f1", "f2", "f3"] {
            cns.create(&pp, &cilium_node(n, &[])).await?;
        }
        let got: BTreeSet<String> = [wait_cidr(&cns, "f1").await?, wait_cidr(&cns, "f2").await?].into_iter().collect();
        ensure!(got == ["10.30.6.0/24", "10.30.7.0/24"].map(String::from).into(), "fresh nodes got {got:?}");
        ensure!(wait_error(&cns, "f3", "allocator full").await? == "allocator full");
        // A node changing its CIDRs is refused; it keeps the old one reserved.
        let mut f1 = cns.get("f1").await?;
        f1.spec.ipam.as_mut().context("ipam")?.pod_cidrs = Some(vec!["10.30.3.0/24".into()]);
        f1.metadata.managed_fields = None;
        cns.replace("f1", &PostParams::default(), &f1).await?;
        wait_error(&cns, "f1", "conflict with requested CIDRs").await?;
        // The terminating node goes: its CIDR is free for f3.
        let patch = json!({ "metadata": { "finalizers": null } });
        cns.patch("terminating", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await?;
        ensure!(wait_cidr(&cns, "f3").await? == "10.30.5.0/24", "f3 did not get the freed CIDR");
        let all = all_pod_cidrs(&cns).await?;
        // Overlaps between what nodes show, beyond what they wrote themselves.
        let ranges: Vec<(String, cilium_ipam::Cidr)> = all
            .iter()
            .flat_map(|(n, cs)| {
                cs.iter().filter_map(|c| cilium_ipam::parse_pod_cidr(c).ok()).map(move |c| (n.clone(), c))
            })
            .collect();
        for (i, (n1, c1)) in ranges.iter().enumerate() {
            for (n2, c2) in &ranges[i + 1..] {
                let written_by_test = |n: &str| ["wide", "f1"].contains(&n);
                ensure!(
                    n1 == n2 || !c1.overlaps(c2) || written_by_test(n1) || written_by_test(n2),
                    "{n1} {c1} overlaps {n2} {c2}"
                );
            }
        }
        ensure!(op.is_leader(), "the operator lost its health or leadership");
        anyhow::Ok(())
    });
    result.map_err(|e| e.context(cp.log_tails(20)))
}
