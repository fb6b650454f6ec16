//! Identity-relevant label filtering, with upstream's default patterns and
//! semantics (Cilium 1.18, "Limiting Identity-Relevant Labels"):
//!
//! - a pattern is `[source:][!]regex`; the regex is anchored at the start of
//!   the label key; `!` makes it an exclusion; no source means any source;
//! - for each label, the longest matching inclusive and exclusive patterns
//!   compete: the label is relevant when the inclusive one is longer;
//! - a label no pattern matches is relevant, unless the user configured at
//!   least one inclusive pattern (then only included labels count);
//! - `reserved:` labels are always relevant.

use regex::Regex;

use crate::labels::{Label, Labels, SOURCE_ANY, SOURCE_RESERVED};

/// Upstream's default exclusions.
pub const DEFAULT_EXCLUSIONS: &[&str] = &[
    r"!io\.kubernetes",
    r"!kubernetes\.io",
    r"!statefulset\.kubernetes\.io/pod-name",
    r"!apps\.kubernetes\.io/pod-index",
    r"!batch\.kubernetes\.io/job-completion-index",
    r"!batch\.kubernetes\.io/controller-uid",
    r"!beta\.kubernetes\.io",
    r"!k8s\.io",
    r"!pod-template-generation",
    r"!pod-template-hash",
    r"!controller-revision-hash",
    r"!annotation.*",
    r"!controller-uid",
    r"!etcd_node",
];

/// Upstream's default inclusions (they win over the broader exclusions by
/// being longer, e.g. the namespace label over `!io\.kubernetes`).
pub const DEFAULT_INCLUSIONS: &[&str] = &[
    r"reserved:.*",
    r"io\.kubernetes\.pod\.namespace",
    r"io\.cilium\.k8s\.namespace\.labels",
    r"io\.cilium\.k8s\.policy\.cluster",
    r"io\.cilium\.k8s\.policy\.serviceaccount",
    r"app\.kubernetes\.io",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("invalid label pattern {pattern:?}: {reason}")]
    BadPattern { pattern: String, reason: String },
}

#[derive(Clone, Debug)]
struct Pattern {
    source: Option<String>,
    regex: Regex,
    exclude: bool,
    /// Length of the regex text: longer patterns win.
    len: usize,
    text: String,
}

impl Pattern {
    fn parse(text: &str) -> Result<Pattern, FilterError> {
        let bad = |reason: String| FilterError::BadPattern { pattern: text.to_string(), reason };
        // A source prefix is a leading word before ':' ("k8s:", "any:").
        let (source, rest) = match text.split_once(':') {
            Some((src, rest)) if !src.is_empty() && src.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => {
                (Some(src.to_string()).filter(|s| s != SOURCE_ANY), rest)
            }
            _ => (None, text),
        };
        let (exclude, body) = match rest.strip_prefix('!') {
            Some(b) => (true, b),
            None => (false, rest),
        };
        if body.is_empty() {
            return Err(bad("empty regular expression".into()));
        }
        let regex = Regex::new(&format!("^(?:{body})")).map_err(|e| bad(e.to_string()))?;
        Ok(Pattern { source, regex, exclude, len: body.len(), text: text.to_string() })
    }

    fn matches(&self, l: &Label) -> bool {
        self.source.as_ref().is_none_or(|s| *s == l.source) && self.regex.is_match(&l.key)
    }
}

/// Decides which labels are identity-relevant.
#[derive(Clone, Debug)]
pub struct LabelFilter {
    patterns: Vec<Pattern>,
    /// The user configured inclusive patterns: unmatched labels drop out.
    include_only: bool,
}

impl Default for LabelFilter {
    fn default() -> Self {
        LabelFilter::new(&[]).expect("default patterns are valid")
    }
}

impl LabelFilter {
    /// Upstream's defaults plus the user's patterns (the `labels` option,
    /// space-separated in the ConfigMap).
    pub fn new(user: &[&str]) -> Result<LabelFilter, FilterError> {
        let defaults: Vec<&str> = DEFAULT_EXCLUSIONS.iter().chain(DEFAULT_INCLUSIONS).copied().collect();
        LabelFilter::build(&defaults, user)
    }

    /// The node-label filter (`node-labels`): only the user's patterns,
    /// no defaults; without any every node label counts (upstream's
    /// node label prefixes).
    pub fn for_nodes(user: &[&str]) -> Result<LabelFilter, FilterError> {
        LabelFilter::build(&[], user)
    }

    /// `defaults` then `user`; an inclusive user pattern makes the filter
    /// include-only.
    fn build(defaults: &[&str], user: &[&str]) -> Result<LabelFilter, FilterError> {
        let mut patterns = Vec::new();
        for p in defaults {
            patterns.push(Pattern::parse(p)?);
        }
        let mut include_only = false;
        for p in user {
            let p = Pattern::parse(p)?;
            include_only |= !p.exclude;
            patterns.push(p);
        }
        Ok(LabelFilter { patterns, include_only })
    }

    /// Whether one label is identity-relevant.
    pub fn is_relevant(&self, l: &Label) -> bool {
        if l.source == SOURCE_RESERVED {
            return true;
        }
        let (mut included, mut excluded) = (0usize, 0usize);
        for p in self.patterns.iter().filter(|p| p.matches(l)) {
            let slot = if p.exclude { &mut excluded } else { &mut included };
            *slot = (*slot).max(p.len);
        }
        included > excluded || (included == 0 && excluded == 0 && !self.include_only)
    }

    /// Splits labels into (identity-relevant, informational).
    pub fn split(&self, labels: &Labels) -> (Labels, Labels) {
        let (mut relevant, mut other) = (Labels::new(), Labels::new());
        for l in labels.iter() {
            if self.is_relevant(l) { relevant.insert(l.clone()) } else { other.insert(l.clone()) }
        }
        (relevant, other)
    }

    /// The pattern texts in force, defaults first.
    pub fn patterns(&self) -> Vec<&str> {
        self.patterns.iter().map(|p| p.text.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k8s(key: &str) -> Label {
        Label::new("k8s", key, "v")
    }

    #[test]
    fn node_filter_has_no_defaults() {
        let node = |k: &str| Label::new("node", k, "v");
        let all = LabelFilter::for_nodes(&[]).unwrap();
        assert!(all.is_relevant(&node("kubernetes.io/hostname")), "no default exclusion");
        let some = LabelFilter::for_nodes(&["zone", "!kubernetes\\.io/os"]).unwrap();
        assert!(some.is_relevant(&node("zone")));
        assert!(!some.is_relevant(&node("role")), "an inclusive pattern: only included labels");
        assert!(!some.is_relevant(&node("kubernetes.io/os")));
        let except = LabelFilter::for_nodes(&["!kubernetes\\.io"]).unwrap();
        assert!(except.is_relevant(&node("zone")) && !except.is_relevant(&node("kubernetes.io/arch")));
    }

    #[test]
    fn upstream_defaults() {
        let f = LabelFilter::default();
        for relevant in [
            "app",
            "tier",
            "io.kubernetes.pod.namespace",
            "io.cilium.k8s.policy.serviceaccount",
            "io.cilium.k8s.namespace.labels.team",
            "app.kubernetes.io/name",
        ] {
            assert!(f.is_relevant(&k8s(relevant)), "{relevant} should be relevant");
        }
        for ignored in [
            "io.kubernetes.container.name",
            "kubernetes.io/hostname",
            "statefulset.kubernetes.io/pod-name",
            "apps.kubernetes.io/pod-index",
            "batch.kubernetes.io/job-completion-index",
            "batch.kubernetes.io/controller-uid",
            "beta.kubernetes.io/arch",
            "k8s.io/foo",
            "pod-template-generation",
            "pod-template-hash",
            "controller-revision-hash",
            "annotation.foo",
            "controller-uid",
            "etcd_node",
        ] {
            assert!(!f.is_relevant(&k8s(ignored)), "{ignored} should be ignored");
        }
        assert!(f.is_relevant(&Label::new("reserved", "host", "")));
    }

    #[test]
    fn one_inclusive_pattern_switches_to_include_only() {
        // The seed guide's example: with the filter `team`, env=prod drops out.
        let f = LabelFilter::new(&["k8s:team"]).unwrap();
        assert!(f.is_relevant(&k8s("team")));
        assert!(f.is_relevant(&k8s("teams")), "patterns are prefixes");
        assert!(!f.is_relevant(&k8s("env")));
        assert!(f.is_relevant(&k8s("io.kubernetes.pod.namespace")), "default inclusions stay");
        let exact = LabelFilter::new(&["kind$"]).unwrap();
        assert!(exact.is_relevant(&k8s("kind")) && !exact.is_relevant(&k8s("kinder")));
    }

    #[test]
    fn exclusions_only_keep_everything_else() {
        let f = LabelFilter::new(&["k8s:!build-id", "!.*hash"]).unwrap();
        assert!(!f.is_relevant(&k8s("build-id")));
        assert!(!f.is_relevant(&k8s("git-hash")));
        assert!(f.is_relevant(&k8s("env")));
        // Source-specific: a container label build-id is not excluded.
        assert!(f.is_relevant(&Label::new("container", "build-id", "1")));
    }

    #[test]
    fn bad_patterns_are_refused() {
        let e = LabelFilter::new(&["k8s:(unclosed"]).unwrap_err();
        assert!(e.to_string().contains("(unclosed"), "{e}");
        assert!(LabelFilter::new(&["!"]).is_err());
    }

    #[test]
    fn split_keeps_every_label_somewhere() {
        let labels = Labels::from_k8s("default", [("app", "web"), ("pod-template-hash", "abc123")]);
        let (rel, info) = LabelFilter::default().split(&labels);
        assert_eq!(rel.key_string(), "k8s:app=web;k8s:io.kubernetes.pod.namespace=default;");
        assert_eq!(info.key_string(), "k8s:pod-template-hash=abc123;");
    }
}
