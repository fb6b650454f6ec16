//! Turning CiliumNetworkPolicies into datapath entries for one endpoint:
//! pure, no I/O. Cilium's semantics: a rule selects endpoints by labels (a
//! namespaced policy only in its namespace); once any selecting rule has an
//! ingress (egress) section, the endpoint denies by default in that
//! direction and allows what the rules allow; deny rules win. Peers come from
//! endpoint selectors (matched against every known identity's labels;
//! implicitly limited to the policy's namespace unless the selector names
//! one), entities (reserved identities), and CIDRs (local CIDR identities
//! placed in the ipcache). L7 and FQDN rules are accepted but not enforced:
//! they are reported, never silently dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use cilium_crds::policy::{CidrRule, Entity, L4Proto, PortProtocol, PortRule, Rule};
use cilium_crds::selector::EndpointSelector;

pub const NAMESPACE_LABEL: &str = "k8s:io.kubernetes.pod.namespace";
const NAMESPACE_KEY: &str = "io.kubernetes.pod.namespace";

/// Local (node-only) CIDR identities carry this bit, as upstream.
pub const LOCAL_IDENTITY_FLAG: u32 = 1 << 24;

pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// An identity as the selectors see it.
#[derive(Clone, Debug)]
pub struct IdentityView {
    pub id: u32,
    /// Security labels, `"source:key" -> value`.
    pub labels: BTreeMap<String, String>,
    /// The same under every name a selector may use ([`selector_labels`]),
    /// computed once.
    pub expanded: BTreeMap<String, String>,
}

impl IdentityView {
    pub fn new(id: u32, labels: BTreeMap<String, String>) -> IdentityView {
        let expanded = selector_labels(&labels);
        IdentityView { id, labels, expanded }
    }
}

/// A policy with its rules; `namespace` None for a clusterwide policy.
pub struct PolicySource<'a> {
    pub namespace: Option<&'a str>,
    pub name: &'a str,
    pub rules: Vec<&'a Rule>,
}

impl PolicySource<'_> {
    pub fn display(&self) -> String {
        match self.namespace {
            Some(ns) => format!("CiliumNetworkPolicy {ns}/{}", self.name),
            None => format!("CiliumClusterwideNetworkPolicy {}", self.name),
        }
    }
}

/// {peer identity (0 any), port (0 any), protocol (0 any), direction}.
pub type EntryKey = (u32, u16, u8, u8);

/// What the datapath needs for one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Computed {
    pub ingress_enforce: bool,
    pub egress_enforce: bool,
    /// Entry -> deny.
    pub entries: BTreeMap<EntryKey, bool>,
    /// What the rules ask that the datapath does not do (L7, FQDN, ...).
    pub not_enforced: BTreeSet<String>,
    /// Policies selecting this endpoint.
    pub policies: BTreeSet<String>,
}

/// Stable local identities for CIDRs (prefix -> identity), shared by every
/// endpoint of the node; the ipcache gets all of them.
#[derive(Clone, Debug, Default)]
pub struct CidrIdentities {
    pub by_prefix: BTreeMap<(Ipv4Addr, u8), u32>,
    next: u32,
}

impl CidrIdentities {
    pub fn identity(&mut self, prefix: (Ipv4Addr, u8)) -> u32 {
        if let Some(id) = self.by_prefix.get(&prefix) {
            return *id;
        }
        self.next += 1;
        let id = LOCAL_IDENTITY_FLAG | self.next;
        self.by_prefix.insert(prefix, id);
        id
    }
}

/// Labels under every name a selector may use: `k8s:app`, `any:app`, `app`.
pub fn selector_labels(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in labels {
        out.insert(k.clone(), v.clone());
        if let Some((_, key)) = k.split_once(':') {
            out.insert(key.to_string(), v.clone());
            out.insert(format!("any:{key}"), v.clone());
        }
    }
    out
}

fn names_namespace(sel: &EndpointSelector) -> bool {
    let is_ns = |k: &str| k.rsplit(':').next() == Some(NAMESPACE_KEY);
    sel.match_labels.iter().flatten().any(|(k, _)| is_ns(k))
        || sel.match_expressions.iter().flatten().any(|r| is_ns(&r.key))
}

/// Identities a peer selector of `policy_ns` picks.
fn select(sel: &EndpointSelector, policy_ns: Option<&str>, identities: &[IdentityView]) -> Vec<u32> {
    let implicit_ns = policy_ns.filter(|_| !names_namespace(sel));
    identities
        .iter()
        .filter(|i| {
            let l = &i.expanded;
            implicit_ns.is_none_or(|ns| l.get(NAMESPACE_KEY).map(String::as_str) == Some(ns)) && sel.matches(l)
        })
        .map(|i| i.id)
        .collect()
}

const RESERVED_CLUSTER: &[u32] = &[1, 3, 4, 5, 6, 7, 8];

fn entity_ids(e: &Entity, identities: &[IdentityView], cidrs: &CidrIdentities) -> Vec<u32> {
    match e {
        Entity::All => vec![0],
        Entity::World => std::iter::once(2).chain(cidrs.by_prefix.values().copied()).collect(),
        Entity::Cluster => identities.iter().map(|i| i.id).chain(RESERVED_CLUSTER.iter().copied()).collect(),
        Entity::Host => vec![1],
        Entity::Init => vec![5],
        Entity::Ingress => vec![8],
        Entity::Unmanaged => vec![3],
        Entity::RemoteNode => vec![6],
        Entity::Health => vec![4],
        Entity::KubeApiserver => vec![7],
        Entity::None => vec![],
    }
}

fn parse_prefix(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, len) = s.split_once('/').unwrap_or((s, "32"));
    let ip: Ipv4Addr = ip.parse().ok()?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
    let masked = if len == 0 { 0 } else { u32::from(ip) & (u32::MAX << (32 - len)) };
    Some((Ipv4Addr::from(masked), len))
}

/// L3 peers of one rule section; None when the section names no peer at all.
struct Peers {
    ids: Option<Vec<u32>>,
}

#[allow(clippy::too_many_arguments)]
fn peers(
    endpoints: Option<&Vec<EndpointSelector>>,
    entities: Option<&Vec<Entity>>,
    cidr: Option<&Vec<cilium_crds::policy::Cidr>>,
    cidr_set: Option<&Vec<CidrRule>>,
    policy_ns: Option<&str>,
    identities: &[IdentityView],
    cidrs: &mut CidrIdentities,
    notes: &mut BTreeSet<String>,
    what: &str,
) -> Peers {
    if endpoints.is_none() && entities.is_none() && cidr.is_none() && cidr_set.is_none() {
        return Peers { ids: None };
    }
    let mut ids = Vec::new();
    for sel in endpoints.into_iter().flatten() {
        ids.extend(select(sel, policy_ns, identities));
    }
    for c in cidr.into_iter().flatten() {
        match parse_prefix(c.as_str()) {
            Some(p) => ids.push(cidrs.identity(p)),
            None => {
                notes
                    .insert(format!("{what}: {:?} is not an IPv4 CIDR (IPv6 CIDR rules are not enforced)", c.as_str()));
            }
        }
    }
    for set in cidr_set.into_iter().flatten() {
        let Some(p) = set.cidr.as_ref().and_then(|c| parse_prefix(c.as_str())) else {
            notes.insert(format!("{what}: a cidrSet entry without an IPv4 cidr is not enforced"));
            continue;
        };
        ids.push(cidrs.identity(p));
        // Excepted prefixes get identities of their own (longer prefixes
        // win in the ipcache), which this rule does not allow.
        for ex in set.except.iter().flatten() {
            if let Some(e) = parse_prefix(ex.as_str()) {
                cidrs.identity(e);
            }
        }
    }
    for e in entities.into_iter().flatten() {
        ids.extend(entity_ids(e, identities, cidrs));
    }
    Peers { ids: Some(ids) }
}

/// (port, protocol) pairs of `toPorts`; `[(0, 0)]` without any.
fn ports(
    port_rules: &[(Option<&Vec<PortProtocol>>, bool)],
    notes: &mut BTreeSet<String>,
    what: &str,
) -> Vec<(u16, u8)> {
    if port_rules.is_empty() {
        return vec![(0, 0)];
    }
    let mut out = Vec::new();
    for (list, has_l7) in port_rules {
        let list = list.map(|l| l.as_slice()).unwrap_or_default();
        if list.is_empty() {
            out.push((0, 0));
        }
        for p in list {
            let proto = match p.protocol {
                None | Some(L4Proto::Any) => 0,
                Some(L4Proto::Tcp) => 6,
                Some(L4Proto::Udp) => 17,
                Some(L4Proto::Sctp) => 132,
                Some(other) => {
                    notes.insert(format!("{what}: protocol {other:?} is not enforced"));
                    continue;
                }
            };
            let port_text = p.port.as_deref().unwrap_or("0");
            let Ok(port) = port_text.parse::<u16>() else {
                notes.insert(format!("{what}: named port {port_text:?} is not enforced"));
                continue;
            };
            if p.end_port.is_some_and(|e| e as i64 > port as i64) {
                notes.insert(format!("{what}: port range {port}-{} enforced as {port} only", p.end_port.unwrap_or(0)));
            }
            if *has_l7 {
                notes.insert(format!("{what}: L7 rules on port {port_text} are not enforced (L4 is)"));
            }
            out.push((port, proto));
        }
    }
    out
}

fn l7(r: &PortRule) -> bool {
    r.rules.is_some() || r.listener.is_some() || r.terminating_tls.is_some() || r.originating_tls.is_some()
}

/// One ingress/egress (deny) rule, normalized: its L3 peers and L4 ports.
struct Section<'r> {
    endpoints: Option<&'r Vec<EndpointSelector>>,
    entities: Option<&'r Vec<Entity>>,
    cidr: Option<&'r Vec<cilium_crds::policy::Cidr>>,
    cidr_set: Option<&'r Vec<CidrRule>>,
    /// Per `toPorts` entry: its ports, and whether it carries L7 rules.
    ports: Vec<(Option<&'r Vec<PortProtocol>>, bool)>,
    icmps: bool,
    fqdns: bool,
    direction: u8,
    deny: bool,
}

impl Section<'_> {
    /// Adds this section's entries (peer x port) to `c`; a deny entry
    /// overrides an allow entry of the same key.
    fn apply(
        &self,
        c: &mut Computed,
        policy_ns: Option<&str>,
        identities: &[IdentityView],
        cidrs: &mut CidrIdentities,
        what: &str,
    ) {
        let pr = peers(
            self.endpoints,
            self.entities,
            self.cidr,
            self.cidr_set,
            policy_ns,
            identities,
            cidrs,
            &mut c.not_enforced,
            what,
        );
        let mut ps = ports(&self.ports, &mut c.not_enforced, what);
        if self.icmps {
            ps = if self.ports.is_empty() { vec![(0, 1)] } else { ps.into_iter().chain([(0, 1)]).collect() };
        }
        // Nothing named at all (or only FQDNs, which are not enforced):
        // the section allows nothing.
        if pr.ids.is_none() && (self.fqdns || (self.ports.is_empty() && !self.icmps)) {
            return;
        }
        for id in pr.ids.unwrap_or_else(|| vec![0]) {
            for (port, proto) in &ps {
                let e = c.entries.entry((id, *port, *proto, self.direction)).or_insert(self.deny);
                *e |= self.deny;
            }
        }
    }
}

/// The datapath view of every policy for one endpoint.
pub fn compute(
    ep_namespace: &str,
    ep_labels: &BTreeMap<String, String>,
    identities: &[IdentityView],
    policies: &[PolicySource],
    cidrs: &mut CidrIdentities,
) -> Computed {
    let mut c = Computed::default();
    let ep = selector_labels(ep_labels);
    for p in policies {
        if p.namespace.is_some_and(|ns| ns != ep_namespace) {
            continue;
        }
        let what = p.display();
        for rule in &p.rules {
            let Some(sel) = &rule.endpoint_selector else { continue };
            if !sel.matches(&ep) {
                continue;
            }
            c.policies.insert(what.clone());
            let dd = rule.enable_default_deny.as_ref();
            if (rule.ingress.is_some() || rule.ingress_deny.is_some()) && dd.and_then(|d| d.ingress) != Some(false) {
                c.ingress_enforce = true;
            }
            if (rule.egress.is_some() || rule.egress_deny.is_some()) && dd.and_then(|d| d.egress) != Some(false) {
                c.egress_enforce = true;
            }
            for r in rule.ingress.iter().flatten() {
                if r.from_requires.is_some() || r.from_nodes.is_some() || r.from_groups.is_some() {
                    c.not_enforced.insert(format!("{what}: fromRequires/fromNodes/fromGroups are not enforced"));
                }
                let s = Section {
                    endpoints: r.from_endpoints.as_ref(),
                    entities: r.from_entities.as_ref(),
                    cidr: r.from_cidr.as_ref(),
                    cidr_set: r.from_cidr_set.as_ref(),
                    ports: r.to_ports.iter().flatten().map(|pr| (pr.ports.as_ref(), l7(pr))).collect(),
                    icmps: r.icmps.is_some(),
                    fqdns: false,
                    direction: DIR_INGRESS,
                    deny: false,
                };
                s.apply(&mut c, p.namespace, identities, cidrs, &what);
            }
            for r in rule.ingress_deny.iter().flatten() {
                let s = Section {
                    endpoints: r.from_endpoints.as_ref(),
                    entities: r.from_entities.as_ref(),
                    cidr: r.from_cidr.as_ref(),
                    cidr_set: r.from_cidr_set.as_ref(),
                    ports: r.to_ports.iter().flatten().map(|pr| (pr.ports.as_ref(), false)).collect(),
                    icmps: false,
                    fqdns: false,
                    direction: DIR_INGRESS,
                    deny: true,
                };
                s.apply(&mut c, p.namespace, identities, cidrs, &what);
            }
            for r in rule.egress.iter().flatten() {
                if r.to_fqdns.is_some() {
                    c.not_enforced.insert(format!(
                        "{what}: toFQDNs rules are not enforced (the traffic they would allow is dropped)"
                    ));
                }
                if r.to_requires.is_some() || r.to_nodes.is_some() || r.to_groups.is_some() || r.to_services.is_some() {
                    c.not_enforced.insert(format!("{what}: toRequires/toNodes/toGroups/toServices are not enforced"));
                }
                let s = Section {
                    endpoints: r.to_endpoints.as_ref(),
                    entities: r.to_entities.as_ref(),
                    cidr: r.to_cidr.as_ref(),
                    cidr_set: r.to_cidr_set.as_ref(),
                    ports: r.to_ports.iter().flatten().map(|pr| (pr.ports.as_ref(), l7(pr))).collect(),
                    icmps: r.icmps.is_some(),
                    fqdns: r.to_fqdns.is_some(),
                    direction: DIR_EGRESS,
                    deny: false,
                };
                s.apply(&mut c, p.namespace, identities, cidrs, &what);
            }
            for r in rule.egress_deny.iter().flatten() {
                let s = Section {
                    endpoints: r.to_endpoints.as_ref(),
                    entities: r.to_entities.as_ref(),
                    cidr: r.to_cidr.as_ref(),
                    cidr_set: r.to_cidr_set.as_ref(),
                    ports: r.to_ports.iter().flatten().map(|pr| (pr.ports.as_ref(), false)).collect(),
                    icmps: false,
                    fqdns: false,
                    direction: DIR_EGRESS,
                    deny: true,
                };
                s.apply(&mut c, p.namespace, identities, cidrs, &what);
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(ns: &str, pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut m: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (format!("k8s:{k}"), v.to_string())).collect();
        m.insert(NAMESPACE_LABEL.into(), ns.into());
        m
    }

    fn rule(yaml: serde_json::Value) -> Rule {
        serde_json::from_value(yaml).unwrap()
    }

    fn world() -> Vec<IdentityView> {
        vec![
            IdentityView::new(1001, labels("default", &[("org", "empire"), ("class", "deathstar")])),
            IdentityView::new(1002, labels("default", &[("org", "empire"), ("class", "tiefighter")])),
            IdentityView::new(1003, labels("default", &[("org", "alliance"), ("class", "xwing")])),
            IdentityView::new(1004, labels("other", &[("org", "empire"), ("class", "tiefighter")])),
        ]
    }

    #[test]
    fn star_wars_l3_l4() {
        let r = rule(serde_json::json!({
            "endpointSelector": { "matchLabels": { "org": "empire", "class": "deathstar" } },
            "ingress": [{ "fromEndpoints": [{ "matchLabels": { "org": "empire" } }],
                          "toPorts": [{ "ports": [{ "port": "80", "protocol": "TCP" }] }] }]
        }));
        let p = PolicySource { namespace: Some("default"), name: "rule1", rules: vec![&r] };
        let mut cidrs = CidrIdentities::default();
        let ids = world();
        let c = compute("default", &ids[0].labels, &ids, &[p], &mut cidrs);
        assert!(c.ingress_enforce && !c.egress_enforce);
        // Empire in the same namespace only (1004 is in "other").
        let want: BTreeMap<EntryKey, bool> =
            [((1001, 80, 6, DIR_INGRESS), false), ((1002, 80, 6, DIR_INGRESS), false)].into();
        assert_eq!(c.entries, want);
        // The xwing is not selected by the policy: nothing enforced there.
        let p = PolicySource { namespace: Some("default"), name: "rule1", rules: vec![&r] };
        let x = compute("default", &ids[2].labels, &ids, &[p], &mut cidrs);
        assert!(!x.ingress_enforce && x.entries.is_empty() && x.policies.is_empty());
    }

    #[test]
    fn clusterwide_expressions_entities_deny_and_cidr() {
        let r = rule(serde_json::json!({
            "endpointSelector": { "matchExpressions": [{ "key": "class", "operator": "In", "values": ["deathstar", "xwing"] }] },
            "ingress": [{ "fromEntities": ["world"] },
                        { "fromEndpoints": [{ "matchLabels": { "org": "empire" } }] }],
            "ingressDeny": [{ "fromEndpoints": [{ "matchLabels": { "class": "tiefighter" } }],
                              "toPorts": [{ "ports": [{ "port": "22" }] }] }],
            "egress": [{ "toCIDRSet": [{ "cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"] }] },
                       { "toPorts": [{ "ports": [{ "port": "53", "protocol": "UDP" }],
                                       "rules": { "dns": [{ "matchPattern": "*" }] } }] }]
        }));
        let p = PolicySource { namespace: None, name: "ccnp", rules: vec![&r] };
        let mut cidrs = CidrIdentities::default();
        let ids = world();
        let c = compute("default", &ids[2].labels, &ids, &[p], &mut cidrs);
        assert!(c.ingress_enforce && c.egress_enforce);
        assert_eq!(cidrs.by_prefix.len(), 2, "the cidr and its except");
        let cidr_id = cidrs.by_prefix[&(Ipv4Addr::new(192, 0, 2, 0), 24)];
        assert_eq!(c.entries.get(&(cidr_id, 0, 0, DIR_EGRESS)), Some(&false));
        let except_id = cidrs.by_prefix[&(Ipv4Addr::new(192, 0, 2, 128), 25)];
        assert!(!c.entries.keys().any(|k| k.0 == except_id), "except not allowed");
        // Clusterwide: empire in every namespace; deny for tiefighters on 22.
        assert_eq!(c.entries.get(&(1004, 0, 0, DIR_INGRESS)), Some(&false));
        assert_eq!(c.entries.get(&(1002, 22, 0, DIR_INGRESS)), Some(&true));
        assert_eq!(c.entries.get(&(1004, 22, 0, DIR_INGRESS)), Some(&true));
        assert_eq!(c.entries.get(&(2, 0, 0, DIR_INGRESS)), Some(&false), "world");
        assert_eq!(c.entries.get(&(0, 53, 17, DIR_EGRESS)), Some(&false), "L4 part of an L7 rule");
        assert!(c.not_enforced.iter().any(|n| n.contains("L7 rules on port 53")), "{:?}", c.not_enforced);
        // The deathstar is selected too, the tiefighter is not.
        let p = PolicySource { namespace: None, name: "ccnp", rules: vec![&r] };
        assert!(compute("default", &ids[1].labels, &ids, &[p], &mut cidrs).entries.is_empty());
    }

    #[test]
    fn egress_only_and_namespace_selectors() {
        let r = rule(serde_json::json!({
            "endpointSelector": {},
            "egress": [{ "toEndpoints": [{ "matchLabels": { "k8s:io.kubernetes.pod.namespace": "other" } }] },
                       { "toFQDNs": [{ "matchName": "example.com" }] }]
        }));
        let p = PolicySource { namespace: Some("default"), name: "egress", rules: vec![&r] };
        let mut cidrs = CidrIdentities::default();
        let ids = world();
        let c = compute("default", &ids[0].labels, &ids, &[p], &mut cidrs);
        assert!(!c.ingress_enforce && c.egress_enforce);
        assert_eq!(c.entries.keys().copied().collect::<Vec<_>>(), vec![(1004, 0, 0, DIR_EGRESS)]);
        assert!(c.not_enforced.iter().any(|n| n.contains("toFQDNs")));
    }
}
