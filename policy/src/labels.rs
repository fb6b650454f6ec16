//! Security labels as selectors see them: `source:key=value`.
//!
//! A selector key may name a source (`k8s:app`) or not (`app`, read as
//! `any:app`, which matches the key under every source). Keys of source
//! `cidr` compare by prefix containment: a selector on `cidr:10.0.0.0/8`
//! finds the label `cidr:10.1.0.0/16`. This is upstream's label model.

use std::fmt;

use crate::prefix::Prefix;

pub const SOURCE_ANY: &str = "any";
pub const SOURCE_K8S: &str = "k8s";
pub const SOURCE_RESERVED: &str = "reserved";
pub const SOURCE_CIDR: &str = "cidr";
pub const SOURCE_UNSPEC: &str = "unspec";
pub const SOURCE_CIDR_GROUP: &str = "cidrgroup";
/// Labels of a node (`enable-node-selector-labels`).
pub const SOURCE_NODE: &str = "node";

/// Label key of a pod's namespace.
pub const NAMESPACE_KEY: &str = "io.kubernetes.pod.namespace";
/// Prefix of the keys carrying the namespace's own labels.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// Label key of the cluster an endpoint belongs to.
pub const CLUSTER_KEY: &str = "io.cilium.k8s.policy.cluster";
/// Label key of a pod's service account.
pub const SERVICE_ACCOUNT_KEY: &str = "io.cilium.k8s.policy.serviceaccount";

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label {
    pub source: String,
    pub key: String,
    pub value: String,
}

fn split_source(s: &str) -> (Option<&str>, &str) {
    if let Some(rest) = s.strip_prefix('$') {
        return (Some(SOURCE_RESERVED), rest);
    }
    match s.split_once(':') {
        Some((src, rest)) => (Some(src), rest),
        None => (None, s),
    }
}

impl Label {
    pub fn new(source: &str, key: &str, value: &str) -> Label {
        Label { source: source.into(), key: key.into(), value: value.into() }
    }

    /// An identity label written `source:key=value` (`source:key` when
    /// the value is empty; no source means `unspec`).
    pub fn parse(s: &str) -> Label {
        let (src, rest) = split_source(s);
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        Label::new(src.unwrap_or(SOURCE_UNSPEC), key, value)
    }

    /// A selector key: no source means `any`.
    pub fn select(key: &str) -> Label {
        let (src, rest) = split_source(key);
        Label::new(src.unwrap_or(SOURCE_ANY), rest, "")
    }

    pub fn cidr(&self) -> Option<Prefix> {
        (self.source == SOURCE_CIDR).then(|| Prefix::from_label_key(&self.key)).flatten()
    }

    /// Whether this (identity) label is what the selector key `target`
    /// asks for.
    pub fn has_key(&self, target: &Label) -> bool {
        if target.source != SOURCE_ANY && self.source != target.source {
            return false;
        }
        if target.source == SOURCE_CIDR && self.source == SOURCE_CIDR {
            return match (target.cidr(), self.cidr()) {
                (Some(t), Some(l)) => t.contains(&l),
                _ => false,
            };
        }
        self.key == target.key
    }

    /// `source:key` as selectors write it.
    pub fn selector_key(&self) -> String {
        format!("{}:{}", self.source, self.key)
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.source, self.key)
        } else {
            write!(f, "{}:{}={}", self.source, self.key, self.value)
        }
    }
}

/// The labels of one identity, sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSet(Vec<Label>);

impl LabelSet {
    pub fn new(mut labels: Vec<Label>) -> LabelSet {
        labels.sort();
        labels.dedup();
        LabelSet(labels)
    }

    /// From `source:key=value` strings.
    pub fn parse<'a>(labels: impl IntoIterator<Item = &'a str>) -> LabelSet {
        LabelSet::new(labels.into_iter().map(Label::parse).collect())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.0.iter()
    }

    /// The value of the first label the selector key `target` finds.
    pub fn lookup(&self, target: &Label) -> Option<&str> {
        self.0.iter().find(|l| l.has_key(target)).map(|l| l.value.as_str())
    }

    pub fn has(&self, source: &str, key: &str) -> bool {
        self.0.iter().any(|l| l.source == source && l.key == key)
    }

    pub fn get(&self, source: &str, key: &str) -> Option<&str> {
        self.0.iter().find(|l| l.source == source && l.key == key).map(|l| l.value.as_str())
    }

    /// The CIDR of a CIDR identity.
    pub fn cidr(&self) -> Option<Prefix> {
        self.0.iter().find_map(Label::cidr)
    }

    /// `source:key=value` strings, sorted.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(Label::to_string).collect()
    }
}

impl FromIterator<Label> for LabelSet {
    fn from_iter<T: IntoIterator<Item = Label>>(iter: T) -> Self {
        LabelSet::new(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_sources() {
        assert_eq!(Label::parse("k8s:app=web"), Label::new("k8s", "app", "web"));
        assert_eq!(Label::parse("reserved:host"), Label::new("reserved", "host", ""));
        assert_eq!(Label::parse("$host"), Label::new("reserved", "host", ""));
        assert_eq!(Label::parse("app=web"), Label::new("unspec", "app", "web"));
        assert_eq!(Label::select("app"), Label::new("any", "app", ""));
        assert_eq!(Label::select("k8s:io.kubernetes.pod.namespace"), Label::new("k8s", NAMESPACE_KEY, ""));
    }

    #[test]
    fn any_source_and_cidr_containment() {
        let ls = LabelSet::parse(["k8s:app=web", "cidr:10.1.0.0/16", "reserved:world-ipv4"]);
        assert_eq!(ls.lookup(&Label::select("app")), Some("web"));
        assert_eq!(ls.lookup(&Label::select("k8s:app")), Some("web"));
        assert_eq!(ls.lookup(&Label::select("container:app")), None);
        assert!(ls.lookup(&Label::select("cidr:10.0.0.0/8")).is_some());
        assert!(ls.lookup(&Label::select("cidr:10.1.2.0/24")).is_none(), "narrower selector");
        assert!(ls.lookup(&Label::select("cidr:11.0.0.0/8")).is_none());
    }
}
