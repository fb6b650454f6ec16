//! CiliumCIDRGroup: a named list of external CIDRs that policies select as
//! one peer (`cidrGroupRef`) or by the group's labels (`cidrGroupSelector`).
//! Served as `cilium.io/v2` (stored) and `cilium.io/v2alpha1` (deprecated),
//! as upstream; both versions have the same schema.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::{self, CrdInfo};
use crate::policy::Cidr;

/// A list of CIDRs outside the cluster (`cilium.io/v2`, cluster-scoped,
/// short name `ccg`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct CiliumCidrGroup {
    #[serde(rename = "apiVersion", default)]
    #[schemars(skip)]
    pub api_version: crate::typemeta::ApiVersion,
    #[serde(default)]
    #[schemars(skip)]
    pub kind: crate::typemeta::Kind<CiliumCidrGroup>,
    #[serde(default)]
    #[schemars(skip)]
    pub metadata: ObjectMeta,
    pub spec: CidrGroupSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CidrGroupSpec {
    /// CIDRs selecting peers outside the cluster.
    #[serde(rename = "externalCIDRs")]
    #[schemars(length(min = 0))]
    pub external_cidrs: Vec<Cidr>,
}

crate::cilium_resource!(
    CiliumCidrGroup,
    kind = "CiliumCIDRGroup",
    plural = "ciliumcidrgroups",
    scope = k8s_openapi::ClusterResourceScope
);

pub const INFO: CrdInfo = CrdInfo {
    kind: "CiliumCIDRGroup",
    plural: "ciliumcidrgroups",
    singular: "ciliumcidrgroup",
    short_names: &["ccg"],
    namespaced: false,
    status_subresource: false,
    printer_columns: &[],
    required: &["spec"],
};

impl CiliumCidrGroup {
    /// The CRD: `v2` served and stored, `v2alpha1` served and deprecated
    /// (same schema, so no conversion is needed).
    pub fn crd() -> CustomResourceDefinition {
        let mut crd = crd::build::<Self>(&INFO);
        let mut old = crd.spec.versions[0].clone();
        old.name = "v2alpha1".into();
        old.storage = false;
        old.deprecated = Some(true);
        crd.spec.versions.push(old);
        crd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_upstreams_form() {
        let g: CiliumCidrGroup = serde_json::from_value(serde_json::json!({
            "apiVersion": "cilium.io/v2alpha1", "kind": "CiliumCIDRGroup",
            "metadata": { "name": "vpn", "labels": { "team": "net" } },
            "spec": { "externalCIDRs": ["10.1.0.0/16", "2001:db8::/32"] }
        }))
        .unwrap();
        assert_eq!(g.spec.external_cidrs, vec![Cidr::from("10.1.0.0/16"), Cidr::from("2001:db8::/32")]);
        let crd = CiliumCidrGroup::crd();
        let versions: Vec<(&str, bool, Option<bool>)> =
            crd.spec.versions.iter().map(|v| (v.name.as_str(), v.storage, v.deprecated)).collect();
        assert_eq!(versions, [("v2", true, None), ("v2alpha1", false, Some(true))]);
    }
}
