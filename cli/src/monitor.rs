//! `ciliumctl monitor`: the datapath's drop (and verdict) events from one
//! or more node agents, as `cilium-dbg monitor --type drop` and `hubble
//! observe` show them.

use std::io::Write;

use serde_json::Value;

use crate::agent_api;
use crate::output::Format;

/// Which flows to show (`--from`/`--to`: NAMESPACE/POD, POD in any
/// namespace, or an IP address).
pub struct Filter {
    pub from: Option<String>,
    pub to: Option<String>,
}

fn end_matches(end: &Value, ip: &str, want: &str) -> bool {
    if ip == want {
        return true;
    }
    let (ns, pod) = (end["namespace"].as_str().unwrap_or(""), end["pod_name"].as_str().unwrap_or(""));
    match want.split_once('/') {
        Some((n, p)) => n == ns && p == pod,
        None => !pod.is_empty() && want == pod,
    }
}

impl Filter {
    pub fn keeps(&self, flow: &Value) -> bool {
        let ip = |k: &str| flow["IP"][k].as_str().unwrap_or("").to_string();
        self.from.as_deref().is_none_or(|w| end_matches(&flow["source"], &ip("source"), w))
            && self.to.as_deref().is_none_or(|w| end_matches(&flow["destination"], &ip("destination"), w))
    }
}

/// `ns/pod:port (ID:n)` or `ip:port (ID:n labels)` for one end.
fn end_text(end: &Value, ip: &str, port: Option<u64>) -> String {
    let addr = match (end["namespace"].as_str(), end["pod_name"].as_str()) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ => ip.to_string(),
    };
    let addr = match port {
        Some(p) => format!("{addr}:{p}"),
        None => addr,
    };
    let id = end["identity"].as_u64().unwrap_or(0);
    let mut about = format!("ID:{id}");
    if end["pod_name"].is_null() {
        if let Some(node) = end["node_name"].as_str() {
            about.push_str(&format!(" node {node}"));
        }
        // Reserved and CIDR identities say what they are by their labels.
        let labels: Vec<&str> = end["labels"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let short: Vec<&str> = labels.iter().copied().filter(|l| l.starts_with("reserved:")).collect();
        if !short.is_empty() {
            about.push_str(&format!(" {}", short.join(",")));
        }
    }
    format!("{addr} ({about})")
}

/// One line of text for a flow, in hubble's order: time, source,
/// destination, direction, verdict, protocol, reason.
pub fn flow_text(f: &Value) -> String {
    let time = f["time"].as_str().unwrap_or("");
    let l4 = &f["l4"];
    let proto = l4["protocol"].as_str().unwrap_or("L3");
    let detail = match l4["icmp_type"].as_u64() {
        Some(t) => format!("{proto} type {t}"),
        None => proto.to_string(),
    };
    let src = end_text(&f["source"], f["IP"]["source"].as_str().unwrap_or("?"), l4["source_port"].as_u64());
    let dst =
        end_text(&f["destination"], f["IP"]["destination"].as_str().unwrap_or("?"), l4["destination_port"].as_u64());
    let verdict = f["verdict"].as_str().unwrap_or("?");
    let why = match f["drop_reason_desc"].as_str() {
        Some(d) => format!("{d}: {}", f["decided_by"].as_str().unwrap_or("")),
        None => f["decided_by"].as_str().unwrap_or("").to_string(),
    };
    format!(
        "{time} [{}]: {src} -> {dst} {} {verdict} ({detail}) {why}",
        f["node_name"].as_str().unwrap_or("?"),
        f["traffic_direction"].as_str().unwrap_or("?"),
    )
}

/// Streams until interrupted (or until every agent ends its stream:
/// exit code 1).
pub async fn monitor(hosts: &[String], kind: &str, filter: Filter, format: Format) -> anyhow::Result<u8> {
    if !matches!(kind, "drop" | "verdict") {
        anyhow::bail!("--type {kind:?}: expected drop or verdict");
    }
    let hosts: Vec<String> = if hosts.is_empty() { vec![agent_api::DEFAULT_HOST.to_string()] } else { hosts.to_vec() };
    // Connect to every agent first, so a wrong address fails at once.
    let mut bodies = Vec::new();
    for h in &hosts {
        bodies.push((h.clone(), agent_api::get(h, &format!("/v1/monitor?type={kind}")).await?));
    }
    if format != Format::Json {
        eprintln!(
            "Listening for {} events on {} agent(s)... Press Ctrl-C to quit",
            if kind == "drop" { "drop" } else { "verdict" },
            hosts.len()
        );
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(4096);
    for (host, body) in bodies {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = agent_api::Lines::new(body);
            let end = loop {
                match lines.next().await {
                    Ok(Some(l)) => {
                        if tx.send(l).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break format!("the agent at {host} ended the stream"),
                    Err(e) => break format!("the agent at {host}: {e:#}"),
                }
            };
            let _ = tx.send(format!("!{end}")).await;
        });
    }
    drop(tx);
    let mut out = std::io::stdout().lock();
    while let Some(line) = rx.recv().await {
        if let Some(end) = line.strip_prefix('!') {
            eprintln!("ciliumctl: {end}");
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
        if let Some(flow) = v.get("flow") {
            if !filter.keeps(flow) {
                continue;
            }
            if format == Format::Json {
                writeln!(out, "{line}")?;
            } else {
                writeln!(out, "{}", flow_text(flow))?;
            }
        } else if let Some(lost) = v.get("lost_events") {
            if format == Format::Json {
                writeln!(out, "{line}")?;
            } else {
                writeln!(
                    out,
                    "EVENTS LOST: {} {}",
                    lost["num_events_lost"].as_u64().unwrap_or(0),
                    lost["source"].as_str().unwrap_or("")
                )?;
            }
        }
        out.flush()?;
    }
    Ok(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn flow() -> Value {
        json!({
            "time": "2026-12-01T12:00:08Z", "node_name": "node-a", "verdict": "DROPPED",
            "drop_reason_desc": "POLICY_DENIED", "reason": "not-allowed",
            "decided_by": "default deny (policies select the endpoint, none allows this)",
            "traffic_direction": "INGRESS", "endpoint_id": 7,
            "IP": {"source": "10.0.2.9", "destination": "10.0.1.5"},
            "l4": {"protocol": "TCP", "source_port": 43210, "destination_port": 80},
            "source": {"identity": 200, "namespace": "default", "pod_name": "xwing", "labels": ["k8s:class=xwing"]},
            "destination": {"identity": 100, "namespace": "default", "pod_name": "deathstar-1", "labels": []},
            "bytes": 60
        })
    }

    #[test]
    fn a_drop_reads_like_hubble_observe() {
        assert_eq!(
            flow_text(&flow()),
            "2026-12-01T12:00:08Z [node-a]: default/xwing:43210 (ID:200) -> default/deathstar-1:80 (ID:100) \
             INGRESS DROPPED (TCP) POLICY_DENIED: default deny (policies select the endpoint, none allows this)"
        );
        let mut world = flow();
        world["source"] = json!({"identity": 2, "labels": ["reserved:world"]});
        world["IP"]["source"] = json!("192.168.210.100");
        assert!(flow_text(&world).contains("192.168.210.100:43210 (ID:2 reserved:world) ->"));
    }

    #[test]
    fn filters_by_pod_namespace_and_address() {
        let f = flow();
        let keep = |from: Option<&str>, to: Option<&str>| {
            Filter { from: from.map(String::from), to: to.map(String::from) }.keeps(&f)
        };
        assert!(keep(None, None));
        assert!(keep(Some("default/xwing"), None));
        assert!(keep(Some("xwing"), Some("deathstar-1")));
        assert!(keep(Some("10.0.2.9"), Some("10.0.1.5")));
        assert!(!keep(Some("default/tiefighter"), None));
        assert!(!keep(Some("other/xwing"), None));
        assert!(!keep(None, Some("default/xwing")));
    }
}
