//! The operator's one Prometheus registry, prefixed `cilium_operator`. Each
//! duty registers its metrics in a sub-registry of its own.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
}

/// Metrics of the operator process itself.
#[derive(Clone, Default)]
pub struct ProcessMetrics {
    /// 1 while this replica holds the leader lease.
    pub is_leader: Gauge,
    /// Always 1, labelled with the version (a gauge, not an OpenMetrics
    /// `info`, so that promtool 2.42 can parse it).
    pub build_info: Family<BuildLabels, Gauge>,
    /// Seconds since the Unix epoch when the CRDs were last confirmed
    /// Established.
    pub crds_established_time: Gauge<f64, AtomicU64>,
    /// Objects the watch caches skipped because they do not decode, by
    /// kind (counted each time one is listed or changed).
    pub malformed_objects: Family<KindLabels, Counter>,
}

impl ProcessMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("is_leader", "Whether this replica is the leader (1) or not (0)", self.is_leader.clone());
        registry.register(
            "build_info",
            "Build information of the running operator (always 1)",
            self.build_info.clone(),
        );
        registry.register(
            "crds_established_time_seconds",
            "Unix time when the operator last confirmed its CRDs Established",
            self.crds_established_time.clone(),
        );
        registry.register(
            "malformed_objects",
            "Objects skipped by the watch caches because they cannot be decoded, by kind",
            self.malformed_objects.clone(),
        );
        self.build_info.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION").into() }).set(1);
        // Every kind the operator decodes starts at 0: the series exist
        // before the first bad object, so rate() and dashboards see them.
        for kind in ["CiliumEndpoint", "CiliumIdentity", "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"] {
            let _ = self.malformed_objects.get_or_create(&KindLabels { kind: kind.into() });
        }
    }
}

/// Everything the operator exports.
pub struct Metrics {
    pub registry: Arc<Registry>,
    pub process: ProcessMetrics,
    pub ipam: crate::ipam::IpamMetrics,
    pub endpoint_gc: crate::endpoint_gc::EndpointGcMetrics,
    pub identity_gc: crate::identity_gc::IdentityGcMetrics,
    pub kvstore: crate::kvstore::KvstoreMetrics,
    pub doublewrite: crate::doublewrite::DoubleWriteMetrics,
    pub unmanaged_pods: crate::unmanaged_pods::UnmanagedPodsMetrics,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cilium_operator");
        let process = ProcessMetrics::default();
        process.register(&mut registry);
        let ipam = crate::ipam::IpamMetrics::default();
        ipam.register(&mut registry);
        let endpoint_gc = crate::endpoint_gc::EndpointGcMetrics::default();
        endpoint_gc.register(&mut registry);
        let identity_gc = crate::identity_gc::IdentityGcMetrics::default();
        identity_gc.register(&mut registry);
        let kvstore = crate::kvstore::KvstoreMetrics::default();
        kvstore.register(&mut registry);
        let doublewrite = crate::doublewrite::DoubleWriteMetrics::default();
        doublewrite.register(&mut registry);
        let unmanaged_pods = crate::unmanaged_pods::UnmanagedPodsMetrics::default();
        unmanaged_pods.register(&mut registry);
        Metrics {
            registry: Arc::new(registry),
            process,
            ipam,
            endpoint_gc,
            identity_gc,
            kvstore,
            doublewrite,
            unmanaged_pods,
        }
    }

    /// Counts, and logs, an object a watch cache skipped.
    pub fn malformed(&self, kind: &str, bad: &kube::core::error_boundary::InvalidObject) {
        self.process.malformed_objects.get_or_create(&KindLabels { kind: kind.into() }).inc();
        tracing::warn!(kind, name = %cilium_crds::guard::name_of(bad), error = %bad.error, "skipping an object that cannot be decoded");
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_uses_upstream_namespace() {
        let m = Metrics::new();
        m.process.is_leader.set(1);
        let text = m.encode();
        assert!(text.contains("cilium_operator_is_leader 1"), "{text}");
        assert!(text.contains("cilium_operator_build_info{version=\""), "{text}");
        assert!(text.trim_end().ends_with("# EOF"));
        m.identity_gc.space_size.set(65280);
        let text = m.encode();
        assert!(text.contains("cilium_operator_identity_space_size 65280"), "{text}");
    }
}
