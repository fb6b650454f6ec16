//! CRD backend: one cluster-scoped CiliumIdentity per identity, named by its
//! decimal ID, `security-labels` holding the full label set.
//!
//! Allocation: reuse an existing identity with exactly these labels (oldest
//! first, as upstream resolves duplicates); else walk [`probe_order`] and
//! create the first free ID. Creation is atomic on the API server, and racing
//! allocators for the same labels walk the same order, so they meet on the
//! same ID: the loser of a create conflict reads the winner's object and
//! takes it when the labels match.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use cilium_crds::CiliumIdentity;
use cilium_identity::{Labels, labels::SOURCE_K8S};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::core::DeserializeGuard;

use crate::{AllocError, HEARTBEAT_ANNOTATION, Identity, probe_order};

/// Namespace labels are kept out of `metadata.labels` (upstream).
const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

pub struct CrdAllocator {
    api: Api<CiliumIdentity>,
    /// Reads decode object by object: a CiliumIdentity stored in a shape we
    /// cannot read (an older schema) holds its ID, it does not stall us.
    read: Api<DeserializeGuard<CiliumIdentity>>,
    range: RangeInclusive<u32>,
    field_manager: String,
}

/// The label key string of a CiliumIdentity's `security-labels`.
pub fn key_of(identity: &CiliumIdentity) -> String {
    labels_of(identity).key_string()
}

/// The labels of a CiliumIdentity.
pub fn labels_of(identity: &CiliumIdentity) -> Labels {
    identity
        .security_labels
        .iter()
        .map(|(k, v)| {
            let (source, key) = k.split_once(':').unwrap_or(("unspec", k));
            cilium_identity::Label::new(source, key, v)
        })
        .collect()
}

/// A valid Kubernetes label key/value pair (what may go into
/// `metadata.labels` and a label selector).
fn valid_label(key: &str, value: &str) -> bool {
    let ok_name = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    let (prefix, name) = key.rsplit_once('/').map(|(p, n)| (Some(p), n)).unwrap_or((None, key));
    prefix.is_none_or(|p| !p.is_empty() && p.len() <= 253) && ok_name(name) && (value.is_empty() || ok_name(value))
}

/// `metadata.labels` of an identity: its `k8s:` labels without the prefix,
/// without namespace labels, and only where Kubernetes accepts them.
pub fn object_labels(labels: &Labels) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter(|l| {
            l.source == SOURCE_K8S && !l.key.starts_with(NAMESPACE_LABELS_PREFIX) && valid_label(&l.key, &l.value)
        })
        .map(|l| (l.key.clone(), l.value.clone()))
        .collect()
}

/// The CiliumIdentity object of an identity.
pub fn identity_object(id: u32, labels: &Labels) -> CiliumIdentity {
    CiliumIdentity {
        metadata: ObjectMeta { name: Some(id.to_string()), labels: Some(object_labels(labels)), ..Default::default() },
        security_labels: labels.security_labels(),
        ..Default::default()
    }
}

/// Outcome of [`CrdAllocator::create_with_id`].
#[derive(Debug, PartialEq, Eq)]
pub enum Created {
    /// We created it.
    New,
    /// It existed with these labels already.
    Existing,
    /// The ID holds other labels.
    Taken,
}

impl CrdAllocator {
    /// Creates the identity `id` for `labels` unless it exists.
    pub async fn create_with_id(&self, id: u32, labels: &Labels) -> Result<Created, AllocError> {
        let pp = PostParams { field_manager: Some(self.field_manager.clone()), ..Default::default() };
        match self.api.create(&pp, &identity_object(id, labels)).await {
            Ok(_) => Ok(Created::New),
            Err(kube::Error::Api(s)) if s.code == 409 => match self.get(&id.to_string()).await? {
                Some(Ok(found)) if key_of(&found) == labels.key_string() && self.unmark(&found).await? => {
                    Ok(Created::Existing)
                }
                _ => Ok(Created::Taken),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes identity `id` (undo of a double-write whose kvstore half
    /// failed).
    pub async fn delete(&self, id: u32) -> Result<(), AllocError> {
        match self.api.delete(&id.to_string(), &Default::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn new(client: kube::Client, range: RangeInclusive<u32>, field_manager: &str) -> CrdAllocator {
        CrdAllocator {
            api: Api::all(client.clone()),
            read: Api::all(client),
            range,
            field_manager: field_manager.into(),
        }
    }

    pub fn range(&self) -> &RangeInclusive<u32> {
        &self.range
    }

    /// The identity of `labels`, allocating one if needed.
    pub async fn allocate(&self, labels: &Labels) -> Result<Identity, AllocError> {
        if labels.is_empty() {
            return Err(AllocError::EmptyLabels);
        }
        // The GC may delete a marked identity between our read and our
        // unmark; then we start over.
        for _ in 0..5 {
            if let Some(identity) = self.try_allocate(labels).await? {
                return Ok(identity);
            }
        }
        Err(AllocError::Contended(labels.key_string()))
    }

    /// One attempt; `None` when an identity we were about to reuse vanished.
    async fn try_allocate(&self, labels: &Labels) -> Result<Option<Identity>, AllocError> {
        if let Some(existing) = self.lookup_by_labels(labels).await? {
            return Ok(Some(existing));
        }
        let wanted = labels.key_string();
        let pp = PostParams { field_manager: Some(self.field_manager.clone()), ..Default::default() };
        for id in probe_order(labels, &self.range) {
            let name = id.to_string();
            match self.get(&name).await? {
                Some(Ok(found)) if key_of(&found) == wanted => {
                    return Ok(self.unmark(&found).await?.then(|| Identity { id, labels: labels.clone() }));
                }
                Some(_) => continue,
                None => {}
            }
            match self.api.create(&pp, &identity_object(id, labels)).await {
                Ok(_) => return Ok(Some(Identity { id, labels: labels.clone() })),
                // Someone created this ID first: ours if the labels match.
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    if let Some(Ok(found)) = self.get(&name).await?
                        && key_of(&found) == wanted
                    {
                        return Ok(Some(Identity { id, labels: labels.clone() }));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(AllocError::RangeFull(self.range.clone()))
    }

    /// [`allocate`](Self::allocate) taking its labels by value (for joins
    /// over many allocations).
    pub async fn allocate_owned(&self, labels: Labels) -> Result<Identity, AllocError> {
        self.allocate(&labels).await
    }

    /// The oldest identity in range holding exactly `labels`; removes its
    /// GC mark (the identity is in use again).
    pub async fn lookup_by_labels(&self, labels: &Labels) -> Result<Option<Identity>, AllocError> {
        let selector: Vec<String> = object_labels(labels).iter().map(|(k, v)| format!("{k}={v}")).collect();
        // Served from the API server's watch cache (resourceVersion 0): an
        // in-memory filter instead of a full etcd read per allocation. A
        // just-created identity it misses is found by the probe below.
        let list = self.read.list(&ListParams::default().labels(&selector.join(",")).match_any()).await?;
        let wanted = labels.key_string();
        let mut matches: Vec<CiliumIdentity> = list
            .items
            .into_iter()
            .filter_map(|g| g.0.ok())
            .filter(|i| key_of(i) == wanted && self.id_of(i).is_some())
            .collect();
        matches.sort_by_key(|i| (i.metadata.creation_timestamp.as_ref().map(|t| t.0), self.id_of(i)));
        let Some(oldest) = matches.into_iter().next() else {
            return Ok(None);
        };
        if !self.unmark(&oldest).await? {
            return Ok(None);
        }
        Ok(Some(Identity { id: self.id_of(&oldest).expect("filtered"), labels: labels.clone() }))
    }

    /// The CiliumIdentity named `name`, if it exists: `Err` with the
    /// reason when it cannot be decoded (its ID is held all the same).
    async fn get(&self, name: &str) -> Result<Option<Result<CiliumIdentity, String>>, AllocError> {
        let found = self.read.get_opt(name).await?;
        Ok(found.map(|g| {
            g.0.map_err(|bad| {
                tracing::warn!(identity = name, error = %bad.error, "CiliumIdentity cannot be decoded; its ID stays taken");
                bad.error
            })
        }))
    }

    fn id_of(&self, i: &CiliumIdentity) -> Option<u32> {
        i.metadata.name.as_deref()?.parse().ok().filter(|id| self.range.contains(id))
    }

    /// Removes the GC mark; the resourceVersion change makes a pending
    /// guarded delete by the GC fail.
    /// Returns false when the identity is gone (the GC deleted it first).
    async fn unmark(&self, identity: &CiliumIdentity) -> Result<bool, AllocError> {
        let marked = identity.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(HEARTBEAT_ANNOTATION));
        if !marked {
            return Ok(true);
        }
        let name = identity.metadata.name.clone().unwrap_or_default();
        let body = serde_json::json!({ "metadata": { "annotations": { HEARTBEAT_ANNOTATION: null } } });
        let pp = PatchParams { field_manager: Some(self.field_manager.clone()), ..Default::default() };
        match self.api.patch(&name, &pp, &Patch::Merge(&body)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cilium_identity::Label;

    #[test]
    fn object_labels_follow_upstream() {
        let labels: Labels = [
            Label::new("k8s", "app", "web"),
            Label::new("k8s", "io.kubernetes.pod.namespace", "default"),
            Label::new("k8s", "io.cilium.k8s.namespace.labels.team", "a"),
            Label::new("reserved", "host", ""),
            Label::new("k8s", "weird", "has space"),
        ]
        .into_iter()
        .collect();
        let m = object_labels(&labels);
        assert_eq!(
            m,
            [("app".to_string(), "web".to_string()), ("io.kubernetes.pod.namespace".into(), "default".into())].into()
        );
    }

    #[test]
    fn security_labels_round_trip() {
        let labels: Labels = [Label::new("k8s", "app", "web"), Label::new("k8s", "io.kubernetes.pod.namespace", "x")]
            .into_iter()
            .collect();
        let object = CiliumIdentity { security_labels: labels.security_labels(), ..Default::default() };
        assert_eq!(key_of(&object), labels.key_string());
    }
}
