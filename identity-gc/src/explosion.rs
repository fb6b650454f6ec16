//! Label explosion: which label keys multiply identities. A key whose values
//! differ across many identities (a pod-template hash, a build ID, a
//! timestamp) creates one identity per value; the seed troubleshooting guide
//! names this as the top cause of identity exhaustion.

use std::collections::{BTreeMap, BTreeSet};

/// Label keys by the number of distinct values they take across `sets`
/// (each set: `"source:key" -> value`), most first; ties by key. At most `n`.
pub fn top_label_keys<'a>(
    sets: impl IntoIterator<Item = &'a BTreeMap<String, String>>,
    n: usize,
) -> Vec<(String, usize)> {
    let mut values: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for set in sets {
        for (k, v) in set {
            values.entry(k.as_str()).or_default().insert(v.as_str());
        }
    }
    let mut out: Vec<(String, usize)> = values.into_iter().map(|(k, v)| (k.to_string(), v.len())).collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out.truncate(n);
    out
}

/// The exclusion pattern that would stop a key from creating identities,
/// for the `labels` option (e.g. `k8s:!pod-template-hash$`).
pub fn exclusion_for(source_key: &str) -> String {
    let (source, key) = source_key.split_once(':').unwrap_or(("any", source_key));
    let mut escaped = String::with_capacity(key.len());
    for c in key.chars() {
        if r"\.^$*+?()[]{}|".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    format!("{source}:!{escaped}$")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_exploding_key() {
        let sets: Vec<BTreeMap<String, String>> = (0..20)
            .map(|i| {
                [
                    ("k8s:app".to_string(), "web".to_string()),
                    ("k8s:build-id".to_string(), format!("b{i}")),
                    ("k8s:tier".to_string(), format!("t{}", i % 2)),
                ]
                .into()
            })
            .collect();
        let top = top_label_keys(&sets, 2);
        assert_eq!(top, vec![("k8s:build-id".to_string(), 20), ("k8s:tier".to_string(), 2)]);
        assert_eq!(exclusion_for("k8s:build-id"), r"k8s:!build-id$");
        assert_eq!(exclusion_for("k8s:app.kubernetes.io/version"), r"k8s:!app\.kubernetes\.io/version$");
        let f = crate::LabelFilter::new(&[&exclusion_for("k8s:build-id")]).unwrap();
        assert!(!f.is_relevant(&crate::Label::new("k8s", "build-id", "b1")));
        assert!(f.is_relevant(&crate::Label::new("k8s", "build-id-extra", "x")));
    }
}
