//! Cluster-pool IPAM: assigns `spec.ipam.podCIDRs` to CiliumNodes.
//!
//! One task owns the allocators and consumes the CiliumNode watch in order:
//! 1. the initial list is read completely and every CIDR nodes already hold
//!    is re-occupied (oldest node first, so the older holder of a duplicate
//!    keeps it); nothing new is allocated before that;
//! 2. then each node without pod CIDRs gets one per enabled family (IPv4
//!    first), written with server-side apply and the node's resourceVersion
//!    as precondition, so a node that changed meanwhile is never
//!    overwritten;
//! 3. a deleted node's CIDRs are released and nodes waiting on a full pool
//!    are retried.
//!
//! A node holding a CIDR outside every pool, or one another node holds, gets
//! a precise error in `status.ipam.operator-status.error` and is never
//! silently given another. Exhaustion is loud: `allocator full` in status,
//! an Event, a warning log and a metric.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;

use cilium_crds::CiliumNode;
use cilium_ipam::{AllocError, Book, Cidr, CidrAllocator, Decision, Family};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::DynamicObject;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as MetricFamily;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::run::Context;

/// Field manager of `spec.ipam.podCIDRs` writes.
pub const FIELD_MANAGER: &str = "cilium-operator-ipam";
/// Field manager of `status.ipam.operator-status` writes.
pub const STATUS_FIELD_MANAGER: &str = "cilium-operator-ipam-status";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
    pub family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabels {
    pub family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// Metrics of the `ipam` sub-registry (`cilium_operator_ipam_*`).
#[derive(Clone, Default)]
pub struct IpamMetrics {
    /// Pod CIDRs a pool can hand out.
    pub pool_capacity: MetricFamily<PoolLabels, Gauge<f64, AtomicU64>>,
    /// Pod CIDRs of a pool held by nodes.
    pub pool_used: MetricFamily<PoolLabels, Gauge<f64, AtomicU64>>,
    /// Pod CIDRs of a pool still free.
    pub pool_available: MetricFamily<PoolLabels, Gauge<f64, AtomicU64>>,
    /// Allocation attempts that found every pool of the family full.
    pub exhausted: MetricFamily<FamilyLabels, Counter>,
    /// Nodes waiting for a pod CIDR because the pools are full.
    pub nodes_waiting: Gauge,
    /// Pod CIDRs assigned to nodes.
    pub allocations: Counter,
    /// Pod CIDRs released by deleted nodes.
    pub releases: Counter,
    /// Nodes whose pod CIDRs were refused, by reason.
    pub node_errors: MetricFamily<ReasonLabels, Counter>,
    /// CiliumNode objects that could not be decoded (skipped).
    pub malformed_nodes: Counter,
    /// Nodes deleted by CiliumNode GC.
    pub nodes_gc_deleted: Counter,
}

impl IpamMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("ipam");
        r.register("pool_capacity", "Pod CIDRs the pool can hand out", self.pool_capacity.clone());
        r.register("pool_used", "Pod CIDRs of the pool held by nodes", self.pool_used.clone());
        r.register("pool_available", "Pod CIDRs of the pool still free", self.pool_available.clone());
        r.register("exhausted", "Allocations that found every pool of the family full", self.exhausted.clone());
        r.register(
            "nodes_waiting",
            "Nodes waiting for a pod CIDR because the pools are full",
            self.nodes_waiting.clone(),
        );
        r.register("allocations", "Pod CIDRs assigned to nodes", self.allocations.clone());
        r.register("releases", "Pod CIDRs released by deleted nodes", self.releases.clone());
        r.register("node_errors", "Nodes whose pod CIDRs were refused, by reason", self.node_errors.clone());
        r.register("malformed_nodes", "CiliumNode objects that could not be decoded", self.malformed_nodes.clone());
        r.register("nodes_gc_deleted", "CiliumNodes deleted because their Node is gone", self.nodes_gc_deleted.clone());
    }
}

/// The IPAM book of the operator's configuration (pools of the enabled
/// families).
pub fn book(cfg: &Config) -> Result<Book, AllocError> {
    let mut allocators = Vec::new();
    if let Some(p) = &cfg.ipv4_pool {
        allocators.push(CidrAllocator::new(Family::V4, &p.cidrs, p.mask_size)?);
    }
    if let Some(p) = &cfg.ipv6_pool {
        allocators.push(CidrAllocator::new(Family::V6, &p.cidrs, p.mask_size)?);
    }
    Ok(Book::new(allocators))
}

/// Spec writes in flight at most (allocation decisions stay sequential; only
/// the API round trips overlap).
const MAX_WRITES_IN_FLIGHT: usize = 32;

/// Runs the IPAM controller until `stop`.
pub async fn run(ctx: Context, metrics: IpamMetrics, stop: CancellationToken) -> anyhow::Result<()> {
    // Raw objects: a CiliumNode the typed decode refuses still shows pod
    // CIDRs that must stay reserved.
    let ar = kube::api::ApiResource::erase::<CiliumNode>(&());
    let api: Api<DynamicObject> = Api::all_with(ctx.client.clone(), &ar);
    let recorder = Recorder::new(
        ctx.client.clone(),
        Reporter { controller: "cilium-operator".into(), instance: std::env::var("HOSTNAME").ok() },
    );
    let mut ctl = Controller {
        book: book(&ctx.config)?,
        nodes: Api::all(ctx.client.clone()),
        recorder,
        metrics,
        store: BTreeMap::new(),
        errors: BTreeMap::new(),
        waiting: BTreeSet::new(),
        writes: JoinSet::new(),
        in_flight: BTreeSet::new(),
        requeue: BTreeSet::new(),
        retries: JoinSet::new(),
        synced: false,
    };
    ctl.publish_pool_metrics();

    let mut stream = watcher(api, watcher::Config::default()).boxed();
    // Objects seen during the current (re)list, applied only at InitDone.
    let mut initial: Vec<Seen> = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                // Writes already sent may still land: wait for them before
                // leadership is released (never abandon them mid-flight).
                let n = ctl.writes.len();
                while let Some(done) = ctl.writes.join_next().await {
                    ctl.write_done(done).await;
                }
                if n > 0 {
                    tracing::info!(writes = n, "IPAM stopped after its writes in flight finished");
                }
                return Ok(());
            }
            Some(done) = ctl.writes.join_next(), if !ctl.writes.is_empty() => ctl.write_done(done).await,
            Some(Ok(name)) = ctl.retries.join_next(), if !ctl.retries.is_empty() => {
                ctl.requeue.insert(name);
            }
            event = stream.next() => match event {
                None => return Ok(()),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "CiliumNode watch error (retrying)");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Some(Ok(watcher::Event::Init)) => initial.clear(),
                Some(Ok(watcher::Event::InitApply(obj))) => initial.push(ctl.decode(obj)),
                Some(Ok(watcher::Event::InitDone)) => ctl.resync(std::mem::take(&mut initial)).await,
                Some(Ok(watcher::Event::Apply(obj))) => {
                    let seen = ctl.decode(obj);
                    let name = seen.name.clone();
                    if ctl.observe(seen) {
                        ctl.reconcile(&name, ctl.synced).await;
                    }
                }
                Some(Ok(watcher::Event::Delete(obj))) => {
                    let seen = ctl.decode(obj);
                    ctl.store.remove(&seen.name);
                    if ctl.node_deleted(&seen.name, &seen.uid) {
                        // Freed CIDRs: retry the nodes waiting on a full pool.
                        ctl.requeue.extend(ctl.waiting.iter().cloned());
                    }
                }
            },
        }
        for name in std::mem::take(&mut ctl.requeue) {
            ctl.reconcile(&name, ctl.synced).await;
        }
    }
}

/// What IPAM keeps of a CiliumNode: identity, version, timestamps, pod
/// CIDRs and the operator's own status error. Addresses, cloud sections,
/// labels, annotations and managedFields are dropped on arrival.
fn trim(n: CiliumNode) -> CiliumNode {
    let m = n.metadata;
    let operator_status = n.status.and_then(|s| s.ipam).and_then(|i| i.operator_status);
    CiliumNode {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: m.name,
            uid: m.uid,
            resource_version: m.resource_version,
            creation_timestamp: m.creation_timestamp,
            deletion_timestamp: m.deletion_timestamp,
            ..Default::default()
        },
        spec: cilium_crds::node::NodeSpec {
            ipam: n.spec.ipam.map(|i| cilium_crds::node::IpamSpec { pod_cidrs: i.pod_cidrs, ..Default::default() }),
            ..Default::default()
        },
        status: operator_status.map(|o| cilium_crds::node::NodeStatus {
            ipam: Some(cilium_crds::node::IpamStatus { operator_status: Some(o), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn name_of(n: &CiliumNode) -> String {
    n.metadata.name.clone().unwrap_or_default()
}

/// A finished spec write.
struct WriteDone {
    name: String,
    uid: String,
    cidrs: Vec<Cidr>,
    /// How many of `cidrs` are newly allocated.
    new: usize,
    result: Result<(), kube::Error>,
}

/// A CiliumNode as the watch delivers it: name, uid, the pod CIDRs it
/// shows (read from the raw object), and the typed object when it decodes.
struct Seen {
    name: String,
    uid: String,
    pod_cidrs: Vec<String>,
    node: Option<CiliumNode>,
}

struct Controller {
    book: Book,
    nodes: Api<CiliumNode>,
    recorder: Recorder,
    metrics: IpamMetrics,
    /// Latest version of every CiliumNode.
    store: BTreeMap<String, CiliumNode>,
    /// Error currently reported on each node's status.
    errors: BTreeMap<String, String>,
    /// Nodes waiting because a family's pools are full.
    waiting: BTreeSet<String>,
    writes: JoinSet<WriteDone>,
    /// Nodes with a spec write in flight: decided again once it finishes.
    in_flight: BTreeSet<String>,
    /// Nodes to decide again after the current event.
    requeue: BTreeSet<String>,
    /// Delayed retries of failed writes (yield the node name).
    retries: JoinSet<String>,
    /// The first full list has been applied: allocation is allowed.
    synced: bool,
}

impl Controller {
    /// Reads a raw CiliumNode: its pod CIDRs leniently (any string of
    /// `spec.ipam.podCIDRs`), the typed object when it decodes.
    fn decode(&self, obj: DynamicObject) -> Seen {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let uid = obj.metadata.uid.clone().unwrap_or_default();
        let pod_cidrs: Vec<String> = obj.data["spec"]["ipam"]["podCIDRs"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        let typed = serde_json::to_value(&obj).and_then(serde_json::from_value::<CiliumNode>);
        let node = match typed {
            Ok(n) => Some(trim(n)),
            Err(e) => {
                self.metrics.malformed_nodes.inc();
                tracing::warn!(node = %name, error = %e, ?pod_cidrs, "malformed CiliumNode: its pod CIDRs stay reserved, nothing is written to it");
                None
            }
        };
        Seen { name, uid, pod_cidrs, node }
    }

    /// Records what a node shows (reserving it, whatever the node's state);
    /// returns whether the node is one to decide for (it decodes and is not
    /// being deleted).
    fn observe(&mut self, seen: Seen) -> bool {
        let bad = self.book.observe(&seen.name, &seen.uid, &seen.pod_cidrs);
        if !bad.is_empty() {
            tracing::warn!(node = %seen.name, entries = ?bad, "CiliumNode shows pod CIDRs that are not CIDRs");
        }
        match seen.node {
            Some(n) => {
                let live = n.metadata.deletion_timestamp.is_none();
                self.store.insert(seen.name, n);
                live
            }
            None => {
                self.store.remove(&seen.name);
                false
            }
        }
    }

    /// Applies a full (re)list: forgets nodes that vanished, records what
    /// every node shows (oldest first, so the older of two nodes showing
    /// the same CIDR keeps it), decides for each, then allocates.
    async fn resync(&mut self, mut listed: Vec<Seen>) {
        let names: BTreeSet<String> = listed.iter().map(|s| s.name.clone()).collect();
        let known: Vec<String> = self.book.holdings().map(|(n, _)| n.to_string()).collect();
        for name in known.into_iter().chain(self.store.keys().cloned().collect::<Vec<_>>()) {
            if !names.contains(&name) {
                self.store.remove(&name);
                self.node_deleted(&name, "");
            }
        }
        let ts = |s: &Seen| s.node.as_ref().and_then(|n| n.metadata.creation_timestamp.as_ref().map(|t| t.0));
        listed.sort_by(|a, b| ts(a).cmp(&ts(b)).then_with(|| a.name.cmp(&b.name)));
        let mut order = Vec::new();
        for seen in listed {
            let name = seen.name.clone();
            if self.observe(seen) {
                order.push(name);
            }
        }
        for name in &order {
            self.reconcile(name, false).await;
        }
        for name in &order {
            self.reconcile(name, true).await;
        }
        // CIDRs in use outside every pool: a pool was removed or edited.
        // Refused: those nodes keep their CIDRs, nothing is re-assigned.
        let outside: Vec<String> = self
            .errors
            .iter()
            .filter(|(_, e)| e.contains("is not inside any"))
            .map(|(n, e)| format!("{n} ({e})"))
            .collect();
        if !outside.is_empty() {
            tracing::error!(
                nodes = outside.len(),
                first = %outside[0],
                "cluster-pool configuration no longer covers pod CIDRs in use: pools can only be extended by \
                 appending; restore the removed pool CIDR (these nodes keep their CIDRs, nothing is re-assigned)"
            );
        }
        if !self.synced {
            self.synced = true;
            tracing::info!(nodes = order.len(), "IPAM: CiliumNode cache synced, allocation enabled");
        }
    }

    fn publish_pool_metrics(&self) {
        for a in self.book.allocators() {
            for u in a.usage() {
                let labels = PoolLabels { pool: u.cidr.to_string(), family: family_label(a.family()).into() };
                self.metrics.pool_capacity.get_or_create(&labels).set(u.capacity as f64);
                self.metrics.pool_used.get_or_create(&labels).set(u.used as f64);
                self.metrics.pool_available.get_or_create(&labels).set((u.capacity - u.used) as f64);
            }
        }
        self.metrics.nodes_waiting.set(self.waiting.len() as i64);
    }

    /// Forgets a deleted node (`uid` empty: whatever object had the name);
    /// returns whether it held CIDRs that are now free.
    fn node_deleted(&mut self, name: &str, uid: &str) -> bool {
        self.errors.remove(name);
        self.waiting.remove(name);
        let released = self.book.forget_uid(name, uid);
        if !released.is_empty() {
            self.metrics.releases.inc_by(released.len() as u64);
            let cidrs: Vec<String> = released.iter().map(|c| c.to_string()).collect();
            tracing::info!(node = name, ?cidrs, "released pod CIDRs of deleted CiliumNode");
        }
        self.publish_pool_metrics();
        !released.is_empty()
    }

    async fn reconcile(&mut self, name: &str, may_allocate: bool) {
        if self.in_flight.contains(name) {
            self.requeue.insert(name.to_string());
            return;
        }
        let Some(node) = self.store.get(name).cloned() else {
            return;
        };
        if node.metadata.deletion_timestamp.is_some() {
            return;
        }
        let uid = node.metadata.uid.clone().unwrap_or_default();
        let before = self.book.held(name).to_vec();
        match self.book.decide(name, may_allocate) {
            Decision::Ok => {
                self.waiting.remove(name);
                self.set_error(&node, None).await;
            }
            Decision::Assign(cidrs) => {
                self.waiting.remove(name);
                while self.writes.len() >= MAX_WRITES_IN_FLIGHT {
                    match self.writes.join_next().await {
                        Some(done) => self.write_done(done).await,
                        None => break,
                    }
                }
                let list: Vec<String> = cidrs.iter().map(|c| c.to_string()).collect();
                // The observed resourceVersion is a precondition: a node that
                // changed meanwhile is decided again, never overwritten.
                let body = cilium_crds::apply_body::<CiliumNode>(json!({
                    "metadata": { "name": name, "resourceVersion": node.metadata.resource_version },
                    "spec": { "ipam": { "podCIDRs": list } },
                }));
                let new = cidrs.iter().filter(|c| !before.contains(c)).count();
                let api = self.nodes.clone();
                let name = name.to_string();
                self.in_flight.insert(name.clone());
                self.writes.spawn(async move {
                    let result = api
                        .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
                        .await
                        .map(|_| ());
                    WriteDone { name, uid, cidrs, new, result }
                });
            }
            Decision::Refuse { error, reason } => {
                self.waiting.remove(name);
                if self.errors.get(name) != Some(&error) {
                    self.metrics.node_errors.get_or_create(&ReasonLabels { reason: reason.into() }).inc();
                    tracing::warn!(node = %name, %error, "pod CIDRs refused");
                    self.event(&node, EventType::Warning, "PodCIDRRefused", &error).await;
                }
                self.set_error(&node, Some(error)).await;
            }
            Decision::Full { family } => {
                let newly = self.waiting.insert(name.to_string());
                self.metrics.exhausted.get_or_create(&FamilyLabels { family: family_label(family).into() }).inc();
                if newly {
                    let pools: Vec<String> = self
                        .book
                        .allocators()
                        .iter()
                        .filter(|a| a.family() == family)
                        .flat_map(|a| a.pools())
                        .map(|c| c.to_string())
                        .collect();
                    let note = format!(
                        "allocator full: no free {family} pod CIDR in pools [{}]; extend cluster-pool-{}-cidr by appending a CIDR",
                        pools.join(", "),
                        if family == Family::V4 { "ipv4" } else { "ipv6" }
                    );
                    tracing::warn!(node = %name, %family, pools = ?pools, "{note}");
                    self.event(&node, EventType::Warning, "PodCIDRPoolExhausted", &note).await;
                }
                self.set_error(&node, Some(AllocError::Full.to_string())).await;
            }
        }
        self.publish_pool_metrics();
    }

    async fn write_done(&mut self, done: Result<WriteDone, tokio::task::JoinError>) {
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "pod CIDR write task failed");
                return;
            }
        };
        self.in_flight.remove(&done.name);
        match done.result {
            Ok(()) => {
                self.metrics.allocations.inc_by(done.new as u64);
                let list: Vec<String> = done.cidrs.iter().map(|c| c.to_string()).collect();
                tracing::info!(node = %done.name, pod_cidrs = ?list, "assigned pod CIDRs");
                if let Some(node) = self.store.get(&done.name).cloned() {
                    self.set_error(&node, None).await;
                }
            }
            Err(e) => {
                // Not written: give new CIDRs back (a deleted node released
                // everything already). A conflict means the node changed; it
                // is decided again from its latest version.
                self.book.abandon(&done.name, &done.uid, &done.cidrs);
                // 409/404: the watch brings the newer version (or the
                // deletion), which is decided then. Anything else: retry
                // after a pause.
                if !matches!(&e, kube::Error::Api(s) if s.code == 409 || s.code == 404) {
                    tracing::warn!(node = %done.name, error = %e, "writing pod CIDRs failed; retrying in 1s");
                    let name = done.name.clone();
                    self.retries.spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        name
                    });
                }
                self.publish_pool_metrics();
            }
        }
    }

    /// Writes (or clears) `status.ipam.operator-status.error`, only when it
    /// changes.
    async fn set_error(&mut self, node: &CiliumNode, error: Option<String>) {
        let name = name_of(node);
        let shown = node
            .status
            .as_ref()
            .and_then(|s| s.ipam.as_ref())
            .and_then(|i| i.operator_status.as_ref())
            .and_then(|o| o.error.clone())
            .filter(|e| !e.is_empty());
        if shown == error && self.errors.get(&name) == error.as_ref() {
            return;
        }
        // A JSON merge patch, not server-side apply: clearing with SSA (even
        // after taking the field over) leaves the emptied `operator-status`
        // as null, which the CRD's schema refuses (seen on 1.20 and again on
        // 1.35: "ipam.operator-status in body must be of type object").
        // `null` in a merge patch removes the key whoever wrote it (an
        // older operator, upstream's) and leaves `operator-status: {}`, as
        // upstream's own update does.
        let body = json!({ "status": { "ipam": { "operator-status": { "error": error } } } });
        let pp = PatchParams { field_manager: Some(STATUS_FIELD_MANAGER.into()), ..Default::default() };
        match self.nodes.patch_status(&name, &pp, &Patch::Merge(&body)).await {
            Ok(_) => match error {
                Some(e) => {
                    self.errors.insert(name, e);
                }
                None => {
                    self.errors.remove(&name);
                }
            },
            Err(e) => tracing::warn!(node = %name, error = %e, "writing CiliumNode IPAM status failed"),
        }
    }

    async fn event(&self, node: &CiliumNode, type_: EventType, reason: &str, note: &str) {
        // A cluster-scoped object: the reference has no namespace and the
        // Event goes to "default" (kube's recorder), as upstream's do.
        let reference = ObjectReference {
            api_version: Some(cilium_crds::API_VERSION.into()),
            kind: Some("CiliumNode".into()),
            name: node.metadata.name.clone(),
            uid: node.metadata.uid.clone(),
            resource_version: node.metadata.resource_version.clone(),
            ..Default::default()
        };
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "AllocatePodCIDR".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &reference).await {
            tracing::warn!(error = %e, "publishing Event failed");
        }
    }
}

fn family_label(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;

    fn book_of(pairs: &[(&str, &str)]) -> Book {
        book(&Config::from_raw(&RawConfig::from_pairs(pairs).unwrap()).unwrap()).unwrap()
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn c(x: &str) -> Cidr {
        x.parse().unwrap()
    }

    fn decide(b: &mut Book, node: &str, shown: &[&str], may_allocate: bool) -> Decision {
        b.observe(node, node, &s(shown));
        b.decide(node, may_allocate)
    }

    #[test]
    fn occupies_before_allocating_and_never_duplicates() {
        let mut b = book_of(&[("cluster-pool-ipv4-cidr", "10.0.0.0/30"), ("cluster-pool-ipv4-mask-size", "31")]);
        // Sync phase: n2 already holds the first subnet.
        assert_eq!(decide(&mut b, "n1", &[], false), Decision::Ok);
        assert_eq!(decide(&mut b, "n2", &["10.0.0.0/31"], false), Decision::Ok);
        // Allocation phase: n1 gets the other one, not n2's.
        assert_eq!(b.decide("n1", true), Decision::Assign(vec![c("10.0.0.2/31")]));
        assert_eq!(decide(&mut b, "n3", &[], true), Decision::Full { family: Family::V4 });
        // A node claiming another's CIDR is refused and holds nothing.
        let d = decide(&mut b, "n4", &["10.0.0.0/31"], true);
        assert!(matches!(&d, Decision::Refuse { error, reason: "duplicate" } if error.contains("node n2")), "{d:?}");
        assert_eq!(b.held("n4"), &[] as &[Cidr]);
        // n2 and n4 both gone: free again.
        assert_eq!(b.forget("n2"), vec![c("10.0.0.0/31")]);
        b.forget("n4");
        assert_eq!(b.decide("n3", true), Decision::Assign(vec![c("10.0.0.0/31")]));
    }

    #[test]
    fn refuses_cidrs_outside_every_pool() {
        let mut b = book_of(&[("cluster-pool-ipv4-cidr", "10.0.0.0/16")]);
        let d = decide(&mut b, "n1", &["192.168.0.0/24"], true);
        assert!(
            matches!(&d, Decision::Refuse { reason: "not-in-pool", error } if error.contains("192.168.0.0/24")),
            "{d:?}"
        );
        let d = decide(&mut b, "n2", &["10.0.1.0/25"], true);
        assert!(matches!(&d, Decision::Refuse { reason: "wrong-mask", .. }), "{d:?}");
        let d = decide(&mut b, "n3", &["bogus"], true);
        assert!(matches!(&d, Decision::Refuse { reason: "malformed", .. }), "{d:?}");
    }

    #[test]
    fn dual_stack_ipv4_first_and_fills_missing_family() {
        let mut b = book_of(&[
            ("cluster-pool-ipv4-cidr", "10.0.0.0/16"),
            ("enable-ipv6", "true"),
            ("cluster-pool-ipv6-cidr", "fd00::/104"),
            ("cluster-pool-ipv6-mask-size", "120"),
        ]);
        assert_eq!(decide(&mut b, "n1", &[], true), Decision::Assign(vec![c("10.0.0.0/24"), c("fd00::/120")]));
        assert_eq!(decide(&mut b, "n1", &["10.0.0.0/24", "fd00::/120"], true), Decision::Ok);
        assert_eq!(
            decide(&mut b, "n2", &["10.0.5.0/24"], true),
            Decision::Assign(vec![c("10.0.5.0/24"), c("fd00::100/120")])
        );
    }

    #[test]
    fn unshown_assignment_is_reassigned_not_leaked() {
        let mut b = book_of(&[("cluster-pool-ipv4-cidr", "10.0.0.0/23")]);
        assert_eq!(decide(&mut b, "n1", &[], true), Decision::Assign(vec![c("10.0.0.0/24")]));
        // The node does not show it yet (write in flight): same CIDR again.
        assert_eq!(b.decide("n1", true), Decision::Assign(vec![c("10.0.0.0/24")]));
        assert_eq!(b.allocators()[0].usage()[0].used, 1);
        // Someone wrote another CIDR in its place: refused as upstream
        // refuses a node changing its CIDRs; both stay reserved.
        let d = decide(&mut b, "n1", &["10.0.1.0/24"], true);
        assert!(matches!(d, Decision::Refuse { reason: "changed", .. }), "{d:?}");
        assert_eq!(decide(&mut b, "n2", &[], true), Decision::Full { family: Family::V4 });
    }

    #[test]
    fn a_refused_node_keeps_its_ranges_reserved() {
        let mut b = book_of(&[("cluster-pool-ipv4-cidr", "10.0.0.0/23")]);
        let d = decide(&mut b, "n1", &["10.0.0.0/24", "192.168.0.0/24"], true);
        assert!(matches!(d, Decision::Refuse { reason: "not-in-pool", .. }), "{d:?}");
        assert_eq!(decide(&mut b, "n2", &[], true), Decision::Assign(vec![c("10.0.1.0/24")]), "not the refused node's");
    }

    #[test]
    fn a_failed_write_gives_new_cidrs_back() {
        let mut b = book_of(&[("cluster-pool-ipv4-cidr", "10.0.0.0/23")]);
        let Decision::Assign(cidrs) = decide(&mut b, "n1", &[], true) else { panic!() };
        b.abandon("n1", "n1", &cidrs);
        assert!(!b.allocators()[0].is_allocated(&cidrs[0]));
        assert_eq!(decide(&mut b, "n2", &[], true), Decision::Assign(cidrs));
    }
}
