//! `cilium-cni`: the CNI plugin the kubelet's runtime runs for each pod
//! sandbox. It holds no state: ADD, DEL and CHECK are requests to the
//! node's agent, which owns addresses, interfaces and the datapath.

pub mod api;
pub mod spec;
