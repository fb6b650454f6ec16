//! CiliumCIDRGroups as upstream reads them: every CIDR of a group is a CIDR
//! identity carrying the group's labels, and a prefix also carries the
//! labels of every group whose CIDRs contain it (upstream merges labels
//! down from parent prefixes). `cidrGroupRef: <name>` selects identities
//! with the group's name label; `cidrGroupSelector` matches the groups'
//! labels, value by value (a prefix in two groups holds both values).

use std::collections::BTreeMap;

use cilium_crds::CiliumCidrGroup;

use crate::labels::{Label, SOURCE_CIDR_GROUP};
use crate::prefix::Prefix;
use crate::selector::{Op, Selector};

/// Key prefix of the label naming a group.
pub const NAME_KEY_PREFIX: &str = "io.cilium.policy.cidrgroupname";
/// Separator of the key+value labels selectors match values on.
pub const ENCODED_SEP: char = '+';
/// Group labels under this prefix are Cilium's own and not copied.
const CILIUM_LABEL_PREFIX: &str = "io.cilium.k8s";

/// One group: its name, labels and CIDRs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CidrGroup {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub cidrs: Vec<Prefix>,
}

impl CidrGroup {
    /// Reads a CiliumCIDRGroup; CIDRs that do not parse are skipped (as
    /// upstream) and returned with the reason, for the caller to report.
    pub fn from_crd(g: &CiliumCidrGroup) -> (CidrGroup, Vec<String>) {
        let mut bad = Vec::new();
        let mut cidrs = Vec::new();
        for c in &g.spec.external_cidrs {
            match Prefix::parse(c.as_str(), false) {
                Ok(p) => cidrs.push(p),
                Err(e) => bad.push(format!("externalCIDRs {:?}: {e}", c.as_str())),
            }
        }
        cidrs.sort();
        cidrs.dedup();
        let labels = g
            .metadata
            .labels
            .iter()
            .flatten()
            .filter(|(k, _)| !k.starts_with(CILIUM_LABEL_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        (CidrGroup { name: g.metadata.name.clone().unwrap_or_default(), labels, cidrs }, bad)
    }

    /// The labels this group gives a prefix it contains: its name label,
    /// each label as `cidrgroup:key=value` and as `cidrgroup:key+value`.
    pub fn labels(&self) -> Vec<Label> {
        let mut v = vec![name_label(&self.name)];
        for (k, val) in &self.labels {
            v.push(Label::new(SOURCE_CIDR_GROUP, k, val));
            v.push(Label::new(SOURCE_CIDR_GROUP, &format!("{k}{ENCODED_SEP}{val}"), ""));
        }
        v
    }
}

/// `cidrgroup:io.cilium.policy.cidrgroupname/<name>`.
pub fn name_label(name: &str) -> Label {
    Label::new(SOURCE_CIDR_GROUP, &format!("{NAME_KEY_PREFIX}/{name}"), "")
}

/// Every label the groups give `prefix` (from each group with a CIDR that
/// contains it).
pub fn labels_for(groups: &[CidrGroup], prefix: &Prefix) -> Vec<Label> {
    groups.iter().filter(|g| g.cidrs.iter().any(|c| c.contains(prefix))).flat_map(CidrGroup::labels).collect()
}

/// The selector of `cidrGroupRef: <name>`.
pub fn ref_selector(name: &str) -> Selector {
    let l = name_label(name);
    Selector {
        reqs: vec![crate::selector::Requirement {
            key: Label::new(&l.source, &l.key, ""),
            op: Op::Exists,
            values: Vec::new(),
        }],
    }
}

/// Whether a `cidrGroupSelector` (keys already under `cidrgroup:`) matches
/// these labels: In and NotIn look for the key+value labels, so a prefix
/// in two groups with different values of a key holds both.
pub fn selector_matches(sel: &Selector, labels: &crate::LabelSet) -> bool {
    sel.reqs.iter().all(|r| {
        let has_value =
            || r.values.iter().any(|v| labels.has(&r.key.source, &format!("{}{ENCODED_SEP}{v}", r.key.key)));
        match r.op {
            Op::In => has_value(),
            Op::NotIn => !has_value(),
            Op::Exists | Op::DoesNotExist => r.matches(labels),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, labels: &[(&str, &str)], cidrs: &[&str]) -> CidrGroup {
        CidrGroup {
            name: name.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            cidrs: cidrs.iter().map(|c| Prefix::parse(c, false).unwrap()).collect(),
        }
    }

    /// A prefix carries the labels of every group containing it (parents
    /// included), as upstream merges labels down the prefix tree.
    #[test]
    fn labels_come_from_every_containing_group() {
        let groups =
            [group("wide", &[("team", "a")], &["10.0.0.0/8"]), group("narrow", &[("team", "b")], &["10.1.0.0/16"])];
        let p = |s: &str| Prefix::parse(s, false).unwrap();
        let set = |s: &str| crate::LabelSet::new(labels_for(&groups, &p(s)));
        let inner = set("10.1.2.0/24");
        assert!(inner.has(SOURCE_CIDR_GROUP, "io.cilium.policy.cidrgroupname/wide"));
        assert!(inner.has(SOURCE_CIDR_GROUP, "io.cilium.policy.cidrgroupname/narrow"));
        let outer = set("10.2.0.0/16");
        assert!(!outer.has(SOURCE_CIDR_GROUP, "io.cilium.policy.cidrgroupname/narrow"));
        assert!(set("11.0.0.0/8").iter().next().is_none());
        // Value by value: the inner prefix is in team a and in team b.
        let sel = |op: Op, v: &str| Selector {
            reqs: vec![crate::selector::Requirement {
                key: Label::new(SOURCE_CIDR_GROUP, "team", ""),
                op,
                values: vec![v.into()],
            }],
        };
        assert!(selector_matches(&sel(Op::In, "b"), &inner));
        assert!(selector_matches(&sel(Op::In, "a"), &inner));
        assert!(!selector_matches(&sel(Op::NotIn, "a"), &inner));
        assert!(selector_matches(&sel(Op::NotIn, "b"), &outer));
    }
}
