//! The operator's node duties through the real operator and API server:
//! the agent-not-ready taint and the CiliumIsUp condition follow the
//! readiness of the Cilium agent pod on each node, and pods started before
//! Cilium managed their node are restarted.

use std::time::{Duration, Instant};

use anyhow::ensure;
use cilium_crds::CiliumEndpoint;
use e2e::{ControlPlane, Operator, Options, block_on, eventually};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const TAINT: &str = "node.cilium.io/agent-not-ready";

/// A pod bound to `node` (or none) with `labels`; Running with Ready as
/// given, started `age` ago (the status a kubelet would write).
pub async fn pod(
    client: &kube::Client,
    ns: &str,
    name: &str,
    node: Option<&str>,
    labels: serde_json::Value,
    host_network: bool,
) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut spec = json!({ "containers": [{ "name": "c", "image": "example/app" }], "hostNetwork": host_network });
    if let Some(n) = node {
        spec["nodeName"] = json!(n);
    }
    let p: Pod = serde_json::from_value(
        json!({ "metadata": { "name": name, "namespace": ns, "labels": labels }, "spec": spec }),
    )?;
    pods.create(&PostParams::default(), &p).await?;
    Ok(())
}

pub async fn set_status(client: &kube::Client, ns: &str, name: &str, ready: bool, age: Duration) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let started = jiff::Timestamp::now() - jiff::SignedDuration::try_from(age)?;
    let started = started.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let body = json!({ "status": { "phase": "Running", "startTime": started, "conditions": [
        { "type": "Ready", "status": if ready { "True" } else { "False" } }] } });
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(body)).await?;
    Ok(())
}

/// The node's taints but those kube-controller-manager adds to nodes
/// without a kubelet (`node.kubernetes.io/*`).
pub fn taints(n: &Node) -> Vec<(String, String)> {
    n.spec
        .iter()
        .flat_map(|s| s.taints.iter().flatten())
        .filter(|t| !t.key.starts_with("node.kubernetes.io/"))
        .map(|t| (t.key.clone(), t.effect.clone()))
        .collect()
}

pub fn cilium_is_up(n: &Node) -> bool {
    n.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .any(|c| c.type_ == "NetworkUnavailable" && c.status == "False" && c.reason.as_deref() == Some("CiliumIsUp"))
}

/// n1 registers with the NoExecute taint (as a kubelet with
/// `--register-with-taints`) and another taint of its own; its agent pod
/// becomes Ready: our taint goes (the other stays) and NetworkUnavailable
/// turns False with reason CiliumIsUp. n2's agent pod is not Ready: with
/// `--set-cilium-node-taints` it gets the taint (NoSchedule), which goes
/// when the pod turns Ready. n3 has no agent pod: untouched. Then the
/// restarter: a kube-dns pod without a CiliumEndpoint, older than 30 s, is
/// deleted once; one with an endpoint, one on the host network and a young
/// one stay.
pub fn agent_readiness_drives_taints_and_condition(_shared: &ControlPlane) -> anyhow::Result<()> {
    let cp = ControlPlane::start(Options::default())?;
    let mut op = Operator::start(
        &cp,
        "operator-nodes",
        "kube-system",
        &["--set-cilium-node-taints=true".into(), "--unmanaged-pod-watcher-interval=1".into()],
    )?;
    op.wait_healthy(Duration::from_secs(60))?;
    let result = block_on(async {
        let client = cp.client().await?;
        let nodes: Api<Node> = Api::all(client.clone());
        let pp = PostParams::default();
        let tainted = |extra: bool| {
            let mut t = vec![json!({ "key": TAINT, "effect": "NoExecute" })];
            if extra {
                t.push(json!({ "key": "example.com/maintenance", "effect": "NoSchedule" }));
            }
            t
        };
        for (name, t) in [("n1", tainted(true)), ("n2", vec![]), ("n3", tainted(false))] {
            let n: Node = serde_json::from_value(json!({ "metadata": { "name": name }, "spec": { "taints": t } }))?;
            nodes.create(&pp, &n).await?;
        }
        let agent = json!({ "k8s-app": "cilium" });
        pod(&client, "kube-system", "cilium-n1", Some("n1"), agent.clone(), true).await?;
        pod(&client, "kube-system", "cilium-n2", Some("n2"), agent.clone(), true).await?;
        set_status(&client, "kube-system", "cilium-n2", false, Duration::from_secs(5)).await?;
        let t0 = Instant::now();
        set_status(&client, "kube-system", "cilium-n1", true, Duration::from_secs(5)).await?;
        let n1_done = eventually("n1 untainted and CiliumIsUp", Duration::from_secs(20), || async {
            let n = nodes.get("n1").await?;
            Ok((taints(&n) == vec![("example.com/maintenance".to_string(), "NoSchedule".to_string())]
                && cilium_is_up(&n))
            .then_some(()))
        })
        .await;
        if let Err(e) = n1_done {
            let n = nodes.get("n1").await?;
            anyhow::bail!("{e:#}: n1 is {}", serde_json::to_string(&(&n.spec, &n.status))?);
        }
        let n1_after = t0.elapsed();
        eventually("n2 tainted NoSchedule", Duration::from_secs(20), || async {
            let n = nodes.get("n2").await?;
            Ok((taints(&n) == vec![(TAINT.to_string(), "NoSchedule".to_string())]).then_some(()))
        })
        .await?;
        ensure!(!cilium_is_up(&nodes.get("n2").await?), "n2's agent is not Ready, yet CiliumIsUp");
        set_status(&client, "kube-system", "cilium-n2", true, Duration::from_secs(5)).await?;
        eventually("n2 untainted and CiliumIsUp", Duration::from_secs(20), || async {
            let n = nodes.get("n2").await?;
            Ok((taints(&n).is_empty() && cilium_is_up(&n)).then_some(()))
        })
        .await?;
        let n3 = nodes.get("n3").await?;
        ensure!(
            taints(&n3) == vec![(TAINT.to_string(), "NoExecute".to_string())],
            "n3 (no agent) changed: {:?}",
            taints(&n3)
        );
        ensure!(!cilium_is_up(&n3), "n3 has no agent, yet CiliumIsUp");

        // Unmanaged pods (kube-dns), not bound to a node so that a delete
        // is immediate without a kubelet.
        // (The endpoint exists before its pod runs, as the agent writes it.)
        let cep: CiliumEndpoint =
            serde_json::from_value(json!({ "metadata": { "name": "dns-managed", "namespace": "kube-system" } }))?;
        Api::<CiliumEndpoint>::namespaced(client.clone(), "kube-system").create(&pp, &cep).await?;
        let dns = json!({ "k8s-app": "kube-dns" });
        for (name, host) in [("dns-unmanaged", false), ("dns-managed", false), ("dns-host", true), ("dns-young", false)]
        {
            pod(&client, "kube-system", name, None, dns.clone(), host).await?;
            let age = if name == "dns-young" { Duration::from_secs(1) } else { Duration::from_secs(120) };
            set_status(&client, "kube-system", name, true, age).await?;
        }
        let pods: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
        eventually("dns-unmanaged restarted", Duration::from_secs(20), || async {
            Ok(pods.get_opt("dns-unmanaged").await?.is_none().then_some(()))
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        for name in ["dns-managed", "dns-host", "dns-young"] {
            ensure!(pods.get_opt(name).await?.is_some(), "{name} was deleted");
        }
        let unmanaged = op.metric("cilium_operator_unmanaged_pods").unwrap_or(-1.0);
        ensure!(unmanaged == 1.0, "cilium_operator_unmanaged_pods = {unmanaged} (dns-young is the one left)");
        ensure!(op.metric("cilium_operator_unmanaged_pods_restarted_total") == Some(1.0), "restarts counted");
        eprintln!(
            "nodes: n1's taint removed and CiliumIsUp set {:.0} ms after its agent pod turned Ready; n2 tainted while \
             its agent was not Ready, untainted after; n3 untouched; 1 unmanaged kube-dns pod restarted, 3 left",
            n1_after.as_secs_f64() * 1000.0
        );
        anyhow::Ok(())
    });
    result.map_err(|e| e.context(op.proc.log_text()))
}
