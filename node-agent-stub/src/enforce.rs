//! The agent's node-local identities: those of the CIDRs policies name and,
//! with node selector labels, those of the other nodes. (How the agent
//! reads policies, Services and identities is `cilium_policy::cluster`,
//! shared with `ciliumctl`.)

use std::collections::{BTreeMap, BTreeSet};

use cilium_policy::identity::LOCAL_FLAG;
use cilium_policy::{LabelSet, Prefix};

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
        // First every label set whose address had an identity before (so
        // that a new node cannot take an id another node had), then the
        // others get the lowest free ones.
        for (labels, addrs) in want {
            if self.by_labels.contains_key(labels) {
                continue;
            }
            if let Some(id) = addrs.iter().filter_map(|a| self.hints.get(a)).find(|id| !used.contains(id)).copied() {
                self.by_labels.insert(labels.clone(), id);
                used.insert(id);
            }
        }
        for labels in want.keys() {
            if self.by_labels.contains_key(labels) {
                continue;
            }
            let id = (1..).map(|n| scope | n).find(|id| !used.contains(id)).expect("free id");
            self.by_labels.insert(labels.clone(), id);
            used.insert(id);
        }
        // Hints serve the first sync after a start only.
        self.hints.clear();
        want.iter().flat_map(|(l, addrs)| addrs.iter().map(|a| (*a, self.by_labels[l]))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        Prefix::parse(s, false).unwrap()
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
        // A restarted agent gives each address the identity it had, even
        // when a node that joined meanwhile sorts first.
        let mut cache: BTreeMap<Prefix, u32> = ips2.clone();
        cache.insert(p("10.0.0.0/8"), LOCAL_FLAG | 1);
        let mut restarted = NodeIdentities::from_ipcache(&cache);
        let joined: BTreeMap<LabelSet, Vec<Prefix>> = [
            (set("0-new"), vec![p("192.168.0.9/32")]),
            (set("c"), vec![p("192.168.0.4/32")]),
            (set("a"), vec![p("192.168.0.2/32")]),
        ]
        .into();
        let after = restarted.sync(&joined);
        assert_eq!(after[&p("192.168.0.2/32")], ips2[&p("192.168.0.2/32")]);
        assert_eq!(after[&p("192.168.0.4/32")], ips2[&p("192.168.0.4/32")]);
        assert!(!ips2.values().any(|id| *id == after[&p("192.168.0.9/32")]), "the new node took an old id");
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
