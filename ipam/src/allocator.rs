//! Per-node pod CIDR allocation from an ordered list of pool CIDRs of one
//! family (cluster-pool IPAM).
//!
//! Each pool is split into subnets of the per-node mask size; a subnet is
//! identified by its index in the pool. Allocation takes the lowest free
//! subnet of the first pool that is not full, in list order. Every range in
//! use is reserved, whatever its shape (`reserve`); `occupy` reserves a
//! valid subnet a node already holds and refuses one that overlaps a
//! reservation or lies outside every pool. Nothing that overlaps a
//! reservation is ever handed out.

use std::collections::BTreeMap;

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

/// One pool CIDR and the subnets of it that are reserved.
#[derive(Clone, Debug)]
struct Pool {
    cidr: Cidr,
    /// Number of subnets of the mask size in this pool.
    capacity: u128,
    /// Subnet index -> how many reservations of exactly that subnet.
    exact: BTreeMap<u128, u32>,
    /// No free subnet lies below this index.
    lowest_maybe_free: u128,
}

impl Pool {
    fn new(cidr: Cidr, mask: u8) -> Pool {
        let bits = mask - cidr.prefix_len();
        let capacity = if bits >= 128 { u128::MAX } else { 1u128 << bits };
        Pool { cidr, capacity, exact: BTreeMap::new(), lowest_maybe_free: 0 }
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
///
/// Every range in use is *reserved*: subnets of the pool's mask size
/// (counted per subnet), and any other range a node shows (a wrong mask, a
/// range outside the pools, a supernet) in a separate list. A subnet is
/// handed out only when it overlaps no reservation at all, so nothing any
/// node shows is ever handed to another, whatever its shape.
#[derive(Clone, Debug)]
pub struct CidrAllocator {
    family: Family,
    mask: u8,
    pools: Vec<Pool>,
    /// Reserved ranges that are not one subnet of a pool -> count.
    odd: BTreeMap<Cidr, u32>,
}

impl CidrAllocator {
    /// An allocator over `pools` (validated: family, no overlap, mask size).
    pub fn new(family: Family, pools: &[Cidr], mask: u8) -> Result<CidrAllocator, AllocError> {
        validate_pools(family, pools, mask)?;
        Ok(CidrAllocator {
            family,
            mask,
            pools: pools.iter().map(|c| Pool::new(*c, mask)).collect(),
            odd: BTreeMap::new(),
        })
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

    /// Pool index and subnet index of `cidr`, when it is exactly one
    /// subnet of a pool.
    fn exact_slot(&self, cidr: &Cidr) -> Option<(usize, u128)> {
        if cidr.family() != self.family || cidr.prefix_len() != self.mask {
            return None;
        }
        let shift = self.family.bits() - self.mask;
        self.pools
            .iter()
            .position(|p| p.cidr.contains(cidr))
            .map(|i| (i, (cidr.first() - self.pools[i].cidr.first()) >> shift))
    }

    /// Why `cidr` cannot be a node's pod CIDR of this allocator, if it
    /// cannot: another family, another mask size, or outside every pool.
    pub fn check(&self, cidr: &Cidr) -> Result<(), AllocError> {
        let near_a_pool = |c: &Cidr| self.pools.iter().any(|p| p.cidr.overlaps(c));
        if cidr.family() == self.family && cidr.prefix_len() != self.mask && near_a_pool(cidr) {
            return Err(AllocError::WrongMask { cidr: *cidr, mask: self.mask });
        }
        match self.exact_slot(cidr) {
            Some(_) => Ok(()),
            None => Err(AllocError::NotInPool { cidr: *cidr, family: self.family, pools: self.pool_list() }),
        }
    }

    fn pool_list(&self) -> String {
        self.pools.iter().map(|p| p.cidr.to_string()).collect::<Vec<_>>().join(", ")
    }

    /// Subnet index range `[first, last]` of pool `i` that `range` covers.
    fn covered(&self, i: usize, range: &Cidr) -> Option<(u128, u128)> {
        let p = &self.pools[i];
        if !p.cidr.overlaps(range) {
            return None;
        }
        let shift = self.family.bits() - self.mask;
        let lo = range.first().max(p.cidr.first()) - p.cidr.first();
        let hi = range.last().min(p.cidr.last()) - p.cidr.first();
        Some((lo >> shift, hi >> shift))
    }

    /// Whether `cidr` overlaps any reservation.
    pub fn is_reserved(&self, cidr: &Cidr) -> bool {
        if cidr.family() != self.family {
            return false;
        }
        if self.odd.keys().any(|o| o.overlaps(cidr)) {
            return true;
        }
        (0..self.pools.len())
            .any(|i| self.covered(i, cidr).is_some_and(|(lo, hi)| self.pools[i].exact.range(lo..=hi).next().is_some()))
    }

    /// Reserves any range of this family (counted: reserve twice, release
    /// twice). Ranges of another family are ignored.
    pub fn reserve(&mut self, range: &Cidr) {
        if range.family() != self.family {
            return;
        }
        match self.exact_slot(range) {
            Some((p, i)) => *self.pools[p].exact.entry(i).or_default() += 1,
            None => *self.odd.entry(*range).or_default() += 1,
        }
    }

    /// Drops one reservation of `range`; the subnets it covered become free
    /// when nothing else reserves them.
    pub fn unreserve(&mut self, range: &Cidr) {
        if range.family() != self.family {
            return;
        }
        let lowest = match self.exact_slot(range) {
            Some((p, i)) => {
                let pool = &mut self.pools[p];
                match pool.exact.get_mut(&i) {
                    Some(n) if *n > 1 => *n -= 1,
                    Some(_) => {
                        pool.exact.remove(&i);
                    }
                    None => return,
                }
                vec![(p, i)]
            }
            None => {
                match self.odd.get_mut(range) {
                    Some(n) if *n > 1 => *n -= 1,
                    Some(_) => {
                        self.odd.remove(range);
                    }
                    None => return,
                }
                (0..self.pools.len()).filter_map(|p| self.covered(p, range).map(|(lo, _)| (p, lo))).collect()
            }
        };
        for (p, i) in lowest {
            let pool = &mut self.pools[p];
            pool.lowest_maybe_free = pool.lowest_maybe_free.min(i);
        }
    }

    /// The lowest subnet of the first pool that overlaps no reservation,
    /// now reserved.
    pub fn allocate(&mut self) -> Result<Cidr, AllocError> {
        for p in 0..self.pools.len() {
            let mut candidate = self.pools[p].lowest_maybe_free;
            loop {
                let pool = &self.pools[p];
                for (&used, _) in pool.exact.range(candidate..) {
                    if used != candidate {
                        break;
                    }
                    candidate += 1;
                }
                if candidate >= pool.capacity {
                    self.pools[p].lowest_maybe_free = pool.capacity;
                    break;
                }
                let subnet = self.subnet(pool, candidate);
                let blocker = self.odd.keys().filter(|o| o.overlaps(&subnet)).map(|o| o.last()).max();
                match blocker {
                    Some(last) => {
                        // Skip every subnet up to the end of the widest odd range.
                        let shift = self.family.bits() - self.mask;
                        let end = if last >= pool.cidr.last() {
                            pool.capacity
                        } else {
                            ((last - pool.cidr.first()) >> shift) + 1
                        };
                        candidate = end.max(candidate + 1);
                    }
                    None => {
                        self.pools[p].exact.insert(candidate, 1);
                        self.pools[p].lowest_maybe_free = candidate + 1;
                        return Ok(subnet);
                    }
                }
            }
        }
        Err(AllocError::Full)
    }

    /// Whether `occupy(cidr)` would succeed, without changing anything.
    pub fn check_free(&self, cidr: &Cidr) -> Result<(), AllocError> {
        self.check(cidr)?;
        if self.is_reserved(cidr) {
            return Err(AllocError::AlreadyAllocated { cidr: *cidr });
        }
        Ok(())
    }

    /// Reserves a subnet a node holds, refusing one that is not a subnet
    /// of a pool or that overlaps a reservation.
    pub fn occupy(&mut self, cidr: &Cidr) -> Result<(), AllocError> {
        self.check_free(cidr)?;
        self.reserve(cidr);
        Ok(())
    }

    /// Drops the reservation of a subnet.
    pub fn release(&mut self, cidr: &Cidr) -> Result<(), AllocError> {
        self.check(cidr)?;
        match self.exact_slot(cidr) {
            Some((p, i)) if self.pools[p].exact.contains_key(&i) => {
                self.unreserve(cidr);
                Ok(())
            }
            _ => Err(AllocError::NotAllocated { cidr: *cidr }),
        }
    }

    /// Whether any reservation overlaps `cidr`.
    pub fn is_allocated(&self, cidr: &Cidr) -> bool {
        self.is_reserved(cidr)
    }

    /// Moves to a new pool list, which must keep every current pool in
    /// place and only append new ones; removing a pool with subnets in use
    /// is refused.
    pub fn update_pools(&mut self, pools: &[Cidr]) -> Result<(), AllocError> {
        validate_pools(self.family, pools, self.mask)?;
        for (i, p) in self.pools.iter().enumerate() {
            let used = self.used(i);
            if !pools.contains(&p.cidr) && used > 0 {
                return Err(AllocError::PoolInUse { cidr: p.cidr, used });
            }
        }
        let mut next: Vec<Pool> = Vec::with_capacity(pools.len());
        for c in pools {
            match self.pools.iter().position(|p| p.cidr == *c) {
                Some(i) => next.push(self.pools[i].clone()),
                None => next.push(Pool::new(*c, self.mask)),
            }
        }
        // Odd ranges that are exactly a subnet of a new pool become exact.
        self.pools = next;
        let odd = std::mem::take(&mut self.odd);
        for (r, n) in odd {
            for _ in 0..n {
                self.reserve(&r);
            }
        }
        Ok(())
    }

    /// Subnets of pool `i` that overlap a reservation.
    fn used(&self, i: usize) -> u128 {
        let pool = &self.pools[i];
        let mut intervals: Vec<(u128, u128)> = self.odd.keys().filter_map(|o| self.covered(i, o)).collect();
        intervals.sort();
        let mut merged: Vec<(u128, u128)> = Vec::new();
        for (lo, hi) in intervals {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        let odd_count: u128 = merged.iter().map(|(lo, hi)| hi - lo + 1).sum();
        let exact_inside: u128 = merged.iter().map(|(lo, hi)| pool.exact.range(*lo..=*hi).count() as u128).sum();
        pool.exact.len() as u128 + odd_count - exact_inside
    }

    /// Capacity and usage per pool, in list order.
    pub fn usage(&self) -> Vec<PoolUsage> {
        (0..self.pools.len())
            .map(|i| PoolUsage { cidr: self.pools[i].cidr, capacity: self.pools[i].capacity, used: self.used(i) })
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

    #[test]
    fn odd_reservations_block_every_subnet_they_touch() {
        let mut a = CidrAllocator::new(Family::V4, &[c("10.0.0.0/22")], 24).unwrap();
        a.reserve(&c("10.0.0.0/23")); // a node with a /23: both /24s inside are in use
        a.reserve(&c("10.0.2.128/25")); // a /25: its /24 is in use
        assert!(a.is_reserved(&c("10.0.1.0/24")));
        assert_eq!(a.usage()[0].used, 3);
        assert_eq!(a.allocate().unwrap(), c("10.0.3.0/24"));
        assert_eq!(a.allocate(), Err(AllocError::Full));
        a.unreserve(&c("10.0.0.0/23"));
        assert_eq!(a.allocate().unwrap(), c("10.0.0.0/24"));
        assert_eq!(a.allocate().unwrap(), c("10.0.1.0/24"));
        assert!(matches!(a.occupy(&c("10.0.2.0/24")), Err(AllocError::AlreadyAllocated { .. })), "overlaps the /25");
        // Counted: reserved twice, released twice.
        a.unreserve(&c("10.0.2.128/25"));
        a.reserve(&c("10.0.2.0/24"));
        a.reserve(&c("10.0.2.0/24"));
        a.unreserve(&c("10.0.2.0/24"));
        assert!(a.is_reserved(&c("10.0.2.0/24")));
        a.unreserve(&c("10.0.2.0/24"));
        assert!(!a.is_reserved(&c("10.0.2.0/24")));
        // A range covering the whole pool and more.
        let mut b = CidrAllocator::new(Family::V4, &[c("10.0.0.0/24")], 26).unwrap();
        b.reserve(&c("0.0.0.0/0"));
        assert_eq!(b.allocate(), Err(AllocError::Full));
        assert_eq!(b.usage()[0].used, 4);
    }

    use proptest::prelude::*;

    proptest! {
        /// Whatever is reserved (any range, any count, any order), an
        /// allocated subnet never overlaps a reservation still in force, and
        /// the pool's free subnets are handed out before Full.
        #[test]
        fn allocation_never_overlaps_a_reservation(
            ops in proptest::collection::vec((any::<bool>(), 0u32..64, 22u8..=30), 0..60),
            allocations in 0usize..12,
        ) {
            let mut a = CidrAllocator::new(Family::V4, &[c("10.0.0.0/26"), c("10.0.1.0/27")], 29).unwrap();
            let mut live: Vec<Cidr> = Vec::new();
            for (add, addr, len) in ops {
                let r = Cidr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 | (addr << 4))), 32)
                    .map(|h| Cidr::new(h.ip(), len).unwrap_or_else(|e| match e { CidrError::HostBits { canonical, .. } => canonical, _ => h }))
                    .unwrap();
                if add || live.is_empty() {
                    a.reserve(&r);
                    live.push(r);
                } else {
                    let victim = live.remove(addr as usize % live.len());
                    a.unreserve(&victim);
                }
            }
            let mut got = Vec::new();
            for _ in 0..allocations {
                match a.allocate() {
                    Ok(s) => {
                        prop_assert!(!live.iter().any(|r| r.overlaps(&s)), "{} overlaps a reservation", s);
                        prop_assert!(!got.iter().any(|g: &Cidr| g.overlaps(&s)), "{} handed out twice", s);
                        got.push(s);
                    }
                    Err(AllocError::Full) => {
                        // Full means every subnet of every pool is blocked.
                        for p in a.pools() {
                            let mut free = 0;
                            let n = 1u32 << (29 - p.prefix_len());
                            for i in 0..n {
                                let s = Cidr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::from(p.first() as u32 + i * 8)), 29).unwrap();
                                if !live.iter().chain(&got).any(|r| r.overlaps(&s)) { free += 1; }
                            }
                            prop_assert_eq!(free, 0, "Full with free subnets in {}", p);
                        }
                        break;
                    }
                    Err(e) => prop_assert!(false, "{}", e),
                }
            }
        }
    }
}
