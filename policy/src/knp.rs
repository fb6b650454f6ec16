//! Kubernetes NetworkPolicy (networking.k8s.io/v1), read into the same
//! entries as Cilium's own policies, with upstream's translation:
//! every key is a `k8s:` label; the subject is `podSelector` in the
//! policy's namespace; a peer `podSelector` alone means the policy's
//! namespace, with `namespaceSelector` the namespaces whose labels match
//! (`io.cilium.k8s.namespace.labels.*`, every namespace when empty);
//! `ipBlock` is a CIDR with excepts; no `from`/`to` means every peer; ports
//! default to TCP; `policyTypes` decides which directions deny by default.

use cilium_crds::policy::L4Proto;
use cilium_crds::selector::{EndpointSelector, LabelSelectorRequirement, SelectorOperator};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::labels::{CLUSTER_KEY, NAMESPACE_KEY, NAMESPACE_LABELS_PREFIX};
use crate::parse::{Entry, Invalid, Origin, Parsed, Peer, PortSel, PortSpec};
use crate::prefix::Prefix;
use crate::selector::{RawSelector, Selector};
use crate::{Config, PolicyKind, PolicyRef};

fn to_crd(ls: &LabelSelector) -> Result<EndpointSelector, String> {
    let mut exprs = Vec::new();
    for r in ls.match_expressions.iter().flatten() {
        let operator = match r.operator.as_str() {
            "In" => SelectorOperator::In,
            "NotIn" => SelectorOperator::NotIn,
            "Exists" => SelectorOperator::Exists,
            "DoesNotExist" => SelectorOperator::DoesNotExist,
            other => return Err(format!("{other:?} is not a valid selector operator")),
        };
        exprs.push(LabelSelectorRequirement { key: r.key.clone(), operator, values: r.values.clone() });
    }
    Ok(EndpointSelector { match_labels: ls.match_labels.clone(), match_expressions: Some(exprs) })
}

/// `k8s:`-keyed selector from a label selector, plus `extra` labels.
fn k8s_selector(ls: &LabelSelector, extra: &[(&str, &str)]) -> Result<RawSelector, String> {
    let mut raw = RawSelector::from_crd(&to_crd(ls)?, "k8s:");
    for (k, v) in extra {
        raw.add_match(&format!("k8s:{k}"), v);
    }
    Ok(raw)
}

fn peer(cfg: &Config, namespace: &str, p: &NetworkPolicyPeer) -> Result<Peer, String> {
    if let Some(block) = &p.ip_block {
        let prefix = Prefix::parse(&block.cidr, false)?;
        let mut except = Vec::new();
        for e in block.except.iter().flatten() {
            except.push(Prefix::parse(e, false)?);
        }
        return Ok(Peer::Cidr { prefix, except });
    }
    let pod = p.pod_selector.clone().unwrap_or_default();
    let selects_cluster = pod.match_labels.as_ref().is_some_and(|m| m.get(CLUSTER_KEY).is_some_and(|v| !v.is_empty()))
        || pod.match_expressions.iter().flatten().any(|r| r.key == CLUSTER_KEY);
    let cluster: Vec<(&str, &str)> =
        if !cfg.cluster_name.is_empty() && !selects_cluster { vec![(CLUSTER_KEY, &cfg.cluster_name)] } else { vec![] };
    let mut raw = k8s_selector(&pod, &cluster)?;
    match &p.namespace_selector {
        Some(ns) => {
            let ns_raw = RawSelector::from_crd(&to_crd(ns)?, "");
            if ns_raw.match_labels.is_empty() && ns_raw.exprs.is_empty() {
                raw.add_expr(&format!("k8s:{NAMESPACE_KEY}"), crate::selector::Op::Exists);
            }
            for (k, v) in ns_raw.match_labels {
                raw.add_match(&format!("k8s:{NAMESPACE_LABELS_PREFIX}{k}"), &v);
            }
            for (k, op, values) in ns_raw.exprs {
                raw.exprs.push((format!("k8s:{NAMESPACE_LABELS_PREFIX}{k}"), op, values));
            }
        }
        None => raw.add_match(&format!("k8s:{NAMESPACE_KEY}"), namespace),
    }
    Ok(Peer::Labels(raw.sanitize()?))
}

fn ports(list: &[NetworkPolicyPort]) -> Result<Vec<PortSpec>, String> {
    let mut out = Vec::new();
    for p in list {
        let proto = match p.protocol.as_deref() {
            None | Some("TCP") => L4Proto::Tcp,
            Some("UDP") => L4Proto::Udp,
            Some("SCTP") => L4Proto::Sctp,
            Some(other) => return Err(format!("unsupported protocol {other:?}")),
        };
        let proto = match proto {
            L4Proto::Udp => crate::parse::PROTO_UDP,
            L4Proto::Sctp => crate::parse::PROTO_SCTP,
            _ => crate::parse::PROTO_TCP,
        };
        let port = match &p.port {
            None => PortSel::Number { port: 0, end: 0 },
            Some(IntOrString::Int(n)) => {
                let port = u16::try_from(*n).map_err(|_| format!("port {n} is out of range"))?;
                let end = p.end_port.unwrap_or(0);
                PortSel::Number {
                    port,
                    end: if port != 0 && end > i32::from(port) { end.min(65535) as u16 } else { port },
                }
            }
            Some(IntOrString::String(s)) => match s.parse::<u16>() {
                Ok(port) => PortSel::Number { port, end: port },
                Err(_) => PortSel::Named(s.to_ascii_lowercase()),
            },
        };
        out.push(PortSpec { proto, port });
    }
    Ok(out)
}

pub fn parse_knp(np: &NetworkPolicy, cfg: &Config) -> Result<Parsed, Invalid> {
    let namespace = np.metadata.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
    let policy = PolicyRef {
        kind: PolicyKind::Knp,
        namespace: Some(namespace.clone()),
        name: np.metadata.name.clone().unwrap_or_default(),
    };
    let err = |e: String| Invalid(format!("NetworkPolicy {namespace}/{}: {e}", policy.name));
    let spec = np.spec.clone().unwrap_or_default();
    let subject: Selector =
        k8s_selector(&spec.pod_selector.clone().unwrap_or_default(), &[(NAMESPACE_KEY, &namespace)])
            .and_then(|r| r.sanitize())
            .map_err(err)?;
    let types = spec.policy_types.clone().unwrap_or_default();
    let has = |t: &str| types.iter().any(|x| x == t);
    let mut entries = Vec::new();
    let mut push = |ingress: bool, index: usize, l3: Option<Vec<Peer>>, l4: Option<Vec<PortSpec>>| {
        entries.push(Entry {
            origin: Origin {
                policy: policy.clone(),
                rule: 0,
                section: if ingress { "ingress" } else { "egress" },
                index,
            },
            subject: subject.clone(),
            node_subject: false,
            ingress,
            deny: false,
            default_deny: true,
            l3,
            l4,
            not_enforced: Vec::new(),
        });
    };
    let mut n_in = 0;
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        let l4 = r.ports.as_deref().filter(|p| !p.is_empty()).map(ports).transpose().map_err(err)?;
        match r.from.as_deref().filter(|f| !f.is_empty()) {
            Some(from) => {
                for p in from {
                    push(true, i, Some(vec![peer(cfg, &namespace, p).map_err(err)?]), l4.clone());
                    n_in += 1;
                }
            }
            None => {
                push(true, i, Some(vec![Peer::Labels(Selector::wildcard())]), l4);
                n_in += 1;
            }
        }
    }
    let mut n_eg = 0;
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let l4 = r.ports.as_deref().filter(|p| !p.is_empty()).map(ports).transpose().map_err(err)?;
        match r.to.as_deref().filter(|f| !f.is_empty()) {
            Some(to) => {
                for p in to {
                    push(false, i, Some(vec![peer(cfg, &namespace, p).map_err(err)?]), l4.clone());
                    n_eg += 1;
                }
            }
            None => {
                push(false, i, Some(vec![Peer::Labels(Selector::wildcard())]), l4);
                n_eg += 1;
            }
        }
    }
    if n_in == 0 && (has("Ingress") || !has("Egress")) {
        push(true, 0, None, None);
    }
    if n_eg == 0 && has("Egress") {
        push(false, 0, None, None);
    }
    Ok(Parsed { policy, entries })
}
