//! What ciliumctl reads from the node agents over their API sockets:
//! `ciliumctl health` (the probe matrix) and doctor's per-node checks (map
//! pressure, unreachable nodes, recent drops explained by the policy
//! trace).

use std::collections::BTreeMap;

use http_body_util::BodyExt;
use serde_json::Value;

use crate::agent_api;
use crate::ctx::Ctx;
use crate::doctor::{Finding, Severity};
use crate::output::{Output, Style, Table};

/// The agents to ask: the ones given, else upstream's socket when this
/// machine has one (none: the agent checks are skipped).
pub fn hosts(given: &[String]) -> Vec<String> {
    if !given.is_empty() {
        return given.to_vec();
    }
    let default = agent_api::socket_path(agent_api::DEFAULT_HOST).expect("a unix path");
    if default.exists() { vec![agent_api::DEFAULT_HOST.to_string()] } else { Vec::new() }
}

/// `GET path`, the whole body.
pub async fn get_bytes(host: &str, path: &str) -> anyhow::Result<Vec<u8>> {
    Ok(agent_api::get(host, path).await?.collect().await?.to_bytes().to_vec())
}

/// `GET path` as JSON.
pub async fn get_json(host: &str, path: &str) -> anyhow::Result<Value> {
    Ok(serde_json::from_slice(&get_bytes(host, path).await?)?)
}

fn probe_cell(out: &Output, p: &Value) -> String {
    if p["ok"].as_bool() == Some(true) {
        match p["latency_ms"].as_f64() {
            Some(ms) => format!("{ms:.2}ms"),
            None => "ok".into(),
        }
    } else {
        out.paint(p["error"].as_str().unwrap_or("failed"), Style::Bad)
    }
}

fn reach_ok(r: &Value) -> bool {
    r["icmp"]["ok"].as_bool() == Some(true) && r["tcp"]["ok"].as_bool() == Some(true)
}

/// `ciliumctl health`: each agent's last probe round, one row per node it
/// probed. Exit code 2 when a node or health endpoint is unreachable.
pub async fn health(hosts: &[String], out: &Output) -> anyhow::Result<u8> {
    if hosts.is_empty() {
        anyhow::bail!("no agent API socket at /var/run/cilium/cilium.sock: pass --host unix:///path/to/cilium.sock");
    }
    let mut reports = Vec::new();
    for h in hosts {
        reports.push(get_json(h, "/v1/health").await?);
    }
    let bad = reports
        .iter()
        .flat_map(|r| r["nodes"].as_array().into_iter().flatten())
        .filter(|n| !reach_ok(&n["node"]) || !n["endpoint"].is_object() || !reach_ok(&n["endpoint"]))
        .count();
    let code = if bad == 0 { 0 } else { 2 };
    if !out.is_table() {
        out.machine(&reports)?;
        return Ok(code);
    }
    let mut t = Table::new(&["FROM", "TO", "NODE IP", "ICMP", "TCP", "HEALTH ENDPOINT", "ICMP", "TCP"]);
    for r in &reports {
        let from = r["from"].as_str().unwrap_or("?");
        for n in r["nodes"].as_array().into_iter().flatten() {
            let (eip, eicmp, etcp) = match n["endpoint"].as_object() {
                Some(_) => (
                    n["endpoint"]["ip"].as_str().unwrap_or("?").to_string(),
                    probe_cell(out, &n["endpoint"]["icmp"]),
                    probe_cell(out, &n["endpoint"]["tcp"]),
                ),
                None => ("-".into(), out.paint("none published", Style::Bad), "-".into()),
            };
            t.row(vec![
                from.to_string(),
                n["name"].as_str().unwrap_or("?").to_string(),
                n["node"]["ip"].as_str().unwrap_or("?").to_string(),
                probe_cell(out, &n["node"]["icmp"]),
                probe_cell(out, &n["node"]["tcp"]),
                eip,
                eicmp,
                etcp,
            ]);
        }
    }
    print!("{}", t.render());
    for r in &reports {
        let n = r["nodes"].as_array().map_or(0, Vec::len);
        println!(
            "{}: {n} node(s) probed every {}s, last round {}",
            r["from"].as_str().unwrap_or("?"),
            r["interval_seconds"].as_f64().unwrap_or(0.0),
            r["updated"].as_str().unwrap_or("not yet")
        );
    }
    if bad > 0 {
        println!("{}", out.paint(&format!("{bad} unreachable node(s) or health endpoint(s)"), Style::Bad));
    }
    Ok(code)
}

/// A flow's end as a trace argument: NAMESPACE/POD, or its address.
fn end_arg(end: &Value, ip: &Value) -> String {
    match (end["namespace"].as_str(), end["pod_name"].as_str()) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ => ip.as_str().unwrap_or("?").to_string(),
    }
}

fn proto_number(name: &str) -> Option<u8> {
    Some(match name {
        "TCP" => 6,
        "UDP" => 17,
        "SCTP" => 132,
        "ICMPv4" => 1,
        "ICMPv6" => 58,
        _ => return None,
    })
}

/// A dropped flow: source, destination, protocol, port (ICMP: type).
type FlowKey = (String, String, String, u64);

/// Drops of one flow: how many, the last reason and time.
#[derive(Default)]
struct Drops {
    count: usize,
    reason: String,
    last: String,
}

/// Doctor's checks on the agents; None when there is no agent to ask.
pub async fn findings(ctx: &Ctx, hosts: &[String]) -> Option<Vec<Finding>> {
    if hosts.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    let mut statuses = Vec::new();
    for h in hosts {
        match get_json(h, "/v1/status").await {
            Ok(s) => statuses.push(s),
            Err(e) => out.push(Finding {
                check: "agent-reachable",
                severity: Severity::Warning,
                summary: format!("cannot read the agent at {h}"),
                evidence: vec![format!("{e:#}")],
                fix: Some("check that cilium-node-agent runs on that node, or pass its socket with --host".into()),
            }),
        }
    }
    let node = |s: &Value| s["node"].as_str().unwrap_or("?").to_string();

    // Map pressure (the troubleshooting guide's "Policymap pressure and
    // overflow").
    let mut full = Vec::new();
    let mut fullest: Option<(f64, String)> = None;
    for s in &statuses {
        for (map, ratio) in s["map_pressure"].as_object().into_iter().flatten() {
            let r = ratio.as_f64().unwrap_or(0.0);
            if fullest.as_ref().is_none_or(|(f, _)| r > *f) {
                fullest = Some((r, format!("{map} {:.0}% on {}", r * 100.0, node(s))));
            }
            if r >= 0.9 {
                full.push((r, format!("{map} on {} is {:.1}% full", node(s), r * 100.0)));
            }
        }
    }
    out.push(if full.is_empty() {
        Finding {
            check: "bpf-map-pressure",
            severity: Severity::Ok,
            summary: format!(
                "datapath maps below 90% on {} agent(s) (fullest: {})",
                statuses.len(),
                fullest.map(|f| f.1).unwrap_or_else(|| "-".into())
            ),
            evidence: Vec::new(),
            fix: None,
        }
    } else {
        let worst = full.iter().map(|f| f.0).fold(0.0, f64::max);
        Finding {
            check: "bpf-map-pressure",
            severity: if worst >= 1.0 { Severity::Critical } else { Severity::Warning },
            summary: format!("{} datapath map(s) at or above 90% (cilium_bpf_map_pressure)", full.len()),
            evidence: full.into_iter().map(|f| f.1).collect(),
            fix: Some(
                "cilium_policy: the endpoints of that node are selected by too many (peer identity, port) pairs; \
                 select peers by fewer labels, entities or CIDRs and use port ranges, or move endpoints to other \
                 nodes. A full policy map fails the endpoint closed (it drops everything) rather than open. \
                 cilium_ct: long-lived connections fill it; cilium_ipcache: too many CIDR identities."
                    .into(),
            ),
        }
    });

    // Each node's pod CIDR: a full one fails every new pod on that node.
    let mut pools = Vec::new();
    let mut tight = Vec::new();
    for s in &statuses {
        let ipam = &s["ipam"];
        let (used, cap) = (ipam["allocated"].as_u64().unwrap_or(0), ipam["capacity"].as_u64().unwrap_or(0));
        let line = format!("{}: {used}/{cap} allocated from {}", node(s), ipam["cidr"].as_str().unwrap_or("?"));
        if cap > 0 && used * 10 >= cap * 9 {
            tight.push((used >= cap, line.clone()));
        }
        pools.push(line);
    }
    out.push(if tight.is_empty() {
        Finding {
            check: "ipam-pod-cidr",
            severity: Severity::Ok,
            summary: format!("pod CIDRs below 90% on {} agent(s)", statuses.len()),
            evidence: pools,
            fix: None,
        }
    } else {
        Finding {
            check: "ipam-pod-cidr",
            severity: if tight.iter().any(|t| t.0) { Severity::Critical } else { Severity::Warning },
            summary: format!("{} node(s) with their pod CIDR at or above 90%", tight.len()),
            evidence: tight.into_iter().map(|t| t.1).collect(),
            fix: Some(
                "new pods on a full node fail with \"no free address\"; spread pods over more nodes, or give \
                 nodes bigger pod CIDRs (cluster-pool-ipv4-mask-size; takes effect for new CiliumNodes)"
                    .into(),
            ),
        }
    });

    // Node-to-node health.
    let mut unreachable = Vec::new();
    let mut probed = 0;
    for s in &statuses {
        for n in s["health"]["nodes"].as_array().into_iter().flatten() {
            probed += 1;
            let to = n["name"].as_str().unwrap_or("?");
            for (what, r) in [("node", &n["node"]), ("health endpoint", &n["endpoint"])] {
                if r.is_null() {
                    unreachable.push(format!("{} -> {to}: no health endpoint published", node(s)));
                } else if !reach_ok(r) {
                    let err = |p: &Value| p["error"].as_str().unwrap_or("ok").to_string();
                    unreachable.push(format!(
                        "{} -> {to} {what} {}: ICMP {}; TCP {}",
                        node(s),
                        r["ip"].as_str().unwrap_or("?"),
                        err(&r["icmp"]),
                        err(&r["tcp"])
                    ));
                }
            }
        }
    }
    out.push(if unreachable.is_empty() {
        Finding {
            check: "node-health",
            severity: Severity::Ok,
            summary: format!("every node and health endpoint answers ({probed} probed pairs)"),
            evidence: Vec::new(),
            fix: None,
        }
    } else {
        Finding {
            check: "node-health",
            severity: Severity::Warning,
            summary: format!("{} unreachable node or health endpoint probe(s)", unreachable.len()),
            evidence: unreachable,
            fix: Some(
                "check the path between those nodes (routes, firewalls, the fabric) and that their agents run; \
                 `ciliumctl health` shows the whole matrix with latencies"
                    .into(),
            ),
        }
    });

    // Recent drops, one line per flow, each explained by the policy trace.
    let mut flows: BTreeMap<FlowKey, Drops> = BTreeMap::new();
    for s in &statuses {
        for f in s["recent_drops"].as_array().into_iter().flatten() {
            let src = end_arg(&f["source"], &f["IP"]["source"]);
            let dst = end_arg(&f["destination"], &f["IP"]["destination"]);
            let proto = f["l4"]["protocol"].as_str().unwrap_or("").to_string();
            let port = f["l4"]["destination_port"].as_u64().or(f["l4"]["icmp_type"].as_u64()).unwrap_or(0);
            let e = flows.entry((src, dst, proto, port)).or_default();
            e.count += 1;
            e.reason = f["drop_reason_desc"].as_str().unwrap_or("").to_string();
            e.last = f["time"].as_str().unwrap_or("").to_string();
        }
    }
    if !flows.is_empty() {
        let tracer = crate::policy::Tracer::load(ctx).await;
        let mut evidence = Vec::new();
        for ((src, dst, proto, port), Drops { count: n, reason, last }) in &flows {
            let why = match (&tracer, proto_number(proto)) {
                (Ok(t), Some(p)) => match t.trace(src, dst, p, *port as u16) {
                    Ok(r) => format!("trace: {}", crate::policy::explain(&r)),
                    Err(e) => format!("trace failed: {e:#}"),
                },
                (Err(e), _) => format!("trace failed: {e:#}"),
                (_, None) => "not traced (no L4 protocol)".into(),
            };
            evidence.push(format!("{src} -> {dst} {proto}/{port}: {n} drop(s), last {last}, {reason}; {why}"));
        }
        out.push(Finding {
            check: "recent-drops",
            severity: Severity::Info,
            summary: format!("{} flow(s) dropped recently on the agents, each explained below", flows.len()),
            evidence,
            fix: Some(
                "a drop a policy intends needs nothing; otherwise fix the rule the trace names, and watch with \
                 `ciliumctl monitor --type drop`"
                    .into(),
            ),
        });
    }
    Some(out)
}
