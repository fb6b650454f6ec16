//! Policy compile and sync cost: 1,000 identities and 500 policies (by
//! default; `bench-policy-compile [IDENTITIES] [POLICIES] [LOCAL]`).
//!
//! Ours: parse every policy, compile every identity as a subject (the
//! engine's whole work for a node hosting all of them), then write the
//! entries of LOCAL (default 100) endpoints into the kernel's policy map
//! (root; a private bpffs directory) and sync them again unchanged.
//! Baseline, same run and same input: upstream Cilium's own engine
//! (`policy-oracle`, github.com/cilium/cilium pkg/policy) resolving and
//! distilling the policy of every identity (one lookup per subject forces
//! both), timed between request and answer on a warm process. Median of 3
//! runs each.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use cilium_crds::policy::CiliumNetworkPolicy;
use cilium_policy::engine::{Selections, Universe};
use cilium_policy::identity::{LOCAL_FLAG, cidr_labels};
use cilium_policy::{Config, LabelSet};
use node_agent_stub::datapath::{DIR_EGRESS, DIR_INGRESS, Datapath, PolicyEntry};
use serde_json::{Value, json};

fn labels(i: usize) -> Vec<String> {
    vec![
        format!("k8s:app=a{}", i % 50),
        format!("k8s:tier={}", ["front", "back", "db"][i % 3]),
        format!("k8s:io.kubernetes.pod.namespace=ns{}", i % 10),
        format!("k8s:io.cilium.k8s.namespace.labels.team=t{}", i % 4),
        "k8s:io.cilium.k8s.policy.cluster=default".to_string(),
    ]
}

fn policy(j: usize) -> Value {
    let spec = match j % 4 {
        0 => json!({"endpointSelector": {"matchLabels": {"app": format!("a{}", j % 50)}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"app": format!("a{}", (j + 1) % 50)}}],
                         "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}, {"port": "8000", "endPort": 8100}]}]}]}),
        1 => json!({"endpointSelector": {"matchLabels": {"tier": "back"}},
            "egress": [{"toCIDRSet": [{"cidr": format!("10.{}.0.0/16", j % 200), "except": [format!("10.{}.1.0/24", j % 200)]}]},
                       {"toEndpoints": [{"matchLabels": {"tier": "db"}}], "toPorts": [{"ports": [{"port": "5432"}]}]}]}),
        2 => {
            json!({"endpointSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": [format!("a{}", j % 50), format!("a{}", (j + 7) % 50)]}]},
            "ingress": [{"fromEntities": ["cluster"]}],
            "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"tier": "front"}}], "toPorts": [{"ports": [{"port": "22"}]}]}]})
        }
        _ => json!({"endpointSelector": {},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"io.cilium.k8s.namespace.labels.team": format!("t{}", j % 4)}}],
                         "icmps": [{"fields": [{"type": 8}]}]}]}),
    };
    json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
           "metadata": {"name": format!("p{j}"), "namespace": format!("ns{}", j % 10)}, "spec": spec})
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let arg = |n: usize, d: usize| std::env::args().nth(n).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (n_ids, n_pol, local) = (arg(1, 1000), arg(2, 500), arg(3, 100));
    let cfg = Config::default();
    let policies: Vec<Value> = (0..n_pol).map(policy).collect();
    let typed: Vec<CiliumNetworkPolicy> =
        policies.iter().map(|p| serde_json::from_value(p.clone())).collect::<Result<_, _>>()?;

    node_agent_stub::datapath::ensure_bpffs()?;
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/cilium-rs-bench-{}", std::process::id()));
    let mut dp = Datapath::load(&pins)?;

    let (mut parse_t, mut compile_t, mut sync_t, mut resync_t) = (vec![], vec![], vec![], vec![]);
    let mut entries_total = 0usize;
    for _ in 0..3 {
        let t = Instant::now();
        let entries: Vec<cilium_policy::Entry> = typed
            .iter()
            .map(|p| cilium_policy::parse::parse_cnp(p, &cfg).map(|p| p.entries))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .into_iter()
            .flatten()
            .collect();
        parse_t.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut u = Universe::new(cfg.clone());
        for i in 0..n_ids {
            u.identities.insert(1000 + i as u32, LabelSet::parse(labels(i).iter().map(String::as_str)));
        }
        for (k, p) in cilium_policy::engine::cidr_prefixes(&entries).iter().enumerate() {
            u.identities.insert(LOCAL_FLAG | (k as u32 + 1), cidr_labels(&cfg, p));
        }
        let mut sel = Selections::new(&u);
        let mut compiled = Vec::new();
        for i in 0..n_ids {
            compiled.push(cilium_policy::compile(&u.identities[&(1000 + i as u32)], &[], &entries, &mut sel));
        }
        compile_t.push(t.elapsed().as_secs_f64());
        entries_total = compiled.iter().map(|c| c.ingress.entries.len() + c.egress.entries.len()).sum();
        let maps: Vec<BTreeMap<PolicyEntry, bool>> = compiled[..local.min(n_ids)]
            .iter()
            .map(|c| {
                let mut m = BTreeMap::new();
                for (direction, d) in [(DIR_INGRESS, &c.ingress), (DIR_EGRESS, &c.egress)] {
                    m.extend(d.entries.iter().map(|(key, deny)| (PolicyEntry { direction, key: *key }, *deny)));
                }
                m
            })
            .collect();
        for (ep, _) in maps.iter().enumerate() {
            dp.sync_policy(ep as u32 + 1, &BTreeMap::new())?;
        }
        let t = Instant::now();
        for (ep, m) in maps.iter().enumerate() {
            dp.sync_policy(ep as u32 + 1, m)?;
        }
        sync_t.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for (ep, m) in maps.iter().enumerate() {
            dp.sync_policy(ep as u32 + 1, m)?;
        }
        resync_t.push(t.elapsed().as_secs_f64());
    }
    let _ = std::fs::remove_dir_all(&pins);

    // Upstream's engine on the same input.
    let oracle = concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools/bin/policy-oracle");
    let mut child = Command::new(oracle).arg("--stream").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let ids: Vec<Value> = (0..n_ids).map(|i| json!({"id": 1000 + i, "labels": labels(i)})).collect();
    let queries: Vec<Value> = (0..n_ids)
        .map(|i| json!({"subject": 1000 + i, "direction": "ingress", "peer": 1000, "proto": 6, "port": 80}))
        .collect();
    let request = json!({"cluster_name": "default", "ipv4": true, "ipv6": false, "identities": ids, "policies": policies, "queries": queries});
    let mut text = serde_json::to_string(&request)?;
    text.push('\n');
    let mut upstream_t = vec![];
    for _ in 0..4 {
        let t = Instant::now();
        stdin.write_all(text.as_bytes())?;
        stdin.flush()?;
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        anyhow::ensure!(!line.is_empty(), "policy-oracle ended");
        upstream_t.push(t.elapsed().as_secs_f64());
    }
    upstream_t.remove(0); // the first request also loads the process
    drop(stdin);
    let _ = child.wait();

    let ours = median(parse_t.clone()) + median(compile_t.clone());
    let up = median(upstream_t);
    println!(
        "{n_ids} identities, {n_pol} policies, {local} local endpoints, {entries_total} map entries for all subjects"
    );
    println!("- policy: parse {n_pol} policies = {:.1} ms", median(parse_t) * 1e3);
    println!(
        "- policy: parse + compile for {n_ids} subjects = {:.1} ms (baseline {:.1} ms upstream resolve+distill, ratio {:.2})",
        ours * 1e3,
        up * 1e3,
        ours / up
    );
    println!("- policy: first sync of {local} endpoints into the kernel map = {:.1} ms", median(sync_t) * 1e3);
    println!("- policy: unchanged re-sync of {local} endpoints = {:.2} ms", median(resync_t) * 1e3);
    Ok(())
}
