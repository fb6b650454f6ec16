//! CiliumNode GC: deletes CiliumNodes whose Kubernetes Node is gone and that
//! have no ownerReference (an owned one is left to Kubernetes' garbage
//! collector, whatever its owner, as upstream). Two-phase like upstream: a first run
//! marks the node a candidate, a later run (`nodes-gc-interval`) deletes it
//! if its Node is still missing, with the CiliumNode's uid as precondition.
//! IPAM then releases its pod CIDRs (it watches the deletion).

use std::collections::{BTreeMap, BTreeSet};

use cilium_crds::CiliumNode;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams, Preconditions};
use tokio_util::sync::CancellationToken;

use crate::run::Context;

/// What GC knows of one CiliumNode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub uid: String,
    /// Any ownerReference: Kubernetes' garbage collector decides (upstream
    /// leaves owned CiliumNodes alone, whatever owns them).
    pub owned: bool,
}

/// One GC round, pure: returns (candidates for the next round, nodes to
/// delete now).
pub fn decide(
    nodes: &BTreeSet<String>,
    cilium_nodes: &[Candidate],
    previous: &BTreeMap<String, String>,
) -> (BTreeMap<String, String>, Vec<Candidate>) {
    let mut next = BTreeMap::new();
    let mut delete = Vec::new();
    for cn in cilium_nodes {
        if nodes.contains(&cn.name) || cn.owned {
            continue;
        }
        if previous.get(&cn.name) == Some(&cn.uid) {
            delete.push(cn.clone());
        } else {
            next.insert(cn.name.clone(), cn.uid.clone());
        }
    }
    (next, delete)
}

/// What GC looks at of a CiliumNode's metadata.
pub fn candidate(m: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Candidate {
    Candidate {
        name: m.name.unwrap_or_default(),
        uid: m.uid.unwrap_or_default(),
        owned: !m.owner_references.unwrap_or_default().is_empty(),
    }
}

pub async fn run(ctx: Context, stop: CancellationToken) -> anyhow::Result<()> {
    let interval = ctx.config.nodes_gc_interval;
    let mut candidates = BTreeMap::new();
    loop {
        match pass(&ctx, &candidates).await {
            Ok(next) => candidates = next,
            Err(e) => tracing::warn!(error = %e, "CiliumNode GC run failed; retrying next interval"),
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

async fn pass(ctx: &Context, previous: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, kube::Error> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let cilium_nodes: Api<CiliumNode> = Api::all(ctx.client.clone());
    let names: BTreeSet<String> =
        nodes.list_metadata(&ListParams::default()).await?.items.into_iter().filter_map(|n| n.metadata.name).collect();
    let cns: Vec<Candidate> = cilium_nodes
        .list_metadata(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|cn| candidate(cn.metadata))
        .collect();
    let (next, delete) = decide(&names, &cns, previous);
    for name in next.keys().filter(|n| !previous.contains_key(*n)) {
        tracing::info!(node = %name, "CiliumNode has no Node: marked for GC on the next run");
    }
    for cn in delete {
        let dp = DeleteParams {
            preconditions: Some(Preconditions { uid: Some(cn.uid.clone()), resource_version: None }),
            ..Default::default()
        };
        match cilium_nodes.delete(&cn.name, &dp).await {
            Ok(_) => {
                ctx.metrics.ipam.nodes_gc_deleted.inc();
                tracing::info!(node = %cn.name, "deleted CiliumNode whose Node is gone");
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => tracing::warn!(node = %cn.name, error = %e, "deleting CiliumNode failed"),
        }
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cn(name: &str, uid: &str, owned: bool) -> Candidate {
        Candidate { name: name.into(), uid: uid.into(), owned }
    }

    #[test]
    fn two_phase_deletion() {
        let nodes: BTreeSet<String> = ["n1".to_string()].into();
        let cns = vec![cn("n1", "u1", false), cn("n2", "u2", false), cn("n3", "u3", true)];
        let (marked, delete) = decide(&nodes, &cns, &BTreeMap::new());
        assert!(delete.is_empty(), "nothing is deleted on the first sight");
        assert_eq!(marked.keys().collect::<Vec<_>>(), vec!["n2"]);
        let (marked2, delete) = decide(&nodes, &cns, &marked);
        assert_eq!(delete, vec![cn("n2", "u2", false)]);
        assert!(marked2.is_empty());
    }

    #[test]
    fn any_owner_leaves_it_to_kubernetes() {
        let meta = |owner: serde_json::Value| {
            serde_json::from_value::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>(
                serde_json::json!({"name": "n9", "uid": "u9", "ownerReferences": owner}),
            )
            .unwrap()
        };
        let by_ns = candidate(meta(
            serde_json::json!([{"apiVersion": "v1", "kind": "Namespace", "name": "x", "uid": "nsuid"}]),
        ));
        assert!(by_ns.owned, "owned by a Namespace: Kubernetes' GC decides");
        let (marked, delete) = decide(&BTreeSet::new(), &[by_ns], &BTreeMap::new());
        assert!(marked.is_empty() && delete.is_empty());
        assert!(!candidate(meta(serde_json::json!([]))).owned);
    }

    #[test]
    fn recreated_or_returning_nodes_are_spared() {
        let prev: BTreeMap<String, String> = [("n2".to_string(), "old-uid".to_string())].into();
        // Same name, new object: marked again, not deleted.
        let (marked, delete) = decide(&BTreeSet::new(), &[cn("n2", "new-uid", false)], &prev);
        assert!(delete.is_empty());
        assert_eq!(marked.get("n2").map(String::as_str), Some("new-uid"));
        // The Node came back: no longer a candidate.
        let nodes: BTreeSet<String> = ["n2".to_string()].into();
        let (marked, delete) = decide(&nodes, &[cn("n2", "new-uid", false)], &marked);
        assert!(delete.is_empty() && marked.is_empty());
    }
}
