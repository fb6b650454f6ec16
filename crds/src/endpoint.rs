//! CiliumEndpoint: what a Cilium agent reports about one endpoint (pod).
//!
//! Upstream has no `spec`: the agent writes everything under `status`, and
//! the CRD declares no status subresource, so `status` is written through
//! the main resource. Field names are upstream's (mostly kebab-case).

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceColumnDefinition, CustomResourceDefinition,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::{self, CrdInfo};

/// One endpoint managed by a Cilium agent (`cilium.io/v2`, namespaced, short
/// names `cep`, `ciliumep`). Named after its pod, in the pod's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct CiliumEndpoint {
    #[serde(rename = "apiVersion", default)]
    #[schemars(skip)]
    pub api_version: crate::typemeta::ApiVersion,
    #[serde(default)]
    #[schemars(skip)]
    pub kind: crate::typemeta::Kind<CiliumEndpoint>,
    #[serde(default)]
    #[schemars(skip)]
    pub metadata: ObjectMeta,
    /// Everything the agent knows about the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<EndpointStatus>,
}

crate::cilium_resource!(
    CiliumEndpoint,
    kind = "CiliumEndpoint",
    plural = "ciliumendpoints",
    scope = k8s_openapi::NamespaceResourceScope
);

/// The columns `kubectl get` shows by default. Upstream additionally has
/// three `-o wide` (priority 1) columns, see [`WIDE_PRINTER_COLUMNS`].
pub const INFO: CrdInfo = CrdInfo {
    kind: "CiliumEndpoint",
    plural: "ciliumendpoints",
    singular: "ciliumendpoint",
    short_names: &["cep", "ciliumep"],
    namespaced: true,
    status_subresource: false,
    printer_columns: &[
        ("Security Identity", "integer", ".status.identity.id", "Numeric security identity of the endpoint"),
        ("Endpoint State", "string", ".status.state", "Lifecycle state of the endpoint"),
        ("IPv4", "string", ".status.networking.addressing[0].ipv4", "IPv4 address of the endpoint"),
        ("IPv6", "string", ".status.networking.addressing[0].ipv6", "IPv6 address of the endpoint"),
    ],
    required: &["metadata"],
};

/// Upstream's priority-1 columns, `(name, type, jsonPath, description,
/// inserted before the default column at this index)`.
pub const WIDE_PRINTER_COLUMNS: &[(&str, &str, &str, &str, usize)] = &[
    ("Ingress Enforcement", "string", ".status.policy.ingress.state", "Policy enforcement state for ingress", 1),
    ("Egress Enforcement", "string", ".status.policy.egress.state", "Policy enforcement state for egress", 1),
    ("Visibility Policy", "string", ".status.visibility-policy-status", "Status of the visibility policy", 1),
];

impl CiliumEndpoint {
    pub fn crd() -> CustomResourceDefinition {
        let mut crd = crd::build::<Self>(&INFO);
        let version = &mut crd.spec.versions[0];
        let columns = version.additional_printer_columns.get_or_insert_with(Vec::new);
        // Insert in reverse so that columns sharing an index keep their order.
        for (name, ty, path, desc, at) in WIDE_PRINTER_COLUMNS.iter().rev() {
            columns.insert(
                (*at).min(columns.len()),
                CustomResourceColumnDefinition {
                    name: name.to_string(),
                    type_: ty.to_string(),
                    json_path: path.to_string(),
                    description: Some(desc.to_string()),
                    priority: Some(1),
                    ..Default::default()
                },
            );
        }
        crd
    }

    /// The security identity the agent assigned, if any.
    pub fn identity_id(&self) -> Option<i64> {
        self.status.as_ref()?.identity.as_ref()?.id
    }
}

/// Lifecycle state of an endpoint as the agent reports it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EndpointState {
    Creating,
    WaitingForIdentity,
    NotReady,
    WaitingToRegenerate,
    Regenerating,
    Restoring,
    Ready,
    Disconnecting,
    Disconnected,
    Invalid,
}

/// The status of an endpoint. Unknown fields written by a newer agent are
/// kept (`extra`) rather than pruned.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct EndpointStatus {
    /// Agent-local endpoint ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    /// Controllers of the endpoint that are failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controllers: Option<Vec<ControllerStatus>>,
    /// Identifiers of the endpoint besides the pod name (container runtime
    /// IDs and the like).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_identifiers: Option<EndpointIdentifiers>,
    /// Health of the endpoint and its parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<EndpointHealth>,
    /// The security identity of the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<EndpointIdentity>,
    /// The last few warnings and errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<Vec<EndpointStatusChange>>,
    /// Addresses of the endpoint and the node it runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networking: Option<EndpointNetworking>,
    /// Encryption settings of the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionSpec>,
    /// The identities the endpoint's policy allows or denies, per direction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<EndpointPolicy>,
    /// Status of the visibility policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visibility_policy_status: Option<String>,
    /// Lifecycle state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<EndpointState>,
    /// Named L4 ports of the endpoint, usable in policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named_ports: Option<Vec<NamedPort>>,
    /// Service account of the endpoint's pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// Fields this type does not know, preserved as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Status of one failing controller of an endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ControllerStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configuration: Option<ControllerConfiguration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ControllerRunStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
}

/// How a controller runs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct ControllerConfiguration {
    /// Whether the controller retries on error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_retry: Option<bool>,
    /// Base back-off on error, in nanoseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_retry_base: Option<i64>,
    /// Run interval, in nanoseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<i64>,
}

/// Success and failure counters of a controller.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct ControllerRunStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failure_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_msg: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_count: Option<i64>,
}

/// Identifiers of an endpoint besides its name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct EndpointIdentifiers {
    /// ID the container runtime gave this network attachment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_attachment_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_endpoint_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_network_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_pod_name: Option<String>,
    /// `namespace/name` of the pod (deprecated upstream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
}

/// Health of an endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct EndpointHealth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpf: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
    #[serde(rename = "overallHealth", default, skip_serializing_if = "Option::is_none")]
    pub overall_health: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// The security identity of an endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct EndpointIdentity {
    /// Numeric identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    /// The identity's labels as `source:key=value` strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
}

/// One entry of an endpoint's status log.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct EndpointStatusChange {
    /// `ok` or `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

/// Addresses of an endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct EndpointNetworking {
    /// The endpoint's addresses, usually one pair.
    pub addressing: Vec<AddressPair>,
    /// IP of the node the endpoint runs on, reachable from other nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// An IPv4 and/or IPv6 address.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct AddressPair {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
}

/// Encryption settings: the index of the key in use, 0 when disabled.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct EncryptionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<i64>,
}

/// Allowed and denied peers per direction.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct EndpointPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<EndpointPolicyDirection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EndpointPolicyDirection>,
}

/// Policy of one direction.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct EndpointPolicyDirection {
    /// Whether policy is enforced in this direction.
    pub enforcing: bool,
    /// `enforcing`, `non-enforcing` or `disabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed: Option<Vec<IdentityTuple>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied: Option<Vec<IdentityTuple>>,
    /// Deprecated upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adding: Option<Vec<IdentityTuple>>,
    /// Deprecated upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removing: Option<Vec<IdentityTuple>>,
}

/// A peer identity with a destination port and protocol number.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct IdentityTuple {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_port: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<i64>,
}

/// A named L4 port of an endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct NamedPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPV6` or `ANY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A CiliumEndpoint as a Cilium agent writes it (shape of
    /// `kubectl get cep -o json`).
    fn sample() -> serde_json::Value {
        json!({
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumEndpoint",
            "metadata": {
                "name": "deathstar-6c94dcc57b-7hxkc",
                "namespace": "default",
                "uid": "0b1c4f2e-5f3a-4e7b-9a51-3d7f1d2c9e10",
                "resourceVersion": "4711",
                "generation": 1,
                "creationTimestamp": "2024-05-02T10:11:12Z",
                "labels": {"app.kubernetes.io/name": "deathstar", "class": "deathstar", "org": "empire"},
                "ownerReferences": [{
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": "deathstar-6c94dcc57b-7hxkc",
                    "uid": "6f0a2b1e-2d8c-4f43-8b7e-1a2b3c4d5e6f"
                }]
            },
            "status": {
                "id": 1731,
                "encryption": {},
                "external-identifiers": {
                    "cni-attachment-id": "3f9d2c1b0a:eth0",
                    "container-id": "3f9d2c1b0a",
                    "k8s-namespace": "default",
                    "k8s-pod-name": "deathstar-6c94dcc57b-7hxkc",
                    "pod-name": "default/deathstar-6c94dcc57b-7hxkc"
                },
                "identity": {
                    "id": 12345,
                    "labels": [
                        "k8s:app.kubernetes.io/name=deathstar",
                        "k8s:class=deathstar",
                        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=default",
                        "k8s:io.cilium.k8s.policy.cluster=default",
                        "k8s:io.cilium.k8s.policy.serviceaccount=default",
                        "k8s:io.kubernetes.pod.namespace=default",
                        "k8s:org=empire"
                    ]
                },
                "named-ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                "networking": {
                    "addressing": [{"ipv4": "10.0.1.200", "ipv6": "fd00::1:c8"}],
                    "node": "172.18.0.3"
                },
                "policy": {
                    "ingress": {
                        "enforcing": true,
                        "state": "enforcing",
                        "allowed": [
                            {"identity": 1, "dest-port": 0, "protocol": 0},
                            {"identity": 23456, "identity-labels": {"k8s:org": "empire"}, "dest-port": 80, "protocol": 6}
                        ],
                        "denied": [{"identity": 2, "dest-port": 22, "protocol": 6}]
                    },
                    "egress": {"enforcing": false, "state": "non-enforcing"}
                },
                "health": {"bpf": "OK", "connected": true, "overallHealth": "OK", "policy": "OK"},
                "controllers": [{
                    "name": "resolve-identity-1731",
                    "uuid": "5e5b1c3a-1111-2222-3333-444455556666",
                    "configuration": {"error-retry": true, "error-retry-base": 2000000000, "interval": 300000000000_i64},
                    "status": {
                        "consecutive-failure-count": 2,
                        "failure-count": 3,
                        "last-failure-msg": "identity allocation failed",
                        "last-failure-timestamp": "2024-05-02T10:11:13.5Z",
                        "last-success-timestamp": "2024-05-02T10:11:20Z",
                        "success-count": 7
                    }
                }],
                "log": [{"code": "ok", "message": "Successfully regenerated endpoint program", "state": "ready", "timestamp": "2024-05-02T10:11:21Z"}],
                "visibility-policy-status": "<status disabled>",
                "service-account": "default",
                "state": "ready"
            }
        })
    }

    #[test]
    fn sample_round_trips_without_loss() {
        let input = sample();
        let cep: CiliumEndpoint = serde_json::from_value(input.clone()).unwrap();
        let status = cep.status.as_ref().unwrap();
        assert!(status.extra.is_empty(), "every upstream field is typed: {:?}", status.extra.keys());
        assert_eq!(status.state, Some(EndpointState::Ready));
        assert_eq!(cep.identity_id(), Some(12345));
        assert_eq!(status.networking.as_ref().unwrap().addressing[0].ipv4.as_deref(), Some("10.0.1.200"));
        let output = crate::apply_body::<CiliumEndpoint>(serde_json::to_value(&cep).unwrap());
        assert_eq!(output, input);
    }

    #[test]
    fn unknown_status_fields_are_preserved() {
        let mut input = sample();
        input["status"]["some-future-field"] = json!({"a": [1, 2]});
        let cep: CiliumEndpoint = serde_json::from_value(input.clone()).unwrap();
        assert!(cep.status.as_ref().unwrap().extra.contains_key("some-future-field"));
        let output = crate::apply_body::<CiliumEndpoint>(serde_json::to_value(&cep).unwrap());
        assert_eq!(output, input);
    }

    #[test]
    fn every_state_serializes_as_upstream_spells_it() {
        let states = [
            (EndpointState::Creating, "creating"),
            (EndpointState::WaitingForIdentity, "waiting-for-identity"),
            (EndpointState::NotReady, "not-ready"),
            (EndpointState::WaitingToRegenerate, "waiting-to-regenerate"),
            (EndpointState::Regenerating, "regenerating"),
            (EndpointState::Restoring, "restoring"),
            (EndpointState::Ready, "ready"),
            (EndpointState::Disconnecting, "disconnecting"),
            (EndpointState::Disconnected, "disconnected"),
            (EndpointState::Invalid, "invalid"),
        ];
        for (state, text) in states {
            assert_eq!(serde_json::to_value(state).unwrap(), json!(text));
        }
        let crd = CiliumEndpoint::crd();
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let state = &schema["openAPIV3Schema"]["properties"]["status"]["properties"]["state"];
        let expected: Vec<_> = states.iter().map(|(_, t)| json!(t)).collect();
        assert_eq!(state["enum"], json!(expected));
        assert_eq!(state["type"], "string");
    }

    #[test]
    fn crd_names_scope_and_columns_match_upstream() {
        let crd = CiliumEndpoint::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("ciliumendpoints.cilium.io"));
        assert_eq!(crd.spec.group, "cilium.io");
        assert_eq!(crd.spec.scope, "Namespaced");
        let names = &crd.spec.names;
        assert_eq!(names.kind, "CiliumEndpoint");
        assert_eq!(names.list_kind.as_deref(), Some("CiliumEndpointList"));
        assert_eq!(names.singular.as_deref(), Some("ciliumendpoint"));
        assert_eq!(names.short_names, Some(vec!["cep".to_string(), "ciliumep".to_string()]));
        assert_eq!(names.categories, Some(vec!["cilium".to_string()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v2");
        assert!(version.subresources.is_none(), "upstream declares no status subresource");
        let columns: Vec<_> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| (c.name.as_str(), c.type_.as_str(), c.json_path.as_str(), c.priority.unwrap_or(0)))
            .collect();
        assert_eq!(
            columns,
            vec![
                ("Security Identity", "integer", ".status.identity.id", 0),
                ("Ingress Enforcement", "string", ".status.policy.ingress.state", 1),
                ("Egress Enforcement", "string", ".status.policy.egress.state", 1),
                ("Visibility Policy", "string", ".status.visibility-policy-status", 1),
                ("Endpoint State", "string", ".status.state", 0),
                ("IPv4", "string", ".status.networking.addressing[0].ipv4", 0),
                ("IPv6", "string", ".status.networking.addressing[0].ipv6", 0),
            ]
        );
        let schema =
            serde_json::to_value(version.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap();
        assert_eq!(schema["required"], json!(["metadata"]));
        assert!(schema["properties"].get("spec").is_none());
        let status = &schema["properties"]["status"];
        assert_eq!(status["x-kubernetes-preserve-unknown-fields"], json!(true));
        assert_eq!(status["properties"]["networking"]["required"], json!(["addressing"]));
        assert_eq!(status["properties"]["policy"]["properties"]["ingress"]["required"], json!(["enforcing"]));
        assert_eq!(status["properties"]["id"]["format"], "int64");
    }
}
