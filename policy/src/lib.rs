//! One reading of the Cilium policy language, used by the operator (the
//! `Valid` condition), the agent (enforcement) and `ciliumctl` (traces):
//!
//! 1. [`parse`]: a CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or
//!    Kubernetes NetworkPolicy is validated as upstream validates it and
//!    read into [`parse::Entry`]s (one per ingress/egress section).
//! 2. [`engine::Selections`]: peers resolved to the identities they select
//!    (labels as upstream matches them, CIDRs by containment).
//! 3. [`engine::compile`]: the entries selecting one endpoint become the
//!    datapath's per-endpoint map entries, distilled so that the
//!    datapath's longest-prefix lookup gives upstream's verdict.
//!
//! Pure: no kube client, no I/O.

pub mod cidr_group;
pub mod cluster;
pub mod engine;
pub mod identity;
pub mod knp;
pub mod labels;
pub mod parse;
pub mod prefix;
pub mod selector;
pub mod service;
pub mod trace;

pub use engine::{Direction, EndpointPolicy, MapKey, Selections, Universe, compile};
pub use labels::{Label, LabelSet};
pub use parse::{Entry, Invalid, Parsed, Peer};
pub use prefix::Prefix;

/// What the engine needs to know of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// `cluster-name`: peer selectors are limited to it, as upstream.
    pub cluster_name: String,
    pub ipv4: bool,
    pub ipv6: bool,
    /// `enable-node-selector-labels`: without it upstream refuses
    /// `fromNodes`/`toNodes`.
    pub enable_node_selector_labels: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config { cluster_name: "default".into(), ipv4: true, ipv6: false, enable_node_selector_labels: false }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    Cnp,
    Ccnp,
    Knp,
}

impl PolicyKind {
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Cnp => "CiliumNetworkPolicy",
            PolicyKind::Ccnp => "CiliumClusterwideNetworkPolicy",
            PolicyKind::Knp => "NetworkPolicy",
        }
    }
}

/// Which policy object: kind, namespace (none for clusterwide) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRef {
    pub kind: PolicyKind,
    pub namespace: Option<String>,
    pub name: String,
}

impl std::fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind.name(), self.name),
            None => write!(f, "{} {}", self.kind.name(), self.name),
        }
    }
}
