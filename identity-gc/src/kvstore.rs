//! The kvstore GC's decision for one round, apart from etcd I/O: which `id/`
//! keys to delete, given the keys read and the value keys in use.
//!
//! An `id/<n>` key (value: the label key string) is unused when no
//! `value/<labels>/<node>` key exists for its labels. It is deleted only when
//! it was already unused, at the same ModRevision, in the previous round
//! (`seen`); the delete itself re-checks both conditions in etcd.

use std::collections::{HashMap, HashSet};
use std::ops::RangeInclusive;

/// One key read from etcd, relative to the `cilium/state/identities/v1/`
/// prefix.
#[derive(Clone, Debug)]
pub struct KeyValue<'a> {
    pub key: &'a str,
    pub value: &'a str,
    pub mod_revision: i64,
}

/// An `id/` key to delete, with the labels and revision it was judged on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Doomed {
    pub id: u32,
    pub labels: String,
    pub mod_revision: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Round {
    pub doomed: Vec<Doomed>,
    /// In range and kept (used, or unused for the first round).
    pub alive: i64,
    /// Unused for the first round: remembered in `seen`.
    pub remembered: i64,
    /// Keys under `id/` that are not `id/<number>` in canonical form, and
    /// repeats.
    pub malformed: Vec<String>,
}

/// Judges one round. `ids` are the keys under `id/`, `value_keys` the keys
/// under `value/` (both relative to the identities prefix, as read). `seen`
/// carries unused IDs and their revisions from round to round: IDs no longer
/// present, in use again, or doomed now are dropped from it.
pub fn judge<'a>(
    ids: impl IntoIterator<Item = KeyValue<'a>>,
    value_keys: impl IntoIterator<Item = &'a str>,
    range: &RangeInclusive<u32>,
    seen: &mut HashMap<u32, i64>,
) -> Round {
    // `value/<labels>/<node>`: labels contain '/', the node is what follows
    // the last one.
    let in_use: HashSet<&str> =
        value_keys.into_iter().filter_map(|k| k.strip_prefix("value/")?.rsplit_once('/').map(|(l, _)| l)).collect();
    let mut out = Round::default();
    let mut present = HashSet::new();
    for kv in ids {
        // Only the canonical form: `id/017` or `id/+17` is another key
        // than `id/17`, which the delete would name instead.
        let Some(id) = kv.key.strip_prefix("id/").and_then(|s| s.parse::<u32>().ok().filter(|id| id.to_string() == s))
        else {
            out.malformed.push(kv.key.to_string());
            continue;
        };
        if !range.contains(&id) {
            continue;
        }
        // Keys read from etcd are unique; a repeat is judged once.
        if !present.insert(id) {
            out.malformed.push(kv.key.to_string());
            continue;
        }
        if in_use.contains(kv.value) {
            seen.remove(&id);
            out.alive += 1;
        } else if seen.get(&id) != Some(&kv.mod_revision) {
            seen.insert(id, kv.mod_revision);
            out.alive += 1;
            out.remembered += 1;
        } else {
            // Deleted or found changed: judged afresh next round either way.
            seen.remove(&id);
            out.doomed.push(Doomed { id, labels: kv.value.to_string(), mod_revision: kv.mod_revision });
        }
    }
    seen.retain(|id, _| present.contains(id));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv<'a>(key: &'a str, value: &'a str, rev: i64) -> KeyValue<'a> {
        KeyValue { key, value, mod_revision: rev }
    }

    #[test]
    fn unused_twice_at_the_same_revision_is_doomed() {
        let range = 256..=65535;
        let mut seen = HashMap::new();
        let ids = [kv("id/300", "k8s:app=a;", 5), kv("id/301", "k8s:app=b;", 6), kv("id/x", "k8s:app=c;", 7)];
        let values = ["value/k8s:app=b;/10.0.0.1"];
        let r = judge(ids.clone(), values, &range, &mut seen);
        assert_eq!((r.alive, r.remembered, r.doomed.len()), (2, 1, 0));
        assert_eq!(r.malformed, ["id/x"]);
        let r = judge(ids, values, &range, &mut seen);
        assert_eq!(r.doomed, [Doomed { id: 300, labels: "k8s:app=a;".into(), mod_revision: 5 }]);
        assert!(seen.is_empty());
    }

    #[test]
    fn a_new_revision_or_a_user_resets_the_mark() {
        let range = 256..=65535;
        let mut seen = HashMap::new();
        judge([kv("id/300", "k8s:app=a;", 5)], [], &range, &mut seen);
        // Re-allocated in between (new revision): remembered again, not doomed.
        let r = judge([kv("id/300", "k8s:app=a;", 9)], [], &range, &mut seen);
        assert_eq!((r.remembered, r.doomed.len()), (1, 0));
        // A user appears: kept and forgotten.
        let r = judge([kv("id/300", "k8s:app=a;", 9)], ["value/k8s:app=a;/node"], &range, &mut seen);
        assert_eq!((r.alive, r.doomed.len()), (1, 0));
        assert!(seen.is_empty());
        // Labels containing '/' are matched whole.
        judge([kv("id/301", "k8s:a/b=c;", 1)], ["value/k8s:a/b=c;/n1"], &range, &mut seen);
        assert!(seen.is_empty());
    }

    #[test]
    fn only_canonical_keys_are_judged() {
        // Found by fuzzing: `id/0300` parsed as 300, and the round doomed it
        // (deleting `id/300`) on the strength of the other key's mark.
        let range = 256..=65535;
        let mut seen = HashMap::new();
        let ids = [kv("id/300", "k8s:app=a;", 3), kv("id/0300", "k8s:app=a;", 3), kv("id/+300", "k8s:app=a;", 3)];
        let r = judge(ids.clone(), [], &range, &mut seen);
        assert_eq!((r.remembered, r.doomed.len()), (1, 0));
        assert_eq!(r.malformed, ["id/0300", "id/+300"]);
        let r = judge([kv("id/300", "k8s:app=a;", 3), kv("id/300", "k8s:app=a;", 3)], [], &range, &mut HashMap::new());
        assert_eq!((r.remembered, r.doomed.len(), r.malformed.len()), (1, 0, 1));
    }

    #[test]
    fn outside_the_range_is_not_judged() {
        let mut seen = HashMap::from([(70000, 1)]);
        let r = judge([kv("id/70000", "k8s:app=a;", 1)], [], &(256..=65535), &mut seen);
        assert_eq!(r, Round::default());
        assert!(seen.is_empty());
    }
}
