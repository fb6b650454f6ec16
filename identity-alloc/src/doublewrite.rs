//! Double-write backend, for migrating between the kvstore and CRD modes
//! without renumbering: every allocation exists in both stores under the
//! same ID. Writes go to the CRD first, then the kvstore (the CRD is undone
//! if the kvstore write fails); reads follow the read flag; locks always
//! live in the kvstore; release touches the kvstore only (upstream's
//! semantics).
//!
//! An identity found in the store being read but missing in the other (made
//! before double-write began) is copied over with the same ID, so both
//! stores converge while allocators run.

use cilium_identity::Labels;

use crate::crd::{CrdAllocator, Created};
use crate::kvstore::KvstoreAllocator;
use crate::{AllocError, Identity, probe_order};

/// Which store answers lookups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFrom {
    Kvstore,
    Crd,
}

pub struct DoubleWriteAllocator {
    pub crd: CrdAllocator,
    pub kv: KvstoreAllocator,
    read: ReadFrom,
}

impl DoubleWriteAllocator {
    pub fn new(crd: CrdAllocator, kv: KvstoreAllocator, read: ReadFrom) -> DoubleWriteAllocator {
        DoubleWriteAllocator { crd, kv, read }
    }

    pub fn read_from(&self) -> ReadFrom {
        self.read
    }

    /// The identity of `labels` in the store being read, if any.
    async fn lookup(&self, labels: &Labels) -> Result<Option<u32>, AllocError> {
        match self.read {
            ReadFrom::Kvstore => self.kv.lookup_value(&labels.key_string()).await,
            ReadFrom::Crd => Ok(self.crd.lookup_by_labels(labels).await?.map(|i| i.id)),
        }
    }

    /// Makes `id` exist for `labels` in both stores (CRD first), and writes
    /// our value key.
    async fn ensure_both(&self, id: u32, labels: &Labels) -> Result<bool, AllocError> {
        let key = labels.key_string();
        let created = match self.crd.create_with_id(id, labels).await? {
            Created::Taken => return Ok(false),
            c => c,
        };
        match self.kv.claim(id, &key).await {
            Ok(true) => Ok(true),
            Ok(false) | Err(_) if created == Created::New => {
                // The kvstore half failed: undo the CRD we just made.
                self.crd.delete(id).await?;
                Ok(false)
            }
            Ok(false) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The identity of `labels`, allocating one (in both stores) if needed.
    pub async fn allocate(&self, labels: &Labels) -> Result<Identity, AllocError> {
        if labels.is_empty() {
            return Err(AllocError::EmptyLabels);
        }
        let key = labels.key_string();
        self.kv
            .with_lock(&key, async {
                if let Some(id) = self.lookup(labels).await? {
                    if self.ensure_both(id, labels).await? {
                        return Ok(Identity { id, labels: labels.clone() });
                    }
                    // The other store holds different labels at this ID:
                    // refuse to renumber silently.
                    return Err(AllocError::Mismatch {
                        id,
                        found: "different labels in the other store".into(),
                        wanted: key.clone(),
                    });
                }
                for id in probe_order(labels, self.crd.range()) {
                    if self.ensure_both(id, labels).await? {
                        return Ok(Identity { id, labels: labels.clone() });
                    }
                }
                Err(AllocError::RangeFull(self.crd.range().clone()))
            })
            .await
    }

    /// Stops using the identity of `labels` (kvstore value key only).
    pub async fn release(&self, labels: &Labels) -> Result<(), AllocError> {
        self.kv.release(labels).await
    }
}
