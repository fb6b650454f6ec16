//! What every command needs: a kube client with short timeouts, the
//! `cilium-config` ConfigMap read as the operator reads it, and (on demand)
//! an etcd client. Every failure becomes one line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use cilium_operator::config::{Config, RawConfig};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;

use crate::output::Output;

/// Name of the shared configuration ConfigMap (as the Helm chart renders it).
pub const CONFIG_MAP: &str = "cilium-config";
/// Helm's default pod CIDR pool, used when no ConfigMap exists.
const HELM_DEFAULT_POOL: &str = "10.0.0.0/8";

pub struct Ctx {
    pub client: kube::Client,
    /// Where the API server is, for error messages.
    pub server: String,
    /// Namespace of the operator, its Lease and `cilium-config`.
    pub namespace: String,
    pub config: Config,
    /// How the config was found: "kube-system/cilium-config", or why defaults.
    pub config_source: String,
    /// A refused `cilium-config` value (defaults are used instead).
    pub config_error: Option<String>,
    pub kvstore_override: Option<String>,
    pub out: Output,
}

pub struct Global {
    pub kubeconfig: Option<PathBuf>,
    pub namespace: String,
    pub kvstore_endpoint: Option<String>,
    pub timeout: Duration,
    pub out: Output,
}

impl Ctx {
    pub async fn connect(g: Global) -> anyhow::Result<Ctx> {
        let mut config = match &g.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| anyhow!("cannot read kubeconfig {}: {}", path.display(), one_line(&e.to_string())))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| anyhow!("bad kubeconfig {}: {}", path.display(), one_line(&e.to_string())))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| anyhow!("no Kubernetes configuration found (set --kubeconfig or KUBECONFIG): {e}"))?,
        };
        config.connect_timeout = Some(Duration::from_secs(5));
        config.read_timeout = Some(g.timeout);
        config.write_timeout = Some(g.timeout);
        let server = config.cluster_url.to_string();
        let client = kube::Client::try_from(config).map_err(|e| anyhow!("cannot build a client for {server}: {e}"))?;
        let mut ctx = Ctx {
            client,
            server,
            namespace: g.namespace,
            config: defaults(),
            config_source: String::new(),
            config_error: None,
            kvstore_override: g.kvstore_endpoint,
            out: g.out,
        };
        ctx.load_config().await?;
        Ok(ctx)
    }

    async fn load_config(&mut self) -> anyhow::Result<()> {
        let what = format!("{}/{CONFIG_MAP}", self.namespace);
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let found =
            api.get_opt(CONFIG_MAP).await.map_err(|e| self.kube_error(e, &format!("reading ConfigMap {what}")))?;
        let Some(cm) = found else {
            self.config_source = format!("defaults (ConfigMap {what} not found)");
            return Ok(());
        };
        let mut data = cm.data.unwrap_or_default();
        data.entry("cluster-pool-ipv4-cidr".into()).or_insert_with(|| HELM_DEFAULT_POOL.into());
        match Config::from_raw(&RawConfig::from_config_map(&what, &data)) {
            Ok(c) => {
                self.config = c;
                self.config_source = what;
            }
            Err(e) => {
                self.config_source = format!("defaults ({what} refused)");
                self.config_error = Some(e.to_string());
            }
        }
        Ok(())
    }

    /// The etcd endpoints: `--kvstore-endpoint`, else `kvstore-opt` of
    /// cilium-config; None when no kvstore is configured.
    pub fn kvstore_endpoints(&self) -> Option<Vec<String>> {
        if let Some(e) = &self.kvstore_override {
            return Some(e.split(',').map(str::to_string).collect());
        }
        self.config.kvstore.as_ref().map(|k| k.endpoints.clone())
    }

    /// Connects to etcd and proves it answers (5 s).
    pub async fn etcd(&self) -> anyhow::Result<etcd_client::Client> {
        let endpoints = self.kvstore_endpoints().ok_or_else(|| {
            anyhow!(
                "no kvstore configured: {} has no kvstore=etcd (or pass --kvstore-endpoint http://host:2379)",
                self.config_source
            )
        })?;
        connect_etcd(&endpoints).await
    }

    /// One line for a kube error, naming what was being done.
    pub fn kube_error(&self, e: kube::Error, doing: &str) -> anyhow::Error {
        match e {
            kube::Error::Api(s) => anyhow!("{doing}: {} ({} {})", s.message, s.code, s.reason),
            other => {
                anyhow!("{doing}: cannot reach the API server at {}: {}", self.server, one_line(&format!("{other:#}")))
            }
        }
    }

    /// The identity-range this cluster owns.
    pub fn range(&self) -> std::ops::RangeInclusive<u32> {
        cilium_identity::cluster_range(self.config.cluster_id, self.config.max_connected_clusters)
            .expect("validated by Config")
    }
}

pub async fn connect_etcd(endpoints: &[String]) -> anyhow::Result<etcd_client::Client> {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10));
    let joined = endpoints.join(",");
    let fail = |e: etcd_client::Error| anyhow!("cannot reach etcd at {joined}: {}", one_line(&e.to_string()));
    let mut c = tokio::time::timeout(Duration::from_secs(6), etcd_client::Client::connect(endpoints, Some(opts)))
        .await
        .map_err(|_| anyhow!("cannot reach etcd at {joined}: no answer within 6s"))?
        .map_err(fail)?;
    tokio::time::timeout(Duration::from_secs(6), c.status())
        .await
        .map_err(|_| anyhow!("cannot reach etcd at {joined}: no answer within 6s"))?
        .map_err(fail)?;
    Ok(c)
}

/// The operator's defaults with Helm's default pool.
fn defaults() -> Config {
    let data: BTreeMap<String, String> = [("cluster-pool-ipv4-cidr".to_string(), HELM_DEFAULT_POOL.to_string())].into();
    Config::from_raw(&RawConfig::from_config_map("defaults", &data)).expect("defaults are valid")
}

/// Newlines and runs of spaces collapsed: errors stay on one line.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Parses a numeric identity argument.
pub fn parse_id(s: &str) -> anyhow::Result<u32> {
    s.parse::<u32>().with_context(|| format!("invalid identity {s:?}: expected a numeric ID such as 12345"))
}
