//! CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy.
//!
//! Both carry one rule in `spec` and/or a list of rules in `specs`, plus a
//! `status` the operator writes (`conditions`, type `Valid`).
//!
//! The whole upstream rule language is accepted. What this project enforces
//! itself is typed and validated by the schema the way upstream's CRDs
//! validate it: selectors, CIDRs and CIDR sets, entities, ports and
//! protocols, ICMP, FQDN selectors, authentication and the deny rules.
//! Everything else (L7 `rules`, TLS contexts, `listener`, `toServices`,
//! `toGroups`/`fromGroups`) is kept as opaque JSON whose schema is an object
//! (or a list of objects) that preserves unknown fields, so that it
//! round-trips without loss; enforcing it is the agent's job.
//!
//! Validation is structural (`enum`, `pattern`, `format`,
//! `minimum`/`maximum`, `maxLength`, `maxItems`, `oneOf` on required
//! fields) plus upstream's one CEL rule (`spec` or `specs` must be given);
//! the rest of upstream's checks are the policy engine's (`cilium-policy`),
//! reported in the `Valid` condition.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::crd::{self, CrdInfo};
use crate::selector::EndpointSelector;

/// Syntax of `port`: a number up to 65535 or a port name. This is
/// upstream's expression, including its quirk that the numeric branch is
/// only anchored at the start (so `65536` passes the schema and is rejected
/// later by the agent).
pub const PORT_PATTERN: &str = r"^(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})|([a-zA-Z0-9]-?)*[a-zA-Z](-?[a-zA-Z0-9])*$";
/// Syntax of `toFQDNs[].matchName` and DNS rule `matchName`.
pub const FQDN_NAME_PATTERN: &str = r"^([-a-zA-Z0-9_]+[.]?)+$";
/// Syntax of `matchPattern` (DNS names with `*` wildcards).
pub const FQDN_MATCH_PATTERN: &str = r"^([-a-zA-Z0-9_*]+[.]?)+$";
/// Maximum length of a DNS name or pattern.
pub const FQDN_MAX_LENGTH: u32 = 255;
/// Syntax of a TLS server name (SNI) in `serverNames`.
pub const SERVER_NAME_PATTERN: &str = r"^(\*?\*\.)?([-a-zA-Z0-9_]+\.?)+$";
/// Syntax of `cidrGroupRef` (a DNS-1123 subdomain).
pub const CIDR_GROUP_REF_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// Syntax of the Hubble `log.value` of a rule: printable characters only.
pub const LOG_VALUE_PATTERN: &str = r"^\PC*$";
/// Syntax of an ICMP type given as a string: a number 0-255 or one of the
/// ICMPv4/ICMPv6 message names.
pub const ICMP_TYPE_PATTERN: &str = concat!(
    "^([0-9]|[1-9][0-9]|1[0-9]{2}|2[0-4][0-9]|25[0-5]",
    "|EchoReply|DestinationUnreachable|Redirect|Echo|EchoRequest|RouterAdvertisement",
    "|RouterSelection|TimeExceeded|ParameterProblem|Timestamp|TimestampReply|Photuris",
    "|ExtendedEchoRequest|ExtendedEchoReply|PacketTooBig|MulticastListenerQuery",
    "|MulticastListenerReport|MulticastListenerDone|RouterSolicitation|NeighborSolicitation",
    "|NeighborAdvertisement|RedirectMessage|RouterRenumbering|ICMPNodeInformationQuery",
    "|ICMPNodeInformationResponse|InverseNeighborDiscoverySolicitation",
    "|InverseNeighborDiscoveryAdvertisement|HomeAgentAddressDiscoveryRequest",
    "|HomeAgentAddressDiscoveryReply|MobilePrefixSolicitation|MobilePrefixAdvertisement",
    "|DuplicateAddressRequestCodeSuffix|DuplicateAddressConfirmationCodeSuffix)$"
);
/// The `type` of the condition the operator sets after validating a policy.
pub const CONDITION_VALID: &str = "Valid";

// ---------------------------------------------------------------- resources

/// A namespaced Cilium network policy (`cilium.io/v2`, short names `cnp`,
/// `ciliumnp`, with a status subresource).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct CiliumNetworkPolicy {
    #[serde(rename = "apiVersion", default)]
    #[schemars(skip)]
    pub api_version: crate::typemeta::ApiVersion,
    #[serde(default)]
    #[schemars(skip)]
    pub kind: crate::typemeta::Kind<CiliumNetworkPolicy>,
    #[serde(default)]
    #[schemars(skip)]
    pub metadata: ObjectMeta,
    /// One rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Rule>,
    /// A list of rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub specs: Option<Vec<Rule>>,
    /// Validation and realization status of the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PolicyStatus>,
}

/// A cluster-wide Cilium network policy (`cilium.io/v2`, cluster-scoped,
/// short name `ccnp`, with a status subresource). Its rules may select
/// nodes (`nodeSelector`, host firewall) as well as endpoints.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct CiliumClusterwideNetworkPolicy {
    #[serde(rename = "apiVersion", default)]
    #[schemars(skip)]
    pub api_version: crate::typemeta::ApiVersion,
    #[serde(default)]
    #[schemars(skip)]
    pub kind: crate::typemeta::Kind<CiliumClusterwideNetworkPolicy>,
    #[serde(default)]
    #[schemars(skip)]
    pub metadata: ObjectMeta,
    /// One rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Rule>,
    /// A list of rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub specs: Option<Vec<Rule>>,
    /// Validation and realization status of the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PolicyStatus>,
}

crate::cilium_resource!(
    CiliumNetworkPolicy,
    kind = "CiliumNetworkPolicy",
    plural = "ciliumnetworkpolicies",
    scope = k8s_openapi::NamespaceResourceScope
);

crate::cilium_resource!(
    CiliumClusterwideNetworkPolicy,
    kind = "CiliumClusterwideNetworkPolicy",
    plural = "ciliumclusterwidenetworkpolicies",
    scope = k8s_openapi::ClusterResourceScope
);

const VALID_COLUMN: (&str, &str, &str, &str) = ("Valid", "string", ".status.conditions[?(@.type=='Valid')].status", "");

pub const CNP_INFO: CrdInfo = CrdInfo {
    kind: "CiliumNetworkPolicy",
    plural: "ciliumnetworkpolicies",
    singular: "ciliumnetworkpolicy",
    short_names: &["cnp", "ciliumnp"],
    namespaced: true,
    status_subresource: true,
    printer_columns: &[("Age", "date", ".metadata.creationTimestamp", ""), VALID_COLUMN],
    required: &["metadata"],
};

pub const CCNP_INFO: CrdInfo = CrdInfo {
    kind: "CiliumClusterwideNetworkPolicy",
    plural: "ciliumclusterwidenetworkpolicies",
    singular: "ciliumclusterwidenetworkpolicy",
    short_names: &["ccnp"],
    namespaced: false,
    status_subresource: true,
    printer_columns: &[VALID_COLUMN],
    required: &["metadata"],
};

/// Categories of the policy CRDs (`kubectl get cilium`, `kubectl get ciliumpolicy`).
pub const POLICY_CATEGORIES: &[&str] = &["cilium", "ciliumpolicy"];

fn policy_crd<T: JsonSchema>(info: &CrdInfo) -> CustomResourceDefinition {
    let mut crd = crd::build::<T>(info);
    crd.spec.names.categories = Some(POLICY_CATEGORIES.iter().map(|c| c.to_string()).collect());
    // Upstream's one CEL rule: `kubectl apply` of a policy with neither
    // `spec` nor `specs` is refused by the API server, not accepted and
    // then marked invalid.
    for v in &mut crd.spec.versions {
        if let Some(schema) = v.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) {
            schema.x_kubernetes_validations =
                Some(vec![k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::ValidationRule {
                    rule: "has(self.spec) || has(self.specs)".into(),
                    message: Some("spec or specs must be provided".into()),
                    ..Default::default()
                }]);
        }
    }
    crd
}

impl CiliumNetworkPolicy {
    pub fn crd() -> CustomResourceDefinition {
        policy_crd::<Self>(&CNP_INFO)
    }

    /// `spec` followed by the entries of `specs`.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.spec.iter().chain(self.specs.iter().flatten())
    }
}

impl CiliumClusterwideNetworkPolicy {
    pub fn crd() -> CustomResourceDefinition {
        policy_crd::<Self>(&CCNP_INFO)
    }

    /// `spec` followed by the entries of `specs`.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.spec.iter().chain(self.specs.iter().flatten())
    }
}

// ---------------------------------------------------------------- status

/// Status of a policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// Conditions of the policy; the operator maintains `Valid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<PolicyCondition>>,
    /// Status of the policies derived from this one (e.g. `toGroups`), by
    /// name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derivative_policies: Option<BTreeMap<String, PolicyNodeStatus>>,
}

/// One condition of a policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCondition {
    /// Condition type, e.g. `Valid`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// When the status last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: Option<String>,
    /// Human-readable details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Machine-readable reason of the last change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Per-node (or per-derivative) realization status of a policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyNodeStatus {
    /// The policy was parsed and imported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
    /// Why parsing, importing or realizing the policy failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When this status was last updated (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_updated: Option<String>,
    /// Policy repository revision that first implemented the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_policy_revision: Option<i64>,
    /// All endpoints present at import time enforce the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcing: Option<bool>,
    /// Annotations of the policy as realized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

// ---------------------------------------------------------------- schema helpers

fn preserve_unknown_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

fn preserve_unknown_object_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
        },
    })
}

/// A CIDR prefix such as `10.0.0.0/8` or `2001:db8::/32`. The schema uses
/// format `cidr`, which the API server checks by parsing the value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(transparent)]
pub struct Cidr(pub String);

impl JsonSchema for Cidr {
    fn schema_name() -> Cow<'static, str> {
        "Cidr".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "format": "cidr",
        })
    }
}

impl Cidr {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Cidr {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

// ---------------------------------------------------------------- rule

/// One policy rule: the endpoints (or nodes) it applies to and what they
/// may send and receive. Exactly one of `endpointSelector` and
/// `nodeSelector` must be set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [{"required": ["endpointSelector"]}, {"required": ["nodeSelector"]}]))]
pub struct Rule {
    /// The endpoints the rule applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_selector: Option<EndpointSelector>,
    /// The nodes the rule applies to (cluster-wide policies only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<EndpointSelector>,
    /// Allowed ingress; absent or empty means the rule says nothing about
    /// ingress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    /// Denied ingress, overriding any allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_deny: Option<Vec<IngressDenyRule>>,
    /// Allowed egress; absent or empty means the rule says nothing about
    /// egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
    /// Denied egress, overriding any allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_deny: Option<Vec<EgressDenyRule>>,
    /// Labels identifying the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<RuleLabel>>,
    /// Free-form description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Whether selected endpoints switch to default-deny per direction
    /// (default: on for each direction the rule has rules for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_default_deny: Option<DefaultDenyConfig>,
    /// Hubble logging settings of the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogConfig>,
}

/// A label attached to a rule.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct RuleLabel {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Label source, e.g. `k8s` or `unspec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Per-direction default-deny switch.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct DefaultDenyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<bool>,
}

/// Hubble logging settings of a rule.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct LogConfig {
    /// Text added to the flows this rule matches (at most 32 printable
    /// characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = LOG_VALUE_PATTERN))]
    pub value: Option<String>,
}

/// Allowed incoming traffic. All fields set must match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    /// Peer endpoints allowed to connect. Absent means any peer when
    /// `toPorts` is set; an empty list selects nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_endpoints: Option<Vec<EndpointSelector>>,
    /// Extra constraints every peer must meet (deprecated upstream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_requires: Option<Vec<EndpointSelector>>,
    /// Peer CIDRs outside the cluster.
    #[serde(rename = "fromCIDR", default, skip_serializing_if = "Option::is_none")]
    pub from_cidr: Option<Vec<Cidr>>,
    /// Peer CIDRs with exceptions, or CIDR groups.
    #[serde(rename = "fromCIDRSet", default, skip_serializing_if = "Option::is_none")]
    pub from_cidr_set: Option<Vec<CidrRule>>,
    /// Special peers (`world`, `cluster`, `host`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_entities: Option<Vec<Entity>>,
    /// Cloud-provider groups (kept as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object_list")]
    pub from_groups: Option<Value>,
    /// Peer nodes, selected by node labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_nodes: Option<Vec<EndpointSelector>>,
    /// Ports (and L7 rules) the traffic may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
    /// ICMP types the traffic may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmps: Option<Vec<IcmpRule>>,
    /// Authentication the traffic requires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
}

/// Denied incoming traffic. All fields set must match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressDenyRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_endpoints: Option<Vec<EndpointSelector>>,
    /// Deprecated upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_requires: Option<Vec<EndpointSelector>>,
    #[serde(rename = "fromCIDR", default, skip_serializing_if = "Option::is_none")]
    pub from_cidr: Option<Vec<Cidr>>,
    #[serde(rename = "fromCIDRSet", default, skip_serializing_if = "Option::is_none")]
    pub from_cidr_set: Option<Vec<CidrRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_entities: Option<Vec<Entity>>,
    /// Cloud-provider groups (kept as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object_list")]
    pub from_groups: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_nodes: Option<Vec<EndpointSelector>>,
    /// Ports denied (no L7 rules in deny rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortDenyRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmps: Option<Vec<IcmpRule>>,
}

/// Allowed outgoing traffic. All fields set must match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Peer endpoints that may be reached. Absent means any peer when
    /// `toPorts` is set; an empty list selects nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_endpoints: Option<Vec<EndpointSelector>>,
    /// Extra constraints every peer must meet (deprecated upstream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_requires: Option<Vec<EndpointSelector>>,
    /// Peer CIDRs outside the cluster.
    #[serde(rename = "toCIDR", default, skip_serializing_if = "Option::is_none")]
    pub to_cidr: Option<Vec<Cidr>>,
    /// Peer CIDRs with exceptions, or CIDR groups.
    #[serde(rename = "toCIDRSet", default, skip_serializing_if = "Option::is_none")]
    pub to_cidr_set: Option<Vec<CidrRule>>,
    /// Special peers (`world`, `cluster`, `host`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_entities: Option<Vec<Entity>>,
    /// Kubernetes services (kept as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object_list")]
    pub to_services: Option<Value>,
    /// Cloud-provider groups (kept as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object_list")]
    pub to_groups: Option<Value>,
    /// Peer nodes, selected by node labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_nodes: Option<Vec<EndpointSelector>>,
    /// Ports (and L7 rules) the traffic may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
    /// DNS names whose resolved IPs may be reached.
    #[serde(rename = "toFQDNs", default, skip_serializing_if = "Option::is_none")]
    pub to_fqdns: Option<Vec<FqdnSelector>>,
    /// ICMP types the traffic may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmps: Option<Vec<IcmpRule>>,
    /// Authentication the traffic requires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
}

/// Denied outgoing traffic. All fields set must match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressDenyRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_endpoints: Option<Vec<EndpointSelector>>,
    /// Deprecated upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_requires: Option<Vec<EndpointSelector>>,
    #[serde(rename = "toCIDR", default, skip_serializing_if = "Option::is_none")]
    pub to_cidr: Option<Vec<Cidr>>,
    #[serde(rename = "toCIDRSet", default, skip_serializing_if = "Option::is_none")]
    pub to_cidr_set: Option<Vec<CidrRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_entities: Option<Vec<Entity>>,
    /// Kubernetes services (kept as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object_list")]
    pub to_services: Option<Value>,
    /// Cloud-provider groups (kept as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object_list")]
    pub to_groups: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_nodes: Option<Vec<EndpointSelector>>,
    /// Ports denied (no L7 rules in deny rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortDenyRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmps: Option<Vec<IcmpRule>>,
}

/// A CIDR with exceptions, or a reference to CiliumCIDRGroups. Exactly one
/// of `cidr`, `cidrGroupRef` and `cidrGroupSelector` must be set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [
    {"required": ["cidr"]},
    {"required": ["cidrGroupRef"]},
    {"required": ["cidrGroupSelector"]}
]))]
pub struct CidrRule {
    /// The prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<Cidr>,
    /// Name of a CiliumCIDRGroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), regex(pattern = CIDR_GROUP_REF_PATTERN))]
    pub cidr_group_ref: Option<String>,
    /// Labels of CiliumCIDRGroups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr_group_selector: Option<EndpointSelector>,
    /// Prefixes inside `cidr` that are excluded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except: Option<Vec<Cidr>>,
}

/// Peers that have no identity of their own.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Entity {
    All,
    World,
    // IPv4 addresses outside the cluster (a plain comment: a doc comment
    // would move the variant out of the schema's enum).
    #[serde(rename = "world-ipv4")]
    WorldIpv4,
    // IPv6 addresses outside the cluster.
    #[serde(rename = "world-ipv6")]
    WorldIpv6,
    Cluster,
    // This cluster and every cluster of the mesh.
    ClusterMesh,
    Host,
    Init,
    Ingress,
    Unmanaged,
    RemoteNode,
    Health,
    None,
    KubeApiserver,
}

/// Ports a rule allows, optionally with TLS and L7 settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortRule {
    /// Ports and protocols (at most 40).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 40))]
    pub ports: Option<Vec<PortProtocol>>,
    /// TLS context of connections the proxy terminates (kept as written).
    #[serde(rename = "terminatingTLS", default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub terminating_tls: Option<Value>,
    /// TLS context of connections the proxy originates (kept as written).
    #[serde(rename = "originatingTLS", default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub originating_tls: Option<Value>,
    /// Allowed TLS SNI values; when set, TLS with one of them is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1), inner(length(max = 255), regex(pattern = SERVER_NAME_PATTERN)))]
    pub server_names: Option<Vec<String>>,
    /// L7 rules (`http`, `kafka`, `dns`, `l7proto`/`l7`), kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub rules: Option<Value>,
    /// Custom Envoy listener to redirect to (kept as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub listener: Option<Value>,
}

/// Ports a deny rule applies to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct PortDenyRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortProtocol>>,
}

/// A port (or port range) and protocol.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortProtocol {
    /// Port number or port name (e.g. `http`). Absent means all ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = PORT_PATTERN))]
    pub port: Option<String>,
    /// Last port of a range starting at `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub end_port: Option<i32>,
    /// L4 protocol; absent or `ANY` means TCP, UDP and SCTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<L4Proto>,
}

/// An L4 protocol of a port rule.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum L4Proto {
    Tcp,
    Udp,
    Sctp,
    Vrrp,
    Igmp,
    Any,
}

/// A DNS name or pattern. Exactly one of `matchName` and `matchPattern`
/// must be set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [{"required": ["matchName"]}, {"required": ["matchPattern"]}]))]
pub struct FqdnSelector {
    /// A literal DNS name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = FQDN_MAX_LENGTH), regex(pattern = FQDN_NAME_PATTERN))]
    pub match_name: Option<String>,
    /// A DNS name with `*` wildcards (`*.example.com`, `**.example.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = FQDN_MAX_LENGTH), regex(pattern = FQDN_MATCH_PATTERN))]
    pub match_pattern: Option<String>,
}

/// A list of ICMP types.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct IcmpRule {
    /// ICMP family and type pairs (at most 40).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 40))]
    pub fields: Option<Vec<IcmpField>>,
}

/// One ICMP type of a family.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct IcmpField {
    /// `IPv4` (the default) or `IPv6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "IPv4"))]
    pub family: Option<IcmpFamily>,
    /// ICMP type number (0-255) or name (e.g. `EchoRequest`).
    #[serde(rename = "type")]
    pub type_: IcmpType,
}

/// IP family of an ICMP rule.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum IcmpFamily {
    #[serde(rename = "IPv4")]
    Ipv4,
    #[serde(rename = "IPv6")]
    Ipv6,
}

/// An ICMP type, as a number or as a message name. Kept in the form it was
/// written in.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum IcmpType {
    Number(i64),
    Name(String),
}

impl JsonSchema for IcmpType {
    fn schema_name() -> Cow<'static, str> {
        "IcmpType".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "ICMP type number (0-255) or name (e.g. `EchoRequest`).",
            "x-kubernetes-int-or-string": true,
            "minimum": 0,
            "maximum": 255,
            "pattern": ICMP_TYPE_PATTERN,
        })
    }
}

/// Authentication required for allowed traffic.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub struct Authentication {
    pub mode: AuthenticationMode,
}

/// Authentication mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AuthenticationMode {
    Disabled,
    Required,
    TestAlwaysFail,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn crd_schema(crd: &CustomResourceDefinition) -> Value {
        serde_json::to_value(crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap())
            .unwrap()
    }

    fn columns(crd: &CustomResourceDefinition) -> Vec<(&str, &str, &str)> {
        crd.spec.versions[0]
            .additional_printer_columns
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|c| (c.name.as_str(), c.type_.as_str(), c.json_path.as_str()))
            .collect()
    }

    #[test]
    fn cnp_crd_names_scope_and_columns_match_upstream() {
        let crd = CiliumNetworkPolicy::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("ciliumnetworkpolicies.cilium.io"));
        assert_eq!(crd.spec.scope, "Namespaced");
        let names = &crd.spec.names;
        assert_eq!(names.kind, "CiliumNetworkPolicy");
        assert_eq!(names.list_kind.as_deref(), Some("CiliumNetworkPolicyList"));
        assert_eq!(names.singular.as_deref(), Some("ciliumnetworkpolicy"));
        assert_eq!(names.short_names, Some(vec!["cnp".to_string(), "ciliumnp".to_string()]));
        assert_eq!(names.categories, Some(vec!["cilium".to_string(), "ciliumpolicy".to_string()]));
        assert!(crd.spec.versions[0].subresources.as_ref().unwrap().status.is_some());
        assert_eq!(
            columns(&crd),
            vec![
                ("Age", "date", ".metadata.creationTimestamp"),
                ("Valid", "string", ".status.conditions[?(@.type=='Valid')].status"),
            ]
        );
        let schema = crd_schema(&crd);
        assert_eq!(schema["required"], json!(["metadata"]));
        for key in ["spec", "specs", "status"] {
            assert!(schema["properties"].get(key).is_some(), "{key}");
        }
    }

    #[test]
    fn ccnp_crd_names_scope_and_columns_match_upstream() {
        let crd = CiliumClusterwideNetworkPolicy::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("ciliumclusterwidenetworkpolicies.cilium.io"));
        assert_eq!(crd.spec.scope, "Cluster");
        let names = &crd.spec.names;
        assert_eq!(names.kind, "CiliumClusterwideNetworkPolicy");
        assert_eq!(names.list_kind.as_deref(), Some("CiliumClusterwideNetworkPolicyList"));
        assert_eq!(names.singular.as_deref(), Some("ciliumclusterwidenetworkpolicy"));
        assert_eq!(names.short_names, Some(vec!["ccnp".to_string()]));
        assert_eq!(names.categories, Some(vec!["cilium".to_string(), "ciliumpolicy".to_string()]));
        assert!(crd.spec.versions[0].subresources.as_ref().unwrap().status.is_some());
        assert_eq!(columns(&crd), vec![("Valid", "string", ".status.conditions[?(@.type=='Valid')].status")]);
        // Same rule schema as the namespaced kind.
        assert_eq!(
            crd_schema(&crd)["properties"]["spec"],
            crd_schema(&CiliumNetworkPolicy::crd())["properties"]["spec"]
        );
    }

    #[test]
    fn rule_schema_validates_what_upstream_validates() {
        let schema = crd_schema(&CiliumNetworkPolicy::crd())["properties"]["spec"].clone();
        assert_eq!(schema["oneOf"], json!([{"required": ["endpointSelector"]}, {"required": ["nodeSelector"]}]));
        let egress = &schema["properties"]["egress"]["items"]["properties"];
        let ingress = &schema["properties"]["ingress"]["items"]["properties"];

        let port = &egress["toPorts"]["items"]["properties"]["ports"];
        assert_eq!(port["maxItems"], 40);
        let port = &port["items"]["properties"];
        assert_eq!(port["port"]["pattern"], PORT_PATTERN);
        assert_eq!(port["endPort"]["minimum"].as_f64(), Some(0.0));
        assert_eq!(port["endPort"]["maximum"].as_f64(), Some(65535.0));
        assert_eq!(port["protocol"]["enum"], json!(["TCP", "UDP", "SCTP", "VRRP", "IGMP", "ANY"]));

        let entities = json!([
            "all",
            "world",
            "world-ipv4",
            "world-ipv6",
            "cluster",
            "cluster-mesh",
            "host",
            "init",
            "ingress",
            "unmanaged",
            "remote-node",
            "health",
            "none",
            "kube-apiserver"
        ]);
        assert_eq!(egress["toEntities"]["items"]["enum"], entities);
        assert_eq!(ingress["fromEntities"]["items"]["enum"], entities);

        for cidr in [&egress["toCIDR"]["items"], &ingress["fromCIDR"]["items"]] {
            assert_eq!(cidr["format"], "cidr");
        }
        let set = &egress["toCIDRSet"]["items"];
        assert_eq!(set["properties"]["cidr"]["format"], "cidr");
        assert_eq!(set["properties"]["except"]["items"]["format"], "cidr");
        assert_eq!(set["properties"]["cidrGroupRef"]["maxLength"], 253);
        assert_eq!(set["oneOf"].as_array().unwrap().len(), 3);

        let icmp = &ingress["icmps"]["items"]["properties"]["fields"];
        assert_eq!(icmp["maxItems"], 40);
        let icmp = &icmp["items"];
        assert_eq!(icmp["required"], json!(["type"]));
        assert_eq!(icmp["properties"]["family"]["enum"], json!(["IPv4", "IPv6"]));
        assert_eq!(icmp["properties"]["family"]["default"], "IPv4");
        assert_eq!(icmp["properties"]["type"]["x-kubernetes-int-or-string"], true);

        let fqdn = &egress["toFQDNs"]["items"];
        assert_eq!(fqdn["properties"]["matchName"]["pattern"], FQDN_NAME_PATTERN);
        assert_eq!(fqdn["properties"]["matchPattern"]["maxLength"], 255);

        let auth = &ingress["authentication"];
        assert_eq!(auth["required"], json!(["mode"]));
        assert_eq!(auth["properties"]["mode"]["enum"], json!(["disabled", "required", "test-always-fail"]));

        let server_names = &egress["toPorts"]["items"]["properties"]["serverNames"];
        assert_eq!(server_names["minItems"], 1);
        assert_eq!(server_names["items"]["pattern"], SERVER_NAME_PATTERN);

        // Deny rules have ports only: no L7, TLS or listener.
        let deny_ports = &schema["properties"]["egressDeny"]["items"]["properties"]["toPorts"]["items"];
        assert_eq!(deny_ports["properties"].as_object().unwrap().keys().collect::<Vec<_>>(), ["ports"]);
        assert!(schema["properties"]["ingressDeny"]["items"]["properties"].get("authentication").is_none());

        for preserved in [
            &egress["toPorts"]["items"]["properties"]["rules"],
            &egress["toPorts"]["items"]["properties"]["terminatingTLS"],
            &egress["toPorts"]["items"]["properties"]["listener"],
            &egress["toServices"]["items"],
            &ingress["fromGroups"]["items"],
        ] {
            assert_eq!(preserved["type"], "object");
            assert_eq!(preserved["x-kubernetes-preserve-unknown-fields"], true);
        }
    }

    #[test]
    fn icmp_type_keeps_its_form() {
        let fields: Vec<IcmpField> =
            serde_json::from_value(json!([{"type": 8}, {"family": "IPv6", "type": "EchoRequest"}, {"type": "0"}]))
                .unwrap();
        assert_eq!(fields[0].type_, IcmpType::Number(8));
        assert_eq!(fields[1].type_, IcmpType::Name("EchoRequest".into()));
        assert_eq!(fields[1].family, Some(IcmpFamily::Ipv6));
        assert_eq!(fields[2].type_, IcmpType::Name("0".into()));
        assert_eq!(
            serde_json::to_value(&fields).unwrap(),
            json!([{"type": 8}, {"family": "IPv6", "type": "EchoRequest"}, {"type": "0"}])
        );
    }

    #[test]
    fn rules_iterates_spec_then_specs() {
        let policy: CiliumNetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"endpointSelector": {}, "description": "a"},
            "specs": [{"endpointSelector": {}, "description": "b"}, {"endpointSelector": {}, "description": "c"}]
        }))
        .unwrap();
        let descriptions: Vec<_> = policy.rules().map(|r| r.description.as_deref().unwrap()).collect();
        assert_eq!(descriptions, ["a", "b", "c"]);
    }

    #[test]
    fn empty_and_absent_lists_stay_distinct() {
        let input = json!({"fromEndpoints": [], "toPorts": [{"ports": [{"port": "80"}]}]});
        let rule: IngressRule = serde_json::from_value(input.clone()).unwrap();
        assert_eq!(rule.from_endpoints, Some(vec![]));
        assert_eq!(rule.from_cidr, None);
        assert_eq!(serde_json::to_value(&rule).unwrap(), input);
    }

    #[test]
    fn status_round_trips() {
        let status = json!({
            "conditions": [{
                "type": "Valid", "status": "True", "lastTransitionTime": "2024-05-02T10:00:00Z",
                "message": "Policy validation succeeded", "reason": "Valid"
            }],
            "derivativePolicies": {"to-groups-x": {"ok": true, "enforcing": true, "localPolicyRevision": 12,
                "lastUpdated": "2024-05-02T10:00:01Z", "annotations": {"a": "b"}, "error": ""}}
        });
        let parsed: PolicyStatus = serde_json::from_value(status.clone()).unwrap();
        assert_eq!(parsed.conditions.as_ref().unwrap()[0].type_, CONDITION_VALID);
        assert_eq!(serde_json::to_value(&parsed).unwrap(), status);
    }
}
