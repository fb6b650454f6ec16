//! Resolving peers to identities and compiling one endpoint's policy into
//! datapath map entries.
//!
//! The datapath looks a packet up by (endpoint, direction, peer identity,
//! protocol, destination port) in a longest-prefix-match map whose keys are
//! (peer, protocol, port prefix): first under the peer's own identity, then
//! under identity 0 (any peer); a miss means the direction's default
//! (deny when enforced, allow when not). [`compile`] distills the rules so
//! that this lookup gives upstream's verdict: a deny that covers the flow
//! wins over every allow; otherwise any allow allows.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::Config;
use crate::PolicyRef;
use crate::labels::{LabelSet, SOURCE_RESERVED};
use crate::parse::{Entry, Peer, PortSel};
use crate::prefix::Prefix;

/// A named container port of an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPort {
    pub name: String,
    pub proto: u8,
    pub port: u16,
}

/// Every identity the selectors may select, with the named ports of the
/// endpoints behind each (egress named ports resolve per peer).
#[derive(Clone, Debug, Default)]
pub struct Universe {
    pub cfg: Config,
    pub identities: BTreeMap<u32, LabelSet>,
    pub named_ports: BTreeMap<u32, Vec<NamedPort>>,
}

impl Universe {
    pub fn new(cfg: Config) -> Universe {
        let mut u = Universe { cfg, ..Default::default() };
        for (id, labels) in crate::identity::reserved() {
            u.identities.insert(id, labels);
        }
        u
    }

    /// Gives every world-labelled identity (CIDR identities, and world for
    /// `0.0.0.0/0` or `::/0`) the labels of the groups whose CIDRs contain
    /// its prefix. The caller makes each group CIDR a CIDR identity.
    pub fn add_cidr_groups(&mut self, groups: &[crate::cidr_group::CidrGroup]) {
        if groups.is_empty() {
            return;
        }
        let cfg = self.cfg.clone();
        for (id, labels) in self.identities.iter_mut() {
            if !is_world(labels) {
                continue;
            }
            let prefixes: Vec<Prefix> = match labels.cidr() {
                Some(p) => vec![p],
                None => world_prefixes(&cfg, *id),
            };
            let extra: Vec<_> = prefixes.iter().flat_map(|p| crate::cidr_group::labels_for(groups, p)).collect();
            if !extra.is_empty() {
                *labels = labels.iter().cloned().chain(extra).collect();
            }
        }
    }
}

/// The default routes a world identity stands for.
fn world_prefixes(cfg: &Config, id: u32) -> Vec<Prefix> {
    use crate::identity::{WORLD, WORLD_IPV4, WORLD_IPV6};
    let any4 = Prefix::parse("0.0.0.0/0", false).expect("valid");
    let any6 = Prefix::parse("::/0", false).expect("valid");
    match id {
        WORLD_IPV4 => vec![any4],
        WORLD_IPV6 => vec![any6],
        WORLD if cfg.ipv4 && cfg.ipv6 => Vec::new(),
        WORLD if cfg.ipv6 => vec![any6],
        WORLD => vec![any4],
        _ => Vec::new(),
    }
}

/// The identities a peer selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Every identity (identity 0 in the map).
    Any,
    Ids(Vec<u32>),
}

/// Peer selections, each computed once per universe.
pub struct Selections<'u> {
    pub universe: &'u Universe,
    cache: HashMap<Peer, Selection>,
}

fn is_world(labels: &LabelSet) -> bool {
    ["world", "world-ipv4", "world-ipv6"].iter().any(|k| labels.has(SOURCE_RESERVED, k))
}

impl<'u> Selections<'u> {
    pub fn new(universe: &'u Universe) -> Selections<'u> {
        Selections { universe, cache: HashMap::new() }
    }

    pub fn select(&mut self, peer: &Peer) -> &Selection {
        if !self.cache.contains_key(peer) {
            let s = select(self.universe, peer);
            self.cache.insert(peer.clone(), s);
        }
        &self.cache[peer]
    }
}

/// Whether a CIDR peer selects an identity with these labels: only
/// world-labelled identities (CIDR identities and world itself), whose
/// CIDR lies inside `prefix` and outside every except (upstream's CIDR
/// selector with the default policy-cidr-match-mode).
pub fn cidr_selects(cfg: &Config, prefix: &Prefix, except: &[Prefix], labels: &LabelSet) -> bool {
    if !is_world(labels) {
        return false;
    }
    let inside = |p: &Prefix, labels: &LabelSet| {
        if p.prefix_len() == 0 {
            let w = crate::identity::world_label(cfg, p.is_ipv4());
            labels.has(&w.source, &w.key) || labels.cidr().is_some_and(|c| p.contains(&c))
        } else {
            labels.cidr().is_some_and(|c| p.contains(&c))
        }
    };
    inside(prefix, labels) && !except.iter().any(|e| inside(e, labels))
}

fn select(u: &Universe, peer: &Peer) -> Selection {
    match peer {
        Peer::Labels(s) if s.is_wildcard() => Selection::Any,
        Peer::Labels(s) => {
            Selection::Ids(u.identities.iter().filter(|(_, l)| s.matches(l)).map(|(id, _)| *id).collect())
        }
        Peer::Cidr { prefix, except } => Selection::Ids(
            u.identities.iter().filter(|(_, l)| cidr_selects(&u.cfg, prefix, except, l)).map(|(id, _)| *id).collect(),
        ),
        Peer::CidrGroup { selector, encoded, except } => Selection::Ids(
            u.identities
                .iter()
                .filter(|(_, l)| {
                    let matches =
                        if *encoded { crate::cidr_group::selector_matches(selector, l) } else { selector.matches(l) };
                    is_world(l) && matches && !except.iter().any(|e| l.cidr().is_some_and(|c| e.contains(&c)))
                })
                .map(|(id, _)| *id)
                .collect(),
        ),
        Peer::Nothing(_) | Peer::Service(_) => Selection::Ids(Vec::new()),
    }
}

/// A key of the per-endpoint map (direction aside): peer identity (0:
/// any), protocol (0: every protocol, then `plen` is 0) and the leading
/// `plen` bits of the destination port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MapKey {
    pub peer: u32,
    pub proto: u8,
    pub port: u16,
    pub plen: u8,
}

/// A (protocol, port prefix) set: `proto` 0 covers every protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct L4Prefix {
    proto: u8,
    port: u16,
    plen: u8,
}

fn port_mask(plen: u8) -> u16 {
    if plen == 0 { 0 } else { u16::MAX << (16 - u32::from(plen)) }
}

impl L4Prefix {
    fn contains(&self, other: &L4Prefix) -> bool {
        self.proto == 0
            || (self.proto == other.proto && self.plen <= other.plen && other.port & port_mask(self.plen) == self.port)
    }
}

/// Port ranges as prefixes (upstream's masked ports).
pub fn range_prefixes(start: u16, end: u16) -> Vec<(u16, u8)> {
    if start == 0 && (end == 0 || end == u16::MAX) {
        return vec![(0, 0)];
    }
    let end = end.max(start);
    let mut out = Vec::new();
    let mut cur = u32::from(start);
    let end = u32::from(end);
    while cur <= end {
        // The largest aligned block starting at `cur` that ends by `end`.
        let mut size = if cur == 0 { 1 << 16 } else { 1u32 << cur.trailing_zeros().min(16) };
        while cur + size - 1 > end {
            size >>= 1;
        }
        let plen = 16 - size.trailing_zeros() as u8;
        out.push((cur as u16, plen));
        cur += size;
    }
    out
}

/// One direction of an endpoint's policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Direction {
    /// Default deny (a selecting rule has a section in this direction with
    /// default deny on).
    pub enforced: bool,
    /// Map entries -> deny.
    pub entries: BTreeMap<MapKey, bool>,
}

impl Direction {
    /// The verdict the datapath gives (true: allowed), computed from the
    /// entries the way `bpf/policy.c` looks them up.
    pub fn allows(&self, peer: u32, proto: u8, port: u16) -> bool {
        match self.lookup(peer, proto, port).or_else(|| self.lookup(0, proto, port)) {
            Some(deny) => !deny,
            None => !self.enforced,
        }
    }

    fn lookup(&self, peer: u32, proto: u8, port: u16) -> Option<bool> {
        for plen in (0..=16u8).rev() {
            let k = MapKey { peer, proto, port: port & port_mask(plen), plen };
            if let Some(d) = self.entries.get(&k) {
                return Some(*d);
            }
        }
        self.entries.get(&MapKey { peer, proto: 0, port: 0, plen: 0 }).copied()
    }
}

/// What the datapath needs for one endpoint, and what to report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub ingress: Direction,
    pub egress: Direction,
    /// Policies with a rule selecting the endpoint.
    pub policies: BTreeSet<PolicyRef>,
    /// What those rules ask that the datapath does not do.
    pub not_enforced: BTreeSet<String>,
}

/// Rule prefixes per peer, deny OR-ed per key.
type Rules = BTreeMap<u32, BTreeMap<L4Prefix, bool>>;

/// Compiles the entries that select an endpoint (labels `subject`, its own
/// named ports `ports`) into its map entries.
pub fn compile<'e>(
    subject: &LabelSet,
    ports: &[NamedPort],
    entries: impl IntoIterator<Item = &'e Entry>,
    sel: &mut Selections,
) -> EndpointPolicy {
    let mut out = EndpointPolicy::default();
    let mut rules: [Rules; 2] = [Rules::new(), Rules::new()];
    for e in entries {
        if e.node_subject || !e.subject.matches(subject) {
            continue;
        }
        out.policies.insert(e.origin.policy.clone());
        out.not_enforced.extend(e.not_enforced.iter().cloned());
        let d = usize::from(!e.ingress);
        let dir = if e.ingress { &mut out.ingress } else { &mut out.egress };
        dir.enforced |= e.default_deny;
        let Some(peers) = section_peers(e) else { continue };
        let mut add = |peer: u32, p: L4Prefix| {
            let d = rules[d].entry(peer).or_default().entry(p).or_insert(e.deny);
            *d |= e.deny;
        };
        for peer in peers {
            let ids: Vec<u32> = match sel.select(peer) {
                Selection::Any => vec![0],
                Selection::Ids(ids) => ids.clone(),
            };
            let Some(l4) = &e.l4 else {
                for id in &ids {
                    add(*id, L4Prefix { proto: 0, port: 0, plen: 0 });
                }
                continue;
            };
            for spec in l4 {
                match &spec.port {
                    PortSel::Number { port, end } => {
                        for (p, plen) in range_prefixes(*port, *end) {
                            for id in &ids {
                                add(*id, L4Prefix { proto: spec.proto, port: p, plen });
                            }
                        }
                    }
                    PortSel::Named(name) if e.ingress => {
                        let found = ports.iter().find(|n| &n.name == name && n.proto == spec.proto);
                        if let Some(n) = found.filter(|n| n.port != 0) {
                            for id in &ids {
                                add(*id, L4Prefix { proto: spec.proto, port: n.port, plen: 16 });
                            }
                        }
                    }
                    PortSel::Named(name) => {
                        // Egress: the port the destination gives that name.
                        let u = sel.universe;
                        let targets: Vec<u32> =
                            if ids == [0] { u.named_ports.keys().copied().collect() } else { ids.clone() };
                        for id in targets {
                            for n in u.named_ports.get(&id).into_iter().flatten() {
                                if &n.name == name && n.proto == spec.proto && n.port != 0 {
                                    add(id, L4Prefix { proto: spec.proto, port: n.port, plen: 16 });
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out.ingress.entries = distill(&rules[0]);
    out.egress.entries = distill(&rules[1]);
    out
}

/// Every peer, as a section with ports and an empty peer list selects.
static ANY_PEER: [Peer; 1] = [Peer::Labels(crate::selector::Selector { reqs: Vec::new() })];

/// The peers a section selects from: none (`None`) without a peer list or
/// with an empty one and no ports; every peer with an empty one and ports
/// (upstream's reading of `toPorts` alone).
pub(crate) fn section_peers(e: &Entry) -> Option<&[Peer]> {
    let l3 = e.l3.as_ref()?;
    match (l3.is_empty(), &e.l4) {
        (true, None) => None,
        (true, Some(_)) => Some(&ANY_PEER),
        (false, _) => Some(l3),
    }
}

/// Map entries for the rule prefixes of every peer: under a peer, its own
/// prefixes and those of identity 0 (the datapath consults identity 0 only
/// when the peer has no entry at all); each prefix carries deny when any
/// rule prefix containing it denies. Entries that would only repeat their
/// nearest enclosing entry are left out.
fn distill(rules: &Rules) -> BTreeMap<MapKey, bool> {
    let any = rules.get(&0).cloned().unwrap_or_default();
    let mut out = BTreeMap::new();
    for (peer, own) in rules {
        let mut set = any.clone();
        if *peer != 0 {
            for (p, d) in own {
                *set.entry(*p).or_insert(*d) |= *d;
            }
        }
        for (p, d) in table(&set) {
            out.insert(MapKey { peer: *peer, proto: p.proto, port: p.port, plen: p.plen }, d);
        }
    }
    out
}

/// The longest-prefix table of one peer's rule prefixes.
fn table(set: &BTreeMap<L4Prefix, bool>) -> Vec<(L4Prefix, bool)> {
    // Ancestors (prefixes containing p, p included) in the set.
    let ancestors = |p: &L4Prefix| -> Vec<L4Prefix> {
        let mut v = Vec::new();
        let all = L4Prefix { proto: 0, port: 0, plen: 0 };
        if set.contains_key(&all) {
            v.push(all);
        }
        if p.proto != 0 {
            for plen in 0..=p.plen {
                let a = L4Prefix { proto: p.proto, port: p.port & port_mask(plen), plen };
                if set.contains_key(&a) {
                    v.push(a);
                }
            }
        }
        v
    };
    let verdict = |p: &L4Prefix| ancestors(p).iter().any(|a| set[a]);
    let mut out = Vec::new();
    for p in set.keys() {
        let v = verdict(p);
        // The nearest proper ancestor, if any: same verdict means redundant.
        let parent = ancestors(p).into_iter().filter(|a| a != p).max_by_key(|a| (a.proto != 0, a.plen));
        if parent.is_some_and(|a| verdict(&a) == v) {
            continue;
        }
        debug_assert!(ancestors(p).iter().all(|a| a.contains(p)));
        out.push((*p, v));
    }
    out
}

/// Every prefix the entries name (CIDRs and their excepts): each needs a
/// CIDR identity in the ipcache.
pub fn cidr_prefixes<'e>(entries: impl IntoIterator<Item = &'e Entry>) -> BTreeSet<Prefix> {
    let mut out = BTreeSet::new();
    for e in entries {
        for p in e.l3.iter().flatten() {
            match p {
                Peer::Cidr { prefix, except } => {
                    if prefix.prefix_len() > 0 {
                        out.insert(*prefix);
                    }
                    out.extend(except.iter().filter(|x| x.prefix_len() > 0).copied());
                }
                // The groups' own CIDRs are identities whether or not a
                // policy names them (see `Universe::add_cidr_groups`).
                Peer::CidrGroup { except, .. } => out.extend(except.iter().filter(|x| x.prefix_len() > 0).copied()),
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_become_aligned_prefixes() {
        assert_eq!(range_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(range_prefixes(0, 0), vec![(0, 0)]);
        assert_eq!(range_prefixes(16, 31), vec![(16, 12)]);
        assert_eq!(range_prefixes(8000, 8080).iter().map(|(_, l)| 1u32 << (16 - l)).sum::<u32>(), 81);
        for (s, e) in [(1u16, 65535u16), (1, 1), (1023, 1025), (65535, 65535), (3, 100)] {
            let ps = range_prefixes(s, e);
            let covered: u32 = ps.iter().map(|(_, l)| 1u32 << (16 - l)).sum();
            assert_eq!(covered, u32::from(e) - u32::from(s) + 1, "{s}-{e}");
            for (p, l) in ps {
                assert_eq!(p & !port_mask(l), 0, "aligned");
                assert!(p >= s && u32::from(p) + (1u32 << (16 - l)) - 1 <= u32::from(e));
            }
        }
    }

    use proptest::prelude::*;

    fn rule_prefix() -> impl Strategy<Value = (u32, L4Prefix, bool)> {
        // Peers 0 (any), 1, 2; protocols any/6/17; ports in a small space so
        // that prefixes overlap often.
        (0u32..3, prop_oneof![Just(0u8), Just(6u8), Just(17u8)], 0u16..16, 0u8..=16, any::<bool>()).prop_map(
            |(peer, proto, port, plen, deny)| {
                let (port, plen) = if proto == 0 { (0, 0) } else { (port << 12 & port_mask(plen), plen) };
                (peer, L4Prefix { proto, port, plen }, deny)
            },
        )
    }

    proptest! {
        /// The distilled table, looked up as the datapath does, gives the
        /// verdict of the rules themselves: a deny covering the flow wins,
        /// else any allow covering it allows, else the default.
        #[test]
        fn distilled_lookup_equals_the_rules(rs in proptest::collection::vec(rule_prefix(), 0..12), enforced: bool) {
            let mut rules = Rules::new();
            for (peer, p, deny) in &rs {
                *rules.entry(*peer).or_default().entry(*p).or_insert(*deny) |= *deny;
            }
            let dir = Direction { enforced, entries: distill(&rules) };
            for peer in 0..4u32 {
                for proto in [1u8, 6, 17] {
                    for port in (0u16..16).map(|p| p << 12).chain([1, 80, 0x1fff]) {
                        let point = L4Prefix { proto, port, plen: 16 };
                        let covering: Vec<bool> = rs
                            .iter()
                            .filter(|(p, r, _)| (*p == peer || *p == 0) && r.contains(&point))
                            .map(|(_, _, d)| *d)
                            .collect();
                        let want = if covering.is_empty() { !enforced } else { !covering.iter().any(|d| *d) };
                        prop_assert_eq!(dir.allows(peer, proto, port), want, "peer {} proto {} port {}", peer, proto, port);
                    }
                }
            }
        }
    }
}
