//! CiliumIdentity: one numeric security identity and its labels.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::{self, CrdInfo};

/// A security identity (`cilium.io/v2`, cluster-scoped, short name
/// `ciliumid`). `metadata.name` is the decimal numeric ID.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct CiliumIdentity {
    #[serde(rename = "apiVersion", default)]
    #[schemars(skip)]
    pub api_version: crate::typemeta::ApiVersion,
    #[serde(default)]
    #[schemars(skip)]
    pub kind: crate::typemeta::Kind<CiliumIdentity>,
    #[serde(default)]
    #[schemars(skip)]
    pub metadata: ObjectMeta,
    /// The labels of the identity, `"source:key" -> value`; the source of
    /// truth for what the identity stands for.
    #[serde(rename = "security-labels", default)]
    pub security_labels: BTreeMap<String, String>,
}

crate::cilium_resource!(
    CiliumIdentity,
    kind = "CiliumIdentity",
    plural = "ciliumidentities",
    scope = k8s_openapi::ClusterResourceScope
);

pub const INFO: CrdInfo = CrdInfo {
    kind: "CiliumIdentity",
    plural: "ciliumidentities",
    singular: "ciliumidentity",
    short_names: &["ciliumid"],
    namespaced: false,
    // Upstream declares a status subresource although the type has no
    // status.
    status_subresource: true,
    printer_columns: &[
        ("Namespace", "string", ".metadata.labels.io\\.kubernetes\\.pod\\.namespace", "The namespace of the entity"),
        ("Age", "date", ".metadata.creationTimestamp", "The age of the identity"),
    ],
    required: &["metadata", "security-labels"],
};

impl CiliumIdentity {
    pub fn crd() -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
        crd::build::<Self>(&INFO)
    }
}
