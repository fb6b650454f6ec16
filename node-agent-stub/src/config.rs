//! Agent flags. Cluster-wide settings (identity allocation mode, kvstore,
//! cluster ID, identity-relevant `labels`) come from the same `cilium-config`
//! ConfigMap directory as the operator's; flags override them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Clone, Debug)]
#[command(
    name = "cilium-node-agent",
    version,
    about = "Per-node agent: pod networking, identities, CiliumEndpoints and an eBPF policy datapath"
)]
pub struct Flags {
    /// Name of this node (its Node and CiliumNode).
    #[arg(long, env = "CILIUM_NODE_NAME")]
    pub node_name: String,
    /// Kubeconfig (default: $KUBECONFIG, ~/.kube/config or in-cluster).
    #[arg(long = "k8s-kubeconfig-path", env = "CILIUM_K8S_KUBECONFIG_PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Directory of the mounted cilium-config ConfigMap.
    #[arg(long, env = "CILIUM_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
    /// This node's address on the fabric, with prefix (e.g. 192.168.200.11/24).
    #[arg(long, env = "CILIUM_NODE_IP")]
    pub node_ip: String,
    /// Prefix of every network namespace this agent creates.
    #[arg(long, default_value = "cilium-rs")]
    pub netns_prefix: String,
    /// The node's network namespace: `host` for the agent's own (a real
    /// node: the agent runs in the host's network, its interfaces and
    /// addresses are the node's), or a name under /var/run/netns. Unset:
    /// `<netns-prefix>-<node-name>`, which the agent makes and wires to
    /// the fabric namespace (the simulated nodes of the fast test tier).
    #[arg(long)]
    pub node_netns: Option<String>,
    /// Where pinned maps and links live (a bpffs directory); default
    /// /sys/fs/bpf/<netns-prefix>/<node-name>.
    #[arg(long)]
    pub bpf_root: Option<PathBuf>,
    /// Persisted endpoint state; default /var/run/cilium/<netns-prefix>/<node-name>.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The agent's API socket (`/v1/monitor`, `/v1/healthz`), upstream's
    /// path; agents sharing one host (the simulated nodes) need one each.
    #[arg(long, default_value = "/var/run/cilium/cilium.sock")]
    pub socket_path: PathBuf,
    /// Metrics and health address (/metrics, /healthz).
    #[arg(long, default_value = ":9962")]
    pub prometheus_serve_addr: String,
    /// Identity allocation mode (overrides cilium-config).
    #[arg(long)]
    pub identity_allocation_mode: Option<String>,
    /// etcd address for kvstore modes (overrides kvstore-opt), e.g. http://127.0.0.1:2379.
    #[arg(long)]
    pub kvstore_endpoint: Option<String>,
    /// TTL of the kvstore session lease (overrides cilium-config
    /// `kvstore-lease-ttl`; default 15m, as upstream), e.g. `30s`, `15m`.
    #[arg(long)]
    pub kvstore_lease_ttl: Option<String>,
    /// Name of the cluster (overrides cilium-config `cluster-name`; default
    /// `default`): endpoints carry it as a label and policies select within it.
    #[arg(long)]
    pub cluster_name: Option<String>,
    /// Node labels are identity labels of the nodes and `fromNodes`/
    /// `toNodes` are allowed (overrides cilium-config
    /// `enable-node-selector-labels`; default false, as upstream).
    #[arg(long)]
    pub enable_node_selector_labels: Option<bool>,
    /// Probe every node and its health endpoint (overrides cilium-config
    /// `enable-health-checking`; default true, as upstream).
    #[arg(long)]
    pub enable_health_checking: Option<bool>,
    /// Entries of the policy map: one map for all endpoints of the node
    /// (upstream's option of this name sizes one map per endpoint, 16384
    /// by default; this one is not read from cilium-config for that
    /// reason). A changed size makes the map anew at start.
    #[arg(long, default_value_t = crate::datapath::POLICY_MAP_SIZE)]
    pub bpf_policy_map_max: u32,
    /// How often the health prober probes every node, e.g. `60s`.
    #[arg(long, default_value = "60s")]
    pub health_probe_interval: String,
    /// Pods get their network through the `cilium-cni` plugin: the
    /// container runtime makes each sandbox's namespace and the plugin asks
    /// this agent (on --socket-path) to plug it. Without it the agent makes
    /// a namespace itself for each Pod bound to this node (the simulated
    /// nodes of the fast test tier).
    #[arg(long, default_value_t = false)]
    pub cni: bool,
    /// Writes the CNI network configuration (a conflist naming
    /// `cilium-cni` and this agent's socket) to this file once the agent
    /// enforces, as upstream's option of this name: the kubelet reports the
    /// node's network ready only then. E.g. /host/etc/cni/net.d/05-cilium.conflist.
    #[arg(long)]
    pub write_cni_conf_when_ready: Option<PathBuf>,
    /// Removes that configuration when the agent stops (upstream's
    /// `cni-uninstall`): the node's new pods then wait for an agent instead
    /// of failing in cilium-cni. For removing Cilium from a node; off by
    /// default, as an upgrade restarts the agent too.
    #[arg(long)]
    pub cni_uninstall: bool,
}

/// The settings the agent uses.
#[derive(Clone, Debug)]
pub struct Settings {
    pub flags: Flags,
    pub mode: String,
    pub kvstore: Option<String>,
    pub cluster_id: u32,
    pub max_connected_clusters: u32,
    /// Identity-relevant label patterns (`labels` option), empty: defaults.
    pub label_patterns: Vec<String>,
    pub cluster_name: String,
    /// Seconds.
    pub kvstore_lease_ttl: i64,
    /// `enable-node-selector-labels`.
    pub node_selector_labels: bool,
    /// Which node labels count (`node-labels`, the same pattern syntax as
    /// `labels`; empty: every label).
    pub node_label_patterns: Vec<String>,
    /// `enable-health-checking`.
    pub health_checking: bool,
    pub health_probe_interval: std::time::Duration,
}

/// `90`, `30s`, `15m`, `1h` as seconds (the forms upstream's durations take
/// for this option).
fn seconds(v: &str) -> Option<i64> {
    let v = v.trim();
    let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: i64 = num.parse().ok()?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return None,
    };
    (n > 0).then_some(n * mult)
}

impl Settings {
    pub fn from(flags: Flags) -> anyhow::Result<Settings> {
        let mut cm: BTreeMap<String, String> = BTreeMap::new();
        if let Some(dir) = &flags.config_dir {
            for key in [
                "identity-allocation-mode",
                "kvstore",
                "kvstore-opt",
                "cluster-id",
                "cluster-name",
                "kvstore-lease-ttl",
                "max-connected-clusters",
                "labels",
                "enable-node-selector-labels",
                "node-labels",
            ] {
                if let Ok(v) = std::fs::read_to_string(dir.join(key)) {
                    cm.insert(key.to_string(), v.trim().to_string());
                }
            }
        }
        let mode = flags
            .identity_allocation_mode
            .clone()
            .or_else(|| cm.get("identity-allocation-mode").cloned())
            .unwrap_or_else(|| "crd".into());
        if !["crd", "kvstore", "doublewrite-readkvstore", "doublewrite-readcrd"].contains(&mode.as_str()) {
            anyhow::bail!(
                "invalid identity-allocation-mode {mode:?}: must be crd, kvstore, doublewrite-readkvstore or doublewrite-readcrd"
            );
        }
        let kvstore = flags.kvstore_endpoint.clone().or_else(|| {
            cm.get("kvstore-opt")?.split([',', ' ']).find_map(|o| o.strip_prefix("etcd.address=").map(str::to_string))
        });
        if mode != "crd" && kvstore.is_none() {
            anyhow::bail!(
                "identity-allocation-mode {mode} needs an etcd address (kvstore-opt etcd.address=... or --kvstore-endpoint)"
            );
        }
        let num = |k: &str, d: u32| -> anyhow::Result<u32> {
            cm.get(k)
                .map(|v| v.parse().map_err(|_| anyhow::anyhow!("invalid {k} {v:?} in cilium-config")))
                .unwrap_or(Ok(d))
        };
        let label_patterns =
            cm.get("labels").map(|l| l.split_whitespace().map(str::to_string).collect()).unwrap_or_default();
        let cluster_name =
            flags.cluster_name.clone().or_else(|| cm.get("cluster-name").cloned()).unwrap_or_else(|| "default".into());
        let ttl_text = flags.kvstore_lease_ttl.clone().or_else(|| cm.get("kvstore-lease-ttl").cloned());
        let kvstore_lease_ttl = match ttl_text {
            None => cilium_identity_alloc::kvstore::SESSION_TTL,
            Some(t) => {
                seconds(&t).ok_or_else(|| anyhow::anyhow!("invalid kvstore-lease-ttl {t:?}: use e.g. 30s, 15m, 1h"))?
            }
        };
        let node_selector_labels = match flags.enable_node_selector_labels {
            Some(b) => b,
            None => match cm.get("enable-node-selector-labels").map(String::as_str) {
                None | Some("" | "false") => false,
                Some("true") => true,
                Some(v) => anyhow::bail!("invalid enable-node-selector-labels {v:?} in cilium-config: true or false"),
            },
        };
        let node_label_patterns =
            cm.get("node-labels").map(|l| l.split_whitespace().map(str::to_string).collect()).unwrap_or_default();
        let health_checking = match flags.enable_health_checking {
            Some(b) => b,
            None => match cm.get("enable-health-checking").map(String::as_str) {
                None | Some("" | "true") => true,
                Some("false") => false,
                Some(v) => anyhow::bail!("invalid enable-health-checking {v:?} in cilium-config: true or false"),
            },
        };
        if flags.bpf_policy_map_max == 0 {
            anyhow::bail!("invalid --bpf-policy-map-max 0: the policy map needs at least one entry");
        }
        let interval = &flags.health_probe_interval;
        let health_probe_interval = std::time::Duration::from_secs(
            seconds(interval)
                .ok_or_else(|| anyhow::anyhow!("invalid --health-probe-interval {interval:?}: use e.g. 1s, 60s, 5m"))?
                as u64,
        );
        Ok(Settings {
            health_checking,
            health_probe_interval,
            node_selector_labels,
            node_label_patterns,
            kvstore_lease_ttl,
            cluster_name,
            mode,
            kvstore,
            cluster_id: num("cluster-id", 0)?,
            max_connected_clusters: num("max-connected-clusters", 255)?,
            label_patterns,
            flags,
        })
    }

    /// The node's network namespace by name; empty for `--node-netns=host`
    /// (see `netns`: an empty name is the agent's own namespace).
    pub fn node_ns(&self) -> String {
        match self.flags.node_netns.as_deref() {
            Some("host") => String::new(),
            Some(name) => name.to_string(),
            None => format!("{}-{}", self.flags.netns_prefix, self.flags.node_name),
        }
    }

    /// The namespace of this node's health endpoint (one the agent makes).
    pub fn health_ns(&self) -> String {
        format!("{}-{}-health", self.flags.netns_prefix, self.flags.node_name)
    }

    pub fn fabric_ns(&self) -> String {
        format!("{}-fabric", self.flags.netns_prefix)
    }

    pub fn pod_ns(&self, namespace: &str, name: &str) -> String {
        format!("{}-{}-{namespace}-{name}", self.flags.netns_prefix, self.flags.node_name)
    }

    pub fn bpf_root(&self) -> PathBuf {
        self.flags
            .bpf_root
            .clone()
            .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf").join(&self.flags.netns_prefix).join(&self.flags.node_name))
    }

    pub fn state_dir(&self) -> PathBuf {
        self.flags.state_dir.clone().unwrap_or_else(|| {
            PathBuf::from("/var/run/cilium").join(&self.flags.netns_prefix).join(&self.flags.node_name)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(extra: &[&str]) -> Flags {
        let mut args = vec!["cilium-node-agent", "--node-name=n1", "--node-ip=192.168.0.1/24"];
        args.extend_from_slice(extra);
        Flags::try_parse_from(args).unwrap()
    }

    #[test]
    fn config_dir_flags_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("identity-allocation-mode"), "kvstore\n").unwrap();
        std::fs::write(dir.path().join("kvstore-opt"), "etcd.address=http://10.0.0.1:2379").unwrap();
        std::fs::write(dir.path().join("labels"), "k8s:!build-id$ k8s:app").unwrap();
        let d = format!("--config-dir={}", dir.path().display());
        let s = Settings::from(flags(&[&d])).unwrap();
        assert_eq!(s.mode, "kvstore");
        assert_eq!(s.kvstore.as_deref(), Some("http://10.0.0.1:2379"));
        assert_eq!(s.label_patterns, vec!["k8s:!build-id$", "k8s:app"]);
        assert_eq!(s.node_ns(), "cilium-rs-n1");
        // A flag beats the ConfigMap.
        let s = Settings::from(flags(&[&d, "--identity-allocation-mode=crd"])).unwrap();
        assert_eq!(s.mode, "crd");
        let e = Settings::from(flags(&["--identity-allocation-mode=etcd"])).unwrap_err().to_string();
        assert!(e.contains("invalid identity-allocation-mode \"etcd\""), "{e}");
        let e = Settings::from(flags(&["--identity-allocation-mode=kvstore"])).unwrap_err().to_string();
        assert!(e.contains("needs an etcd address"), "{e}");
        assert!(!s.node_selector_labels, "off by default, as upstream");
        std::fs::write(dir.path().join("enable-node-selector-labels"), "true\n").unwrap();
        std::fs::write(dir.path().join("node-labels"), "zone !kubernetes\\.io").unwrap();
        let s = Settings::from(flags(&[&d])).unwrap();
        assert!(s.node_selector_labels);
        assert_eq!(s.node_label_patterns, vec!["zone", "!kubernetes\\.io"]);
        let s = Settings::from(flags(&[&d, "--enable-node-selector-labels=false"])).unwrap();
        assert!(!s.node_selector_labels, "the flag wins");
        std::fs::write(dir.path().join("enable-node-selector-labels"), "yes").unwrap();
        let e = Settings::from(flags(&[&d])).unwrap_err().to_string();
        assert!(e.contains("invalid enable-node-selector-labels \"yes\""), "{e}");
        std::fs::write(dir.path().join("enable-node-selector-labels"), "false").unwrap();
        std::fs::write(dir.path().join("cluster-id"), "many").unwrap();
        let e = Settings::from(flags(&[&d])).unwrap_err().to_string();
        assert!(e.contains("invalid cluster-id \"many\""), "{e}");
        assert!(
            Flags::try_parse_from(["cilium-node-agent", "--node-ip=1.2.3.4/24"]).is_err(),
            "--node-name is required"
        );
    }
}
