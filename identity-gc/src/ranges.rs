//! Numeric identity spaces: reserved IDs, the cluster-local range per
//! cluster-id, and node-local identities.

use std::ops::RangeInclusive;

/// Node-local identities (CIDR, FQDN) carry this bit; they never reach the
/// API server or the kvstore.
pub const LOCAL_IDENTITY_FLAG: u32 = 1 << 24;

/// Reserved identities (1..=255 are reserved; these have names).
pub const RESERVED: &[(u32, &str)] = &[
    (1, "host"),
    (2, "world"),
    (3, "unmanaged"),
    (4, "health"),
    (5, "init"),
    (6, "remote-node"),
    (7, "kube-apiserver"),
    (8, "ingress"),
];

/// The highest reserved identity.
pub const MAX_RESERVED: u32 = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("max-connected-clusters must be 255 or 511, not {0}")]
    MaxConnectedClusters(u32),
    #[error("cluster-id {id} is out of range 0..={max} for max-connected-clusters {clusters}")]
    ClusterId { id: u32, max: u32, clusters: u32 },
}

/// The IDs a cluster may allocate: `256..=65535` for cluster-id 0, else
/// `id << shift ..= ((id + 1) << shift) - 1` (shift 16 for 255 clusters, 15
/// for 511).
pub fn cluster_range(cluster_id: u32, max_connected_clusters: u32) -> Result<RangeInclusive<u32>, RangeError> {
    let shift = match max_connected_clusters {
        255 => 16,
        511 => 15,
        other => return Err(RangeError::MaxConnectedClusters(other)),
    };
    if cluster_id > max_connected_clusters {
        return Err(RangeError::ClusterId {
            id: cluster_id,
            max: max_connected_clusters,
            clusters: max_connected_clusters,
        });
    }
    let first = if cluster_id == 0 { MAX_RESERVED + 1 } else { cluster_id << shift };
    let last = ((cluster_id + 1) << shift) - 1;
    Ok(first..=last)
}

pub fn is_reserved(id: u32) -> bool {
    (1..=MAX_RESERVED).contains(&id)
}

pub fn is_local(id: u32) -> bool {
    id & LOCAL_IDENTITY_FLAG != 0
}

pub fn reserved_name(id: u32) -> Option<&'static str> {
    RESERVED.iter().find(|(i, _)| *i == id).map(|(_, n)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(cluster_range(0, 255).unwrap(), 256..=65535);
        assert_eq!(cluster_range(1, 255).unwrap(), 65536..=131071);
        assert_eq!(cluster_range(255, 255).unwrap(), (255 << 16)..=((256 << 16) - 1));
        assert_eq!(cluster_range(3, 511).unwrap(), (3 << 15)..=((4 << 15) - 1));
        assert!(cluster_range(256, 255).is_err());
        assert!(cluster_range(1, 300).is_err());
        // Ranges of different clusters never overlap, and never hold a
        // node-local identity.
        let a = cluster_range(7, 255).unwrap();
        let b = cluster_range(8, 255).unwrap();
        assert!(a.end() < b.start());
        assert!(!is_local(*cluster_range(255, 255).unwrap().end()));
    }

    #[test]
    fn reserved_and_local() {
        assert_eq!(reserved_name(2), Some("world"));
        assert!(is_reserved(255) && !is_reserved(256) && !is_reserved(0));
        assert!(is_local(LOCAL_IDENTITY_FLAG | 5));
    }
}
