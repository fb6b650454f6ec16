//! `toServices`: egress to the pods or addresses behind Kubernetes
//! Services, translated the way upstream's agent translates it.
//!
//! A `toServices` entry names Services by name (`k8sService`) or by their
//! labels (`k8sServiceSelector`), in one namespace or (namespace left
//! empty) in every namespace. Each matching Service becomes a peer:
//! - a Service with a pod selector: the pods it selects, as the endpoint
//!   selector `k8s:<selector>` plus `k8s:io.kubernetes.pod.namespace`
//!   (and the cluster, as for every endpoint selector);
//! - a Service without one (endpoints managed by hand, external backends):
//!   a `/32` or `/128` CIDR peer per address of its EndpointSlices.
//!
//! The parser turns each entry into a [`Peer::Service`], which selects
//! nothing until [`resolve`] adds the translated peers next to it: a
//! `toServices` that matches no Service selects no peer (never "any peer").

use std::collections::BTreeMap;
use std::net::IpAddr;

use cilium_crds::selector::EndpointSelector;
use serde::Deserialize;

use crate::Config;
use crate::labels::{CLUSTER_KEY, LabelSet, NAMESPACE_KEY};
use crate::parse::{Entry, Peer};
use crate::prefix::Prefix;
use crate::selector::{RawSelector, Selector};

/// A Kubernetes Service as `toServices` sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// The Service's own labels (what `k8sServiceSelector` matches).
    pub labels: BTreeMap<String, String>,
    /// `spec.selector`; empty for a Service without a selector.
    pub selector: BTreeMap<String, String>,
    /// Every address of its EndpointSlices (used when it has no selector).
    pub backends: Vec<IpAddr>,
}

/// What one `toServices` entry names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceSel {
    /// `k8sService`: by name; `namespace: None` matches every namespace.
    Name { namespace: Option<String>, name: String },
    /// `k8sServiceSelector`: by the Service's labels (sources ignored, as
    /// upstream); `namespace: None` matches every namespace.
    Labels { namespace: Option<String>, selector: Selector },
}

impl std::fmt::Display for ServiceSel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ns = |n: &Option<String>| n.clone().unwrap_or_else(|| "*".into());
        match self {
            ServiceSel::Name { namespace, name } => write!(f, "service {}/{name}", ns(namespace)),
            ServiceSel::Labels { namespace, selector } => write!(f, "services {selector} in {}", ns(namespace)),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEntry {
    k8s_service: Option<RawName>,
    k8s_service_selector: Option<RawSelectorNs>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawName {
    service_name: Option<String>,
    namespace: Option<String>,
}

#[derive(Deserialize)]
struct RawSelectorNs {
    selector: EndpointSelector,
    namespace: Option<String>,
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

/// One `toServices` entry as written. An entry with both forms is read
/// as its selector (upstream looks at `k8sServiceSelector` first); one
/// with neither names no Service.
pub fn parse_entry(v: &serde_json::Value) -> Result<Option<ServiceSel>, String> {
    let raw: RawEntry = serde_json::from_value(v.clone()).map_err(|e| format!("toServices entry {v}: {e}"))?;
    if let Some(s) = raw.k8s_service_selector {
        let mut selector = RawSelector::from_crd(&s.selector, "any:")
            .sanitize()
            .map_err(|e| format!("toServices k8sServiceSelector: {e}"))?;
        // Upstream matches Service labels by key whatever the source.
        for r in &mut selector.reqs {
            r.key.source = crate::labels::SOURCE_ANY.to_string();
        }
        return Ok(Some(ServiceSel::Labels { namespace: non_empty(s.namespace), selector }));
    }
    Ok(raw
        .k8s_service
        .and_then(|n| Some(ServiceSel::Name { namespace: non_empty(n.namespace), name: non_empty(n.service_name)? })))
}

impl ServiceSel {
    pub fn matches(&self, svc: &Service) -> bool {
        let in_ns = |ns: &Option<String>| ns.as_ref().is_none_or(|n| *n == svc.namespace);
        match self {
            ServiceSel::Name { namespace, name } => in_ns(namespace) && *name == svc.name,
            ServiceSel::Labels { namespace, selector } => {
                in_ns(namespace)
                    && selector.matches(&LabelSet::new(
                        svc.labels.iter().map(|(k, v)| crate::Label::new("k8s", k, v)).collect(),
                    ))
            }
        }
    }
}

/// The peers a Service stands for (see the module documentation).
pub fn peers_of(svc: &Service, cfg: &Config) -> Vec<Peer> {
    if svc.selector.is_empty() {
        let mut addrs = svc.backends.clone();
        addrs.sort();
        addrs.dedup();
        return addrs.into_iter().map(|ip| Peer::Cidr { prefix: Prefix::host(ip), except: Vec::new() }).collect();
    }
    let mut raw = RawSelector::default();
    for (k, v) in &svc.selector {
        raw.add_match(&format!("k8s:{k}"), v);
    }
    raw.add_match(&format!("k8s:{NAMESPACE_KEY}"), &svc.namespace);
    if !cfg.cluster_name.is_empty() {
        raw.add_match(&format!("k8s:{CLUSTER_KEY}"), &cfg.cluster_name);
    }
    match raw.sanitize() {
        Ok(s) => vec![Peer::Labels(s)],
        // A selector Kubernetes would not have stored: selects nothing.
        Err(_) => Vec::new(),
    }
}

/// Adds, next to every [`Peer::Service`] of `entries`, the peers of the
/// Services it matches. Idempotent only on fresh entries: call it once
/// per parse.
pub fn resolve(entries: &mut [Entry], services: &[Service], cfg: &Config) {
    for e in entries {
        let Some(l3) = e.l3.as_mut() else { continue };
        let sels: Vec<ServiceSel> = l3
            .iter()
            .filter_map(|p| match p {
                Peer::Service(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        for sel in sels {
            for svc in services.iter().filter(|s| sel.matches(s)) {
                for p in peers_of(svc, cfg) {
                    if !l3.contains(&p) {
                        l3.push(p);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(ns: &str, name: &str, labels: &[(&str, &str)], selector: &[(&str, &str)], backends: &[&str]) -> Service {
        let m = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Service {
            namespace: ns.into(),
            name: name.into(),
            labels: m(labels),
            selector: m(selector),
            backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn entries_parse_as_upstream_reads_them() {
        let by_name = parse_entry(&json!({"k8sService": {"serviceName": "db", "namespace": "prod"}})).unwrap();
        assert_eq!(by_name, Some(ServiceSel::Name { namespace: Some("prod".into()), name: "db".into() }));
        let any_ns = parse_entry(&json!({"k8sService": {"serviceName": "db"}})).unwrap();
        assert_eq!(any_ns, Some(ServiceSel::Name { namespace: None, name: "db".into() }));
        assert_eq!(parse_entry(&json!({})).unwrap(), None, "names nothing");
        assert_eq!(parse_entry(&json!({"k8sService": {}})).unwrap(), None, "no name: nothing");
        assert!(parse_entry(&json!({"k8sService": "db"})).is_err());
        let sel = parse_entry(&json!({"k8sServiceSelector": {"selector": {"matchLabels": {"k8s:tier": "db"}}}}))
            .unwrap()
            .unwrap();
        let db = svc("prod", "db", &[("tier", "db")], &[], &[]);
        assert!(sel.matches(&db), "the label source is ignored");
        assert!(!sel.matches(&svc("prod", "web", &[("tier", "web")], &[], &[])));
    }

    #[test]
    fn name_and_namespace_must_both_match() {
        let s = ServiceSel::Name { namespace: Some("prod".into()), name: "db".into() };
        assert!(s.matches(&svc("prod", "db", &[], &[], &[])));
        assert!(!s.matches(&svc("dev", "db", &[], &[], &[])));
        assert!(!s.matches(&svc("prod", "db2", &[], &[], &[])));
        let any = ServiceSel::Name { namespace: None, name: "db".into() };
        assert!(any.matches(&svc("dev", "db", &[], &[], &[])));
    }

    #[test]
    fn selector_services_select_their_pods_and_others_their_addresses() {
        let cfg = Config::default();
        let with = svc("prod", "db", &[], &[("app", "db")], &["10.0.0.9"]);
        let peers = peers_of(&with, &cfg);
        assert_eq!(peers.len(), 1);
        let Peer::Labels(sel) = &peers[0] else { panic!("{peers:?}") };
        let pod = |ns: &str, app: &str| {
            LabelSet::parse([
                format!("k8s:app={app}").as_str(),
                format!("k8s:{NAMESPACE_KEY}={ns}").as_str(),
                format!("k8s:{CLUSTER_KEY}=default").as_str(),
            ])
        };
        assert!(sel.matches(&pod("prod", "db")));
        assert!(!sel.matches(&pod("dev", "db")), "another namespace's pods");
        assert!(!sel.matches(&pod("prod", "web")));

        let without = svc("prod", "ext", &[], &[], &["192.0.2.7", "2001:db8::7", "192.0.2.7"]);
        let peers = peers_of(&without, &cfg);
        assert_eq!(
            peers,
            vec![
                Peer::Cidr { prefix: Prefix::parse("192.0.2.7/32", false).unwrap(), except: vec![] },
                Peer::Cidr { prefix: Prefix::parse("2001:db8::7/128", false).unwrap(), except: vec![] },
            ]
        );
        assert!(peers_of(&svc("prod", "empty", &[], &[], &[]), &cfg).is_empty());
    }
}
