//! The agent's work: register the CiliumNode, then keep the node's pods,
//! the ipcache and every local endpoint's policy in line with the cluster.
//! One reconcile loop, woken by any watched change (Pods on this node,
//! CiliumEndpoints, CiliumIdentities, policies, CiliumNodes).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow};
use cilium_crds::policy::{CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy};
use cilium_crds::{CiliumEndpoint, CiliumIdentity, CiliumNode};
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

use crate::config::Settings;
use crate::datapath::{Datapath, EndpointValue, PolicyKey, PolicyValue};
use crate::netns;
use crate::policy::{self, CidrIdentities, Computed, IdentityView, PolicySource};
use crate::state::{EndpointRecord, Store as StateStore};

pub const FIELD_MANAGER: &str = "cilium-node-agent";
/// Reserved identities of nodes (upstream's numbers).
pub const IDENTITY_HOST: u32 = 1;
pub const IDENTITY_REMOTE_NODE: u32 = 6;

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
}

/// A local endpoint as the agent runs it.
struct Live {
    rec: EndpointRecord,
    ifindex: u32,
    identity: u32,
    labels: Labels,
    computed: Computed,
    /// The CEP body last written (rewritten only when it changes).
    written: Option<serde_json::Value>,
    reported: BTreeSet<String>,
}

/// What the metrics and health endpoints need from the agent (the
/// counters themselves are read from the pinned map on each scrape).
#[derive(Default)]
pub struct Snapshot {
    pub endpoint_names: BTreeMap<u32, String>,
    pub ready: bool,
}

struct Stores {
    pods: Store<Pod>,
    ceps: Store<CiliumEndpoint>,
    ids: Store<CiliumIdentity>,
    cnps: Store<CiliumNetworkPolicy>,
    ccnps: Store<CiliumClusterwideNetworkPolicy>,
    cnodes: Store<CiliumNode>,
}

pub struct Agent {
    s: Settings,
    client: kube::Client,
    dp: Datapath,
    state: StateStore,
    alloc: Allocator,
    filter: LabelFilter,
    node_ip: Ipv4Addr,
    pod_range: (u32, u32),
    live: BTreeMap<String, Live>,
    cidrs: CidrIdentities,
    routes: BTreeMap<String, Ipv4Addr>,
    pub snapshot: Arc<Mutex<Snapshot>>,
}

fn spawn_store<K>(api: Api<K>, cfg: watcher::Config, wake: Arc<tokio::sync::Notify>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, cfg)).default_backoff();
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
    reader
}

impl Agent {
    pub async fn start(s: Settings, client: kube::Client, snapshot: Arc<Mutex<Snapshot>>) -> anyhow::Result<Agent> {
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
        let dp = Datapath::load(&s.bpf_root())?;
        let state = StateStore::open(&s.state_dir())?;

        // The CiliumNode, owned by the Node.
        let k8s_node =
            Api::<Node>::all(client.clone()).get(node).await.with_context(|| format!("reading Node {node}"))?;
        let body = json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNode",
            "metadata": { "name": node, "ownerReferences": [{
                "apiVersion": "v1", "kind": "Node", "name": node,
                "uid": k8s_node.metadata.uid.clone().unwrap_or_default() }] },
            "spec": { "addresses": [{ "type": "InternalIP", "ip": node_ip.to_string() }] },
        });
        let cnodes: Api<CiliumNode> = Api::all(client.clone());
        cnodes
            .patch(node, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
            .await
            .with_context(|| format!("registering CiliumNode {node}"))?;
        tracing::info!(node = %node, ip = %node_ip, "CiliumNode registered, waiting for a pod CIDR");
        let pod_cidr = loop {
            let n = cnodes.get(node).await?;
            if let Some(c) = n.pod_cidrs().iter().find(|c| !c.contains(':')) {
                break c.clone();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let cidr: cilium_ipam::Cidr = pod_cidr.parse().map_err(|e| anyhow!("pod CIDR {pod_cidr}: {e}"))?;
        let pod_range = (cidr.first() as u32, cidr.last() as u32);
        tracing::info!(pod_cidr = %pod_cidr, "pod CIDR assigned");

        netns::ensure_node(&s.node_ns(), &s.fabric_ns(), &s.flags.node_ip)?;

        let range = cilium_identity::cluster_range(s.cluster_id, s.max_connected_clusters)?;
        let kv = || async {
            let ep = s.kvstore.clone().expect("checked by Settings");
            let c = etcd_client::Client::connect([ep.as_str()], None)
                .await
                .with_context(|| format!("connecting to etcd {ep}"))?;
            anyhow::Ok(KvstoreAllocator::new(c, range.clone(), &node_ip.to_string()).await?)
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
        Ok(Agent {
            s,
            client,
            dp,
            state,
            alloc,
            filter,
            node_ip,
            pod_range,
            live: BTreeMap::new(),
            cidrs: CidrIdentities::default(),
            routes: BTreeMap::new(),
            snapshot,
        })
    }

    pub async fn run(mut self, stop: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
        let wake = Arc::new(tokio::sync::Notify::new());
        let c = &self.client;
        let cfg = watcher::Config::default();
        let stores = Stores {
            pods: spawn_store(
                Api::<Pod>::all(c.clone()),
                watcher::Config::default().fields(&format!("spec.nodeName={}", self.s.flags.node_name)),
                wake.clone(),
            ),
            ceps: spawn_store(Api::<CiliumEndpoint>::all(c.clone()), cfg.clone(), wake.clone()),
            ids: spawn_store(Api::<CiliumIdentity>::all(c.clone()), cfg.clone(), wake.clone()),
            cnps: spawn_store(Api::<CiliumNetworkPolicy>::all(c.clone()), cfg.clone(), wake.clone()),
            ccnps: spawn_store(Api::<CiliumClusterwideNetworkPolicy>::all(c.clone()), cfg.clone(), wake.clone()),
            cnodes: spawn_store(Api::<CiliumNode>::all(c.clone()), cfg, wake.clone()),
        };
        for (name, ready) in [
            ("pods", stores.pods.wait_until_ready().boxed()),
            ("ciliumendpoints", stores.ceps.wait_until_ready().boxed()),
            ("ciliumidentities", stores.ids.wait_until_ready().boxed()),
            ("ciliumnetworkpolicies", stores.cnps.wait_until_ready().boxed()),
            ("ciliumclusterwidenetworkpolicies", stores.ccnps.wait_until_ready().boxed()),
            ("ciliumnodes", stores.cnodes.wait_until_ready().boxed()),
        ] {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                r = ready => r.map_err(|e| anyhow!("{name} cache: {e}"))?,
            }
        }
        tracing::info!("caches synced, enforcing");
        self.snapshot.lock().expect("snapshot").ready = true;
        loop {
            if let Err(e) = self.reconcile(&stores).await {
                tracing::warn!(error = format!("{e:#}"), "reconcile failed, retrying");
            }
            self.refresh_names();
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }

    /// Endpoint names for the metrics endpoint (the counters are read from
    /// the pinned map on each scrape).
    fn refresh_names(&mut self) {
        let names = self
            .state
            .state
            .endpoints
            .values()
            .map(|e| (e.endpoint_id, format!("{}/{}", e.namespace, e.name)))
            .collect();
        self.snapshot.lock().expect("snapshot").endpoint_names = names;
    }

    async fn reconcile(&mut self, st: &Stores) -> anyhow::Result<()> {
        self.sync_routes(st);
        // Pods of this node.
        let pods: BTreeMap<String, Arc<Pod>> = st
            .pods
            .state()
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| Some((p.metadata.uid.clone()?, p)))
            .collect();
        let gone: Vec<String> = self
            .state
            .state
            .endpoints
            .keys()
            .chain(self.live.keys())
            .filter(|uid| !pods.contains_key(*uid))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for uid in gone {
            self.teardown(&uid).await;
        }
        // Identities for selectors: CiliumIdentities and what endpoints carry.
        let mut identities: BTreeMap<u32, BTreeMap<String, String>> = BTreeMap::new();
        for i in st.ids.state() {
            if let Some(id) = i.metadata.name.as_deref().and_then(|n| n.parse().ok()) {
                identities.insert(id, i.security_labels.clone());
            }
        }
        for e in st.ceps.state() {
            let Some(ident) = e.status.as_ref().and_then(|s| s.identity.as_ref()) else { continue };
            let (Some(id), Some(labels)) = (ident.id, ident.labels.as_ref()) else { continue };
            identities.entry(id as u32).or_insert_with(|| {
                labels.iter().filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect()
            });
        }
        let views: Vec<IdentityView> =
            identities.into_iter().map(|(id, labels)| IdentityView::new(id, labels)).collect();
        let cnps = st.cnps.state();
        let ccnps = st.ccnps.state();
        let mut sources: Vec<PolicySource> = Vec::new();
        for p in &cnps {
            sources.push(PolicySource {
                namespace: p.metadata.namespace.as_deref(),
                name: p.metadata.name.as_deref().unwrap_or_default(),
                rules: p.rules().collect(),
            });
        }
        for p in &ccnps {
            sources.push(PolicySource {
                namespace: None,
                name: p.metadata.name.as_deref().unwrap_or_default(),
                rules: p.rules().collect(),
            });
        }
        for (uid, pod) in &pods {
            if let Err(e) = self.ensure_endpoint(uid, pod, &views, &sources).await {
                tracing::warn!(pod = %format!("{}/{}", pod.metadata.namespace.as_deref().unwrap_or(""), pod.metadata.name.as_deref().unwrap_or("")), error = format!("{e:#}"), "endpoint not ready");
            }
        }
        // The ipcache: every endpoint of the cluster, and CIDR identities.
        let mut want: BTreeMap<(Ipv4Addr, u8), u32> = self.cidrs.by_prefix.iter().map(|(p, id)| (*p, *id)).collect();
        for e in st.ceps.state() {
            let Some(status) = e.status.as_ref() else { continue };
            let Some(id) = status.identity.as_ref().and_then(|i| i.id) else { continue };
            for a in status.networking.iter().flat_map(|n| &n.addressing) {
                if let Some(ip) = a.ipv4.as_deref().and_then(|i| i.parse::<Ipv4Addr>().ok()) {
                    want.insert((ip, 32), id as u32);
                }
            }
        }
        for l in self.live.values() {
            want.insert((l.rec.ip, 32), l.identity);
        }
        // Nodes: this one is `host` (also as the pods' gateway address, the
        // source of what the node itself sends them), the others
        // `remote-node`, as upstream's reserved identities.
        want.insert((netns::GATEWAY.parse().expect("gateway address"), 32), IDENTITY_HOST);
        for n in st.cnodes.state() {
            let mine = n.metadata.name.as_deref() == Some(self.s.flags.node_name.as_str());
            for a in n.spec.addresses.iter().flatten() {
                if let Some(ip) = a.ip.as_deref().and_then(|i| i.parse::<Ipv4Addr>().ok()) {
                    want.insert((ip, 32), if mine { IDENTITY_HOST } else { IDENTITY_REMOTE_NODE });
                }
            }
        }
        self.dp.sync_ipcache(&want)?;
        Ok(())
    }

    fn sync_routes(&mut self, st: &Stores) {
        let me = &self.s.flags.node_name;
        let mut want = BTreeMap::new();
        for n in st.cnodes.state() {
            if n.metadata.name.as_deref() == Some(me.as_str()) {
                continue;
            }
            let Some(ip) = n
                .spec
                .addresses
                .iter()
                .flatten()
                .find(|a| a.type_.as_deref() == Some("InternalIP"))
                .and_then(|a| a.ip.as_deref()?.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            for c in n.pod_cidrs().iter().filter(|c| !c.contains(':')) {
                want.insert(c.clone(), ip);
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

    fn identity_labels(&self, pod: &Pod) -> Labels {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let mut all = Labels::from_k8s(ns, pod.metadata.labels.iter().flatten().map(|(k, v)| (k.as_str(), v.as_str())));
        let sa = pod.spec.as_ref().and_then(|s| s.service_account_name.as_deref()).unwrap_or("default");
        all.insert(Label::new("k8s", "io.cilium.k8s.policy.serviceaccount", sa));
        all.insert(Label::new("k8s", "io.cilium.k8s.policy.cluster", "default"));
        self.filter.split(&all).0
    }

    async fn ensure_endpoint(
        &mut self,
        uid: &str,
        pod: &Pod,
        views: &[IdentityView],
        sources: &[PolicySource<'_>],
    ) -> anyhow::Result<()> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let labels = self.identity_labels(pod);
        if !self.live.contains_key(uid) {
            let known = self.state.state.endpoints.get(uid).cloned();
            let is_new = known.is_none();
            let rec = match known {
                Some(r) => r,
                None => {
                    let ip = self
                        .state
                        .free_ip(self.pod_range.0, self.pod_range.1)
                        .ok_or_else(|| anyhow!("no free address in the pod CIDR"))?;
                    let rec = EndpointRecord {
                        namespace: ns.clone(),
                        name: name.clone(),
                        ip,
                        endpoint_id: self.state.next_endpoint_id(),
                        netns: self.s.pod_ns(&ns, &name),
                        lxc: netns::ifname("lxc", uid),
                    };
                    // Remembered before anything is made: a crash never leaks
                    // or reuses the address.
                    self.state.state.endpoints.insert(uid.to_string(), rec.clone());
                    self.state.save()?;
                    rec
                }
            };
            let node_ns = self.s.node_ns();
            netns::make_pod(&node_ns, &rec.netns, &rec.lxc, rec.ip)?;
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
                    pad: [0; 2],
                };
                self.dp.set_endpoint(ifindex, deny_all)?;
            }
            netns::plug_pod(&node_ns, &rec.lxc, rec.ip)?;
            tracing::info!(pod = %format!("{ns}/{name}"), ip = %rec.ip, endpoint = rec.endpoint_id, "endpoint created");
            self.live.insert(
                uid.to_string(),
                Live {
                    rec,
                    ifindex,
                    identity: 0,
                    labels: Labels::new(),
                    computed: Computed::default(),
                    written: None,
                    reported: BTreeSet::new(),
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
        // endpoint is never reachable before its policy is in place.
        let sec = labels.security_labels();
        let computed = policy::compute(&ns, &sec, views, sources, &mut self.cidrs);
        let live = self.live.get_mut(uid).expect("live");
        let ep_id = live.rec.endpoint_id;
        let entries: BTreeMap<PolicyKey, PolicyValue> = computed
            .entries
            .iter()
            .map(|((peer, port, proto, dir), deny)| {
                (
                    PolicyKey { endpoint_id: ep_id, identity: *peer, dport: *port, proto: *proto, direction: *dir },
                    PolicyValue { deny: u8::from(*deny), pad: [0; 3] },
                )
            })
            .collect();
        self.dp.sync_policy(ep_id, &entries)?;
        self.dp.set_endpoint(
            live.ifindex,
            EndpointValue {
                endpoint_id: ep_id,
                identity,
                ingress_enforce: u8::from(computed.ingress_enforce),
                egress_enforce: u8::from(computed.egress_enforce),
                pad: [0; 2],
            },
        )?;
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
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            let ip = live.rec.ip.to_string();
            let status = json!({ "status": {
                "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }], "hostIP": self.node_ip.to_string(),
                "conditions": [{ "type": "Ready", "status": "True" }],
            } });
            pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .context("writing the Pod status")?;
            live.written = Some(body);
        }
        for note in new_notes {
            tracing::warn!(pod = %format!("{ns}/{name}"), "{note}");
            self.event(&ns, &name, &note).await;
            if let Some(l) = self.live.get_mut(uid) {
                l.reported.insert(note);
            }
        }
        Ok(())
    }

    async fn event(&self, ns: &str, name: &str, note: &str) {
        use kube::runtime::events::{Event, EventType, Recorder, Reporter};
        let recorder = Recorder::new(
            self.client.clone(),
            Reporter { controller: FIELD_MANAGER.into(), instance: Some(self.s.flags.node_name.clone()) },
        );
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("cilium.io/v2".into()),
            kind: Some("CiliumEndpoint".into()),
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        };
        let ev = Event {
            type_: EventType::Warning,
            reason: "PolicyNotEnforced".into(),
            note: Some(note.chars().take(1000).collect()),
            action: "EnforcePolicy".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &reference).await {
            tracing::debug!(error = %e, "publishing Event failed");
        }
    }

    async fn teardown(&mut self, uid: &str) {
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
        if let Err(e) = netns::delete(&rec.netns) {
            tracing::warn!(error = format!("{e:#}"), netns = %rec.netns, "cannot delete the pod namespace");
        }
        let api: Api<CiliumEndpoint> = Api::namespaced(self.client.clone(), &rec.namespace);
        match api.delete(&rec.name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => tracing::warn!(error = %e, "cannot delete the CiliumEndpoint"),
        }
        self.state.state.endpoints.remove(uid);
        if let Err(e) = self.state.save() {
            tracing::warn!(error = format!("{e:#}"), "cannot save state");
        }
        tracing::info!(pod = %format!("{}/{}", rec.namespace, rec.name), ip = %rec.ip, "endpoint removed, address released");
    }
}

fn cep_body(ns: &str, name: &str, uid: &str, l: &Live, node_ip: Ipv4Addr) -> serde_json::Value {
    let labels: Vec<String> = l.labels.iter().map(|x| format!("{}:{}={}", x.source, x.key, x.value)).collect();
    let dir = |enforcing: bool| json!({ "enforcing": enforcing, "state": if enforcing { "enforcing" } else { "non-enforcing" } });
    let log: Vec<serde_json::Value> =
        l.computed.not_enforced.iter().map(|n| json!({ "code": "Warning", "message": n, "state": "ready" })).collect();
    let mut status = json!({
        "id": l.rec.endpoint_id,
        "identity": { "id": l.identity, "labels": labels },
        "networking": { "addressing": [{ "ipv4": l.rec.ip.to_string() }], "node": node_ip.to_string() },
        "state": "ready",
        "policy": { "ingress": dir(l.computed.ingress_enforce), "egress": dir(l.computed.egress_enforce) },
        "external-identifiers": { "pod-name": format!("{ns}/{name}"), "k8s-namespace": ns, "k8s-pod-name": name },
    });
    if !log.is_empty() {
        status["log"] = json!(log);
    }
    json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumEndpoint",
        "metadata": { "name": name, "namespace": ns, "ownerReferences": [{
            "apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid }] },
        "status": status,
    })
}
