//! The monitor: datapath events (`cilium_events` ring buffer) read,
//! resolved to pods and identity labels, counted, and streamed to whoever
//! asks on the agent's API socket (`ciliumctl monitor`).
//!
//! The kernel writes an event for every drop, and for every verdict while
//! at least one subscriber asked for verdicts. Nothing is lost silently: a
//! full ring buffer is counted by the kernel (`cilium_events_lost`), a
//! subscriber that cannot keep up is told how many events it missed, and
//! both show in `hubble_lost_events_total{source}` (upstream's name).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cilium_policy::LabelSet;
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;

use crate::datapath::{
    DIR_INGRESS, Datapath, EVENTS_VERDICTS, Event, FIRST_DROP_REASON, MATCH_ANY_PEER, MATCH_PEER,
    REASON_ALLOWED_BY_POLICY, REASON_DENIED_BY_RULE, REASON_ENDPOINT_NOT_READY, REASON_MALFORMED, REASON_NO_POLICY,
    REASON_NOT_ALLOWED, REASON_RELATED, REASON_REPLY, REASON_UNSUPPORTED_L3, ip_of, reason_name,
};

/// Events read from the ring buffer before they are published.
const BATCH: usize = 4096;

/// How many of the last drops the agent keeps for `/v1/status`.
pub const RECENT_DROPS: usize = 256;

/// What the monitor needs to name the ends of a flow; rebuilt by each
/// pass of the agent's reconcile.
#[derive(Default)]
pub struct Directory {
    /// Local endpoint id -> `namespace/pod`.
    pub endpoints: HashMap<u32, String>,
    /// Any endpoint's address in the cluster -> `namespace/pod`.
    pub pods_by_ip: HashMap<IpAddr, String>,
    /// Node addresses -> node name.
    pub nodes_by_ip: HashMap<IpAddr, String>,
    /// Identity -> labels.
    pub labels: BTreeMap<u32, LabelSet>,
}

/// One end of a flow, in the shape of hubble's `Endpoint`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FlowEnd {
    pub identity: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    pub labels: Vec<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FlowIp {
    pub source: String,
    pub destination: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FlowL4 {
    pub protocol: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u16>,
}

/// One datapath verdict, named (close to hubble's flow JSON).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Flow {
    /// RFC 3339, nanoseconds.
    pub time: String,
    pub node_name: String,
    /// `FORWARDED` or `DROPPED`.
    pub verdict: &'static str,
    /// Upstream's drop reason name (hubble's `drop_reason_desc`) for drops.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_reason_desc: Option<&'static str>,
    /// Our reason (the `reason` label of the drop and forward counters).
    pub reason: &'static str,
    /// What decided: a rule entry for the peer's identity, one for any
    /// peer, the default deny, conntrack...
    pub decided_by: &'static str,
    /// `INGRESS` or `EGRESS` of the endpoint.
    pub traffic_direction: &'static str,
    pub endpoint_id: u32,
    #[serde(rename = "IP")]
    pub ip: FlowIp,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l4: Option<FlowL4>,
    pub source: FlowEnd,
    pub destination: FlowEnd,
    pub bytes: u32,
}

/// One line of the stream: a flow, or a count of events the reader
/// missed (hubble's `lost_events`).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    Flow(Box<Flow>),
    LostEvents { source: &'static str, num_events_lost: u64 },
}

/// Upstream's name for a drop reason (hubble `DropReason`).
pub fn drop_reason_desc(reason: u8) -> Option<&'static str> {
    Some(match reason {
        REASON_NOT_ALLOWED => "POLICY_DENIED",
        REASON_DENIED_BY_RULE => "POLICY_DENY",
        REASON_MALFORMED => "INVALID_PACKET_DROPPED",
        REASON_UNSUPPORTED_L3 => "UNSUPPORTED_L3_PROTOCOL",
        REASON_ENDPOINT_NOT_READY => "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION",
        _ => return None,
    })
}

fn decided_by(reason: u8, matched: u8) -> &'static str {
    match (reason, matched) {
        (REASON_ALLOWED_BY_POLICY | REASON_DENIED_BY_RULE, MATCH_PEER) => "policy entry for the peer's identity",
        (REASON_ALLOWED_BY_POLICY | REASON_DENIED_BY_RULE, MATCH_ANY_PEER) => "policy entry for any peer",
        (REASON_NOT_ALLOWED, _) => "default deny (policies select the endpoint, none allows this)",
        (REASON_NO_POLICY, _) => "no policy selects the endpoint in this direction",
        (REASON_REPLY, _) => "connection tracking (reply)",
        (REASON_RELATED, _) => "connection tracking (related ICMP error)",
        (REASON_ENDPOINT_NOT_READY, _) => "endpoint not ready (its policy could not be written)",
        _ => "packet parsing",
    }
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "ICMPv4".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        58 => "ICMPv6".into(),
        132 => "SCTP".into(),
        n => n.to_string(),
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Names an event's ends. `now_wall`/`now_mono` convert the kernel's
/// monotonic stamp to wall time.
pub fn resolve(e: &Event, dir: &Directory, node: &str, now_wall: jiff::Timestamp, now_mono: u64) -> Flow {
    let (src, dst) = (ip_of(&e.saddr), ip_of(&e.daddr));
    let own = dir.endpoints.get(&e.endpoint_id).cloned();
    let end = |identity: u32, ip: IpAddr, local: bool| {
        let pod = if local { own.clone() } else { dir.pods_by_ip.get(&ip).cloned() };
        let (namespace, pod_name) = match pod.as_deref().and_then(|p| p.split_once('/')) {
            Some((ns, name)) => (Some(ns.to_string()), Some(name.to_string())),
            None => (None, None),
        };
        FlowEnd {
            identity,
            namespace,
            pod_name,
            node_name: if local { None } else { dir.nodes_by_ip.get(&ip).cloned() },
            labels: dir.labels.get(&identity).map(LabelSet::to_strings).unwrap_or_default(),
        }
    };
    let ingress = e.direction == DIR_INGRESS;
    let (source, destination) = if ingress {
        (end(e.peer_identity, src, false), end(e.identity, dst, true))
    } else {
        (end(e.identity, src, true), end(e.peer_identity, dst, false))
    };
    let l4 = match e.proto {
        6 | 17 | 132 => Some(FlowL4 {
            protocol: proto_name(e.proto),
            source_port: Some(e.sport),
            destination_port: Some(e.dport),
            icmp_type: None,
        }),
        1 | 58 => Some(FlowL4 {
            protocol: proto_name(e.proto),
            source_port: None,
            destination_port: None,
            icmp_type: Some(e.dport),
        }),
        0 => None,
        p => Some(FlowL4 { protocol: proto_name(p), source_port: None, destination_port: None, icmp_type: None }),
    };
    let age = now_mono.saturating_sub(e.ts_ns);
    let time =
        now_wall.checked_sub(jiff::SignedDuration::from_nanos(age.min(i64::MAX as u64) as i64)).unwrap_or(now_wall);
    let dropped = e.reason >= FIRST_DROP_REASON;
    Flow {
        time: time.to_string(),
        node_name: node.to_string(),
        verdict: if dropped { "DROPPED" } else { "FORWARDED" },
        drop_reason_desc: if dropped { drop_reason_desc(e.reason) } else { None },
        reason: reason_name(e.reason),
        decided_by: decided_by(e.reason, e.matched),
        traffic_direction: if ingress { "INGRESS" } else { "EGRESS" },
        endpoint_id: e.endpoint_id,
        ip: FlowIp { source: src.to_string(), destination: dst.to_string() },
        l4,
        source,
        destination,
        bytes: e.len,
    }
}

/// The monitor's shared state: subscribers, counters, the directory.
pub struct Monitor {
    node: String,
    pins: PathBuf,
    tx: broadcast::Sender<Arc<Message>>,
    subscribers: AtomicUsize,
    verdict_subscribers: AtomicUsize,
    /// Verdict events read, dropped ones apart.
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    /// Lost in the kernel's ring buffer, and by subscribers too slow.
    pub ring_lost: AtomicU64,
    pub queue_lost: AtomicU64,
    pub directory: Mutex<Arc<Directory>>,
    /// The last drops (raw), for `/v1/status` (doctor explains them).
    recent: Mutex<std::collections::VecDeque<Event>>,
}

/// A subscription; dropping it unsubscribes (and turns verdict events off
/// when it was the last to want them).
pub struct Subscription {
    monitor: Arc<Monitor>,
    verdicts: bool,
    rx: broadcast::Receiver<Arc<Message>>,
    /// Ring buffer losses already told to this client.
    ring_lost_seen: u64,
}

impl Subscription {
    /// The next message for this client: a flow, or how many events it
    /// missed since the last such message: lost in the kernel's ring
    /// buffer (`perf_event_ring_buffer`, counted by the reader for every
    /// client) or dropped from this client's queue because it fell behind
    /// (`observer_events_queue`). None when the monitor is gone.
    pub async fn next(&mut self) -> Option<Arc<Message>> {
        loop {
            let lost = self.monitor.ring_lost.load(Ordering::SeqCst);
            if lost > self.ring_lost_seen {
                let n = lost - self.ring_lost_seen;
                self.ring_lost_seen = lost;
                return Some(Arc::new(Message::LostEvents { source: "perf_event_ring_buffer", num_events_lost: n }));
            }
            // Woken at least once a second to report ring losses.
            match tokio::time::timeout(std::time::Duration::from_secs(1), self.rx.recv()).await {
                Err(_) => continue,
                Ok(Ok(m)) => return Some(m),
                Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                    self.monitor.queue_lost.fetch_add(n, Ordering::Relaxed);
                    return Some(Arc::new(Message::LostEvents { source: "observer_events_queue", num_events_lost: n }));
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => return None,
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.monitor.subscribers.fetch_sub(1, Ordering::SeqCst);
        if self.verdicts && self.monitor.verdict_subscribers.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.monitor.set_flags(0);
        }
    }
}

impl Monitor {
    pub fn new(node: &str, pins: PathBuf) -> Arc<Monitor> {
        let (tx, _) = broadcast::channel(8192);
        Arc::new(Monitor {
            node: node.to_string(),
            pins,
            tx,
            subscribers: AtomicUsize::new(0),
            verdict_subscribers: AtomicUsize::new(0),
            forwarded: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            ring_lost: AtomicU64::new(0),
            queue_lost: AtomicU64::new(0),
            directory: Mutex::new(Arc::new(Directory::default())),
            recent: Mutex::new(std::collections::VecDeque::with_capacity(RECENT_DROPS)),
        })
    }

    fn set_flags(&self, flags: u32) {
        if let Err(e) = Datapath::set_event_flags(&self.pins, flags) {
            tracing::warn!(error = %e, "cannot set which verdicts make events");
        }
    }

    /// Whether anyone is watching (events are named only then).
    pub fn watched(&self) -> bool {
        self.subscribers.load(Ordering::SeqCst) > 0
    }

    pub fn subscribe(self: &Arc<Self>, verdicts: bool) -> Subscription {
        let rx = self.tx.subscribe();
        self.subscribers.fetch_add(1, Ordering::SeqCst);
        if verdicts && self.verdict_subscribers.fetch_add(1, Ordering::SeqCst) == 0 {
            self.set_flags(EVENTS_VERDICTS);
        }
        let ring_lost_seen = self.ring_lost.load(Ordering::SeqCst);
        Subscription { monitor: self.clone(), verdicts, rx, ring_lost_seen }
    }

    /// Reads the ring buffer until the process ends. Drop events come
    /// whether or not anyone watches (they are counted); they are named
    /// only when someone does.
    pub async fn run_reader(self: Arc<Self>) -> anyhow::Result<()> {
        // Verdict events stay off until someone asks (a previous agent may
        // have left them on).
        self.set_flags(0);
        let ring = Datapath::pinned_events(&self.pins)?;
        // SAFETY: the ring buffer owns its map's file descriptor for as
        // long as it lives, and always returns that one.
        let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("polling the event ring buffer: {}", e.into_parts().1))?;
        let lost_map = Datapath::pinned_events_lost_map(&self.pins)?;
        let lost_now = || lost_map.get(&0, 0).unwrap_or(0);
        let mut lost_seen = lost_now();
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            // Woken by the kernel, or once a second to report losses even
            // when no event follows them.
            let guard = tokio::select! {
                g = fd.readable_mut() => Some(g?),
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => None,
            };
            if let Some(mut guard) = guard {
                // Cleared before draining: an event submitted after the last
                // read wakes us again (the kernel wakes a reader that has
                // caught up); cleared after, that wakeup could be lost and
                // the reader would stall.
                guard.clear_ready();
                let ring = guard.get_inner_mut();
                loop {
                    batch.clear();
                    while batch.len() < BATCH {
                        let Some(item) = ring.next() else { break };
                        if let Some(e) = Event::from_bytes(&item) {
                            batch.push(e);
                        }
                    }
                    self.publish(&batch);
                    if batch.len() < BATCH {
                        break;
                    }
                    // Let the clients' streams run between batches.
                    tokio::task::yield_now().await;
                }
            }
            let lost = lost_now();
            if lost > lost_seen {
                let n = lost - lost_seen;
                lost_seen = lost;
                // Each client is told by its subscription.
                self.ring_lost.fetch_add(n, Ordering::SeqCst);
                tracing::warn!(events = n, "datapath event ring buffer was full: events lost");
            }
        }
    }

    fn publish(&self, batch: &[Event]) {
        {
            let mut recent = self.recent.lock().expect("recent drops");
            for e in batch {
                if e.reason >= FIRST_DROP_REASON {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    if recent.len() == RECENT_DROPS {
                        recent.pop_front();
                    }
                    recent.push_back(*e);
                } else {
                    self.forwarded.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if !self.watched() || batch.is_empty() {
            return;
        }
        let dir = self.directory.lock().expect("directory").clone();
        let (wall, mono) = (jiff::Timestamp::now(), monotonic_ns());
        for e in batch {
            let _ = self.tx.send(Arc::new(Message::Flow(Box::new(resolve(e, &dir, &self.node, wall, mono)))));
        }
    }

    /// The last drops (at most `RECENT_DROPS`), named now.
    pub fn recent_drops(&self) -> Vec<Flow> {
        let dir = self.directory.lock().expect("directory").clone();
        let (wall, mono) = (jiff::Timestamp::now(), monotonic_ns());
        self.recent.lock().expect("recent drops").iter().map(|e| resolve(e, &dir, &self.node, wall, mono)).collect()
    }

    /// The `hubble_*` metrics text.
    pub fn metrics(&self) -> String {
        format!(
            "# HELP hubble_flows_processed_total Datapath verdict events read by the agent's monitor, by verdict\n\
             # TYPE hubble_flows_processed_total counter\n\
             hubble_flows_processed_total{{type=\"L3_L4\",verdict=\"FORWARDED\"}} {}\n\
             hubble_flows_processed_total{{type=\"L3_L4\",verdict=\"DROPPED\"}} {}\n\
             # HELP hubble_lost_events_total Events lost: the datapath's ring buffer was full (perf_event_ring_buffer), or a monitor client could not keep up (observer_events_queue)\n\
             # TYPE hubble_lost_events_total counter\n\
             hubble_lost_events_total{{source=\"perf_event_ring_buffer\"}} {}\n\
             hubble_lost_events_total{{source=\"observer_events_queue\"}} {}\n",
            self.forwarded.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
            self.ring_lost.load(Ordering::Relaxed),
            self.queue_lost.load(Ordering::Relaxed),
        )
    }
}

/// The NDJSON stream for one subscriber of `GET /v1/monitor?type=drop|verdict`
/// (`query`: the raw query string; `type` defaults to `drop`; `verdict`
/// streams every verdict, drops included).
pub fn stream(
    monitor: &Arc<Monitor>,
    query: Option<&str>,
) -> Result<impl futures::Stream<Item = Result<axum::body::Bytes, std::convert::Infallible>> + use<>, String> {
    let kind = query.into_iter().flat_map(|q| q.split('&')).find_map(|kv| kv.strip_prefix("type="));
    let verdicts = match kind {
        None | Some("drop") => false,
        Some("verdict") | Some("policy-verdict") => true,
        Some(other) => return Err(format!("unknown event type {other:?}: drop or verdict")),
    };
    let sub = monitor.subscribe(verdicts);
    Ok(futures::stream::unfold(sub, move |mut sub| async move {
        let line = loop {
            let m = sub.next().await?;
            if !verdicts && matches!(&*m, Message::Flow(f) if f.verdict != "DROPPED") {
                continue;
            }
            break serde_json::to_string(&*m).expect("message serializes");
        };
        Some((Ok(axum::body::Bytes::from(line + "\n")), sub))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::DIR_EGRESS;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[10] = 0xff;
        out[11] = 0xff;
        out[12..].copy_from_slice(&a);
        out
    }

    fn directory() -> Directory {
        let mut d = Directory::default();
        d.endpoints.insert(7, "default/deathstar-1".into());
        d.pods_by_ip.insert("10.0.2.9".parse().unwrap(), "default/xwing".into());
        d.labels.insert(100, LabelSet::parse(["k8s:class=deathstar", "k8s:org=empire"]));
        d.labels.insert(200, LabelSet::parse(["k8s:class=xwing", "k8s:org=alliance"]));
        d.nodes_by_ip.insert("192.168.200.12".parse().unwrap(), "node-b".into());
        d
    }

    #[test]
    fn an_ingress_drop_names_both_pods_their_identities_and_the_reason() {
        let e = Event {
            ts_ns: 1_000_000_000,
            endpoint_id: 7,
            identity: 100,
            peer_identity: 200,
            len: 60,
            saddr: v4([10, 0, 2, 9]),
            daddr: v4([10, 0, 1, 5]),
            sport: 43210,
            dport: 80,
            proto: 6,
            direction: DIR_INGRESS,
            reason: REASON_NOT_ALLOWED,
            matched: 0,
        };
        let now: jiff::Timestamp = "2026-12-01T12:00:10Z".parse().unwrap();
        let f = resolve(&e, &directory(), "node-a", now, 3_000_000_000);
        assert_eq!(f.time, "2026-12-01T12:00:08Z", "2 s before now");
        assert_eq!((f.verdict, f.drop_reason_desc, f.reason), ("DROPPED", Some("POLICY_DENIED"), "not-allowed"));
        assert_eq!(f.source.pod_name.as_deref(), Some("xwing"));
        assert_eq!(f.source.identity, 200);
        assert_eq!(f.source.labels, vec!["k8s:class=xwing", "k8s:org=alliance"]);
        assert_eq!(f.destination.pod_name.as_deref(), Some("deathstar-1"));
        assert_eq!(f.destination.namespace.as_deref(), Some("default"));
        assert_eq!(f.destination.identity, 100);
        assert_eq!((f.ip.source.as_str(), f.ip.destination.as_str()), ("10.0.2.9", "10.0.1.5"));
        let l4 = f.l4.unwrap();
        assert_eq!((l4.protocol.as_str(), l4.source_port, l4.destination_port), ("TCP", Some(43210), Some(80)));
        assert_eq!(f.traffic_direction, "INGRESS");
        assert!(f.decided_by.starts_with("default deny"));
    }

    #[test]
    fn an_egress_verdict_puts_the_endpoint_first_and_names_a_node_peer() {
        let e = Event {
            endpoint_id: 7,
            identity: 100,
            peer_identity: 6,
            saddr: v4([10, 0, 1, 5]),
            daddr: v4([192, 168, 200, 12]),
            proto: 1,
            dport: 8,
            direction: DIR_EGRESS,
            reason: REASON_ALLOWED_BY_POLICY,
            matched: MATCH_ANY_PEER,
            ..Default::default()
        };
        let f = resolve(&e, &directory(), "node-a", jiff::Timestamp::now(), 0);
        assert_eq!((f.verdict, f.drop_reason_desc), ("FORWARDED", None));
        assert_eq!(f.source.pod_name.as_deref(), Some("deathstar-1"));
        assert_eq!(f.destination.node_name.as_deref(), Some("node-b"));
        assert_eq!(f.destination.pod_name, None);
        assert_eq!(f.l4.as_ref().unwrap().icmp_type, Some(8));
        assert_eq!(f.decided_by, "policy entry for any peer");
        let line = serde_json::to_value(Message::Flow(Box::new(f))).unwrap();
        assert_eq!(line["flow"]["IP"]["destination"], "192.168.200.12");
        let lost =
            serde_json::to_value(Message::LostEvents { source: "perf_event_ring_buffer", num_events_lost: 3 }).unwrap();
        assert_eq!(lost["lost_events"]["num_events_lost"], 3);
    }
}
