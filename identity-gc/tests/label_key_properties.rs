//! The label key string is canonical: any insertion order gives the same
//! string, and it parses back to the same labels.

use cilium_identity::{Label, Labels};
use proptest::prelude::*;

fn label() -> impl Strategy<Value = Label> {
    (prop_oneof![Just("k8s"), Just("reserved"), Just("container")], "[a-z][a-z0-9./-]{0,20}", "[a-zA-Z0-9._-]{0,12}")
        .prop_map(|(s, k, v)| Label::new(s, &k, &v))
}

proptest! {
    #[test]
    fn canonical_and_round_trips(labels in proptest::collection::vec(label(), 0..12)) {
        // One label per key, as in a real label set.
        let mut seen = std::collections::BTreeSet::new();
        let mut unique: Vec<Label> = labels.into_iter().filter(|l| seen.insert(l.key.clone())).collect();
        let a: Labels = unique.iter().cloned().collect();
        unique.reverse();
        let b: Labels = unique.iter().cloned().collect();
        prop_assert_eq!(a.key_string(), b.key_string(), "insertion order changed the key string");
        prop_assert_eq!(Labels::from_key_string(&a.key_string()), a.clone());
        let keys: Vec<&str> = a.iter().map(|l| l.key.as_str()).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        prop_assert_eq!(keys, sorted);
        prop_assert!(a.key_string().is_empty() || a.key_string().ends_with(';'));
    }
}
