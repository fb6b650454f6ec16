//! `ciliumctl sysdump`: everything a bug report needs in one archive.
//!
//! `cilium-sysdump-<time>/` in a `.tar.gz`:
//! - `ciliumctl/`: the output of status, doctor (text and JSON), endpoint
//!   list, identity list, ipam status, kvstore status and policy
//!   selectors, each run as its own `ciliumctl` process with the same
//!   connection flags;
//! - `objects/`: every Cilium object (CRDs), Kubernetes NetworkPolicies,
//!   Nodes, Services and EndpointSlices as the API server returns them,
//!   undecodable ones included (that is often the bug);
//! - `config/cilium-config.json` (values of keys that look like
//!   credentials are redacted), the operator's Lease, the Events of the
//!   Cilium namespace and of `default` (cluster-scoped objects');
//! - `logs/`: the last 5,000 lines of each container of the operator and
//!   agent pods;
//! - `MANIFEST.txt`: every file with its size, and what could not be
//!   collected and why.
//!
//! Secrets are never read.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, LogParams};

use crate::ctx::{CONFIG_MAP, Ctx, one_line};

/// (group, version, kind, plural, namespaced) of the objects collected.
const OBJECTS: &[(&str, &str, &str, &str, bool)] = &[
    ("cilium.io", "v2", "CiliumNetworkPolicy", "ciliumnetworkpolicies", true),
    ("cilium.io", "v2", "CiliumClusterwideNetworkPolicy", "ciliumclusterwidenetworkpolicies", false),
    ("cilium.io", "v2", "CiliumEndpoint", "ciliumendpoints", true),
    ("cilium.io", "v2", "CiliumIdentity", "ciliumidentities", false),
    ("cilium.io", "v2", "CiliumNode", "ciliumnodes", false),
    ("cilium.io", "v2", "CiliumCIDRGroup", "ciliumcidrgroups", false),
    ("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies", true),
    ("", "v1", "Node", "nodes", false),
    ("", "v1", "Service", "services", true),
    ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", true),
    ("apiextensions.k8s.io", "v1", "CustomResourceDefinition", "customresourcedefinitions", false),
];

/// `ciliumctl` runs whose output goes in (file, arguments).
const RUNS: &[(&str, &[&str])] = &[
    ("status.txt", &["status", "--color", "never"]),
    ("doctor.txt", &["doctor", "--color", "never"]),
    ("doctor.json", &["doctor", "-o", "json"]),
    ("endpoints.txt", &["endpoint", "list", "--color", "never"]),
    ("identities.json", &["identity", "list", "-o", "json"]),
    ("ipam.txt", &["ipam", "status", "--color", "never"]),
    ("kvstore.txt", &["kvstore", "status", "--color", "never"]),
    ("policy-selectors.json", &["policy", "selectors", "-o", "json"]),
    ("health.json", &["health", "-o", "json"]),
];

/// A config key whose value may be a credential.
pub fn looks_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "passwd", "secret", "token", "credential", "private", "-key", "_key", ".key"]
        .iter()
        .any(|w| k.contains(w))
}

struct Archive {
    dir: String,
    files: Vec<(String, Vec<u8>)>,
    problems: Vec<String>,
}

impl Archive {
    fn add(&mut self, name: &str, data: Vec<u8>) {
        self.files.push((format!("{}/{name}", self.dir), data));
    }

    fn json(&mut self, name: &str, value: &impl serde::Serialize) {
        match serde_json::to_vec_pretty(value) {
            Ok(v) => self.add(name, v),
            Err(e) => self.problems.push(format!("{name}: {e}")),
        }
    }

    fn write(mut self, path: &Path) -> anyhow::Result<usize> {
        let mut manifest = String::from("# file (bytes)\n");
        for (name, data) in &self.files {
            manifest.push_str(&format!("{name} ({})\n", data.len()));
        }
        manifest.push_str(&format!("\n# not collected ({})\n", self.problems.len()));
        for p in &self.problems {
            manifest.push_str(&format!("{p}\n"));
        }
        self.add("MANIFEST.txt", manifest.into_bytes());
        let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(file, flate2::Compression::default()));
        let now = jiff::Timestamp::now().as_second().max(0) as u64;
        for (name, data) in &self.files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(now);
            tar.append_data(&mut h, name, data.as_slice()).with_context(|| format!("writing {name}"))?;
        }
        tar.into_inner()?.finish()?;
        Ok(self.files.len())
    }
}

pub async fn sysdump(ctx: &Ctx, output: Option<PathBuf>, forward: &[String], hosts: &[String]) -> anyhow::Result<()> {
    let stamp = jiff::Timestamp::now().strftime("%Y%m%d-%H%M%S").to_string();
    let dir = format!("cilium-sysdump-{stamp}");
    let path = output.unwrap_or_else(|| PathBuf::from(format!("{dir}.tar.gz")));
    let mut a = Archive { dir, files: Vec::new(), problems: Vec::new() };

    let me = std::env::current_exe().context("finding the ciliumctl binary")?;
    for (file, args) in RUNS {
        ctx.out.step(&format!("ciliumctl {}", args.join(" ")));
        match tokio::process::Command::new(&me).args(forward).args(*args).output().await {
            Ok(out) => {
                let mut data = out.stdout;
                if !out.stderr.is_empty() {
                    data.extend_from_slice(b"\n--- stderr\n");
                    data.extend_from_slice(&out.stderr);
                }
                a.add(&format!("ciliumctl/{file}"), data);
            }
            Err(e) => a.problems.push(format!("ciliumctl {}: {e}", args.join(" "))),
        }
    }

    // Each agent's own view: status (map pressure, probe results, recent
    // drops), its datapath maps and its metrics.
    for (i, h) in hosts.iter().enumerate() {
        ctx.out.step(&format!("agent status, maps and metrics from {h}"));
        let node = match crate::agents::get_json(h, "/v1/status").await {
            Ok(v) => {
                let node = v["node"].as_str().map(str::to_string).unwrap_or_else(|| format!("agent-{i}"));
                a.json(&format!("agents/{node}-status.json"), &v);
                node
            }
            Err(e) => {
                a.problems.push(format!("agent {h}: {}", one_line(&format!("{e:#}"))));
                continue;
            }
        };
        for (path, file) in [("/v1/maps", "maps.json"), ("/metrics", "metrics.txt")] {
            match crate::agents::get_bytes(h, path).await {
                Ok(body) => a.add(&format!("agents/{node}-{file}"), body),
                Err(e) => a.problems.push(format!("agent {node} {path}: {}", one_line(&format!("{e:#}")))),
            }
        }
    }

    for (group, version, kind, plural, _) in OBJECTS {
        ctx.out.step(&format!("listing {plural}"));
        let api_version = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
        let ar = ApiResource {
            group: group.to_string(),
            version: version.to_string(),
            api_version,
            kind: kind.to_string(),
            plural: plural.to_string(),
        };
        let api: Api<DynamicObject> = Api::all_with(ctx.client.clone(), &ar);
        match api.list(&ListParams::default()).await {
            Ok(list) => a.json(&format!("objects/{plural}.json"), &list.items),
            Err(e) => a.problems.push(format!("{plural}: {}", one_line(&e.to_string()))),
        }
    }

    ctx.out.step("reading cilium-config, the Lease and Events");
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    match cms.get_opt(CONFIG_MAP).await {
        Ok(Some(cm)) => {
            let data: std::collections::BTreeMap<String, String> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| if looks_secret(&k) { (k, "<redacted>".to_string()) } else { (k, v) })
                .collect();
            a.json("config/cilium-config.json", &data);
        }
        Ok(None) => a.problems.push(format!("config: no ConfigMap {}/{CONFIG_MAP}", ctx.namespace)),
        Err(e) => a.problems.push(format!("config: {}", one_line(&e.to_string()))),
    }
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    match leases.list(&ListParams::default()).await {
        Ok(l) => a.json("config/leases.json", &l.items),
        Err(e) => a.problems.push(format!("leases: {}", one_line(&e.to_string()))),
    }
    for ns in [ctx.namespace.as_str(), "default"] {
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(ctx.client.clone(), ns);
        match events.list(&ListParams::default()).await {
            Ok(l) => a.json(&format!("events/{ns}.json"), &l.items),
            Err(e) => a.problems.push(format!("events in {ns}: {}", one_line(&e.to_string()))),
        }
    }

    ctx.out.step("reading operator and agent logs");
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let selector = "app.kubernetes.io/name in (cilium-operator,cilium-agent)";
    match pods.list(&ListParams::default().labels(selector)).await {
        Ok(list) if list.items.is_empty() => {
            a.problems.push(format!("logs: no pod in {} matches {selector}", ctx.namespace))
        }
        Ok(list) => {
            for p in list.items {
                let name = p.metadata.name.clone().unwrap_or_default();
                for c in p.spec.iter().flat_map(|s| &s.containers) {
                    let lp =
                        LogParams { container: Some(c.name.clone()), tail_lines: Some(5000), ..Default::default() };
                    match pods.logs(&name, &lp).await {
                        Ok(text) => a.add(&format!("logs/{name}/{}.log", c.name), text.into_bytes()),
                        Err(e) => a.problems.push(format!("logs of {name}/{}: {}", c.name, one_line(&e.to_string()))),
                    }
                }
            }
        }
        Err(e) => a.problems.push(format!("logs: {}", one_line(&e.to_string()))),
    }
    ctx.out.done();

    let problems = a.problems.len();
    let n = a.write(&path)?;
    println!("{} ({n} files; {problems} things not collected, listed in MANIFEST.txt)", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_keys_are_recognised() {
        for k in ["etcd-password", "clustermesh-token", "tls-private-key", "AWS_SECRET", "ca.key"] {
            assert!(looks_secret(k), "{k}");
        }
        for k in ["cluster-name", "kvstore-opt", "identity-gc-interval", "labels"] {
            assert!(!looks_secret(k), "{k}");
        }
    }
}
