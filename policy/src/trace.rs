//! Which rules decide one flow: the entries [`crate::compile`] turns into
//! map entries, read for one (subject, direction, peer, protocol, port),
//! with the rules that matched. Same semantics as the compiled map: a
//! matching deny wins over every allow; otherwise any matching allow
//! allows; otherwise the direction's default (deny when a rule selecting
//! the subject turns default deny on, allow when none does).

use serde::Serialize;

use crate::engine::{NamedPort, Selection, Selections};
use crate::parse::{Entry, Peer, PortSel, PortSpec};
use crate::{LabelSet, PolicyRef};

/// A rule section that matched the flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Match {
    /// `CiliumNetworkPolicy default/rule1 rule 0 ingress[0]`.
    pub rule: String,
    pub policy: String,
    pub deny: bool,
    /// The peer selector (or CIDR, entity, Service) that selected the peer.
    pub peer: String,
    /// The ports that matched (`any` when the section has none).
    pub ports: String,
}

/// How one direction of one endpoint judges the flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "kebab-case")]
pub enum Decision {
    /// A deny rule matched (the allows that also matched lose).
    Denied {
        by: Vec<Match>,
        also_allowed_by: Vec<Match>,
    },
    Allowed {
        by: Vec<Match>,
    },
    /// No rule matched and default deny is on (by these policies).
    DefaultDeny {
        policies: Vec<String>,
    },
    /// No rule selecting the endpoint has a section in this direction
    /// with default deny on.
    NoPolicy,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allowed { .. } | Decision::NoPolicy)
    }
}

/// The flow as one endpoint sees it: `ingress` (from `peer` to the
/// subject) or egress (from the subject to `peer`); `port` is the
/// destination port, or the ICMP type.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub ingress: bool,
    pub peer: u32,
    pub proto: u8,
    pub port: u16,
}

/// A peer as `ciliumctl` prints it.
pub fn peer_text(p: &Peer) -> String {
    match p {
        Peer::Labels(s) => s.to_string(),
        Peer::Cidr { prefix, except } if except.is_empty() => format!("cidr {prefix}"),
        Peer::Cidr { prefix, except } => {
            let ex: Vec<String> = except.iter().map(|e| e.to_string()).collect();
            format!("cidr {prefix} except {}", ex.join(","))
        }
        Peer::CidrGroup { selector, .. } => format!("CIDR groups {selector}"),
        Peer::Service(s) => s.to_string(),
        Peer::Nothing(why) => why.clone(),
    }
}

fn proto_name(p: u8) -> String {
    match p {
        crate::parse::PROTO_TCP => "TCP".into(),
        crate::parse::PROTO_UDP => "UDP".into(),
        crate::parse::PROTO_SCTP => "SCTP".into(),
        crate::parse::PROTO_ICMP => "ICMP".into(),
        crate::parse::PROTO_ICMPV6 => "ICMPv6".into(),
        n => n.to_string(),
    }
}

fn spec_text(s: &PortSpec) -> String {
    let port = match &s.port {
        PortSel::Number { port: 0, .. } => "any".to_string(),
        PortSel::Number { port, end } if end > port => format!("{port}-{end}"),
        PortSel::Number { port, .. } => port.to_string(),
        PortSel::Named(n) => n.clone(),
    };
    format!("{port}/{}", proto_name(s.proto))
}

/// Whether a section's port spec covers the flow; named ports resolve as
/// `compile` resolves them (ingress: the subject's own, egress: the peer's).
fn spec_matches(s: &PortSpec, flow: &Flow, subject_ports: &[NamedPort], sel: &Selections) -> bool {
    if s.proto != flow.proto {
        return false;
    }
    match &s.port {
        PortSel::Number { port: 0, end } if *end == 0 || *end == u16::MAX => true,
        PortSel::Number { port, end } => (*port..=(*end).max(*port)).contains(&flow.port),
        // Ingress: the subject's first port of that name (as `compile`);
        // egress: any of the peer's.
        PortSel::Named(name) if flow.ingress => subject_ports
            .iter()
            .find(|n| &n.name == name && n.proto == flow.proto)
            .is_some_and(|n| n.port != 0 && n.port == flow.port),
        PortSel::Named(name) => sel
            .universe
            .named_ports
            .get(&flow.peer)
            .into_iter()
            .flatten()
            .any(|n| &n.name == name && n.proto == flow.proto && n.port != 0 && n.port == flow.port),
    }
}

/// The decision of one direction of the endpoint with labels `subject`
/// (and its named ports) on `flow`.
pub fn trace<'e>(
    subject: &LabelSet,
    subject_ports: &[NamedPort],
    flow: &Flow,
    entries: impl IntoIterator<Item = &'e Entry>,
    sel: &mut Selections,
) -> Decision {
    let mut enforced_by: Vec<PolicyRef> = Vec::new();
    let (mut denies, mut allows) = (Vec::new(), Vec::new());
    for e in entries {
        if e.node_subject || e.ingress != flow.ingress || !e.subject.matches(subject) {
            continue;
        }
        if e.default_deny && !enforced_by.contains(&e.origin.policy) {
            enforced_by.push(e.origin.policy.clone());
        }
        let Some(peers) = crate::engine::section_peers(e) else { continue };
        let Some(peer) = peers.iter().find(|p| match sel.select(p) {
            Selection::Any => true,
            Selection::Ids(ids) => ids.contains(&flow.peer),
        }) else {
            continue;
        };
        let ports = match &e.l4 {
            None => Some("any".to_string()),
            Some(specs) => specs.iter().find(|s| spec_matches(s, flow, subject_ports, sel)).map(spec_text),
        };
        let Some(ports) = ports else { continue };
        let m = Match {
            rule: e.origin.to_string(),
            policy: e.origin.policy.to_string(),
            deny: e.deny,
            peer: if matches!(peer, Peer::Labels(s) if s.is_wildcard()) { "any peer".into() } else { peer_text(peer) },
            ports,
        };
        if e.deny { denies.push(m) } else { allows.push(m) }
    }
    if !denies.is_empty() {
        Decision::Denied { by: denies, also_allowed_by: allows }
    } else if !allows.is_empty() {
        Decision::Allowed { by: allows }
    } else if !enforced_by.is_empty() {
        Decision::DefaultDeny { policies: enforced_by.iter().map(|p| p.to_string()).collect() }
    } else {
        Decision::NoPolicy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Universe;
    use crate::parse::PROTO_TCP;
    use crate::{Config, compile};
    use cilium_crds::policy::CiliumNetworkPolicy;
    use serde_json::json;

    const WEB: u32 = 1001;
    const DB: u32 = 1002;

    fn setup(spec: serde_json::Value) -> (Universe, Vec<Entry>) {
        let mut u = Universe::new(Config::default());
        let pod = |app: &str| {
            LabelSet::parse([
                format!("k8s:app={app}").as_str(),
                "k8s:io.kubernetes.pod.namespace=default",
                "k8s:io.cilium.k8s.policy.cluster=default",
            ])
        };
        u.identities.insert(WEB, pod("web"));
        u.identities.insert(DB, pod("db"));
        let p: CiliumNetworkPolicy =
            serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "default"}, "spec": spec})).unwrap();
        (u, crate::parse::parse_cnp(&p, &Config::default()).unwrap().entries)
    }

    #[test]
    fn names_the_rule_that_decides_and_agrees_with_the_map() {
        let (u, entries) = setup(json!({"endpointSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}], "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}],
            "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}], "toPorts": [{"ports": [{"port": "81", "endPort": 90, "protocol": "TCP"}]}]}]}));
        let mut sel = Selections::new(&u);
        let db = u.identities[&DB].clone();
        let compiled = compile(&db, &[], &entries, &mut sel);
        for port in [80, 81, 85, 91] {
            let flow = Flow { ingress: true, peer: WEB, proto: PROTO_TCP, port };
            let d = trace(&db, &[], &flow, &entries, &mut sel);
            assert_eq!(d.allowed(), compiled.ingress.allows(WEB, PROTO_TCP, port), "port {port}: {d:?}");
            match (port, &d) {
                (80, Decision::Allowed { by }) => {
                    assert_eq!(by[0].rule, "CiliumNetworkPolicy default/p rule 0 ingress[0]");
                    assert_eq!(by[0].ports, "80/TCP");
                }
                (81 | 85, Decision::Denied { by, .. }) => assert_eq!(by[0].ports, "81-90/TCP"),
                (91, Decision::DefaultDeny { policies }) => assert_eq!(policies, &["CiliumNetworkPolicy default/p"]),
                _ => panic!("port {port}: {d:?}"),
            }
        }
        // The other direction has no rule: no policy.
        let flow = Flow { ingress: false, peer: WEB, proto: PROTO_TCP, port: 80 };
        assert_eq!(trace(&db, &[], &flow, &entries, &mut sel), Decision::NoPolicy);
    }
}
