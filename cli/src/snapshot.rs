//! Reading the cluster's state into plain structs: identities (CRD or
//! kvstore), endpoints, CiliumNodes, Pods, the operator's Lease and the
//! kvstore's heartbeat and locks. Commands and `doctor` work on these.

use std::collections::{BTreeMap, HashMap};

use cilium_crds::{CiliumEndpoint, CiliumIdentity, CiliumNode};
use cilium_identity_alloc::HEARTBEAT_ANNOTATION;
use cilium_identity_alloc::kvstore::PREFIX;
use etcd_client::GetOptions;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::core::DeserializeGuard;
use serde::Serialize;

use crate::ctx::{Ctx, one_line};

#[derive(Clone, Debug, Serialize)]
pub struct IdentityInfo {
    pub id: u32,
    /// `"source:key" -> value`.
    pub labels: BTreeMap<String, String>,
    /// Endpoints (CRD) or value keys (kvstore) using it.
    pub users: usize,
    /// `io.cilium.heartbeat` mark (CRD only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub marked_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<jiff::Timestamp>,
    pub source: &'static str,
}

impl IdentityInfo {
    pub fn key_string(&self) -> String {
        let mut labels = cilium_identity::Labels::new();
        for (k, v) in &self.labels {
            let (source, key) = k.split_once(':').unwrap_or(("unspec", k));
            labels.insert(cilium_identity::Label::new(source, key, v));
        }
        labels.key_string()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct EndpointInfo {
    pub namespace: String,
    pub name: String,
    pub identity: Option<u32>,
    pub state: Option<String>,
    pub ipv4: Option<String>,
    pub ipv6: Option<String>,
    pub node: Option<String>,
    pub owner_pod_uid: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeInfo {
    pub name: String,
    pub pod_cidrs: Vec<String>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LeaseInfo {
    pub holder: Option<String>,
    pub renewed: Option<jiff::Timestamp>,
    pub duration_seconds: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub host_network: bool,
    pub phase: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LockInfo {
    pub key: String,
    /// The identity labels the lock guards.
    pub labels: String,
    pub lease: i64,
    /// Seconds left on the lease; -1 when the lease is gone (or none).
    pub ttl: i64,
    pub granted_ttl: i64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct KvInfo {
    pub endpoints: Vec<String>,
    /// Why it could not be read, if so.
    pub error: Option<String>,
    pub version: Option<String>,
    pub heartbeat: Option<String>,
    pub identities: usize,
    pub value_keys: usize,
    pub locks: Vec<LockInfo>,
}

/// The objects of a list that decode; each one that does not is named in a
/// warning (one object stored in a shape we cannot read must not hide the
/// rest).
pub fn decoded<K: kube::Resource>(ctx: &Ctx, kind: &str, items: Vec<DeserializeGuard<K>>) -> Vec<K> {
    items
        .into_iter()
        .filter_map(|g| match g.0 {
            Ok(k) => Some(k),
            Err(bad) => {
                let name = cilium_crds::guard::name_of(&bad);
                ctx.out.warn(&format!("{kind} {name} cannot be decoded, skipped: {}", bad.error));
                None
            }
        })
        .collect()
}

/// Lists with resourceVersion 0: served from the API server's watch cache,
/// one round trip even for tens of thousands of objects.
pub fn cached() -> ListParams {
    ListParams { resource_version: Some("0".into()), ..Default::default() }
}

pub async fn crd_identities(
    ctx: &Ctx,
    selector: Option<&str>,
    endpoints: &[EndpointInfo],
) -> anyhow::Result<Vec<IdentityInfo>> {
    ctx.out.step("listing CiliumIdentities");
    let mut lp = cached();
    lp.label_selector = selector.map(str::to_string);
    let list =
        Api::<DeserializeGuard<CiliumIdentity>>::all(ctx.client.clone()).list(&lp).await.map_err(|e| {
            match (&e, selector) {
                (kube::Error::Api(s), Some(sel)) if s.code == 400 => {
                    anyhow::anyhow!("invalid label selector {sel:?}: {}", s.message)
                }
                _ => ctx.kube_error(e, "listing CiliumIdentities"),
            }
        })?;
    let mut users: HashMap<u32, usize> = HashMap::new();
    for e in endpoints {
        if let Some(id) = e.identity {
            *users.entry(id).or_default() += 1;
        }
    }
    let mut out: Vec<IdentityInfo> = decoded(ctx, "CiliumIdentity", list.items)
        .into_iter()
        .filter_map(|i| {
            let id = i.metadata.name.as_deref()?.parse::<u32>().ok()?;
            Some(from_crd(id, i, users.get(&id).copied().unwrap_or(0)))
        })
        .collect();
    out.sort_by_key(|i| i.id);
    ctx.out.done();
    Ok(out)
}

/// One CiliumIdentity by ID (a single GET), with its users among `endpoints`.
pub async fn crd_identity(ctx: &Ctx, id: u32, endpoints: &[EndpointInfo]) -> anyhow::Result<Option<IdentityInfo>> {
    let found = Api::<DeserializeGuard<CiliumIdentity>>::all(ctx.client.clone())
        .get_opt(&id.to_string())
        .await
        .map_err(|e| ctx.kube_error(e, &format!("reading CiliumIdentity {id}")))?;
    let found = match found {
        Some(DeserializeGuard(Err(bad))) => {
            anyhow::bail!("CiliumIdentity {id} exists but cannot be decoded: {}", bad.error)
        }
        Some(DeserializeGuard(Ok(i))) => Some(i),
        None => None,
    };
    Ok(found.map(|i| from_crd(id, i, endpoints.iter().filter(|e| e.identity == Some(id)).count())))
}

fn from_crd(id: u32, i: CiliumIdentity, users: usize) -> IdentityInfo {
    IdentityInfo {
        id,
        users,
        marked_at: i.metadata.annotations.as_ref().and_then(|a| a.get(HEARTBEAT_ANNOTATION)).cloned(),
        created: i.metadata.creation_timestamp.map(|t| t.0),
        labels: i.security_labels,
        source: "crd",
    }
}

/// Identities in the kvstore: `id/<ID>` keys, users = value keys of their labels.
pub async fn kvstore_identities(ctx: &Ctx, etcd: &mut etcd_client::Client) -> anyhow::Result<Vec<IdentityInfo>> {
    ctx.out.step("reading kvstore identities");
    let fail = |e: etcd_client::Error| anyhow::anyhow!("reading kvstore identities: {}", one_line(&e.to_string()));
    let id_prefix = format!("{PREFIX}id/");
    let ids = etcd.get(id_prefix.as_str(), Some(GetOptions::new().with_prefix())).await.map_err(fail)?;
    let value_root = format!("{PREFIX}value/");
    let values =
        etcd.get(value_root.as_str(), Some(GetOptions::new().with_prefix().with_keys_only())).await.map_err(fail)?;
    let mut users: HashMap<String, usize> = HashMap::new();
    for kv in values.kvs() {
        if let Some((labels, _node)) =
            kv.key_str().ok().and_then(|k| k.strip_prefix(&value_root)).and_then(|k| k.rsplit_once('/'))
        {
            *users.entry(labels.to_string()).or_default() += 1;
        }
    }
    let mut out: Vec<IdentityInfo> = ids
        .kvs()
        .iter()
        .filter_map(|kv| {
            let id = kv.key_str().ok()?.strip_prefix(&id_prefix)?.parse::<u32>().ok()?;
            let key_string = kv.value_str().ok()?.to_string();
            Some(IdentityInfo {
                id,
                users: users.get(&key_string).copied().unwrap_or(0),
                labels: cilium_identity::Labels::from_key_string(&key_string).security_labels(),
                marked_at: None,
                created: None,
                source: "kvstore",
            })
        })
        .collect();
    out.sort_by_key(|i| i.id);
    ctx.out.done();
    Ok(out)
}

/// Whether identities are read from the kvstore (per identity-allocation-mode).
pub fn reads_kvstore(ctx: &Ctx) -> bool {
    use cilium_operator::config::IdentityAllocationMode as M;
    matches!(ctx.config.identity_allocation_mode, M::Kvstore | M::DoubleWriteReadKvstore)
}

/// Identities from where the allocation mode reads them.
pub async fn identities(
    ctx: &Ctx,
    source: Option<&str>,
    selector: Option<&str>,
    endpoints: &[EndpointInfo],
) -> anyhow::Result<Vec<IdentityInfo>> {
    let kv = match source {
        Some("kvstore") => true,
        Some("crd") => false,
        Some(other) => anyhow::bail!("unknown identity source {other:?}: use crd or kvstore"),
        None => reads_kvstore(ctx),
    };
    if kv {
        if selector.is_some() {
            anyhow::bail!("--selector works on CiliumIdentity objects only; use --label with --source kvstore");
        }
        let mut etcd = ctx.etcd().await?;
        kvstore_identities(ctx, &mut etcd).await
    } else {
        crd_identities(ctx, selector, endpoints).await
    }
}

pub async fn endpoints(ctx: &Ctx, namespace: Option<&str>) -> anyhow::Result<Vec<EndpointInfo>> {
    ctx.out.step("listing CiliumEndpoints");
    let api: Api<DeserializeGuard<CiliumEndpoint>> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let list = api.list(&cached()).await.map_err(|e| ctx.kube_error(e, "listing CiliumEndpoints"))?;
    let mut out: Vec<EndpointInfo> = decoded(ctx, "CiliumEndpoint", list.items)
        .into_iter()
        .map(|e| {
            let status = e.status.unwrap_or_default();
            let addressing = status.networking.as_ref().and_then(|n| n.addressing.first().cloned());
            EndpointInfo {
                namespace: e.metadata.namespace.unwrap_or_default(),
                name: e.metadata.name.unwrap_or_default(),
                identity: status.identity.as_ref().and_then(|i| i.id).and_then(|id| u32::try_from(id).ok()),
                state: status
                    .state
                    .and_then(|s| serde_json::to_value(s).ok())
                    .and_then(|v| v.as_str().map(str::to_string)),
                ipv4: addressing.as_ref().and_then(|a| a.ipv4.clone()),
                ipv6: addressing.as_ref().and_then(|a| a.ipv6.clone()),
                node: status.networking.and_then(|n| n.node),
                owner_pod_uid: e
                    .metadata
                    .owner_references
                    .unwrap_or_default()
                    .into_iter()
                    .find(|o| o.kind == "Pod")
                    .map(|o| o.uid),
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    ctx.out.done();
    Ok(out)
}

pub async fn nodes(ctx: &Ctx) -> anyhow::Result<Vec<NodeInfo>> {
    ctx.out.step("listing CiliumNodes");
    let list = Api::<DeserializeGuard<CiliumNode>>::all(ctx.client.clone())
        .list(&cached())
        .await
        .map_err(|e| ctx.kube_error(e, "listing CiliumNodes"))?;
    let mut out: Vec<NodeInfo> = decoded(ctx, "CiliumNode", list.items)
        .into_iter()
        .map(|n| NodeInfo {
            name: n.metadata.name.unwrap_or_default(),
            pod_cidrs: n.spec.ipam.and_then(|i| i.pod_cidrs).unwrap_or_default(),
            error: n
                .status
                .and_then(|s| s.ipam)
                .and_then(|i| i.operator_status)
                .and_then(|o| o.error)
                .filter(|e| !e.is_empty()),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    ctx.out.done();
    Ok(out)
}

pub async fn pods(ctx: &Ctx) -> anyhow::Result<Vec<PodInfo>> {
    ctx.out.step("listing Pods");
    let list =
        Api::<Pod>::all(ctx.client.clone()).list(&cached()).await.map_err(|e| ctx.kube_error(e, "listing Pods"))?;
    ctx.out.done();
    Ok(list
        .items
        .into_iter()
        .map(|p| PodInfo {
            namespace: p.metadata.namespace.unwrap_or_default(),
            name: p.metadata.name.unwrap_or_default(),
            uid: p.metadata.uid.unwrap_or_default(),
            host_network: p.spec.and_then(|s| s.host_network).unwrap_or(false),
            phase: p.status.and_then(|s| s.phase),
        })
        .collect())
}

pub async fn lease(ctx: &Ctx) -> anyhow::Result<Option<LeaseInfo>> {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let lease = api
        .get_opt(cilium_operator::leader::LEASE_NAME)
        .await
        .map_err(|e| ctx.kube_error(e, "reading the operator's Lease"))?;
    Ok(lease.map(|l| {
        let spec = l.spec.unwrap_or_default();
        LeaseInfo {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            renewed: spec.renew_time.map(|t| t.0),
            duration_seconds: spec.lease_duration_seconds.unwrap_or(15) as i64,
        }
    }))
}

/// The kvstore's state, or why it could not be read (never an error: the
/// caller reports it). None when no kvstore is configured.
pub async fn kvstore(ctx: &Ctx) -> Option<KvInfo> {
    let endpoints = ctx.kvstore_endpoints()?;
    let mut info = KvInfo { endpoints: endpoints.clone(), ..Default::default() };
    ctx.out.step("reading the kvstore");
    let r = read_kvstore(&endpoints, &mut info).await;
    ctx.out.done();
    if let Err(e) = r {
        info.error = Some(format!("{e:#}"));
    }
    Some(info)
}

async fn read_kvstore(endpoints: &[String], info: &mut KvInfo) -> anyhow::Result<()> {
    let mut c = crate::ctx::connect_etcd(endpoints).await?;
    let fail = |e: etcd_client::Error| anyhow::anyhow!("reading etcd: {}", one_line(&e.to_string()));
    info.version = Some(c.status().await.map_err(fail)?.version().to_string());
    let hb = c.get(cilium_operator::kvstore::HEARTBEAT_KEY, None).await.map_err(fail)?;
    info.heartbeat = hb.kvs().first().and_then(|kv| kv.value_str().ok()).map(str::to_string);
    let count = |prefix: String| GetOptions::new().with_prefix().with_count_only().with_range(prefix_end(&prefix));
    let id_prefix = format!("{PREFIX}id/");
    info.identities = c.get(id_prefix.as_str(), Some(count(id_prefix.clone()))).await.map_err(fail)?.count() as usize;
    let value_prefix = format!("{PREFIX}value/");
    info.value_keys =
        c.get(value_prefix.as_str(), Some(count(value_prefix.clone()))).await.map_err(fail)?.count() as usize;
    info.locks = locks(&mut c).await?;
    Ok(())
}

fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// Locks under `locks/<labels>/<leaseID>`, with their leases' TTLs.
pub async fn locks(c: &mut etcd_client::Client) -> anyhow::Result<Vec<LockInfo>> {
    let fail = |e: etcd_client::Error| anyhow::anyhow!("reading kvstore locks: {}", one_line(&e.to_string()));
    let root = format!("{PREFIX}locks/");
    let resp = c.get(root.as_str(), Some(GetOptions::new().with_prefix().with_keys_only())).await.map_err(fail)?;
    let mut out = Vec::new();
    for kv in resp.kvs() {
        let key = kv.key_str().unwrap_or_default().to_string();
        let labels =
            key.strip_prefix(&root).and_then(|k| k.rsplit_once('/')).map(|(l, _)| l.to_string()).unwrap_or_default();
        let lease = kv.lease();
        let (ttl, granted_ttl) = if lease == 0 {
            (-1, 0)
        } else {
            let r = c.lease_time_to_live(lease, None).await.map_err(fail)?;
            (r.ttl(), r.granted_ttl())
        };
        out.push(LockInfo { key, labels, lease, ttl, granted_ttl });
    }
    Ok(out)
}
