//! What the plugin and the agent say to each other on the agent's socket
//! (upstream's `/var/run/cilium/cilium.sock`): JSON over HTTP/1.1,
//! `POST /v1/cni/{add,del,check}`. A refusal is a non-2xx status whose body
//! is an [`ApiError`] carrying the CNI error code to give the runtime.

use serde::{Deserialize, Serialize};

pub const DEFAULT_SOCKET: &str = "/var/run/cilium/cilium.sock";
pub const ADD_PATH: &str = "/v1/cni/add";
pub const DEL_PATH: &str = "/v1/cni/del";
pub const CHECK_PATH: &str = "/v1/cni/check";

/// ADD: network this pod's sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddRequest {
    pub container_id: String,
    /// The sandbox's network namespace (a path, as the runtime gives it).
    pub netns: String,
    pub ifname: String,
    pub pod_namespace: String,
    pub pod_name: String,
    /// From `K8S_POD_UID` when the runtime passes it: an ADD for a pod
    /// re-created under the same name waits for the new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

/// ADD's answer: what was made, once the endpoint's policy is in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddReply {
    pub ifname: String,
    pub mac: String,
    pub ipv4: String,
    pub gateway4: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<String>,
    pub endpoint_id: u32,
    pub identity: u32,
}

/// DEL and CHECK: the attachment the runtime names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRef {
    pub container_id: String,
    pub ifname: String,
    /// Empty on a DEL after the runtime removed the namespace.
    #[serde(default)]
    pub netns: String,
}

/// A refusal: the CNI code for the runtime and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: u32,
    pub msg: String,
}
