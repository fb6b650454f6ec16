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
use cilium_ipam::{AllocError, Cidr, CidrAllocator, Family};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::core::DeserializeGuard;
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

/// The IPAM book: allocators plus which node holds what. Pure: no I/O.
pub struct Book {
    allocators: Vec<CidrAllocator>,
    held: BTreeMap<String, Vec<Cidr>>,
}

/// What to do about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The node's CIDRs are fine and recorded.
    Ok,
    /// Write these pod CIDRs (newly allocated ones included).
    Assign(Vec<Cidr>),
    /// The node's CIDRs are refused: report this error.
    Refuse { error: String, reason: &'static str },
    /// A family's pools are full: report `allocator full`.
    Full { family: Family },
}

impl Book {
    pub fn new(cfg: &Config) -> Result<Book, AllocError> {
        let mut allocators = Vec::new();
        if let Some(p) = &cfg.ipv4_pool {
            allocators.push(CidrAllocator::new(Family::V4, &p.cidrs, p.mask_size)?);
        }
        if let Some(p) = &cfg.ipv6_pool {
            allocators.push(CidrAllocator::new(Family::V6, &p.cidrs, p.mask_size)?);
        }
        Ok(Book { allocators, held: BTreeMap::new() })
    }

    pub fn allocators(&self) -> &[CidrAllocator] {
        &self.allocators
    }

    pub fn held(&self, node: &str) -> &[Cidr] {
        self.held.get(node).map(Vec::as_slice).unwrap_or_default()
    }

    fn holder_of(&self, cidr: &Cidr) -> Option<&str> {
        self.held.iter().find(|(_, cs)| cs.contains(cidr)).map(|(n, _)| n.as_str())
    }

    fn allocator(&mut self, family: Family) -> Option<&mut CidrAllocator> {
        self.allocators.iter_mut().find(|a| a.family() == family)
    }

    /// Decides for a node showing `current` pod CIDRs. Occupies what it
    /// shows; allocates missing families only when `may_allocate`. A refused
    /// node keeps what it held before and records nothing new. CIDRs the book
    /// assigned that the node does not show yet (a write in flight, or a
    /// writer that removed them) are assigned again rather than leaked.
    pub fn decide(&mut self, node: &str, current: &[String], may_allocate: bool) -> Decision {
        let prev = self.held(node).to_vec();
        // 1. Check every CIDR the node shows, changing nothing yet.
        let mut shown: Vec<Cidr> = Vec::new();
        for raw in current {
            let cidr: Cidr = match raw.parse() {
                Ok(c) => c,
                Err(e) => {
                    let error = format!("pod CIDR {raw:?} is malformed: {e}");
                    return Decision::Refuse { error, reason: "malformed" };
                }
            };
            if prev.contains(&cidr) || shown.contains(&cidr) {
                shown.push(cidr);
                continue;
            }
            if let Some(other) = self.holder_of(&cidr) {
                let error = format!("pod CIDR {cidr} is already allocated to node {other}; not re-assigning it");
                return Decision::Refuse { error, reason: "duplicate" };
            }
            let Some(alloc) = self.allocator(cidr.family()) else {
                let error =
                    format!("pod CIDR {cidr} is {} but that family is not enabled in the operator", cidr.family());
                return Decision::Refuse { error, reason: "family-disabled" };
            };
            if let Err(e) = alloc.check_free(&cidr) {
                return Decision::Refuse { error: format!("pod CIDR {cidr} refused: {e}"), reason: e.reason() };
            }
            shown.push(cidr);
        }
        shown.dedup();
        // 2. Commit: occupy what is new.
        for c in shown.iter().filter(|c| !prev.contains(c)) {
            self.allocator(c.family()).expect("checked").occupy(c).expect("checked free");
        }
        // 3. Earlier assignments the node does not show: keep them for the
        //    families it shows nothing of, release the others.
        let mut keep = shown.clone();
        for c in prev.iter().filter(|c| !shown.contains(c)) {
            if keep.iter().any(|k| k.family() == c.family()) {
                let _ = self.allocator(c.family()).map(|a| a.release(c));
            } else {
                keep.push(*c);
            }
        }
        keep.sort_by_key(|c| c.family());
        self.held.insert(node.to_string(), keep.clone());
        let missing: Vec<Family> =
            self.allocators.iter().map(|a| a.family()).filter(|f| !keep.iter().any(|c| c.family() == *f)).collect();
        if missing.is_empty() || !may_allocate {
            return if keep.len() == shown.len() && current.len() == shown.len() {
                Decision::Ok
            } else {
                Decision::Assign(keep)
            };
        }
        let mut new = Vec::new();
        for family in missing {
            match self.allocator(family).expect("listed").allocate() {
                Ok(c) => new.push(c),
                Err(_) => {
                    for c in &new {
                        let _ = self.allocator(c.family()).expect("listed").release(c);
                    }
                    return Decision::Full { family };
                }
            }
        }
        let mut all = keep;
        all.extend(new);
        all.sort_by_key(|c| c.family());
        self.held.insert(node.to_string(), all.clone());
        Decision::Assign(all)
    }

    /// Forgets a node's CIDRs (the node was deleted, or a write failed).
    pub fn release(&mut self, node: &str) -> Vec<Cidr> {
        let cidrs = self.held.remove(node).unwrap_or_default();
        for c in &cidrs {
            if let Some(a) = self.allocator(c.family()) {
                let _ = a.release(c);
            }
        }
        cidrs
    }

    /// Undoes the allocation of `new` CIDRs for `node` after a failed write,
    /// keeping what it held before.
    pub fn rollback(&mut self, node: &str, before: &[Cidr]) {
        let now = self.held.get(node).cloned().unwrap_or_default();
        for c in now.iter().filter(|c| !before.contains(c)) {
            if let Some(a) = self.allocator(c.family()) {
                let _ = a.release(c);
            }
        }
        self.held.insert(node.to_string(), before.to_vec());
    }
}

/// Spec writes in flight at most (allocation decisions stay sequential; only
/// the API round trips overlap).
const MAX_WRITES_IN_FLIGHT: usize = 32;

/// Runs the IPAM controller until `stop`.
pub async fn run(ctx: Context, metrics: IpamMetrics, stop: CancellationToken) -> anyhow::Result<()> {
    let api: Api<DeserializeGuard<CiliumNode>> = Api::all(ctx.client.clone());
    let recorder = Recorder::new(
        ctx.client.clone(),
        Reporter { controller: "cilium-operator".into(), instance: std::env::var("HOSTNAME").ok() },
    );
    let mut ctl = Controller {
        book: Book::new(&ctx.config)?,
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
    let mut initial: Vec<CiliumNode> = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
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
                Some(Ok(watcher::Event::InitApply(obj))) => initial.extend(ctl.decode(obj)),
                Some(Ok(watcher::Event::InitDone)) => ctl.resync(std::mem::take(&mut initial)).await,
                Some(Ok(watcher::Event::Apply(obj))) => {
                    if let Some(n) = ctl.decode(obj) {
                        let name = name_of(&n);
                        ctl.store.insert(name.clone(), n);
                        ctl.reconcile(&name, ctl.synced).await;
                    }
                }
                Some(Ok(watcher::Event::Delete(obj))) => {
                    let name = match &obj.0 {
                        Ok(n) => name_of(n),
                        Err(e) => e.metadata.name.clone().unwrap_or_default(),
                    };
                    ctl.store.remove(&name);
                    if ctl.node_deleted(&name) {
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
    before: Vec<Cidr>,
    cidrs: Vec<Cidr>,
    result: Result<(), kube::Error>,
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
    fn decode(&self, obj: DeserializeGuard<CiliumNode>) -> Option<CiliumNode> {
        match obj.0 {
            Ok(n) => Some(trim(n)),
            Err(e) => {
                self.metrics.malformed_nodes.inc();
                tracing::warn!(node = e.metadata.name.as_deref().unwrap_or("?"), error = %e.error, "skipping malformed CiliumNode");
                None
            }
        }
    }

    /// Applies a full (re)list: forgets nodes that vanished, re-occupies
    /// every CIDR already held (oldest node first), then allocates.
    async fn resync(&mut self, mut listed: Vec<CiliumNode>) {
        let names: BTreeSet<String> = listed.iter().map(name_of).collect();
        let gone: Vec<String> = self.store.keys().filter(|k| !names.contains(*k)).cloned().collect();
        for name in gone {
            self.store.remove(&name);
            self.node_deleted(&name);
        }
        listed.sort_by(|a, b| {
            let ts = |n: &CiliumNode| n.metadata.creation_timestamp.as_ref().map(|t| t.0);
            ts(a).cmp(&ts(b)).then_with(|| name_of(a).cmp(&name_of(b)))
        });
        let order: Vec<String> = listed.iter().map(name_of).collect();
        self.store.extend(listed.into_iter().map(|n| (name_of(&n), n)));
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

    /// Returns whether the node held CIDRs that are now free.
    fn node_deleted(&mut self, name: &str) -> bool {
        self.errors.remove(name);
        self.waiting.remove(name);
        let released = self.book.release(name);
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
        let current = node.pod_cidrs().to_vec();
        let before = self.book.held(name).to_vec();
        match self.book.decide(name, &current, may_allocate) {
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
                let api = self.nodes.clone();
                let name = name.to_string();
                self.in_flight.insert(name.clone());
                self.writes.spawn(async move {
                    let result = api
                        .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
                        .await
                        .map(|_| ());
                    WriteDone { name, before, cidrs, result }
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
                let new = done.cidrs.iter().filter(|c| !done.before.contains(c)).count();
                self.metrics.allocations.inc_by(new as u64);
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
                if self.store.contains_key(&done.name) {
                    self.book.rollback(&done.name, &done.before);
                }
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
        // A JSON merge patch, not server-side apply: clearing with SSA empties
        // `operator-status`, which the 1.20 API server stores as null and then
        // refuses. `null` in a merge patch removes the key (no "" is written).
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
        // Events about cluster-scoped objects live in "default"; the 1.20 API
        // server insists that the reference names the Event's namespace.
        let reference = ObjectReference {
            namespace: Some("default".into()),
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

    fn book(pairs: &[(&str, &str)]) -> Book {
        Book::new(&Config::from_raw(&RawConfig::from_pairs(pairs).unwrap()).unwrap()).unwrap()
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn c(x: &str) -> Cidr {
        x.parse().unwrap()
    }

    #[test]
    fn occupies_before_allocating_and_never_duplicates() {
        let mut b = book(&[("cluster-pool-ipv4-cidr", "10.0.0.0/30"), ("cluster-pool-ipv4-mask-size", "31")]);
        // Sync phase: n2 already holds the first subnet.
        assert_eq!(b.decide("n1", &[], false), Decision::Ok);
        assert_eq!(b.decide("n2", &s(&["10.0.0.0/31"]), false), Decision::Ok);
        // Allocation phase: n1 gets the other one, not n2's.
        assert_eq!(b.decide("n1", &[], true), Decision::Assign(vec![c("10.0.0.2/31")]));
        assert_eq!(b.decide("n3", &[], true), Decision::Full { family: Family::V4 });
        // A node claiming another's CIDR is refused and records nothing.
        let d = b.decide("n4", &s(&["10.0.0.0/31"]), true);
        assert!(matches!(&d, Decision::Refuse { error, reason: "duplicate" } if error.contains("node n2")), "{d:?}");
        assert_eq!(b.held("n4"), &[] as &[Cidr]);
        // Release makes it available again.
        assert_eq!(b.release("n2"), vec![c("10.0.0.0/31")]);
        assert_eq!(b.decide("n3", &[], true), Decision::Assign(vec![c("10.0.0.0/31")]));
    }

    #[test]
    fn refuses_cidrs_outside_every_pool() {
        let mut b = book(&[("cluster-pool-ipv4-cidr", "10.0.0.0/16")]);
        let d = b.decide("n1", &s(&["192.168.0.0/24"]), true);
        assert!(
            matches!(&d, Decision::Refuse { reason: "not-in-pool", error } if error.contains("192.168.0.0/24")),
            "{d:?}"
        );
        let d = b.decide("n2", &s(&["10.0.1.0/25"]), true);
        assert!(matches!(&d, Decision::Refuse { reason: "wrong-mask", .. }), "{d:?}");
        let d = b.decide("n3", &s(&["bogus"]), true);
        assert!(matches!(&d, Decision::Refuse { reason: "malformed", .. }), "{d:?}");
    }

    #[test]
    fn dual_stack_ipv4_first_and_fills_missing_family() {
        let mut b = book(&[
            ("cluster-pool-ipv4-cidr", "10.0.0.0/16"),
            ("enable-ipv6", "true"),
            ("cluster-pool-ipv6-cidr", "fd00::/104"),
            ("cluster-pool-ipv6-mask-size", "120"),
        ]);
        assert_eq!(b.decide("n1", &[], true), Decision::Assign(vec![c("10.0.0.0/24"), c("fd00::/120")]));
        assert_eq!(b.decide("n1", &s(&["10.0.0.0/24", "fd00::/120"]), true), Decision::Ok);
        assert_eq!(
            b.decide("n2", &s(&["10.0.5.0/24"]), true),
            Decision::Assign(vec![c("10.0.5.0/24"), c("fd00::100/120")])
        );
    }

    #[test]
    fn unshown_assignment_is_reassigned_not_leaked() {
        let mut b = book(&[("cluster-pool-ipv4-cidr", "10.0.0.0/23")]);
        assert_eq!(b.decide("n1", &[], true), Decision::Assign(vec![c("10.0.0.0/24")]));
        // The node does not show it yet (write in flight): same CIDR again.
        assert_eq!(b.decide("n1", &[], true), Decision::Assign(vec![c("10.0.0.0/24")]));
        assert_eq!(b.allocators()[0].usage()[0].used, 1);
        // Someone wrote another free CIDR: ours is released, theirs kept.
        assert_eq!(b.decide("n1", &s(&["10.0.1.0/24"]), true), Decision::Ok);
        assert!(!b.allocators()[0].is_allocated(&c("10.0.0.0/24")));
        assert_eq!(b.held("n1"), &[c("10.0.1.0/24")]);
    }

    #[test]
    fn partial_refusal_occupies_nothing() {
        let mut b = book(&[("cluster-pool-ipv4-cidr", "10.0.0.0/23")]);
        let d = b.decide("n1", &s(&["10.0.0.0/24", "192.168.0.0/24"]), true);
        assert!(matches!(d, Decision::Refuse { reason: "not-in-pool", .. }), "{d:?}");
        assert!(!b.allocators()[0].is_allocated(&c("10.0.0.0/24")), "refused node leaked a CIDR");
        assert_eq!(b.decide("n2", &[], true), Decision::Assign(vec![c("10.0.0.0/24")]));
    }

    #[test]
    fn rollback_returns_new_cidrs_only() {
        let mut b = book(&[("cluster-pool-ipv4-cidr", "10.0.0.0/23")]);
        let Decision::Assign(cidrs) = b.decide("n1", &[], true) else { panic!() };
        b.rollback("n1", &[]);
        assert!(!b.allocators()[0].is_allocated(&cidrs[0]));
        assert_eq!(b.decide("n2", &[], true), Decision::Assign(cidrs));
    }
}
