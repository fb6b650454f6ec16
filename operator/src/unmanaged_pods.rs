//! The unmanaged-pod restarter, as upstream's: every
//! `unmanaged-pod-watcher-interval` seconds (0: off), a Running pod matching
//! `pod-restart-selector` (default `k8s-app=kube-dns`), not on the host
//! network, started more than 30 s ago and without a CiliumEndpoint of its
//! namespace/name was started before Cilium managed its node: it is
//! deleted (its controller makes it again, now under Cilium), at most once
//! per pod in 5 minutes. `cilium_operator_unmanaged_pods` counts the
//! unmanaged pods the last pass saw.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cilium_crds::CiliumEndpoint;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Preconditions};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::run::Context;

/// Upstream's: a pod is restarted at most this often.
pub const MINIMAL_RESTART_INTERVAL: Duration = Duration::from_secs(300);
/// Upstream's: a pod younger than this may not have its endpoint yet.
pub const MINIMAL_AGE: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Default)]
pub struct UnmanagedPodsMetrics {
    /// Unmanaged pods the last pass saw (upstream's `unmanaged_pods`).
    pub unmanaged: Gauge,
    /// Pods deleted so that Cilium manages them.
    pub restarted: Counter,
}

impl UnmanagedPodsMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "unmanaged_pods",
            "Running pods Cilium does not manage (no CiliumEndpoint)",
            self.unmanaged.clone(),
        );
        registry.register(
            "unmanaged_pods_restarted",
            "Pods deleted so that they start again under Cilium",
            self.restarted.clone(),
        );
    }
}

/// What the restarter looks at of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    /// `namespace/name`.
    pub key: String,
    pub uid: String,
    pub running: bool,
    pub host_network: bool,
    /// Since its start (None: not started).
    pub age: Option<Duration>,
}

/// One pass, pure: (how many are unmanaged, which to delete now).
pub fn decide(
    pods: &[PodFacts],
    ceps: &BTreeSet<String>,
    restarted_ago: &BTreeMap<String, Duration>,
) -> (usize, Vec<PodFacts>) {
    let mut unmanaged = 0;
    let mut delete = Vec::new();
    for p in pods {
        if !p.running || p.host_network || ceps.contains(&p.key) {
            continue;
        }
        unmanaged += 1;
        if p.age.is_none_or(|a| a < MINIMAL_AGE) {
            continue;
        }
        if restarted_ago.get(&p.key).is_some_and(|ago| *ago < MINIMAL_RESTART_INTERVAL) {
            continue;
        }
        delete.push(p.clone());
    }
    (unmanaged, delete)
}

fn facts(p: &Pod, now: jiff::Timestamp) -> PodFacts {
    let status = p.status.as_ref();
    let age = status.and_then(|s| s.start_time.as_ref()).and_then(|t| {
        let started: jiff::Timestamp = t.0.to_string().parse().ok()?;
        now.duration_since(started).try_into().ok()
    });
    PodFacts {
        key: format!(
            "{}/{}",
            p.metadata.namespace.as_deref().unwrap_or_default(),
            p.metadata.name.as_deref().unwrap_or_default()
        ),
        uid: p.metadata.uid.clone().unwrap_or_default(),
        running: status.and_then(|s| s.phase.as_deref()) == Some("Running"),
        host_network: p.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false),
        age,
    }
}

pub async fn run(ctx: Context, stop: CancellationToken) -> anyhow::Result<()> {
    let interval = ctx.config.unmanaged_pod_watcher_interval;
    if interval.is_zero() {
        tracing::info!("unmanaged pod restarter off (unmanaged-pod-watcher-interval=0)");
        return Ok(());
    }
    let mut restarted: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
        // Upstream forgets a restart after twice the minimal interval.
        restarted.retain(|_, at| at.elapsed() < 2 * MINIMAL_RESTART_INTERVAL);
        if let Err(e) = pass(&ctx, &mut restarted).await {
            tracing::warn!(error = %e, "unmanaged pod pass failed; retrying next interval");
        }
    }
}

async fn pass(ctx: &Context, restarted: &mut BTreeMap<String, Instant>) -> kube::Result<()> {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let lp = ListParams::default().labels(&ctx.config.pod_restart_selector).fields("status.phase=Running");
    let now = jiff::Timestamp::now();
    let listed: Vec<PodFacts> = pods.list(&lp).await?.items.iter().map(|p| facts(p, now)).collect();
    // Only the endpoints of the pods in question.
    let mut ceps = BTreeSet::new();
    for p in &listed {
        let (ns, name) = p.key.split_once('/').unwrap_or_default();
        let api: Api<CiliumEndpoint> = Api::namespaced(ctx.client.clone(), ns);
        if api.get_metadata_opt(name).await?.is_some() {
            ceps.insert(p.key.clone());
        }
    }
    let ago: BTreeMap<String, Duration> = restarted.iter().map(|(k, at)| (k.clone(), at.elapsed())).collect();
    let (unmanaged, delete) = decide(&listed, &ceps, &ago);
    ctx.metrics.unmanaged_pods.unmanaged.set(unmanaged as i64);
    for p in delete {
        let (ns, name) = p.key.split_once('/').unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
        let dp = DeleteParams {
            preconditions: Some(Preconditions { uid: Some(p.uid.clone()), resource_version: None }),
            ..Default::default()
        };
        match api.delete(name, &dp).await {
            Ok(_) => {
                ctx.metrics.unmanaged_pods.restarted.inc();
                restarted.insert(p.key.clone(), Instant::now());
                tracing::info!(pod = %p.key, "restarted a pod Cilium does not manage (no CiliumEndpoint)");
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => tracing::warn!(pod = %p.key, error = %e, "restarting an unmanaged pod failed"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(key: &str, running: bool, host: bool, age: u64) -> PodFacts {
        PodFacts {
            key: key.into(),
            uid: format!("uid-{key}"),
            running,
            host_network: host,
            age: Some(Duration::from_secs(age)),
        }
    }

    #[test]
    fn restarts_old_running_pods_without_endpoint_once_per_interval() {
        let pods = vec![
            pod("kube-system/dns-a", true, false, 600),
            pod("kube-system/dns-b", true, false, 600),
            pod("kube-system/dns-young", true, false, 10),
            pod("kube-system/dns-host", true, true, 600),
            pod("kube-system/dns-pending", false, false, 600),
        ];
        let ceps: BTreeSet<String> = ["kube-system/dns-b".to_string()].into();
        let (unmanaged, delete) = decide(&pods, &ceps, &BTreeMap::new());
        assert_eq!(unmanaged, 2, "dns-a and dns-young (too young to restart yet)");
        assert_eq!(delete.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(), vec!["kube-system/dns-a"]);
        let recent: BTreeMap<String, Duration> = [("kube-system/dns-a".to_string(), Duration::from_secs(60))].into();
        assert!(decide(&pods, &ceps, &recent).1.is_empty(), "restarted a minute ago: not again");
        let old: BTreeMap<String, Duration> = [("kube-system/dns-a".to_string(), Duration::from_secs(301))].into();
        assert_eq!(decide(&pods, &ceps, &old).1.len(), 1);
    }

    #[test]
    fn pod_age_from_its_start_time() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "d", "namespace": "kube-system", "uid": "u"},
            "spec": {"containers": [], "hostNetwork": false},
            "status": {"phase": "Running", "startTime": "2026-12-01T12:00:00Z"}
        }))
        .unwrap();
        let f = facts(&p, "2026-12-01T12:01:00Z".parse().unwrap());
        assert_eq!(f.age, Some(Duration::from_secs(60)));
        assert!(f.running && !f.host_network);
        assert_eq!(f.key, "kube-system/d");
    }
}
