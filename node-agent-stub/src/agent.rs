//! The agent's work: register the CiliumNode, then keep the node's pods,
//! the ipcache and every local endpoint's policy in line with the cluster.
//! One reconcile loop, woken by any watched change (Pods on this node,
//! CiliumEndpoints, CiliumIdentities, policies, CiliumNodes).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use cilium_cni::api::{AddReply, AddRequest, ApiError, AttachmentRef};
use cilium_cni::spec::Code;
use cilium_crds::policy::{CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy};
use cilium_crds::{CiliumCidrGroup, CiliumEndpoint, CiliumIdentity, CiliumNode};
use cilium_identity::{Label, LabelFilter, Labels};
use cilium_identity_alloc::crd::CrdAllocator;
use cilium_identity_alloc::doublewrite::{DoubleWriteAllocator, ReadFrom};
use cilium_identity_alloc::kvstore::KvstoreAllocator;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use cilium_policy::engine::{NamedPort, Selections};
use cilium_policy::{EndpointPolicy, Entry, Peer, PolicyRef, Prefix};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::cni::{self, Call};
use crate::config::Settings;
use crate::datapath::{DIR_EGRESS, DIR_INGRESS, Datapath, ENDPOINT_FAILED, ENDPOINT_READY, EndpointValue, PolicyEntry};
use crate::enforce::{CidrIdentities, NodeIdentities};
use crate::health::Health;
use crate::netns;
use crate::state::{EndpointRecord, Store as StateStore};
use cilium_policy::cluster;

pub const FIELD_MANAGER: &str = "cilium-node-agent";
/// Reserved identities of nodes (upstream's numbers).
pub const IDENTITY_HOST: u32 = cilium_policy::identity::HOST;
pub const IDENTITY_REMOTE_NODE: u32 = cilium_policy::identity::REMOTE_NODE;

pub enum Allocator {
    Crd(Box<CrdAllocator>),
    Kvstore(Box<KvstoreAllocator>),
    DoubleWrite(Box<DoubleWriteAllocator>),
}

impl Allocator {
    async fn allocate(&self, labels: &Labels) -> Result<u32, cilium_identity_alloc::AllocError> {
        Ok(match self {
            Allocator::Crd(a) => a.allocate(labels).await?.id,
            Allocator::Kvstore(a) => a.allocate(labels).await?.id,
            Allocator::DoubleWrite(a) => a.allocate(labels).await?.id,
        })
    }

    /// kvstore IDs of ours found holding other labels since the last call.
    fn take_lost(&self) -> BTreeSet<u32> {
        match self {
            Allocator::Crd(_) => BTreeSet::new(),
            Allocator::Kvstore(a) => a.take_lost(),
            Allocator::DoubleWrite(a) => a.kv.take_lost(),
        }
    }
}

/// A local endpoint as the agent runs it.
struct Live {
    rec: EndpointRecord,
    ifindex: u32,
    identity: u32,
    labels: Labels,
    /// Named container ports (for named ports in policies).
    ports: Vec<NamedPort>,
    computed: EndpointPolicy,
    /// Whether the datapath holds the endpoint's whole policy (false: a
    /// map write failed and every packet of the endpoint is dropped).
    ready: bool,
    /// The CEP body last written (rewritten only when it changes).
    written: Option<serde_json::Value>,
    reported: BTreeSet<String>,
    /// Since when its CiliumIdentity is missing from the watch.
    missing_since: Option<std::time::Instant>,
}

/// How long a CNI ADD waits for the pod to show in the agent's cache and
/// its endpoint to enforce its policy.
const ADD_WAIT: Duration = Duration::from_secs(25);

/// A CNI ADD waiting for its endpoint to enforce its policy.
struct PendingAdd {
    req: AddRequest,
    reply: tokio::sync::oneshot::Sender<Result<AddReply, ApiError>>,
    deadline: std::time::Instant,
    /// The pod's UID, once the pod is in the cache and its endpoint is
    /// recorded.
    uid: Option<String>,
}

/// What the metrics and health endpoints need from the agent (the
/// counters themselves are read from the pinned map on each scrape).
#[derive(Default)]
pub struct Snapshot {
    pub endpoint_names: BTreeMap<u32, String>,
    pub ready: bool,
    /// Endpoints whose policy could not be written (dropping everything).
    pub endpoints_not_ready: usize,
    /// Failed writes to the policy map.
    pub policy_map_errors: u64,
    /// Entries in the ipcache and in the policy map (the agent's copies),
    /// for `cilium_bpf_map_pressure`.
    pub ipcache_entries: usize,
    pub policy_entries: usize,
    /// Objects skipped because they do not decode, by kind (each time one
    /// is listed or changed).
    pub malformed_objects: BTreeMap<String, u64>,
    /// This node's pod addresses (`cilium status`'s IPAM line).
    pub ipam: IpamStatus,
}

/// The node's address pool as the agent uses it: upstream's "IPv4: 5/254
/// allocated from 10.0.1.0/24".
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct IpamStatus {
    pub cidr: String,
    /// Addresses held: endpoints and the health endpoint.
    pub allocated: usize,
    /// Host addresses of the pod CIDR (network and broadcast excluded).
    pub capacity: usize,
}

struct Stores {
    pods: Store<Pod>,
    ceps: Store<CiliumEndpoint>,
    ids: Store<CiliumIdentity>,
    cnps: Store<CiliumNetworkPolicy>,
    ccnps: Store<CiliumClusterwideNetworkPolicy>,
    knps: Store<NetworkPolicy>,
    namespaces: Store<Namespace>,
    cnodes: Store<CiliumNode>,
    /// This node's own Node (its labels).
    node: Store<Node>,
    cidr_groups: Store<CiliumCidrGroup>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
}

pub struct Agent {
    s: Settings,
    client: kube::Client,
    dp: Datapath,
    state: StateStore,
    alloc: Allocator,
    filter: LabelFilter,
    node_ip: Ipv4Addr,
    /// Dual stack: this node's IPv6 fabric address and IPv6 pod range.
    node_ip6: Option<std::net::Ipv6Addr>,
    pod_range: (u32, u32),
    pod_range6: Option<(u128, u128)>,
    live: BTreeMap<String, Live>,
    cidrs: CidrIdentities,
    /// Per-node identities (`enable-node-selector-labels`).
    node_ids: NodeIdentities,
    /// Which node labels count (`node-labels`).
    node_filter: LabelFilter,
    /// The Node labels last copied into this node's CiliumNode.
    cnode_labels: BTreeMap<String, String>,
    node_uid: String,
    policy_cfg: cilium_policy::Config,
    /// Refused policies already reported (policy -> reason).
    refused_reported: BTreeMap<PolicyRef, String>,
    /// CiliumCIDRGroups (name, resourceVersion) with bad CIDRs, reported.
    bad_groups_reported: BTreeSet<(String, String)>,
    routes: BTreeMap<String, std::net::IpAddr>,
    pub snapshot: Arc<Mutex<Snapshot>>,
    /// Names for the monitor's events.
    monitor: Arc<crate::monitor::Monitor>,
    /// The health prober's targets (None: health checking is off) and
    /// this node's health endpoint address.
    health: Option<Arc<Health>>,
    health_ip: Option<Ipv4Addr>,
    /// CNI ADDs not answered yet.
    pending_adds: Vec<PendingAdd>,
    /// The last error making each endpoint (pod UID -> error), for the
    /// answer to a CNI ADD.
    endpoint_errors: BTreeMap<String, String>,
}

/// This node's health endpoint (an address from the pod CIDR, kept across
/// restarts), the responders on the node and the endpoint, and the prober.
fn start_health(
    s: &Settings,
    state: &mut StateStore,
    pod_range: (u32, u32),
    h: Arc<Health>,
) -> anyhow::Result<Ipv4Addr> {
    let ip = match state.state.health_ip.filter(|ip| (pod_range.0..=pod_range.1).contains(&u32::from(*ip))) {
        Some(ip) => ip,
        None => {
            let ip = state
                .free_ip(pod_range.0, pod_range.1)
                .ok_or_else(|| anyhow!("no free address for the health endpoint"))?;
            state.state.health_ip = Some(ip);
            state.save()?;
            ip
        }
    };
    let node_ns = s.node_ns();
    let health_ns = s.health_ns();
    netns::make_pod(&node_ns, &health_ns, crate::health::HEALTH_IFNAME, ip, None)?;
    netns::plug_pod(&node_ns, crate::health::HEALTH_IFNAME, ip, None)?;
    crate::health::serve(&netns::path(&node_ns))?;
    crate::health::serve(&netns::path(&health_ns))?;
    crate::health::start_prober(h, &s.flags.node_name, &netns::path(&node_ns), s.health_probe_interval)?;
    tracing::info!(ip = %ip, interval = ?s.health_probe_interval, "health endpoint up, probing every node");
    Ok(ip)
}

/// Server-side applies this node's CiliumNode: owned by its Node, its
/// address, and the Node's labels (upstream's agent copies them).
async fn apply_cilium_node(
    cnodes: &Api<CiliumNode>,
    node: &str,
    node_uid: &str,
    addresses: &[std::net::IpAddr],
    labels: &BTreeMap<String, String>,
    health: Option<Ipv4Addr>,
) -> kube::Result<()> {
    let addresses: Vec<serde_json::Value> =
        addresses.iter().map(|ip| json!({ "type": "InternalIP", "ip": ip.to_string() })).collect();
    let mut spec = json!({ "addresses": addresses });
    if let Some(h) = health {
        spec["health"] = json!({ "ipv4": h.to_string() });
    }
    let body = json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNode",
        "metadata": { "name": node, "labels": labels, "ownerReferences": [{
            "apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid }] },
        "spec": spec,
    });
    cnodes.patch(node, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await.map(|_| ())
}

/// This node's addresses: IPv4, and IPv6 in dual stack.
fn node_addresses(v4: Ipv4Addr, v6: Option<std::net::Ipv6Addr>) -> Vec<std::net::IpAddr> {
    std::iter::once(v4.into()).chain(v6.map(Into::into)).collect()
}

/// Polls a cache's watch stream for the life of the agent, waking the
/// reconcile loop on every event (watch errors are retried with backoff).
fn drive<T, E: std::fmt::Display>(
    stream: impl futures::Stream<Item = Result<T, E>> + Send + 'static,
    wake: Arc<tokio::sync::Notify>,
) {
    tokio::spawn(async move {
        stream
            .for_each(|ev| {
                if let Err(e) = &ev {
                    tracing::debug!(error = %e, "watch error (retrying)");
                }
                wake.notify_one();
                futures::future::ready(())
            })
            .await;
    });
}

fn spawn_store<K>(api: Api<K>, cfg: watcher::Config, wake: Arc<tokio::sync::Notify>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, cfg)).default_backoff();
    drive(stream, wake);
    reader
}

/// Like [`spawn_store`] for our CRD kinds, which a user, another agent or
/// an older schema may have written in a shape we cannot decode: such an
/// object is left out of the cache, logged and counted, and the cache
/// keeps working (a typed watch would retry its failing list forever).
fn spawn_guarded<K: cilium_crds::guard::Cached>(
    client: &kube::Client,
    cfg: watcher::Config,
    wake: Arc<tokio::sync::Notify>,
    snapshot: Arc<Mutex<Snapshot>>,
) -> Store<K> {
    let kind = K::kind(&()).into_owned();
    let api: Api<kube::core::DeserializeGuard<K>> = Api::all(client.clone());
    let (reader, stream) = cilium_crds::guard::reflector(api, cfg, move |bad| {
        *snapshot.lock().expect("snapshot").malformed_objects.entry(kind.clone()).or_default() += 1;
        tracing::warn!(kind, name = %cilium_crds::guard::name_of(bad), error = %bad.error, "skipping an object that cannot be decoded");
    });
    drive(stream, wake);
    reader
}

impl Agent {
    /// The CIDR groups as the engine reads them; a CIDR that does not
    /// parse is skipped and logged once per change of the group.
    fn cidr_groups(&mut self, objects: &[Arc<CiliumCidrGroup>]) -> Vec<cilium_policy::cidr_group::CidrGroup> {
        let mut out = Vec::new();
        for o in objects {
            let (g, bad) = cilium_policy::cidr_group::CidrGroup::from_crd(o);
            let version = o.metadata.resource_version.clone().unwrap_or_default();
            if !bad.is_empty() && self.bad_groups_reported.insert((g.name.clone(), version)) {
                tracing::warn!(group = %g.name, problems = ?bad, "CiliumCIDRGroup: skipping CIDRs that do not parse");
            }
            out.push(g);
        }
        out
    }

    pub async fn start(
        s: Settings,
        client: kube::Client,
        snapshot: Arc<Mutex<Snapshot>>,
        monitor: Arc<crate::monitor::Monitor>,
        health: Option<Arc<Health>>,
    ) -> anyhow::Result<Agent> {
        let node = &s.flags.node_name;
        let (ip_text, _) = s
            .flags
            .node_ip
            .split_once('/')
            .ok_or_else(|| anyhow!("--node-ip needs a prefix length, e.g. 192.168.200.11/24"))?;
        let node_ip: Ipv4Addr = ip_text.parse().with_context(|| format!("invalid --node-ip {}", s.flags.node_ip))?;
        let filter = LabelFilter::new(&s.label_patterns.iter().map(String::as_str).collect::<Vec<_>>())
            .map_err(|e| anyhow!("invalid labels option: {e}"))?;

        crate::datapath::ensure_bpffs()?;
        let mut dp = Datapath::load_sized(&s.bpf_root(), s.flags.bpf_policy_map_max)?;
        let ipcache_now = dp.ipcache_entries()?;
        let cidrs = CidrIdentities::from_ipcache(&ipcache_now);
        let node_ids = NodeIdentities::from_ipcache(&ipcache_now);
        let node_filter = LabelFilter::for_nodes(&s.node_label_patterns.iter().map(String::as_str).collect::<Vec<_>>())
            .map_err(|e| anyhow!("invalid node-labels option: {e}"))?;
        let state = StateStore::open(&s.state_dir())?;

        // The CiliumNode, owned by the Node.
        let k8s_node =
            Api::<Node>::all(client.clone()).get(node).await.with_context(|| format!("reading Node {node}"))?;
        let node_uid = k8s_node.metadata.uid.clone().unwrap_or_default();
        let cnode_labels = k8s_node.metadata.labels.clone().unwrap_or_default();
        let cnodes: Api<CiliumNode> = Api::all(client.clone());
        apply_cilium_node(&cnodes, node, &node_uid, &node_addresses(node_ip, None), &cnode_labels, None)
            .await
            .with_context(|| format!("registering CiliumNode {node}"))?;
        tracing::info!(node = %node, ip = %node_ip, "CiliumNode registered, waiting for a pod CIDR");
        // The operator assigns both families in one pass when its IPv6
        // pool is on: an IPv6 pod CIDR next to the IPv4 one makes this
        // node dual stack.
        let (pod_cidr, pod_cidr6) = loop {
            let n = cnodes.get(node).await?;
            if let Some(c) = n.pod_cidrs().iter().find(|c| !c.contains(':')) {
                break (c.clone(), n.pod_cidrs().iter().find(|c| c.contains(':')).cloned());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let cidr: cilium_ipam::Cidr = pod_cidr.parse().map_err(|e| anyhow!("pod CIDR {pod_cidr}: {e}"))?;
        let pod_range = (cidr.first() as u32, cidr.last() as u32);
        let pod_range6 = match &pod_cidr6 {
            Some(c6) => {
                let c: cilium_ipam::Cidr = c6.parse().map_err(|e| anyhow!("IPv6 pod CIDR {c6}: {e}"))?;
                Some((c.first(), c.last()))
            }
            None => None,
        };
        tracing::info!(pod_cidr = %pod_cidr, pod_cidr6 = ?pod_cidr6, "pod CIDR assigned");

        netns::ensure_node(&s.node_ns(), &s.fabric_ns(), &s.flags.node_ip)?;
        let node_ip6 = pod_range6.map(|_| netns::node_ipv6(node_ip));
        if let Some(ip6) = node_ip6 {
            netns::ensure_node_ipv6(&s.node_ns(), ip6)?;
        }
        let mut state = state;
        let health_ip = match &health {
            Some(h) => Some(start_health(&s, &mut state, pod_range, h.clone())?),
            None => None,
        };
        if node_ip6.is_some() || health_ip.is_some() {
            // Other nodes route this node's IPv6 pod CIDR through it, and
            // probe its health endpoint.
            apply_cilium_node(&cnodes, node, &node_uid, &node_addresses(node_ip, node_ip6), &cnode_labels, health_ip)
                .await
                .with_context(|| format!("publishing the addresses of CiliumNode {node}"))?;
        }

        let range = cilium_identity::cluster_range(s.cluster_id, s.max_connected_clusters)?;
        let kv = || async {
            let ep = s.kvstore.clone().expect("checked by Settings");
            // Every request has a deadline: a black-holed etcd fails requests
            // instead of hanging the reconcile loop.
            let opts = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(5))
                .with_timeout(Duration::from_secs(5))
                .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
            let c = etcd_client::Client::connect([ep.as_str()], Some(opts))
                .await
                .with_context(|| format!("connecting to etcd {ep}"))?;
            anyhow::Ok(KvstoreAllocator::with_ttl(c, range.clone(), &node_ip.to_string(), s.kvstore_lease_ttl).await?)
        };
        let crd = || CrdAllocator::new(client.clone(), range.clone(), FIELD_MANAGER);
        let alloc = match s.mode.as_str() {
            "crd" => Allocator::Crd(Box::new(crd())),
            "kvstore" => Allocator::Kvstore(Box::new(kv().await?)),
            "doublewrite-readkvstore" => {
                Allocator::DoubleWrite(Box::new(DoubleWriteAllocator::new(crd(), kv().await?, ReadFrom::Kvstore)))
            }
            _ => Allocator::DoubleWrite(Box::new(DoubleWriteAllocator::new(crd(), kv().await?, ReadFrom::Crd))),
        };
        let policy_cfg = cilium_policy::Config {
            cluster_name: s.cluster_name.clone(),
            ipv4: true,
            ipv6: pod_range6.is_some(),
            enable_node_selector_labels: s.node_selector_labels,
        };
        Ok(Agent {
            s,
            client,
            dp,
            state,
            alloc,
            filter,
            node_ip,
            node_ip6,
            pod_range,
            pod_range6,
            live: BTreeMap::new(),
            cidrs,
            node_ids,
            node_filter,
            cnode_labels,
            node_uid,
            policy_cfg,
            refused_reported: BTreeMap::new(),
            bad_groups_reported: BTreeSet::new(),
            routes: BTreeMap::new(),
            snapshot,
            monitor,
            health,
            health_ip,
            pending_adds: Vec::new(),
            endpoint_errors: BTreeMap::new(),
        })
    }

    /// Runs until `stop`. With `--cni`, `calls` brings the plugin's
    /// requests from the API socket.
    pub async fn run(
        mut self,
        stop: tokio_util::sync::CancellationToken,
        mut calls: Option<tokio::sync::mpsc::Receiver<Call>>,
    ) -> anyhow::Result<()> {
        let wake = Arc::new(tokio::sync::Notify::new());
        let c = &self.client;
        let cfg = watcher::Config::default();
        let snap = self.snapshot.clone();
        let stores = Stores {
            pods: spawn_store(
                Api::<Pod>::all(c.clone()),
                watcher::Config::default().fields(&format!("spec.nodeName={}", self.s.flags.node_name)),
                wake.clone(),
            ),
            ceps: spawn_guarded::<CiliumEndpoint>(c, cfg.clone(), wake.clone(), snap.clone()),
            ids: spawn_guarded::<CiliumIdentity>(c, cfg.clone(), wake.clone(), snap.clone()),
            cnps: spawn_guarded::<CiliumNetworkPolicy>(c, cfg.clone(), wake.clone(), snap.clone()),
            ccnps: spawn_guarded::<CiliumClusterwideNetworkPolicy>(c, cfg.clone(), wake.clone(), snap.clone()),
            knps: spawn_store(Api::<NetworkPolicy>::all(c.clone()), cfg.clone(), wake.clone()),
            namespaces: spawn_store(Api::<Namespace>::all(c.clone()), cfg.clone(), wake.clone()),
            cnodes: spawn_guarded::<CiliumNode>(c, cfg.clone(), wake.clone(), snap.clone()),
            node: spawn_store(
                Api::<Node>::all(c.clone()),
                watcher::Config::default().fields(&format!("metadata.name={}", self.s.flags.node_name)),
                wake.clone(),
            ),
            cidr_groups: spawn_guarded::<CiliumCidrGroup>(c, cfg.clone(), wake.clone(), snap.clone()),
            services: spawn_store(Api::<Service>::all(c.clone()), cfg.clone(), wake.clone()),
            endpoint_slices: spawn_store(Api::<EndpointSlice>::all(c.clone()), cfg, wake.clone()),
        };
        for (name, ready) in [
            ("pods", stores.pods.wait_until_ready().boxed()),
            ("ciliumendpoints", stores.ceps.wait_until_ready().boxed()),
            ("ciliumidentities", stores.ids.wait_until_ready().boxed()),
            ("ciliumnetworkpolicies", stores.cnps.wait_until_ready().boxed()),
            ("ciliumclusterwidenetworkpolicies", stores.ccnps.wait_until_ready().boxed()),
            ("networkpolicies", stores.knps.wait_until_ready().boxed()),
            ("namespaces", stores.namespaces.wait_until_ready().boxed()),
            ("ciliumnodes", stores.cnodes.wait_until_ready().boxed()),
            ("node", stores.node.wait_until_ready().boxed()),
            ("ciliumcidrgroups", stores.cidr_groups.wait_until_ready().boxed()),
            ("services", stores.services.wait_until_ready().boxed()),
            ("endpointslices", stores.endpoint_slices.wait_until_ready().boxed()),
        ] {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                r = ready => r.map_err(|e| anyhow!("{name} cache: {e}"))?,
            }
        }
        tracing::info!("caches synced, enforcing");
        self.snapshot.lock().expect("snapshot").ready = true;
        if let Some(path) = &self.s.flags.write_cni_conf_when_ready {
            cni::write_conflist(path, &self.s.flags.socket_path)?;
            tracing::info!(path = %path.display(), "CNI configuration written: the node's pods can be networked");
        }
        loop {
            self.admit_adds(&stores).await;
            if let Err(e) = self.reconcile(&stores).await {
                tracing::warn!(error = format!("{e:#}"), "reconcile failed, retrying");
            }
            self.answer_adds();
            self.refresh_snapshot();
            // A waiting ADD looks for its pod again soon.
            let tick = if self.pending_adds.is_empty() { Duration::from_secs(2) } else { Duration::from_millis(200) };
            tokio::select! {
                _ = stop.cancelled() => {
                    self.uninstall_cni_conf();
                    return Ok(());
                }
                _ = wake.notified() => {}
                Some(call) = next_call(&mut calls) => self.handle_call(call, &stores).await,
                _ = tokio::time::sleep(tick) => {}
            }
        }
    }

    /// `--cni-uninstall`: the conflist this agent wrote goes when it stops.
    fn uninstall_cni_conf(&self) {
        let (Some(path), true) = (&self.s.flags.write_cni_conf_when_ready, self.s.flags.cni_uninstall) else { return };
        match std::fs::remove_file(path) {
            Ok(()) => tracing::info!(path = %path.display(), "CNI configuration removed (cni-uninstall)"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "removing the CNI configuration failed"),
        }
    }

    async fn handle_call(&mut self, call: Call, st: &Stores) {
        match call {
            Call::Add(req, reply) => {
                tracing::info!(pod = %format!("{}/{}", req.pod_namespace, req.pod_name), container = %req.container_id, netns = %req.netns, "CNI ADD");
                let deadline = std::time::Instant::now() + ADD_WAIT;
                self.pending_adds.push(PendingAdd { req, reply, deadline, uid: None });
            }
            Call::Del(r, reply) => {
                let _ = reply.send(self.cni_del(&r, st).await);
            }
            Call::Check(r, reply) => {
                let _ = reply.send(self.cni_check(&r));
            }
        }
    }

    /// The pod of each waiting ADD, once the cache has it: its endpoint is
    /// recorded (address, interface names) for this pass to make.
    async fn admit_adds(&mut self, st: &Stores) {
        let pods = st.pods.state();
        let mut i = 0;
        while i < self.pending_adds.len() {
            if self.pending_adds[i].uid.is_some() {
                i += 1;
                continue;
            }
            let req = self.pending_adds[i].req.clone();
            let uid = pods
                .iter()
                .filter(|p| {
                    p.metadata.namespace.as_deref() == Some(req.pod_namespace.as_str())
                        && p.metadata.name.as_deref() == Some(req.pod_name.as_str())
                })
                .filter_map(|p| p.metadata.uid.clone())
                .find(|u| req.pod_uid.as_ref().is_none_or(|want| want == u));
            let Some(uid) = uid else {
                i += 1;
                continue;
            };
            match self.record_cni(&uid, &req, st).await {
                Ok(()) => {
                    self.pending_adds[i].uid = Some(uid);
                    i += 1;
                }
                Err(e) => {
                    let p = self.pending_adds.remove(i);
                    let _ = p.reply.send(Err(e));
                }
            }
        }
    }

    /// Records the endpoint of a CNI ADD: a retried ADD finds its record; a
    /// pod whose sandbox was made again loses the old one's endpoint first.
    async fn record_cni(&mut self, uid: &str, req: &AddRequest, st: &Stores) -> Result<(), ApiError> {
        if let Some(rec) = self.state.state.endpoints.get(uid) {
            if rec.container_id.as_deref() == Some(req.container_id.as_str()) {
                return Ok(());
            }
            tracing::info!(pod = %format!("{}/{}", rec.namespace, rec.name), old = ?rec.container_id, new = %req.container_id, "the pod has a new sandbox: removing the old one's endpoint");
            self.teardown(uid, &ceps_by_name(st)).await;
        }
        let ip = self.state.free_ip(self.pod_range.0, self.pod_range.1).ok_or_else(|| {
            cni::error(Code::TryAgainLater, "no free address in this node's pod CIDR (ciliumctl ipam shows the pools)")
        })?;
        let rec = EndpointRecord {
            namespace: req.pod_namespace.clone(),
            name: req.pod_name.clone(),
            ip,
            ip6: self.ipv6_for(ip),
            endpoint_id: self.state.next_endpoint_id(),
            netns: req.netns.clone(),
            lxc: netns::ifname("lxc", &req.container_id),
            container_id: Some(req.container_id.clone()),
            ifname: Some(req.ifname.clone()),
        };
        self.state.state.endpoints.insert(uid.to_string(), rec);
        // An error of the pod's earlier sandbox is not this one's.
        self.endpoint_errors.remove(uid);
        // Remembered before anything is made: a crash never leaks or
        // reuses the address.
        self.state.save().map_err(|e| cni::error(Code::Io, format!("saving the agent's state: {e:#}")))
    }

    /// Answers each waiting ADD whose endpoint enforces its policy and has
    /// its identity and CiliumEndpoint; one whose endpoint failed, or that
    /// waited too long, gets the reason.
    fn answer_adds(&mut self) {
        let now = std::time::Instant::now();
        for p in std::mem::take(&mut self.pending_adds) {
            let pod = format!("{}/{}", p.req.pod_namespace, p.req.pod_name);
            let live = p.uid.as_ref().and_then(|u| self.live.get(u));
            let failed = p.uid.as_ref().and_then(|u| self.endpoint_errors.get(u));
            let answer = match (live, failed) {
                (Some(l), _) if l.ready && l.identity != 0 && l.written.is_some() => Some(self.add_reply(l)),
                (_, Some(e)) => Some(Err(cni::error(Code::Agent, format!("pod {pod}: {e}")))),
                _ if now >= p.deadline => {
                    let why = match &p.uid {
                        None => format!(
                            "the pod is not in this agent's cache: is it bound to node {}?",
                            self.s.flags.node_name
                        ),
                        Some(_) => "its endpoint is not enforcing yet (see the agent's log)".to_string(),
                    };
                    Some(Err(cni::error(
                        Code::TryAgainLater,
                        format!("pod {pod}: not networked within {} s: {why}", ADD_WAIT.as_secs()),
                    )))
                }
                _ => None,
            };
            match answer {
                Some(a) => {
                    if let Err(e) = &a {
                        tracing::warn!(pod = %pod, container = %p.req.container_id, error = %e.msg, "CNI ADD failed");
                    }
                    let _ = p.reply.send(a);
                }
                None => self.pending_adds.push(p),
            }
        }
    }

    fn add_reply(&self, l: &Live) -> Result<AddReply, ApiError> {
        let ifname = l.rec.ifname.clone().unwrap_or_else(|| "eth0".to_string());
        let mac = netns::mac_at(&l.rec.netns, &ifname)
            .map_err(|e| cni::error(Code::Io, format!("reading the pod interface's address: {e:#}")))?;
        Ok(AddReply {
            ifname,
            mac,
            ipv4: l.rec.ip.to_string(),
            gateway4: netns::GATEWAY.to_string(),
            ipv6: l.rec.ip6.map(|a| a.to_string()),
            gateway6: l.rec.ip6.map(|_| netns::GATEWAY6.to_string()),
            endpoint_id: l.rec.endpoint_id,
            identity: l.identity,
        })
    }

    fn uid_of_container(&self, container_id: &str) -> Option<String> {
        self.state
            .state
            .endpoints
            .iter()
            .find(|(_, r)| r.container_id.as_deref() == Some(container_id))
            .map(|(uid, _)| uid.clone())
    }

    /// CNI DEL: everything of the sandbox goes; nothing to do is success.
    async fn cni_del(&mut self, r: &AttachmentRef, st: &Stores) -> Result<(), ApiError> {
        tracing::info!(container = %r.container_id, "CNI DEL");
        if let Some(i) = self.pending_adds.iter().position(|p| p.req.container_id == r.container_id) {
            let p = self.pending_adds.remove(i);
            let _ = p.reply.send(Err(cni::error(Code::TryAgainLater, "the sandbox was deleted while being added")));
        }
        if let Some(uid) = self.uid_of_container(&r.container_id) {
            self.teardown(&uid, &ceps_by_name(st)).await;
            self.endpoint_errors.remove(&uid);
        }
        Ok(())
    }

    /// CNI CHECK: the sandbox's endpoint runs, enforces its policy, and
    /// both ends of its veth are as made.
    fn cni_check(&self, r: &AttachmentRef) -> Result<(), ApiError> {
        let fail = |msg: String| Err(cni::error(Code::Agent, msg));
        let Some(uid) = self.uid_of_container(&r.container_id) else {
            return Err(cni::error(Code::UnknownContainer, format!("no endpoint for container {}", r.container_id)));
        };
        let Some(l) = self.live.get(&uid) else {
            return fail(format!("the endpoint of container {} is recorded but not running", r.container_id));
        };
        let pod = format!("{}/{}", l.rec.namespace, l.rec.name);
        if !l.ready {
            return fail(format!("pod {pod}: its policy is not in the datapath"));
        }
        if netns::ifindex(&self.s.node_ns(), &l.rec.lxc).ok() != Some(l.ifindex) {
            return fail(format!("pod {pod}: interface {} is gone from the node", l.rec.lxc));
        }
        let ifname = l.rec.ifname.as_deref().unwrap_or("eth0");
        if ifname != r.ifname || !netns::has_address_at(&l.rec.netns, ifname, l.rec.ip) {
            return fail(format!("pod {pod}: {} in {} does not hold {}", r.ifname, l.rec.netns, l.rec.ip));
        }
        Ok(())
    }

    /// Endpoint names for the metrics endpoint (the counters are read from
    /// the pinned map on each scrape) and the address pool's use.
    fn refresh_snapshot(&mut self) {
        let names = self
            .state
            .state
            .endpoints
            .values()
            .map(|e| (e.endpoint_id, format!("{}/{}", e.namespace, e.name)))
            .collect();
        let (first, last) = self.pod_range;
        let size = u64::from(last - first) + 1;
        let ipam = IpamStatus {
            cidr: format!("{}/{}", Ipv4Addr::from(first), 32 - size.trailing_zeros()),
            allocated: self.state.state.endpoints.len() + usize::from(self.state.state.health_ip.is_some()),
            capacity: usize::try_from(size.saturating_sub(2)).unwrap_or(usize::MAX),
        };
        let mut snap = self.snapshot.lock().expect("snapshot");
        snap.endpoint_names = names;
        snap.ipam = ipam;
    }

    async fn reconcile(&mut self, st: &Stores) -> anyhow::Result<()> {
        self.sync_routes(st);
        // Pods of this node.
        // With the CNI plugin, a pod has an endpoint from its ADD to its DEL
        // (a terminating pod keeps its network until the runtime removes
        // the sandbox); otherwise while it exists and is not terminating.
        let cni_mode = self.s.flags.cni;
        let pods: BTreeMap<String, Arc<Pod>> = st
            .pods
            .state()
            .into_iter()
            .filter(|p| cni_mode || p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| Some((p.metadata.uid.clone()?, p)))
            .filter(|(uid, _)| !cni_mode || self.state.state.endpoints.contains_key(uid))
            .collect();
        let gone: Vec<String> = if cni_mode {
            Vec::new()
        } else {
            self.state
                .state
                .endpoints
                .keys()
                .chain(self.live.keys())
                .filter(|uid| !pods.contains_key(*uid))
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        let ceps_now = ceps_by_name(st);
        for uid in gone {
            self.teardown(&uid, &ceps_now).await;
        }
        // A CiliumIdentity in use that vanished (deleted by hand or by a GC
        // that raced us) is allocated again (a few seconds of grace cover
        // the watch catching up with a new identity).
        if self.s.mode != "kvstore" {
            let ids_now: BTreeSet<u32> =
                st.ids.state().iter().filter_map(|i| i.metadata.name.as_deref()?.parse().ok()).collect();
            for l in self.live.values_mut() {
                if l.identity == 0 || ids_now.contains(&l.identity) {
                    l.missing_since = None;
                    continue;
                }
                let since = *l.missing_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > Duration::from_secs(5) {
                    tracing::warn!(identity = l.identity, pod = %format!("{}/{}", l.rec.namespace, l.rec.name), "CiliumIdentity in use is gone: allocating it again");
                    l.labels = Labels::new();
                    l.missing_since = None;
                }
            }
        }
        // A kvstore ID of ours that now holds other labels (collected during
        // an outage and taken by another label set): its endpoints get a
        // new identity in this pass.
        let lost = self.alloc.take_lost();
        for l in self.live.values_mut().filter(|l| lost.contains(&l.identity)) {
            tracing::warn!(identity = l.identity, pod = %format!("{}/{}", l.rec.namespace, l.rec.name), "kvstore identity taken by other labels: allocating a new one");
            l.labels = Labels::new();
        }
        // A CiliumEndpoint of a running pod that is gone (deleted by hand,
        // by a GC racing a watch, by another agent) or owned by another pod
        // is written again in this pass.
        for (uid, l) in self.live.iter_mut() {
            let key = (l.rec.namespace.clone(), l.rec.name.clone());
            if l.written.is_some() && ceps_now.get(&key).is_none_or(|(_, owner)| owner != uid) {
                tracing::warn!(pod = %format!("{}/{}", key.0, key.1), "CiliumEndpoint missing: writing it again");
                l.written = None;
            }
        }
        // Policies in force (one engine for operator, agent and CLI), the
        // CIDR identities they need, and every identity they may select.
        let mut view = cluster::gather(&st.cnps.state(), &st.ccnps.state(), &st.knps.state(), &self.policy_cfg);
        self.report_refused(&view.refused).await;
        // toServices: the pods or addresses behind the Services named
        // (the Service view is built only when some policy names one).
        let names_services =
            view.entries.iter().flat_map(|e| e.l3.iter().flatten()).any(|p| matches!(p, Peer::Service(_)));
        if names_services {
            let services = cluster::services(&st.services.state(), &st.endpoint_slices.state());
            cilium_policy::service::resolve(&mut view.entries, &services, &self.policy_cfg);
        }
        // CiliumCIDRGroups: each CIDR of each group is a CIDR identity with
        // the group's labels (upstream), named by a policy or not.
        let groups = self.cidr_groups(&st.cidr_groups.state());
        let mut prefixes = cilium_policy::engine::cidr_prefixes(&view.entries);
        prefixes.extend(groups.iter().flat_map(|g| g.cidrs.iter().copied()));
        self.cidrs.sync(&prefixes);
        self.sync_cilium_node_labels(st).await;
        let node_ips = self.node_identities(st);
        let ceps = st.ceps.state();
        let mut universe = cluster::universe(&self.policy_cfg, &st.ids.state(), &ceps, &self.cidrs.by_prefix);
        universe.add_cidr_groups(&groups);
        if self.policy_cfg.enable_node_selector_labels {
            universe.identities.insert(IDENTITY_HOST, self.host_labels());
            for (labels, id) in &self.node_ids.by_labels {
                universe.identities.insert(*id, labels.clone());
            }
        }
        let mut selections = Selections::new(&universe);
        let namespaces: BTreeMap<String, Arc<Namespace>> =
            st.namespaces.state().into_iter().filter_map(|n| Some((n.metadata.name.clone()?, n))).collect();
        for (uid, pod) in &pods {
            let ns = namespaces.get(pod.metadata.namespace.as_deref().unwrap_or_default()).map(|n| n.as_ref());
            let made = self.ensure_endpoint(uid, pod, ns, &mut selections, &view.entries).await;
            match &made {
                Ok(()) => self.endpoint_errors.remove(uid),
                Err(e) => self.endpoint_errors.insert(uid.clone(), format!("{e:#}")),
            };
            if let Err(e) = made {
                tracing::warn!(pod = %format!("{}/{}", pod.metadata.namespace.as_deref().unwrap_or(""), pod.metadata.name.as_deref().unwrap_or("")), error = format!("{e:#}"), "endpoint not ready");
            }
        }
        {
            let mut snap = self.snapshot.lock().expect("snapshot");
            snap.endpoints_not_ready = self.live.values().filter(|l| !l.ready).count();
            (snap.ipcache_entries, snap.policy_entries) = self.dp.mirrored_entries();
        }
        // The ipcache: the world prefixes, the CIDR identities, every
        // endpoint of the cluster and the nodes. Written after the
        // endpoints' policies, so a new identity is never looked up before
        // its entries exist.
        let cfg = &self.policy_cfg;
        let mut want: BTreeMap<Prefix, u32> = BTreeMap::new();
        want.insert(Prefix::parse("0.0.0.0/0", false).expect("prefix"), cilium_policy::identity::world_id(cfg, true));
        want.insert(Prefix::parse("::/0", false).expect("prefix"), cilium_policy::identity::world_id(cfg, false));
        want.extend(self.cidrs.by_prefix.iter().map(|(p, id)| (*p, *id)));
        for e in &ceps {
            let Some(status) = e.status.as_ref() else { continue };
            let Some(id) = status.identity.as_ref().and_then(|i| i.id) else { continue };
            for a in status.networking.iter().flat_map(|n| &n.addressing) {
                for ip in [a.ipv4.as_deref(), a.ipv6.as_deref()].into_iter().flatten() {
                    if let Ok(ip) = ip.parse::<std::net::IpAddr>() {
                        want.insert(Prefix::host(ip), id as u32);
                    }
                }
            }
        }
        for l in self.live.values() {
            want.insert(Prefix::host(l.rec.ip.into()), l.identity);
            if let Some(ip6) = l.rec.ip6 {
                want.insert(Prefix::host(ip6.into()), l.identity);
            }
        }
        // Nodes: this one is `host` (also as the pods' gateway address, the
        // source of what the node itself sends them), the others
        // `remote-node`, as upstream's reserved identities.
        let gateway: Ipv4Addr = netns::GATEWAY.parse().expect("gateway address");
        want.insert(Prefix::host(gateway.into()), IDENTITY_HOST);
        let mut targets = Vec::new();
        for n in st.cnodes.state() {
            let mine = n.metadata.name.as_deref() == Some(self.s.flags.node_name.as_str());
            for a in n.spec.addresses.iter().flatten() {
                if let Some(ip) = a.ip.as_deref().and_then(|i| i.parse::<std::net::IpAddr>().ok()) {
                    let remote = node_ips.get(&Prefix::host(ip)).copied().unwrap_or(IDENTITY_REMOTE_NODE);
                    want.insert(Prefix::host(ip), if mine { IDENTITY_HOST } else { remote });
                }
            }
            // Health endpoints: reserved:health, and the prober's targets.
            let health_ip = n.spec.health.as_ref().and_then(|h| h.ipv4.as_deref()?.parse::<std::net::IpAddr>().ok());
            if let Some(ip) = health_ip {
                want.insert(Prefix::host(ip), cilium_policy::identity::HEALTH);
            }
            let node_ip = n.spec.addresses.iter().flatten().find_map(|a| a.ip.as_deref()?.parse::<Ipv4Addr>().ok());
            if let (Some(name), Some(node_ip)) = (n.metadata.name.clone(), node_ip) {
                targets.push(crate::health::Target { name, node_ip: node_ip.into(), health_ip });
            }
        }
        if let Some(h) = &self.health {
            *h.targets.lock().expect("health targets") = targets;
        }
        self.dp.sync_ipcache(&want)?;
        self.publish_directory(st, &ceps, universe.identities);
        Ok(())
    }

    /// Names for the monitor: local endpoints, every endpoint's and node's
    /// addresses, every identity's labels.
    fn publish_directory(
        &self,
        st: &Stores,
        ceps: &[Arc<CiliumEndpoint>],
        labels: BTreeMap<u32, cilium_policy::LabelSet>,
    ) {
        let mut d = crate::monitor::Directory { labels, ..Default::default() };
        for e in self.state.state.endpoints.values() {
            d.endpoints.insert(e.endpoint_id, format!("{}/{}", e.namespace, e.name));
        }
        for c in ceps {
            let (Some(ns), Some(name)) = (c.metadata.namespace.as_deref(), c.metadata.name.as_deref()) else {
                continue;
            };
            for a in c.status.iter().flat_map(|s| &s.networking).flat_map(|n| &n.addressing) {
                for ip in [a.ipv4.as_deref(), a.ipv6.as_deref()].into_iter().flatten() {
                    if let Ok(ip) = ip.parse() {
                        d.pods_by_ip.insert(ip, format!("{ns}/{name}"));
                    }
                }
            }
        }
        for l in self.live.values() {
            d.pods_by_ip.insert(l.rec.ip.into(), format!("{}/{}", l.rec.namespace, l.rec.name));
        }
        for n in st.cnodes.state() {
            let Some(name) = n.metadata.name.as_deref() else { continue };
            for a in n.spec.addresses.iter().flatten() {
                if let Some(ip) = a.ip.as_deref().and_then(|i| i.parse().ok()) {
                    d.nodes_by_ip.insert(ip, name.to_string());
                }
            }
        }
        *self.monitor.directory.lock().expect("directory") = Arc::new(d);
    }

    /// A pod's IPv6 address in dual stack: its IPv4 address's offset in
    /// the IPv4 pod CIDR, at the same offset in the IPv6 one (no second
    /// allocator to keep: an IPv4 address is never handed out twice, so
    /// neither is its IPv6 twin).
    fn ipv6_for(&self, ip: Ipv4Addr) -> Option<std::net::Ipv6Addr> {
        let (first6, last6) = self.pod_range6?;
        let offset = u128::from(u32::from(ip).checked_sub(self.pod_range.0)?);
        let addr = first6.checked_add(offset).filter(|a| *a < last6)?;
        Some(std::net::Ipv6Addr::from(addr))
    }

    /// Keeps this node's CiliumNode labels equal to its Node's (upstream
    /// copies them; other agents read node labels from CiliumNodes).
    async fn sync_cilium_node_labels(&mut self, st: &Stores) {
        let Some(node) = st.node.state().into_iter().next() else { return };
        let labels = node.metadata.labels.clone().unwrap_or_default();
        if labels == self.cnode_labels {
            return;
        }
        let cnodes: Api<CiliumNode> = Api::all(self.client.clone());
        let name = &self.s.flags.node_name;
        let addrs = node_addresses(self.node_ip, self.node_ip6);
        match apply_cilium_node(&cnodes, name, &self.node_uid, &addrs, &labels, self.health_ip).await {
            Ok(()) => {
                tracing::info!(node = %name, "Node labels changed: CiliumNode labels updated");
                self.cnode_labels = labels;
            }
            Err(e) => tracing::warn!(node = %name, error = %e, "updating the CiliumNode labels failed (retrying)"),
        }
    }

    /// The identity labels of this node (`reserved:host`, and with node
    /// selector labels its filtered Node labels and the cluster).
    fn host_labels(&self) -> cilium_policy::LabelSet {
        let labels = self.relevant_node_labels(&self.cnode_labels);
        cilium_policy::identity::node_labels(&self.policy_cfg, true, &labels)
    }

    fn relevant_node_labels(&self, labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        labels
            .iter()
            .filter(|(k, v)| self.node_filter.is_relevant(&Label::new("node", k, v)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// With node selector labels: an identity per remote node label set
    /// (node address -> identity). Without: none (every remote node is
    /// `remote-node`).
    fn node_identities(&mut self, st: &Stores) -> BTreeMap<Prefix, u32> {
        if !self.policy_cfg.enable_node_selector_labels {
            return BTreeMap::new();
        }
        let mut want: BTreeMap<cilium_policy::LabelSet, Vec<Prefix>> = BTreeMap::new();
        for n in st.cnodes.state() {
            if n.metadata.name.as_deref() == Some(self.s.flags.node_name.as_str()) {
                continue;
            }
            let labels = self.relevant_node_labels(&n.metadata.labels.clone().unwrap_or_default());
            let set = cilium_policy::identity::node_labels(&self.policy_cfg, false, &labels);
            let addrs = n
                .spec
                .addresses
                .iter()
                .flatten()
                .filter_map(|a| a.ip.as_deref()?.parse::<std::net::IpAddr>().ok())
                .map(Prefix::host);
            want.entry(set).or_default().extend(addrs);
        }
        self.node_ids.sync(&want)
    }

    /// Logs and reports each refused policy once per reason, as an Event
    /// on the policy object.
    async fn report_refused(&mut self, refused: &BTreeMap<PolicyRef, String>) {
        self.refused_reported.retain(|r, _| refused.contains_key(r));
        for (r, why) in refused {
            if self.refused_reported.get(r) == Some(why) {
                continue;
            }
            tracing::warn!(policy = %r, reason = %why, "policy not enforced");
            let (api_version, kind) = match r.kind {
                cilium_policy::PolicyKind::Knp => ("networking.k8s.io/v1", "NetworkPolicy"),
                k => ("cilium.io/v2", k.name()),
            };
            let reference = k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
                name: Some(r.name.clone()),
                namespace: r.namespace.clone(),
                ..Default::default()
            };
            self.publish(&reference, "PolicyNotEnforced", &format!("{r} is not enforced: {why}")).await;
            self.refused_reported.insert(r.clone(), why.clone());
        }
    }

    fn sync_routes(&mut self, st: &Stores) {
        let me = &self.s.flags.node_name;
        let mut want = BTreeMap::new();
        for n in st.cnodes.state() {
            if n.metadata.name.as_deref() == Some(me.as_str()) {
                continue;
            }
            let internal: Vec<std::net::IpAddr> = n
                .spec
                .addresses
                .iter()
                .flatten()
                .filter(|a| a.type_.as_deref() == Some("InternalIP"))
                .filter_map(|a| a.ip.as_deref()?.parse().ok())
                .collect();
            for c in n.pod_cidrs() {
                let v6 = c.contains(':');
                if v6 && self.node_ip6.is_none() {
                    continue;
                }
                if let Some(ip) = internal.iter().find(|ip| ip.is_ipv6() == v6) {
                    want.insert(c.clone(), *ip);
                }
            }
        }
        let node_ns = self.s.node_ns();
        for (cidr, via) in &want {
            if self.routes.get(cidr) != Some(via) {
                match netns::route_via(&node_ns, cidr, *via) {
                    Ok(()) => {
                        self.routes.insert(cidr.clone(), *via);
                    }
                    Err(e) => tracing::warn!(error = format!("{e:#}"), %cidr, "cannot route to remote node"),
                }
            }
        }
        let stale: Vec<String> = self.routes.keys().filter(|c| !want.contains_key(*c)).cloned().collect();
        for c in stale {
            netns::delete_route(&node_ns, &c);
            self.routes.remove(&c);
        }
    }

    /// Upstream's identity labels of a pod: its labels, namespace, the
    /// namespace's labels, service account and cluster, filtered by the
    /// `labels` option.
    fn identity_labels(&self, pod: &Pod, ns: Option<&Namespace>) -> Labels {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let mut all =
            Labels::from_k8s(namespace, pod.metadata.labels.iter().flatten().map(|(k, v)| (k.as_str(), v.as_str())));
        for (k, v) in ns.and_then(|n| n.metadata.labels.as_ref()).into_iter().flatten() {
            all.insert(Label::new("k8s", &format!("{}{k}", cilium_policy::labels::NAMESPACE_LABELS_PREFIX), v));
        }
        let sa = pod.spec.as_ref().and_then(|s| s.service_account_name.as_deref()).unwrap_or("default");
        all.insert(Label::new("k8s", cilium_policy::labels::SERVICE_ACCOUNT_KEY, sa));
        all.insert(Label::new("k8s", cilium_policy::labels::CLUSTER_KEY, &self.s.cluster_name));
        self.filter.split(&all).0
    }

    async fn ensure_endpoint(
        &mut self,
        uid: &str,
        pod: &Pod,
        namespace: Option<&Namespace>,
        sel: &mut Selections<'_>,
        policy_entries: &[Entry],
    ) -> anyhow::Result<()> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let labels = self.identity_labels(pod, namespace);
        let ports: Vec<NamedPort> = pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| cluster::named_port(p.name.as_deref(), i64::from(p.container_port), p.protocol.as_deref()))
            .collect();
        if !self.live.contains_key(uid) {
            let known = self.state.state.endpoints.get(uid).cloned();
            let is_new = known.is_none();
            let rec = match known {
                Some(r) => r,
                None if self.s.flags.cni => bail!("no CNI ADD recorded for this pod"),
                None => {
                    let ip = self
                        .state
                        .free_ip(self.pod_range.0, self.pod_range.1)
                        .ok_or_else(|| anyhow!("no free address in the pod CIDR"))?;
                    let rec = EndpointRecord {
                        namespace: ns.clone(),
                        name: name.clone(),
                        ip,
                        ip6: self.ipv6_for(ip),
                        endpoint_id: self.state.next_endpoint_id(),
                        netns: self.s.pod_ns(&ns, &name),
                        lxc: netns::ifname("lxc", uid),
                        container_id: None,
                        ifname: None,
                    };
                    // Remembered before anything is made: a crash never leaks
                    // or reuses the address.
                    self.state.state.endpoints.insert(uid.to_string(), rec.clone());
                    self.state.save()?;
                    rec
                }
            };
            // An endpoint recorded before this node was dual stack gets
            // its IPv6 address now (the same mapping).
            let mut rec = rec;
            if rec.ip6.is_none() && self.pod_range6.is_some() {
                rec.ip6 = self.ipv6_for(rec.ip);
                self.state.state.endpoints.insert(uid.to_string(), rec.clone());
                self.state.save()?;
            }
            let node_ns = self.s.node_ns();
            match (&rec.container_id, &rec.ifname) {
                (Some(_), Some(ifname)) => netns::make_cni(&node_ns, &rec.netns, &rec.lxc, ifname, rec.ip, rec.ip6)?,
                _ => netns::make_pod(&node_ns, &rec.netns, &rec.lxc, rec.ip, rec.ip6)?,
            }
            let ifindex = netns::ifindex(&node_ns, &rec.lxc)?;
            self.dp.attach(&netns::path(&node_ns), &rec.lxc)?;
            if is_new {
                // Nothing passes until the endpoint's policy is computed
                // below. (A known endpoint keeps its entries: a restart
                // neither opens nor cuts its traffic.)
                self.dp.sync_policy(rec.endpoint_id, &BTreeMap::new())?;
                let deny_all = EndpointValue {
                    endpoint_id: rec.endpoint_id,
                    identity: 0,
                    ingress_enforce: 1,
                    egress_enforce: 1,
                    state: ENDPOINT_READY,
                    pad: 0,
                };
                self.dp.set_endpoint(ifindex, deny_all)?;
            }
            netns::plug_pod(&node_ns, &rec.lxc, rec.ip, rec.ip6)?;
            tracing::info!(pod = %format!("{ns}/{name}"), ip = %rec.ip, endpoint = rec.endpoint_id, "endpoint created");
            self.live.insert(
                uid.to_string(),
                Live {
                    rec,
                    ifindex,
                    identity: 0,
                    labels: Labels::new(),
                    ports: Vec::new(),
                    computed: EndpointPolicy::default(),
                    ready: false,
                    written: None,
                    reported: BTreeSet::new(),
                    missing_since: None,
                },
            );
        }
        // Identity (again when the labels changed).
        let current = self.live.get(uid).map(|l| (l.identity, l.labels.clone())).expect("live");
        let identity = if current.0 == 0 || current.1 != labels {
            let id = self.alloc.allocate(&labels).await?;
            if current.0 != 0 {
                tracing::info!(pod = %format!("{ns}/{name}"), from = current.0, to = id, "labels changed: new identity");
            }
            id
        } else {
            current.0
        };
        // Policy, then the datapath entry with its enforcement flags: a new
        // endpoint is never reachable before its policy is in place. A
        // failed map write (a full map) fails closed: the endpoint drops
        // every packet and is reported not ready until a sync succeeds.
        let subject = cilium_policy::LabelSet::new(
            labels.iter().map(|l| cilium_policy::Label::new(&l.source, &l.key, &l.value)).collect(),
        );
        let mut computed = cilium_policy::compile(&subject, &ports, policy_entries, sel);
        let live = self.live.get_mut(uid).expect("live");
        let ep_id = live.rec.endpoint_id;
        let mut entries: BTreeMap<PolicyEntry, bool> = BTreeMap::new();
        for (direction, d) in [(DIR_INGRESS, &computed.ingress), (DIR_EGRESS, &computed.egress)] {
            entries.extend(d.entries.iter().map(|(key, deny)| (PolicyEntry { direction, key: *key }, *deny)));
        }
        let written = self.dp.sync_policy(ep_id, &entries);
        let mut value = EndpointValue {
            endpoint_id: ep_id,
            identity,
            ingress_enforce: u8::from(computed.ingress.enforced),
            egress_enforce: u8::from(computed.egress.enforced),
            state: ENDPOINT_READY,
            pad: 0,
        };
        if written.is_err() {
            value.state = ENDPOINT_FAILED;
        }
        self.dp.set_endpoint(live.ifindex, value)?;
        live.ready = written.is_ok();
        if let Err(e) = &written {
            self.snapshot.lock().expect("snapshot").policy_map_errors += 1;
            computed.not_enforced.insert(format!(
                "policy map write failed, so the endpoint drops all its traffic until a write succeeds: {e}"
            ));
        }
        let live = self.live.get_mut(uid).expect("live");
        live.ports = ports;
        live.identity = identity;
        live.labels = labels.clone();
        let new_notes: Vec<String> = computed.not_enforced.difference(&live.reported).cloned().collect();
        live.computed = computed;
        // The CiliumEndpoint (only when something changed).
        let body = cep_body(&ns, &name, uid, live, self.node_ip);
        if live.written.as_ref() != Some(&body) {
            let api: Api<CiliumEndpoint> = Api::namespaced(self.client.clone(), &ns);
            api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
                .await
                .context("writing the CiliumEndpoint")?;
            live.written = Some(body);
            // The kubelet writes the status of pods it runs (from the CNI
            // result); the simulated nodes have no kubelet.
            if self.s.flags.cni {
                return self.report_notes(&ns, &name, uid, new_notes).await;
            }
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            let ip = live.rec.ip.to_string();
            let pod_ips: Vec<serde_json::Value> = std::iter::once(ip.clone())
                .chain(live.rec.ip6.map(|a| a.to_string()))
                .map(|a| json!({ "ip": a }))
                .collect();
            let status = json!({ "status": {
                "phase": "Running", "podIP": ip, "podIPs": pod_ips, "hostIP": self.node_ip.to_string(),
                "conditions": [{ "type": "Ready", "status": "True" }],
            } });
            if let Err(e) = pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await {
                if let Some(l) = self.live.get_mut(uid) {
                    l.written = None;
                }
                return Err(e).context("writing the Pod status");
            }
        }
        self.report_notes(&ns, &name, uid, new_notes).await
    }

    /// Logs and reports (as Events of the pod) what its policy does not
    /// enforce, once each.
    async fn report_notes(&mut self, ns: &str, name: &str, uid: &str, new_notes: Vec<String>) -> anyhow::Result<()> {
        for note in new_notes {
            tracing::warn!(pod = %format!("{ns}/{name}"), "{note}");
            self.event(ns, name, &note).await;
            if let Some(l) = self.live.get_mut(uid) {
                l.reported.insert(note);
            }
        }
        Ok(())
    }

    async fn event(&self, ns: &str, name: &str, note: &str) {
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("cilium.io/v2".into()),
            kind: Some("CiliumEndpoint".into()),
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        };
        self.publish(&reference, "PolicyNotEnforced", note).await;
    }

    async fn publish(&self, reference: &k8s_openapi::api::core::v1::ObjectReference, reason: &str, note: &str) {
        use kube::runtime::events::{Event, EventType, Recorder, Reporter};
        let recorder = Recorder::new(
            self.client.clone(),
            Reporter { controller: FIELD_MANAGER.into(), instance: Some(self.s.flags.node_name.clone()) },
        );
        let ev = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "EnforcePolicy".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, reference).await {
            tracing::debug!(error = %e, "publishing Event failed");
        }
    }

    async fn teardown(&mut self, uid: &str, ceps_now: &BTreeMap<(String, String), (String, String)>) {
        let live = self.live.remove(uid);
        let rec = live.as_ref().map(|l| l.rec.clone()).or_else(|| self.state.state.endpoints.get(uid).cloned());
        let Some(rec) = rec else { return };
        let node_ns = self.s.node_ns();
        let ifindex = live.as_ref().map(|l| l.ifindex).or_else(|| netns::ifindex(&node_ns, &rec.lxc).ok());
        if let Some(i) = ifindex {
            let _ = self.dp.remove_endpoint(i);
        }
        let _ = self.dp.sync_policy(rec.endpoint_id, &BTreeMap::new());
        self.dp.detach(&rec.lxc);
        if rec.container_id.is_some() {
            // The runtime's sandbox is the runtime's to delete; our veth
            // (both ends) goes.
            if let Err(e) = netns::delete_link(&node_ns, &rec.lxc) {
                tracing::warn!(error = format!("{e:#}"), lxc = %rec.lxc, "cannot delete the pod's veth");
            }
        } else if let Err(e) = netns::delete(&rec.netns) {
            tracing::warn!(error = format!("{e:#}"), netns = %rec.netns, "cannot delete the pod namespace");
        }
        // Only our pod's CiliumEndpoint, by uid: a pod of the same name on
        // another node (a StatefulSet) has its own, which stays.
        let api: Api<CiliumEndpoint> = Api::namespaced(self.client.clone(), &rec.namespace);
        let cep = ceps_now.get(&(rec.namespace.clone(), rec.name.clone())).filter(|(_, owner)| owner == uid);
        let deleted = match cep {
            Some((cep_uid, _)) => {
                let dp = DeleteParams {
                    preconditions: Some(kube::api::Preconditions {
                        uid: Some(cep_uid.clone()),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                api.delete(&rec.name, &dp).await.map(|_| ())
            }
            None => Ok(()),
        };
        match deleted {
            Ok(_) => {}
            // Gone already, or another object by now: not ours to delete.
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => tracing::warn!(error = %e, "cannot delete the CiliumEndpoint"),
        }
        self.state.state.endpoints.remove(uid);
        if let Err(e) = self.state.save() {
            tracing::warn!(error = format!("{e:#}"), "cannot save state");
        }
        tracing::info!(pod = %format!("{}/{}", rec.namespace, rec.name), ip = %rec.ip, "endpoint removed, address released");
    }
}

/// CiliumEndpoints as the API server has them: (namespace, name) -> (the
/// CEP's uid, the uid of the Pod owning it).
fn ceps_by_name(st: &Stores) -> BTreeMap<(String, String), (String, String)> {
    st.ceps
        .state()
        .iter()
        .filter_map(|c| {
            let key = (c.metadata.namespace.clone()?, c.metadata.name.clone()?);
            let owner = c.metadata.owner_references.iter().flatten().find(|o| o.kind == "Pod")?.uid.clone();
            Some((key, (c.metadata.uid.clone().unwrap_or_default(), owner)))
        })
        .collect()
}

/// The next plugin call; never, without the CNI plugin.
async fn next_call(calls: &mut Option<tokio::sync::mpsc::Receiver<Call>>) -> Option<Call> {
    match calls {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn cep_body(ns: &str, name: &str, uid: &str, l: &Live, node_ip: Ipv4Addr) -> serde_json::Value {
    let labels: Vec<String> = l.labels.iter().map(|x| format!("{}:{}={}", x.source, x.key, x.value)).collect();
    let dir = |enforcing: bool| json!({ "enforcing": enforcing, "state": if enforcing { "enforcing" } else { "non-enforcing" } });
    let state = if l.ready { "ready" } else { "not-ready" };
    let log: Vec<serde_json::Value> =
        l.computed.not_enforced.iter().map(|n| json!({ "code": "Warning", "message": n, "state": state })).collect();
    let ports: Vec<serde_json::Value> = l
        .ports
        .iter()
        .map(|p| {
            let proto = match p.proto {
                cilium_policy::parse::PROTO_UDP => "UDP",
                cilium_policy::parse::PROTO_SCTP => "SCTP",
                _ => "TCP",
            };
            json!({ "name": p.name, "port": p.port, "protocol": proto })
        })
        .collect();
    let mut addressing = json!({ "ipv4": l.rec.ip.to_string() });
    if let Some(ip6) = l.rec.ip6 {
        addressing["ipv6"] = json!(ip6.to_string());
    }
    let mut status = json!({
        "id": l.rec.endpoint_id,
        "identity": { "id": l.identity, "labels": labels },
        "networking": { "addressing": [addressing], "node": node_ip.to_string() },
        "state": state,
        "policy": { "ingress": dir(l.computed.ingress.enforced), "egress": dir(l.computed.egress.enforced) },
        "external-identifiers": { "pod-name": format!("{ns}/{name}"), "k8s-namespace": ns, "k8s-pod-name": name },
    });
    if !log.is_empty() {
        status["log"] = json!(log);
    }
    if !ports.is_empty() {
        status["named-ports"] = json!(ports);
    }
    json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
        "metadata": { "name": name, "namespace": ns, "ownerReferences": [{
            "apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid }] },
        "status": status,
    })
}
