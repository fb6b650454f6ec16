//! CiliumNode states -> IPAM decisions: any sequence of shown pod CIDRs
//! (any prefix, mask or string), deletions, decisions and failed writes; no panic, no CIDR
//! held by two nodes, nothing another node shows handed out.
#![no_main]

use arbitrary::Arbitrary;
use cilium_ipam::book::{Book, Decision, parse_pod_cidr};
use cilium_ipam::{CidrAllocator, Family};
use libfuzzer_sys::fuzz_target;

/// Mostly addresses near the pools (so that overlaps happen), any mask,
/// host bits set or not; some raw strings.
#[derive(Arbitrary, Debug)]
enum Shown {
    V4(u8, u8, u8),
    V6(u16, u8),
    Raw(String),
}

impl Shown {
    fn text(&self) -> String {
        match self {
            Shown::V4(a, b, len) => format!("10.0.{}.{b}/{}", a % 12, len % 34),
            Shown::V6(a, len) => format!("fd00::{a:x}/{}", len % 130),
            Shown::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Show { node: u8, uid: u8, cidrs: Vec<Shown> },
    Delete { node: u8 },
    Decide { node: u8, write: bool },
}

fuzz_target!(|ops: Vec<Op>| {
    let mut b = Book::new(vec![
        CidrAllocator::new(Family::V4, &["10.0.0.0/22".parse().unwrap(), "10.0.8.0/24".parse().unwrap()], 24).unwrap(),
        CidrAllocator::new(Family::V6, &["fd00::/118".parse().unwrap()], 120).unwrap(),
    ]);
    let mut world: std::collections::BTreeMap<String, (String, Vec<String>)> = Default::default();
    for op in ops {
        match op {
            Op::Show { node, uid, cidrs } => {
                let (name, uid) = (format!("n{}", node % 8), format!("u{}", uid % 3));
                let cidrs: Vec<String> = cidrs.iter().map(Shown::text).collect();
                b.observe(&name, &uid, &cidrs);
                world.insert(name, (uid, cidrs));
            }
            Op::Delete { node } => {
                let name = format!("n{}", node % 8);
                world.remove(&name);
                b.forget(&name);
            }
            Op::Decide { node, write } => {
                let name = format!("n{}", node % 8);
                let Some((uid, own)) = world.get(&name).cloned() else { continue };
                if let Decision::Assign(cidrs) = b.decide(&name, true) {
                    let own: Vec<_> = own.iter().filter_map(|s| parse_pod_cidr(s).ok()).collect();
                    for (other, (_, shown)) in &world {
                        if *other == name {
                            continue;
                        }
                        for s in shown.iter().filter_map(|s| parse_pod_cidr(s).ok()) {
                            for a in &cidrs {
                                assert!(!a.overlaps(&s) || own.contains(a), "{name} got {a}, {other} shows {s}");
                            }
                        }
                    }
                    if write {
                        let list: Vec<String> = cidrs.iter().map(|c| c.to_string()).collect();
                        b.observe(&name, &uid, &list);
                        world.insert(name, (uid, list));
                    } else {
                        b.abandon(&name, &uid, &cidrs);
                    }
                }
            }
        }
        let held: Vec<_> = b.holdings().flat_map(|(n, cs)| cs.iter().map(move |c| (n.to_string(), *c))).collect();
        for (i, (n1, c1)) in held.iter().enumerate() {
            for (n2, c2) in &held[i + 1..] {
                assert!(n1 == n2 || !c1.overlaps(c2), "{c1} held by {n1} and {c2} by {n2}");
            }
        }
    }
});
