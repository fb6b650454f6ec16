//! The IPAM book: which node holds which pod CIDRs, and what to do about
//! each node. Pure: no I/O.
//!
//! Two promises, whatever the nodes show and in whatever order events
//! come:
//!
//! - No CIDR is ever held by two nodes.
//! - Nothing a node shows is ever handed to another: every range any node
//!   shows blocks allocation of every subnet it overlaps, whether the book
//!   accepts it or not (a wrong mask, a range outside the pools, a
//!   duplicate, a node being deleted, an object the typed decode skips).
//!
//! A node is known by name and uid: a node deleted and re-created under the
//! same name is a new node, and what the old one held is released first.

use std::collections::BTreeMap;

use crate::allocator::{AllocError, CidrAllocator};
use crate::cidr::{Cidr, Family};

/// What to do about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The node's CIDRs are fine and recorded.
    Ok,
    /// Write these pod CIDRs (newly allocated ones included).
    Assign(Vec<Cidr>),
    /// The node's CIDRs are refused: report this error.
    Refuse { error: String, reason: &'static str },
    /// A family's pools are full: report `allocator full`.
    Full { family: Family },
}

#[derive(Clone, Debug, Default)]
struct Node {
    uid: String,
    /// Every range the node shows (parsed, deduplicated): each reserved.
    shown: Vec<Cidr>,
    /// The entries as written (a list that is not in canonical form is
    /// written again).
    raw: Vec<String>,
    /// Entries that are not CIDRs at all.
    bad: Vec<String>,
    /// What the book records as the node's pod CIDRs (accepted ones and
    /// ones assigned but not shown yet): each reserved.
    held: Vec<Cidr>,
}

pub struct Book {
    allocators: Vec<CidrAllocator>,
    nodes: BTreeMap<String, Node>,
}

/// A node's pod CIDR as written, read as upstream reads it: host bits are
/// cleared (`10.200.13.9/24` is `10.200.13.0/24`).
pub fn parse_pod_cidr(raw: &str) -> Result<Cidr, String> {
    let t = raw.trim();
    let (ip, len) = t.split_once('/').ok_or_else(|| format!("{raw:?} is not a CIDR"))?;
    let ip: std::net::IpAddr = ip.parse().map_err(|_| format!("{raw:?} is not a CIDR"))?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{raw:?} is not a CIDR"));
    }
    let len: u8 = len.parse().map_err(|_| format!("{raw:?} is not a CIDR"))?;
    match Cidr::new(ip, len) {
        Ok(c) => Ok(c),
        Err(crate::cidr::CidrError::HostBits { canonical, .. }) => Ok(canonical),
        Err(e) => Err(format!("{raw:?}: {e}")),
    }
}

impl Book {
    pub fn new(allocators: Vec<CidrAllocator>) -> Book {
        Book { allocators, nodes: BTreeMap::new() }
    }

    pub fn allocators(&self) -> &[CidrAllocator] {
        &self.allocators
    }

    /// The pod CIDRs recorded for `node`.
    pub fn held(&self, node: &str) -> &[Cidr] {
        self.nodes.get(node).map(|n| n.held.as_slice()).unwrap_or_default()
    }

    /// Every node's recorded pod CIDRs.
    pub fn holdings(&self) -> impl Iterator<Item = (&str, &[Cidr])> {
        self.nodes.iter().map(|(k, n)| (k.as_str(), n.held.as_slice()))
    }

    fn reserve(&mut self, c: &Cidr) {
        for a in &mut self.allocators {
            a.reserve(c);
        }
    }

    fn unreserve(&mut self, c: &Cidr) {
        for a in &mut self.allocators {
            a.unreserve(c);
        }
    }

    fn allocator(&mut self, family: Family) -> Option<&mut CidrAllocator> {
        self.allocators.iter_mut().find(|a| a.family() == family)
    }

    /// Records what a node shows now (`raw`: its `spec.ipam.podCIDRs`, as
    /// written). Every parsable range is reserved at once, whatever the
    /// node's state; returns the entries that cannot be read at all.
    pub fn observe(&mut self, node: &str, uid: &str, raw: &[String]) -> Vec<String> {
        if self.nodes.get(node).is_some_and(|n| !n.uid.is_empty() && !uid.is_empty() && n.uid != uid) {
            // Deleted and re-created under the same name: a new node.
            self.forget(node);
        }
        let mut shown: Vec<Cidr> = Vec::new();
        let mut bad = Vec::new();
        for r in raw {
            match parse_pod_cidr(r) {
                Ok(c) if !shown.contains(&c) => shown.push(c),
                Ok(_) => {}
                Err(_) => bad.push(r.clone()),
            }
        }
        let old = self.nodes.get(node).map(|n| n.shown.clone()).unwrap_or_default();
        for c in &shown {
            self.reserve(c);
        }
        for c in &old {
            self.unreserve(c);
        }
        let entry = self.nodes.entry(node.to_string()).or_default();
        if !uid.is_empty() {
            entry.uid = uid.to_string();
        }
        entry.shown = shown;
        entry.raw = raw.to_vec();
        entry.bad = bad.clone();
        bad
    }

    /// Forgets a node (deleted): what it showed and held is free again
    /// (returned, each range once).
    pub fn forget(&mut self, node: &str) -> Vec<Cidr> {
        let Some(n) = self.nodes.remove(node) else { return Vec::new() };
        for c in n.shown.iter().chain(&n.held) {
            self.unreserve(c);
        }
        let mut freed = n.held;
        for c in n.shown {
            if !freed.contains(&c) {
                freed.push(c);
            }
        }
        freed
    }

    /// Forgets node `uid` (deleted); nothing happens when the book knows
    /// another object of that name by now. An empty `uid` matches any.
    pub fn forget_uid(&mut self, node: &str, uid: &str) -> Vec<Cidr> {
        match self.nodes.get(node) {
            Some(n) if uid.is_empty() || n.uid.is_empty() || n.uid == uid => self.forget(node),
            _ => Vec::new(),
        }
    }

    /// A write of `written` for node `uid` failed: what was assigned and
    /// is not shown by the node is given back. Nothing happens when the
    /// node is gone or is another node by now (another uid).
    pub fn abandon(&mut self, node: &str, uid: &str, written: &[Cidr]) {
        let Some(n) = self.nodes.get_mut(node) else { return };
        if n.uid != uid {
            return;
        }
        let drop: Vec<Cidr> = n.held.iter().filter(|c| written.contains(c) && !n.shown.contains(c)).copied().collect();
        n.held.retain(|c| !drop.contains(c));
        for c in &drop {
            self.unreserve(c);
        }
    }

    /// Another node whose recorded CIDRs overlap `c` (and, with
    /// `shown_too`, whose shown ranges do).
    fn other_user(&self, node: &str, c: &Cidr, shown_too: bool) -> Option<&str> {
        self.nodes
            .iter()
            .filter(|(k, _)| k.as_str() != node)
            .find(|(_, n)| n.held.iter().any(|o| o.overlaps(c)) || (shown_too && n.shown.iter().any(|o| o.overlaps(c))))
            .map(|(k, _)| k.as_str())
    }

    /// Decides for a node from what it showed last (`observe` first).
    /// Accepts what it shows when every range is a free subnet of a pool
    /// and the node did not change the CIDRs it holds (upstream refuses
    /// that); gives a family it shows nothing of its earlier CIDR again, or
    /// a new one when `may_allocate`. A refused node keeps what it held.
    pub fn decide(&mut self, node: &str, may_allocate: bool) -> Decision {
        let Some(n) = self.nodes.get(node).cloned() else {
            return Decision::Refuse { error: "unknown node".into(), reason: "unknown" };
        };
        // 1. Check every range the node shows, changing nothing yet.
        if let Some(raw) = n.bad.first() {
            let error = format!("pod CIDR {raw:?} is malformed");
            return Decision::Refuse { error, reason: "malformed" };
        }
        for c in &n.shown {
            let Some(alloc) = self.allocators.iter().find(|a| a.family() == c.family()) else {
                let error = format!("pod CIDR {c} is {} but that family is not enabled in the operator", c.family());
                return Decision::Refuse { error, reason: "family-disabled" };
            };
            if let Err(e) = alloc.check(c) {
                return Decision::Refuse { error: format!("pod CIDR {c} refused: {e}"), reason: e.reason() };
            }
            if let Some(other) = self.other_user(node, c, false) {
                let error = format!("pod CIDR {c} is already allocated to node {other}; not re-assigning it");
                return Decision::Refuse { error, reason: "duplicate" };
            }
        }
        for family in [Family::V4, Family::V6] {
            let held: Vec<&Cidr> = n.held.iter().filter(|c| c.family() == family).collect();
            let shown: Vec<&Cidr> = n.shown.iter().filter(|c| c.family() == family).collect();
            if !held.is_empty() && !shown.iter().all(|c| held.contains(c)) {
                let list = |v: &[&Cidr]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ");
                let error = format!(
                    "node has CIDRs allocated ([{}]) that conflict with requested CIDRs [{}]",
                    list(&held),
                    list(&shown)
                );
                return Decision::Refuse { error, reason: "changed" };
            }
        }
        // 2. What the node keeps: what it shows, and for a family it shows
        //    nothing of, what the book gave it earlier (a write in flight,
        //    or a writer that removed it: assigned again, never leaked).
        //    One another node shows by now is dropped instead.
        let mut keep = n.shown.clone();
        for c in &n.held {
            if !keep.iter().any(|k| k.family() == c.family()) && self.other_user(node, c, true).is_none() {
                keep.push(*c);
            }
        }
        keep.sort_by_key(|c| (c.family(), *c));
        let missing: Vec<Family> =
            self.allocators.iter().map(|a| a.family()).filter(|f| !keep.iter().any(|c| c.family() == *f)).collect();
        let mut new = Vec::new();
        if may_allocate {
            for family in missing.iter().copied() {
                match self.allocator(family).expect("listed").allocate() {
                    Ok(c) => new.push(c),
                    Err(AllocError::Full) => {
                        for c in &new {
                            self.unreserve(c);
                        }
                        self.set_held(node, keep);
                        return Decision::Full { family };
                    }
                    Err(e) => {
                        for c in &new {
                            self.unreserve(c);
                        }
                        self.set_held(node, keep);
                        return Decision::Refuse { error: e.to_string(), reason: e.reason() };
                    }
                }
            }
        }
        // `allocate` reserved the new ones once: they count as held.
        let mut all = keep.clone();
        all.extend(new.iter().copied());
        all.sort_by_key(|c| (c.family(), *c));
        self.set_held_reserved(node, all.clone(), &new);
        let canonical: Vec<String> = all.iter().map(|c| c.to_string()).collect();
        if canonical == n.raw { Decision::Ok } else { Decision::Assign(all) }
    }

    fn set_held(&mut self, node: &str, held: Vec<Cidr>) {
        self.set_held_reserved(node, held, &[]);
    }

    /// Sets a node's held list; `already` are reserved for it already.
    fn set_held_reserved(&mut self, node: &str, held: Vec<Cidr>, already: &[Cidr]) {
        let old = self.nodes.get(node).map(|n| n.held.clone()).unwrap_or_default();
        for c in held.iter().filter(|c| !already.contains(c)) {
            self.reserve(c);
        }
        for c in &old {
            self.unreserve(c);
        }
        if let Some(n) = self.nodes.get_mut(node) {
            n.held = held;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn book() -> Book {
        Book::new(vec![CidrAllocator::new(Family::V4, &[c("10.0.0.0/22")], 24).unwrap()])
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn non_adjacent_duplicates_do_not_panic() {
        let mut b = book();
        b.observe("n", "u", &strings(&["10.0.0.0/24", "10.0.1.0/24", "10.0.0.0/24"]));
        assert_eq!(b.decide("n", true), Decision::Assign(vec![c("10.0.0.0/24"), c("10.0.1.0/24")]));
        b.observe("m", "v", &[]);
        assert_eq!(b.decide("m", true), Decision::Assign(vec![c("10.0.2.0/24")]));
    }

    #[test]
    fn refused_ranges_still_block_allocation() {
        let mut b = book();
        // Wrong mask (a /23 and a /25), host bits (read as the /24).
        b.observe("wide", "1", &strings(&["10.0.0.0/23"]));
        assert!(matches!(b.decide("wide", true), Decision::Refuse { reason: "wrong-mask", .. }));
        b.observe("narrow", "2", &strings(&["10.0.2.128/25"]));
        assert!(matches!(b.decide("narrow", true), Decision::Refuse { reason: "wrong-mask", .. }));
        b.observe("new", "3", &[]);
        assert_eq!(b.decide("new", true), Decision::Assign(vec![c("10.0.3.0/24")]), "the only subnet nobody shows");
        b.observe("newer", "4", &[]);
        assert_eq!(b.decide("newer", true), Decision::Full { family: Family::V4 });
        // The wide node goes away: its range is free again.
        b.forget("wide");
        assert_eq!(b.decide("newer", true), Decision::Assign(vec![c("10.0.0.0/24")]));
    }

    #[test]
    fn host_bits_are_read_as_upstream_reads_them() {
        let mut b = book();
        b.observe("n", "u", &strings(&["10.0.1.9/24"]));
        assert_eq!(b.decide("n", true), Decision::Assign(vec![c("10.0.1.0/24")]));
    }

    #[test]
    fn a_node_may_not_change_its_cidrs() {
        let mut b = book();
        b.observe("n", "u", &strings(&["10.0.1.0/24"]));
        assert_eq!(b.decide("n", true), Decision::Ok);
        b.observe("n", "u", &strings(&["10.0.2.0/24"]));
        assert!(matches!(b.decide("n", true), Decision::Refuse { reason: "changed", .. }));
        assert_eq!(b.held("n"), [c("10.0.1.0/24")], "keeps what it held");
        b.observe("m", "v", &[]);
        let Decision::Assign(got) = b.decide("m", true) else { panic!() };
        assert!(!got.iter().any(|g| g.overlaps(&c("10.0.1.0/24")) || g.overlaps(&c("10.0.2.0/24"))));
    }

    #[test]
    fn recreated_node_with_a_write_in_flight_gets_nothing_of_the_old_one() {
        let mut b = book();
        b.observe("n", "old", &[]);
        let Decision::Assign(first) = b.decide("n", true) else { panic!() };
        // The node is deleted and re-created before the write answers.
        b.observe("n", "new", &[]);
        b.abandon("n", "old", &first);
        let Decision::Assign(second) = b.decide("n", true) else { panic!() };
        b.observe("x", "x", &[]);
        let Decision::Assign(third) = b.decide("x", true) else { panic!() };
        assert!(!second.iter().any(|s| third.contains(s)), "{second:?} {third:?}");
    }

    /// One step of the world the operator sees.
    #[derive(Clone, Debug)]
    enum Op {
        /// A node (re)appears or changes, showing these entries.
        Show {
            node: u8,
            uid: u8,
            cidrs: Vec<String>,
        },
        /// The operator decides for a node; `write` says whether the write
        /// of an assignment succeeds (the node then shows it) or fails.
        Decide {
            node: u8,
            write: bool,
        },
        Delete {
            node: u8,
        },
    }

    fn raw_cidr() -> impl Strategy<Value = String> {
        prop_oneof![
            (0u32..6, 21u8..=26).prop_map(|(i, len)| format!("10.0.{}.{}/{len}", i, (i * 37) % 256)),
            Just("10.0.9.0/24".to_string()),
            Just("not-a-cidr".to_string()),
            Just("fd00::/120".to_string()),
            Just("0.0.0.0/0".to_string()),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..5, 0u8..3, proptest::collection::vec(raw_cidr(), 0..4)).prop_map(|(node, uid, cidrs)| Op::Show { node, uid, cidrs }),
            4 => (0u8..5, any::<bool>()).prop_map(|(node, write)| Op::Decide { node, write }),
            1 => (0u8..5).prop_map(|node| Op::Delete { node }),
        ]
    }

    proptest! {
        /// Over arbitrary sequences of node states: no CIDR is held by two
        /// nodes, and an assignment never gives a node anything another
        /// node shows or holds.
        #[test]
        fn no_cidr_twice_and_nothing_shown_handed_out(ops in proptest::collection::vec(op(), 1..80)) {
            let mut b = Book::new(vec![CidrAllocator::new(Family::V4, &[c("10.0.0.0/22"), c("10.0.8.0/24")], 24).unwrap()]);
            // The API server's view: node -> (uid, shown).
            let mut world: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
            for o in ops {
                match o {
                    Op::Show { node, uid, cidrs } => {
                        let name = format!("n{node}");
                        world.insert(name.clone(), (format!("u{uid}"), cidrs.clone()));
                        b.observe(&name, &format!("u{uid}"), &cidrs);
                    }
                    Op::Delete { node } => {
                        let name = format!("n{node}");
                        world.remove(&name);
                        b.forget(&name);
                    }
                    Op::Decide { node, write } => {
                        let name = format!("n{node}");
                        let Some((uid, _)) = world.get(&name).cloned() else { continue };
                        if let Decision::Assign(cidrs) = b.decide(&name, true) {
                            // Nothing another node shows (any shape) or holds.
                            for (other, (_, shown)) in &world {
                                if *other == name { continue; }
                                for s in shown.iter().filter_map(|s| parse_pod_cidr(s).ok()) {
                                    for a in &cidrs {
                                        prop_assert!(!a.overlaps(&s) || world[&name].1.iter().filter_map(|x| parse_pod_cidr(x).ok()).any(|x| x == *a),
                                            "{} assigned {} overlapping {} shown by {}", name, a, s, other);
                                    }
                                }
                            }
                            if write {
                                let list: Vec<String> = cidrs.iter().map(|c| c.to_string()).collect();
                                world.insert(name.clone(), (uid.clone(), list.clone()));
                                b.observe(&name, &uid, &list);
                            } else {
                                b.abandon(&name, &uid, &cidrs);
                            }
                        }
                    }
                }
                // Held sets are pairwise disjoint.
                let all: Vec<(&str, Cidr)> = b.holdings().flat_map(|(n, cs)| cs.iter().map(move |c| (n, *c))).collect();
                for (i, (n1, c1)) in all.iter().enumerate() {
                    for (n2, c2) in &all[i + 1..] {
                        prop_assert!(n1 == n2 || !c1.overlaps(c2), "{} held by {} and {} by {}", c1, n1, c2, n2);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod arbitrary_input {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]
        /// Any strings a node may show as pod CIDRs: observed and decided
        /// without a panic, and nothing shown is handed to another node.
        #[test]
        fn any_strings_never_panic(lists in proptest::collection::vec(proptest::collection::vec(".{0,24}|[0-9.:/a-f]{1,20}", 0..5), 1..5)) {
            let mut b = Book::new(vec![
                CidrAllocator::new(Family::V4, &["10.0.0.0/22".parse().unwrap()], 24).unwrap(),
                CidrAllocator::new(Family::V6, &["fd00::/118".parse().unwrap()], 120).unwrap(),
            ]);
            for (i, l) in lists.iter().enumerate() {
                b.observe(&format!("n{i}"), &format!("u{i}"), l);
            }
            for i in 0..lists.len() {
                if let Decision::Assign(cidrs) = b.decide(&format!("n{i}"), true) {
                    for (j, other) in lists.iter().enumerate() {
                        if i == j { continue; }
                        for s in other.iter().filter_map(|s| parse_pod_cidr(s).ok()) {
                            let own: Vec<Cidr> = lists[i].iter().filter_map(|x| parse_pod_cidr(x).ok()).collect();
                            prop_assert!(cidrs.iter().all(|c| !c.overlaps(&s) || own.contains(c)));
                        }
                    }
                }
            }
        }
    }
}
