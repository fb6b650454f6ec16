//! CiliumEndpoint GC through the real operator, on control planes of their
//! own without kube-controller-manager (so only our GC deletes anything).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::ensure;
use cilium_crds::{CiliumEndpoint, CiliumNode};
use e2e::{ControlPlane, Operator, Options, block_on, eventually};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const NS: &str = "gc-test";

pub fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": NS },
        "spec": { "containers": [{ "name": "c", "image": "example/app" }] }
    }))
    .expect("pod")
}

/// A CEP named `name` owned by (`apiVersion`, `kind`, `name`, `uid`).
pub fn cep(name: &str, owner: Option<(&str, &str, &str, &str)>) -> CiliumEndpoint {
    let mut meta = json!({ "name": name, "namespace": NS });
    if let Some((api, kind, oname, uid)) = owner {
        meta["ownerReferences"] = json!([{ "apiVersion": api, "kind": kind, "name": oname, "uid": uid }]);
    }
    serde_json::from_value(json!({ "metadata": meta })).expect("cep")
}

pub async fn set_phase(pods: &Api<Pod>, name: &str, phase: &str) -> anyhow::Result<()> {
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(json!({ "status": { "phase": phase } }))).await?;
    Ok(())
}

async fn cep_names(ceps: &Api<CiliumEndpoint>) -> anyhow::Result<BTreeSet<String>> {
    Ok(ceps.list(&ListParams::default()).await?.items.into_iter().filter_map(|c| c.metadata.name).collect())
}

fn gc_runs(op: &Operator) -> f64 {
    op.metric("cilium_operator_endpoint_gc_runs_total").unwrap_or(0.0)
}

async fn wait_runs(op: &Operator, at_least: f64) -> anyhow::Result<()> {
    eventually(&format!("{at_least} endpoint GC passes"), Duration::from_secs(30), || async {
        Ok((gc_runs(op) >= at_least).then_some(()))
    })
    .await
}

async fn make_namespace(client: &kube::Client) -> anyhow::Result<()> {
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": NS } }))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    Ok(())
}

/// Orphaned CEPs end exactly as specified: pod deleted / Succeeded / Failed
/// -> deleted; pod running, pod re-created under the same name (CEP owned by
/// the new UID), CEP owned by a live CiliumNode, other owner kinds, no owner
/// -> kept.
pub fn orphans_end_as_specified(_shared: &ControlPlane) -> anyhow::Result<()> {
    let cp = ControlPlane::start(Options::default())?;
    let mut op = Operator::start(&cp, "operator-cepgc", "kube-system", &["--cilium-endpoint-gc-interval=2s".into()])?;
    op.wait_healthy(Duration::from_secs(60))?;
    let result = block_on(async {
        let client = cp.client().await?;
        make_namespace(&client).await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
        let ceps: Api<CiliumEndpoint> = Api::namespaced(client.clone(), NS);
        let pp = PostParams::default();
        let mut uids = std::collections::BTreeMap::new();
        for name in ["running", "succeeded", "failed", "deleted", "recreated", "ownerless-with-pod"] {
            let p = pods.create(&pp, &pod(name)).await?;
            uids.insert(name, p.metadata.uid.unwrap_or_default());
        }
        set_phase(&pods, "running", "Running").await?;
        set_phase(&pods, "succeeded", "Succeeded").await?;
        set_phase(&pods, "failed", "Failed").await?;
        // Re-create "recreated": its CEP names the new pod's UID.
        pods.delete("recreated", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await?;
        eventually("old pod gone", Duration::from_secs(10), || async {
            Ok(pods.get_opt("recreated").await?.is_none().then_some(()))
        })
        .await?;
        let new = pods.create(&pp, &pod("recreated")).await?;
        set_phase(&pods, "recreated", "Running").await?;
        let new_uid = new.metadata.uid.unwrap_or_default();
        ensure!(new_uid != uids["recreated"], "re-created pod kept its UID");

        let cn: CiliumNode = serde_json::from_value(json!({ "metadata": { "name": "node-a" }, "spec": {} }))?;
        let cn = Api::<CiliumNode>::all(client.clone()).create(&pp, &cn).await?;
        let cn_uid = cn.metadata.uid.unwrap_or_default();
        for name in ["running", "succeeded", "failed", "deleted"] {
            ceps.create(&pp, &cep(name, Some(("v1", "Pod", name, &uids[name])))).await?;
        }
        ceps.create(&pp, &cep("recreated", Some(("v1", "Pod", "recreated", &new_uid)))).await?;
        ceps.create(&pp, &cep("node-owned", Some(("cilium.io/v2", "CiliumNode", "node-a", &cn_uid)))).await?;
        ceps.create(&pp, &cep("deployment-owned", Some(("apps/v1", "Deployment", "d", "0000")))).await?;
        // Without ownerReference: judged by the Pod of the same name (upstream).
        ceps.create(&pp, &cep("no-owner", None)).await?;
        ceps.create(&pp, &cep("ownerless-with-pod", None)).await?;
        pods.delete("deleted", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await?;

        let expected: BTreeSet<String> =
            ["running", "recreated", "node-owned", "deployment-owned", "ownerless-with-pod"].map(String::from).into();
        eventually("orphans deleted", Duration::from_secs(30), || async {
            Ok((cep_names(&ceps).await? == expected).then_some(()))
        })
        .await?;
        // Several more passes change nothing.
        let runs = gc_runs(&op);
        wait_runs(&op, runs + 2.0).await?;
        ensure!(cep_names(&ceps).await? == expected, "a kept CEP was deleted later: {:?}", cep_names(&ceps).await?);
        let text = op.metrics()?;
        ensure!(text.contains("cilium_operator_endpoint_gc_objects_total{outcome=\"success\"} 4"), "{text}");
        anyhow::Ok(())
    });
    result.map_err(|e| e.context(cp.log_tails(20)))
}

/// kube-apiserver stopped and started on the same etcd mid-run: the watches
/// resume without an operator restart, nothing is deleted wrongly, and a pod
/// deleted after the restart still gets its CEP collected.
pub fn survives_apiserver_restart(_shared: &ControlPlane) -> anyhow::Result<()> {
    let mut cp = ControlPlane::start(Options::default())?;
    let flags: Vec<String> = [
        "--cilium-endpoint-gc-interval=2s",
        // Long enough that the lease survives the API server's downtime.
        "--leader-election-lease-duration=90s",
        "--leader-election-renew-deadline=60s",
        "--leader-election-retry-period=2s",
    ]
    .map(String::from)
    .to_vec();
    let mut op = Operator::start(&cp, "operator-cepgc-restart", "kube-system", &flags)?;
    op.wait_healthy(Duration::from_secs(60))?;
    let setup = block_on(async {
        let client = cp.client().await?;
        make_namespace(&client).await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
        let ceps: Api<CiliumEndpoint> = Api::namespaced(client.clone(), NS);
        for i in 0..20 {
            let name = format!("p{i}");
            let p = pods.create(&PostParams::default(), &pod(&name)).await?;
            set_phase(&pods, &name, "Running").await?;
            let uid = p.metadata.uid.unwrap_or_default();
            ceps.create(&PostParams::default(), &cep(&name, Some(("v1", "Pod", &name, &uid)))).await?;
        }
        wait_runs(&op, gc_runs(&op) + 2.0).await?;
        ensure!(cep_names(&ceps).await?.len() == 20);
        anyhow::Ok(())
    });
    setup.map_err(|e| e.context(cp.log_tails(20)))?;

    let before = gc_runs(&op);
    cp.restart_apiserver()?;
    let result = block_on(async {
        let client = cp.client().await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
        let ceps: Api<CiliumEndpoint> = Api::namespaced(client.clone(), NS);
        // GC resumes (passes continue after the restart) ...
        wait_runs(&op, before + 3.0).await?;
        ensure!(cep_names(&ceps).await?.len() == 20, "a CEP was deleted wrongly across the restart");
        // ... and still sees deletions.
        for i in 0..5 {
            pods.delete(&format!("p{i}"), &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
                .await?;
        }
        eventually("CEPs of the 5 deleted pods collected", Duration::from_secs(30), || async {
            let names = cep_names(&ceps).await?;
            Ok((names.len() == 15 && (0..5).all(|i| !names.contains(&format!("p{i}")))).then_some(()))
        })
        .await?;
        ensure!(op.proc.try_exit().is_none(), "the operator exited across the restart");
        anyhow::Ok(())
    });
    result.map_err(|e| e.context(cp.log_tails(20)))
}

/// `--cilium-endpoint-gc-interval=0`: one pass (upstream deletes every CEP
/// once; a documented difference, see README):
/// once the caches have synced, then none.
pub fn interval_zero_runs_once(cp: &ControlPlane) -> anyhow::Result<()> {
    let ns = "e2e-gc-once";
    let out = cp.kubectl()?.args(["create", "namespace", ns]).output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut op = Operator::start(cp, "operator-gc-once", ns, &["--cilium-endpoint-gc-interval=0".into()])?;
    op.wait_healthy(Duration::from_secs(60))?;
    block_on(wait_runs(&op, 1.0))?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(gc_runs(&op) == 1.0, "expected exactly one pass, saw {}", gc_runs(&op));
    ensure!(op.proc.log_text().contains("ran once"), "{}", op.proc.log_text());
    Ok(())
}
