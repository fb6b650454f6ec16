//! cilium-operator: the cluster-wide control plane of Cilium.
//!
//! Layout: `config` (flags, env, cilium-config directory, validation),
//! `leader` (Lease election), `admin` (health and metrics endpoints),
//! `metrics` (the one registry), `crds` (registration and generation), and
//! `run` which wires them together. The duties themselves (IPAM, GCs,
//! heartbeat) run on the leader only.

pub mod admin;
pub mod config;
pub mod crds;
pub mod doublewrite;
pub mod duration;
pub mod endpoint_gc;
pub mod gc_request;
pub mod identity_gc;
pub mod ipam;
pub mod kvstore;
pub mod leader;
pub mod lean;
pub mod metrics;
pub mod node_taints;
pub mod nodes_gc;
pub mod policy_status;
pub mod run;
pub mod unmanaged_pods;
