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
//! key, only while `id/<ID>` holds these labels, and done); otherwise take
//! the per-labels lock, look again, then create the first free `id/<ID>` in
//! [`probe_order`] together with our value key in one create-only
//! transaction. Racing allocators for the same labels are serialised by the
//! lock, so they get the same ID. No path writes a value key unless its
//! `id/` key holds the same labels in the same transaction.
//!
//! The session lease is kept alive every few seconds; when etcd has lost it
//! (an outage longer than its TTL), a new session is granted and every local
//! value key is written again, re-creating a local identity's `id/` key that
//! the GC deleted meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use cilium_identity::Labels;
use etcd_client::{Client, Compare, CompareOp, GetOptions, LockOptions, PutOptions, Txn, TxnOp};

use crate::{AllocError, Identity, probe_order};

/// Root of the identity keys.
pub const PREFIX: &str = "cilium/state/identities/v1/";
/// TTL of the allocator's session lease (upstream: 15 minutes).
pub const SESSION_TTL: i64 = 15 * 60;
/// TTL of a lock's lease (upstream: 25 seconds).
pub const LOCK_TTL: i64 = 25;
/// How often the session is kept alive and the local keys are checked.
pub const MAINTAIN_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

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
    /// The session lease every value key is attached to; replaced when
    /// etcd loses it.
    session: Arc<AtomicI64>,
    /// The identities this allocator holds (labels key -> ID).
    local: Arc<Mutex<BTreeMap<String, u32>>>,
    /// Local IDs found holding other labels (collected during an outage and
    /// taken by another label set): their users need a new identity.
    lost: Arc<Mutex<BTreeSet<u32>>>,
    maintainer: tokio::task::JoinHandle<()>,
}

impl Drop for KvstoreAllocator {
    fn drop(&mut self) {
        self.maintainer.abort();
    }
}

impl KvstoreAllocator {
    /// Grants the session lease (upstream's TTL, [`SESSION_TTL`]) and keeps
    /// it alive in the background.
    pub async fn new(client: Client, range: RangeInclusive<u32>, node: &str) -> Result<KvstoreAllocator, AllocError> {
        KvstoreAllocator::with_ttl(client, range, node, SESSION_TTL).await
    }

    /// Like [`KvstoreAllocator::new`] with a session TTL in seconds
    /// (upstream's `kvstore-lease-ttl`).
    pub async fn with_ttl(
        client: Client,
        range: RangeInclusive<u32>,
        node: &str,
        ttl: i64,
    ) -> Result<KvstoreAllocator, AllocError> {
        let mut c = client.clone();
        let session = Arc::new(AtomicI64::new(c.lease_grant(ttl, None).await.map_err(kv)?.id()));
        let local: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
        let lost: Arc<Mutex<BTreeSet<u32>>> = Arc::default();
        let maintainer =
            tokio::spawn(maintain(client.clone(), session.clone(), local.clone(), lost.clone(), node.to_string(), ttl));
        Ok(KvstoreAllocator { client, range, node: node.to_string(), session, local, lost, maintainer })
    }

    pub fn session_lease(&self) -> i64 {
        self.session.load(Ordering::SeqCst)
    }

    /// Takes the local IDs found holding other labels since the last call:
    /// whoever uses one must allocate its labels again (which gives another
    /// ID).
    pub fn take_lost(&self) -> BTreeSet<u32> {
        std::mem::take(&mut *self.lost.lock().expect("lost identities"))
    }

    fn remember(&self, key: &str, id: u32) {
        self.local.lock().expect("local identities").insert(key.to_string(), id);
    }

    /// The identity of `labels`, allocating one if needed.
    pub async fn allocate(&self, labels: &Labels) -> Result<Identity, AllocError> {
        if labels.is_empty() {
            return Err(AllocError::EmptyLabels);
        }
        let key = labels.key_string();
        // Fast path: another node's value key names the ID. Our value key is
        // written only if `id/<ID>` still holds these labels (one
        // transaction), so it can never outlive an ID the GC just deleted.
        if let Some(id) = self.lookup_value(&key).await?
            && put_value_if_id_holds(&self.client, &self.node, self.session_lease(), &key, id).await?
        {
            self.remember(&key, id);
            return Ok(Identity { id, labels: labels.clone() });
        }
        self.with_lock(&key, self.allocate_locked(labels, &key)).await
    }

    async fn allocate_locked(&self, labels: &Labels, key: &str) -> Result<Identity, AllocError> {
        if let Some(id) = self.lookup_value(key).await?
            && put_value_if_id_holds(&self.client, &self.node, self.session_lease(), key, id).await?
        {
            self.remember(key, id);
            return Ok(Identity { id, labels: labels.clone() });
        }
        for id in probe_order(labels, &self.range) {
            if self.claim(id, key).await? {
                self.remember(key, id);
                return Ok(Identity { id, labels: labels.clone() });
            }
        }
        Err(AllocError::RangeFull(self.range.clone()))
    }

    /// Takes `id` for these labels: creates `id/<ID>` and our value key in
    /// one transaction when the ID is free, or writes our value key when
    /// `id/<ID>` already holds these labels. Returns whether the ID is ours.
    pub async fn claim(&self, id: u32, labels_key: &str) -> Result<bool, AllocError> {
        claim(&self.client, &self.node, self.session_lease(), id, labels_key).await
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

    /// Stops using the identity of `labels` (removes our value key; the
    /// operator's GC deletes the ID once nobody uses it).
    pub async fn release(&self, labels: &Labels) -> Result<(), AllocError> {
        let mut c = self.client.clone();
        let lk = labels.key_string();
        self.local.lock().expect("local identities").remove(&lk);
        let key = format!("{}{}", value_prefix(&lk), self.node);
        c.delete(key, None).await.map_err(kv)?;
        Ok(())
    }
}

/// Writes our value key for `id` (on `session`) if `id/<ID>` holds these
/// labels.
async fn put_value_if_id_holds(
    client: &Client,
    node: &str,
    session: i64,
    labels_key: &str,
    id: u32,
) -> Result<bool, AllocError> {
    let mut c = client.clone();
    let key = format!("{}{}", value_prefix(labels_key), node);
    let txn = Txn::new().when([Compare::value(id_key(id), CompareOp::Equal, labels_key)]).and_then([TxnOp::put(
        key,
        id.to_string(),
        Some(PutOptions::new().with_lease(session)),
    )]);
    Ok(c.txn(txn).await.map_err(kv)?.succeeded())
}

/// Creates `id/<ID>` with our value key when absent (one transaction), or
/// writes our value key when it holds these labels.
async fn claim(client: &Client, node: &str, session: i64, id: u32, labels_key: &str) -> Result<bool, AllocError> {
    let mut c = client.clone();
    let value = format!("{}{}", value_prefix(labels_key), node);
    let txn = Txn::new().when([Compare::create_revision(id_key(id), CompareOp::Equal, 0)]).and_then([
        TxnOp::put(id_key(id), labels_key, None),
        TxnOp::put(value, id.to_string(), Some(PutOptions::new().with_lease(session))),
    ]);
    if c.txn(txn).await.map_err(kv)?.succeeded() {
        return Ok(true);
    }
    put_value_if_id_holds(client, node, session, labels_key, id).await
}

/// One keep-alive round: `Ok(true)` alive, `Ok(false)` etcd dropped the
/// lease, `Err` no answer.
async fn keep_alive(c: &mut Client, lease: i64) -> Result<bool, String> {
    let (mut keeper, mut stream) = c.lease_keep_alive(lease).await.map_err(|e| e.to_string())?;
    keeper.keep_alive().await.map_err(|e| e.to_string())?;
    let r = tokio::time::timeout(std::time::Duration::from_secs(5), stream.message())
        .await
        .map_err(|_| "no answer within 5s".to_string())?
        .map_err(|e| e.to_string())?
        .ok_or("keep-alive stream closed")?;
    Ok(r.ttl() > 0)
}

/// Keeps the session alive; when etcd has lost it (an outage longer than
/// its TTL, or a revoke), grants a new one; every round, makes sure each
/// local identity's `id/` key holds its labels (re-created if the GC deleted
/// it meanwhile) and its value key exists on the current session. Failures
/// are logged and retried next round; every request carries the client's
/// timeouts, so a black-holed etcd only delays this task.
async fn maintain(
    client: Client,
    session: Arc<AtomicI64>,
    local: Arc<Mutex<BTreeMap<String, u32>>>,
    taken: Arc<Mutex<BTreeSet<u32>>>,
    node: String,
    ttl: i64,
) {
    let mut c = client.clone();
    let mut last_ok = std::time::Instant::now();
    let mut lost = false;
    loop {
        tokio::time::sleep(MAINTAIN_EVERY).await;
        let lease = session.load(Ordering::SeqCst);
        match keep_alive(&mut c, lease).await {
            Ok(true) => last_ok = std::time::Instant::now(),
            Ok(false) => lost = true,
            Err(e) => {
                tracing::warn!(lease, error = %e, "kvstore session keep-alive failed");
                // Past its TTL etcd has dropped the lease for sure: try a new
                // session (which fails too while etcd is unreachable).
                if last_ok.elapsed().as_secs() as i64 >= ttl {
                    lost = true;
                } else {
                    continue;
                }
            }
        }
        if lost {
            match c.lease_grant(ttl, None).await {
                Ok(r) => {
                    tracing::warn!(
                        old = lease,
                        new = r.id(),
                        "kvstore session lost: new session, re-writing the local identity keys"
                    );
                    session.store(r.id(), Ordering::SeqCst);
                    last_ok = std::time::Instant::now();
                    lost = false;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kvstore session lost and a new one cannot be granted yet");
                    continue;
                }
            }
        }
        let mine: Vec<(String, u32)> =
            local.lock().expect("local identities").iter().map(|(k, v)| (k.clone(), *v)).collect();
        let s = session.load(Ordering::SeqCst);
        for (key, id) in mine {
            match claim(&client, &node, s, id, &key).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::error!(
                        id,
                        labels = %key,
                        "the id/ key of a local identity holds other labels now: its endpoints get a new identity"
                    );
                    let mut l = local.lock().expect("local identities");
                    if l.get(&key) == Some(&id) {
                        l.remove(&key);
                    }
                    taken.lock().expect("lost identities").insert(id);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kvstore: cannot re-sync the local identity keys yet");
                    break;
                }
            }
        }
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
