//! Label selectors as Cilium policies use them (`endpointSelector`,
//! `nodeSelector`, `fromEndpoints`, `toEndpoints`, `cidrGroupSelector`, ...).
//!
//! The wire format is the Kubernetes `LabelSelector`: `matchLabels` plus
//! `matchExpressions`. The schema enforces the operator set and the label
//! value syntax the same way upstream's CRDs do.
//!
//! Keys in Cilium selectors may carry a label source prefix, e.g.
//! `k8s:app`, `any:app` or `reserved:host`. [`EndpointSelector::matches`]
//! compares keys literally: `k8s:app` only matches a label stored under the
//! key `k8s:app`. Resolving sources (`any:` matching every source, a bare
//! key meaning `any:`) is left to the caller, which knows how its labels are
//! keyed.

use std::collections::BTreeMap;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Syntax of a label value in `matchLabels`: at most 63 characters,
/// alphanumerics at both ends, `-`, `_` and `.` inside, or empty.
pub const LABEL_VALUE_PATTERN: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";
/// Maximum length of a label value.
pub const LABEL_VALUE_MAX_LENGTH: u32 = 63;

/// A Kubernetes-style label selector. An empty selector (neither
/// `matchLabels` nor `matchExpressions`, or both empty) selects everything.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSelector {
    /// Labels that must all be present with exactly these values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "match_labels_schema")]
    pub match_labels: Option<BTreeMap<String, String>>,
    /// Requirements that must all hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_expressions: Option<Vec<LabelSelectorRequirement>>,
}

/// One requirement of a selector: a key, an operator and (for `In` and
/// `NotIn`) a set of values.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LabelSelectorRequirement {
    /// The label key the requirement applies to.
    pub key: String,
    /// How the key relates to the values.
    pub operator: SelectorOperator,
    /// Values for `In` and `NotIn`; must be empty for `Exists` and
    /// `DoesNotExist`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
}

/// The operator of a [`LabelSelectorRequirement`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

fn match_labels_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "description": "Labels that must all be present with exactly these values.",
        "additionalProperties": {
            "type": "string",
            "maxLength": LABEL_VALUE_MAX_LENGTH,
            "pattern": LABEL_VALUE_PATTERN,
        },
    })
}

impl EndpointSelector {
    /// A selector that selects everything.
    pub fn all() -> Self {
        Self::default()
    }

    /// A selector requiring exactly these labels.
    pub fn from_labels<K: Into<String>, V: Into<String>>(labels: impl IntoIterator<Item = (K, V)>) -> Self {
        Self {
            match_labels: Some(labels.into_iter().map(|(k, v)| (k.into(), v.into())).collect()),
            match_expressions: None,
        }
    }

    /// True when the selector has no requirement at all and so selects
    /// everything.
    pub fn is_empty(&self) -> bool {
        self.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
            && self.match_expressions.as_ref().is_none_or(Vec::is_empty)
    }

    /// Whether a set of labels satisfies the selector, with Kubernetes
    /// semantics: every `matchLabels` entry and every expression must hold,
    /// and an empty selector matches everything.
    ///
    /// Keys are compared literally, source prefix included (see the module
    /// documentation).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let labels_ok = self.match_labels.iter().flatten().all(|(key, value)| labels.get(key) == Some(value));
        labels_ok && self.match_expressions.iter().flatten().all(|requirement| requirement.matches(labels))
    }
}

impl LabelSelectorRequirement {
    /// Whether a set of labels satisfies this one requirement.
    ///
    /// `In` with no values matches nothing and `NotIn` with no values
    /// matches everything; the API server's schema does not forbid such
    /// requirements, Kubernetes' own validation does.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let values = self.values.as_deref().unwrap_or_default();
        match self.operator {
            SelectorOperator::In => labels.get(&self.key).is_some_and(|v| values.contains(v)),
            SelectorOperator::NotIn => labels.get(&self.key).is_none_or(|v| !values.contains(v)),
            SelectorOperator::Exists => labels.contains_key(&self.key),
            SelectorOperator::DoesNotExist => !labels.contains_key(&self.key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn req(key: &str, operator: SelectorOperator, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator,
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    fn expr_selector(reqs: Vec<LabelSelectorRequirement>) -> EndpointSelector {
        EndpointSelector { match_labels: None, match_expressions: Some(reqs) }
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(EndpointSelector::all().matches(&labels(&[])));
        assert!(EndpointSelector::all().matches(&labels(&[("app", "x")])));
        let explicit_empty = EndpointSelector { match_labels: Some(BTreeMap::new()), match_expressions: Some(vec![]) };
        assert!(explicit_empty.is_empty());
        assert!(explicit_empty.matches(&labels(&[])));
    }

    #[test]
    fn match_labels_requires_every_pair() {
        let sel = EndpointSelector::from_labels([("app", "web"), ("tier", "front")]);
        assert!(!sel.is_empty());
        assert!(sel.matches(&labels(&[("app", "web"), ("tier", "front"), ("extra", "1")])));
        assert!(!sel.matches(&labels(&[("app", "web")])));
        assert!(!sel.matches(&labels(&[("app", "web"), ("tier", "back")])));
        assert!(!sel.matches(&labels(&[])));
    }

    #[test]
    fn match_labels_empty_value_matches_only_empty_value() {
        let sel = EndpointSelector::from_labels([("node-role.kubernetes.io/control-plane", "")]);
        assert!(sel.matches(&labels(&[("node-role.kubernetes.io/control-plane", "")])));
        assert!(!sel.matches(&labels(&[("node-role.kubernetes.io/control-plane", "true")])));
        assert!(!sel.matches(&labels(&[])));
    }

    #[test]
    fn in_operator() {
        let sel = expr_selector(vec![req("env", SelectorOperator::In, &["prod", "staging"])]);
        assert!(sel.matches(&labels(&[("env", "prod")])));
        assert!(sel.matches(&labels(&[("env", "staging")])));
        assert!(!sel.matches(&labels(&[("env", "dev")])));
        assert!(!sel.matches(&labels(&[])), "In requires the key to be present");
        let empty_in = expr_selector(vec![req("env", SelectorOperator::In, &[])]);
        assert!(!empty_in.matches(&labels(&[("env", "prod")])));
    }

    #[test]
    fn not_in_operator() {
        let sel = expr_selector(vec![req("env", SelectorOperator::NotIn, &["prod"])]);
        assert!(sel.matches(&labels(&[("env", "dev")])));
        assert!(sel.matches(&labels(&[])), "NotIn matches when the key is absent");
        assert!(!sel.matches(&labels(&[("env", "prod")])));
    }

    #[test]
    fn exists_and_does_not_exist() {
        let exists = expr_selector(vec![req("debug", SelectorOperator::Exists, &[])]);
        assert!(exists.matches(&labels(&[("debug", "")])));
        assert!(exists.matches(&labels(&[("debug", "yes")])));
        assert!(!exists.matches(&labels(&[("other", "x")])));

        let absent = expr_selector(vec![req("debug", SelectorOperator::DoesNotExist, &[])]);
        assert!(absent.matches(&labels(&[("other", "x")])));
        assert!(!absent.matches(&labels(&[("debug", "")])));
    }

    #[test]
    fn labels_and_expressions_are_anded() {
        let sel = EndpointSelector {
            match_labels: Some(labels(&[("app", "db")])),
            match_expressions: Some(vec![
                req("env", SelectorOperator::In, &["prod"]),
                req("canary", SelectorOperator::DoesNotExist, &[]),
            ]),
        };
        assert!(sel.matches(&labels(&[("app", "db"), ("env", "prod")])));
        assert!(!sel.matches(&labels(&[("app", "db"), ("env", "prod"), ("canary", "1")])));
        assert!(!sel.matches(&labels(&[("app", "web"), ("env", "prod")])));
        assert!(!sel.matches(&labels(&[("app", "db"), ("env", "dev")])));
    }

    #[test]
    fn keys_are_compared_literally_including_source_prefix() {
        let sel = EndpointSelector::from_labels([("k8s:app", "web")]);
        assert!(sel.matches(&labels(&[("k8s:app", "web")])));
        assert!(!sel.matches(&labels(&[("app", "web")])));
        assert!(!sel.matches(&labels(&[("any:app", "web")])));
    }

    #[test]
    fn wire_format_round_trips() {
        let json = serde_json::json!({
            "matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system"},
            "matchExpressions": [
                {"key": "k8s-app", "operator": "In", "values": ["kube-dns"]},
                {"key": "canary", "operator": "DoesNotExist"}
            ]
        });
        let sel: EndpointSelector = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(sel.match_expressions.as_ref().unwrap()[1].operator, SelectorOperator::DoesNotExist);
        assert_eq!(serde_json::to_value(&sel).unwrap(), json);
        assert_eq!(serde_json::to_value(EndpointSelector::all()).unwrap(), serde_json::json!({}));
    }

    #[test]
    fn unknown_operator_is_rejected() {
        let json = serde_json::json!({"matchExpressions": [{"key": "a", "operator": "Equals"}]});
        assert!(serde_json::from_value::<EndpointSelector>(json).is_err());
    }

    #[test]
    fn schema_enforces_operator_enum_and_value_syntax() {
        let schema = crate::crd::schema_of::<EndpointSelector>();
        let op = &schema["properties"]["matchExpressions"]["items"]["properties"]["operator"];
        assert_eq!(op["type"], "string");
        assert_eq!(op["enum"], serde_json::json!(["In", "NotIn", "Exists", "DoesNotExist"]));
        let required = &schema["properties"]["matchExpressions"]["items"]["required"];
        assert_eq!(required, &serde_json::json!(["key", "operator"]));
        let value = &schema["properties"]["matchLabels"]["additionalProperties"];
        assert_eq!(value["pattern"], LABEL_VALUE_PATTERN);
        assert_eq!(value["maxLength"], 63);
    }
}
