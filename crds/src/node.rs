//! CiliumNode: one node as Cilium sees it. The agent owns `spec` (addresses,
//! health endpoint, IPAM requests); the operator writes the pod CIDRs into
//! `spec.ipam.podCIDRs` and its errors into `status.ipam.operator-status`.
//!
//! The fields this project reads or writes are typed. Cloud-provider
//! sections (`eni`, `azure`, `alibaba-cloud`) are kept as opaque objects,
//! and unknown fields at the spec, status and IPAM levels are preserved, so
//! that nothing a real agent writes is rejected or lost.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::crd::{self, CrdInfo};

/// A node managed by Cilium (`cilium.io/v2`, cluster-scoped, short names
/// `cn`, `ciliumn`, with a status subresource). Named after the Kubernetes
/// Node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct CiliumNode {
    #[serde(rename = "apiVersion", default)]
    #[schemars(skip)]
    pub api_version: crate::typemeta::ApiVersion,
    #[serde(default)]
    #[schemars(skip)]
    pub kind: crate::typemeta::Kind<CiliumNode>,
    #[serde(default)]
    #[schemars(skip)]
    pub metadata: ObjectMeta,
    /// Desired configuration of the node.
    pub spec: NodeSpec,
    /// Realized state of the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<NodeStatus>,
}

crate::cilium_resource!(
    CiliumNode,
    kind = "CiliumNode",
    plural = "ciliumnodes",
    scope = k8s_openapi::ClusterResourceScope
);

pub const INFO: CrdInfo = CrdInfo {
    kind: "CiliumNode",
    plural: "ciliumnodes",
    singular: "ciliumnode",
    short_names: &["cn", "ciliumn"],
    namespaced: false,
    status_subresource: true,
    printer_columns: &[
        (
            "CiliumInternalIP",
            "string",
            ".spec.addresses[?(@.type==\"CiliumInternalIP\")].ip",
            "Cilium's internal (router) IP on the node",
        ),
        ("InternalIP", "string", ".spec.addresses[?(@.type==\"InternalIP\")].ip", "Internal IP of the node"),
        ("Age", "date", ".metadata.creationTimestamp", "Time since the CiliumNode was created"),
    ],
    required: &["metadata", "spec"],
};

impl CiliumNode {
    pub fn crd() -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
        crd::build::<Self>(&INFO)
    }

    /// The pod CIDRs assigned to the node (`spec.ipam.podCIDRs`).
    pub fn pod_cidrs(&self) -> &[String] {
        self.spec.ipam.as_ref().and_then(|i| i.pod_cidrs.as_deref()).unwrap_or_default()
    }

    /// The first address of the given type (`InternalIP`,
    /// `CiliumInternalIP`, `ExternalIP`, ...).
    pub fn address(&self, address_type: &str) -> Option<&str> {
        self.spec
            .addresses
            .iter()
            .flatten()
            .find(|a| a.type_.as_deref() == Some(address_type))
            .and_then(|a| a.ip.as_deref())
    }

    /// The error the operator last reported (`status.ipam.operator-status.error`).
    pub fn operator_error(&self) -> Option<&str> {
        self.status.as_ref()?.ipam.as_ref()?.operator_status.as_ref()?.error.as_deref()
    }
}

fn preserve_unknown_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

fn cidr_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {"type": "string", "format": "cidr"},
    })
}

/// Configuration of a node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct NodeSpec {
    /// Identifier of the node at its provider (not the node name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// All addresses of the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<NodeAddress>>,
    /// Addresses of the node's health endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthAddressing>,
    /// Addresses of the node's ingress listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<AddressPair>,
    /// Encryption settings of the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionSpec>,
    /// AWS ENI settings, kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub eni: Option<Value>,
    /// Azure IPAM settings, kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub azure: Option<Value>,
    /// AlibabaCloud IPAM settings, kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub alibaba_cloud: Option<Value>,
    /// Address management: pod CIDRs and pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<IpamSpec>,
    /// Numeric security identity of the node, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodeidentity: Option<i64>,
    /// Identifier generated on every boot of the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootid: Option<String>,
    /// Fields this type does not know, preserved as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// One address of a node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct NodeAddress {
    /// `InternalIP`, `ExternalIP`, `CiliumInternalIP`, ...
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

/// Addresses of the health endpoint of a node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct HealthAddressing {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
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

/// IPAM configuration of a node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct IpamSpec {
    /// CIDRs the node allocates pod IPs from (cluster-pool IPAM; written by
    /// the operator).
    #[serde(rename = "podCIDRs", default, skip_serializing_if = "Option::is_none")]
    pub pod_cidrs: Option<Vec<String>>,
    /// IPv4 addresses available to the node, by address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<BTreeMap<String, AllocationIp>>,
    /// IPv6 addresses available to the node, by address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_pool: Option<BTreeMap<String, AllocationIp>>,
    /// Multi-pool IPAM: what the node requests and what it was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pools: Option<IpamPoolSpec>,
    /// IPs to allocate when the node comes up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_allocate: Option<i64>,
    /// Upper bound of IPs allocated to the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_allocate: Option<i64>,
    /// IPs to keep available ahead of demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub pre_allocate: Option<i64>,
    /// IPs that may be allocated beyond the pre-allocation watermark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_above_watermark: Option<i64>,
    /// Tags selecting the pool of static IPs for the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_ip_tags: Option<BTreeMap<String, String>>,
    /// Fields this type does not know, preserved as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// An IP available for allocation or allocated.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct AllocationIp {
    /// Who uses the IP (pod name or other identifier); empty if unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The resource the IP belongs to (e.g. an ENI ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
}

/// Multi-pool IPAM requests and allocations.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct IpamPoolSpec {
    /// How many addresses the agent wants from each pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<Vec<IpamPoolRequest>>,
    /// CIDRs the operator assigned from each pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<Vec<IpamPoolAllocation>>,
}

/// Addresses requested from one pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct IpamPoolRequest {
    #[schemars(length(min = 1))]
    pub pool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needed: Option<IpamPoolDemand>,
}

/// Number of addresses needed per family.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct IpamPoolDemand {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_addrs: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_addrs: Option<i64>,
}

/// CIDRs assigned from one pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct IpamPoolAllocation {
    #[schemars(length(min = 1))]
    pub pool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "cidr_list")]
    pub cidrs: Option<Vec<String>>,
}

/// Realized state of a node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct NodeStatus {
    /// AWS ENI state, kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub eni: Option<Value>,
    /// Azure state, kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub azure: Option<Value>,
    /// AlibabaCloud state, kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub alibaba_cloud: Option<Value>,
    /// IPAM state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<IpamStatus>,
    /// Fields this type does not know, preserved as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// IPAM state of a node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct IpamStatus {
    /// IPv4 addresses in use, by address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<BTreeMap<String, AllocationIp>>,
    /// IPv6 addresses in use, by address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_used: Option<BTreeMap<String, AllocationIp>>,
    /// What the operator has to say about the node, errors included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_status: Option<OperatorStatus>,
    /// State of each pod CIDR, by CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidrs: Option<BTreeMap<String, PodCidrStatus>>,
    /// Release handshake state of IPv4 addresses, by address.
    #[serde(rename = "release-ips", default, skip_serializing_if = "Option::is_none")]
    pub release_ips: Option<BTreeMap<String, IpReleaseStatus>>,
    /// Release handshake state of IPv6 addresses, by address.
    #[serde(rename = "release-ipv6s", default, skip_serializing_if = "Option::is_none")]
    pub release_ipv6s: Option<BTreeMap<String, IpReleaseStatus>>,
    /// Static IP assigned to the node (e.g. an elastic IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_static_ip: Option<String>,
    /// Fields this type does not know, preserved as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// The operator's report on a node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct OperatorStatus {
    /// Last error the operator hit for this node (e.g. `allocator full`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// State of one pod CIDR of a node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct PodCidrStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PodCidrState>,
}

/// Usage of a pod CIDR.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PodCidrState {
    Released,
    Depleted,
    InUse,
}

/// Step of the IP release handshake between operator and agent.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum IpReleaseStatus {
    MarkedForRelease,
    ReadyForRelease,
    DoNotRelease,
    Released,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A CiliumNode as an agent and the operator write it with cluster-pool
    /// IPAM (shape of `kubectl get ciliumnode -o json`).
    fn sample() -> Value {
        json!({
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNode",
            "metadata": {
                "name": "kind-worker",
                "uid": "1d2e3f40-5a6b-4c7d-8e9f-0a1b2c3d4e5f",
                "resourceVersion": "9000",
                "generation": 3,
                "creationTimestamp": "2024-05-02T09:00:00Z",
                "labels": {"kubernetes.io/hostname": "kind-worker", "kubernetes.io/os": "linux"},
                "ownerReferences": [{
                    "apiVersion": "v1",
                    "kind": "Node",
                    "name": "kind-worker",
                    "uid": "aaaabbbb-cccc-dddd-eeee-ffff00001111"
                }]
            },
            "spec": {
                "addresses": [
                    {"type": "InternalIP", "ip": "172.18.0.3"},
                    {"type": "InternalIP", "ip": "fc00:c111::3"},
                    {"type": "CiliumInternalIP", "ip": "10.0.1.158"},
                    {"type": "CiliumInternalIP", "ip": "fd00::1:1e"}
                ],
                "alibaba-cloud": {},
                "azure": {},
                "eni": {"first-interface-index": 1, "security-groups": ["sg-1"], "vpc-id": "vpc-1"},
                "encryption": {},
                "health": {"ipv4": "10.0.1.70", "ipv6": "fd00::1:5a"},
                "ingress": {},
                "instance-id": "i-0123456789",
                "bootid": "6b6b9d2c-4ad5-4c0e-8c8d-2f0b8f3a9b11",
                "nodeidentity": 6,
                "ipam": {
                    "podCIDRs": ["10.0.1.0/24", "fd00::1:0/112"],
                    "pool": {},
                    "pools": {
                        "requested": [{"pool": "default", "needed": {"ipv4-addrs": 16, "ipv6-addrs": 16}}],
                        "allocated": [{"pool": "default", "cidrs": ["10.10.0.0/27"]}]
                    },
                    "min-allocate": 8,
                    "pre-allocate": 8,
                    "max-above-watermark": 0,
                    "static-ip-tags": {"team": "net"}
                }
            },
            "status": {
                "alibaba-cloud": {},
                "azure": {},
                "eni": {},
                "ipam": {
                    "used": {
                        "10.0.1.158": {"owner": "router"},
                        "10.0.1.200": {"owner": "default/deathstar-6c94dcc57b-7hxkc", "resource": "eni-1"}
                    },
                    "ipv6-used": {"fd00::1:1e": {"owner": "router"}},
                    "operator-status": {"error": "allocator full"},
                    "pod-cidrs": {"10.0.1.0/24": {"status": "in-use"}, "10.0.2.0/24": {"status": "released"}},
                    "release-ips": {"10.0.1.9": "marked-for-release", "10.0.1.10": "do-not-release"},
                    "release-ipv6s": {"fd00::1:9": "ready-for-release"},
                    "assigned-static-ip": "203.0.113.7"
                }
            }
        })
    }

    #[test]
    fn sample_round_trips_without_loss() {
        let input = sample();
        let node: CiliumNode = serde_json::from_value(input.clone()).unwrap();
        assert!(node.spec.extra.is_empty(), "{:?}", node.spec.extra.keys());
        assert!(node.spec.ipam.as_ref().unwrap().extra.is_empty());
        let status = node.status.as_ref().unwrap();
        assert!(status.extra.is_empty());
        assert!(status.ipam.as_ref().unwrap().extra.is_empty());
        assert_eq!(node.pod_cidrs(), ["10.0.1.0/24", "fd00::1:0/112"]);
        assert_eq!(node.address("CiliumInternalIP"), Some("10.0.1.158"));
        assert_eq!(node.address("InternalIP"), Some("172.18.0.3"));
        assert_eq!(node.operator_error(), Some("allocator full"));
        assert_eq!(node.spec.health.as_ref().unwrap().ipv4.as_deref(), Some("10.0.1.70"));
        let used = status.ipam.as_ref().unwrap().used.as_ref().unwrap();
        assert_eq!(used["10.0.1.158"].owner.as_deref(), Some("router"));
        let output = crate::apply_body::<CiliumNode>(serde_json::to_value(&node).unwrap());
        assert_eq!(output, input);
    }

    #[test]
    fn unknown_fields_from_newer_agents_are_preserved() {
        let mut input = sample();
        input["spec"]["future-spec-field"] = json!("x");
        input["spec"]["ipam"]["pod-cidr-allocation-threshold"] = json!(8);
        input["status"]["ipam"]["future"] = json!({"k": true});
        let node: CiliumNode = serde_json::from_value(input.clone()).unwrap();
        let output = crate::apply_body::<CiliumNode>(serde_json::to_value(&node).unwrap());
        assert_eq!(output, input);
    }

    #[test]
    fn minimal_node_serializes_compactly() {
        let node = CiliumNode {
            metadata: ObjectMeta { name: Some("n1".into()), ..Default::default() },
            spec: NodeSpec {
                ipam: Some(IpamSpec { pod_cidrs: Some(vec!["10.0.0.0/24".into()]), ..Default::default() }),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&node).unwrap(),
            json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNode", "metadata": {"name": "n1"}, "spec": {"ipam": {"podCIDRs": ["10.0.0.0/24"]}}})
        );
    }

    #[test]
    fn crd_names_scope_and_columns_match_upstream() {
        let crd = CiliumNode::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("ciliumnodes.cilium.io"));
        assert_eq!(crd.spec.scope, "Cluster");
        let names = &crd.spec.names;
        assert_eq!(names.kind, "CiliumNode");
        assert_eq!(names.list_kind.as_deref(), Some("CiliumNodeList"));
        assert_eq!(names.singular.as_deref(), Some("ciliumnode"));
        assert_eq!(names.short_names, Some(vec!["cn".to_string(), "ciliumn".to_string()]));
        assert_eq!(names.categories, Some(vec!["cilium".to_string()]));
        let version = &crd.spec.versions[0];
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<_> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| (c.name.as_str(), c.type_.as_str(), c.json_path.as_str()))
            .collect();
        assert_eq!(
            columns,
            vec![
                ("CiliumInternalIP", "string", ".spec.addresses[?(@.type==\"CiliumInternalIP\")].ip"),
                ("InternalIP", "string", ".spec.addresses[?(@.type==\"InternalIP\")].ip"),
                ("Age", "date", ".metadata.creationTimestamp"),
            ]
        );
        let schema =
            serde_json::to_value(version.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap();
        assert_eq!(schema["required"], json!(["metadata", "spec"]));
        let spec = &schema["properties"]["spec"];
        assert_eq!(spec["properties"]["ipam"]["properties"]["podCIDRs"]["items"]["type"], "string");
        assert_eq!(spec["properties"]["eni"]["x-kubernetes-preserve-unknown-fields"], json!(true));
        assert_eq!(spec["properties"]["ipam"]["properties"]["min-allocate"]["minimum"].as_f64(), Some(0.0));
        let ipam_status = &schema["properties"]["status"]["properties"]["ipam"];
        assert_eq!(ipam_status["properties"]["operator-status"]["properties"]["error"]["type"], "string");
        assert_eq!(
            ipam_status["properties"]["release-ips"]["additionalProperties"]["enum"],
            json!(["marked-for-release", "ready-for-release", "do-not-release", "released"])
        );
        assert_eq!(
            ipam_status["properties"]["pod-cidrs"]["additionalProperties"]["properties"]["status"]["enum"],
            json!(["released", "depleted", "in-use"])
        );
    }
}
