//! Label selectors as the engine evaluates them.
//!
//! A policy's selectors are first rewritten the way upstream's policy
//! parser does (the policy's namespace and the cluster name added to peer
//! selectors, see `parse`), on the keys as the user wrote them; then every
//! key without a source becomes `any:<key>` ([`Selector::sanitize`]).

use std::collections::BTreeMap;

use cilium_crds::selector::{EndpointSelector, SelectorOperator};

use crate::labels::{Label, LabelSet};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One requirement on the labels of an identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    pub key: Label,
    pub op: Op,
    pub values: Vec<String>,
}

impl Requirement {
    pub fn matches(&self, labels: &LabelSet) -> bool {
        let found = labels.lookup(&self.key);
        match self.op {
            Op::In => found.is_some_and(|v| self.values.iter().any(|x| x == v)),
            Op::NotIn => found.is_none_or(|v| !self.values.iter().any(|x| x == v)),
            Op::Exists => found.is_some(),
            Op::DoesNotExist => found.is_none(),
        }
    }
}

/// A selector with keys as written (before sanitizing): what the parser's
/// namespace and cluster rules look at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawSelector {
    pub match_labels: BTreeMap<String, String>,
    pub exprs: Vec<(String, Op, Vec<String>)>,
}

fn op_of(op: SelectorOperator) -> Op {
    match op {
        SelectorOperator::In => Op::In,
        SelectorOperator::NotIn => Op::NotIn,
        SelectorOperator::Exists => Op::Exists,
        SelectorOperator::DoesNotExist => Op::DoesNotExist,
    }
}

/// Kubernetes label value syntax (empty allowed).
pub fn valid_label_value(v: &str) -> bool {
    if v.is_empty() {
        return true;
    }
    let b = v.as_bytes();
    v.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

impl RawSelector {
    /// From a policy's selector; `key_prefix` is put before keys that name
    /// no source (`k8s:` for Kubernetes NetworkPolicies).
    pub fn from_crd(es: &EndpointSelector, key_prefix: &str) -> RawSelector {
        let key =
            |k: &str| if k.contains(':') || k.starts_with('$') { k.to_string() } else { format!("{key_prefix}{k}") };
        RawSelector {
            match_labels: es.match_labels.iter().flatten().map(|(k, v)| (key(k), v.clone())).collect(),
            exprs: es
                .match_expressions
                .iter()
                .flatten()
                .map(|r| (key(&r.key), op_of(r.operator), r.values.clone().unwrap_or_default()))
                .collect(),
        }
    }

    pub fn has_key(&self, key: &str) -> bool {
        self.match_labels.contains_key(key) || self.exprs.iter().any(|(k, _, _)| k == key)
    }

    pub fn has_key_prefix(&self, prefix: &str) -> bool {
        self.match_labels.keys().any(|k| k.starts_with(prefix))
            || self.exprs.iter().any(|(k, _, _)| k.starts_with(prefix))
    }

    pub fn add_match(&mut self, key: &str, value: &str) {
        self.match_labels.insert(key.to_string(), value.to_string());
    }

    pub fn add_expr(&mut self, key: &str, op: Op) {
        self.exprs.push((key.to_string(), op, Vec::new()));
    }

    /// Checks what Kubernetes' selector validation checks and turns the
    /// keys into labels (no source: `any`).
    pub fn sanitize(&self) -> Result<Selector, String> {
        let mut reqs = Vec::new();
        for (k, v) in &self.match_labels {
            if k.is_empty() {
                return Err("a selector key is empty".into());
            }
            if !valid_label_value(v) {
                return Err(format!("invalid label value {v:?} for key {k:?}"));
            }
            reqs.push(Requirement { key: Label::select(k), op: Op::In, values: vec![v.clone()] });
        }
        for (k, op, values) in &self.exprs {
            if k.is_empty() {
                return Err("a selector key is empty".into());
            }
            match op {
                Op::In | Op::NotIn if values.is_empty() => {
                    return Err(format!("operator {op:?} on key {k:?} needs at least one value"));
                }
                Op::Exists | Op::DoesNotExist if !values.is_empty() => {
                    return Err(format!("operator {op:?} on key {k:?} takes no values"));
                }
                _ => {}
            }
            if let Some(v) = values.iter().find(|v| !valid_label_value(v)) {
                return Err(format!("invalid label value {v:?} for key {k:?}"));
            }
            reqs.push(Requirement { key: Label::select(k), op: *op, values: values.clone() });
        }
        reqs.sort();
        reqs.dedup();
        Ok(Selector { reqs })
    }
}

/// A sanitized selector: every requirement must hold; none selects all.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    pub reqs: Vec<Requirement>,
}

impl Selector {
    /// Selects every identity.
    pub fn wildcard() -> Selector {
        Selector::default()
    }

    /// `source:key` present with an empty value (how upstream selects a
    /// reserved identity or an entity).
    pub fn has_label(source: &str, key: &str) -> Selector {
        Selector {
            reqs: vec![Requirement { key: Label::new(source, key, ""), op: Op::In, values: vec![String::new()] }],
        }
    }

    pub fn is_wildcard(&self) -> bool {
        self.reqs.is_empty()
    }

    pub fn matches(&self, labels: &LabelSet) -> bool {
        self.reqs.iter().all(|r| r.matches(labels))
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.reqs.is_empty() {
            return f.write_str("{}");
        }
        let parts: Vec<String> = self
            .reqs
            .iter()
            .map(|r| {
                let k = r.key.selector_key();
                match r.op {
                    Op::In if r.values.len() == 1 => format!("{k}={}", r.values[0]),
                    Op::In => format!("{k} in ({})", r.values.join(",")),
                    Op::NotIn => format!("{k} notin ({})", r.values.join(",")),
                    Op::Exists => k,
                    Op::DoesNotExist => format!("!{k}"),
                }
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::LabelSet;

    fn sel(json: serde_json::Value) -> Selector {
        let es: EndpointSelector = serde_json::from_value(json).unwrap();
        RawSelector::from_crd(&es, "").sanitize().unwrap()
    }

    #[test]
    fn kubernetes_semantics_with_sources() {
        let web = LabelSet::parse(["k8s:app=web", "k8s:tier=front", "k8s:io.kubernetes.pod.namespace=default"]);
        assert!(sel(serde_json::json!({})).matches(&web));
        assert!(sel(serde_json::json!({"matchLabels": {"app": "web"}})).matches(&web));
        assert!(sel(serde_json::json!({"matchLabels": {"k8s:app": "web"}})).matches(&web));
        assert!(!sel(serde_json::json!({"matchLabels": {"container:app": "web"}})).matches(&web));
        let exprs = |op: &str, values: &[&str]| {
            sel(serde_json::json!({"matchExpressions": [{"key": "tier", "operator": op, "values": values}]}))
        };
        assert!(exprs("In", &["front", "back"]).matches(&web));
        assert!(!exprs("NotIn", &["front"]).matches(&web));
        assert!(
            sel(serde_json::json!({"matchExpressions": [{"key": "db", "operator": "DoesNotExist"}]})).matches(&web)
        );
        assert!(!sel(serde_json::json!({"matchExpressions": [{"key": "db", "operator": "Exists"}]})).matches(&web));
    }

    #[test]
    fn invalid_requirements_are_refused() {
        let bad = |json| RawSelector::from_crd(&serde_json::from_value(json).unwrap(), "").sanitize();
        assert!(bad(serde_json::json!({"matchExpressions": [{"key": "a", "operator": "In"}]})).is_err());
        assert!(
            bad(serde_json::json!({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}))
                .is_err()
        );
        assert!(bad(serde_json::json!({"matchLabels": {"a": "-bad"}})).is_err());
    }
}
