//! Per-node pod CIDR allocation from an ordered list of pool CIDRs of one
//! family (cluster-pool IPAM).
//!
//! Each pool is split into subnets of the per-node mask size; a subnet is
//! identified by its index in the pool. Allocation takes the lowest free
//! subnet of the first pool that is not full, in list order. `occupy`
//! records a subnet that a node already holds (restart, leader change), and
//! refuses one held twice or one outside every pool; nothing is ever handed
//! out twice.

use std::collections::BTreeSet;

use crate::cidr::{Cidr, CidrError, Family, validate_pools};

/// Why an allocation, occupation or release was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Upstream's exhaustion text, kept verbatim for tooling that matches it.
    #[error("allocator full")]
    Full,
    #[error("{cidr} is not inside any {family} pool ({pools})")]
    NotInPool { cidr: Cidr, family: Family, pools: String },
    #[error("{cidr} does not have the per-node mask size /{mask}")]
    WrongMask { cidr: Cidr, mask: u8 },
    #[error("{cidr} is already allocated")]
    AlreadyAllocated { cidr: Cidr },
    #[error("{cidr} is not allocated")]
    NotAllocated { cidr: Cidr },
    #[error(transparent)]
    Config(#[from] CidrError),
    #[error(
        "pool {cidr} cannot be removed: {used} pod CIDRs in it are in use (pools can only be extended by appending)"
    )]
    PoolInUse { cidr: Cidr, used: u128 },
}

impl AllocError {
    /// A stable label for metrics and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            AllocError::Full => "full",
            AllocError::NotInPool { .. } => "not-in-pool",
            AllocError::WrongMask { .. } => "wrong-mask",
            AllocError::AlreadyAllocated { .. } => "already-allocated",
            AllocError::NotAllocated { .. } => "not-allocated",
            AllocError::Config(_) => "config",
            AllocError::PoolInUse { .. } => "pool-in-use",
        }
    }
}

/// One pool CIDR and the subnets taken from it.
#[derive(Clone, Debug)]
struct Pool {
    cidr: Cidr,
    /// Number of subnets of the mask size in this pool.
    capacity: u128,
    allocated: BTreeSet<u128>,
    /// Every index below this one is allocated.
    lowest_maybe_free: u128,
}

impl Pool {
    fn new(cidr: Cidr, mask: u8) -> Pool {
        let bits = mask - cidr.prefix_len();
        let capacity = if bits >= 128 { u128::MAX } else { 1u128 << bits };
        Pool { cidr, capacity, allocated: BTreeSet::new(), lowest_maybe_free: 0 }
    }

    fn is_full(&self) -> bool {
        self.allocated.len() as u128 >= self.capacity
    }

    fn take_lowest(&mut self) -> Option<u128> {
        let mut candidate = self.lowest_maybe_free;
        for &used in self.allocated.range(candidate..) {
            if used != candidate {
                break;
            }
            candidate += 1;
        }
        if candidate >= self.capacity {
            return None;
        }
        self.allocated.insert(candidate);
        self.lowest_maybe_free = candidate + 1;
        Some(candidate)
    }
}

/// Usage of one pool, for metrics and status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolUsage {
    pub cidr: Cidr,
    pub capacity: u128,
    pub used: u128,
}

/// The allocator of one family.
#[derive(Clone, Debug)]
pub struct CidrAllocator {
    family: Family,
    mask: u8,
    pools: Vec<Pool>,
}

impl CidrAllocator {
    /// An allocator over `pools` (validated: family, no overlap, mask size).
    pub fn new(family: Family, pools: &[Cidr], mask: u8) -> Result<CidrAllocator, AllocError> {
        validate_pools(family, pools, mask)?;
        Ok(CidrAllocator { family, mask, pools: pools.iter().map(|c| Pool::new(*c, mask)).collect() })
    }

    pub fn family(&self) -> Family {
        self.family
    }

    pub fn mask_size(&self) -> u8 {
        self.mask
    }

    pub fn pools(&self) -> Vec<Cidr> {
        self.pools.iter().map(|p| p.cidr).collect()
    }

    fn subnet(&self, pool: &Pool, index: u128) -> Cidr {
        let shift = self.family.bits() - self.mask;
        let first = pool.cidr.first() + (index << shift);
        let ip = match self.family {
            Family::V4 => std::net::IpAddr::V4((first as u32).into()),
            Family::V6 => std::net::IpAddr::V6(first.into()),
        };
        Cidr::new(ip, self.mask).expect("subnet of a valid pool is canonical")
    }

    /// Pool index and subnet index of `cidr`.
    fn locate(&self, cidr: &Cidr) -> Result<(usize, u128), AllocError> {
        let near_a_pool = |c: &Cidr| self.pools.iter().any(|p| p.cidr.contains(c) || c.contains(&p.cidr));
        if cidr.family() == self.family && cidr.prefix_len() != self.mask && near_a_pool(cidr) {
            return Err(AllocError::WrongMask { cidr: *cidr, mask: self.mask });
        }
        let shift = self.family.bits() - self.mask;
        self.pools
            .iter()
            .position(|p| p.cidr.contains(cidr) && cidr.prefix_len() == self.mask)
            .map(|i| (i, (cidr.first() - self.pools[i].cidr.first()) >> shift))
            .ok_or_else(|| AllocError::NotInPool { cidr: *cidr, family: self.family, pools: self.pool_list() })
    }

    fn pool_list(&self) -> String {
        self.pools.iter().map(|p| p.cidr.to_string()).collect::<Vec<_>>().join(", ")
    }

    /// The lowest free subnet of the first non-full pool.
    pub fn allocate(&mut self) -> Result<Cidr, AllocError> {
        for i in 0..self.pools.len() {
            if self.pools[i].is_full() {
                continue;
            }
            if let Some(index) = self.pools[i].take_lowest() {
                return Ok(self.subnet(&self.pools[i], index));
            }
        }
        Err(AllocError::Full)
    }

    /// Whether `occupy(cidr)` would succeed, without changing anything.
    pub fn check_free(&self, cidr: &Cidr) -> Result<(), AllocError> {
        let (pool, index) = self.locate(cidr)?;
        if self.pools[pool].allocated.contains(&index) {
            return Err(AllocError::AlreadyAllocated { cidr: *cidr });
        }
        Ok(())
    }

    /// Records a subnet a node already holds.
    pub fn occupy(&mut self, cidr: &Cidr) -> Result<(), AllocError> {
        let (pool, index) = self.locate(cidr)?;
        if !self.pools[pool].allocated.insert(index) {
            return Err(AllocError::AlreadyAllocated { cidr: *cidr });
        }
        Ok(())
    }

    /// Makes a subnet available again.
    pub fn release(&mut self, cidr: &Cidr) -> Result<(), AllocError> {
        let (pool, index) = self.locate(cidr)?;
        let p = &mut self.pools[pool];
        if !p.allocated.remove(&index) {
            return Err(AllocError::NotAllocated { cidr: *cidr });
        }
        p.lowest_maybe_free = p.lowest_maybe_free.min(index);
        Ok(())
    }

    pub fn is_allocated(&self, cidr: &Cidr) -> bool {
        self.locate(cidr).is_ok_and(|(pool, index)| self.pools[pool].allocated.contains(&index))
    }

    /// Moves to a new pool list, which must keep every current pool in
    /// place and only append new ones; removing a pool with subnets in use
    /// is refused.
    pub fn update_pools(&mut self, pools: &[Cidr]) -> Result<(), AllocError> {
        validate_pools(self.family, pools, self.mask)?;
        for p in &self.pools {
            if !pools.contains(&p.cidr) && !p.allocated.is_empty() {
                return Err(AllocError::PoolInUse { cidr: p.cidr, used: p.allocated.len() as u128 });
            }
        }
        let mut next: Vec<Pool> = Vec::with_capacity(pools.len());
        for c in pools {
            match self.pools.iter().position(|p| p.cidr == *c) {
                Some(i) => next.push(self.pools[i].clone()),
                None => next.push(Pool::new(*c, self.mask)),
            }
        }
        self.pools = next;
        Ok(())
    }

    /// Capacity and usage per pool, in list order.
    pub fn usage(&self) -> Vec<PoolUsage> {
        self.pools
            .iter()
            .map(|p| PoolUsage { cidr: p.cidr, capacity: p.capacity, used: p.allocated.len() as u128 })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn allocates_in_pool_order_then_full() {
        let mut a = CidrAllocator::new(Family::V4, &[c("10.0.0.0/23"), c("10.1.0.0/24")], 24).unwrap();
        assert_eq!(a.allocate().unwrap(), c("10.0.0.0/24"));
        assert_eq!(a.allocate().unwrap(), c("10.0.1.0/24"));
        assert_eq!(a.allocate().unwrap(), c("10.1.0.0/24"));
        assert_eq!(a.allocate(), Err(AllocError::Full));
        assert_eq!(AllocError::Full.to_string(), "allocator full");
        a.release(&c("10.0.1.0/24")).unwrap();
        assert_eq!(a.allocate().unwrap(), c("10.0.1.0/24"));
    }

    #[test]
    fn occupy_refuses_duplicates_and_outsiders() {
        let mut a = CidrAllocator::new(Family::V4, &[c("10.0.0.0/16")], 24).unwrap();
        a.occupy(&c("10.0.5.0/24")).unwrap();
        assert_eq!(a.occupy(&c("10.0.5.0/24")), Err(AllocError::AlreadyAllocated { cidr: c("10.0.5.0/24") }));
        assert!(matches!(a.occupy(&c("10.9.0.0/24")), Err(AllocError::NotInPool { .. })));
        assert!(matches!(a.occupy(&c("10.0.6.0/25")), Err(AllocError::WrongMask { .. })));
        assert!(matches!(a.occupy(&c("fd00::/120")), Err(AllocError::NotInPool { .. })));
        assert_eq!(a.allocate().unwrap(), c("10.0.0.0/24"));
        assert!(a.is_allocated(&c("10.0.5.0/24")));
        assert_eq!(a.release(&c("10.0.7.0/24")), Err(AllocError::NotAllocated { cidr: c("10.0.7.0/24") }));
    }

    #[test]
    fn ipv6_pools() {
        let mut a = CidrAllocator::new(Family::V6, &[c("fd00::/104")], 120).unwrap();
        assert_eq!(a.allocate().unwrap(), c("fd00::/120"));
        assert_eq!(a.allocate().unwrap(), c("fd00::100/120"));
        assert_eq!(a.usage()[0].capacity, 1 << 16);
    }

    #[test]
    fn pools_can_be_appended_not_removed_while_used() {
        let mut a = CidrAllocator::new(Family::V4, &[c("10.0.0.0/24")], 24).unwrap();
        let first = a.allocate().unwrap();
        assert_eq!(a.allocate(), Err(AllocError::Full));
        a.update_pools(&[c("10.0.0.0/24"), c("10.0.1.0/24")]).unwrap();
        assert_eq!(a.allocate().unwrap(), c("10.0.1.0/24"));
        assert!(a.is_allocated(&first), "existing allocations survive the update");
        assert!(matches!(a.update_pools(&[c("10.0.1.0/24")]), Err(AllocError::PoolInUse { .. })));
        assert!(matches!(a.update_pools(&[c("10.0.0.0/24"), c("10.0.0.0/16")]), Err(AllocError::Config(_))));
    }
}
