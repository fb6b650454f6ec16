//! `doctor`: every check the identity-exhaustion troubleshooting guide walks
//! through by hand, as pure functions over a snapshot of the cluster. Each
//! finding has a severity, the evidence behind it and the fix.

use std::collections::HashSet;
use std::ops::RangeInclusive;
use std::time::Duration;

use cilium_ipam::Cidr;
use cilium_operator::config::Config;
use serde::Serialize;

use crate::snapshot::{EndpointInfo, IdentityInfo, KvInfo, LeaseInfo, NodeInfo, PodInfo};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    Info,
    Warning,
    Critical,
}

#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// Stable name of the check.
    pub check: &'static str,
    pub severity: Severity,
    pub summary: String,
    pub evidence: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &'static str, summary: String) -> Finding {
        Finding { check, severity: Severity::Ok, summary, evidence: Vec::new(), fix: None }
    }
    fn new(check: &'static str, severity: Severity, summary: String, evidence: Vec<String>, fix: &str) -> Finding {
        Finding { check, severity, summary, evidence, fix: Some(fix.to_string()) }
    }
}

/// Everything the checks look at.
pub struct Facts<'a> {
    pub now: jiff::Timestamp,
    pub config: &'a Config,
    pub config_source: &'a str,
    pub config_error: Option<&'a str>,
    pub range: RangeInclusive<u32>,
    pub lease: Option<&'a LeaseInfo>,
    pub identities: &'a [IdentityInfo],
    pub endpoints: &'a [EndpointInfo],
    pub nodes: &'a [NodeInfo],
    pub pods: &'a [PodInfo],
    /// None: no kvstore configured.
    pub kv: Option<&'a KvInfo>,
}

/// Agents count a quorum error when the heartbeat is older than this.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(120);
/// Label keys with at least this many values, across at least half of the
/// identities, are reported as exploding.
pub const EXPLOSION_MIN_VALUES: usize = 50;
/// Examples shown per finding.
const EXAMPLES: usize = 5;

pub fn diagnose(f: &Facts) -> Vec<Finding> {
    vec![
        config(f),
        operator_leader(f),
        ipam_pools(f),
        identity_space(f),
        unused_identities(f),
        label_explosion(f),
        kvstore_heartbeat(f),
        kvstore_locks(f),
        endpoints_not_ready(f),
        unmanaged_pods(f),
    ]
}

fn config(f: &Facts) -> Finding {
    match f.config_error {
        None => Finding::ok("config", format!("configuration read from {}", f.config_source)),
        Some(e) => Finding::new(
            "config",
            Severity::Critical,
            "cilium-config holds a value the operator refuses (it will not start with it)".into(),
            vec![e.to_string()],
            "correct the value named above (helm upgrade --set ...), then restart the operator",
        ),
    }
}

fn operator_leader(f: &Facts) -> Finding {
    const CHECK: &str = "operator-leader";
    const FIX: &str = "check the cilium-operator Deployment (kubectl -n <ns> get pods -l io.cilium/app=operator) and its logs; \
        without a leader there is no IPAM, no identity GC and no kvstore heartbeat";
    let lease = cilium_operator::leader::LEASE_NAME;
    let Some(l) = f.lease else {
        return Finding::new(
            CHECK,
            Severity::Critical,
            format!("no operator leader: Lease {lease} does not exist"),
            vec![],
            FIX,
        );
    };
    let (Some(holder), Some(renewed)) = (&l.holder, l.renewed) else {
        return Finding::new(
            CHECK,
            Severity::Critical,
            "no operator leader: the Lease is released".into(),
            vec![],
            FIX,
        );
    };
    let age = f.now.duration_since(renewed);
    if age.as_secs() > l.duration_seconds {
        return Finding::new(
            CHECK,
            Severity::Critical,
            format!(
                "no operator leader: {holder} last renewed {} ago (lease {}s)",
                crate::output::age(age),
                l.duration_seconds
            ),
            vec![format!("Lease {lease}: holder {holder}, renewTime {renewed}")],
            FIX,
        );
    }
    Finding::ok(CHECK, format!("leader {holder}, renewed {} ago", crate::output::age(age)))
}

/// Use of one pool.
#[derive(Clone, Debug, Serialize)]
pub struct PoolUse {
    pub pool: String,
    pub mask_size: u8,
    pub capacity: u64,
    pub used: u64,
}

impl PoolUse {
    pub fn free(&self) -> u64 {
        self.capacity.saturating_sub(self.used)
    }
}

/// Node CIDRs per configured pool.
pub fn pool_usage(config: &Config, nodes: &[NodeInfo]) -> Vec<PoolUse> {
    let cidrs: Vec<Cidr> = nodes.iter().flat_map(|n| &n.pod_cidrs).filter_map(|c| c.parse().ok()).collect();
    let mut out = Vec::new();
    for pool_cfg in [&config.ipv4_pool, &config.ipv6_pool].into_iter().flatten() {
        for pool in &pool_cfg.cidrs {
            let bits = u32::from(pool_cfg.mask_size.saturating_sub(pool.prefix_len()));
            out.push(PoolUse {
                pool: pool.to_string(),
                mask_size: pool_cfg.mask_size,
                capacity: if bits >= 64 { u64::MAX } else { 1u64 << bits },
                used: cidrs.iter().filter(|c| c.prefix_len() == pool_cfg.mask_size && pool.contains(c)).count() as u64,
            });
        }
    }
    out
}

fn ipam_pools(f: &Facts) -> Finding {
    const CHECK: &str = "ipam-pools";
    let usage = pool_usage(f.config, f.nodes);
    let failing: Vec<&NodeInfo> = f.nodes.iter().filter(|n| n.error.is_some()).collect();
    let exhausted: Vec<&NodeInfo> =
        failing.iter().copied().filter(|n| n.error.as_deref().is_some_and(|e| e.contains("allocator full"))).collect();
    let pools: Vec<String> = usage
        .iter()
        .map(|u| format!("{} (/{}): {} of {} used, {} free", u.pool, u.mask_size, u.used, u.capacity, u.free()))
        .collect();
    if !exhausted.is_empty() {
        let mut evidence: Vec<String> = exhausted
            .iter()
            .take(EXAMPLES)
            .map(|n| format!("CiliumNode {}: {}", n.name, n.error.as_deref().unwrap_or_default()))
            .collect();
        if exhausted.len() > EXAMPLES {
            evidence.push(format!("... and {} more nodes", exhausted.len() - EXAMPLES));
        }
        evidence.extend(pools);
        return Finding::new(
            CHECK,
            Severity::Critical,
            format!("pod CIDR pool exhausted: {} node(s) have no pod CIDR (allocator full)", exhausted.len()),
            evidence,
            "append a new CIDR to cluster-pool-ipv4-cidr (helm: ipam.operator.clusterPoolIPv4PodCIDRList), \
             never edit or remove existing entries; the operator assigns the waiting nodes at once",
        );
    }
    if !failing.is_empty() {
        let evidence = failing
            .iter()
            .take(EXAMPLES)
            .map(|n| format!("CiliumNode {}: {}", n.name, n.error.as_deref().unwrap_or_default()))
            .collect();
        return Finding::new(
            CHECK,
            Severity::Warning,
            format!("{} node(s) carry an IPAM error", failing.len()),
            evidence,
            "read the error on each node (ciliumctl ipam status); the operator refuses CIDRs outside the pools, \
             held twice or of the wrong size and never re-assigns them",
        );
    }
    if let Some(u) = usage.iter().find(|u| u.capacity > 0 && u.used * 10 >= u.capacity * 9) {
        return Finding::new(
            CHECK,
            Severity::Warning,
            format!("pool {} is {:.0}% used", u.pool, 100.0 * u.used as f64 / u.capacity as f64),
            pools,
            "append a CIDR to the pool list before it runs out (helm: ipam.operator.clusterPoolIPv4PodCIDRList)",
        );
    }
    let mut ok = Finding::ok(CHECK, format!("{} node(s), no IPAM errors", f.nodes.len()));
    ok.evidence = pools;
    ok
}

fn range_size(r: &RangeInclusive<u32>) -> u64 {
    u64::from(*r.end() - *r.start()) + 1
}

fn in_range<'a>(f: &'a Facts) -> impl Iterator<Item = &'a IdentityInfo> {
    f.identities.iter().filter(|i| f.range.contains(&i.id))
}

fn identity_space(f: &Facts) -> Finding {
    const CHECK: &str = "identity-space";
    let used = in_range(f).count() as u64;
    let size = range_size(&f.range);
    let share = used as f64 / size as f64;
    let threshold = f.config.identity_space_pressure_threshold;
    let summary = format!(
        "{used} of {size} identities in use ({:.1}%, range {}..={}, pressure threshold {:.0}%)",
        100.0 * share,
        f.range.start(),
        f.range.end(),
        100.0 * threshold
    );
    let fix = "find what multiplies identities (see label-explosion and identities-without-endpoints), \
        run `ciliumctl identity gc`, and limit identity-relevant labels with the `labels` option";
    if share >= threshold {
        Finding::new(CHECK, Severity::Critical, format!("identity space under pressure: {summary}"), vec![], fix)
    } else if share >= threshold * 0.8 {
        Finding::new(CHECK, Severity::Warning, format!("identity space filling up: {summary}"), vec![], fix)
    } else {
        Finding::ok(CHECK, summary)
    }
}

fn unused_identities(f: &Facts) -> Finding {
    const CHECK: &str = "identities-without-endpoints";
    let unused: Vec<&IdentityInfo> = in_range(f).filter(|i| i.users == 0).collect();
    if unused.is_empty() {
        return Finding::ok(CHECK, "every identity is used by an endpoint".into());
    }
    let users = if unused[0].source == "kvstore" { "value keys" } else { "endpoints" };
    // Overdue: marked longer ago than the heartbeat timeout plus one GC
    // interval (and a minute of slack): a working GC would have deleted it.
    let grace = jiff::SignedDuration::try_from(f.config.identity_heartbeat_timeout + f.config.identity_gc_interval)
        .unwrap_or(jiff::SignedDuration::MAX)
        .saturating_add(jiff::SignedDuration::from_secs(60));
    let overdue: Vec<&&IdentityInfo> = unused
        .iter()
        .filter(|i| {
            i.marked_at
                .as_deref()
                .and_then(|m| m.parse::<jiff::Timestamp>().ok())
                .is_some_and(|t| f.now.duration_since(t) > grace)
        })
        .collect();
    let no_leader = operator_leader(f).severity == Severity::Critical;
    let mut evidence: Vec<String> = unused
        .iter()
        .take(EXAMPLES)
        .map(|i| {
            let mark = i.marked_at.as_deref().map(|m| format!(" (marked {m})")).unwrap_or_default();
            format!("identity {}{mark}: {}", i.id, i.key_string())
        })
        .collect();
    if unused.len() > EXAMPLES {
        evidence.push(format!("... and {} more", unused.len() - EXAMPLES));
    }
    let fix = "run `ciliumctl identity gc` (a pass now) or `ciliumctl identity gc --dry-run` to see what goes when; \
        `ciliumctl identity delete <id>` removes one at once";
    if !overdue.is_empty() || no_leader {
        let why = if no_leader {
            "no operator leader runs the identity GC".to_string()
        } else {
            format!("{} marked longer ago than identity-heartbeat-timeout + identity-gc-interval", overdue.len())
        };
        return Finding::new(
            CHECK,
            Severity::Warning,
            format!("{} orphaned identities have no {users} and are not being collected: {why}", unused.len()),
            evidence,
            fix,
        );
    }
    Finding::new(
        CHECK,
        Severity::Info,
        format!("{} identities have no {users}; the identity GC collects them on schedule", unused.len()),
        evidence,
        fix,
    )
}

fn label_explosion(f: &Facts) -> Finding {
    const CHECK: &str = "label-explosion";
    let sets: Vec<_> = in_range(f).map(|i| &i.labels).collect();
    let top = cilium_identity::explosion::top_label_keys(sets.iter().copied(), 3);
    let exploding: Vec<&(String, usize)> =
        top.iter().filter(|(_, values)| *values >= EXPLOSION_MIN_VALUES && *values * 2 >= sets.len()).collect();
    if exploding.is_empty() {
        let top_text = top.first().map(|(k, v)| format!(" (most varied key: {k} with {v} values)")).unwrap_or_default();
        return Finding::ok(CHECK, format!("no label key multiplies identities{top_text}"));
    }
    let patterns: Vec<String> = exploding.iter().map(|(k, _)| cilium_identity::explosion::exclusion_for(k)).collect();
    let evidence = exploding
        .iter()
        .map(|(k, v)| format!("label key {k} takes {v} distinct values across {} identities", sets.len()))
        .collect();
    let severity = if identity_space(f).severity == Severity::Ok { Severity::Warning } else { Severity::Critical };
    Finding {
        check: CHECK,
        severity,
        summary: format!(
            "label explosion: {} creates one identity per value",
            exploding.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", ")
        ),
        evidence,
        fix: Some(format!(
            "exclude it from identity-relevant labels: add {} to the `labels` option of cilium-config \
             (helm: --set labels=\"{}\") and restart the agents; the identity GC then reclaims the old identities",
            patterns.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(" "),
            patterns.join(" ")
        )),
    }
}

fn kvstore_heartbeat(f: &Facts) -> Finding {
    const CHECK: &str = "kvstore-heartbeat";
    let Some(kv) = f.kv else {
        return Finding::ok(CHECK, "no kvstore configured".into());
    };
    let fix = "the operator leader writes cilium/.heartbeat every kvstore-heartbeat-interval: check that a leader runs \
        and reaches etcd (kvstore-opt); agents report quorum errors while it is stale";
    if let Some(e) = &kv.error {
        return Finding::new(
            CHECK,
            Severity::Critical,
            "kvstore unreachable".into(),
            vec![e.clone()],
            "check etcd and the kvstore-opt endpoints in cilium-config",
        );
    }
    let Some(value) = &kv.heartbeat else {
        return Finding::new(CHECK, Severity::Critical, "cilium/.heartbeat is missing".into(), vec![], fix);
    };
    let Ok(at) = value.parse::<jiff::Timestamp>() else {
        return Finding::new(
            CHECK,
            Severity::Warning,
            format!("cilium/.heartbeat holds {value:?}, not an RFC3339 time"),
            vec![],
            fix,
        );
    };
    let age = f.now.duration_since(at);
    if age.as_secs() as u64 > HEARTBEAT_STALE.as_secs() {
        return Finding::new(
            CHECK,
            Severity::Critical,
            format!("stale kvstore heartbeat: last written {} ago (agents give up after 2m)", crate::output::age(age)),
            vec![format!("cilium/.heartbeat = {value}")],
            fix,
        );
    }
    Finding::ok(CHECK, format!("heartbeat written {} ago", crate::output::age(age)))
}

fn kvstore_locks(f: &Facts) -> Finding {
    const CHECK: &str = "kvstore-locks";
    let Some(kv) = f.kv.filter(|k| k.error.is_none()) else {
        return Finding::ok(CHECK, "no kvstore to check".into());
    };
    let lock_ttl = cilium_identity_alloc::kvstore::LOCK_TTL;
    let stuck: Vec<_> = kv.locks.iter().filter(|l| l.ttl < 0 || l.granted_ttl > lock_ttl).collect();
    if stuck.is_empty() {
        return Finding::ok(CHECK, format!("{} lock(s) held, none stuck", kv.locks.len()));
    }
    let evidence = stuck
        .iter()
        .take(EXAMPLES)
        .map(|l| {
            if l.ttl < 0 {
                format!("{}: no live lease (lease {:x}), never expires", l.key, l.lease)
            } else {
                format!(
                    "{}: lease {:x} with TTL {}s (locks use {lock_ttl}s), {}s left",
                    l.key, l.lease, l.granted_ttl, l.ttl
                )
            }
        })
        .collect();
    Finding::new(
        CHECK,
        Severity::Warning,
        format!("{} stuck identity lock(s): allocation of those label sets blocks", stuck.len()),
        evidence,
        "delete the lock key (etcdctl del <key>) or revoke its lease (etcdctl lease revoke <lease>) once its holder is gone",
    )
}

fn endpoints_not_ready(f: &Facts) -> Finding {
    const CHECK: &str = "endpoints-not-ready";
    let known: HashSet<u32> = f.identities.iter().map(|i| i.id).collect();
    let mut evidence = Vec::new();
    let mut count = 0;
    for e in f.endpoints {
        let problem = match (&e.state, e.identity) {
            (Some(s), _) if s != "ready" => Some(format!("state {s}")),
            (None, _) => Some("no state".to_string()),
            (_, None) => Some("no identity".to_string()),
            (_, Some(id)) if !cilium_identity::ranges::is_reserved(id) && !known.contains(&id) => {
                Some(format!("identity {id} does not exist"))
            }
            _ => None,
        };
        if let Some(p) = problem {
            count += 1;
            if evidence.len() < EXAMPLES {
                evidence.push(format!("{}/{}: {p}", e.namespace, e.name));
            }
        }
    }
    if count == 0 {
        return Finding::ok(CHECK, format!("{} endpoint(s), all ready", f.endpoints.len()));
    }
    Finding::new(
        CHECK,
        Severity::Warning,
        format!("{count} of {} endpoint(s) are not ready", f.endpoints.len()),
        evidence,
        "look at the agent on the endpoint's node (its logs and the CiliumEndpoint status); \
         an endpoint waiting for identity points at identity exhaustion",
    )
}

fn unmanaged_pods(f: &Facts) -> Finding {
    const CHECK: &str = "unmanaged-pods";
    let with_cep: HashSet<&str> = f.endpoints.iter().filter_map(|e| e.owner_pod_uid.as_deref()).collect();
    let unmanaged: Vec<&PodInfo> = f
        .pods
        .iter()
        .filter(|p| !p.host_network && p.phase.as_deref() == Some("Running") && !with_cep.contains(p.uid.as_str()))
        .collect();
    if unmanaged.is_empty() {
        return Finding::ok(CHECK, format!("{} pod(s), none running without an endpoint", f.pods.len()));
    }
    Finding::new(
        CHECK,
        Severity::Warning,
        format!("{} running pod(s) have no CiliumEndpoint", unmanaged.len()),
        unmanaged.iter().take(EXAMPLES).map(|p| format!("{}/{}", p.namespace, p.name)).collect(),
        "pods started before the agent, or on a node without one, are not managed: restart them once the agent runs",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn config() -> Config {
        let data: BTreeMap<String, String> =
            [("cluster-pool-ipv4-cidr", "10.0.0.0/30"), ("cluster-pool-ipv4-mask-size", "31")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        Config::from_raw(&cilium_operator::config::RawConfig::from_config_map("t", &data)).unwrap()
    }

    fn now() -> jiff::Timestamp {
        "2026-11-23T12:00:00Z".parse().unwrap()
    }

    fn identity(id: u32, labels: &[(&str, &str)], users: usize, mark: Option<&str>) -> IdentityInfo {
        IdentityInfo {
            id,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            users,
            marked_at: mark.map(str::to_string),
            created: None,
            source: "crd",
        }
    }

    fn endpoint(name: &str, id: u32) -> EndpointInfo {
        EndpointInfo {
            namespace: "default".into(),
            name: name.into(),
            identity: Some(id),
            state: Some("ready".into()),
            ipv4: None,
            ipv6: None,
            node: None,
            owner_pod_uid: Some(format!("uid-{name}")),
        }
    }

    struct World {
        config: Config,
        lease: LeaseInfo,
        identities: Vec<IdentityInfo>,
        endpoints: Vec<EndpointInfo>,
        nodes: Vec<NodeInfo>,
        kv: Option<KvInfo>,
    }

    fn healthy() -> World {
        World {
            config: config(),
            lease: LeaseInfo { holder: Some("op-1".into()), renewed: Some(now()), duration_seconds: 15 },
            identities: vec![identity(300, &[("k8s:app", "web")], 1, None)],
            endpoints: vec![endpoint("web", 300)],
            nodes: vec![NodeInfo { name: "n1".into(), pod_cidrs: vec!["10.0.0.0/31".into()], error: None }],
            kv: None,
        }
    }

    fn run(w: &World) -> Vec<Finding> {
        diagnose(&Facts {
            now: now(),
            config: &w.config,
            config_source: "t",
            config_error: None,
            range: 256..=65535,
            lease: Some(&w.lease),
            identities: &w.identities,
            endpoints: &w.endpoints,
            nodes: &w.nodes,
            pods: &[],
            kv: w.kv.as_ref(),
        })
    }

    fn find<'a>(fs: &'a [Finding], check: &str) -> &'a Finding {
        fs.iter().find(|f| f.check == check).unwrap()
    }

    #[test]
    fn healthy_cluster_is_all_ok() {
        let fs = run(&healthy());
        for f in &fs {
            assert_eq!(f.severity, Severity::Ok, "{f:?}");
        }
        assert_eq!(fs.len(), 10);
    }

    #[test]
    fn each_fault_is_named_with_its_fix() {
        let mut w = healthy();
        // Pool of two /31s: n1 holds one, n2 the other, n3 gets nothing.
        w.nodes.push(NodeInfo { name: "n2".into(), pod_cidrs: vec!["10.0.0.2/31".into()], error: None });
        w.nodes.push(NodeInfo { name: "n3".into(), pod_cidrs: vec![], error: Some("allocator full".into()) });
        let fs = run(&w);
        let f = find(&fs, "ipam-pools");
        assert_eq!(f.severity, Severity::Critical);
        assert!(f.evidence.iter().any(|e| e.contains("n3") && e.contains("allocator full")), "{f:?}");
        assert!(f.evidence.iter().any(|e| e.contains("2 of 2 used")), "{f:?}");

        let mut w = healthy();
        for i in 0..60 {
            w.identities.push(identity(1000 + i, &[("k8s:app", "web"), ("k8s:build-id", &format!("b{i}"))], 1, None));
        }
        let f = find(&run(&w), "label-explosion").clone();
        assert_eq!(f.severity, Severity::Warning);
        assert!(f.summary.contains("k8s:build-id"), "{f:?}");
        assert!(f.fix.as_deref().unwrap().contains(r"k8s:!build-id$"), "{f:?}");

        let mut w = healthy();
        w.identities.push(identity(400, &[("k8s:app", "gone")], 0, Some("2026-11-23T10:00:00Z")));
        let f = find(&run(&w), "identities-without-endpoints").clone();
        assert_eq!(f.severity, Severity::Warning, "marked 2h ago with 30m+15m timeouts: overdue");
        assert!(f.evidence[0].contains("identity 400"), "{f:?}");
        w.identities[1].marked_at = Some("2026-11-23T11:50:00Z".into());
        assert_eq!(find(&run(&w), "identities-without-endpoints").severity, Severity::Info);
        w.lease.renewed = Some("2026-11-23T11:00:00Z".parse().unwrap());
        let fs = run(&w);
        assert_eq!(find(&fs, "operator-leader").severity, Severity::Critical);
        assert_eq!(find(&fs, "identities-without-endpoints").severity, Severity::Warning, "no leader: not collected");

        let mut w = healthy();
        w.kv = Some(KvInfo { heartbeat: Some("2026-11-23T11:50:00Z".into()), ..Default::default() });
        let f = find(&run(&w), "kvstore-heartbeat").clone();
        assert_eq!(f.severity, Severity::Critical);
        assert!(f.summary.contains("10m0s ago"), "{f:?}");
        w.kv = Some(KvInfo { heartbeat: Some("2026-11-23T11:59:30Z".into()), ..Default::default() });
        assert_eq!(find(&run(&w), "kvstore-heartbeat").severity, Severity::Ok);
        w.kv.as_mut().unwrap().locks.push(crate::snapshot::LockInfo {
            key: "cilium/state/identities/v1/locks/k8s:app=x;/abc".into(),
            labels: "k8s:app=x;".into(),
            lease: 0xabc,
            ttl: 3500,
            granted_ttl: 3600,
        });
        assert_eq!(find(&run(&w), "kvstore-locks").severity, Severity::Warning);

        let mut w = healthy();
        w.endpoints.push(EndpointInfo { state: Some("waiting-for-identity".into()), ..endpoint("db", 300) });
        w.endpoints.push(endpoint("ghost", 555));
        let f = find(&run(&w), "endpoints-not-ready").clone();
        assert!(f.summary.starts_with("2 of 3"), "{f:?}");
        assert!(f.evidence.iter().any(|e| e.contains("identity 555 does not exist")), "{f:?}");
    }

    #[test]
    fn pressure_follows_the_threshold() {
        let mut w = healthy();
        w.identities = (256..=300).map(|id| identity(id, &[("k8s:app", "x")], 1, None)).collect();
        let mk = |w: &World, size: u32| {
            diagnose(&Facts {
                now: now(),
                config: &w.config,
                config_source: "t",
                config_error: None,
                range: 256..=(256 + size - 1),
                lease: Some(&w.lease),
                identities: &w.identities,
                endpoints: &w.endpoints,
                nodes: &w.nodes,
                pods: &[],
                kv: None,
            })
        };
        assert_eq!(find(&mk(&w, 50), "identity-space").severity, Severity::Critical, "45/50 = 90%");
        assert_eq!(find(&mk(&w, 60), "identity-space").severity, Severity::Warning, "45/60 = 75%");
        assert_eq!(find(&mk(&w, 1000), "identity-space").severity, Severity::Ok);
    }
}
