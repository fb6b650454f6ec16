//! Lean views of Kubernetes objects for the operator's caches: only the
//! fields a duty reads are decoded and kept. A watch of `LeanPod` never
//! materialises a Pod's spec, managedFields, labels or annotations.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde::{Deserialize, Deserializer};

/// The metadata fields a cache needs: identity, version, owners, creation,
/// deletion.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct LeanMetaFields {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    creation_timestamp: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    deletion_timestamp: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    #[serde(default)]
    owner_references: Vec<LeanOwner>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanOwner {
    api_version: String,
    kind: String,
    name: String,
    uid: String,
}

/// Deserializes `metadata` keeping only the fields of [`LeanMetaFields`].
pub fn lean_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let f = LeanMetaFields::deserialize(d)?;
    Ok(ObjectMeta {
        name: f.name,
        namespace: f.namespace,
        uid: f.uid,
        resource_version: f.resource_version,
        creation_timestamp: f.creation_timestamp,
        deletion_timestamp: f.deletion_timestamp,
        owner_references: (!f.owner_references.is_empty()).then(|| {
            f.owner_references
                .into_iter()
                .map(|o| OwnerReference {
                    api_version: o.api_version,
                    kind: o.kind,
                    name: o.name,
                    uid: o.uid,
                    ..Default::default()
                })
                .collect()
        }),
        ..Default::default()
    })
}

/// A Pod as the endpoint GC sees it: metadata and `status.phase`.
#[derive(Deserialize, Clone, Debug)]
pub struct LeanPod {
    #[serde(deserialize_with = "lean_meta", default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub status: LeanPodStatus,
}

#[derive(Deserialize, Clone, Debug, Default)]
pub struct LeanPodStatus {
    pub phase: Option<String>,
}

/// A CiliumEndpoint as identity GC sees it: metadata and the identity ID.
#[derive(Deserialize, Clone, Debug)]
pub struct LeanEndpoint {
    #[serde(deserialize_with = "lean_meta", default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub status: LeanEndpointStatus,
}

#[derive(Deserialize, Clone, Debug, Default)]
pub struct LeanEndpointStatus {
    pub identity: Option<LeanEndpointIdentity>,
}

#[derive(Deserialize, Clone, Debug, Default)]
pub struct LeanEndpointIdentity {
    pub id: Option<i64>,
}

impl kube::Resource for LeanEndpoint {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "CiliumEndpoint".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        cilium_crds::GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        cilium_crds::VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "ciliumendpoints".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Any object by its metadata only (CiliumEndpoint, CiliumNode, ...):
/// `K` only lends its kind, group, version and plural.
#[derive(Deserialize, Clone, Debug)]
#[serde(bound = "")]
pub struct LeanObject<K> {
    #[serde(deserialize_with = "lean_meta", default)]
    pub metadata: ObjectMeta,
    #[serde(skip)]
    _kind: std::marker::PhantomData<fn() -> K>,
}

impl kube::Resource for LeanPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl<K: kube::Resource<DynamicType = ()>> kube::Resource for LeanObject<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(_: &()) -> Cow<'_, str> {
        K::kind(&())
    }
    fn group(_: &()) -> Cow<'_, str> {
        K::group(&())
    }
    fn version(_: &()) -> Cow<'_, str> {
        K::version(&())
    }
    fn plural(_: &()) -> Cow<'_, str> {
        K::plural(&())
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_what_caches_read() {
        let pod: LeanPod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "p", "namespace": "ns", "uid": "u1", "resourceVersion": "7",
                "labels": {"app": "x"}, "annotations": {"big": "y"},
                "managedFields": [{"manager": "kubectl"}],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u0", "controller": true}]
            },
            "spec": {"containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Succeeded", "podIP": "10.0.0.1"}
        }))
        .unwrap();
        assert_eq!(pod.metadata.uid.as_deref(), Some("u1"));
        assert_eq!(pod.metadata.resource_version.as_deref(), Some("7"));
        assert!(
            pod.metadata.labels.is_none()
                && pod.metadata.annotations.is_none()
                && pod.metadata.managed_fields.is_none()
        );
        assert_eq!(pod.metadata.owner_references.as_ref().unwrap()[0].kind, "ReplicaSet");
        assert_eq!(pod.status.phase.as_deref(), Some("Succeeded"));
    }
}
