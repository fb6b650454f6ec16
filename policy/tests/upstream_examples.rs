//! Every example policy of upstream's documentation (the `examples/`
//! directory of the Go module github.com/cilium/cilium at the pinned
//! release, which scripts/setup.sh fetches into the cache for the oracle)
//! judged by our engine and by upstream's (`policy-oracle`).
//!
//! For each policy: pods are made from the label sets its selectors name
//! (in its namespace, plus unrelated pods here and in another namespace),
//! CIDR identities from its CIDRs; every pod is asked, in both directions,
//! about every pod, reserved identity and CIDR identity, on the ports the
//! policy names and a few others, for TCP, UDP, SCTP and ICMP echo. Ours
//! must equal upstream's, verdict for verdict, and so must validity.
//!
//! Known, intended differences are skipped and counted: `toServices`
//! (upstream, without the service watcher that rewrites it, reads the rule
//! as "any peer on these ports"; we select no peer: fail closed) and
//! `toGroups`/`fromGroups` (cloud provider groups).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cilium_crds::policy::{CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy};
use cilium_policy::engine::{Selections, Universe};
use cilium_policy::identity::{LOCAL_FLAG, cidr_labels};
use cilium_policy::{Config, Entry, LabelSet};
use serde_json::{Value, json};

const CILIUM_VERSION: &str = "v1.20.2";

fn examples_dir() -> PathBuf {
    let cache = std::env::var("CILIUM_RS_CACHE").unwrap_or_else(|_| "/var/cache/cilium-rs".into());
    PathBuf::from(cache).join(format!("go/mod/github.com/cilium/cilium@{CILIUM_VERSION}/examples"))
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", dir.display())).flatten()
    {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "json") {
            out.push(p);
        }
    }
}

/// The policy objects of a file (YAML, possibly several documents; JSON).
fn policies(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let docs: Vec<Value> = if path.extension().is_some_and(|x| x == "json") {
        serde_json::from_str::<Value>(&text).map(|v| vec![v]).unwrap_or_default()
    } else {
        serde_saphyr::from_multiple::<Value>(&text).unwrap_or_default()
    };
    let mut out = Vec::new();
    for d in docs {
        let items = if d["kind"] == "List" { d["items"].as_array().cloned().unwrap_or_default() } else { vec![d] };
        for i in items {
            let kind = i["kind"].as_str().unwrap_or_default();
            if ["CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy"].contains(&kind) {
                out.push(i);
            }
        }
    }
    out
}

fn parse(p: &Value, cfg: &Config) -> Result<Vec<Entry>, String> {
    let r = match p["kind"].as_str() {
        Some("NetworkPolicy") => {
            let np: k8s_openapi::api::networking::v1::NetworkPolicy =
                serde_json::from_value(p.clone()).map_err(|e| format!("decode: {e}"))?;
            cilium_policy::knp::parse_knp(&np, cfg)
        }
        Some("CiliumNetworkPolicy") => {
            let cnp: CiliumNetworkPolicy = serde_json::from_value(p.clone()).map_err(|e| format!("decode: {e}"))?;
            cilium_policy::parse::parse_cnp(&cnp, cfg)
        }
        _ => {
            let ccnp: CiliumClusterwideNetworkPolicy =
                serde_json::from_value(p.clone()).map_err(|e| format!("decode: {e}"))?;
            cilium_policy::parse::parse_ccnp(&ccnp, cfg)
        }
    };
    r.map(|p| p.entries).map_err(|e| e.0)
}

/// Every `matchLabels` map in the policy, and every port number it names.
fn walk(v: &Value, labels: &mut BTreeSet<BTreeMap<String, String>>, ports: &mut BTreeSet<u16>) {
    match v {
        Value::Object(o) => {
            if let Some(Value::Object(m)) = o.get("matchLabels") {
                labels.insert(m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect());
            }
            for key in ["port", "endPort"] {
                match o.get(key) {
                    Some(Value::String(s)) => ports.extend(s.parse::<u16>().ok()),
                    Some(Value::Number(n)) => ports.extend(n.as_u64().and_then(|n| u16::try_from(n).ok())),
                    _ => {}
                }
            }
            for x in o.values() {
                walk(x, labels, ports);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| walk(x, labels, ports)),
        _ => {}
    }
}

/// A pod's identity labels from a selector's labels in namespace `ns`.
fn pod(ns: &str, m: &BTreeMap<String, String>) -> Option<Vec<String>> {
    let mut ns = ns.to_string();
    let mut out = Vec::new();
    for (k, v) in m {
        let key = k.strip_prefix("k8s:").or_else(|| k.strip_prefix("any:")).unwrap_or(k);
        if key.contains(':') {
            return None; // reserved:, cidr: ... are not pods
        }
        if key == "io.kubernetes.pod.namespace" {
            ns = v.clone();
            continue;
        }
        out.push(format!("k8s:{key}={v}"));
    }
    out.push(format!("k8s:io.kubernetes.pod.namespace={ns}"));
    if !m.keys().any(|k| k.ends_with("io.cilium.k8s.policy.cluster")) {
        out.push("k8s:io.cilium.k8s.policy.cluster=default".into());
    }
    Some(out)
}

#[test]
fn upstream_documentation_examples_get_upstreams_verdicts() {
    let dir = examples_dir();
    let mut paths = Vec::new();
    files(&dir, &mut paths);
    paths.sort();
    let oracle = concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools/bin/policy-oracle");
    let cfg = Config::default();
    let (mut n_policies, mut n_verdicts, mut n_invalid, mut skipped) = (0usize, 0usize, 0usize, Vec::new());
    let mut requests = Vec::new();
    let mut ours = Vec::new();
    for path in &paths {
        for (i, mut p) in policies(path).into_iter().enumerate() {
            // `kubectl apply` puts a namespaced object without a namespace
            // into the current one.
            if p["kind"] != "CiliumClusterwideNetworkPolicy" && p["metadata"]["namespace"].is_null() {
                p["metadata"]["namespace"] = json!("default");
            }
            let name = format!("{}#{i}", path.strip_prefix(&dir).unwrap().display());
            let text = p.to_string();
            if text.contains("\"toServices\"") || text.contains("\"toGroups\"") || text.contains("\"fromGroups\"") {
                skipped.push(name);
                continue;
            }
            let ns = p["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
            let mut selectors = BTreeSet::new();
            let mut ports: BTreeSet<u16> = [1, 53, 80].into();
            walk(&p, &mut selectors, &mut ports);
            let mut pods: Vec<Vec<String>> = selectors.iter().filter_map(|m| pod(&ns, m)).collect();
            pods.push(pod(&ns, &[("app".to_string(), "unrelated".to_string())].into()).unwrap());
            pods.push(pod("elsewhere", &[("app".to_string(), "unrelated".to_string())].into()).unwrap());
            pods.sort();
            pods.dedup();
            let parsed = parse(&p, &cfg);
            let entries = parsed.clone().unwrap_or_default();
            let mut u = Universe::new(cfg.clone());
            let mut ids = Vec::new();
            for (k, labels) in pods.iter().enumerate() {
                let id = 1000 + k as u32;
                u.identities.insert(id, LabelSet::parse(labels.iter().map(String::as_str)));
                ids.push(json!({"id": id, "labels": labels}));
            }
            for (k, prefix) in cilium_policy::engine::cidr_prefixes(&entries).iter().enumerate() {
                let id = LOCAL_FLAG | (k as u32 + 1);
                u.identities.insert(id, cidr_labels(&cfg, prefix));
                ids.push(json!({"id": id, "cidr": prefix.to_string()}));
            }
            let subjects: Vec<u32> = (0..pods.len() as u32).map(|k| 1000 + k).collect();
            let peers: Vec<u32> = u.identities.keys().copied().filter(|id| *id <= 10 || *id >= 1000).collect();
            let mut queries = Vec::new();
            let mut mine = Vec::new();
            let mut sel = Selections::new(&u);
            for s in &subjects {
                let policy = cilium_policy::compile(&u.identities[s], &[], &entries, &mut sel);
                for (ingress, d) in [(true, &policy.ingress), (false, &policy.egress)] {
                    for peer in &peers {
                        let mut ask = |proto: u8, port: u16| {
                            queries.push(json!({"subject": s, "direction": if ingress { "ingress" } else { "egress" }, "peer": peer, "proto": proto, "port": port}));
                            mine.push((name.clone(), *s, ingress, *peer, proto, port, d.allows(*peer, proto, port)));
                        };
                        for port in &ports {
                            for proto in [6u8, 17, 132] {
                                ask(proto, *port);
                            }
                        }
                        ask(1, 8);
                        ask(1, 0);
                        ask(58, 128);
                    }
                }
            }
            n_policies += 1;
            n_invalid += usize::from(parsed.is_err());
            requests.push(json!({"cluster_name": "default", "ipv4": true, "ipv6": false, "identities": ids, "policies": [p], "queries": queries}));
            ours.push((name, parsed.err(), mine));
        }
    }
    assert!(n_policies > 50, "expected upstream's example policies under {}, found {n_policies}", dir.display());
    // One oracle process answers every policy in turn.
    let mut child = Command::new(oracle)
        .arg("--stream")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {oracle} ({e}): run scripts/setup.sh"));
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        for r in requests {
            serde_json::to_writer(&mut stdin, &r).unwrap();
            stdin.write_all(b"\n").unwrap();
        }
    });
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(output.status.success(), "policy-oracle failed");
    let answers: Vec<Value> =
        String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(answers.len(), ours.len());
    let mut failures = Vec::new();
    for ((name, our_err, mine), answer) in ours.iter().zip(&answers) {
        let upstream_err = answer["errors"].as_array().unwrap().first().map(|e| e["error"].to_string());
        if our_err.is_some() != upstream_err.is_some() {
            failures.push(format!("{name}: validity differs: ours {our_err:?}, upstream {upstream_err:?}"));
            continue;
        }
        for (q, (_, s, ingress, peer, proto, port, allow)) in mine.iter().enumerate() {
            let up = answer["verdicts"][q] == "allow";
            n_verdicts += 1;
            if up != *allow && failures.len() < 20 {
                failures.push(format!(
                    "{name}: subject {s} {} peer {peer} proto {proto} port {port}: ours {allow}, upstream {up}",
                    if *ingress { "ingress" } else { "egress" }
                ));
            }
        }
    }
    eprintln!(
        "upstream examples: {n_policies} policies from {} files, {n_verdicts} verdicts compared, {n_invalid} invalid for both, {} skipped (toServices: resolved from Services the oracle has no table of; groups: fail closed by design)",
        paths.len(),
        skipped.len()
    );
    assert!(failures.is_empty(), "{} differences:\n{}", failures.len(), failures.join("\n"));
}
