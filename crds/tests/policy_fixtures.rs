//! The policy fixtures under `e2e/fixtures/policies/` (also applied with
//! `kubectl apply --dry-run=server` by the e2e tests) against the Rust
//! types: every valid fixture must deserialize and serialize back without
//! losing or changing anything.

use std::path::{Path, PathBuf};

use cilium_crds::{CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy, apply_body};
use serde_json::Value;

fn fixture_dir(which: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/fixtures/policies").join(which)
}

/// `(file name, full text, parsed document)` of every YAML file in a fixture
/// directory, sorted by name.
fn load(which: &str) -> Vec<(String, String, Value)> {
    let dir = fixture_dir(which);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            let doc: Value =
                serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{name}: not a YAML document: {e}"));
            (name, text, doc)
        })
        .collect()
}

/// Deserializes `doc` as its kind and serializes it back.
fn round_trip(name: &str, doc: &Value) -> Value {
    match doc["kind"].as_str() {
        Some("CiliumNetworkPolicy") => {
            let policy: CiliumNetworkPolicy =
                serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(policy.rules().count() > 0, "{name}: no rule");
            apply_body::<CiliumNetworkPolicy>(serde_json::to_value(&policy).unwrap())
        }
        Some("CiliumClusterwideNetworkPolicy") => {
            let policy: CiliumClusterwideNetworkPolicy =
                serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(policy.rules().count() > 0, "{name}: no rule");
            apply_body::<CiliumClusterwideNetworkPolicy>(serde_json::to_value(&policy).unwrap())
        }
        other => panic!("{name}: unexpected kind {other:?}"),
    }
}

/// Paths (JSON pointers) where two documents differ, for readable failures.
fn differences(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for key in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                let child = format!("{path}/{key}");
                match (x.get(key), y.get(key)) {
                    (Some(l), Some(r)) => differences(&child, l, r, out),
                    (l, r) => out.push(format!("{child}: {l:?} != {r:?}")),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (l, r)) in x.iter().zip(y).enumerate() {
                differences(&format!("{path}/{i}"), l, r, out);
            }
        }
        _ if a != b => out.push(format!("{path}: {a} != {b}")),
        _ => {}
    }
}

fn check_placement(name: &str, doc: &Value) {
    assert_eq!(doc["apiVersion"], "cilium.io/v2", "{name}");
    match doc["kind"].as_str() {
        Some("CiliumNetworkPolicy") => assert_eq!(doc["metadata"]["namespace"], "default", "{name}"),
        Some("CiliumClusterwideNetworkPolicy") => {
            assert!(doc["metadata"].get("namespace").is_none(), "{name}: cluster-scoped with a namespace")
        }
        other => panic!("{name}: unexpected kind {other:?}"),
    }
    assert!(doc["metadata"]["name"].is_string(), "{name}: no name");
}

#[test]
fn valid_fixtures_round_trip_without_loss() {
    let fixtures = load("valid");
    assert!(fixtures.len() >= 15, "only {} valid fixtures", fixtures.len());
    let mut failures = Vec::new();
    for (name, _, doc) in &fixtures {
        check_placement(name, doc);
        let out = round_trip(name, doc);
        let mut diff = Vec::new();
        differences("", doc, &out, &mut diff);
        if !diff.is_empty() {
            failures.push(format!("{name}:\n  {}", diff.join("\n  ")));
        }
    }
    assert!(failures.is_empty(), "fixtures changed by a round trip:\n{}", failures.join("\n"));
}

#[test]
fn round_trip_check_detects_a_dropped_field() {
    let (name, _, mut doc) = load("valid").into_iter().find(|(n, _, _)| n == "sw-l3-l4-rule.yaml").unwrap();
    doc["spec"]["ingress"][0]["notARuleField"] = serde_json::json!(["x"]);
    let out = round_trip(&name, &doc);
    let mut diff = Vec::new();
    differences("", &doc, &out, &mut diff);
    assert_eq!(diff, ["/spec/ingress/0/notARuleField: Some(Array [String(\"x\")]) != None"]);
}

#[test]
fn valid_fixtures_cover_the_rule_language() {
    let all: String = load("valid").iter().map(|(_, text, _)| text.as_str()).collect();
    for feature in [
        "matchExpressions",
        "fromEndpoints",
        "toEndpoints",
        "fromRequires",
        "toRequires",
        "fromCIDR",
        "toCIDRSet",
        "except",
        "cidrGroupRef",
        "cidrGroupSelector",
        "fromEntities",
        "toEntities",
        "fromGroups",
        "toGroups",
        "fromNodes",
        "toNodes",
        "toServices",
        "toFQDNs",
        "dns:",
        "http:",
        "kafka:",
        "l7proto",
        "terminatingTLS",
        "originatingTLS",
        "serverNames",
        "listener",
        "endPort",
        "icmps",
        "authentication",
        "ingressDeny",
        "egressDeny",
        "enableDefaultDeny",
        "nodeSelector",
        "specs:",
        "labels:",
        "description",
        "CiliumClusterwideNetworkPolicy",
    ] {
        assert!(all.contains(feature), "no valid fixture uses {feature}");
    }
}

#[test]
fn invalid_fixtures_are_well_formed_and_explained() {
    let fixtures = load("invalid");
    assert!(fixtures.len() >= 8, "only {} invalid fixtures", fixtures.len());
    for (name, text, doc) in &fixtures {
        let first = text.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("# why: ") && first.len() > "# why: ".len() + 10,
            "{name}: first line must be a `# why:` comment"
        );
        check_placement(name, doc);
    }
}

#[test]
fn invalid_fixtures_with_wrong_types_or_enums_fail_to_deserialize() {
    // Those the Rust types can reject on their own; the rest (patterns,
    // formats, ranges, oneOf) only the API server's schema rejects.
    for file in [
        "bad-protocol.yaml",
        "bad-entity.yaml",
        "ccnp-bad-entity.yaml",
        "port-not-a-string.yaml",
        "bad-selector-operator.yaml",
        "selector-missing-operator.yaml",
        "bad-icmp-family.yaml",
        "entities-not-a-list.yaml",
        "bad-auth-mode.yaml",
    ] {
        let (_, _, doc) = load("invalid")
            .into_iter()
            .find(|(name, _, _)| name == file)
            .unwrap_or_else(|| panic!("fixture {file} missing"));
        let result = match doc["kind"].as_str() {
            Some("CiliumClusterwideNetworkPolicy") => {
                serde_json::from_value::<CiliumClusterwideNetworkPolicy>(doc).map(|_| ())
            }
            _ => serde_json::from_value::<CiliumNetworkPolicy>(doc).map(|_| ()),
        };
        assert!(result.is_err(), "{file} deserialized");
    }
}
