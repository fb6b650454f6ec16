//! CiliumEndpoint GC: deletes CiliumEndpoints whose owner is gone or done.
//!
//! Rules (upstream's, plus the UID comparison upstream lacks, #27123):
//! - owner Pod (matched by UID, never by name) running or pending -> keep;
//!   Succeeded/Failed -> delete; no Pod with that UID -> delete. A pod
//!   re-created under the same name has a new UID, and its CEP points at it.
//! - owner CiliumNode present (by UID) -> keep; gone -> delete.
//! - no owner at all -> judged by the Pod of the same namespace and name
//!   (upstream): none -> delete.
//! - other owner kinds -> never touched.
//! - a CEP younger than one interval is never deleted (its Pod may not be in
//!   the cache yet; upstream #42413).
//!
//! Deletes carry the CEP's UID as precondition and background propagation;
//! NotFound and Conflict mean someone else already acted.
//!
//! Caches hold only what the rules read: Pod UID -> phase, CiliumNode UIDs,
//! and per CEP its owner. Pods are decoded through [`LeanPod`] (no spec, no
//! managedFields), CEPs and CiliumNodes through [`LeanObject`]. A relist
//! (API server restart, 410 Gone) replaces a cache atomically at its end, and
//! no pass runs while any cache is relisting.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use cilium_crds::{CiliumEndpoint, CiliumNode};
use futures::StreamExt;
use kube::api::{Api, DeleteParams, Preconditions, PropagationPolicy};
use kube::core::DeserializeGuard;
use kube::runtime::{WatchStreamExt, watcher};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::lean::{LeanObject, LeanPod};
use crate::run::Context;

/// Deletes in flight at most during a pass.
const DELETE_CONCURRENCY: usize = 16;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub cache: String,
}

/// Metrics of the `endpoint_gc` sub-registry.
#[derive(Clone, Default)]
pub struct EndpointGcMetrics {
    /// CEPs deleted (`success`) or whose deletion failed (`fail`).
    pub objects: Family<OutcomeLabels, Counter>,
    /// Completed GC passes.
    pub runs: Counter,
    /// Duration of the last pass.
    pub last_run_duration_seconds: Gauge<f64, AtomicU64>,
    /// Objects held per cache.
    pub cache_objects: Family<CacheLabels, Gauge>,
    /// Objects that could not be decoded (skipped).
    pub malformed_objects: Counter,
}

impl EndpointGcMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("endpoint_gc");
        r.register("objects", "CiliumEndpoints deleted by GC, by outcome", self.objects.clone());
        r.register("runs", "Completed CiliumEndpoint GC passes", self.runs.clone());
        r.register(
            "last_run_duration_seconds",
            "Duration of the last CiliumEndpoint GC pass",
            self.last_run_duration_seconds.clone(),
        );
        r.register("cache_objects", "Objects held in the endpoint GC caches", self.cache_objects.clone());
        r.register(
            "malformed_objects",
            "Objects skipped because they could not be decoded",
            self.malformed_objects.clone(),
        );
    }
}

/// A Kubernetes UID in 16 bytes (UUIDs parse exactly; anything else is
/// hashed to 128 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Uid(u128);

impl Uid {
    pub fn parse(s: &str) -> Uid {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        if hex.len() == 32
            && let Ok(v) = u128::from_str_radix(&hex, 16)
        {
            return Uid(v);
        }
        let mut a = std::collections::hash_map::DefaultHasher::new();
        (0u8, s).hash(&mut a);
        let mut b = std::collections::hash_map::DefaultHasher::new();
        (1u8, s).hash(&mut b);
        Uid(((a.finish() as u128) << 64) | b.finish() as u128)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl PodPhase {
    pub fn parse(s: Option<&str>) -> PodPhase {
        match s {
            Some("Pending") | None => PodPhase::Pending,
            Some("Running") => PodPhase::Running,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            Some(_) => PodPhase::Unknown,
        }
    }
}

/// What the cache keeps of a Pod: its phase and a hash of its namespace and
/// name (CEPs without an owner are judged by the Pod of their name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodEntry {
    pub phase: PodPhase,
    pub name: u64,
}

/// A 64-bit hash of a namespace and name.
pub fn name_hash(ns: &str, name: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (ns, name).hash(&mut h);
    h.finish()
}

/// Who owns a CEP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Pod(Uid),
    CiliumNode(Uid),
    /// No ownerReference at all: judged by the Pod of the same name.
    None,
    Other,
}

/// What a pass does with one CEP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Delete(&'static str),
    /// Not ours to judge (other owner kinds, no owner).
    Untouched,
}

/// The GC rule, pure. `pod_named`: whether a Pod with the CEP's namespace
/// and name exists (for a CEP without owner); `young`: created less than
/// one interval ago (never deleted yet: its Pod may not be in the cache,
/// upstream #42413).
pub fn decide(
    owner: Owner,
    pods: &HashMap<Uid, PodEntry>,
    cilium_nodes: &HashSet<Uid>,
    pod_named: bool,
    young: bool,
) -> Verdict {
    if young {
        return Verdict::Keep;
    }
    match owner {
        Owner::Pod(uid) => match pods.get(&uid).map(|p| p.phase) {
            None => Verdict::Delete("pod-gone"),
            Some(PodPhase::Succeeded | PodPhase::Failed) => Verdict::Delete("pod-completed"),
            Some(_) => Verdict::Keep,
        },
        Owner::CiliumNode(uid) => {
            if cilium_nodes.contains(&uid) {
                Verdict::Keep
            } else {
                Verdict::Delete("ciliumnode-gone")
            }
        }
        Owner::None if pod_named => Verdict::Keep,
        Owner::None => Verdict::Delete("no-owner-no-pod"),
        Owner::Other => Verdict::Untouched,
    }
}

fn owner_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Owner {
    if meta.owner_references.as_ref().is_none_or(Vec::is_empty) {
        return Owner::None;
    }
    for o in meta.owner_references.iter().flatten() {
        match (o.api_version.as_str(), o.kind.as_str()) {
            ("v1", "Pod") => return Owner::Pod(Uid::parse(&o.uid)),
            (v, "CiliumNode") if v.starts_with("cilium.io/") => return Owner::CiliumNode(Uid::parse(&o.uid)),
            _ => {}
        }
    }
    Owner::Other
}

/// One cached CEP.
#[derive(Clone, Debug)]
struct CepEntry {
    /// For the delete precondition.
    uid_text: Box<str>,
    owner: Owner,
    /// Creation time, Unix seconds.
    created: i64,
}

/// A cache fed by one watch: `live` is what passes read; a relist fills
/// `pending` and swaps it in at its end.
struct Cache<K, V> {
    live: HashMap<K, V>,
    pending: Option<HashMap<K, V>>,
    synced: bool,
}

impl<K: Eq + Hash, V> Cache<K, V> {
    fn new() -> Self {
        Cache { live: HashMap::new(), pending: None, synced: false }
    }
    fn init(&mut self) {
        self.pending = Some(HashMap::new());
    }
    fn init_apply(&mut self, k: K, v: V) {
        self.pending.get_or_insert_with(HashMap::new).insert(k, v);
    }
    fn init_done(&mut self) {
        if let Some(mut p) = self.pending.take() {
            p.shrink_to_fit();
            self.live = p;
        }
        self.synced = true;
    }
    fn relisting(&self) -> bool {
        self.pending.is_some()
    }
    fn apply(&mut self, k: K, v: V) {
        self.live.insert(k, v);
    }
    fn delete(&mut self, k: &K) {
        self.live.remove(k);
        if let Some(p) = &mut self.pending {
            p.remove(k);
        }
    }
}

pub async fn run(ctx: Context, stop: CancellationToken) -> anyhow::Result<()> {
    let metrics = ctx.metrics.endpoint_gc.clone();
    let interval = ctx.config.endpoint_gc_interval;
    let cfg = watcher::Config::default();
    let mut pod_events =
        watcher(Api::<DeserializeGuard<LeanPod>>::all(ctx.client.clone()), cfg.clone()).default_backoff().boxed();
    let mut cep_events =
        watcher(Api::<LeanObject<CiliumEndpoint>>::all(ctx.client.clone()), cfg.clone()).default_backoff().boxed();
    let mut node_events =
        watcher(Api::<LeanObject<CiliumNode>>::all(ctx.client.clone()), cfg).default_backoff().boxed();

    let mut pods: Cache<Uid, PodEntry> = Cache::new();
    let mut ceps: Cache<(Box<str>, Box<str>), CepEntry> = Cache::new();
    let mut nodes: Cache<Uid, ()> = Cache::new();
    let mut next_run: Option<tokio::time::Instant> = None;
    let mut ran_once = false;

    loop {
        let ready = pods.synced && ceps.synced && nodes.synced;
        let consistent = !pods.relisting() && !ceps.relisting() && !nodes.relisting();
        if ready && next_run.is_none() && !(interval.is_zero() && ran_once) {
            next_run = Some(tokio::time::Instant::now());
            tracing::info!(interval = %crate::duration::format(interval), "endpoint GC: caches synced");
        }
        let due = next_run.filter(|_| ready && consistent);
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = async { tokio::time::sleep_until(due.expect("guarded")).await }, if due.is_some() => {
                pass(&ctx, &metrics, &pods.live, &ceps.live, &nodes.live, interval).await;
                ran_once = true;
                next_run = (!interval.is_zero()).then(|| tokio::time::Instant::now() + interval);
                if interval.is_zero() {
                    tracing::info!("endpoint GC: cilium-endpoint-gc-interval is 0, ran once; stopping");
                    return Ok(());
                }
            }
            Some(e) = pod_events.next() => match e {
                Ok(watcher::Event::Init) => pods.init(),
                Ok(watcher::Event::InitApply(p)) => {
                    if let Some((k, v)) = pod_entry(p, &metrics) { pods.init_apply(k, v) }
                }
                Ok(watcher::Event::InitDone) => pods.init_done(),
                Ok(watcher::Event::Apply(p)) => {
                    if let Some((k, v)) = pod_entry(p, &metrics) { pods.apply(k, v) }
                }
                Ok(watcher::Event::Delete(p)) => {
                    let uid = match &p.0 { Ok(p) => p.metadata.uid.clone(), Err(e) => e.metadata.uid.clone() };
                    if let Some(uid) = uid { pods.delete(&Uid::parse(&uid)) }
                }
                Err(e) => tracing::warn!(error = %e, "endpoint GC: Pod watch error (retrying)"),
            },
            Some(e) = cep_events.next() => match e {
                Ok(watcher::Event::Init) => ceps.init(),
                Ok(watcher::Event::InitApply(c)) => { let (k, v) = cep_entry(&c); ceps.init_apply(k, v) }
                Ok(watcher::Event::InitDone) => ceps.init_done(),
                Ok(watcher::Event::Apply(c)) => { let (k, v) = cep_entry(&c); ceps.apply(k, v) }
                Ok(watcher::Event::Delete(c)) => ceps.delete(&cep_entry(&c).0),
                Err(e) => tracing::warn!(error = %e, "endpoint GC: CiliumEndpoint watch error (retrying)"),
            },
            Some(e) = node_events.next() => match e {
                Ok(watcher::Event::Init) => nodes.init(),
                Ok(watcher::Event::InitApply(n)) => nodes.init_apply(uid_of(&n.metadata), ()),
                Ok(watcher::Event::InitDone) => nodes.init_done(),
                Ok(watcher::Event::Apply(n)) => nodes.apply(uid_of(&n.metadata), ()),
                Ok(watcher::Event::Delete(n)) => nodes.delete(&uid_of(&n.metadata)),
                Err(e) => tracing::warn!(error = %e, "endpoint GC: CiliumNode watch error (retrying)"),
            },
        }
        for (name, len) in
            [("pods", pods.live.len()), ("ciliumendpoints", ceps.live.len()), ("ciliumnodes", nodes.live.len())]
        {
            metrics.cache_objects.get_or_create(&CacheLabels { cache: name.into() }).set(len as i64);
        }
    }
}

fn uid_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Uid {
    Uid::parse(meta.uid.as_deref().unwrap_or_default())
}

fn pod_entry(p: DeserializeGuard<LeanPod>, metrics: &EndpointGcMetrics) -> Option<(Uid, PodEntry)> {
    match p.0 {
        Ok(p) => {
            let m = &p.metadata;
            let name = name_hash(m.namespace.as_deref().unwrap_or_default(), m.name.as_deref().unwrap_or_default());
            Some((uid_of(m), PodEntry { phase: PodPhase::parse(p.status.phase.as_deref()), name }))
        }
        Err(e) => {
            metrics.malformed_objects.inc();
            tracing::warn!(pod = e.metadata.name.as_deref().unwrap_or("?"), error = %e.error, "endpoint GC: skipping malformed Pod");
            None
        }
    }
}

fn cep_entry(c: &LeanObject<CiliumEndpoint>) -> ((Box<str>, Box<str>), CepEntry) {
    let m = &c.metadata;
    let key = (m.namespace.as_deref().unwrap_or_default().into(), m.name.as_deref().unwrap_or_default().into());
    let uid_text: Box<str> = m.uid.as_deref().unwrap_or_default().into();
    let created = m.creation_timestamp.as_ref().map(|t| t.0.as_second()).unwrap_or(0);
    (key, CepEntry { uid_text, owner: owner_of(m), created })
}

/// One pass: judge every cached CEP, delete the orphans concurrently.
async fn pass(
    ctx: &Context,
    metrics: &EndpointGcMetrics,
    pods: &HashMap<Uid, PodEntry>,
    ceps: &HashMap<(Box<str>, Box<str>), CepEntry>,
    nodes: &HashMap<Uid, ()>,
    interval: std::time::Duration,
) {
    let started = Instant::now();
    let node_uids: HashSet<Uid> = nodes.keys().copied().collect();
    let pod_names: HashSet<u64> = pods.values().map(|p| p.name).collect();
    let now = jiff::Timestamp::now().as_second();
    let young_below = now - interval.as_secs() as i64;
    // Owned work items: the delete futures borrow nothing from the caches.
    let doomed: Vec<(String, String, String, String)> = ceps
        .iter()
        .filter_map(|((ns, name), e)| {
            let named = pod_names.contains(&name_hash(ns, name));
            match decide(e.owner, pods, &node_uids, named, e.created > young_below) {
                Verdict::Delete(reason) => {
                    Some((ns.to_string(), name.to_string(), e.uid_text.to_string(), reason.to_string()))
                }
                _ => None,
            }
        })
        .collect();
    let results: Vec<Result<(), ()>> = futures::stream::iter(doomed.clone())
        .map(|(ns, name, uid, reason): (String, String, String, String)| {
            let api: Api<CiliumEndpoint> = Api::namespaced(ctx.client.clone(), &ns);
            let metrics = metrics.clone();
            async move {
                let dp = DeleteParams {
                    preconditions: Some(Preconditions { uid: Some(uid), resource_version: None }),
                    propagation_policy: Some(PropagationPolicy::Background),
                    ..Default::default()
                };
                match api.delete(&name, &dp).await {
                    Ok(_) => {
                        tracing::debug!(namespace = %ns, name = %name, %reason, "deleted orphaned CiliumEndpoint");
                        metrics.objects.get_or_create(&OutcomeLabels { outcome: "success".into() }).inc();
                        Ok(())
                    }
                    // Gone already, or re-created (new UID): nothing to do.
                    Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
                    Err(e) => {
                        tracing::warn!(namespace = %ns, name = %name, error = %e, "deleting CiliumEndpoint failed");
                        metrics.objects.get_or_create(&OutcomeLabels { outcome: "fail".into() }).inc();
                        Err(())
                    }
                }
            }
        })
        .buffer_unordered(DELETE_CONCURRENCY)
        .collect()
        .await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    let took = started.elapsed();
    metrics.runs.inc();
    metrics.last_run_duration_seconds.set(took.as_secs_f64());
    tracing::info!(
        scanned = ceps.len(),
        deleted = doomed.len() - failed,
        failed,
        seconds = format!("{:.3}", took.as_secs_f64()),
        "endpoint GC pass done"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(n: u8) -> Uid {
        Uid::parse(&format!("00000000-0000-0000-0000-0000000000{n:02x}"))
    }

    #[test]
    fn rules() {
        let p = |phase| PodEntry { phase, name: 0 };
        let pods: HashMap<Uid, PodEntry> = [
            (uid(1), p(PodPhase::Running)),
            (uid(2), p(PodPhase::Succeeded)),
            (uid(3), p(PodPhase::Failed)),
            (uid(4), p(PodPhase::Pending)),
        ]
        .into();
        let nodes: HashSet<Uid> = [uid(9)].into();
        let d = |o| decide(o, &pods, &nodes, false, false);
        assert_eq!(d(Owner::Pod(uid(1))), Verdict::Keep);
        assert_eq!(d(Owner::Pod(uid(4))), Verdict::Keep);
        assert_eq!(d(Owner::Pod(uid(2))), Verdict::Delete("pod-completed"));
        assert_eq!(d(Owner::Pod(uid(3))), Verdict::Delete("pod-completed"));
        // Same name, new pod: the CEP still naming the old UID is an orphan;
        // one naming the new UID is kept (compare UIDs, never names).
        assert_eq!(d(Owner::Pod(uid(5))), Verdict::Delete("pod-gone"));
        assert_eq!(d(Owner::CiliumNode(uid(9))), Verdict::Keep);
        assert_eq!(d(Owner::CiliumNode(uid(8))), Verdict::Delete("ciliumnode-gone"));
        assert_eq!(d(Owner::Other), Verdict::Untouched);
        // No owner: judged by the Pod of the same name (upstream).
        assert_eq!(d(Owner::None), Verdict::Delete("no-owner-no-pod"));
        assert_eq!(decide(Owner::None, &pods, &nodes, true, false), Verdict::Keep);
        // Younger than one interval: never deleted yet (upstream #42413).
        assert_eq!(decide(Owner::Pod(uid(5)), &pods, &nodes, false, true), Verdict::Keep);
        assert_eq!(decide(Owner::None, &pods, &nodes, false, true), Verdict::Keep);
    }

    #[test]
    fn owners_and_uids() {
        let meta = |kind: &str, api: &str| k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            owner_references: Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: api.into(),
                kind: kind.into(),
                name: "x".into(),
                uid: "6f1c2a4e-8b7d-4c1e-9a3f-0123456789ab".into(),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let u = Uid::parse("6f1c2a4e-8b7d-4c1e-9a3f-0123456789ab");
        assert_eq!(owner_of(&meta("Pod", "v1")), Owner::Pod(u));
        assert_eq!(owner_of(&meta("CiliumNode", "cilium.io/v2")), Owner::CiliumNode(u));
        assert_eq!(owner_of(&meta("Deployment", "apps/v1")), Owner::Other);
        assert_eq!(owner_of(&Default::default()), Owner::None);
        assert_ne!(Uid::parse("not-a-uuid"), Uid::parse("not-a-uuid2"));
        assert_eq!(Uid::parse("not-a-uuid"), Uid::parse("not-a-uuid"));
    }

    #[test]
    fn relist_replaces_cache_at_its_end() {
        let mut c: Cache<u8, ()> = Cache::new();
        c.init();
        c.init_apply(1, ());
        assert!(c.relisting() && !c.synced && c.live.is_empty());
        c.init_done();
        assert!(c.synced && !c.relisting() && c.live.contains_key(&1));
        // A relist that no longer lists 1 (deleted during an outage) drops it.
        c.init();
        c.init_apply(2, ());
        assert!(c.live.contains_key(&1), "live view kept while relisting");
        c.init_done();
        assert!(!c.live.contains_key(&1) && c.live.contains_key(&2));
    }
}
