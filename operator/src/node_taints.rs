//! Node taints and the CiliumIsUp condition, as upstream's operator: once a
//! Cilium agent pod (`cilium-pod-labels` in `cilium-pod-namespace`) on a
//! node is Ready, the `agent-not-ready-taint-key` taint goes
//! (`remove-cilium-node-taints`) and the node gets `NetworkUnavailable=False`
//! with reason `CiliumIsUp` (`set-cilium-is-up-condition`); while the agent
//! pod on a node is not Ready, the node gets the taint with effect
//! NoSchedule (`set-cilium-node-taints`). A node without an agent pod is
//! left alone.
//!
//! Event-driven: each change of a node or an agent pod checks that one
//! node. Taints are written with a JSON patch that tests the list it read
//! (as upstream), so a concurrent writer makes it read again, never lose a
//! taint someone else added.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::NodeTaintConfig;
use crate::run::Context;

/// Reason of the NetworkUnavailable=False condition (upstream's).
pub const CILIUM_IS_UP: &str = "CiliumIsUp";

/// What to do to a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    RemoveTaint,
    AddTaint,
    SetCiliumIsUp,
}

/// Whether the node's conditions already say Cilium is up.
pub fn has_cilium_is_up(node: &Node) -> bool {
    node.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .any(|c| c.type_ == "NetworkUnavailable" && c.status == "False" && c.reason.as_deref() == Some(CILIUM_IS_UP))
}

fn has_taint(node: &Node, key: &str) -> bool {
    node.spec.iter().flat_map(|s| s.taints.iter().flatten()).any(|t| t.key == key)
}

/// Whether a pod's Ready condition is True.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status.iter().flat_map(|s| s.conditions.iter().flatten()).any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The actions for one node, pure. `agent`: None when no agent pod is
/// scheduled on it, else whether one of them is Ready.
pub fn decide(node: &Node, agent: Option<bool>, cfg: &NodeTaintConfig) -> Vec<Action> {
    let mut out = Vec::new();
    match agent {
        Some(true) => {
            if cfg.remove_taint && has_taint(node, &cfg.taint_key) {
                out.push(Action::RemoveTaint);
            }
            if cfg.set_is_up_condition && !has_cilium_is_up(node) {
                out.push(Action::SetCiliumIsUp);
            }
        }
        Some(false) if cfg.set_taint && !has_taint(node, &cfg.taint_key) => out.push(Action::AddTaint),
        // No agent pod on the node, or tainted already.
        _ => {}
    }
    out
}

/// The JSON patch that makes the node's taints `want`, valid only while
/// they are still what was read (`test`).
pub fn taints_patch(node: &Node, want: &[Taint]) -> serde_json::Value {
    match node.spec.as_ref().and_then(|s| s.taints.as_ref()) {
        Some(now) => json!([
            { "op": "test", "path": "/spec/taints", "value": now },
            { "op": "replace", "path": "/spec/taints", "value": want },
        ]),
        None => json!([{ "op": "add", "path": "/spec/taints", "value": want }]),
    }
}

/// The node's taints after `action` (RemoveTaint / AddTaint).
pub fn taints_after(node: &Node, action: &Action, key: &str) -> Vec<Taint> {
    let mut taints: Vec<Taint> = node.spec.iter().flat_map(|s| s.taints.iter().flatten()).cloned().collect();
    match action {
        Action::RemoveTaint => taints.retain(|t| t.key != key),
        Action::AddTaint => {
            taints.push(Taint { key: key.to_string(), effect: "NoSchedule".into(), ..Default::default() })
        }
        Action::SetCiliumIsUp => {}
    }
    taints
}

async fn apply(nodes: &Api<Node>, node: &Node, action: &Action, key: &str) -> kube::Result<()> {
    let name = node.metadata.name.as_deref().unwrap_or_default();
    match action {
        Action::RemoveTaint | Action::AddTaint => {
            let patch = taints_patch(node, &taints_after(node, action, key));
            let patch: json_patch::Patch = serde_json::from_value(patch).expect("a JSON patch");
            nodes.patch(name, &PatchParams::default(), &Patch::<()>::Json(patch)).await?;
        }
        Action::SetCiliumIsUp => {
            let now = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
            let body = json!({ "status": { "conditions": [{
                "type": "NetworkUnavailable", "status": "False", "reason": CILIUM_IS_UP,
                "message": "Cilium is running on this node", "lastTransitionTime": now, "lastHeartbeatTime": now,
            }]}});
            nodes.patch_status(name, &PatchParams::default(), &Patch::Strategic(body)).await?;
        }
    }
    Ok(())
}

/// Agent pods by node: whether any is Ready.
fn agents_by_node(pods: &Store<Pod>) -> BTreeMap<String, bool> {
    let mut out: BTreeMap<String, bool> = BTreeMap::new();
    for p in pods.state() {
        let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) else { continue };
        let ready = pod_ready(&p) && p.metadata.deletion_timestamp.is_none();
        *out.entry(node).or_default() |= ready;
    }
    out
}

pub async fn run(ctx: Context, stop: CancellationToken) -> anyhow::Result<()> {
    let cfg = ctx.config.node_taints.clone();
    if !cfg.remove_taint && !cfg.set_taint && !cfg.set_is_up_condition {
        tracing::info!("node taints and the CiliumIsUp condition are off");
        return Ok(());
    }
    let nodes_api: Api<Node> = Api::all(ctx.client.clone());
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &cfg.pod_namespace);
    let (node_reader, node_writer) = reflector::store();
    let (pod_reader, pod_writer) = reflector::store();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    // Node changes check that node; agent pod changes check theirs.
    let ntx = tx.clone();
    let node_stream = reflector::reflector(node_writer, watcher(nodes_api.clone(), watcher::Config::default()))
        .default_backoff()
        .touched_objects()
        .for_each(move |n| {
            if let Ok(n) = n
                && let Some(name) = n.metadata.name
            {
                let _ = ntx.send(name);
            }
            futures::future::ready(())
        });
    let pod_cfg = watcher::Config::default().labels(&cfg.pod_labels);
    let ptx = tx.clone();
    let pod_stream = reflector::reflector(pod_writer, watcher(pods_api, pod_cfg))
        .default_backoff()
        .applied_objects()
        .for_each(move |p| {
            if let Ok(p) = p
                && let Some(node) = p.spec.and_then(|s| s.node_name)
            {
                let _ = ptx.send(node);
            }
            futures::future::ready(())
        });
    let streams = tokio::spawn(async move { tokio::join!(node_stream, pod_stream) });
    tokio::select! {
        _ = stop.cancelled() => { streams.abort(); return Ok(()) }
        r = async { node_reader.wait_until_ready().await?; pod_reader.wait_until_ready().await } => r?,
    }
    tracing::info!(
        namespace = %cfg.pod_namespace, selector = %cfg.pod_labels, remove = cfg.remove_taint, set = cfg.set_taint,
        is_up = cfg.set_is_up_condition, "node taint duty running"
    );
    // Every node once, then as they change.
    for n in node_reader.state() {
        if let Some(name) = n.metadata.name.clone() {
            let _ = tx.send(name);
        }
    }
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => break,
            n = rx.recv() => match n { Some(n) => n, None => break },
        };
        let mut names = BTreeSet::from([first]);
        while let Ok(n) = rx.try_recv() {
            names.insert(n);
        }
        let agents = agents_by_node(&pod_reader);
        for name in names {
            let Some(node) = node_reader.get(&reflector::ObjectRef::new(&name)) else { continue };
            for action in decide(&node, agents.get(&name).copied(), &cfg) {
                match apply(&nodes_api, &node, &action, &cfg.taint_key).await {
                    Ok(()) => tracing::info!(node = %name, action = ?action, "node marked"),
                    Err(e) => {
                        // A concurrent change (the test op failed) or the
                        // server: read it again shortly.
                        tracing::warn!(node = %name, action = ?action, error = %e, "marking the node failed; retrying");
                        let tx = tx.clone();
                        let name = name.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            let _ = tx.send(name);
                        });
                        break;
                    }
                }
            }
        }
    }
    streams.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NodeTaintConfig {
        NodeTaintConfig {
            remove_taint: true,
            set_taint: true,
            set_is_up_condition: true,
            taint_key: "node.cilium.io/agent-not-ready".into(),
            pod_labels: "k8s-app=cilium".into(),
            pod_namespace: "kube-system".into(),
        }
    }

    fn node(taints: serde_json::Value, conditions: serde_json::Value) -> Node {
        serde_json::from_value(json!({"metadata": {"name": "n1"}, "spec": {"taints": taints},
                                      "status": {"conditions": conditions}}))
        .unwrap()
    }

    const TAINT: &str = r#"[{"key": "node.cilium.io/agent-not-ready", "effect": "NoExecute"},
                             {"key": "other", "effect": "NoSchedule"}]"#;

    #[test]
    fn a_ready_agent_removes_the_taint_and_sets_cilium_is_up() {
        let n = node(serde_json::from_str(TAINT).unwrap(), json!([]));
        assert_eq!(decide(&n, Some(true), &cfg()), vec![Action::RemoveTaint, Action::SetCiliumIsUp]);
        let after = taints_after(&n, &Action::RemoveTaint, &cfg().taint_key);
        assert_eq!(after.iter().map(|t| t.key.as_str()).collect::<Vec<_>>(), vec!["other"], "only ours goes");
        let p = taints_patch(&n, &after);
        assert_eq!(p[0]["op"], "test", "the list read is tested: a concurrent change fails the patch");
        assert_eq!(p[1]["value"].as_array().unwrap().len(), 1);
        // Done: nothing more.
        let done = node(
            json!([{"key": "other", "effect": "NoSchedule"}]),
            json!([{"type": "NetworkUnavailable", "status": "False", "reason": "CiliumIsUp"}]),
        );
        assert!(decide(&done, Some(true), &cfg()).is_empty());
    }

    #[test]
    fn a_not_ready_agent_taints_only_when_asked_and_no_agent_changes_nothing() {
        let n = node(json!(null), json!([]));
        assert_eq!(decide(&n, Some(false), &cfg()), vec![Action::AddTaint]);
        let after = taints_after(&n, &Action::AddTaint, &cfg().taint_key);
        assert_eq!((after[0].key.as_str(), after[0].effect.as_str()), ("node.cilium.io/agent-not-ready", "NoSchedule"));
        assert_eq!(taints_patch(&n, &after)[0]["op"], "add", "no taints yet: added");
        let off = NodeTaintConfig { set_taint: false, ..cfg() };
        assert!(decide(&n, Some(false), &off).is_empty(), "set-cilium-node-taints=false (upstream default)");
        let tainted = node(serde_json::from_str(TAINT).unwrap(), json!([]));
        assert!(decide(&tainted, None, &cfg()).is_empty(), "no agent pod on the node: left alone");
        assert!(decide(&tainted, Some(false), &cfg()).is_empty(), "already tainted");
    }

    #[test]
    fn another_reason_is_not_cilium_is_up() {
        let n = node(json!([]), json!([{"type": "NetworkUnavailable", "status": "False", "reason": "RouteCreated"}]));
        assert_eq!(decide(&n, Some(true), &cfg()), vec![Action::SetCiliumIsUp]);
    }
}
