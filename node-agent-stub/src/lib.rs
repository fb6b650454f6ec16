//! cilium-node-agent: one process per node. Registers the node's
//! CiliumNode, gives local pods a network namespace, an IP, an identity and a
//! CiliumEndpoint, and enforces CiliumNetworkPolicies in the kernel with the
//! eBPF programs of `bpf/` (see `datapath`).

pub mod agent;
pub mod cni;
pub mod config;
pub mod datapath;
pub mod enforce;
pub mod health;
pub mod monitor;
pub mod netns;
pub mod state;
