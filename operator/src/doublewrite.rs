//! Double-write reporter: in the `doublewrite-*` identity allocation modes,
//! compares the identities of this cluster's range in the CRD and the
//! kvstore every `double-write-metric-reporter-interval` and exports
//! upstream's gauges `cilium_operator_doublewrite_{crd,kvstore,crd_only,kvstore_only}_identities`.
//! When both `*_only` gauges are zero the stores are in sync and the
//! migration can move on; that is logged.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;

use cilium_crds::CiliumIdentity;
use kube::api::{Api, ListParams};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::config::IdentityAllocationMode as Mode;
use crate::run::Context;

#[derive(Clone, Default)]
pub struct DoubleWriteMetrics {
    pub crd_identities: Gauge,
    pub kvstore_identities: Gauge,
    pub crd_only_identities: Gauge,
    pub kvstore_only_identities: Gauge,
}

impl DoubleWriteMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("doublewrite");
        r.register("crd_identities", "Identities in the CRD store", self.crd_identities.clone());
        r.register("kvstore_identities", "Identities in the kvstore", self.kvstore_identities.clone());
        r.register(
            "crd_only_identities",
            "Identities in the CRD store but not the kvstore",
            self.crd_only_identities.clone(),
        );
        r.register(
            "kvstore_only_identities",
            "Identities in the kvstore but not the CRD store",
            self.kvstore_only_identities.clone(),
        );
    }
}

/// The four gauge values from the two ID sets: (crd, kvstore, crd-only,
/// kvstore-only).
pub fn compare(crd: &BTreeSet<u32>, kv: &BTreeSet<u32>) -> (usize, usize, usize, usize) {
    (crd.len(), kv.len(), crd.difference(kv).count(), kv.difference(crd).count())
}

pub async fn run(ctx: Context, stop: CancellationToken) -> anyhow::Result<()> {
    let mode = ctx.config.identity_allocation_mode;
    if !matches!(mode, Mode::DoubleWriteReadKvstore | Mode::DoubleWriteReadCrd) {
        return Ok(());
    }
    let Some(kv) = ctx.config.kvstore.clone() else { return Ok(()) };
    let range = cilium_identity::cluster_range(ctx.config.cluster_id, ctx.config.max_connected_clusters)?;
    let mut client = crate::kvstore::connect(&kv).await?;
    let m = &ctx.metrics.doublewrite;
    let mut was_in_sync = None;
    loop {
        match (crd_ids(&ctx, &range).await, kv_ids(&mut client, &range).await) {
            (Ok(crd), Ok(kvs)) => {
                let (c, k, c_only, k_only) = compare(&crd, &kvs);
                m.crd_identities.set(c as i64);
                m.kvstore_identities.set(k as i64);
                m.crd_only_identities.set(c_only as i64);
                m.kvstore_only_identities.set(k_only as i64);
                let in_sync = c_only == 0 && k_only == 0;
                if in_sync && was_in_sync != Some(true) {
                    tracing::info!(identities = c, "double-write: CRD and kvstore identities are in sync");
                } else if !in_sync {
                    let sample: Vec<u32> = crd.symmetric_difference(&kvs).take(5).copied().collect();
                    tracing::info!(
                        crd = c,
                        kvstore = k,
                        crd_only = c_only,
                        kvstore_only = k_only,
                        ?sample,
                        "double-write: stores differ"
                    );
                }
                was_in_sync = Some(in_sync);
            }
            (Err(e), _) => tracing::warn!(error = %e, "double-write reporter: cannot list CiliumIdentities"),
            (_, Err(e)) => tracing::warn!(error = %e, "double-write reporter: cannot list kvstore identities"),
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(ctx.config.double_write_reporter_interval) => {}
        }
    }
}

async fn crd_ids(ctx: &Context, range: &RangeInclusive<u32>) -> Result<BTreeSet<u32>, kube::Error> {
    let list = Api::<CiliumIdentity>::all(ctx.client.clone()).list_metadata(&ListParams::default()).await?;
    Ok(list
        .items
        .iter()
        .filter_map(|i| i.metadata.name.as_deref()?.parse().ok())
        .filter(|id| range.contains(id))
        .collect())
}

async fn kv_ids(c: &mut etcd_client::Client, range: &RangeInclusive<u32>) -> Result<BTreeSet<u32>, etcd_client::Error> {
    let prefix = format!("{}id/", cilium_identity_alloc::kvstore::PREFIX);
    let keys = c.get(prefix.as_str(), Some(etcd_client::GetOptions::new().with_prefix().with_keys_only())).await?;
    Ok(keys
        .kvs()
        .iter()
        .filter_map(|kv| kv.key_str().ok()?.strip_prefix(&prefix)?.parse().ok())
        .filter(|id| range.contains(id))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_sets() {
        let crd: BTreeSet<u32> = [1, 2, 3].into();
        let kv: BTreeSet<u32> = [2, 3, 4, 5].into();
        assert_eq!(compare(&crd, &kv), (3, 4, 1, 2));
        assert_eq!(compare(&kv, &kv), (4, 4, 0, 0));
    }
}
