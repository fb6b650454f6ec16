//! Property tests of the pod CIDR allocator against a simple model: random
//! sequences of allocate / release / occupy on small pools.

use std::collections::BTreeSet;

use cilium_ipam::{AllocError, Cidr, CidrAllocator, Family};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Allocate,
    /// Release the n-th held CIDR (modulo the number held).
    Release(usize),
    /// Occupy the n-th subnet of the pools (modulo the total).
    Occupy(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Allocate),
        2 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Occupy),
    ]
}

/// Every /26 subnet of the pools, in pool order.
fn all_subnets(pools: &[Cidr]) -> Vec<Cidr> {
    let mut out = Vec::new();
    for p in pools {
        let n = 1u32 << (26 - p.prefix_len());
        for i in 0..n {
            let first = p.first() as u32 + (i << 6);
            out.push(format!("{}/26", std::net::Ipv4Addr::from(first)).parse().unwrap());
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn never_hands_out_a_cidr_twice(ops in proptest::collection::vec(op(), 1..200)) {
        let pools: Vec<Cidr> = vec!["10.0.0.0/24".parse().unwrap(), "10.0.8.0/25".parse().unwrap()];
        let subnets = all_subnets(&pools);
        let mut a = CidrAllocator::new(Family::V4, &pools, 26).unwrap();
        let mut held: BTreeSet<Cidr> = BTreeSet::new();
        for op in ops {
            match op {
                Op::Allocate => match a.allocate() {
                    Ok(c) => {
                        prop_assert!(subnets.contains(&c), "{c} is not a subnet of the pools");
                        prop_assert!(held.insert(c), "{c} handed out twice");
                        // First non-full pool in list order.
                        let first_pool_full = subnets[..4].iter().all(|s| held.contains(s));
                        if !first_pool_full {
                            prop_assert!(pools[0].contains(&c), "{c} taken from pool 2 while pool 1 has room");
                        }
                    }
                    Err(e) => {
                        prop_assert_eq!(e, AllocError::Full);
                        prop_assert_eq!(held.len(), subnets.len(), "full reported with free subnets left");
                    }
                },
                Op::Release(n) => {
                    if held.is_empty() { continue; }
                    let c = *held.iter().nth(n % held.len()).unwrap();
                    a.release(&c).unwrap();
                    held.remove(&c);
                    prop_assert!(!a.is_allocated(&c));
                }
                Op::Occupy(n) => {
                    let c = subnets[n % subnets.len()];
                    match a.occupy(&c) {
                        Ok(()) => prop_assert!(held.insert(c), "occupy accepted a held CIDR {c}"),
                        Err(AllocError::AlreadyAllocated { .. }) => prop_assert!(held.contains(&c)),
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
            }
            let used: u128 = a.usage().iter().map(|u| u.used).sum();
            prop_assert_eq!(used, held.len() as u128);
        }
        // Release makes everything reusable: drain and refill.
        for c in held.clone() { a.release(&c).unwrap(); }
        let mut again = BTreeSet::new();
        while let Ok(c) = a.allocate() { prop_assert!(again.insert(c)); }
        prop_assert_eq!(again.len(), subnets.len());
    }
}
