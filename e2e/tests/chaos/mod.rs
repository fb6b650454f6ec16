//! Control-plane state under faults, through the real agents and operator:
//! etcd black-holed for longer than the agents' session lease, CiliumEndpoints
//! of running pods deleted, a StatefulSet-style pod name reused on another
//! node while the first node's agent is down. Each counts what it checks and
//! prints the figures.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use cilium_crds::CiliumEndpoint;
use e2e::netns::{can_connect, serve};
use e2e::proxy::Proxy;
use e2e::{ControlPlane, block_on, eventually};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

use crate::datapath::{RULE1, cluster, cluster_with, expect_conn, star_wars};

/// Every endpoint's identity: pod name -> (ID, sorted labels).
async fn endpoint_identities(client: kube::Client) -> anyhow::Result<BTreeMap<String, (u32, Vec<String>)>> {
    let ceps: Api<CiliumEndpoint> = Api::namespaced(client, "default");
    let mut out = BTreeMap::new();
    for c in ceps.list(&Default::default()).await?.items {
        let ident = c.status.and_then(|s| s.identity).context("CEP without identity")?;
        let mut labels = ident.labels.unwrap_or_default();
        labels.sort();
        out.insert(c.metadata.name.unwrap_or_default(), (ident.id.context("no id")? as u32, labels));
    }
    Ok(out)
}

/// Waits until every value key in etcd is gone (the agents' session lease
/// expired while they were cut off).
async fn value_keys_expired(etcd: &etcd_client::Client) -> anyhow::Result<()> {
    eventually("the agents' value keys to expire", Duration::from_secs(30), || {
        let mut etcd = etcd.clone();
        async move {
            let r = etcd
                .get(
                    format!("{}value/", cilium_identity_alloc::kvstore::PREFIX),
                    Some(etcd_client::GetOptions::new().with_prefix().with_count_only()),
                )
                .await?;
            Ok((r.count() == 0).then_some(()))
        }
    })
    .await
}

/// Waits until every identity of `wanted` (pod -> (ID, labels)) is back in
/// etcd: its `id/` key holding its labels (other labels there: an error)
/// and a value key of a node using it.
async fn identities_back(
    etcd: &etcd_client::Client,
    wanted: &BTreeMap<String, (u32, Vec<String>)>,
) -> anyhow::Result<()> {
    eventually("every in-use identity back under its ID", Duration::from_secs(40), || {
        let mut etcd = etcd.clone();
        async move {
            for (pod, (id, labels)) in wanted {
                let r = etcd.get(cilium_identity_alloc::kvstore::id_key(*id), None).await?;
                let Some(v) = r.kvs().first() else { return Ok(None) };
                ensure!(v.value_str()? == key_string(labels), "id/{id} of {pod} holds {} now", v.value_str()?);
                let values = etcd
                    .get(
                        cilium_identity_alloc::kvstore::value_prefix(&key_string(labels)),
                        Some(etcd_client::GetOptions::new().with_prefix().with_count_only()),
                    )
                    .await?;
                if values.count() == 0 {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        }
    })
    .await
}

/// The kvstore label key of a CEP's labels (`source:key=value;` each).
fn key_string(labels: &[String]) -> String {
    labels.iter().map(|l| format!("{l};")).collect()
}

/// Labels another node allocates the tiefighter's freed ID for.
const INTRUDER: &str = "k8s:app=intruder;k8s:io.kubernetes.pod.namespace=default;";

pub fn etcd_blackhole_longer_than_the_lease(_shared: &ControlPlane) -> anyhow::Result<()> {
    let proxy: RefCell<Option<Proxy>> = RefCell::new(None);
    let c = cluster_with("bh", &["node-a", "node-b"], |cp| {
        let target: SocketAddr = cp.etcd_endpoint.trim_start_matches("http://").parse().expect("etcd address");
        let p = Proxy::start(target).expect("proxy");
        let through = format!("http://{}", p.addr);
        *proxy.borrow_mut() = Some(p);
        let m = "--identity-allocation-mode=kvstore".to_string();
        (
            vec![
                m.clone(),
                "--kvstore=etcd".into(),
                format!("--kvstore-opt=etcd.address={}", cp.etcd_endpoint),
                "--identity-gc-interval=2s".into(),
            ],
            vec![m, format!("--kvstore-endpoint={through}"), "--kvstore-lease-ttl=6s".into()],
        )
    })?;
    let proxy = proxy.into_inner().context("proxy")?;
    let result = (|| -> anyhow::Result<()> {
        let sw = star_wars(&c, &[80])?;
        let (ds, tie, xwing) = (sw.deathstar, sw.tie.clone(), sw.xwing.clone());
        let t = Duration::from_secs(20);
        c.kubectl(&["apply", "-f", "-"], Some(RULE1))?;
        expect_conn(&c, "xwing under rule1", &xwing, ds, 80, false, t)?;
        expect_conn(&c, "tiefighter under rule1", &tie, ds, 80, true, t)?;
        let before = block_on(async { endpoint_identities(c.cp.client().await?).await })?;

        // Cut the agents off etcd, longer than their 6 s session lease and
        // two GC rounds of the operator (which talks to etcd directly).
        let cut = Instant::now();
        proxy.blackhole();
        let vanished = block_on(async {
            let mut etcd = etcd_client::Client::connect([c.cp.etcd_endpoint.as_str()], None).await?;
            value_keys_expired(&etcd).await?;
            // Give the GC its two rounds over the orphaned IDs.
            tokio::time::sleep(Duration::from_secs(6)).await;
            let ids = etcd
                .get(
                    format!("{}id/", cilium_identity_alloc::kvstore::PREFIX),
                    Some(etcd_client::GetOptions::new().with_prefix().with_count_only()),
                )
                .await?
                .count();
            // Another node takes the tiefighter's ID for other labels
            // meanwhile (as it may once the GC freed it); its value key keeps
            // the GC off it.
            let taken = before["tiefighter"].0;
            etcd.put(cilium_identity_alloc::kvstore::id_key(taken), INTRUDER, None).await?;
            let user = format!("{}192.0.2.8", cilium_identity_alloc::kvstore::value_prefix(INTRUDER));
            etcd.put(user, taken.to_string(), None).await?;
            anyhow::Ok(ids)
        })?;
        let cut_for = cut.elapsed();
        // The datapath keeps enforcing while etcd is away.
        ensure!(!can_connect(&xwing, ds, 80, Duration::from_millis(700))?, "xwing got through during the outage");
        proxy.restore();
        let healed = Instant::now();

        // Every identity in use exists again with its labels and this
        // node's value key; no two label sets share an ID.
        block_on(async {
            let mut etcd = etcd_client::Client::connect([c.cp.etcd_endpoint.as_str()], None).await?;
            let others: BTreeMap<String, (u32, Vec<String>)> =
                before.iter().filter(|(pod, _)| *pod != "tiefighter").map(|(p, v)| (p.clone(), v.clone())).collect();
            identities_back(&etcd, &others).await?;
            // The tiefighter gets a new ID holding its labels; the other
            // label set keeps the old one.
            let (old_tie, tie_labels) = before["tiefighter"].clone();
            eventually("the tiefighter re-identified", Duration::from_secs(40), || {
                let mut etcd = etcd.clone();
                let (c, tie_labels) = (&c, &tie_labels);
                async move {
                    let now = endpoint_identities(c.cp.client().await?).await?;
                    let id = now["tiefighter"].0;
                    if id == old_tie {
                        return Ok(None);
                    }
                    let r = etcd.get(cilium_identity_alloc::kvstore::id_key(id), None).await?;
                    Ok(r.kvs()
                        .first()
                        .is_some_and(|v| v.value_str().ok() == Some(&key_string(tie_labels)))
                        .then_some(()))
                }
            })
            .await?;
            let r = etcd.get(cilium_identity_alloc::kvstore::id_key(old_tie), None).await?;
            ensure!(
                r.kvs().first().and_then(|v| v.value_str().ok()) == Some(INTRUDER),
                "the other label set lost id/{old_tie}"
            );
            let after = endpoint_identities(c.cp.client().await?).await?;
            let mut by_id: BTreeMap<u32, BTreeSet<Vec<String>>> = BTreeMap::new();
            for (id, labels) in after.values() {
                by_id.entry(*id).or_default().insert(labels.clone());
            }
            for (id, sets) in &by_id {
                ensure!(sets.len() == 1, "identity {id} shared by {} label sets: {sets:?}", sets.len());
            }
            let _ = etcd.status().await?;
            anyhow::Ok(())
        })?;
        let recovered = healed.elapsed();
        expect_conn(&c, "xwing after the outage", &xwing, ds, 80, false, t)?;
        expect_conn(&c, "tiefighter after the outage", &tie, ds, 80, true, t)?;
        eprintln!(
            "etcd black hole round 1: {:.1}s cut (lease 6s), value keys expired, {vanished} id keys left by the GC, \
             every in-use identity back {:.1}s after healing (one re-identified: its ID was taken meanwhile), 0 shared, 0 lost",
            cut_for.as_secs_f64(),
            recovered.as_secs_f64()
        );

        // More rounds without an intruder (its value key, written without a
        // lease, goes): each time every identity in use comes back under
        // the same ID, nothing shared, enforcement held.
        block_on(async {
            let mut etcd = etcd_client::Client::connect([c.cp.etcd_endpoint.as_str()], None).await?;
            etcd.delete(
                cilium_identity_alloc::kvstore::value_prefix(INTRUDER),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await?;
            anyhow::Ok(())
        })?;
        for round in 2..=3 {
            let before = block_on(async { endpoint_identities(c.cp.client().await?).await })?;
            let cut = Instant::now();
            proxy.blackhole();
            block_on(async {
                let etcd = etcd_client::Client::connect([c.cp.etcd_endpoint.as_str()], None).await?;
                value_keys_expired(&etcd).await?;
                tokio::time::sleep(Duration::from_secs(6)).await;
                anyhow::Ok(())
            })?;
            ensure!(
                !can_connect(&xwing, ds, 80, Duration::from_millis(700))?,
                "round {round}: xwing got through during the outage"
            );
            let cut_for = cut.elapsed();
            proxy.restore();
            let healed = Instant::now();
            block_on(async {
                let etcd = etcd_client::Client::connect([c.cp.etcd_endpoint.as_str()], None).await?;
                identities_back(&etcd, &before).await
            })?;
            let recovered = healed.elapsed();
            let after = block_on(async { endpoint_identities(c.cp.client().await?).await })?;
            ensure!(after == before, "round {round}: endpoint identities changed: {before:?} -> {after:?}");
            expect_conn(&c, "xwing after the outage", &xwing, ds, 80, false, t)?;
            expect_conn(&c, "tiefighter after the outage", &tie, ds, 80, true, t)?;
            eprintln!(
                "etcd black hole round {round}: {:.1}s cut, every in-use identity back under its ID {:.1}s after healing, \
                 0 shared, 0 lost",
                cut_for.as_secs_f64(),
                recovered.as_secs_f64()
            );
        }
        eprintln!("etcd black hole: 3 rounds survived, 0 identities shared, 0 in-use identities lost");
        Ok(())
    })();
    result.map_err(|e| e.context(c.cp.log_tails(10)))
}

pub fn deleted_endpoints_of_running_pods_come_back(_shared: &ControlPlane) -> anyhow::Result<()> {
    let c = cluster("cepback", &["node-a", "node-b"])?;
    let result = (|| -> anyhow::Result<()> {
        for (node, name) in [("node-a", "a1"), ("node-a", "a2"), ("node-b", "b1"), ("node-b", "b2")] {
            block_on(c.pod(node, name, json!({ "app": name })))?;
        }
        let mut worst = Duration::ZERO;
        let mut rounds = 0;
        block_on(async {
            let client = c.cp.client().await?;
            let ceps: Api<CiliumEndpoint> = Api::namespaced(client.clone(), "default");
            for round in 0..3 {
                for name in ["a1", "b1", "a2", "b2"] {
                    let cep = ceps.get(name).await?;
                    let id = cep.status.as_ref().and_then(|s| s.identity.as_ref()).and_then(|i| i.id);
                    // By hand (kubectl delete), or as a GC racing its watch
                    // would (a delete with the CEP's uid as precondition).
                    let dp = if round % 2 == 0 {
                        DeleteParams::default()
                    } else {
                        DeleteParams {
                            preconditions: Some(kube::api::Preconditions {
                                uid: cep.metadata.uid.clone(),
                                resource_version: None,
                            }),
                            ..Default::default()
                        }
                    };
                    let t0 = Instant::now();
                    ceps.delete(name, &dp).await?;
                    let back = eventually(&format!("CEP {name} back"), Duration::from_secs(10), || async {
                        Ok(ceps.get_opt(name).await?.filter(|c| c.metadata.uid != cep.metadata.uid))
                    })
                    .await?;
                    let id2 = back.status.as_ref().and_then(|s| s.identity.as_ref()).and_then(|i| i.id);
                    ensure!(id2 == id, "{name} came back with identity {id2:?}, had {id:?}");
                    worst = worst.max(t0.elapsed());
                    rounds += 1;
                }
            }
            anyhow::Ok(())
        })?;
        eprintln!(
            "CEP deletion: {rounds} CEPs of running pods deleted (by hand and with a uid precondition), all back, worst {:.2}s",
            worst.as_secs_f64()
        );
        Ok(())
    })();
    result.map_err(|e| e.context(c.cp.log_tails(10)))
}

pub fn statefulset_name_reused_on_another_node(_shared: &ControlPlane) -> anyhow::Result<()> {
    let mut c = cluster("sts", &["node-a", "node-b"])?;
    let result = (|| -> anyhow::Result<()> {
        block_on(c.pod("node-a", "web-0", json!({ "app": "web" })))?;
        block_on(c.pod("node-b", "client", json!({ "app": "client" })))?;
        // node-a's agent goes down; web-0 is deleted and comes back on
        // node-b under the same name (a StatefulSet after a node failure).
        let a = c.agents.get_mut("node-a").context("agent")?;
        a.proc.signal(libc::SIGKILL);
        a.proc.wait_exit(Duration::from_secs(5)).context("agent did not exit")?;
        let old_uid = block_on(async {
            let client = c.cp.client().await?;
            let pods: Api<Pod> = Api::namespaced(client, "default");
            let old = pods.get("web-0").await?;
            pods.delete("web-0", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await?;
            eventually("web-0 gone", Duration::from_secs(20), || async {
                Ok(pods.get_opt("web-0").await?.is_none().then_some(()))
            })
            .await?;
            anyhow::Ok(old.metadata.uid.unwrap_or_default())
        })?;
        block_on(c.pod("node-b", "web-0", json!({ "app": "web" })))?;
        // The old CEP of web-0 may still answer first: wait for the new one.
        let (new_uid, ip) = block_on(async {
            let client = c.cp.client().await?;
            let uid =
                Api::<Pod>::namespaced(client.clone(), "default").get("web-0").await?.metadata.uid.unwrap_or_default();
            let ceps: Api<CiliumEndpoint> = Api::namespaced(client, "default");
            let ip = eventually("the new web-0's CEP", Duration::from_secs(20), || async {
                let Some(cep) = ceps.get_opt("web-0").await? else { return Ok(None) };
                let owned = cep.metadata.owner_references.iter().flatten().any(|o| o.uid == uid);
                let ip = cep.status.and_then(|s| s.networking).and_then(|n| n.addressing.first()?.ipv4.clone());
                Ok(ip.filter(|_| owned).and_then(|i| i.parse::<std::net::Ipv4Addr>().ok()))
            })
            .await?;
            anyhow::Ok((uid, ip))
        })?;
        ensure!(new_uid != old_uid);
        // The same CEP object throughout (not deleted and written again).
        let cep_of = || {
            block_on(async {
                let ceps: Api<CiliumEndpoint> = Api::namespaced(c.cp.client().await?, "default");
                anyhow::Ok(ceps.get_opt("web-0").await?.map(|c| {
                    let owner = c.metadata.owner_references.unwrap_or_default().into_iter().find(|o| o.kind == "Pod");
                    (c.metadata.uid.unwrap_or_default(), owner.map(|o| o.uid))
                }))
            })
        };
        let (cep_uid, _) = cep_of()?.context("no CEP for web-0")?;
        // node-a's agent comes back and tears down the old web-0: the new
        // web-0's CiliumEndpoint stays.
        let a = c.agents.get_mut("node-a").context("agent")?;
        a.respawn()?;
        a.wait_ready(Duration::from_secs(30))?;
        let web_ns = c.pod_ns("node-b", "default", "web-0");
        let _srv = serve(&web_ns, 80)?;

        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(8) {
            let now = cep_of()?;
            ensure!(
                now == Some((cep_uid.clone(), Some(new_uid.clone()))),
                "web-0's CiliumEndpoint changed: {now:?}, want ({cep_uid}, {new_uid})"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        ensure!(
            c.agents["node-a"].proc.log_text().contains("endpoint removed"),
            "node-a did not tear the old web-0 down"
        );
        let client_ns = c.pod_ns("node-b", "default", "client");
        ensure!(can_connect(&client_ns, ip, 80, Duration::from_secs(2))?, "the new web-0 is not reachable");
        let _ = PostParams::default();
        eprintln!(
            "StatefulSet name reuse: the old node's agent tore down web-0 and kept the new web-0's CEP (owner {new_uid})"
        );
        Ok(())
    })();
    result.map_err(|e| e.context(c.cp.log_tails(10)))
}

/// Our CRD kinds with a schema that accepts anything: what objects stored
/// under an older or foreign CRD schema look like to us.
const PERMISSIVE: &str = r#"[{"op":"replace","path":"/spec/versions/0/schema/openAPIV3Schema","value":{"type":"object","x-kubernetes-preserve-unknown-fields":true}}]"#;

const MALFORMED: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: { name: bad-cnp, namespace: default }
spec: { endpointSelector: "org=empire", ingress: "everyone" }
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: { name: bad-ccnp }
spec: { endpointSelector: { matchLabels: [ "org", "alliance" ] } }
---
apiVersion: cilium.io/v2
kind: CiliumIdentity
metadata: { name: "65000" }
security-labels: [ "k8s:app=broken" ]
---
apiVersion: cilium.io/v2
kind: CiliumEndpoint
metadata: { name: bad-cep, namespace: default }
status: { identity: { id: "seven" }, networking: "none" }
---
apiVersion: cilium.io/v2
kind: CiliumNode
metadata: { name: bad-node }
spec: { ipam: { podCIDRs: "10.200.250.0/24" } }
"#;

/// One object of each of our kinds that does not decode (stored under a
/// permissive schema), present when the operator and the agents start:
/// each is skipped, counted and named, and everything else keeps working
/// (caches sync, the policy is enforced with real packets, new pods get
/// identities and endpoints, the identity GC collects, ciliumctl lists).
pub fn malformed_objects_are_skipped_and_named(_shared: &ControlPlane) -> anyhow::Result<()> {
    let op_flags: Vec<String> =
        ["--identity-gc-interval=2s", "--identity-heartbeat-timeout=4s"].map(String::from).to_vec();
    let flags = op_flags.clone();
    let mut c = cluster_with("bad", &["node-a", "node-b"], move |_| (flags.clone(), Vec::new()))?;
    let result = (|| -> anyhow::Result<()> {
        let sw = star_wars(&c, &[80])?;
        for crd in [
            "ciliumnetworkpolicies",
            "ciliumclusterwidenetworkpolicies",
            "ciliumidentities",
            "ciliumendpoints",
            "ciliumnodes",
        ] {
            c.kubectl(&["patch", "crd", &format!("{crd}.cilium.io"), "--type=json", "-p", PERMISSIVE], None)?;
        }
        c.kubectl(&["apply", "--validate=false", "-f", "-"], Some(MALFORMED))?;

        // Both sides start with the malformed objects in their first lists.
        c.operator.stop()?;
        let mut all_flags = vec!["--cluster-pool-ipv4-cidr=10.200.0.0/16".to_string()];
        all_flags.extend(op_flags.iter().cloned());
        c.operator = e2e::Operator::start(&c.cp, "operator-bad-2", "kube-system", &all_flags)?;
        c.operator.wait_healthy(Duration::from_secs(60))?;
        for a in c.agents.values_mut() {
            a.respawn()?;
            a.wait_ready(Duration::from_secs(30)).context("an agent did not sync its caches")?;
        }

        c.kubectl(&["apply", "-f", "-"], Some(RULE1))?;
        expect_conn(&c, "xwing -> deathstar:80", &sw.xwing, sw.deathstar, 80, false, Duration::from_secs(10))?;
        expect_conn(&c, "tiefighter -> deathstar:80", &sw.tie, sw.deathstar, 80, true, Duration::from_secs(10))?;

        block_on(async {
            let client = c.cp.client().await?;
            let valid = |ar: kube::discovery::ApiResource, ns: Option<&'static str>, name: &'static str| {
                let client = client.clone();
                async move {
                    let api: Api<kube::api::DynamicObject> = match ns {
                        Some(ns) => Api::namespaced_with(client, ns, &ar),
                        None => Api::all_with(client, &ar),
                    };
                    eventually(&format!("Valid condition of {name}"), Duration::from_secs(15), || async {
                        let o = api.get(name).await?;
                        let cond = o.data["status"]["conditions"]
                            .as_array()
                            .and_then(|cs| cs.iter().find(|c| c["type"] == "Valid").cloned());
                        Ok(cond.map(|c| {
                            (
                                c["status"].as_str().unwrap_or("").to_string(),
                                c["message"].as_str().unwrap_or("").to_string(),
                            )
                        }))
                    })
                    .await
                }
            };
            let cnp = || kube::discovery::ApiResource::erase::<cilium_crds::CiliumNetworkPolicy>(&());
            let ccnp = kube::discovery::ApiResource::erase::<cilium_crds::CiliumClusterwideNetworkPolicy>(&());
            let (s, m) = valid(cnp(), Some("default"), "bad-cnp").await?;
            ensure!(s == "False" && m.contains("cannot be decoded"), "bad-cnp: Valid={s} {m:?}");
            let (s, m) = valid(ccnp, None, "bad-ccnp").await?;
            ensure!(s == "False" && m.contains("cannot be decoded"), "bad-ccnp: Valid={s} {m:?}");
            let (s, _) = valid(cnp(), Some("default"), "rule1").await?;
            ensure!(s == "True", "rule1: Valid={s}");

            // A new pod gets an identity and an endpoint, and is enforced.
            anyhow::Ok(())
        })?;
        let ip2 = block_on(c.pod("node-b", "tiefighter-2", json!({ "org": "empire", "class": "tiefighter" })))?;
        let tie2 = c.pod_ns("node-b", "default", "tiefighter-2");
        expect_conn(&c, "tiefighter-2 -> deathstar:80", &tie2, sw.deathstar, 80, true, Duration::from_secs(10))?;
        let _ = ip2;

        // The identity GC still collects: an unused identity goes, the
        // unreadable one is left alone.
        block_on(async {
            let client = c.cp.client().await?;
            let ids: Api<kube::api::DynamicObject> =
                Api::all_with(client.clone(), &kube::discovery::ApiResource::erase::<cilium_crds::CiliumIdentity>(&()));
            let orphan: kube::api::DynamicObject = serde_json::from_value(json!({
                "apiVersion": "cilium.io/v2", "kind": "CiliumIdentity",
                "metadata": { "name": "65001" }, "security-labels": { "k8s:app": "orphan" }
            }))?;
            ids.create(&PostParams::default(), &orphan).await?;
            eventually("the unused identity 65001 collected", Duration::from_secs(30), || async {
                Ok(ids.get_opt("65001").await?.is_none().then_some(()))
            })
            .await?;
            ensure!(ids.get_opt("65000").await?.is_some(), "the malformed identity was deleted");
            anyhow::Ok(())
        })?;

        let op = c.operator.metrics()?;
        for kind in ["CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "CiliumIdentity", "CiliumEndpoint"] {
            let n =
                e2e::process::sample_value(&op, &format!("cilium_operator_malformed_objects_total{{kind=\"{kind}\"}}"));
            ensure!(n.is_some_and(|n| n >= 1.0), "operator: {kind} not counted as malformed:\n{op}");
        }
        for a in c.agents.values() {
            let m = a.metrics()?;
            for kind in [
                "CiliumNetworkPolicy",
                "CiliumClusterwideNetworkPolicy",
                "CiliumIdentity",
                "CiliumEndpoint",
                "CiliumNode",
            ] {
                let n =
                    e2e::process::sample_value(&m, &format!("cilium_k8s_malformed_objects_total{{kind=\"{kind}\"}}"));
                ensure!(n.is_some_and(|n| n >= 1.0), "{}: {kind} not counted as malformed:\n{m}", a.node);
            }
            ensure!(a.proc.log_text().contains("bad-cnp"), "{}: the log does not name bad-cnp", a.node);
        }

        // ciliumctl lists what decodes and names what does not.
        let out = std::process::Command::new(e2e::tools::workspace_bin("ciliumctl")?)
            .args(["endpoint", "list"])
            .env("KUBECONFIG", &c.cp.kubeconfig)
            .output()?;
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        ensure!(out.status.success(), "ciliumctl endpoint list failed:\n{stdout}\n{stderr}");
        ensure!(
            stdout.contains("tiefighter-2") && stderr.contains("default/bad-cep"),
            "ciliumctl endpoint list:\n{stdout}\n{stderr}"
        );
        eprintln!(
            "malformed objects: 5 kinds skipped and counted by the operator and both agents; rule1 enforced, a new pod enforced, GC collected, ciliumctl listed"
        );
        Ok(())
    })();
    result.map_err(|e| e.context(c.cp.log_tails(10)))
}
