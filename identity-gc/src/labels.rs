//! Security labels and the label key string that names an identity in the
//! kvstore (`id/<ID>` value, `value/<labels>/...` keys) and in CRD lookups.

use std::collections::BTreeMap;
use std::fmt;

/// Where a label comes from (`k8s`, `reserved`, `container`, `cidr`, ...).
pub const SOURCE_K8S: &str = "k8s";
pub const SOURCE_RESERVED: &str = "reserved";
/// Matches any source in a filter pattern.
pub const SOURCE_ANY: &str = "any";

/// One label: `source:key=value`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label {
    pub source: String,
    pub key: String,
    pub value: String,
}

impl Label {
    pub fn new(source: &str, key: &str, value: &str) -> Label {
        Label { source: source.into(), key: key.into(), value: value.into() }
    }

    /// Parses `source:key=value` (`key=value` gets source `any`; a missing
    /// value is empty).
    pub fn parse(s: &str) -> Label {
        let (source, rest) = match s.split_once(':') {
            // A ':' after '=' belongs to the value.
            Some((src, rest)) if !src.contains('=') => (src, rest),
            _ => (SOURCE_ANY, s),
        };
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        Label::new(source, key, value)
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}={}", self.source, self.key, self.value)
    }
}

/// A set of labels, at most one per key (as upstream: keyed by key, the
/// source travels with the label).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(BTreeMap<String, Label>);

impl Labels {
    pub fn new() -> Labels {
        Labels::default()
    }

    pub fn insert(&mut self, label: Label) {
        self.0.insert(label.key.clone(), label);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.0.values()
    }

    /// Kubernetes pod labels as `k8s:` labels, plus the namespace label.
    pub fn from_k8s<'a>(namespace: &str, labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> Labels {
        let mut out = Labels::new();
        for (k, v) in labels {
            out.insert(Label::new(SOURCE_K8S, k, v));
        }
        out.insert(Label::new(SOURCE_K8S, "io.kubernetes.pod.namespace", namespace));
        out
    }

    /// The label key string: every label as `source:key=value;`, in key
    /// order, concatenated (the trailing `;` is part of the format).
    pub fn key_string(&self) -> String {
        let mut out = String::new();
        for l in self.0.values() {
            out.push_str(&l.source);
            out.push(':');
            out.push_str(&l.key);
            out.push('=');
            out.push_str(&l.value);
            out.push(';');
        }
        out
    }

    /// Parses a label key string back into labels.
    pub fn from_key_string(s: &str) -> Labels {
        let mut out = Labels::new();
        for part in s.split(';').filter(|p| !p.is_empty()) {
            out.insert(Label::parse(part));
        }
        out
    }

    /// The CiliumIdentity `security-labels` map: `"source:key" -> value`.
    pub fn security_labels(&self) -> BTreeMap<String, String> {
        self.0.values().map(|l| (format!("{}:{}", l.source, l.key), l.value.clone())).collect()
    }
}

impl FromIterator<Label> for Labels {
    fn from_iter<I: IntoIterator<Item = Label>>(iter: I) -> Labels {
        let mut out = Labels::new();
        for l in iter {
            out.insert(l);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_string_matches_upstream_format() {
        let l = Labels::from_k8s("default", [("app", "foo")]);
        assert_eq!(l.key_string(), "k8s:app=foo;k8s:io.kubernetes.pod.namespace=default;");
        assert_eq!(Labels::from_key_string(&l.key_string()), l);
        let empty_value = Labels::from_iter([Label::new("k8s", "node-role.kubernetes.io/control-plane", "")]);
        assert_eq!(empty_value.key_string(), "k8s:node-role.kubernetes.io/control-plane=;");
        assert_eq!(Labels::from_key_string(&empty_value.key_string()), empty_value);
    }

    #[test]
    fn sorted_by_key_whatever_the_insertion_order() {
        let a = Labels::from_iter([Label::new("k8s", "b", "1"), Label::new("k8s", "a", "2")]);
        let b = Labels::from_iter([Label::new("k8s", "a", "2"), Label::new("k8s", "b", "1")]);
        assert_eq!(a.key_string(), b.key_string());
        assert_eq!(a.key_string(), "k8s:a=2;k8s:b=1;");
    }

    #[test]
    fn parse_and_security_labels() {
        assert_eq!(Label::parse("k8s:app=web"), Label::new("k8s", "app", "web"));
        assert_eq!(Label::parse("app=web"), Label::new("any", "app", "web"));
        assert_eq!(Label::parse("k8s:url=http://x"), Label::new("k8s", "url", "http://x"));
        let l = Labels::from_k8s("ns1", [("app", "web")]);
        let m = l.security_labels();
        assert_eq!(m.get("k8s:app").map(String::as_str), Some("web"));
        assert_eq!(m.get("k8s:io.kubernetes.pod.namespace").map(String::as_str), Some("ns1"));
    }
}
