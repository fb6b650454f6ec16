//! `status`, `endpoint`, `ipam status`, `kvstore` and `doctor`.

use anyhow::{anyhow, bail};
use etcd_client::GetOptions;
use serde::Serialize;

use crate::ctx::{Ctx, one_line};
use crate::doctor::{self, Facts, Finding, PoolUse, Severity};
use crate::output::{Style, Table, age};
use crate::snapshot::{self, EndpointInfo, IdentityInfo, KvInfo, LeaseInfo, NodeInfo, PodInfo};

/// Everything `status` and `doctor` look at.
pub struct Gathered {
    pub lease: Option<LeaseInfo>,
    pub endpoints: Vec<EndpointInfo>,
    pub identities: Vec<IdentityInfo>,
    /// Why identities could not be read (e.g. kvstore mode and etcd down).
    pub identities_error: Option<String>,
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<PodInfo>,
    pub kv: Option<KvInfo>,
}

pub async fn gather(ctx: &Ctx) -> anyhow::Result<Gathered> {
    let lease = snapshot::lease(ctx).await?;
    let endpoints = snapshot::endpoints(ctx, None).await?;
    let (identities, identities_error) = match snapshot::identities(ctx, None, None, &endpoints).await {
        Ok(i) => (i, None),
        Err(e) if snapshot::reads_kvstore(ctx) => (Vec::new(), Some(format!("{e:#}"))),
        Err(e) => return Err(e),
    };
    let nodes = snapshot::nodes(ctx).await?;
    let pods = snapshot::pods(ctx).await?;
    let kv = snapshot::kvstore(ctx).await;
    Ok(Gathered { lease, endpoints, identities, identities_error, nodes, pods, kv })
}

fn facts<'a>(ctx: &'a Ctx, g: &'a Gathered) -> Facts<'a> {
    Facts {
        now: jiff::Timestamp::now(),
        config: &ctx.config,
        config_source: &ctx.config_source,
        config_error: ctx.config_error.as_deref(),
        range: ctx.range(),
        lease: g.lease.as_ref(),
        identities: &g.identities,
        endpoints: &g.endpoints,
        nodes: &g.nodes,
        pods: &g.pods,
        kv: g.kv.as_ref(),
    }
}

#[derive(Serialize)]
struct Status<'a> {
    config: &'a str,
    identity_allocation_mode: &'a str,
    leader: Option<&'a str>,
    leader_renewed: Option<jiff::Timestamp>,
    identities_used: usize,
    identities_range: [u32; 2],
    identities_without_users: usize,
    pools: Vec<PoolUse>,
    nodes: usize,
    nodes_with_ipam_errors: usize,
    endpoints: usize,
    endpoints_ready: usize,
    pods_managed: usize,
    pods_unmanaged: usize,
    kvstore: Option<&'a KvInfo>,
    findings: Vec<Finding>,
}

pub async fn status(ctx: &Ctx) -> anyhow::Result<()> {
    let g = gather(ctx).await?;
    let f = facts(ctx, &g);
    let findings: Vec<Finding> = doctor::diagnose(&f).into_iter().filter(|f| f.severity >= Severity::Warning).collect();
    let range = ctx.range();
    let used: Vec<&IdentityInfo> = g.identities.iter().filter(|i| range.contains(&i.id)).collect();
    let managed: std::collections::HashSet<&str> =
        g.endpoints.iter().filter_map(|e| e.owner_pod_uid.as_deref()).collect();
    let eligible: Vec<&PodInfo> =
        g.pods.iter().filter(|p| !p.host_network && p.phase.as_deref() == Some("Running")).collect();
    let pods_managed = eligible.iter().filter(|p| managed.contains(p.uid.as_str())).count();
    let s = Status {
        config: &ctx.config_source,
        identity_allocation_mode: ctx.config.identity_allocation_mode.as_str(),
        leader: g.lease.as_ref().and_then(|l| l.holder.as_deref()),
        leader_renewed: g.lease.as_ref().and_then(|l| l.renewed),
        identities_used: used.len(),
        identities_range: [*range.start(), *range.end()],
        identities_without_users: used.iter().filter(|i| i.users == 0).count(),
        pools: doctor::pool_usage(&ctx.config, &g.nodes),
        nodes: g.nodes.len(),
        nodes_with_ipam_errors: g.nodes.iter().filter(|n| n.error.is_some()).count(),
        endpoints: g.endpoints.len(),
        endpoints_ready: g.endpoints.iter().filter(|e| e.state.as_deref() == Some("ready")).count(),
        pods_managed,
        pods_unmanaged: eligible.len() - pods_managed,
        kvstore: g.kv.as_ref(),
        findings,
    };
    if !ctx.out.is_table() {
        return ctx.out.machine(&s);
    }
    let all = doctor::diagnose(&f);
    let mark = |check: &str| -> String {
        let sev = all.iter().filter(|x| x.check == check).map(|x| x.severity).max().unwrap_or(Severity::Ok);
        severity_tag(ctx, sev)
    };
    let now = jiff::Timestamp::now();
    let size = u64::from(range.end() - range.start()) + 1;
    println!("{:<14}{}  (identity-allocation-mode {})", "Config:", s.config, s.identity_allocation_mode);
    let leader = match (&s.leader, s.leader_renewed) {
        (Some(h), Some(r)) => format!("{h}, renewed {} ago", age(now.duration_since(r))),
        _ => "none".into(),
    };
    println!("{:<14}{:<60}{}", "Operator:", leader, mark("operator-leader"));
    if let Some(e) = &g.identities_error {
        println!("{:<14}{:<60}{}", "Identities:", format!("unreadable: {e}"), severity_tag(ctx, Severity::Critical));
    } else {
        let text = format!(
            "{} of {size} used ({:.1}%), {} without {}",
            s.identities_used,
            100.0 * s.identities_used as f64 / size as f64,
            s.identities_without_users,
            if snapshot::reads_kvstore(ctx) { "users" } else { "endpoints" }
        );
        println!("{:<14}{:<60}{}", "Identities:", text, mark("identity-space").max(mark("label-explosion")));
    }
    let mut first = true;
    for p in &s.pools {
        let label = if first { "IPAM:" } else { "" };
        first = false;
        let text = format!("{} (/{}) {} of {} used, {} free", p.pool, p.mask_size, p.used, p.capacity, p.free());
        println!("{label:<14}{text:<60}{}", mark("ipam-pools"));
    }
    println!("{:<14}{} CiliumNodes, {} with IPAM errors", "Nodes:", s.nodes, s.nodes_with_ipam_errors);
    println!(
        "{:<14}{:<60}{}",
        "Endpoints:",
        format!("{} ({} ready)", s.endpoints, s.endpoints_ready),
        mark("endpoints-not-ready")
    );
    println!(
        "{:<14}{:<60}{}",
        "Pods:",
        format!("{} managed, {} unmanaged", s.pods_managed, s.pods_unmanaged),
        mark("unmanaged-pods")
    );
    let kv = match &g.kv {
        None => "disabled".to_string(),
        Some(k) => match (&k.error, &k.heartbeat) {
            (Some(e), _) => format!("{}: {e}", k.endpoints.join(",")),
            (None, hb) => {
                let hb = hb
                    .as_deref()
                    .and_then(|v| v.parse::<jiff::Timestamp>().ok())
                    .map(|t| format!("heartbeat {} ago", age(now.duration_since(t))))
                    .unwrap_or_else(|| "no heartbeat".into());
                format!(
                    "etcd {} at {}, {hb}, {} locks",
                    k.version.as_deref().unwrap_or("?"),
                    k.endpoints.join(","),
                    k.locks.len()
                )
            }
        },
    };
    println!("{:<14}{:<60}{}", "KVStore:", kv, mark("kvstore-heartbeat").max(mark("kvstore-locks")));
    if !s.findings.is_empty() {
        println!();
        println!("{} problem(s) found; run `ciliumctl doctor` for evidence and fixes:", s.findings.len());
        for f in &s.findings {
            println!("  {} {}", severity_tag(ctx, f.severity), f.summary);
        }
    }
    Ok(())
}

fn severity_tag(ctx: &Ctx, s: Severity) -> String {
    match s {
        Severity::Ok => ctx.out.paint("OK", Style::Ok),
        Severity::Info => ctx.out.paint("INFO", Style::Info),
        Severity::Warning => ctx.out.paint("WARNING", Style::Warn),
        Severity::Critical => ctx.out.paint("CRITICAL", Style::Bad),
    }
}

/// `doctor`: exit status 0 when nothing is above info, 2 with warnings, 3
/// with a critical finding.
pub async fn doctor(ctx: &Ctx, hosts: &[String]) -> anyhow::Result<u8> {
    let g = gather(ctx).await?;
    let mut findings = doctor::diagnose(&facts(ctx, &g));
    let agent_findings = crate::agents::findings(ctx, hosts).await;
    let agents_checked = agent_findings.is_some();
    findings.extend(agent_findings.into_iter().flatten());
    if let Some(e) = &g.identities_error {
        findings.push(Finding {
            check: "identities-readable",
            severity: Severity::Critical,
            summary: "identities cannot be read from the kvstore".into(),
            evidence: vec![e.clone()],
            fix: Some("check etcd and the kvstore-opt endpoints in cilium-config".into()),
        });
    }
    let worst = findings.iter().map(|f| f.severity).max().unwrap_or(Severity::Ok);
    let code = match worst {
        Severity::Ok | Severity::Info => 0,
        Severity::Warning => 2,
        Severity::Critical => 3,
    };
    if !ctx.out.is_table() {
        ctx.out.machine(&findings)?;
        return Ok(code);
    }
    for f in &findings {
        println!("{:<9} {:<30} {}", severity_tag(ctx, f.severity), f.check, f.summary);
        if f.severity > Severity::Ok {
            for e in &f.evidence {
                println!("{:<9} {:<30} {}", "", "", ctx.out.paint(&format!("evidence: {e}"), Style::Dim));
            }
            if let Some(fix) = &f.fix {
                println!("{:<9} {:<30} {}", "", "", ctx.out.paint(&format!("fix: {fix}"), Style::Bold));
            }
        }
    }
    let problems = findings.iter().filter(|f| f.severity >= Severity::Warning).count();
    println!();
    if problems == 0 {
        println!("{}", ctx.out.paint(&format!("All {} checks passed: no problems found.", findings.len()), Style::Ok));
    } else {
        println!("{problems} problem(s) found in {} checks.", findings.len());
    }
    if !agents_checked {
        println!(
            "{}",
            ctx.out.paint(
                "Node checks (map pressure, node health, recent drops) skipped: no agent socket here; pass --host unix:///path/to/cilium.sock",
                Style::Dim
            )
        );
    }
    Ok(code)
}

pub async fn endpoint_list(ctx: &Ctx, namespace: Option<&str>) -> anyhow::Result<()> {
    let eps = snapshot::endpoints(ctx, namespace).await?;
    if !ctx.out.is_table() {
        return ctx.out.machine(&eps);
    }
    let mut t = Table::new(&["NAMESPACE", "NAME", "IDENTITY", "STATE", "IPV4", "IPV6", "NODE"]);
    for e in &eps {
        let state = e.state.clone().unwrap_or_else(|| "-".into());
        let state = if state == "ready" { state } else { ctx.out.paint(&state, Style::Warn) };
        t.row(vec![
            e.namespace.clone(),
            e.name.clone(),
            e.identity.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
            state,
            e.ipv4.clone().unwrap_or_else(|| "-".into()),
            e.ipv6.clone().unwrap_or_else(|| "-".into()),
            e.node.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    print!("{}", t.render());
    eprintln!("{} endpoints", eps.len());
    Ok(())
}

pub async fn endpoint_get(ctx: &Ctx, namespace: Option<&str>, name: &str) -> anyhow::Result<()> {
    let (ns, name) = match (name.split_once('/'), namespace) {
        (Some((ns, n)), _) => (ns.to_string(), n.to_string()),
        (None, Some(ns)) => (ns.to_string(), name.to_string()),
        (None, None) => ("default".to_string(), name.to_string()),
    };
    let api: kube::Api<cilium_crds::CiliumEndpoint> = kube::Api::namespaced(ctx.client.clone(), &ns);
    let cep = api
        .get_opt(&name)
        .await
        .map_err(|e| ctx.kube_error(e, "reading the CiliumEndpoint"))?
        .ok_or_else(|| anyhow!("endpoint {ns}/{name} not found"))?;
    match ctx.out.format {
        crate::output::Format::Table | crate::output::Format::Yaml => {
            print!("{}", serde_saphyr::to_string(&cep)?);
            Ok(())
        }
        crate::output::Format::Json => ctx.out.machine(&cep),
    }
}

#[derive(Serialize)]
struct IpamStatus<'a> {
    pools: Vec<PoolUse>,
    nodes: &'a [NodeInfo],
}

pub async fn ipam_status(ctx: &Ctx) -> anyhow::Result<()> {
    let nodes = snapshot::nodes(ctx).await?;
    let pools = doctor::pool_usage(&ctx.config, &nodes);
    if !ctx.out.is_table() {
        return ctx.out.machine(&IpamStatus { pools, nodes: &nodes });
    }
    let mut t = Table::new(&["POOL", "MASK", "CAPACITY", "USED", "FREE", "USE"]);
    for p in &pools {
        let pct = 100.0 * p.used as f64 / p.capacity.max(1) as f64;
        let pct_text = format!("{pct:.1}%");
        let pct_text = if p.free() == 0 {
            ctx.out.paint(&pct_text, Style::Bad)
        } else if pct >= 90.0 {
            ctx.out.paint(&pct_text, Style::Warn)
        } else {
            pct_text
        };
        t.row(vec![
            p.pool.clone(),
            format!("/{}", p.mask_size),
            p.capacity.to_string(),
            p.used.to_string(),
            p.free().to_string(),
            pct_text,
        ]);
    }
    print!("{}", t.render());
    println!();
    let mut t = Table::new(&["NODE", "POD CIDRS", "OPERATOR STATUS"]);
    for n in &nodes {
        let cidrs = if n.pod_cidrs.is_empty() { "-".to_string() } else { n.pod_cidrs.join(",") };
        let status = n.error.as_deref().map(|e| ctx.out.paint(e, Style::Bad)).unwrap_or_else(|| "ok".into());
        t.row(vec![n.name.clone(), cidrs, status]);
    }
    print!("{}", t.render());
    Ok(())
}

pub async fn kvstore_status(ctx: &Ctx) -> anyhow::Result<()> {
    let Some(kv) = snapshot::kvstore(ctx).await else {
        bail!(
            "no kvstore configured: {} has no kvstore=etcd (or pass --kvstore-endpoint http://host:2379)",
            ctx.config_source
        );
    };
    if let Some(e) = &kv.error {
        bail!("{e}");
    }
    if !ctx.out.is_table() {
        return ctx.out.machine(&kv);
    }
    let now = jiff::Timestamp::now();
    println!("{:<14}{}", "Endpoints:", kv.endpoints.join(","));
    println!("{:<14}{}", "Version:", kv.version.as_deref().unwrap_or("?"));
    let hb = match kv.heartbeat.as_deref() {
        None => ctx.out.paint("missing", Style::Bad),
        Some(v) => match v.parse::<jiff::Timestamp>() {
            Ok(t) => {
                let a = now.duration_since(t);
                let text = format!("{v} ({} ago)", age(a));
                if a.as_secs() as u64 > doctor::HEARTBEAT_STALE.as_secs() {
                    ctx.out.paint(&text, Style::Bad)
                } else {
                    text
                }
            }
            Err(_) => format!("{v:?} (not a time)"),
        },
    };
    println!("{:<14}{hb}", "Heartbeat:");
    println!("{:<14}{} ids, {} value keys", "Identities:", kv.identities, kv.value_keys);
    println!("{:<14}{}", "Locks:", kv.locks.len());
    Ok(())
}

#[derive(Serialize)]
struct Kv {
    key: String,
    value: String,
    lease: i64,
    create_revision: i64,
    mod_revision: i64,
}

pub async fn kvstore_get(ctx: &Ctx, key: &str, prefix: bool) -> anyhow::Result<()> {
    let mut etcd = ctx.etcd().await?;
    let opts = prefix.then(|| GetOptions::new().with_prefix());
    let r = etcd.get(key, opts).await.map_err(|e| anyhow!("reading {key}: {}", one_line(&e.to_string())))?;
    let kvs: Vec<Kv> = r
        .kvs()
        .iter()
        .map(|kv| Kv {
            key: kv.key_str().unwrap_or_default().to_string(),
            value: String::from_utf8_lossy(kv.value()).into_owned(),
            lease: kv.lease(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
        })
        .collect();
    if kvs.is_empty() {
        bail!("key {key:?} not found{}", if prefix { " (as a prefix)" } else { "" });
    }
    if !ctx.out.is_table() {
        return ctx.out.machine(&kvs);
    }
    for kv in &kvs {
        println!("{} => {}", kv.key, kv.value);
    }
    Ok(())
}

pub async fn kvstore_locks(ctx: &Ctx) -> anyhow::Result<()> {
    let mut etcd = ctx.etcd().await?;
    let locks = snapshot::locks(&mut etcd).await?;
    if !ctx.out.is_table() {
        return ctx.out.machine(&locks);
    }
    let mut t = Table::new(&["LABELS", "LEASE", "TTL", "GRANTED", "STATE"]);
    let lock_ttl = cilium_identity_alloc::kvstore::LOCK_TTL;
    for l in &locks {
        let state = if l.ttl < 0 {
            ctx.out.paint("stuck (no lease)", Style::Bad)
        } else if l.granted_ttl > lock_ttl {
            ctx.out.paint("stuck (long lease)", Style::Warn)
        } else {
            "held".into()
        };
        t.row(vec![
            l.labels.clone(),
            format!("{:x}", l.lease),
            format!("{}s", l.ttl),
            format!("{}s", l.granted_ttl),
            state,
        ]);
    }
    if t.is_empty() {
        println!("no identity locks held");
    } else {
        print!("{}", t.render());
    }
    Ok(())
}
