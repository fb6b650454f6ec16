//! kvstore backend: upstream's etcd layout under
//! `cilium/state/identities/v1/`:
//!
//! | key | value | lease |
//! |---|---|---|
//! | `id/<ID>` | label key string | none (created only if absent) |
//! | `value/<labels>/<node>` | decimal ID | the allocator's session lease |
//! | `locks/<labels>/<leaseID hex>` | etcd mutex | a 25 s lock lease |
//!
//! Allocation: any `value/<labels>/` key names the ID (write our own value
//! key and done); otherwise take the per-labels lock, look again, then create
//! the first free `id/<ID>` in [`probe_order`] with a create-only
//! transaction and write our value key. Racing allocators for the same
//! labels are serialised by the lock, so they get the same ID.

use std::ops::RangeInclusive;

use cilium_identity::Labels;
use etcd_client::{Client, Compare, CompareOp, GetOptions, LockOptions, PutOptions, Txn, TxnOp};

use crate::{AllocError, Identity, probe_order};

/// Root of the identity keys.
pub const PREFIX: &str = "cilium/state/identities/v1/";
/// TTL of the allocator's session lease (upstream: 15 minutes).
pub const SESSION_TTL: i64 = 15 * 60;
/// TTL of a lock's lease (upstream: 25 seconds).
pub const LOCK_TTL: i64 = 25;

pub fn id_key(id: u32) -> String {
    format!("{PREFIX}id/{id}")
}

pub fn value_prefix(labels_key: &str) -> String {
    format!("{PREFIX}value/{labels_key}/")
}

pub fn lock_name(labels_key: &str) -> String {
    format!("{PREFIX}locks/{labels_key}")
}

fn kv(e: etcd_client::Error) -> AllocError {
    AllocError::Kvstore(e.to_string())
}

pub struct KvstoreAllocator {
    client: Client,
    range: RangeInclusive<u32>,
    /// The value-key suffix: upstream uses the node's IP.
    node: String,
    session: i64,
    keepalive: tokio::task::JoinHandle<()>,
}

impl Drop for KvstoreAllocator {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

impl KvstoreAllocator {
    /// Grants the session lease and keeps it alive in the background.
    pub async fn new(client: Client, range: RangeInclusive<u32>, node: &str) -> Result<KvstoreAllocator, AllocError> {
        let mut c = client.clone();
        let session = c.lease_grant(SESSION_TTL, None).await.map_err(kv)?.id();
        let keepalive = tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(SESSION_TTL as u64 / 3)).await;
                match c.lease_keep_alive(session).await {
                    Ok((mut keeper, _stream)) => {
                        if let Err(e) = keeper.keep_alive().await {
                            tracing::warn!(error = %e, "kvstore session keep-alive failed");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "kvstore session keep-alive failed"),
                }
            }
        });
        Ok(KvstoreAllocator { client, range, node: node.to_string(), session, keepalive })
    }

    pub fn session_lease(&self) -> i64 {
        self.session
    }

    /// The identity of `labels`, allocating one if needed.
    pub async fn allocate(&self, labels: &Labels) -> Result<Identity, AllocError> {
        if labels.is_empty() {
            return Err(AllocError::EmptyLabels);
        }
        let key = labels.key_string();
        // Fast path: another node's value key names the ID. Our value key is
        // written only if `id/<ID>` still exists (one transaction), so it can
        // never outlive an ID the GC just deleted.
        if let Some(id) = self.lookup_value(&key).await?
            && self.put_value_if_id_exists(&key, id).await?
        {
            return Ok(Identity { id, labels: labels.clone() });
        }
        self.with_lock(&key, self.allocate_locked(labels, &key)).await
    }

    async fn allocate_locked(&self, labels: &Labels, key: &str) -> Result<Identity, AllocError> {
        if let Some(id) = self.lookup_value(key).await?
            && self.put_value_if_id_exists(key, id).await?
        {
            return Ok(Identity { id, labels: labels.clone() });
        }
        for id in probe_order(labels, &self.range) {
            if self.create_id(id, key).await? {
                self.put_value(key, id).await?;
                return Ok(Identity { id, labels: labels.clone() });
            }
        }
        Err(AllocError::RangeFull(self.range.clone()))
    }

    /// The ID any value key of these labels names.
    pub async fn lookup_value(&self, labels_key: &str) -> Result<Option<u32>, AllocError> {
        let mut c = self.client.clone();
        let resp =
            c.get(value_prefix(labels_key), Some(GetOptions::new().with_prefix().with_limit(1))).await.map_err(kv)?;
        Ok(resp.kvs().first().and_then(|kv| kv.value_str().ok()?.parse().ok()))
    }

    /// The labels key string stored for an ID.
    pub async fn lookup_by_id(&self, id: u32) -> Result<Option<String>, AllocError> {
        let mut c = self.client.clone();
        let resp = c.get(id_key(id), None).await.map_err(kv)?;
        Ok(resp.kvs().first().and_then(|kv| kv.value_str().ok().map(String::from)))
    }

    /// Creates `id/<ID>` for these labels if absent; returns whether it now
    /// holds exactly these labels (created, or already theirs).
    pub async fn create_id(&self, id: u32, labels_key: &str) -> Result<bool, AllocError> {
        let mut c = self.client.clone();
        let txn = Txn::new().when([Compare::create_revision(id_key(id), CompareOp::Equal, 0)]).and_then([TxnOp::put(
            id_key(id),
            labels_key,
            None,
        )]);
        if c.txn(txn).await.map_err(kv)?.succeeded() {
            return Ok(true);
        }
        Ok(self.lookup_by_id(id).await?.as_deref() == Some(labels_key))
    }

    /// Runs `f` holding the per-labels lock (upstream: locks always live in
    /// the kvstore, whatever the allocation mode).
    pub async fn with_lock<T, F: std::future::Future<Output = Result<T, AllocError>>>(
        &self,
        labels_key: &str,
        f: F,
    ) -> Result<T, AllocError> {
        let mut c = self.client.clone();
        let lock_lease = c.lease_grant(LOCK_TTL, None).await.map_err(kv)?.id();
        let result = async {
            let lock =
                c.lock(lock_name(labels_key), Some(LockOptions::new().with_lease(lock_lease))).await.map_err(kv)?;
            let outcome = f.await;
            let _ = c.clone().unlock(lock.key().to_vec()).await;
            outcome
        }
        .await;
        let _ = c.lease_revoke(lock_lease).await;
        result
    }

    /// Writes our value key for `id` if `id/<ID>` holds these labels.
    async fn put_value_if_id_exists(&self, labels_key: &str, id: u32) -> Result<bool, AllocError> {
        let mut c = self.client.clone();
        let key = format!("{}{}", value_prefix(labels_key), self.node);
        let txn = Txn::new().when([Compare::value(id_key(id), CompareOp::Equal, labels_key)]).and_then([TxnOp::put(
            key,
            id.to_string(),
            Some(PutOptions::new().with_lease(self.session)),
        )]);
        Ok(c.txn(txn).await.map_err(kv)?.succeeded())
    }

    /// Writes our `value/<labels>/<node>` key for `id`.
    pub async fn put_value(&self, labels_key: &str, id: u32) -> Result<(), AllocError> {
        let mut c = self.client.clone();
        let key = format!("{}{}", value_prefix(labels_key), self.node);
        c.put(key, id.to_string(), Some(PutOptions::new().with_lease(self.session))).await.map_err(kv)?;
        Ok(())
    }

    /// Stops using the identity of `labels` (removes our value key; the
    /// operator's GC deletes the ID once nobody uses it).
    pub async fn release(&self, labels: &Labels) -> Result<(), AllocError> {
        let mut c = self.client.clone();
        let key = format!("{}{}", value_prefix(&labels.key_string()), self.node);
        c.delete(key, None).await.map_err(kv)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layout() {
        assert_eq!(id_key(1234), "cilium/state/identities/v1/id/1234");
        let labels = "k8s:app=foo;k8s:io.kubernetes.pod.namespace=default;";
        assert_eq!(
            value_prefix(labels),
            "cilium/state/identities/v1/value/k8s:app=foo;k8s:io.kubernetes.pod.namespace=default;/"
        );
        assert_eq!(
            lock_name(labels),
            "cilium/state/identities/v1/locks/k8s:app=foo;k8s:io.kubernetes.pod.namespace=default;"
        );
    }
}
