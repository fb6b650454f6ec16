//! Reading policies the way upstream's agent reads them: validation (what
//! upstream's `Sanitize` refuses makes the whole policy invalid, and an
//! invalid policy is never enforced), then translation into [`Entry`]s,
//! one per ingress/egress (deny) section, with the policy's namespace and
//! the cluster name added to peer selectors as upstream adds them.

use cilium_crds::policy::{
    CidrRule, CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy, Entity, IcmpFamily, IcmpRule, IcmpType, L4Proto,
    PortProtocol, PortRule, Rule,
};
use cilium_crds::selector::EndpointSelector;

use crate::labels::{CLUSTER_KEY, NAMESPACE_KEY, NAMESPACE_LABELS_PREFIX, SOURCE_CIDR_GROUP, SOURCE_RESERVED};
use crate::prefix::Prefix;
use crate::selector::{Op, RawSelector, Selector};
use crate::{Config, PolicyKind, PolicyRef};

/// IP protocol numbers the engine knows by name.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_VRRP: u8 = 112;
pub const PROTO_IGMP: u8 = 2;
pub const PROTO_SCTP: u8 = 132;

/// Upstream allows at most this many ports (or ICMP fields) per rule.
const MAX_PORTS: usize = 40;

/// A peer of a section: which identities it selects.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// Identities whose labels the selector matches (endpoint selectors,
    /// entities, nodes). The wildcard selector selects every identity.
    Labels(Selector),
    /// CIDR identities (and world) inside `prefix` and outside every
    /// `except`; `0.0.0.0/0` and `::/0` also select their family's world.
    Cidr { prefix: Prefix, except: Vec<Prefix> },
    /// CIDR identities of CiliumCIDRGroups: those whose group labels
    /// `selector` matches (`encoded`: value by value, for
    /// `cidrGroupSelector`), outside every `except`.
    CidrGroup { selector: Selector, encoded: bool, except: Vec<Prefix> },
    /// A `toServices` entry: selects nothing itself; `service::resolve`
    /// adds the peers of the Services it matches next to it.
    Service(crate::service::ServiceSel),
    /// A peer this engine does not resolve: selects nothing (fail closed).
    Nothing(String),
}

/// Ports of a section: `port == 0` is every port; `end > port` a range.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortSel {
    Number {
        port: u16,
        end: u16,
    },
    /// A container port name, resolved per endpoint.
    Named(String),
}

/// One protocol/port of a section. `proto` 0 is never stored: ANY is
/// expanded to TCP, UDP and SCTP as upstream does.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpec {
    pub proto: u8,
    pub port: PortSel,
}

/// One ingress/egress (deny) section of one rule, as upstream's policy
/// entry: its subject, direction, verdict, default-deny posture, peers and
/// ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub origin: Origin,
    pub subject: Selector,
    /// The rule selects nodes (`nodeSelector`, host policy): never a pod.
    pub node_subject: bool,
    pub ingress: bool,
    pub deny: bool,
    pub default_deny: bool,
    /// `None`: selects no peer at all (an empty peer list). `Some(empty)`:
    /// no peer named, so every peer when ports are given.
    pub l3: Option<Vec<Peer>>,
    /// `None`: L3 only (every protocol and port). `Some(list)`: exactly
    /// these (an empty list allows nothing).
    pub l4: Option<Vec<PortSpec>>,
    /// What this section asks that the datapath does not do.
    pub not_enforced: Vec<String>,
}

/// Where an entry comes from, for reports and traces.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin {
    pub policy: PolicyRef,
    pub rule: usize,
    /// `ingress`, `ingressDeny`, `egress` or `egressDeny`.
    pub section: &'static str,
    pub index: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} rule {} {}[{}]", self.policy, self.rule, self.section, self.index)
    }
}

/// A policy read: its entries (empty when it has none) and what of it is
/// not enforced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub policy: PolicyRef,
    pub entries: Vec<Entry>,
}

/// Why a policy is refused (never enforced), in upstream's words where it
/// has some.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

// ---------------------------------------------------------------- CNP / CCNP

pub fn parse_cnp(p: &CiliumNetworkPolicy, cfg: &Config) -> Result<Parsed, Invalid> {
    let name = p.metadata.name.clone().unwrap_or_default();
    match p.metadata.namespace.clone().filter(|n| !n.is_empty()) {
        Some(ns) => {
            let policy = PolicyRef { kind: PolicyKind::Cnp, namespace: Some(ns), name };
            parse_rules(policy, p.spec.as_ref(), p.specs.as_deref(), cfg)
        }
        // Upstream reads a CNP without a namespace as a CCNP.
        None => {
            let policy = PolicyRef { kind: PolicyKind::Ccnp, namespace: None, name };
            parse_rules(policy, p.spec.as_ref(), p.specs.as_deref(), cfg)
        }
    }
}

pub fn parse_ccnp(p: &CiliumClusterwideNetworkPolicy, cfg: &Config) -> Result<Parsed, Invalid> {
    let policy =
        PolicyRef { kind: PolicyKind::Ccnp, namespace: None, name: p.metadata.name.clone().unwrap_or_default() };
    parse_rules(policy, p.spec.as_ref(), p.specs.as_deref(), cfg)
}

fn parse_rules(
    policy: PolicyRef,
    spec: Option<&Rule>,
    specs: Option<&[Rule]>,
    cfg: &Config,
) -> Result<Parsed, Invalid> {
    let kind = policy.kind.name();
    if policy.name.is_empty() {
        return Err(Invalid(format!("{kind} must have name")));
    }
    if spec.is_none() && specs.is_none() {
        return Err(Invalid(format!("Invalid {kind} spec(s): empty policy")));
    }
    let mut entries = Vec::new();
    for (n, rule) in spec.into_iter().chain(specs.into_iter().flatten()).enumerate() {
        let what = if spec.is_some() && n == 0 { "spec" } else { "specs" };
        let mut out = RuleReader { policy: &policy, rule: n, cfg, entries: Vec::new() };
        out.read(rule).map_err(|e| Invalid(format!("Invalid {kind} {what}: {e}")))?;
        entries.extend(out.entries);
    }
    Ok(Parsed { policy, entries })
}

struct RuleReader<'a> {
    policy: &'a PolicyRef,
    rule: usize,
    cfg: &'a Config,
    entries: Vec<Entry>,
}

/// The ports of one `toPorts` entry, and the entry itself on allow rules
/// (for its L7 parts).
type PortRuleRef<'r> = (Option<&'r Vec<PortProtocol>>, Option<&'r PortRule>);

/// A section of any of the four kinds, borrowed.
struct Section<'r> {
    name: &'static str,
    ingress: bool,
    deny: bool,
    endpoints: Option<&'r Vec<EndpointSelector>>,
    nodes: Option<&'r Vec<EndpointSelector>>,
    entities: Option<&'r Vec<Entity>>,
    cidr: Option<&'r Vec<cilium_crds::policy::Cidr>>,
    cidr_set: Option<&'r Vec<CidrRule>>,
    requires: Option<&'r Vec<EndpointSelector>>,
    groups: Option<&'r serde_json::Value>,
    services: Option<&'r serde_json::Value>,
    fqdns: usize,
    /// (ports, has L7/TLS/listener parts, DNS rules) per `toPorts` entry.
    to_ports: Option<Vec<PortRuleRef<'r>>>,
    icmps: Option<&'r Vec<IcmpRule>>,
}

fn json_len(v: Option<&serde_json::Value>) -> usize {
    match v {
        Some(serde_json::Value::Array(a)) => a.len(),
        Some(serde_json::Value::Null) | None => 0,
        Some(_) => 1,
    }
}

impl RuleReader<'_> {
    fn read(&mut self, rule: &Rule) -> Result<(), String> {
        let n = |v: Option<usize>| v.unwrap_or(0);
        if n(rule.ingress.as_ref().map(Vec::len)) == 0
            && n(rule.ingress_deny.as_ref().map(Vec::len)) == 0
            && n(rule.egress.as_ref().map(Vec::len)) == 0
            && n(rule.egress_deny.as_ref().map(Vec::len)) == 0
        {
            return Err("rule must have at least one of Ingress, IngressDeny, Egress, EgressDeny".into());
        }
        let (subject_raw, node_subject) = match (&rule.endpoint_selector, &rule.node_selector) {
            (None, None) => return Err("rule must have one of EndpointSelector or NodeSelector".into()),
            (Some(_), Some(_)) => return Err("rule cannot have both EndpointSelector and NodeSelector".into()),
            (Some(es), None) => (RawSelector::from_crd(es, "any:"), false),
            (None, Some(ns)) => {
                if self.policy.kind == PolicyKind::Cnp {
                    return Err("rule cannot have NodeSelector".into());
                }
                (RawSelector::from_crd(ns, "any:"), true)
            }
        };
        subject_raw.sanitize()?;
        let mut subject = subject_raw.clone();
        if let Some(ns) = self.policy.namespace.as_ref().filter(|_| !node_subject) {
            subject.add_match(&format!("k8s:{NAMESPACE_KEY}"), ns);
        }
        let subject = subject.sanitize()?;
        let matches_init = subject_raw.has_key(&format!("{SOURCE_RESERVED}:init"));
        let dd = rule.enable_default_deny.unwrap_or_default();
        let (dd_in, dd_eg) = (dd.ingress.unwrap_or(true), dd.egress.unwrap_or(true));

        let mut sections = Vec::new();
        for r in rule.ingress.iter().flatten() {
            sections.push(Section {
                name: "ingress",
                ingress: true,
                deny: false,
                endpoints: r.from_endpoints.as_ref(),
                nodes: r.from_nodes.as_ref(),
                entities: r.from_entities.as_ref(),
                cidr: r.from_cidr.as_ref(),
                cidr_set: r.from_cidr_set.as_ref(),
                requires: r.from_requires.as_ref(),
                groups: r.from_groups.as_ref(),
                services: None,
                fqdns: 0,
                to_ports: r.to_ports.as_ref().map(|v| v.iter().map(|p| (p.ports.as_ref(), Some(p))).collect()),
                icmps: r.icmps.as_ref(),
            });
        }
        for r in rule.ingress_deny.iter().flatten() {
            sections.push(Section {
                name: "ingressDeny",
                ingress: true,
                deny: true,
                endpoints: r.from_endpoints.as_ref(),
                nodes: r.from_nodes.as_ref(),
                entities: r.from_entities.as_ref(),
                cidr: r.from_cidr.as_ref(),
                cidr_set: r.from_cidr_set.as_ref(),
                requires: r.from_requires.as_ref(),
                groups: r.from_groups.as_ref(),
                services: None,
                fqdns: 0,
                to_ports: r.to_ports.as_ref().map(|v| v.iter().map(|p| (p.ports.as_ref(), None)).collect()),
                icmps: r.icmps.as_ref(),
            });
        }
        for r in rule.egress.iter().flatten() {
            sections.push(Section {
                name: "egress",
                ingress: false,
                deny: false,
                endpoints: r.to_endpoints.as_ref(),
                nodes: r.to_nodes.as_ref(),
                entities: r.to_entities.as_ref(),
                cidr: r.to_cidr.as_ref(),
                cidr_set: r.to_cidr_set.as_ref(),
                requires: r.to_requires.as_ref(),
                groups: r.to_groups.as_ref(),
                services: r.to_services.as_ref(),
                fqdns: r.to_fqdns.as_ref().map_or(0, Vec::len),
                to_ports: r.to_ports.as_ref().map(|v| v.iter().map(|p| (p.ports.as_ref(), Some(p))).collect()),
                icmps: r.icmps.as_ref(),
            });
        }
        for r in rule.egress_deny.iter().flatten() {
            sections.push(Section {
                name: "egressDeny",
                ingress: false,
                deny: true,
                endpoints: r.to_endpoints.as_ref(),
                nodes: r.to_nodes.as_ref(),
                entities: r.to_entities.as_ref(),
                cidr: r.to_cidr.as_ref(),
                cidr_set: r.to_cidr_set.as_ref(),
                requires: r.to_requires.as_ref(),
                groups: r.to_groups.as_ref(),
                services: r.to_services.as_ref(),
                fqdns: 0,
                to_ports: r.to_ports.as_ref().map(|v| v.iter().map(|p| (p.ports.as_ref(), None)).collect()),
                icmps: r.icmps.as_ref(),
            });
        }
        let mut index = std::collections::BTreeMap::<&str, usize>::new();
        for s in sections {
            let i = index.entry(s.name).or_default();
            let origin = Origin { policy: self.policy.clone(), rule: self.rule, section: s.name, index: *i };
            *i += 1;
            let default_deny = if s.ingress { dd_in } else { dd_eg };
            let entry = self.section(&s, origin, &subject, node_subject, default_deny, matches_init)?;
            self.entries.push(entry);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn section(
        &self,
        s: &Section,
        origin: Origin,
        subject: &Selector,
        node_subject: bool,
        default_deny: bool,
        matches_init: bool,
    ) -> Result<Entry, String> {
        let (from, dir) = if s.ingress { ("From", "ingress") } else { ("To", "egress") };
        // At most one kind of peer per section, as upstream.
        let members = [
            (format!("{from}Endpoints"), s.endpoints.map_or(0, Vec::len)),
            (format!("{from}Nodes"), s.nodes.map_or(0, Vec::len)),
            (format!("{from}Entities"), s.entities.map_or(0, Vec::len)),
            (format!("{from}CIDR"), s.cidr.map_or(0, Vec::len)),
            (format!("{from}CIDRSet"), s.cidr_set.map_or(0, Vec::len)),
            (format!("{from}Groups"), json_len(s.groups)),
            ("ToServices".to_string(), json_len(s.services)),
            ("ToFQDNs".to_string(), s.fqdns),
        ];
        let named: Vec<&String> = members.iter().filter(|(_, n)| *n > 0).map(|(m, _)| m).collect();
        if named.len() > 1 {
            return Err(format!("combining {} and {} is not supported yet", named[0], named[1]));
        }
        if s.requires.is_some_and(|r| !r.is_empty()) {
            return Err(format!("{from}Requires is deprecated and must be empty (upstream Cilium refuses it)"));
        }
        if s.nodes.is_some_and(|n| !n.is_empty()) && !self.cfg.enable_node_selector_labels {
            return Err(format!(
                "FromNodes/ToNodes rules can only be applied when the \"enable-node-selector-labels\" flag is set ({dir})"
            ));
        }
        let n_ports = s.to_ports.as_ref().map_or(0, Vec::len);
        let n_icmps = s.icmps.map_or(0, Vec::len);
        if n_ports > 0 && n_icmps > 0 {
            return Err(
                "the ICMPs block may only be present without ToPorts. Define a separate rule to use ToPorts".into()
            );
        }
        let mut notes = Vec::new();

        // ---- L3
        let empty_list = [
            s.endpoints.is_some_and(Vec::is_empty),
            s.nodes.is_some_and(Vec::is_empty),
            s.entities.is_some_and(Vec::is_empty),
            s.cidr.is_some_and(Vec::is_empty),
            s.cidr_set.is_some_and(Vec::is_empty),
        ]
        .contains(&true);
        let mut peers = Vec::new();
        for es in s.endpoints.into_iter().flatten() {
            let raw = RawSelector::from_crd(es, "any:");
            raw.sanitize()?;
            peers.push(Peer::Labels(self.peer_selector(raw, matches_init)?));
        }
        for es in s.nodes.into_iter().flatten() {
            let mut raw = RawSelector::from_crd(es, "any:");
            raw.sanitize()?;
            raw.add_expr(&format!("{SOURCE_RESERVED}:remote-node"), Op::Exists);
            self.add_cluster(&mut raw);
            peers.push(Peer::Labels(raw.sanitize()?));
        }
        for e in s.entities.into_iter().flatten() {
            peers.extend(entity_selectors(*e, &self.cfg.cluster_name).into_iter().map(Peer::Labels));
        }
        for c in s.cidr.into_iter().flatten() {
            let prefix = Prefix::parse(c.as_str(), true).map_err(|e| format!("unable to parse CIDR: {e}"))?;
            peers.push(Peer::Cidr { prefix, except: Vec::new() });
        }
        for set in s.cidr_set.into_iter().flatten() {
            peers.push(cidr_rule(set)?);
        }
        if json_len(s.groups) > 0 {
            let why = format!("{origin}: {from}Groups (cloud provider groups) are not resolved: it selects no peer");
            notes.push(why.clone());
            peers.push(Peer::Nothing(why));
        }
        // Each entry selects nothing until `service::resolve` adds the
        // peers of the Services it matches.
        let services: Vec<&serde_json::Value> = match s.services {
            Some(serde_json::Value::Array(a)) => a.iter().collect(),
            Some(serde_json::Value::Null) | None => Vec::new(),
            Some(v) => vec![v],
        };
        for v in services {
            match crate::service::parse_entry(v) {
                Ok(Some(sel)) => peers.push(Peer::Service(sel)),
                Ok(None) => peers.push(Peer::Nothing(format!("{origin}: a toServices entry names no Service"))),
                Err(e) => {
                    let why = format!("{origin}: {e}: it selects no peer");
                    notes.push(why.clone());
                    peers.push(Peer::Nothing(why));
                }
            }
        }
        if s.fqdns > 0 {
            let why = format!("{origin}: toFQDNs needs a DNS proxy, which this agent does not run: it selects no peer");
            notes.push(why.clone());
            peers.push(Peer::Nothing(why));
        }
        let l3 = if empty_list { None } else { Some(peers) };

        // ---- L4
        let l4 = if n_icmps > 0 {
            let mut out = Vec::new();
            for r in s.icmps.into_iter().flatten() {
                let fields = r.fields.as_deref().unwrap_or_default();
                if fields.len() > MAX_PORTS {
                    return Err(format!("too many types, the max is {MAX_PORTS}"));
                }
                for f in fields {
                    out.push(icmp_field(f.family, &f.type_)?);
                }
            }
            Some(out)
        } else if n_ports > 0 {
            let mut out = Vec::new();
            for (ports, rule) in s.to_ports.iter().flatten() {
                let ports = ports.map(Vec::as_slice).unwrap_or_default();
                if ports.len() > MAX_PORTS {
                    return Err(format!("too many ports, the max is {MAX_PORTS}"));
                }
                let l7 = rule.map(|r| l7_of(r, s.ingress)).transpose()?.flatten();
                for p in ports {
                    let specs = port_specs(p)?;
                    if let Some(kind) = &l7 {
                        if specs.iter().any(|sp| sp.proto != PROTO_TCP) && kind != "DNS" {
                            return Err(format!(
                                "L7 rules can only apply to TCP (not {:?}) except for DNS rules",
                                p.protocol
                            ));
                        }
                        notes.push(format!(
                            "{origin}: {kind} rules on port {} are not enforced (the port is, at L4)",
                            p.port.as_deref().unwrap_or("0")
                        ));
                    }
                    out.extend(specs);
                }
            }
            Some(out)
        } else {
            None
        };
        Ok(Entry {
            origin,
            subject: subject.clone(),
            node_subject,
            ingress: s.ingress,
            deny: s.deny,
            default_deny,
            l3,
            l4,
            not_enforced: notes,
        })
    }

    fn add_cluster(&self, raw: &mut RawSelector) {
        let name = &self.cfg.cluster_name;
        if !name.is_empty()
            && !raw.has_key(&format!("k8s:{CLUSTER_KEY}"))
            && !raw.has_key(&format!("any:{CLUSTER_KEY}"))
        {
            raw.add_match(&format!("k8s:{CLUSTER_KEY}"), name);
        }
    }

    /// A peer endpoint selector with the policy's namespace and the cluster
    /// added where upstream adds them.
    fn peer_selector(&self, mut raw: RawSelector, matches_init: bool) -> Result<Selector, String> {
        if raw.has_key_prefix(&format!("{SOURCE_RESERVED}:")) {
            return raw.sanitize();
        }
        let (k8s_ns, any_ns) = (format!("k8s:{NAMESPACE_KEY}"), format!("any:{NAMESPACE_KEY}"));
        if !raw.has_key(&k8s_ns) && !raw.has_key(&any_ns) {
            match &self.policy.namespace {
                None => {
                    if !matches_init {
                        raw.add_expr(&k8s_ns, Op::Exists);
                    }
                }
                Some(ns) => {
                    if !raw.has_key_prefix(&format!("k8s:{NAMESPACE_LABELS_PREFIX}"))
                        && !raw.has_key_prefix(&format!("any:{NAMESPACE_LABELS_PREFIX}"))
                    {
                        raw.add_match(&k8s_ns, ns);
                    }
                }
            }
        }
        self.add_cluster(&mut raw);
        raw.sanitize()
    }
}

/// The label selectors of an entity (upstream's entity table).
pub fn entity_selectors(e: Entity, cluster_name: &str) -> Vec<Selector> {
    let r = |key: &str| Selector::has_label(SOURCE_RESERVED, key);
    match e {
        Entity::All => vec![Selector::wildcard()],
        Entity::World => vec![r("world"), r("world-ipv4"), r("world-ipv6"), r("aggregate-world")],
        Entity::WorldIpv4 => vec![r("world-ipv4")],
        Entity::WorldIpv6 => vec![r("world-ipv6")],
        Entity::Host => vec![r("host")],
        Entity::Init => vec![r("init")],
        Entity::Ingress => vec![r("ingress")],
        Entity::RemoteNode => vec![r("remote-node"), r("aggregate-remote-node")],
        Entity::Health => vec![r("health")],
        Entity::Unmanaged => vec![r("unmanaged")],
        Entity::None => vec![r("none")],
        Entity::KubeApiserver => vec![r("kube-apiserver")],
        Entity::Cluster | Entity::ClusterMesh => {
            let mut v = vec![
                r("host"),
                r("remote-node"),
                r("init"),
                r("ingress"),
                r("health"),
                r("unmanaged"),
                r("kube-apiserver"),
                r("aggregate-cluster"),
            ];
            if e == Entity::ClusterMesh {
                v.push(r("aggregate-cluster-mesh"));
            }
            if e == Entity::Cluster {
                let mut sel = RawSelector::default();
                sel.add_match(&format!("k8s:{CLUSTER_KEY}"), cluster_name);
                v.push(sel.sanitize().expect("a valid cluster selector"));
            } else {
                let mut sel = RawSelector::default();
                sel.add_expr(&format!("k8s:{CLUSTER_KEY}"), Op::Exists);
                v.push(sel.sanitize().expect("a valid cluster selector"));
            }
            v
        }
    }
}

fn cidr_rule(set: &CidrRule) -> Result<Peer, String> {
    let n = usize::from(set.cidr.is_some())
        + usize::from(set.cidr_group_ref.is_some())
        + usize::from(set.cidr_group_selector.is_some());
    if n == 0 {
        return Err("one of cidr, cidrGroupRef, or cidrGroupSelector is required".into());
    }
    if n > 1 {
        return Err("more than one of cidr, cidrGroupRef, or cidrGroupSelector may not be set".into());
    }
    let parse_except = |ex: &cilium_crds::policy::Cidr| {
        Prefix::parse(ex.as_str(), false).map_err(|e| format!("unable to parse except {:?}: {e}", ex.as_str()))
    };
    let Some(c) = &set.cidr else {
        // A group peer: upstream checks neither the groups nor the excepts
        // against each other.
        let except = set.except.iter().flatten().map(parse_except).collect::<Result<Vec<_>, _>>()?;
        if let Some(name) = &set.cidr_group_ref {
            return Ok(Peer::CidrGroup { selector: crate::cidr_group::ref_selector(name), encoded: false, except });
        }
        let es = set.cidr_group_selector.as_ref().expect("counted above");
        let mut raw = RawSelector::from_crd(es, "");
        // Every key is a group label, whatever it is written with.
        raw.match_labels = raw.match_labels.into_iter().map(|(k, v)| (format!("{SOURCE_CIDR_GROUP}:{k}"), v)).collect();
        for (k, _, _) in &mut raw.exprs {
            *k = format!("{SOURCE_CIDR_GROUP}:{k}");
        }
        let selector = raw.sanitize().map_err(|e| format!("failed to sanitize cidrGroupSelector: {e}"))?;
        return Ok(Peer::CidrGroup { selector, encoded: true, except });
    };
    let prefix =
        Prefix::parse(c.as_str(), false).map_err(|e| format!("unable to parse CIDRRule {:?}: {e}", c.as_str()))?;
    let mut except = Vec::new();
    for ex in set.except.iter().flatten() {
        let e = parse_except(ex)?;
        if !prefix.contains(&e) {
            return Err(format!(
                "allow CIDR prefix {} does not contain exclude CIDR prefix {}",
                c.as_str(),
                ex.as_str()
            ));
        }
        except.push(e);
    }
    Ok(Peer::Cidr { prefix, except })
}

/// Whether `s` is an IANA service name (a port name).
pub fn is_port_name(s: &str) -> bool {
    if s.is_empty() || s.len() > 15 || s.starts_with('-') || s.ends_with('-') || s.contains("--") {
        return false;
    }
    s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') && s.chars().any(|c| c.is_ascii_alphabetic())
}

/// Reads a port number the way Go's `ParseUint(s, 0, 16)` does (a leading
/// `0` means octal).
fn parse_port_number(s: &str) -> Option<u16> {
    if s.len() > 1 && s.starts_with('0') { u16::from_str_radix(&s[1..], 8).ok() } else { s.parse().ok() }
}

fn port_specs(p: &PortProtocol) -> Result<Vec<PortSpec>, String> {
    let text = p.port.as_deref().unwrap_or("");
    let protos: Vec<u8> = match p.protocol {
        None | Some(L4Proto::Any) => vec![PROTO_TCP, PROTO_UDP, PROTO_SCTP],
        Some(L4Proto::Tcp) => vec![PROTO_TCP],
        Some(L4Proto::Udp) => vec![PROTO_UDP],
        Some(L4Proto::Sctp) => vec![PROTO_SCTP],
        Some(L4Proto::Vrrp) => vec![PROTO_VRRP],
        Some(L4Proto::Igmp) => vec![PROTO_IGMP],
    };
    if text.is_empty() {
        return Err("port must be specified".into());
    }
    let sel = if is_port_name(text) {
        PortSel::Named(text.to_ascii_lowercase())
    } else {
        if text != "0" && matches!(p.protocol, Some(L4Proto::Vrrp | L4Proto::Igmp)) {
            return Err("port must be empty or 0".into());
        }
        let port = parse_port_number(text).ok_or_else(|| format!("unable to parse port: {text:?}"))?;
        let end = p.end_port.unwrap_or(0);
        if !(0..=65535).contains(&end) {
            return Err(format!("endPort {end} is out of range"));
        }
        PortSel::Number { port, end: if port != 0 && end as u16 > port { end as u16 } else { port } }
    };
    Ok(protos.into_iter().map(|proto| PortSpec { proto, port: sel.clone() }).collect())
}

/// The kind of L7 part of a port rule (`HTTP`, `DNS`, `Kafka`, `TLS`,
/// `listener`), after upstream's checks.
fn l7_of(r: &PortRule, ingress: bool) -> Result<Option<String>, String> {
    let rules = r.rules.as_ref().filter(|v| v.as_object().is_some_and(|o| !o.is_empty()));
    let mut kind = None;
    if let Some(obj) = rules.and_then(|v| v.as_object()) {
        let kinds: Vec<&String> =
            obj.keys().filter(|k| obj[*k].as_array().is_some_and(|a| !a.is_empty()) || !obj[*k].is_array()).collect();
        if kinds.len() > 1 {
            return Err("multiple L7 protocol rule types specified in single rule".into());
        }
        if let Some(k) = kinds.first() {
            if *k == "dns" {
                if ingress {
                    return Err("DNS rules are not allowed on ingress".into());
                }
                if r.ports.as_ref().is_none_or(Vec::is_empty) {
                    return Err("port 53 must be specified for DNS rules".into());
                }
            }
            kind = Some(match k.as_str() {
                "http" => "HTTP".to_string(),
                "dns" => "DNS".to_string(),
                "kafka" => "Kafka".to_string(),
                other => other.to_string(),
            });
        }
    }
    if r.listener.is_some() {
        if ingress {
            return Err("Listener is not allowed on ingress".into());
        }
        kind = kind.or(Some("listener".into()));
    }
    if r.terminating_tls.is_some()
        || r.originating_tls.is_some()
        || r.server_names.as_ref().is_some_and(|s| !s.is_empty())
    {
        if r.server_names.as_ref().is_some_and(|s| s.iter().any(String::is_empty)) {
            return Err("empty server name is not allowed".into());
        }
        kind = kind.or(Some("TLS".into()));
    }
    Ok(kind)
}

const ICMP4_NAMES: &[(&str, u8)] = &[
    ("EchoReply", 0),
    ("DestinationUnreachable", 3),
    ("Redirect", 5),
    ("Echo", 8),
    ("EchoRequest", 8),
    ("RouterAdvertisement", 9),
    ("RouterSelection", 10),
    ("TimeExceeded", 11),
    ("ParameterProblem", 12),
    ("Timestamp", 13),
    ("TimestampReply", 14),
    ("Photuris", 40),
    ("ExtendedEchoRequest", 42),
    ("ExtendedEchoReply", 43),
];

const ICMP6_NAMES: &[(&str, u8)] = &[
    ("DestinationUnreachable", 1),
    ("PacketTooBig", 2),
    ("TimeExceeded", 3),
    ("ParameterProblem", 4),
    ("EchoRequest", 128),
    ("EchoReply", 129),
    ("MulticastListenerQuery", 130),
    ("MulticastListenerReport", 131),
    ("MulticastListenerDone", 132),
    ("RouterSolicitation", 133),
    ("RouterAdvertisement", 134),
    ("NeighborSolicitation", 135),
    ("NeighborAdvertisement", 136),
    ("RedirectMessage", 137),
    ("RouterRenumbering", 138),
    ("ICMPNodeInformationQuery", 139),
    ("ICMPNodeInformationResponse", 140),
    ("InverseNeighborDiscoverySolicitation", 141),
    ("InverseNeighborDiscoveryAdvertisement", 142),
    ("HomeAgentAddressDiscoveryRequest", 144),
    ("HomeAgentAddressDiscoveryReply", 145),
    ("MobilePrefixSolicitation", 146),
    ("MobilePrefixAdvertisement", 147),
    ("DuplicateAddressRequestCodeSuffix", 157),
    ("DuplicateAddressConfirmationCodeSuffix", 158),
    ("ExtendedEchoRequest", 160),
    ("ExtendedEchoReply", 161),
];

fn icmp_field(family: Option<IcmpFamily>, t: &IcmpType) -> Result<PortSpec, String> {
    let (proto, names, fam) = match family {
        Some(IcmpFamily::Ipv6) => (PROTO_ICMPV6, ICMP6_NAMES, "IPv6"),
        _ => (PROTO_ICMP, ICMP4_NAMES, "IPv4"),
    };
    let ty = match t {
        IcmpType::Number(n) => u8::try_from(*n).map_err(|_| format!("ICMP type {n} is out of range"))?,
        IcmpType::Name(s) => match s.parse::<u8>() {
            Ok(n) => n,
            Err(_) => names
                .iter()
                .find(|(name, _)| name == s)
                .map(|(_, n)| *n)
                .ok_or_else(|| format!("ICMP type {s} not found in {fam}"))?,
        },
    };
    Ok(PortSpec { proto, port: PortSel::Number { port: u16::from(ty), end: u16::from(ty) } })
}
