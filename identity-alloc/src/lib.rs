//! Security identity allocation with three backends behind one interface:
//! CRD (CiliumIdentity objects), kvstore (etcd, upstream's key layout) and
//! double-write (both, reading from one). Two allocators racing for the same
//! labels get the same ID; a full range is an error, never a wrap-around.

pub mod crd;
pub mod doublewrite;
pub mod kvstore;

use std::ops::RangeInclusive;

use cilium_identity::Labels;

/// An allocated identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub id: u32,
    pub labels: Labels,
}

/// Why an allocation or lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error("no more available IDs in configured space {}..={}", .0.start(), .0.end())]
    RangeFull(RangeInclusive<u32>),
    #[error("cannot allocate an identity for empty labels")]
    EmptyLabels,
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("kvstore: {0}")]
    Kvstore(String),
    #[error("allocation for {0} kept racing with identity GC; try again")]
    Contended(String),
    #[error("identity {id} holds labels {found:?}, not {wanted:?}")]
    Mismatch { id: u32, found: String, wanted: String },
}

impl AllocError {
    /// A stable label for metrics and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            AllocError::RangeFull(_) => "range-full",
            AllocError::EmptyLabels => "empty-labels",
            AllocError::Kube(_) => "kube",
            AllocError::Kvstore(_) => "kvstore",
            AllocError::Mismatch { .. } => "mismatch",
            AllocError::Contended(_) => "contended",
        }
    }
}

/// The annotation the operator's CRD GC puts on an unused identity (value:
/// RFC3339Nano time). An allocator that reuses the identity removes it.
pub const HEARTBEAT_ANNOTATION: &str = "io.cilium.heartbeat";

/// The first ID to try for a label set, and the probing order after it:
/// deterministic, so racing allocators for the same labels walk the same
/// sequence and meet on the same ID.
pub fn probe_order(labels: &Labels, range: &RangeInclusive<u32>) -> impl Iterator<Item = u32> + use<> {
    let size = (*range.end() - *range.start()) as u64 + 1;
    // FNV-1a over the key string: stable across processes and versions.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in labels.key_string().bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    let start = h % size;
    let first = *range.start() as u64;
    (0..size).map(move |i| (first + (start + i) % size) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cilium_identity::Label;

    #[test]
    fn probe_order_covers_the_range_once_from_a_stable_start() {
        let labels: Labels = [Label::new("k8s", "app", "web")].into_iter().collect();
        let range = 256..=300;
        let order: Vec<u32> = probe_order(&labels, &range).collect();
        assert_eq!(order.len(), 45);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (256..=300).collect::<Vec<_>>());
        assert_eq!(order, probe_order(&labels, &range).collect::<Vec<_>>());
        let other: Labels = [Label::new("k8s", "app", "db")].into_iter().collect();
        assert_ne!(probe_order(&other, &range).next(), order.first().copied());
    }
}
