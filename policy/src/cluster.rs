//! The cluster as the engine reads it, from the API objects: the policies
//! in force (and those refused, with why), the Services `toServices` names,
//! and the universe of identities selectors choose from. Used by the agent
//! (enforcement) and `ciliumctl` (policy trace), so both read the cluster
//! the same way.

use std::collections::BTreeMap;

use cilium_crds::policy::{CONDITION_VALID, CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy, PolicyStatus};
use cilium_crds::{CiliumEndpoint, CiliumIdentity};
use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::engine::NamedPort;
use crate::identity::cidr_labels;
use crate::{Config, Entry, Label, LabelSet, PolicyRef, Prefix, Universe};

/// The policies in force and those refused.
#[derive(Default)]
pub struct PolicyView {
    pub entries: Vec<Entry>,
    /// Policies not enforced, with the reason (invalid, or marked
    /// `Valid=False` by the operator).
    pub refused: BTreeMap<PolicyRef, String>,
}

/// The operator's `Valid=False` message, if it marked the policy invalid.
fn operator_refused(status: Option<&PolicyStatus>) -> Option<String> {
    let c = status?.conditions.as_ref()?.iter().find(|c| c.type_ == CONDITION_VALID)?;
    (c.status == "False").then(|| c.message.clone().unwrap_or_else(|| "marked invalid by the operator".into()))
}

pub fn gather(
    cnps: &[std::sync::Arc<CiliumNetworkPolicy>],
    ccnps: &[std::sync::Arc<CiliumClusterwideNetworkPolicy>],
    knps: &[std::sync::Arc<NetworkPolicy>],
    cfg: &Config,
) -> PolicyView {
    let mut v = PolicyView::default();
    let mut take = |parsed: Result<crate::Parsed, (PolicyRef, String)>| match parsed {
        Ok(p) => v.entries.extend(p.entries),
        Err((r, why)) => {
            v.refused.insert(r, why);
        }
    };
    let cnp_ref = |p: &CiliumNetworkPolicy| PolicyRef {
        kind: crate::PolicyKind::Cnp,
        namespace: p.metadata.namespace.clone(),
        name: p.metadata.name.clone().unwrap_or_default(),
    };
    for p in cnps {
        take(match operator_refused(p.status.as_ref()) {
            Some(why) => Err((cnp_ref(p), format!("Valid=False: {why}"))),
            None => crate::parse::parse_cnp(p, cfg).map_err(|e| (cnp_ref(p), e.0)),
        });
    }
    for p in ccnps {
        let r = PolicyRef {
            kind: crate::PolicyKind::Ccnp,
            namespace: None,
            name: p.metadata.name.clone().unwrap_or_default(),
        };
        take(match operator_refused(p.status.as_ref()) {
            Some(why) => Err((r, format!("Valid=False: {why}"))),
            None => crate::parse::parse_ccnp(p, cfg).map_err(|e| (r, e.0)),
        });
    }
    for p in knps {
        let r = PolicyRef {
            kind: crate::PolicyKind::Knp,
            namespace: p.metadata.namespace.clone(),
            name: p.metadata.name.clone().unwrap_or_default(),
        };
        take(crate::knp::parse_knp(p, cfg).map_err(|e| (r, e.0)));
    }
    v
}

/// Services as `toServices` reads them: each with its labels, its pod
/// selector and every address of the EndpointSlices labelled with its
/// name (`kubernetes.io/service-name`), whatever their conditions, as
/// upstream's service table has them.
pub fn services(
    svcs: &[std::sync::Arc<k8s_openapi::api::core::v1::Service>],
    slices: &[std::sync::Arc<k8s_openapi::api::discovery::v1::EndpointSlice>],
) -> Vec<crate::service::Service> {
    let mut backends: BTreeMap<(String, String), Vec<std::net::IpAddr>> = BTreeMap::new();
    for s in slices {
        if !matches!(s.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let (Some(ns), Some(name)) = (
            s.metadata.namespace.clone(),
            s.metadata.labels.as_ref().and_then(|l| l.get("kubernetes.io/service-name")).cloned(),
        ) else {
            continue;
        };
        let list = backends.entry((ns, name)).or_default();
        list.extend(
            s.endpoints.iter().flat_map(|e| e.addresses.iter()).filter_map(|a| a.parse::<std::net::IpAddr>().ok()),
        );
    }
    svcs.iter()
        .filter_map(|svc| {
            let namespace = svc.metadata.namespace.clone()?;
            let name = svc.metadata.name.clone()?;
            Some(crate::service::Service {
                labels: svc.metadata.labels.clone().unwrap_or_default(),
                selector: svc.spec.as_ref().and_then(|s| s.selector.clone()).unwrap_or_default(),
                backends: backends.remove(&(namespace.clone(), name.clone())).unwrap_or_default(),
                namespace,
                name,
            })
        })
        .collect()
}

/// A label written `source:key=value` in a CiliumEndpoint, or the
/// `source:key` -> value of a CiliumIdentity.
fn identity_label(key: &str, value: &str) -> Label {
    let mut l = Label::parse(key);
    l.value = value.to_string();
    l
}

fn proto_number(p: Option<&str>) -> Option<u8> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(crate::parse::PROTO_TCP),
        "UDP" => Some(crate::parse::PROTO_UDP),
        "SCTP" => Some(crate::parse::PROTO_SCTP),
        _ => None,
    }
}

/// A container port as a named port (unnamed ports are left out).
pub fn named_port(name: Option<&str>, port: i64, protocol: Option<&str>) -> Option<NamedPort> {
    let name = name.filter(|n| !n.is_empty())?.to_ascii_lowercase();
    Some(NamedPort { name, proto: proto_number(protocol)?, port: u16::try_from(port).ok()? })
}

/// Every identity of the cluster (CiliumIdentities and what endpoints
/// carry), the reserved ones, and the node's CIDR identities; named ports
/// from the endpoints.
pub fn universe(
    cfg: &Config,
    ids: &[std::sync::Arc<CiliumIdentity>],
    ceps: &[std::sync::Arc<CiliumEndpoint>],
    cidrs: &BTreeMap<Prefix, u32>,
) -> Universe {
    let mut u = Universe::new(cfg.clone());
    for i in ids {
        if let Some(id) = i.metadata.name.as_deref().and_then(|n| n.parse().ok()) {
            u.identities.insert(id, i.security_labels.iter().map(|(k, v)| identity_label(k, v)).collect());
        }
    }
    for e in ceps {
        let Some(status) = e.status.as_ref() else { continue };
        let Some(ident) = status.identity.as_ref() else { continue };
        let (Some(id), Some(labels)) = (ident.id, ident.labels.as_ref()) else { continue };
        let id = id as u32;
        u.identities.entry(id).or_insert_with(|| LabelSet::parse(labels.iter().map(String::as_str)));
        for p in status.named_ports.iter().flatten() {
            if let Some(np) = named_port(p.name.as_deref(), p.port.unwrap_or(0), p.protocol.as_deref()) {
                let list = u.named_ports.entry(id).or_default();
                if !list.contains(&np) {
                    list.push(np);
                }
            }
        }
    }
    for (p, id) in cidrs {
        u.identities.insert(*id, cidr_labels(cfg, p));
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_policies_are_not_enforced() {
        let cnp = |name: &str, status: serde_json::Value, spec: serde_json::Value| {
            std::sync::Arc::new(
                serde_json::from_value::<CiliumNetworkPolicy>(serde_json::json!({
                    "metadata": {"name": name, "namespace": "default"}, "spec": spec, "status": status
                }))
                .unwrap(),
            )
        };
        let good = serde_json::json!({"endpointSelector": {}, "ingress": [{"fromEntities": ["world"]}]});
        let marked = cnp(
            "marked",
            serde_json::json!({"conditions": [{"type": "Valid", "status": "False", "message": "operator says no"}]}),
            good.clone(),
        );
        let broken = cnp("broken", serde_json::json!({}), serde_json::json!({"endpointSelector": {}, "ingress": []}));
        let fine = cnp("fine", serde_json::json!({"conditions": [{"type": "Valid", "status": "True"}]}), good);
        let v = gather(&[marked, broken, fine], &[], &[], &Config::default());
        let names: Vec<&str> = v.refused.keys().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["broken", "marked"]);
        assert!(v.refused.values().any(|w| w.contains("operator says no")));
        assert!(v.refused.values().any(|w| w.contains("at least one of")));
        assert!(v.entries.iter().all(|e| e.origin.policy.name == "fine"));
        assert_eq!(v.entries.len(), 1);
    }

    #[test]
    fn services_take_their_slices_addresses() {
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "ext", "namespace": "prod", "labels": {"tier": "data"}},
            "spec": {"ports": [{"port": 5432}]}
        }))
        .unwrap();
        let slice = |name: &str, ns: &str, svc: &str, kind: &str, addrs: &[&str]| {
            std::sync::Arc::new(
                serde_json::from_value::<k8s_openapi::api::discovery::v1::EndpointSlice>(serde_json::json!({
                    "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
                    "addressType": kind,
                    "endpoints": [{"addresses": addrs, "conditions": {"ready": false}}]
                }))
                .unwrap(),
            )
        };
        let slices = [
            slice("ext-1", "prod", "ext", "IPv4", &["192.0.2.7"]),
            slice("ext-2", "prod", "ext", "IPv6", &["2001:db8::7"]),
            slice("ext-3", "prod", "ext", "FQDN", &["db.example.com"]),
            slice("ext-4", "dev", "ext", "IPv4", &["192.0.2.99"]),
        ];
        let got = services(&[std::sync::Arc::new(svc)], &slices);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].labels["tier"], "data");
        assert!(got[0].selector.is_empty());
        let addrs: Vec<String> = got[0].backends.iter().map(|a| a.to_string()).collect();
        assert_eq!(addrs, ["192.0.2.7", "2001:db8::7"], "same namespace, IP slices only, not-ready included");
    }
}
