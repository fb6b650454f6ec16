//! etcd keys and values -> identity GC decisions and labels: any keys and
//! values under the identities prefix, over two rounds; no panic, an ID in
//! use is never doomed, and one is doomed only if it was unused at the same
//! revision in the round before.
#![no_main]

use std::collections::{HashMap, HashSet};

use arbitrary::Arbitrary;
use cilium_identity::Labels;
use cilium_identity::kvstore::{KeyValue, judge};
use libfuzzer_sys::fuzz_target;

/// Mostly well-formed keys (so that decisions are reached), some raw.
#[derive(Arbitrary, Debug)]
enum Key {
    Id(u32),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Value {
    Labels(u8),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
struct Round {
    ids: Vec<(Key, Value, u8)>,
    values: Vec<(Value, u8)>,
}

fn labels(v: &Value) -> String {
    match v {
        Value::Labels(n) => format!("k8s:app=a{};k8s:io.kubernetes.pod.namespace=n/{};", n % 4, n % 3),
        Value::Raw(s) => s.clone(),
    }
}

fn keys(r: &Round) -> (Vec<(String, String, i64)>, Vec<String>) {
    let ids = r
        .ids
        .iter()
        .map(|(k, v, rev)| {
            let key = match k {
                Key::Id(n) => format!("id/{}", n % 70_000),
                Key::Raw(s) => s.clone(),
            };
            (key, labels(v), i64::from(rev % 4))
        })
        .collect();
    let values = r.values.iter().map(|(v, node)| format!("value/{}/10.0.0.{node}", labels(v))).collect();
    (ids, values)
}

fuzz_target!(|rounds: (Round, Round)| {
    let range = 256..=65535;
    let mut seen = HashMap::new();
    let (ids, values) = keys(&rounds.0);
    judge(
        ids.iter().map(|(k, v, r)| KeyValue { key: k, value: v, mod_revision: *r }),
        values.iter().map(String::as_str),
        &range,
        &mut seen,
    );
    let before = seen.clone();
    let (ids, values) = keys(&rounds.1);
    let r = judge(
        ids.iter().map(|(k, v, rev)| KeyValue { key: k, value: v, mod_revision: *rev }),
        values.iter().map(String::as_str),
        &range,
        &mut seen,
    );
    let used: HashSet<&str> =
        values.iter().filter_map(|k| k.strip_prefix("value/")?.rsplit_once('/').map(|(l, _)| l)).collect();
    for d in &r.doomed {
        assert!(range.contains(&d.id));
        assert!(!used.contains(d.labels.as_str()), "{} doomed while its labels are in use", d.id);
        assert_eq!(before.get(&d.id), Some(&d.mod_revision), "{} doomed without a mark at that revision", d.id);
        assert!(!seen.contains_key(&d.id));
    }
    for (_, v, _) in &ids {
        // Any value decodes; the canonical form decodes to itself.
        let l = Labels::from_key_string(v);
        assert_eq!(Labels::from_key_string(&l.key_string()).key_string(), l.key_string());
    }
});
