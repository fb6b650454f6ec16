//! Reserved identities (upstream's numbers and labels) and the labels of
//! CIDR identities.

use crate::Config;
use crate::labels::{CLUSTER_KEY, Label, LabelSet, SOURCE_CIDR, SOURCE_K8S, SOURCE_NODE, SOURCE_RESERVED};
use crate::prefix::Prefix;

pub const HOST: u32 = 1;
pub const WORLD: u32 = 2;
pub const UNMANAGED: u32 = 3;
pub const HEALTH: u32 = 4;
pub const INIT: u32 = 5;
pub const REMOTE_NODE: u32 = 6;
pub const KUBE_APISERVER: u32 = 7;
pub const INGRESS: u32 = 8;
pub const WORLD_IPV4: u32 = 9;
pub const WORLD_IPV6: u32 = 10;
pub const AGGREGATE_CLUSTER: u32 = 11;
pub const AGGREGATE_CLUSTER_MESH: u32 = 12;
pub const AGGREGATE_WORLD: u32 = 13;
pub const AGGREGATE_REMOTE_NODE: u32 = 14;

/// Node-local identities (CIDRs) carry this bit, as upstream.
pub const LOCAL_FLAG: u32 = 1 << 24;

/// Per-node identities of remote nodes (with `enable-node-selector-labels`)
/// are node-local and carry this scope, as upstream's remote-node scope.
pub const REMOTE_NODE_SCOPE: u32 = 2 << 24;

/// Every reserved identity with its labels (kube-apiserver is also a
/// remote node, as upstream labels it).
pub fn reserved() -> Vec<(u32, LabelSet)> {
    let mut v: Vec<(u32, LabelSet)> = [
        (HOST, "host"),
        (WORLD, "world"),
        (UNMANAGED, "unmanaged"),
        (HEALTH, "health"),
        (INIT, "init"),
        (REMOTE_NODE, "remote-node"),
        (KUBE_APISERVER, "kube-apiserver"),
        (INGRESS, "ingress"),
        (WORLD_IPV4, "world-ipv4"),
        (WORLD_IPV6, "world-ipv6"),
        (AGGREGATE_CLUSTER, "aggregate-cluster"),
        (AGGREGATE_CLUSTER_MESH, "aggregate-cluster-mesh"),
        (AGGREGATE_WORLD, "aggregate-world"),
        (AGGREGATE_REMOTE_NODE, "aggregate-remote-node"),
    ]
    .into_iter()
    .map(|(id, name)| (id, LabelSet::new(vec![Label::new(SOURCE_RESERVED, name, "")])))
    .collect();
    v[KUBE_APISERVER as usize - 1].1 = LabelSet::new(vec![
        Label::new(SOURCE_RESERVED, "kube-apiserver", ""),
        Label::new(SOURCE_RESERVED, "remote-node", ""),
    ]);
    v
}

/// The reserved name of identity `id`, if it is one.
pub fn reserved_name(id: u32) -> Option<&'static str> {
    Some(match id {
        HOST => "host",
        WORLD => "world",
        UNMANAGED => "unmanaged",
        HEALTH => "health",
        INIT => "init",
        REMOTE_NODE => "remote-node",
        KUBE_APISERVER => "kube-apiserver",
        INGRESS => "ingress",
        WORLD_IPV4 => "world-ipv4",
        WORLD_IPV6 => "world-ipv6",
        AGGREGATE_CLUSTER => "aggregate-cluster",
        AGGREGATE_CLUSTER_MESH => "aggregate-cluster-mesh",
        AGGREGATE_WORLD => "aggregate-world",
        AGGREGATE_REMOTE_NODE => "aggregate-remote-node",
        _ => return None,
    })
}

/// The world label of an address family: plain `world` when only one
/// family is on, `world-ipv4`/`world-ipv6` in dual stack (upstream).
pub fn world_label(cfg: &Config, v4: bool) -> Label {
    let name = match (v4, cfg.ipv4, cfg.ipv6) {
        (true, _, true) => "world-ipv4",
        (false, true, _) => "world-ipv6",
        _ => "world",
    };
    Label::new(SOURCE_RESERVED, name, "")
}

/// The identity of an address nothing else claims.
pub fn world_id(cfg: &Config, v4: bool) -> u32 {
    match world_label(cfg, v4).key.as_str() {
        "world-ipv4" => WORLD_IPV4,
        "world-ipv6" => WORLD_IPV6,
        _ => WORLD,
    }
}

/// Labels of the identity of a CIDR a policy names: `cidr:<prefix>` and
/// its family's world label.
pub fn cidr_labels(cfg: &Config, prefix: &Prefix) -> LabelSet {
    let mut v = vec![world_label(cfg, prefix.is_ipv4())];
    if prefix.prefix_len() > 0 {
        v.push(Label::new(SOURCE_CIDR, &prefix.label_key(), ""));
    }
    LabelSet::new(v)
}

/// Labels of a node's identity: `reserved:host` for this node,
/// `reserved:remote-node` for the others; with
/// `enable-node-selector-labels` also the node's (filtered) labels under
/// source `node` and the cluster name, as upstream's node manager labels
/// them (what `fromNodes`/`toNodes` select).
pub fn node_labels<'a>(
    cfg: &Config,
    local: bool,
    node: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> LabelSet {
    let mut v = vec![Label::new(SOURCE_RESERVED, if local { "host" } else { "remote-node" }, "")];
    if cfg.enable_node_selector_labels {
        v.extend(node.into_iter().map(|(k, val)| Label::new(SOURCE_NODE, k, val)));
        v.push(Label::new(SOURCE_K8S, CLUSTER_KEY, &cfg.cluster_name));
    }
    LabelSet::new(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_identities_carry_node_labels_only_when_enabled() {
        let node: std::collections::BTreeMap<String, String> =
            [("zone".to_string(), "a".to_string()), ("kubernetes.io/hostname".to_string(), "n1".to_string())].into();
        let off = Config::default();
        assert_eq!(node_labels(&off, false, &node).to_strings(), ["reserved:remote-node"]);
        assert_eq!(node_labels(&off, true, &node).to_strings(), ["reserved:host"]);
        let on = Config { enable_node_selector_labels: true, cluster_name: "c1".into(), ..Config::default() };
        let mut remote = node_labels(&on, false, &node).to_strings();
        remote.sort();
        assert_eq!(
            remote,
            [
                "k8s:io.cilium.k8s.policy.cluster=c1",
                "node:kubernetes.io/hostname=n1",
                "node:zone=a",
                "reserved:remote-node"
            ]
        );
        assert!(node_labels(&on, true, &node).has(SOURCE_RESERVED, "host"));
        assert!(!node_labels(&on, true, &node).has(SOURCE_RESERVED, "remote-node"));
    }
}
