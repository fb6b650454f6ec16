//! Operator configuration: upstream flag names and defaults, each also
//! readable from the environment (`CILIUM_<FLAG_NAME>`) and from a mounted
//! `cilium-config` ConfigMap directory (`--config-dir`, one file per key).
//!
//! Precedence, as in upstream (viper): command-line flag > environment >
//! config directory > default. Every value remembers where it came from, so
//! a refused value is reported with its source.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cilium_ipam::{Cidr, Family};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};

use crate::duration;

/// How a value is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Value,
    Bool,
    /// Comma- (flags, env) or space-separated (ConfigMap) list.
    List,
}

/// One option: upstream name, default and help.
pub struct OptSpec {
    pub name: &'static str,
    pub default: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

const fn opt(name: &'static str, default: &'static str, kind: Kind, help: &'static str) -> OptSpec {
    OptSpec { name, default, kind, help }
}

/// Every option the operator reads, with upstream names and defaults.
pub const OPTIONS: &[OptSpec] = &[
    opt("config-dir", "", Kind::Value, "Directory holding one file per option (a mounted cilium-config ConfigMap)"),
    opt(
        "k8s-kubeconfig-path",
        "",
        Kind::Value,
        "Kubeconfig to use (default: $KUBECONFIG, ~/.kube/config or in-cluster)",
    ),
    opt("k8s-namespace", "kube-system", Kind::Value, "Namespace of the operator (leader-election Lease, Events)"),
    opt("cluster-name", "default", Kind::Value, "Name of the cluster"),
    opt("cluster-id", "0", Kind::Value, "Unique identifier of the cluster (0 = single cluster)"),
    opt(
        "enable-node-selector-labels",
        "false",
        Kind::Bool,
        "Node labels are node identity labels: policies may use fromNodes/toNodes",
    ),
    opt("max-connected-clusters", "255", Kind::Value, "Maximum number of clusters in a mesh (255 or 511)"),
    opt("identity-allocation-mode", "crd", Kind::Value, "crd, kvstore, doublewrite-readkvstore or doublewrite-readcrd"),
    opt("ipam", "cluster-pool", Kind::Value, "IPAM mode (cluster-pool)"),
    opt("enable-ipv4", "true", Kind::Bool, "Allocate IPv4 pod CIDRs"),
    opt("enable-ipv6", "false", Kind::Bool, "Allocate IPv6 pod CIDRs"),
    opt("cluster-pool-ipv4-cidr", "", Kind::List, "IPv4 pool CIDRs, in allocation order"),
    opt("cluster-pool-ipv4-mask-size", "24", Kind::Value, "Prefix length of each node's IPv4 pod CIDR"),
    opt("cluster-pool-ipv6-cidr", "", Kind::List, "IPv6 pool CIDRs, in allocation order"),
    opt("cluster-pool-ipv6-mask-size", "112", Kind::Value, "Prefix length of each node's IPv6 pod CIDR"),
    opt("identity-gc-interval", "15m0s", Kind::Value, "Interval between identity GC runs (0 disables CRD identity GC)"),
    opt("identity-heartbeat-timeout", "30m0s", Kind::Value, "Time an unused identity is kept before deletion"),
    opt("identity-gc-rate-interval", "1m0s", Kind::Value, "Window of the identity GC rate limit"),
    opt("identity-gc-rate-limit", "2500", Kind::Value, "Maximum identity deletions in any identity-gc-rate-interval"),
    opt(
        "identity-space-pressure-threshold",
        "0.9",
        Kind::Value,
        "Share of the identity range in use that triggers an immediate GC pass, an Event and a metric",
    ),
    opt("nodes-gc-interval", "5m0s", Kind::Value, "Interval between CiliumNode GC runs"),
    opt(
        "remove-cilium-node-taints",
        "true",
        Kind::Bool,
        "Remove the agent-not-ready taint from a node once a Cilium agent pod on it is Ready",
    ),
    opt(
        "set-cilium-node-taints",
        "false",
        Kind::Bool,
        "Taint a node (NoSchedule) while the Cilium agent pod on it is not Ready",
    ),
    opt(
        "set-cilium-is-up-condition",
        "true",
        Kind::Bool,
        "Set NetworkUnavailable=False (reason CiliumIsUp) on a node once a Cilium agent pod on it is Ready",
    ),
    opt("agent-not-ready-taint-key", "node.cilium.io/agent-not-ready", Kind::Value, "Key of the agent-not-ready taint"),
    opt("cilium-pod-labels", "k8s-app=cilium", Kind::Value, "Label selector of the Cilium agent pods"),
    opt(
        "cilium-pod-namespace",
        "",
        Kind::Value,
        "Namespace of the Cilium agent pods (empty: the operator's --k8s-namespace)",
    ),
    opt(
        "unmanaged-pod-watcher-interval",
        "15",
        Kind::Value,
        "Seconds between restarts of pods Cilium does not manage (0 disables)",
    ),
    opt(
        "pod-restart-selector",
        "k8s-app=kube-dns",
        Kind::Value,
        "Label selector of the pods restarted when Cilium does not manage them",
    ),
    opt("cilium-endpoint-gc-interval", "5m0s", Kind::Value, "Interval between CiliumEndpoint GC runs (0 runs once)"),
    opt("operator-api-serve-addr", "localhost:9234", Kind::Value, "Address of the health API (/healthz)"),
    opt("operator-prometheus-serve-addr", ":9963", Kind::Value, "Address of the Prometheus metrics endpoint"),
    opt("enable-metrics", "true", Kind::Bool, "Serve Prometheus metrics"),
    opt("leader-election-lease-duration", "15s", Kind::Value, "Duration a non-leader waits before taking over a lease"),
    opt("leader-election-renew-deadline", "10s", Kind::Value, "Time the leader keeps trying to renew before giving up"),
    opt("leader-election-retry-period", "2s", Kind::Value, "Interval between leader-election attempts"),
    opt(
        "double-write-metric-reporter-interval",
        "1m0s",
        Kind::Value,
        "Interval of the double-write identity comparison (doublewrite_* gauges)",
    ),
    opt("kvstore", "", Kind::Value, "Key-value store type: empty (none) or etcd"),
    opt(
        "kvstore-opt",
        "",
        Kind::List,
        "Key-value store options: etcd.address=<url> or etcd.config=<file with endpoints>",
    ),
    opt("kvstore-heartbeat-interval", "1m0s", Kind::Value, "Interval between writes of cilium/.heartbeat"),
    opt("log-format", "text", Kind::Value, "Log format: text or json"),
    opt("debug", "false", Kind::Bool, "Enable debug logging"),
];

/// The environment variable of an option: `CILIUM_` + upper snake case.
pub fn env_name(name: &str) -> String {
    format!("CILIUM_{}", name.to_uppercase().replace('-', "_"))
}

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env(String),
    ConfigDir(PathBuf),
    /// `<namespace>/<name>` and key of a ConfigMap read through the API.
    ConfigMap(String),
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag => f.write_str("command line"),
            Source::Env(v) => write!(f, "environment variable {v}"),
            Source::ConfigDir(p) => write!(f, "config file {}", p.display()),
            Source::ConfigMap(k) => write!(f, "ConfigMap {k}"),
            Source::Default => f.write_str("default"),
        }
    }
}

/// Option values as given, before validation.
#[derive(Clone, Debug, Default)]
pub struct RawConfig {
    values: BTreeMap<&'static str, (String, Source)>,
}

/// A refused configuration value. Displays as one line naming the option,
/// the value and where it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid value {value:?} for --{name} (from {origin}): {reason}")]
    Invalid { name: &'static str, value: String, origin: Source, reason: String },
    #[error("cannot read config directory {}: {reason}", path.display())]
    ConfigDir { path: PathBuf, reason: String },
}

impl RawConfig {
    /// Value and source of an option (every option has one: defaults
    /// included).
    pub fn get(&self, name: &str) -> (&str, &Source) {
        let (v, s) = self.values.get(name).unwrap_or_else(|| panic!("unknown option {name}"));
        (v.as_str(), s)
    }

    /// Builds the values from parsed flags/env, then the config directory,
    /// then the defaults.
    pub fn from_matches(m: &ArgMatches) -> Result<RawConfig, ConfigError> {
        let mut values = BTreeMap::new();
        for o in OPTIONS {
            let source = match m.value_source(o.name) {
                Some(ValueSource::CommandLine) => Source::Flag,
                Some(ValueSource::EnvVariable) => Source::Env(env_name(o.name)),
                _ => continue,
            };
            let v = m.get_one::<String>(o.name).cloned().unwrap_or_default();
            values.insert(o.name, (v, source));
        }
        let dir = values.get("config-dir").map(|(v, _)| v.clone()).unwrap_or_default();
        if !dir.is_empty() {
            for (name, (v, path)) in read_config_dir(Path::new(&dir))? {
                values.entry(name).or_insert((v, Source::ConfigDir(path)));
            }
        }
        for o in OPTIONS {
            values.entry(o.name).or_insert_with(|| (o.default.to_string(), Source::Default));
        }
        Ok(RawConfig { values })
    }

    /// Builds the values from the data of a `cilium-config` ConfigMap read
    /// through the API (`what` names it, e.g. `kube-system/cilium-config`),
    /// as the operator would see them mounted. Keys that are not operator
    /// options are skipped.
    pub fn from_config_map(what: &str, data: &BTreeMap<String, String>) -> RawConfig {
        let mut values = BTreeMap::new();
        for o in OPTIONS {
            let value = match data.get(o.name) {
                Some(v) if o.name != "config-dir" => normalize(o, v),
                _ => o.default.to_string(),
            };
            let source = if data.contains_key(o.name) {
                Source::ConfigMap(format!("{what} key {}", o.name))
            } else {
                Source::Default
            };
            values.insert(o.name, (value, source));
        }
        RawConfig { values }
    }

    /// Builds the values from `--name=value` style pairs (tests).
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Result<RawConfig, ConfigError> {
        let mut args = vec!["cilium-operator".to_string()];
        args.extend(pairs.iter().map(|(k, v)| format!("--{k}={v}")));
        let m = command().no_binary_name(false).try_get_matches_from(args).expect("test flags parse");
        RawConfig::from_matches(&m)
    }
}

/// Reads the files of a ConfigMap volume: one file per key. Keys that are
/// not operator options (the ConfigMap is shared with agents) are skipped,
/// as are the `..data` symlink bookkeeping entries.
/// One value read from a config directory: option name, value, file.
type ConfigDirEntry = (&'static str, (String, PathBuf));

fn read_config_dir(dir: &Path) -> Result<Vec<ConfigDirEntry>, ConfigError> {
    let err = |reason: String| ConfigError::ConfigDir { path: dir.to_path_buf(), reason };
    let entries = std::fs::read_dir(dir).map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| err(e.to_string()))?;
        let file_name = entry.file_name();
        let Some(key) = file_name.to_str() else { continue };
        let Some(o) = OPTIONS.iter().find(|o| o.name == key && o.name != "config-dir") else {
            continue;
        };
        let path = entry.path();
        if path.is_dir() {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        out.push((o.name, (normalize(o, &text), path)));
    }
    Ok(out)
}

/// A ConfigMap value as a flag value: trimmed; lists space-separated in the
/// ConfigMap become comma-separated.
fn normalize(o: &OptSpec, text: &str) -> String {
    let value = text.trim();
    match o.kind {
        Kind::List => value.split_whitespace().collect::<Vec<_>>().join(","),
        _ => value.to_string(),
    }
}

/// The clap command: one `--<name>` per option, each with its env variable.
pub fn command() -> Command {
    let mut cmd = Command::new("cilium-operator")
        .about("Cluster-wide control plane of Cilium (a stand-in for cilium-operator)")
        .version(env!("CARGO_PKG_VERSION"))
        // As Go's flag package: a repeated option keeps its last value.
        .args_override_self(true)
        .subcommand(
            Command::new("crdgen")
                .about("Write the CRD manifests generated from the Rust types")
                .arg(Arg::new("output-dir").long("output-dir").default_value("crds").help("Directory to write into")),
        );
    for o in OPTIONS {
        let mut arg = Arg::new(o.name)
            .long(o.name)
            .env(env_name(o.name))
            .help(o.help)
            .default_value(o.default)
            .hide_env_values(true);
        if o.kind == Kind::Bool {
            arg = arg.num_args(0..=1).require_equals(true).default_missing_value("true");
        }
        cmd = cmd.arg(arg.action(ArgAction::Set));
    }
    cmd
}

/// How identities are allocated and where GC looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityAllocationMode {
    Crd,
    Kvstore,
    DoubleWriteReadKvstore,
    DoubleWriteReadCrd,
}

impl IdentityAllocationMode {
    pub const ALL: [(&'static str, IdentityAllocationMode); 4] = [
        ("crd", IdentityAllocationMode::Crd),
        ("kvstore", IdentityAllocationMode::Kvstore),
        ("doublewrite-readkvstore", IdentityAllocationMode::DoubleWriteReadKvstore),
        ("doublewrite-readcrd", IdentityAllocationMode::DoubleWriteReadCrd),
    ];

    pub fn as_str(self) -> &'static str {
        Self::ALL.iter().find(|(_, m)| *m == self).map(|(s, _)| *s).unwrap_or("crd")
    }
}

/// One family's cluster pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    pub cidrs: Vec<Cidr>,
    pub mask_size: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Leader-election timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaderElectionConfig {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub kubeconfig: Option<PathBuf>,
    pub namespace: String,
    pub cluster_name: String,
    /// `enable-node-selector-labels`: fromNodes/toNodes policies are valid.
    pub node_selector_labels: bool,
    pub cluster_id: u32,
    pub max_connected_clusters: u32,
    pub identity_allocation_mode: IdentityAllocationMode,
    pub ipv4_pool: Option<PoolConfig>,
    pub ipv6_pool: Option<PoolConfig>,
    pub identity_gc_interval: Duration,
    pub identity_heartbeat_timeout: Duration,
    pub identity_gc_rate_interval: Duration,
    pub identity_gc_rate_limit: u64,
    pub identity_space_pressure_threshold: f64,
    pub nodes_gc_interval: Duration,
    pub endpoint_gc_interval: Duration,
    /// Node taints and the CiliumIsUp condition (upstream's node taint
    /// duty).
    pub node_taints: NodeTaintConfig,
    /// Seconds between unmanaged-pod restarts (0: off) and which pods.
    pub unmanaged_pod_watcher_interval: Duration,
    pub pod_restart_selector: String,
    pub health_addr: String,
    pub metrics_addr: Option<String>,
    pub leader_election: LeaderElectionConfig,
    /// etcd endpoints when `--kvstore=etcd`.
    pub kvstore: Option<KvstoreConfig>,
    pub kvstore_heartbeat_interval: Duration,
    pub double_write_reporter_interval: Duration,
    pub log_format: LogFormat,
    pub debug: bool,
}

/// Where the kvstore (etcd) is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvstoreConfig {
    pub endpoints: Vec<String>,
}

impl Config {
    /// Validates every value; the first refused one is the error.
    pub fn from_raw(raw: &RawConfig) -> Result<Config, ConfigError> {
        let v = Validator { raw };
        let cluster_id = v.int("cluster-id", 0, 511)? as u32;
        let max_connected_clusters = v.one_of("max-connected-clusters", &[("255", 255u32), ("511", 511)])?;
        let max_id = if max_connected_clusters == 255 { 255 } else { 511 };
        if cluster_id > max_id {
            return Err(v.invalid(
                "cluster-id",
                format!("must be at most {max_id} with max-connected-clusters {max_connected_clusters}"),
            ));
        }
        let ipam: &str = v.one_of("ipam", &[("cluster-pool", "cluster-pool")])?;
        let _ = ipam;
        let enable_ipv4 = v.bool("enable-ipv4")?;
        let enable_ipv6 = v.bool("enable-ipv6")?;
        let ipv4_pool = v.pool(Family::V4, "cluster-pool-ipv4-cidr", "cluster-pool-ipv4-mask-size", enable_ipv4)?;
        let ipv6_pool = v.pool(Family::V6, "cluster-pool-ipv6-cidr", "cluster-pool-ipv6-mask-size", enable_ipv6)?;
        let leader_election = LeaderElectionConfig {
            lease_duration: v.duration("leader-election-lease-duration")?,
            renew_deadline: v.duration("leader-election-renew-deadline")?,
            retry_period: v.duration("leader-election-retry-period")?,
        };
        if leader_election.renew_deadline >= leader_election.lease_duration {
            return Err(v.invalid(
                "leader-election-renew-deadline",
                "must be shorter than --leader-election-lease-duration".into(),
            ));
        }
        if leader_election.retry_period.is_zero() || leader_election.retry_period >= leader_election.renew_deadline {
            return Err(v.invalid(
                "leader-election-retry-period",
                "must be positive and shorter than --leader-election-renew-deadline".into(),
            ));
        }
        let enable_metrics = v.bool("enable-metrics")?;
        let non_empty = |name: &'static str| -> Result<String, ConfigError> {
            let s = v.raw.get(name).0.trim().to_string();
            if s.is_empty() { Err(v.invalid(name, "must not be empty".into())) } else { Ok(s) }
        };
        let kubeconfig = v.raw.get("k8s-kubeconfig-path").0.trim();
        let identity_allocation_mode = v.one_of("identity-allocation-mode", &IdentityAllocationMode::ALL)?;
        let kvstore = v.kvstore()?;
        if kvstore.is_none() && identity_allocation_mode != IdentityAllocationMode::Crd {
            return Err(v.invalid(
                "identity-allocation-mode",
                "needs a kvstore: set --kvstore=etcd and --kvstore-opt=etcd.address=<url> or etcd.config=<file>".into(),
            ));
        }
        Ok(Config {
            kubeconfig: (!kubeconfig.is_empty()).then(|| PathBuf::from(kubeconfig)),
            namespace: non_empty("k8s-namespace")?,
            cluster_name: non_empty("cluster-name")?,
            node_selector_labels: v.bool("enable-node-selector-labels")?,
            cluster_id,
            max_connected_clusters,
            identity_allocation_mode,
            ipv4_pool,
            ipv6_pool,
            identity_gc_interval: v.duration("identity-gc-interval")?,
            identity_heartbeat_timeout: v.duration("identity-heartbeat-timeout")?,
            identity_gc_rate_interval: v.positive_duration("identity-gc-rate-interval")?,
            identity_gc_rate_limit: v.int("identity-gc-rate-limit", 1, u32::MAX as i64)? as u64,
            identity_space_pressure_threshold: v.fraction("identity-space-pressure-threshold")?,
            nodes_gc_interval: v.positive_duration("nodes-gc-interval")?,
            endpoint_gc_interval: v.duration("cilium-endpoint-gc-interval")?,
            node_taints: NodeTaintConfig {
                remove_taint: v.bool("remove-cilium-node-taints")?,
                set_taint: v.bool("set-cilium-node-taints")?,
                set_is_up_condition: v.bool("set-cilium-is-up-condition")?,
                taint_key: non_empty("agent-not-ready-taint-key")?,
                pod_labels: v.raw.get("cilium-pod-labels").0.trim().to_string(),
                pod_namespace: match v.raw.get("cilium-pod-namespace").0.trim() {
                    "" => non_empty("k8s-namespace")?,
                    ns => ns.to_string(),
                },
            },
            unmanaged_pod_watcher_interval: Duration::from_secs(v.int(
                "unmanaged-pod-watcher-interval",
                0,
                365 * 24 * 3600,
            )? as u64),
            pod_restart_selector: v.raw.get("pod-restart-selector").0.trim().to_string(),
            health_addr: v.addr("operator-api-serve-addr")?,
            metrics_addr: if enable_metrics { Some(v.addr("operator-prometheus-serve-addr")?) } else { None },
            leader_election,
            kvstore,
            kvstore_heartbeat_interval: v.positive_duration("kvstore-heartbeat-interval")?,
            double_write_reporter_interval: v.positive_duration("double-write-metric-reporter-interval")?,
            log_format: v.one_of("log-format", &[("text", LogFormat::Text), ("json", LogFormat::Json)])?,
            debug: v.bool("debug")?,
        })
    }
}

/// The node taint duty's settings (upstream names in comments).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeTaintConfig {
    /// `remove-cilium-node-taints`.
    pub remove_taint: bool,
    /// `set-cilium-node-taints`.
    pub set_taint: bool,
    /// `set-cilium-is-up-condition`.
    pub set_is_up_condition: bool,
    /// `agent-not-ready-taint-key`.
    pub taint_key: String,
    /// `cilium-pod-labels`, a label selector.
    pub pod_labels: String,
    /// `cilium-pod-namespace` (or the operator's namespace).
    pub pod_namespace: String,
}

struct Validator<'a> {
    raw: &'a RawConfig,
}

impl Validator<'_> {
    fn invalid(&self, name: &'static str, reason: String) -> ConfigError {
        let (value, source) = self.raw.get(name);
        ConfigError::Invalid { name, value: value.to_string(), origin: source.clone(), reason }
    }

    fn duration(&self, name: &'static str) -> Result<Duration, ConfigError> {
        duration::parse(self.raw.get(name).0)
            .map_err(|e| self.invalid(name, format!("{e}; expected a duration such as 30s, 15m or 1h30m")))
    }

    fn positive_duration(&self, name: &'static str) -> Result<Duration, ConfigError> {
        let d = self.duration(name)?;
        if d.is_zero() {
            return Err(self.invalid(name, "must be greater than zero".into()));
        }
        Ok(d)
    }

    fn int(&self, name: &'static str, min: i64, max: i64) -> Result<i64, ConfigError> {
        let n: i64 = self.raw.get(name).0.trim().parse().map_err(|_| self.invalid(name, "not an integer".into()))?;
        if n < min || n > max {
            return Err(self.invalid(name, format!("must be between {min} and {max}")));
        }
        Ok(n)
    }

    fn fraction(&self, name: &'static str) -> Result<f64, ConfigError> {
        let f: f64 = self.raw.get(name).0.trim().parse().map_err(|_| self.invalid(name, "not a number".into()))?;
        if !(f > 0.0 && f <= 1.0) {
            return Err(self.invalid(name, "must be greater than 0 and at most 1".into()));
        }
        Ok(f)
    }

    fn bool(&self, name: &'static str) -> Result<bool, ConfigError> {
        match self.raw.get(name).0.trim() {
            "true" | "1" | "t" | "T" | "TRUE" | "True" => Ok(true),
            "false" | "0" | "f" | "F" | "FALSE" | "False" => Ok(false),
            _ => Err(self.invalid(name, "expected true or false".into())),
        }
    }

    fn one_of<T: Copy>(&self, name: &'static str, choices: &[(&str, T)]) -> Result<T, ConfigError> {
        let value = self.raw.get(name).0.trim();
        choices.iter().find(|(s, _)| *s == value).map(|(_, t)| *t).ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(s, _)| *s).collect();
            self.invalid(name, format!("must be one of {}", names.join(", ")))
        })
    }

    fn kvstore(&self) -> Result<Option<KvstoreConfig>, ConfigError> {
        match self.raw.get("kvstore").0.trim() {
            "" => return Ok(None),
            "etcd" => {}
            _ => return Err(self.invalid("kvstore", "must be empty or etcd".into())),
        }
        let mut endpoints = Vec::new();
        for opt in self.raw.get("kvstore-opt").0.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match opt.split_once('=') {
                Some(("etcd.address", addr)) => endpoints.extend(addr.split(';').map(|a| a.trim().to_string())),
                Some(("etcd.config", path)) => endpoints.extend(
                    etcd_config_endpoints(Path::new(path))
                        .map_err(|e| self.invalid("kvstore-opt", format!("etcd.config {path}: {e}")))?,
                ),
                _ => {
                    return Err(self
                        .invalid("kvstore-opt", format!("unknown option {opt:?} (use etcd.address or etcd.config)")));
                }
            }
        }
        endpoints.retain(|e| !e.is_empty());
        if endpoints.is_empty() {
            return Err(
                self.invalid("kvstore-opt", "--kvstore=etcd needs etcd.address=<url> or etcd.config=<file>".into())
            );
        }
        if let Some(bad) = endpoints.iter().find(|e| !(e.starts_with("http://") || e.starts_with("https://"))) {
            return Err(
                self.invalid("kvstore-opt", format!("etcd endpoint {bad:?} must start with http:// or https://"))
            );
        }
        Ok(Some(KvstoreConfig { endpoints }))
    }

    fn addr(&self, name: &'static str) -> Result<String, ConfigError> {
        let value = self.raw.get(name).0.trim();
        let (host, port) = value
            .rsplit_once(':')
            .ok_or_else(|| self.invalid(name, "expected host:port, e.g. localhost:9234 or :9963".into()))?;
        port.parse::<u16>().map_err(|_| self.invalid(name, format!("bad port {port:?}")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = match host {
            "" => "0.0.0.0",
            "localhost" => "127.0.0.1",
            h => h,
        };
        let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
        Ok(format!("{host}:{port}"))
    }

    fn pool(
        &self,
        family: Family,
        cidr_name: &'static str,
        mask_name: &'static str,
        enabled: bool,
    ) -> Result<Option<PoolConfig>, ConfigError> {
        let mut cidrs = Vec::new();
        for item in self.raw.get(cidr_name).0.split([',', ' ']).map(str::trim).filter(|s| !s.is_empty()) {
            let c: Cidr = item.parse().map_err(|e: cilium_ipam::CidrError| self.invalid(cidr_name, e.to_string()))?;
            cidrs.push(c);
        }
        let mask_size = self.int(mask_name, 1, family.bits() as i64)? as u8;
        if !enabled {
            return Ok(None);
        }
        if cidrs.is_empty() {
            let flag = if family == Family::V4 { "enable-ipv4" } else { "enable-ipv6" };
            return Err(self.invalid(
                cidr_name,
                format!("at least one {family} CIDR is required with --ipam=cluster-pool and --{flag}"),
            ));
        }
        cilium_ipam::validate_pools(family, &cidrs, mask_size).map_err(|e| match e {
            cilium_ipam::CidrError::MaskSize { .. } => self.invalid(mask_name, e.to_string()),
            _ => self.invalid(cidr_name, e.to_string()),
        })?;
        Ok(Some(PoolConfig { cidrs, mask_size }))
    }
}

/// The `endpoints` list of an etcd client config file (upstream's
/// `etcd.config` format: YAML with `endpoints:`).
fn etcd_config_endpoints(path: &Path) -> Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    struct EtcdConfig {
        #[serde(default)]
        endpoints: Vec<String>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let cfg: EtcdConfig = serde_saphyr::from_str(&text).map_err(|e| e.to_string())?;
    Ok(cfg.endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut all = vec![("cluster-pool-ipv4-cidr", "10.0.0.0/8")];
        all.extend_from_slice(pairs);
        Config::from_raw(&RawConfig::from_pairs(&all)?)
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        cfg(pairs).expect_err("config should be refused").to_string()
    }

    #[test]
    fn upstream_defaults() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.identity_allocation_mode, IdentityAllocationMode::Crd);
        assert_eq!(c.identity_gc_interval, Duration::from_secs(15 * 60));
        assert_eq!(c.identity_heartbeat_timeout, Duration::from_secs(30 * 60));
        assert_eq!(c.identity_gc_rate_interval, Duration::from_secs(60));
        assert_eq!(c.identity_gc_rate_limit, 2500);
        assert_eq!(c.nodes_gc_interval, Duration::from_secs(300));
        assert_eq!(c.identity_space_pressure_threshold, 0.9);
        assert_eq!(c.endpoint_gc_interval, Duration::from_secs(300));
        assert_eq!(c.ipv4_pool.as_ref().unwrap().mask_size, 24);
        assert_eq!(c.ipv6_pool, None);
        assert_eq!(c.health_addr, "127.0.0.1:9234");
        assert_eq!(c.metrics_addr.as_deref(), Some("0.0.0.0:9963"));
        assert_eq!(c.namespace, "kube-system");
        assert_eq!(
            c.leader_election,
            LeaderElectionConfig {
                lease_duration: Duration::from_secs(15),
                renew_deadline: Duration::from_secs(10),
                retry_period: Duration::from_secs(2),
            }
        );
    }

    #[test]
    fn bad_values_name_flag_and_value() {
        let e = err(&[("identity-allocation-mode", "etcd")]);
        assert!(
            e.contains("--identity-allocation-mode") && e.contains("\"etcd\"") && e.contains("doublewrite-readcrd"),
            "{e}"
        );
        let e = err(&[("cluster-pool-ipv4-cidr", "10.0.0.0/33")]);
        assert!(e.contains("--cluster-pool-ipv4-cidr") && e.contains("10.0.0.0/33"), "{e}");
        let e = err(&[("cluster-pool-ipv4-cidr", "10.0.0.0/8,10.1.0.0/16")]);
        assert!(e.contains("overlaps"), "{e}");
        let e = err(&[("cluster-pool-ipv4-cidr", "fd00::/104")]);
        assert!(e.contains("not an IPv4 CIDR"), "{e}");
        let e = err(&[("identity-gc-interval", "15 minutes")]);
        assert!(e.contains("--identity-gc-interval") && e.contains("15 minutes"), "{e}");
        let e = err(&[("cluster-pool-ipv4-mask-size", "4")]);
        assert!(e.contains("--cluster-pool-ipv4-mask-size"), "{e}");
        let e = err(&[("leader-election-renew-deadline", "20s")]);
        assert!(e.contains("shorter than"), "{e}");
        let e = err(&[("enable-ipv6", "true")]);
        assert!(e.contains("--cluster-pool-ipv6-cidr"), "{e}");
        let e = err(&[("identity-space-pressure-threshold", "1.5")]);
        assert!(e.contains("--identity-space-pressure-threshold"), "{e}");
        let e = err(&[("operator-prometheus-serve-addr", "9963")]);
        assert!(e.contains("host:port"), "{e}");
        assert_eq!(e.lines().count(), 1);
    }

    #[test]
    fn config_dir_below_flags_and_env() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("identity-gc-interval"), "20m\n").unwrap();
        std::fs::write(dir.path().join("cluster-pool-ipv4-cidr"), "10.0.0.0/16 10.1.0.0/16").unwrap();
        std::fs::write(dir.path().join("nodes-gc-interval"), "1m").unwrap();
        std::fs::write(dir.path().join("some-agent-only-key"), "whatever").unwrap();
        let d = dir.path().to_str().unwrap();
        let raw = RawConfig::from_pairs(&[("config-dir", d), ("nodes-gc-interval", "2m")]).unwrap();
        let c = Config::from_raw(&raw).unwrap();
        assert_eq!(c.identity_gc_interval, Duration::from_secs(20 * 60));
        assert_eq!(c.nodes_gc_interval, Duration::from_secs(120), "flag beats config dir");
        assert_eq!(c.ipv4_pool.unwrap().cidrs.len(), 2);
        assert!(matches!(raw.get("identity-gc-interval").1, Source::ConfigDir(_)));

        std::fs::write(dir.path().join("identity-allocation-mode"), "bogus").unwrap();
        let raw = RawConfig::from_pairs(&[("config-dir", d)]).unwrap();
        let e = Config::from_raw(&raw).unwrap_err().to_string();
        assert!(e.contains("config file") && e.contains("identity-allocation-mode") && e.contains("bogus"), "{e}");
    }

    #[test]
    fn kvstore_options() {
        assert_eq!(cfg(&[]).unwrap().kvstore, None);
        let c = cfg(&[("kvstore", "etcd"), ("kvstore-opt", "etcd.address=http://127.0.0.1:2379")]).unwrap();
        assert_eq!(c.kvstore.unwrap().endpoints, vec!["http://127.0.0.1:2379"]);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("etcd.config");
        std::fs::write(&f, "endpoints:\n- http://10.0.0.1:2379\n- http://10.0.0.2:2379\n").unwrap();
        let opt = format!("etcd.config={}", f.display());
        let c = cfg(&[("kvstore", "etcd"), ("kvstore-opt", &opt)]).unwrap();
        assert_eq!(c.kvstore.unwrap().endpoints.len(), 2);
        assert!(err(&[("kvstore", "consul")]).contains("--kvstore"));
        assert!(err(&[("kvstore", "etcd")]).contains("--kvstore-opt"));
        assert!(err(&[("kvstore", "etcd"), ("kvstore-opt", "etcd.address=127.0.0.1:2379")]).contains("http://"));
        let e = err(&[("identity-allocation-mode", "kvstore")]);
        assert!(e.contains("--identity-allocation-mode") && e.contains("--kvstore=etcd"), "{e}");
    }

    #[test]
    fn config_map_data_as_the_operator_sees_it() {
        let data: BTreeMap<String, String> = [
            ("cluster-pool-ipv4-cidr", "10.0.0.0/16 10.1.0.0/16"),
            ("identity-allocation-mode", "kvstore"),
            ("kvstore", "etcd"),
            ("kvstore-opt", "etcd.address=http://127.0.0.1:2379"),
            ("enable-l7-proxy", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let raw = RawConfig::from_config_map("kube-system/cilium-config", &data);
        let c = Config::from_raw(&raw).unwrap();
        assert_eq!(c.ipv4_pool.unwrap().cidrs.len(), 2);
        assert_eq!(c.identity_allocation_mode, IdentityAllocationMode::Kvstore);
        assert_eq!(c.identity_gc_interval, Duration::from_secs(15 * 60), "absent keys keep the default");
        let mut bad = data.clone();
        bad.insert("identity-gc-interval".into(), "soon".into());
        let e = Config::from_raw(&RawConfig::from_config_map("kube-system/cilium-config", &bad)).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("ConfigMap kube-system/cilium-config key identity-gc-interval") && e.contains("soon"),
            "{e}"
        );
    }

    #[test]
    fn missing_config_dir_is_an_error() {
        let e = RawConfig::from_pairs(&[("config-dir", "/nonexistent/cilium-config")]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/cilium-config"));
    }
}
