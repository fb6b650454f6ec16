//! Identity GC, CRD mode: every `identity-gc-interval`, CiliumIdentities of
//! this cluster's range that no CiliumEndpoint references are marked with
//! the `io.cilium.heartbeat` annotation (RFC3339Nano time): the time the
//! endpoint watch saw the last user go, when it did (bounded by
//! `cilium_identity::gc::mark_time`), else the run's. A marked identity
//! still unused once `identity-heartbeat-timeout` has passed since its mark
//! is deleted with {uid, resourceVersion} preconditions, at most
//! `identity-gc-rate-limit` per `identity-gc-rate-interval`, by a run woken
//! when the first mark falls due (not the next interval's). An identity in
//! use again loses its mark (as an agent reusing it does), and the changed
//! resourceVersion makes any pending guarded delete fail.
//!
//! The mark time lives on the object, so an operator restart or a new
//! leader does not reset the GC clock (upstream #28339).
//!
//! kvstore mode (`kvstore` and double-write): every interval, `id/<ID>` keys
//! of this cluster's range whose labels have no `value/<labels>/` key are
//! remembered with their ModRevision; still unused and unchanged on the next
//! round, they are deleted by a transaction that re-checks both, so an
//! allocator writing a value key in between wins. Both GCs share one rate
//! limiter.

use std::collections::{HashMap, HashSet};
use std::ops::RangeInclusive;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use cilium_crds::CiliumIdentity;
use cilium_identity_alloc::HEARTBEAT_ANNOTATION;
use kube::Resource;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use cilium_identity::gc::{Action, decide};

use crate::lean::LeanEndpoint;
use crate::run::Context;

/// Field manager of the mark/unmark writes.
pub const FIELD_MANAGER: &str = "cilium-operator-identity-gc";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EntryLabels {
    pub status: String,
    pub identity_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub outcome: String,
    pub identity_type: String,
}

/// Metrics of the `identity_gc` sub-registry, with upstream's names and
/// labels.
#[derive(Clone, Default)]
pub struct IdentityGcMetrics {
    /// Alive and deleted identities at the end of a run.
    pub entries: Family<EntryLabels, Gauge>,
    /// Runs by outcome.
    pub runs: Family<RunLabels, Counter>,
    /// Duration of the last run, by outcome.
    pub latency: Family<RunLabels, Gauge<f64, AtomicU64>>,
    /// Identities marked for deletion in the last run.
    pub marked: Gauge,
    /// Identities of this cluster's range in use, per backend.
    pub space_used: Family<TypeLabels, Gauge>,
    /// Size of this cluster's identity range.
    pub space_size: Gauge,
    /// Times the range crossed the pressure threshold.
    pub space_pressure: Family<TypeLabels, Counter>,
    /// Distinct values per label key across identities (top 10 keys).
    pub label_key_values: Family<KeyLabels, Gauge>,
    /// Identities that cannot be read (skipped), per backend.
    pub malformed: Family<TypeLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    pub identity_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    pub label_key: String,
}

impl IdentityGcMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("identity_gc");
        r.register("entries", "Alive and deleted identities at the end of a GC run", self.entries.clone());
        r.register("runs", "Identity GC runs by outcome", self.runs.clone());
        r.register("latency", "Duration of the last identity GC run in seconds", self.latency.clone());
        r.register("marked", "Unused identities carrying the heartbeat mark after the last run", self.marked.clone());
        r.register("malformed", "Identities that cannot be read, skipped", self.malformed.clone());
        let r = registry.sub_registry_with_prefix("identity");
        r.register("space_used", "Identities of this cluster's range in use", self.space_used.clone());
        r.register("space_size", "Size of this cluster's identity range", self.space_size.clone());
        r.register(
            "space_pressure",
            "Times identity use crossed identity-space-pressure-threshold",
            self.space_pressure.clone(),
        );
        r.register(
            "label_key_values",
            "Distinct values of a label key across identities (the 10 keys with most)",
            self.label_key_values.clone(),
        );
    }
}

/// At most `limit` permits in any window of `interval`, sliding rather
/// than fixed: up to `limit` at once, then each further permit as soon as
/// the permit `limit` places before it is `interval` old. Reclaiming is as
/// quick as upstream's limiter (`limit` at once, then `limit` at the start
/// of each next window), but upstream counts fixed windows, so up to twice
/// the limit can pass within one interval across a window boundary; this
/// never lets more than the limit pass in any interval.
pub struct RateLimiter {
    limit: u64,
    interval: Duration,
    /// Permits of the last interval as (time of the latest, count) runs in
    /// time order; permits within a millisecond share a run, so a high
    /// limit costs at most one entry per millisecond of the interval.
    recent: std::collections::VecDeque<(tokio::time::Instant, u64)>,
    in_window: u64,
}

impl RateLimiter {
    pub fn new(limit: u64, interval: Duration) -> RateLimiter {
        RateLimiter { limit: limit.max(1), interval, recent: Default::default(), in_window: 0 }
    }

    /// Waits until a permit is available.
    pub async fn acquire(&mut self) {
        loop {
            let now = tokio::time::Instant::now();
            while let Some(&(at, n)) = self.recent.front() {
                if now.duration_since(at) < self.interval {
                    break;
                }
                self.recent.pop_front();
                self.in_window -= n;
            }
            if self.in_window < self.limit {
                // A run's time is its latest permit's: a run expires no
                // earlier than any permit in it.
                match self.recent.back_mut() {
                    Some((at, n)) if now.duration_since(*at) < Duration::from_millis(1) => {
                        *at = now;
                        *n += 1;
                    }
                    _ => self.recent.push_back((now, 1)),
                }
                self.in_window += 1;
                return;
            }
            // Full: the oldest run frees its permits when it is `interval`
            // old. (Only sleep when a permit is not due: a timer for "now"
            // waits for the next timer tick, about 1 ms.)
            if let Some(&(at, _)) = self.recent.front() {
                tokio::time::sleep_until(at + self.interval).await;
            }
        }
    }
}

type SharedLimiter = tokio::sync::Mutex<RateLimiter>;

/// Runs the GCs the identity allocation mode needs: CRD (`crd`,
/// double-write), kvstore (`kvstore`, double-write), sharing one rate
/// limiter.
pub async fn run(ctx: Context, stop: CancellationToken) -> anyhow::Result<()> {
    use crate::config::IdentityAllocationMode as Mode;
    let interval = ctx.config.identity_gc_interval;
    if interval.is_zero() {
        tracing::info!("identity GC disabled (identity-gc-interval is 0)");
        crate::gc_request::serve(&ctx, &stop, Vec::new()).await;
        return Ok(());
    }
    let range = cilium_identity::cluster_range(ctx.config.cluster_id, ctx.config.max_connected_clusters)?;
    let limiter =
        SharedLimiter::new(RateLimiter::new(ctx.config.identity_gc_rate_limit, ctx.config.identity_gc_rate_interval));
    let mode = ctx.config.identity_allocation_mode;
    ctx.metrics.identity_gc.space_size.set((*range.end() - *range.start()) as i64 + 1);
    let wake_crd = tokio::sync::Notify::new();
    let wake_kv = tokio::sync::Notify::new();
    let progress_crd = watch::Sender::new(Progress::default());
    let progress_kv = watch::Sender::new(Progress::default());
    let with_kvstore = ctx.config.kvstore.clone().filter(|_| mode != Mode::Crd);
    let mut backends = Vec::new();
    if mode != Mode::Kvstore {
        backends.push(Backend { name: "crd", wake: &wake_crd, progress: &progress_crd });
    }
    if with_kvstore.is_some() {
        backends.push(Backend { name: "kvstore", wake: &wake_kv, progress: &progress_kv });
    }
    // Watch caches of identities and endpoints (CRD modes): passes and the
    // pressure check read them instead of listing everything each time.
    let caches = (mode != Mode::Kvstore).then(|| Caches::start(&ctx));
    if let Some(c) = &caches {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = c.ready() => r?,
        }
    }
    let pressure = watch_pressure(&ctx, &range, &stop, &wake_crd, &wake_kv, caches.as_ref());
    let requests = crate::gc_request::serve(&ctx, &stop, backends);
    let crd = async {
        if mode == Mode::Kvstore {
            return Ok(());
        }
        let caches = caches.as_ref().expect("CRD mode has caches");
        gc_loop(&ctx, "crd", &stop, &wake_crd, &progress_crd, || pass(&ctx, &range, caches, &limiter)).await
    };
    let kv = async {
        let Some(kv) = with_kvstore.clone() else {
            return Ok(());
        };
        let client = crate::kvstore::connect(&kv).await?;
        let mut seen: HashMap<u32, i64> = HashMap::new();
        let seen = tokio::sync::Mutex::new(&mut seen);
        gc_loop(&ctx, "kvstore", &stop, &wake_kv, &progress_kv, || async {
            let mut seen = seen.lock().await;
            kv_pass(&ctx, client.clone(), &range, &mut seen, &limiter).await
        })
        .await
    };
    let (a, b, (), ()) = tokio::join!(crd, kv, pressure, requests);
    a.and(b)
}

/// Watch caches of CiliumIdentities and of the identity ID of every
/// CiliumEndpoint, kept for the life of the duty.
pub struct Caches {
    ids: kube::runtime::reflector::Store<CiliumIdentity>,
    ceps: EndpointIds,
}

/// The identity ID of every CiliumEndpoint, by `namespace/name`: all the GC
/// needs of an endpoint (tens of bytes each, where a cached object with
/// its metadata took hundreds), plus when each identity's last user was
/// seen going.
#[derive(Clone)]
struct EndpointIds {
    state: std::sync::Arc<std::sync::Mutex<EndpointIdsState>>,
    ready: watch::Receiver<bool>,
}

#[derive(Default)]
struct EndpointIdsState {
    by_endpoint: HashMap<String, u32>,
    /// Endpoints per identity ID.
    users: HashMap<u32, u32>,
    /// When the watch saw the last user of an ID go (removed when it is used
    /// again, and by passes once the identity is gone).
    released: HashMap<u32, jiff::Timestamp>,
}

impl EndpointIdsState {
    /// Records that endpoint `key` now has identity `id` (or none).
    fn set(&mut self, key: String, id: Option<u32>, now: jiff::Timestamp) {
        let old = match id {
            Some(id) => self.by_endpoint.insert(key, id),
            None => self.by_endpoint.remove(&key),
        };
        if old == id {
            return;
        }
        if let Some(id) = id {
            *self.users.entry(id).or_default() += 1;
            self.released.remove(&id);
        }
        if let Some(old) = old {
            let n = self.users.entry(old).or_default();
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.users.remove(&old);
                self.released.insert(old, now);
            }
        }
    }

    /// A fresh list: IDs that lost their users while the watch was away
    /// have no known release time (their marks get the pass's time).
    fn replace(&mut self, by_endpoint: HashMap<String, u32>) {
        let mut users: HashMap<u32, u32> = HashMap::new();
        for id in by_endpoint.values() {
            *users.entry(*id).or_default() += 1;
        }
        self.released.retain(|id, _| !users.contains_key(id));
        self.by_endpoint = by_endpoint;
        self.by_endpoint.shrink_to_fit();
        self.users = users;
    }
}

impl EndpointIds {
    fn start(ctx: &Context) -> EndpointIds {
        use futures::StreamExt;
        use kube::core::DeserializeGuard;
        use kube::runtime::WatchStreamExt;
        use kube::runtime::watcher::{Event, watcher};
        let (tx, ready) = watch::channel(false);
        let state = std::sync::Arc::new(std::sync::Mutex::new(EndpointIdsState::default()));
        let cache = EndpointIds { state: state.clone(), ready };
        let metrics = ctx.metrics.clone();
        let api = Api::<DeserializeGuard<LeanEndpoint>>::all(ctx.client.clone());
        // The key of an object, and its identity ID if it has one (an
        // endpoint that does not decode holds none; it is counted).
        let read = move |g: &DeserializeGuard<LeanEndpoint>| -> (String, Option<u32>) {
            let key =
                format!("{}/{}", g.meta().namespace.as_deref().unwrap_or(""), g.meta().name.as_deref().unwrap_or(""));
            let id = match &g.0 {
                Ok(e) => e.status.identity.as_ref().and_then(|i| i.id).and_then(|id| u32::try_from(id).ok()),
                Err(bad) => {
                    metrics.malformed("CiliumEndpoint", bad);
                    None
                }
            };
            (key, id)
        };
        tokio::spawn(async move {
            let mut stream = watcher(api, Default::default()).default_backoff().boxed();
            let mut buffer: HashMap<String, u32> = HashMap::new();
            while let Some(ev) = stream.next().await {
                let Ok(ev) = ev else { continue };
                let mut live = state.lock().expect("endpoint ids");
                match ev {
                    Event::Init => buffer = HashMap::new(),
                    Event::InitApply(g) => {
                        if let (key, Some(id)) = read(&g) {
                            buffer.insert(key, id);
                        }
                    }
                    Event::InitDone => {
                        live.replace(std::mem::take(&mut buffer));
                        tx.send_replace(true);
                    }
                    Event::Apply(g) => {
                        let (key, id) = read(&g);
                        live.set(key, id, jiff::Timestamp::now());
                    }
                    Event::Delete(g) => live.set(read(&g).0, None, jiff::Timestamp::now()),
                }
            }
        });
        cache
    }

    /// Every identity ID some endpoint uses, and when the watch saw the
    /// last user of each other ID go (where it did).
    fn used(&self) -> (HashSet<u32>, HashMap<u32, jiff::Timestamp>) {
        let s = self.state.lock().expect("endpoint ids");
        (s.users.keys().copied().collect(), s.released.clone())
    }

    /// Forgets release times of identities that no longer exist.
    fn forget_released_except(&self, existing: &HashSet<u32>) {
        self.state.lock().expect("endpoint ids").released.retain(|id, _| existing.contains(id));
    }

    async fn wait_until_ready(&self) -> anyhow::Result<()> {
        let mut r = self.ready.clone();
        r.wait_for(|ready| *ready).await.map_err(|_| anyhow::anyhow!("the CiliumEndpoint watch stopped"))?;
        Ok(())
    }
}

impl Caches {
    fn start(ctx: &Context) -> Caches {
        use futures::StreamExt;
        let metrics = ctx.metrics.clone();
        let api = Api::<kube::core::DeserializeGuard<CiliumIdentity>>::all(ctx.client.clone());
        let (ids, stream) =
            cilium_crds::guard::reflector(api, Default::default(), move |bad| metrics.malformed("CiliumIdentity", bad));
        tokio::spawn(stream.for_each(|_| futures::future::ready(())));
        Caches { ids, ceps: EndpointIds::start(ctx) }
    }

    async fn ready(&self) -> anyhow::Result<()> {
        self.ids.wait_until_ready().await?;
        self.ceps.wait_until_ready().await?;
        Ok(())
    }
}

/// Passes started and finished by one GC loop, and how the last one ended:
/// lets an on-demand request wait for a pass that started after it.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub started: u64,
    pub finished: u64,
    pub last: String,
}

/// One GC loop as seen by the on-demand request server.
pub struct Backend<'a> {
    pub name: &'static str,
    pub wake: &'a tokio::sync::Notify,
    pub progress: &'a watch::Sender<Progress>,
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassStats {
    pub alive: i64,
    pub deleted: i64,
    /// CRD: carrying the heartbeat mark; kvstore: unused, remembered for
    /// deletion on the next round.
    pub marked: i64,
    /// CRD: how long until the first marked identity becomes due for
    /// deletion, when that is sooner than the interval: the loop runs then.
    pub next_due: Option<Duration>,
}

/// How long a GC loop sleeps after a pass that took `elapsed`: until the
/// next interval, or until the first marked identity is due (counted from
/// the pass's end) when that is sooner.
fn until_next(interval: Duration, elapsed: Duration, due: Option<Duration>) -> Duration {
    let regular = interval.saturating_sub(elapsed);
    due.map_or(regular, |d| d.min(regular))
}

fn earliest(a: Option<jiff::Timestamp>, b: Option<jiff::Timestamp>) -> Option<jiff::Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// kvstore deletions in flight during a pass: each is a transaction with
/// two compares, heavier than a plain delete, so as many as the raw
/// baseline's 32 (at 16 a round over 20,000 keys took 1.55x that baseline).
const KV_DELETES_IN_FLIGHT: usize = 32;

/// CiliumIdentity writes (marks, unmarks, deletions) in flight during a
/// pass; the client's default QPS limits do not apply to kube-rs.
const CRD_WRITES_IN_FLIGHT: usize = 16;

/// How often identity use is compared with the pressure threshold.
const PRESSURE_CHECK: Duration = Duration::from_secs(5);

/// Counts this cluster's identities every few seconds; crossing
/// `identity-space-pressure-threshold` wakes the GC at once, emits a Warning
/// Event (on the operator's Lease) and counts in `identity_space_pressure`.
async fn watch_pressure(
    ctx: &Context,
    range: &RangeInclusive<u32>,
    stop: &CancellationToken,
    wake_crd: &tokio::sync::Notify,
    wake_kv: &tokio::sync::Notify,
    caches: Option<&Caches>,
) {
    use crate::config::IdentityAllocationMode as Mode;
    let mode = ctx.config.identity_allocation_mode;
    let size = (*range.end() - *range.start()) as f64 + 1.0;
    let threshold = ctx.config.identity_space_pressure_threshold;
    let mut kv_client = match &ctx.config.kvstore {
        Some(kv) if mode != Mode::Crd => crate::kvstore::connect(kv).await.ok(),
        _ => None,
    };
    let mut in_pressure = [false, false];
    loop {
        let mut counts: Vec<(usize, &str, &tokio::sync::Notify, Result<u64, String>)> = Vec::new();
        if let Some(c) = caches {
            counts.push((0, "crd", wake_crd, Ok(count_crd(c, range))));
        }
        if let Some(c) = kv_client.as_mut() {
            counts.push((1, "kvstore", wake_kv, count_kvstore(c, range).await.map_err(|e| e.to_string())));
        }
        for (slot, identity_type, wake, count) in counts {
            let used = match count {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(error = %e, identity_type, "cannot count identities");
                    continue;
                }
            };
            let labels = TypeLabels { identity_type: identity_type.into() };
            ctx.metrics.identity_gc.space_used.get_or_create(&labels).set(used as i64);
            let pressured = used as f64 >= threshold * size;
            if pressured && !in_pressure[slot] {
                ctx.metrics.identity_gc.space_pressure.get_or_create(&labels).inc();
                let note = format!(
                    "{identity_type} identities use {used} of {size} IDs ({:.1}%, threshold {:.1}%): running identity GC now",
                    100.0 * used as f64 / size,
                    100.0 * threshold
                );
                tracing::warn!(identity_type, used, "{note}");
                pressure_event(ctx, &note).await;
                wake.notify_one();
            }
            in_pressure[slot] = pressured;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PRESSURE_CHECK) => {}
        }
    }
}

fn count_crd(caches: &Caches, range: &RangeInclusive<u32>) -> u64 {
    caches
        .ids
        .state()
        .iter()
        .filter(|i| {
            i.metadata.name.as_deref().and_then(|n| n.parse::<u32>().ok()).is_some_and(|id| range.contains(&id))
        })
        .count() as u64
}

async fn count_kvstore(c: &mut etcd_client::Client, range: &RangeInclusive<u32>) -> Result<u64, etcd_client::Error> {
    let prefix = format!("{}id/", cilium_identity_alloc::kvstore::PREFIX);
    let keys = crate::kvstore::get_prefix(c, &prefix, true).await?;
    Ok(keys
        .iter()
        .filter(|kv| {
            kv.key.strip_prefix(&prefix).and_then(|s| s.parse::<u32>().ok()).is_some_and(|id| range.contains(&id))
        })
        .count() as u64)
}

async fn pressure_event(ctx: &Context, note: &str) {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let recorder = Recorder::new(
        ctx.client.clone(),
        Reporter { controller: "cilium-operator".into(), instance: std::env::var("HOSTNAME").ok() },
    );
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("coordination.k8s.io/v1".into()),
        kind: Some("Lease".into()),
        name: Some(crate::leader::LEASE_NAME.into()),
        namespace: Some(ctx.config.namespace.clone()),
        ..Default::default()
    };
    let ev = Event {
        type_: EventType::Warning,
        reason: "IdentitySpacePressure".into(),
        note: Some(note.chars().take(1000).collect()),
        action: "IdentityGC".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, &reference).await {
        tracing::warn!(error = %e, "publishing Event failed");
    }
}

/// Runs `pass` every interval (or at once when woken), recording upstream's
/// run metrics.
async fn gc_loop<F, Fut, E>(
    ctx: &Context,
    identity_type: &str,
    stop: &CancellationToken,
    wake: &tokio::sync::Notify,
    progress: &watch::Sender<Progress>,
    mut pass: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<PassStats, E>>,
    E: std::fmt::Display,
{
    let interval = ctx.config.identity_gc_interval;
    // Both outcomes exist from the start (at 0), so that `increase()` in an
    // alert sees the first failure too.
    for outcome in ["success", "failure"] {
        let labels = RunLabels { outcome: outcome.into(), identity_type: identity_type.into() };
        let _ = ctx.metrics.identity_gc.runs.get_or_create(&labels);
    }
    loop {
        let started = Instant::now();
        progress.send_modify(|p| p.started += 1);
        let mut due = None;
        let (outcome, summary) = match pass().await {
            Ok(s) => {
                due = s.next_due;
                let what =
                    if identity_type == "kvstore" { "unused (deleted next round if still unused)" } else { "marked" };
                ("success", format!("alive={} deleted={} {what}={}", s.alive, s.deleted, s.marked))
            }
            Err(e) => {
                tracing::warn!(error = %e, identity_type, "identity GC run failed");
                ("failure", format!("failed: {e}"))
            }
        };
        progress.send_modify(|p| {
            p.finished += 1;
            p.last = summary;
        });
        let labels = RunLabels { outcome: outcome.into(), identity_type: identity_type.into() };
        ctx.metrics.identity_gc.runs.get_or_create(&labels).inc();
        ctx.metrics.identity_gc.latency.get_or_create(&labels).set(started.elapsed().as_secs_f64());
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(until_next(interval, started.elapsed(), due)) => {}
            _ = wake.notified() => tracing::info!(identity_type, "identity GC woken (identity-space pressure or an on-demand request)"),
        }
    }
}

/// One kvstore round: an ID whose labels have no value key is remembered
/// with its ModRevision; unused again next round with the same ModRevision,
/// it is deleted by a transaction that re-checks both conditions, so an
/// allocator that starts using it in between wins.
async fn kv_pass(
    ctx: &Context,
    mut client: etcd_client::Client,
    range: &RangeInclusive<u32>,
    seen: &mut HashMap<u32, i64>,
    limiter: &SharedLimiter,
) -> Result<PassStats, etcd_client::Error> {
    use cilium_identity_alloc::kvstore::{PREFIX, id_key, value_prefix};
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    use futures::StreamExt;
    let started = Instant::now();
    // Paged reads: a pass works at any size (one read of 200k keys would
    // exceed the 4 MiB gRPC limit and fail every pass). The value keys show
    // every label set with at least one user.
    let ids = crate::kvstore::get_prefix(&mut client, &format!("{PREFIX}id/"), false).await?;
    let values = crate::kvstore::get_prefix(&mut client, &format!("{PREFIX}value/"), true).await?;
    fn relative(k: &str) -> &str {
        k.strip_prefix(PREFIX).unwrap_or(k)
    }
    let round = cilium_identity::kvstore::judge(
        ids.iter().map(|kv| cilium_identity::kvstore::KeyValue {
            key: relative(&kv.key),
            value: &kv.value,
            mod_revision: kv.mod_revision,
        }),
        values.iter().map(|kv| relative(&kv.key)),
        range,
        seen,
    );
    for key in &round.malformed {
        ctx.metrics.identity_gc.malformed.get_or_create(&TypeLabels { identity_type: "kvstore".into() }).inc();
        tracing::warn!(key = %key, "skipping a kvstore identity key that is not id/<number>");
    }
    let (mut alive, mut deleted, remembered) = (round.alive, 0i64, round.remembered);
    // Deletions, several in flight (each a transaction that re-checks both
    // conditions, so their order does not matter), paced by the limiter.
    let results: Vec<(u32, String, Result<bool, etcd_client::Error>)> = futures::stream::iter(round.doomed)
        .map(|cilium_identity::kvstore::Doomed { id, labels: labels_key, mod_revision: rev }| {
            let mut client = client.clone();
            async move {
                limiter.lock().await.acquire().await;
                let txn = Txn::new()
                    .when([
                        Compare::mod_revision(id_key(id), CompareOp::Equal, rev),
                        Compare::create_revision(value_prefix(&labels_key), CompareOp::Equal, 0).with_prefix(),
                    ])
                    .and_then([TxnOp::delete(id_key(id), None)]);
                let r = client.txn(txn).await.map(|r| r.succeeded());
                (id, labels_key, r)
            }
        })
        .buffer_unordered(KV_DELETES_IN_FLIGHT)
        .collect()
        .await;
    for (id, labels_key, r) in results {
        if r? {
            deleted += 1;
            tracing::debug!(identity = id, labels = %labels_key, "deleted unused kvstore identity");
        } else {
            alive += 1;
        }
    }
    let m = &ctx.metrics.identity_gc;
    m.entries.get_or_create(&EntryLabels { status: "alive".into(), identity_type: "kvstore".into() }).set(alive);
    m.entries.get_or_create(&EntryLabels { status: "deleted".into(), identity_type: "kvstore".into() }).set(deleted);
    tracing::info!(
        alive,
        deleted,
        seconds = format!("{:.3}", started.elapsed().as_secs_f64()),
        "kvstore identity GC run done"
    );
    Ok(PassStats { alive, deleted, marked: remembered, next_due: None })
}

async fn pass(
    ctx: &Context,
    range: &RangeInclusive<u32>,
    caches: &Caches,
    limiter: &SharedLimiter,
) -> Result<PassStats, kube::Error> {
    let started = Instant::now();
    let identities: Api<CiliumIdentity> = Api::all(ctx.client.clone());
    // From the watch caches, endpoints after identities: an identity created
    // after the snapshot is not judged this run; one referenced by an
    // endpoint created in between is seen as used. A stale cache can only
    // mark an identity early: deletion needs the mark to stay for the whole
    // heartbeat timeout and is conditional on what was seen.
    let all: Vec<std::sync::Arc<CiliumIdentity>> = caches.ids.state();
    let (used, released) = caches.ceps.used();
    let now = jiff::Timestamp::now();
    let timeout = ctx.config.identity_heartbeat_timeout;
    let interval = ctx.config.identity_gc_interval;
    // The earliest time a marked identity becomes due: the loop runs again
    // then rather than a whole interval later.
    let mut next_due: Option<jiff::Timestamp> = None;
    let mut existing = HashSet::new();
    let pp = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let (mut alive, mut deleted, mut marked) = (0i64, 0i64, 0i64);
    report_label_explosion(
        ctx,
        all.iter().map(|i| i.as_ref()).filter(|i| {
            i.metadata.name.as_deref().and_then(|n| n.parse::<u32>().ok()).is_some_and(|id| range.contains(&id))
        }),
    );
    // Decide every identity first, then write: marks, unmarks and deletions
    // run several at a time (each conditional on what was seen, so their
    // order does not matter), deletions paced by the limiter.
    enum Write {
        Unmark(String),
        Mark(String, Option<String>, jiff::Timestamp),
        Delete(String, u32, Preconditions),
    }
    use futures::StreamExt;
    let mut writes = Vec::new();
    for identity in all {
        let Some(name) = identity.metadata.name.clone() else {
            continue;
        };
        // Every unused identity is collected whatever its number, as
        // upstream (one left by an earlier cluster-id would leak forever).
        let Some(id) = name.parse::<u32>().ok() else {
            ctx.metrics.identity_gc.malformed.get_or_create(&TypeLabels { identity_type: "crd".into() }).inc();
            tracing::warn!(name = %name, "skipping a CiliumIdentity whose name is not a number");
            continue;
        };
        existing.insert(id);
        let mark = identity.metadata.annotations.as_ref().and_then(|a| a.get(HEARTBEAT_ANNOTATION)).map(String::as_str);
        let rv = identity.metadata.resource_version.clone();
        match decide(used.contains(&id), mark, now, timeout) {
            Action::Keep => alive += 1,
            Action::Unmark => {
                alive += 1;
                writes.push(Write::Unmark(name));
            }
            Action::Mark => {
                alive += 1;
                marked += 1;
                let at = cilium_identity::gc::mark_time(released.get(&id).copied(), now, interval, timeout);
                next_due = earliest(next_due, cilium_identity::gc::due(at, timeout));
                writes.push(Write::Mark(name, rv, at));
            }
            Action::Wait => {
                alive += 1;
                marked += 1;
                next_due = earliest(
                    next_due,
                    mark.and_then(|m| m.parse().ok()).and_then(|m| cilium_identity::gc::due(m, timeout)),
                );
            }
            Action::Delete => writes.push(Write::Delete(
                name,
                id,
                Preconditions { uid: identity.metadata.uid.clone(), resource_version: rv },
            )),
        }
    }
    let results: Vec<Result<Option<bool>, kube::Error>> = futures::stream::iter(writes)
        .map(|w| {
            let identities = identities.clone();
            let pp = pp.clone();
            async move {
                match w {
                    Write::Unmark(name) => {
                        let body = serde_json::json!({ "metadata": { "annotations": { HEARTBEAT_ANNOTATION: null } } });
                        ignore_gone(identities.patch(&name, &pp, &Patch::Merge(&body)).await).map(|_| None)
                    }
                    Write::Mark(name, rv, at) => {
                        // resourceVersion makes the mark conditional on what we saw.
                        let body = serde_json::json!({ "metadata": {
                            "resourceVersion": rv,
                            "annotations": { HEARTBEAT_ANNOTATION: at.to_string() },
                        } });
                        ignore_gone(identities.patch(&name, &pp, &Patch::Merge(&body)).await).map(|_| None)
                    }
                    Write::Delete(name, id, preconditions) => {
                        limiter.lock().await.acquire().await;
                        let dp = DeleteParams { preconditions: Some(preconditions), ..Default::default() };
                        match identities.delete(&name, &dp).await {
                            Ok(_) => {
                                tracing::info!(identity = id, "deleted unused identity");
                                Ok(Some(true))
                            }
                            // Reused (mark removed) or already gone: not ours to delete.
                            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(Some(false)),
                            Err(e) => Err(e),
                        }
                    }
                }
            }
        })
        .buffer_unordered(CRD_WRITES_IN_FLIGHT)
        .collect()
        .await;
    for r in results {
        match r? {
            Some(true) => deleted += 1,
            Some(false) => alive += 1,
            None => {}
        }
    }
    let m = &ctx.metrics.identity_gc;
    m.entries.get_or_create(&EntryLabels { status: "alive".into(), identity_type: "crd".into() }).set(alive);
    m.entries.get_or_create(&EntryLabels { status: "deleted".into(), identity_type: "crd".into() }).set(deleted);
    m.marked.set(marked);
    caches.ceps.forget_released_except(&existing);
    // A second after the due time, so that the run's clock is past it.
    let next_due = next_due
        .map(|d| Duration::try_from(d.duration_since(jiff::Timestamp::now())).unwrap_or(Duration::ZERO))
        .map(|d| d + Duration::from_secs(1));
    tracing::info!(
        alive,
        deleted,
        marked,
        seconds = format!("{:.3}", started.elapsed().as_secs_f64()),
        next_due_seconds = next_due.map(|d| d.as_secs()),
        "identity GC run done"
    );
    Ok(PassStats { alive, deleted, marked, next_due })
}

/// Exports the label keys with the most distinct values across identities
/// and warns when one of them multiplies identities, naming the `labels`
/// exclusion that would stop it.
fn report_label_explosion<'a>(ctx: &Context, identities: impl Iterator<Item = &'a CiliumIdentity>) {
    let sets: Vec<&std::collections::BTreeMap<String, String>> = identities.map(|i| &i.security_labels).collect();
    let top = cilium_identity::explosion::top_label_keys(sets.iter().copied(), 10);
    let family = &ctx.metrics.identity_gc.label_key_values;
    family.clear();
    for (key, values) in &top {
        family.get_or_create(&KeyLabels { label_key: key.clone() }).set(*values as i64);
    }
    if let Some((key, values)) = top.first()
        && *values >= 50
        && *values * 2 >= sets.len()
    {
        tracing::warn!(
            label_key = %key,
            values,
            identities = sets.len(),
            fix = %format!("add {:?} to the labels option (cilium-config)", cilium_identity::explosion::exclusion_for(key)),
            "label explosion: one label key accounts for most identities"
        );
    }
}

/// Conflicts and NotFound on mark/unmark mean the identity changed or went
/// away since the list: the next run decides again.
fn ignore_gone<T>(r: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_bursts_then_never_exceeds_the_limit_in_any_window() {
        let mut r = RateLimiter::new(3, Duration::from_secs(60));
        let t0 = tokio::time::Instant::now();
        let mut at = Vec::new();
        for _ in 0..7 {
            r.acquire().await;
            at.push(t0.elapsed().as_secs());
        }
        assert_eq!(at, [0, 0, 0, 60, 60, 60, 120], "the limit at once, then the next window's");
        // The default, with permits taken as a GC takes them (a few ms of
        // work each, at times): 2500 at once, 5000 in the first two minutes,
        // and no 60 s window anywhere with more than 2500.
        let mut r = RateLimiter::new(2500, Duration::from_secs(60));
        let t0 = tokio::time::Instant::now();
        let mut at = Vec::new();
        for i in 0..9000u64 {
            r.acquire().await;
            at.push(tokio::time::Instant::now());
            if i % 7 == 0 {
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }
        let within = |d: Duration| at.iter().filter(|t| t.duration_since(t0) < d).count();
        assert_eq!(within(Duration::from_secs(30)), 2500);
        assert_eq!(within(Duration::from_secs(120)), 5000);
        for (i, t) in at.iter().enumerate().skip(2500) {
            assert!(
                t.duration_since(at[i - 2500]) >= Duration::from_secs(60),
                "permits {} and {i} in one window",
                i - 2500
            );
        }
        // Off (a huge limit): never waits, and keeps at most a run per ms.
        let mut r = RateLimiter::new(100_000_000, Duration::from_secs(60));
        let t0 = tokio::time::Instant::now();
        for _ in 0..100_000 {
            r.acquire().await;
        }
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert_eq!(r.recent.len(), 1);
    }

    #[test]
    fn the_endpoint_cache_knows_when_an_identity_lost_its_last_user() {
        let t = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        let mut st = EndpointIdsState::default();
        st.replace([("ns/a".to_string(), 300), ("ns/b".to_string(), 300), ("ns/c".to_string(), 301)].into());
        st.set("ns/a".into(), None, t("2026-12-01T10:00:00Z"));
        assert!(st.released.is_empty(), "300 still has b");
        // b moves to another identity: 300 has no user from then.
        st.set("ns/b".into(), Some(302), t("2026-12-01T10:01:00Z"));
        assert_eq!(st.released.get(&300), Some(&t("2026-12-01T10:01:00Z")));
        // The same update again (a resync) changes nothing.
        st.set("ns/b".into(), Some(302), t("2026-12-01T10:02:00Z"));
        assert_eq!(st.users.get(&302), Some(&1));
        // 300 used again: no longer released.
        st.set("ns/d".into(), Some(300), t("2026-12-01T10:03:00Z"));
        assert_eq!(st.released.get(&300), None);
        st.set("ns/d".into(), None, t("2026-12-01T10:04:00Z"));
        st.set("ns/c".into(), None, t("2026-12-01T10:05:00Z"));
        assert_eq!(st.released.get(&300), Some(&t("2026-12-01T10:04:00Z")));
        assert_eq!(st.released.get(&301), Some(&t("2026-12-01T10:05:00Z")));
        // A relist where 301 is used again keeps only what is still unused.
        st.replace([("ns/e".to_string(), 301)].into());
        assert_eq!(st.released.keys().copied().collect::<Vec<_>>(), vec![300]);
        assert_eq!(st.users, [(301, 1)].into());
    }

    #[test]
    fn the_loop_runs_again_when_a_mark_is_due() {
        let m = |s: u64| Duration::from_secs(s * 60);
        assert_eq!(until_next(m(15), m(1), None), m(14));
        assert_eq!(until_next(m(15), m(1), Some(m(3))), m(3), "due before the interval");
        assert_eq!(until_next(m(15), m(1), Some(m(40))), m(14), "the interval comes first");
        assert_eq!(until_next(m(15), m(20), Some(m(3))), Duration::ZERO);
    }
}
