//! The agent's view of policy: which policies are in force (parsed by the
//! shared engine, `cilium-policy`), the node-local CIDR identities they
//! need, and the universe of identities selectors choose from.

use std::collections::{BTreeMap, BTreeSet};

use cilium_crds::policy::{CONDITION_VALID, CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy, PolicyStatus};
use cilium_crds::{CiliumEndpoint, CiliumIdentity};
use cilium_policy::engine::NamedPort;
use cilium_policy::identity::{LOCAL_FLAG, cidr_labels};
use cilium_policy::{Config, Entry, Label, LabelSet, PolicyRef, Prefix, Universe};
use k8s_openapi::api::networking::v1::NetworkPolicy;

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
    let mut take = |parsed: Result<cilium_policy::Parsed, (PolicyRef, String)>| match parsed {
        Ok(p) => v.entries.extend(p.entries),
        Err((r, why)) => {
            v.refused.insert(r, why);
        }
    };
    let cnp_ref = |p: &CiliumNetworkPolicy| PolicyRef {
        kind: cilium_policy::PolicyKind::Cnp,
        namespace: p.metadata.namespace.clone(),
        name: p.metadata.name.clone().unwrap_or_default(),
    };
    for p in cnps {
        take(match operator_refused(p.status.as_ref()) {
            Some(why) => Err((cnp_ref(p), format!("Valid=False: {why}"))),
            None => cilium_policy::parse::parse_cnp(p, cfg).map_err(|e| (cnp_ref(p), e.0)),
        });
    }
    for p in ccnps {
        let r = PolicyRef {
            kind: cilium_policy::PolicyKind::Ccnp,
            namespace: None,
            name: p.metadata.name.clone().unwrap_or_default(),
        };
        take(match operator_refused(p.status.as_ref()) {
            Some(why) => Err((r, format!("Valid=False: {why}"))),
            None => cilium_policy::parse::parse_ccnp(p, cfg).map_err(|e| (r, e.0)),
        });
    }
    for p in knps {
        let r = PolicyRef {
            kind: cilium_policy::PolicyKind::Knp,
            namespace: p.metadata.namespace.clone(),
            name: p.metadata.name.clone().unwrap_or_default(),
        };
        take(cilium_policy::knp::parse_knp(p, cfg).map_err(|e| (r, e.0)));
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
) -> Vec<cilium_policy::service::Service> {
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
            Some(cilium_policy::service::Service {
                labels: svc.metadata.labels.clone().unwrap_or_default(),
                selector: svc.spec.as_ref().and_then(|s| s.selector.clone()).unwrap_or_default(),
                backends: backends.remove(&(namespace.clone(), name.clone())).unwrap_or_default(),
                namespace,
                name,
            })
        })
        .collect()
}

/// Node-local identities of the CIDRs policies name, stable while a prefix
/// stays referenced and freed when none does.
#[derive(Clone, Debug, Default)]
pub struct CidrIdentities {
    pub by_prefix: BTreeMap<Prefix, u32>,
}

impl CidrIdentities {
    /// The CIDR identities an earlier agent left in the ipcache: kept, so
    /// a restart changes no identity the maps already use.
    pub fn from_ipcache(ipcache: &BTreeMap<Prefix, u32>) -> CidrIdentities {
        CidrIdentities {
            by_prefix: ipcache.iter().filter(|(_, id)| **id & LOCAL_FLAG != 0).map(|(p, id)| (*p, *id)).collect(),
        }
    }

    /// Exactly the prefixes in `want` get an identity.
    pub fn sync(&mut self, want: &BTreeSet<Prefix>) {
        self.by_prefix.retain(|p, _| want.contains(p));
        let mut used: BTreeSet<u32> = self.by_prefix.values().copied().collect();
        let mut next = 1u32;
        for p in want {
            if self.by_prefix.contains_key(p) {
                continue;
            }
            while used.contains(&(LOCAL_FLAG | next)) {
                next += 1;
            }
            self.by_prefix.insert(*p, LOCAL_FLAG | next);
            used.insert(LOCAL_FLAG | next);
        }
    }
}

/// Node-local identities of remote nodes with `enable-node-selector-labels`
/// (upstream's remote-node scope): one per distinct label set, stable
/// while the label set exists, freed when no node has it.
#[derive(Clone, Debug, Default)]
pub struct NodeIdentities {
    pub by_labels: BTreeMap<LabelSet, u32>,
    /// The identities an earlier agent gave node addresses (ipcache):
    /// reused for the same address first, so a restart renumbers nothing.
    hints: BTreeMap<Prefix, u32>,
}

impl NodeIdentities {
    pub fn from_ipcache(ipcache: &BTreeMap<Prefix, u32>) -> NodeIdentities {
        let scope = cilium_policy::identity::REMOTE_NODE_SCOPE;
        NodeIdentities {
            by_labels: BTreeMap::new(),
            hints: ipcache.iter().filter(|(_, id)| **id & 0xff00_0000 == scope).map(|(p, id)| (*p, *id)).collect(),
        }
    }

    /// Exactly the label sets in `want` (each with its nodes' addresses)
    /// get an identity; returns address -> identity.
    pub fn sync(&mut self, want: &BTreeMap<LabelSet, Vec<Prefix>>) -> BTreeMap<Prefix, u32> {
        let scope = cilium_policy::identity::REMOTE_NODE_SCOPE;
        self.by_labels.retain(|l, _| want.contains_key(l));
        let mut used: BTreeSet<u32> = self.by_labels.values().copied().collect();
        for (labels, addrs) in want {
            if self.by_labels.contains_key(labels) {
                continue;
            }
            let hinted = addrs.iter().filter_map(|a| self.hints.get(a)).find(|id| !used.contains(id)).copied();
            let id = hinted.unwrap_or_else(|| (1..).map(|n| scope | n).find(|id| !used.contains(id)).expect("free id"));
            self.by_labels.insert(labels.clone(), id);
            used.insert(id);
        }
        // Hints serve the first sync after a start only.
        self.hints.clear();
        want.iter().flat_map(|(l, addrs)| addrs.iter().map(|a| (*a, self.by_labels[l]))).collect()
    }
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
        "TCP" => Some(cilium_policy::parse::PROTO_TCP),
        "UDP" => Some(cilium_policy::parse::PROTO_UDP),
        "SCTP" => Some(cilium_policy::parse::PROTO_SCTP),
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
    cidrs: &CidrIdentities,
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
    for (p, id) in &cidrs.by_prefix {
        u.identities.insert(*id, cidr_labels(cfg, p));
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        Prefix::parse(s, false).unwrap()
    }

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

    #[test]
    fn node_identities_are_per_label_set_stable_and_survive_a_restart() {
        let set = |zone: &str| LabelSet::parse(["reserved:remote-node", &format!("node:zone={zone}")[..]]);
        let mut n = NodeIdentities::default();
        let want: BTreeMap<LabelSet, Vec<Prefix>> =
            [(set("a"), vec![p("192.168.0.2/32"), p("192.168.0.3/32")]), (set("b"), vec![p("192.168.0.4/32")])].into();
        let ips = n.sync(&want);
        assert_eq!(ips.len(), 3);
        assert_eq!(ips[&p("192.168.0.2/32")], ips[&p("192.168.0.3/32")], "same labels, same identity");
        assert_ne!(ips[&p("192.168.0.2/32")], ips[&p("192.168.0.4/32")]);
        assert!(ips.values().all(|id| id & 0xff00_0000 == cilium_policy::identity::REMOTE_NODE_SCOPE));
        // b changes its labels: a keeps its identity, the old b is freed.
        let want2: BTreeMap<LabelSet, Vec<Prefix>> =
            [(set("a"), vec![p("192.168.0.2/32")]), (set("c"), vec![p("192.168.0.4/32")])].into();
        let ips2 = n.sync(&want2);
        assert_eq!(ips2[&p("192.168.0.2/32")], ips[&p("192.168.0.2/32")]);
        assert_eq!(n.by_labels.len(), 2);
        // A restarted agent gives each address the identity it had.
        let mut cache: BTreeMap<Prefix, u32> = ips2.clone();
        cache.insert(p("10.0.0.0/8"), LOCAL_FLAG | 1);
        let mut restarted = NodeIdentities::from_ipcache(&cache);
        let swapped: BTreeMap<LabelSet, Vec<Prefix>> =
            [(set("c"), vec![p("192.168.0.4/32")]), (set("a"), vec![p("192.168.0.2/32")])].into();
        assert_eq!(restarted.sync(&swapped), ips2);
    }

    #[test]
    fn cidr_identities_are_stable_and_freed() {
        let mut c = CidrIdentities::default();
        c.sync(&[p("10.0.0.0/8"), p("10.1.0.0/16")].into());
        let a = c.by_prefix[&p("10.0.0.0/8")];
        c.sync(&[p("10.0.0.0/8"), p("192.0.2.0/24")].into());
        assert_eq!(c.by_prefix[&p("10.0.0.0/8")], a, "kept while referenced");
        assert!(!c.by_prefix.contains_key(&p("10.1.0.0/16")), "freed");
        assert_eq!(c.by_prefix.len(), 2);
        assert!(c.by_prefix.values().all(|id| id & LOCAL_FLAG != 0));
        let restored = CidrIdentities::from_ipcache(&[(p("10.0.0.0/8"), a), (p("10.0.0.5/32"), 1001)].into());
        assert_eq!(restored.by_prefix.len(), 1, "only local identities");
    }
}
