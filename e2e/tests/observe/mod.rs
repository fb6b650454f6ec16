//! Seeing what the datapath does, through the real agents: `ciliumctl
//! monitor` streams drops (and verdicts) with both pods' names,
//! identities and the reason.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use e2e::netns::can_connect;
use e2e::{ControlPlane, block_on};
use serde_json::Value;

use crate::datapath::{Cluster, RULE1, cluster, expect_conn, star_wars};

/// `ciliumctl monitor` running in the background; its stdout lines on a
/// channel.
struct Monitor {
    child: Child,
    /// Each line with when it was read.
    lines: mpsc::Receiver<(Instant, String)>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn monitor(c: &Cluster, args: &[&str]) -> anyhow::Result<Monitor> {
    let mut cmd = std::process::Command::new(e2e::tools::workspace_bin("ciliumctl")?);
    cmd.arg("monitor").args(args);
    for a in c.agents.values() {
        cmd.arg(format!("--host=unix://{}", a.socket.display()));
    }
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let out = child.stdout.take().context("stdout")?;
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), l)).is_err() {
                return;
            }
        }
    });
    Ok(Monitor { child, lines })
}

/// Tries `from` -> `ip:80` until the monitor prints a line `pick` accepts
/// within `within` of an attempt (the monitor may subscribe after the
/// first attempts); returns the line and how long it took from the
/// attempt that produced it.
fn line_after_attempts(
    m: &Monitor,
    from: &str,
    ip: std::net::Ipv4Addr,
    within: Duration,
    pick: impl Fn(&str) -> bool,
) -> anyhow::Result<(String, Duration)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let t0 = Instant::now();
        let _ = can_connect(from, ip, 80, Duration::from_millis(300))?;
        while t0.elapsed() < within {
            match m.lines.recv_timeout(within.saturating_sub(t0.elapsed())) {
                Ok((at, l)) if pick(&l) => return Ok((l, at.duration_since(t0))),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => anyhow::bail!("ciliumctl monitor exited"),
            }
        }
    }
    anyhow::bail!("no matching monitor line within {within:?} of a connection attempt in 20 s")
}

/// rule1 drops the xwing: `ciliumctl monitor --type drop -o json` shows
/// that drop within 1 s with both pods' names and identities and the
/// reason, and never the tiefighter's allowed connection; the text form
/// reads like `hubble observe`; `--type verdict` shows the allowed flow
/// and the entry that decided; the agents count the events.
pub fn monitor_shows_drops_and_verdicts(_shared: &ControlPlane) -> anyhow::Result<()> {
    let c = cluster("mon", &["node-a", "node-b"])?;
    let result = (|| -> anyhow::Result<()> {
        let sw = star_wars(&c, &[80])?;
        let (ds, tie, xwing) = (sw.deathstar, sw.tie.clone(), sw.xwing.clone());
        c.kubectl(&["apply", "-f", "-"], Some(RULE1))?;
        let t = Duration::from_secs(20);
        expect_conn(&c, "xwing under rule1", &xwing, ds, 80, false, t)?;
        let (ds_id, xwing_id, tie_id) = block_on(async {
            anyhow::Ok((
                c.identity_of("deathstar").await?,
                c.identity_of("xwing").await?,
                c.identity_of("tiefighter").await?,
            ))
        })?;

        let json = monitor(&c, &["--type=drop", "-o", "json"])?;
        let (line, took) = line_after_attempts(&json, &xwing, ds, Duration::from_secs(1), |l| l.contains("xwing"))?;
        let v: Value = serde_json::from_str(&line).with_context(|| format!("monitor line {line}"))?;
        let f = &v["flow"];
        ensure!(f["verdict"] == "DROPPED" && f["drop_reason_desc"] == "POLICY_DENIED", "{line}");
        ensure!(f["traffic_direction"] == "INGRESS" && f["node_name"] == "node-a", "{line}");
        ensure!(f["source"]["pod_name"] == "xwing" && f["source"]["namespace"] == "default", "{line}");
        ensure!(f["source"]["identity"] == xwing_id, "xwing identity {xwing_id}: {line}");
        ensure!(f["destination"]["pod_name"] == "deathstar" && f["destination"]["identity"] == ds_id, "{line}");
        ensure!(f["l4"]["protocol"] == "TCP" && f["l4"]["destination_port"] == 80, "{line}");
        ensure!(
            f["source"]["labels"].as_array().is_some_and(|l| l.iter().any(|x| x == "k8s:class=xwing")),
            "xwing labels: {line}"
        );
        ensure!(f["decided_by"].as_str().is_some_and(|d| d.starts_with("default deny")), "{line}");
        // The tiefighter's allowed connection is no drop.
        ensure!(can_connect(&tie, ds, 80, Duration::from_secs(2))?, "tiefighter refused under rule1");
        std::thread::sleep(Duration::from_millis(500));
        let seen: Vec<String> = json.lines.try_iter().map(|(_, l)| l).collect();
        ensure!(!seen.iter().any(|l| l.contains("tiefighter")), "an allowed flow in the drop stream: {seen:?}");
        drop(json);

        // Text, filtered by pod: the hubble-like line.
        let text = monitor(&c, &["--from=default/xwing", "--to=deathstar"])?;
        let (line, _) = line_after_attempts(&text, &xwing, ds, Duration::from_secs(1), |l| l.contains("DROPPED"))?;
        ensure!(
            line.contains("default/xwing:")
                && line.contains(&format!(
                    "(ID:{xwing_id}) -> default/deathstar:80 (ID:{ds_id}) INGRESS DROPPED (TCP) POLICY_DENIED"
                )),
            "text line: {line}"
        );
        drop(text);

        // Verdicts: the tiefighter's connection, allowed by rule1's entry
        // for its identity.
        let verdicts =
            monitor(&c, &["--type=verdict", "-o", "json", "--from=default/tiefighter", "--to=default/deathstar"])?;
        let (line, _) = line_after_attempts(&verdicts, &tie, ds, Duration::from_secs(1), |l| {
            l.contains("FORWARDED") && l.contains("\"traffic_direction\":\"INGRESS\"")
        })?;
        let v: Value = serde_json::from_str(&line)?;
        let f = &v["flow"];
        ensure!(f["source"]["identity"] == tie_id && f["reason"] == "allowed-by-policy", "{line}");
        ensure!(f["decided_by"] == "policy entry for the peer's identity", "{line}");
        drop(verdicts);

        // Counted by the agent; nothing lost.
        let m = c.agents["node-a"].metrics()?;
        let value = |name: &str| {
            m.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        };
        let dropped =
            value("hubble_flows_processed_total{type=\"L3_L4\",verdict=\"DROPPED\"}").context("drop count")?;
        ensure!(dropped >= 2.0, "hubble_flows_processed_total DROPPED = {dropped}");
        ensure!(value("hubble_lost_events_total{source=\"perf_event_ring_buffer\"}") == Some(0.0), "events lost:\n{m}");
        eprintln!(
            "monitor: the xwing's drop shown {:.0} ms after the attempt, with both pods, identities {xwing_id} -> {ds_id} and the reason",
            took.as_secs_f64() * 1000.0
        );
        Ok(())
    })();
    result.map_err(|e| e.context(c.agent_logs()))
}

/// `ip ARGS`, which must succeed.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip").args(args).output()?;
    ensure!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// `ciliumctl ARGS --host ...` for every agent: (exit code, stdout).
fn ciliumctl_agents(c: &Cluster, args: &[&str]) -> anyhow::Result<(i32, String)> {
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all.extend(c.agents.values().map(|a| format!("--host=unix://{}", a.socket.display())));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = c.ciliumctl(&refs)?;
    Ok((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?.rsplit(' ').next()?.parse().ok()
}

/// Health probes, doctor's node checks and map pressure, through the real
/// agents: every node and health endpoint answers (`ciliumctl health`
/// exit 0); one node cut off its fabric shows in `ciliumctl health`, in
/// `cilium_unreachable_nodes` and in doctor within two probe intervals,
/// and heals; a policy that fills most of a small policy map moves
/// `cilium_bpf_map_pressure` and doctor names the map; doctor explains a
/// recent drop with the policy trace.
pub fn health_doctor_and_map_pressure(_shared: &ControlPlane) -> anyhow::Result<()> {
    const INTERVAL: Duration = Duration::from_secs(2);
    let c = crate::datapath::cluster_with("hlth", &["node-a", "node-b", "node-c"], |_| {
        (Vec::new(), vec!["--health-probe-interval=2s".into(), "--bpf-policy-map-max=2048".into()])
    })?;
    let result = (|| -> anyhow::Result<()> {
        let sw = star_wars(&c, &[80])?;
        // Every agent reaches every node and health endpoint.
        let t0 = Instant::now();
        loop {
            let (code, out) = ciliumctl_agents(&c, &["health", "-o", "json"])?;
            let reports: Vec<Value> = serde_json::from_str(&out).with_context(|| format!("health JSON: {out}"))?;
            let complete = reports.iter().all(|r| r["nodes"].as_array().is_some_and(|n| n.len() == 3));
            if code == 0 && complete {
                break;
            }
            ensure!(t0.elapsed() < Duration::from_secs(30), "not every node reachable after 30 s (exit {code}): {out}");
            std::thread::sleep(Duration::from_millis(300));
        }
        let (_, table) = ciliumctl_agents(&c, &["health", "--color=never"])?;
        ensure!(
            table.lines().filter(|l| l.starts_with("node-") && !l.contains(": ")).count() == 9,
            "3x3 matrix:\n{table}"
        );
        let a = &c.agents["node-a"];
        ensure!(metric(&a.metrics()?, "cilium_unreachable_nodes") == Some(0.0), "node-a sees unreachable nodes");

        // node-c cut off the fabric.
        let node_c = format!("{}-node-c", c.prefix);
        ip(&["-n", &node_c, "link", "set", "eth0", "down"])?;
        let cut = Instant::now();
        let seen = loop {
            let m = a.metrics()?;
            if metric(&m, "cilium_unreachable_nodes") == Some(1.0)
                && metric(&m, "cilium_unreachable_health_endpoints") == Some(1.0)
            {
                break cut.elapsed();
            }
            ensure!(cut.elapsed() < INTERVAL * 4, "node-a did not see node-c unreachable:\n{m}");
            std::thread::sleep(Duration::from_millis(100));
        };
        ensure!(seen <= INTERVAL * 2, "seen after {seen:?}: more than two probe intervals ({INTERVAL:?} each)");
        let (code, table) = ciliumctl_agents(&c, &["health", "--color=never"])?;
        ensure!(code == 2, "health exit {code} with node-c cut off:\n{table}");
        let row = table.lines().find(|l| l.starts_with("node-a") && l.contains(" node-c ")).context("row")?;
        ensure!(row.contains("no echo reply") || row.contains("timed out"), "node-a -> node-c row: {row}");
        let (code, doc) = ciliumctl_agents(&c, &["doctor", "--color=never"])?;
        ensure!(code == 2, "doctor exit {code} with node-c cut off:\n{doc}");
        ensure!(doc.contains("node-health") && doc.contains("node-a -> node-c node"), "doctor:\n{doc}");

        ip(&["-n", &node_c, "link", "set", "eth0", "up"])?;
        let healed = Instant::now();
        loop {
            if metric(&a.metrics()?, "cilium_unreachable_nodes") == Some(0.0) {
                break;
            }
            ensure!(healed.elapsed() < INTERVAL * 4, "node-c still unreachable after healing");
            std::thread::sleep(Duration::from_millis(100));
        }
        let healed_after = healed.elapsed();

        // A policy of 20 CIDRs x 90 separate TCP ports on the deathstar:
        // 1,800 entries in a policy map of 2,048 (88%), then 2 more CIDRs:
        // 1,980 (97%).
        let ds_pressure = |m: &str| metric(m, "cilium_bpf_map_pressure{map_name=\"cilium_policy\"}");
        let policy = |cidrs: usize| {
            let cidrs: Vec<String> = (0..cidrs).map(|i| format!("\"192.168.230.{}/32\"", i + 1)).collect();
            // (At most 40 ports per port rule: three rules of 30.)
            let rules: Vec<String> = (0..3)
                .map(|r| {
                    let ports: Vec<String> = (0..30)
                        .map(|i| format!("{{\"port\": \"{}\", \"protocol\": \"TCP\"}}", 2000 + 2 * (30 * r + i)))
                        .collect();
                    format!("{{\"ports\": [{}]}}", ports.join(","))
                })
                .collect();
            format!(
                r#"{{"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                   "metadata": {{"name": "many-ports", "namespace": "default"}},
                   "spec": {{"endpointSelector": {{"matchLabels": {{"class": "deathstar"}}}},
                            "ingress": [{{"fromCIDR": [{}], "toPorts": [{}]}}]}}}}"#,
                cidrs.join(","),
                rules.join(",")
            )
        };
        c.kubectl(&["apply", "-f", "-"], Some(&policy(20)))?;
        let t0 = Instant::now();
        let below = loop {
            let p = ds_pressure(&a.metrics()?).unwrap_or(0.0);
            if p > 0.8 {
                break p;
            }
            ensure!(t0.elapsed() < Duration::from_secs(20), "policy map pressure stays at {p}");
            std::thread::sleep(Duration::from_millis(200));
        };
        let (_, doc) = ciliumctl_agents(&c, &["doctor", "-o", "json"])?;
        let findings: Vec<Value> = serde_json::from_str(&doc)?;
        let f = findings.iter().find(|f| f["check"] == "bpf-map-pressure").context("no bpf-map-pressure finding")?;
        ensure!(f["severity"] == "ok", "at {below:.2}: {f}");
        // Each agent's pod CIDR use: health endpoint + pods, of a /24.
        let f = findings.iter().find(|f| f["check"] == "ipam-pod-cidr").context("no ipam-pod-cidr finding")?;
        let pools: Vec<&str> = f["evidence"].as_array().into_iter().flatten().filter_map(|e| e.as_str()).collect();
        ensure!(
            f["severity"] == "ok"
                && pools.iter().any(|p| p.starts_with("node-a: ") && p.contains("/254 allocated from 10.")),
            "{f}"
        );
        c.kubectl(&["apply", "-f", "-"], Some(&policy(22)))?;
        let t0 = Instant::now();
        let above = loop {
            let p = ds_pressure(&a.metrics()?).unwrap_or(0.0);
            if p >= 0.9 {
                break p;
            }
            ensure!(t0.elapsed() < Duration::from_secs(20), "policy map pressure stays at {p}");
            std::thread::sleep(Duration::from_millis(200));
        };
        let (code, doc) = ciliumctl_agents(&c, &["doctor", "-o", "json"])?;
        let findings: Vec<Value> = serde_json::from_str(&doc)?;
        let f = findings.iter().find(|f| f["check"] == "bpf-map-pressure").context("no bpf-map-pressure finding")?;
        ensure!(code == 2 && f["severity"] == "warning", "at {above:.2} (exit {code}): {f}");
        ensure!(
            f["evidence"].as_array().is_some_and(|e| e
                .iter()
                .any(|x| x.as_str().is_some_and(|s| s.starts_with("cilium_policy on node-a")))),
            "{f}"
        );
        // The deathstar still answers the tiefighter? No: this policy
        // replaced nothing but selects the deathstar, so only the CIDRs may
        // reach it; the xwing's attempt is a recent drop doctor explains.
        ensure!(!can_connect(&sw.xwing, sw.deathstar, 80, Duration::from_millis(500))?, "xwing reached the deathstar");
        let (_, doc) = ciliumctl_agents(&c, &["doctor", "-o", "json"])?;
        let findings: Vec<Value> = serde_json::from_str(&doc)?;
        let f = findings.iter().find(|f| f["check"] == "recent-drops").context("no recent-drops finding")?;
        let line = f["evidence"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find(|l| l.starts_with("default/xwing -> default/deathstar TCP/80"))
            .with_context(|| format!("no xwing drop explained: {f}"))?
            .to_string();
        ensure!(
            line.contains("POLICY_DENIED") && line.contains("default deny by CiliumNetworkPolicy default/many-ports"),
            "{line}"
        );
        // sysdump with the agents: each one's status, maps and metrics.
        let archive = c.cp.dir().join("sysdump-agents.tar.gz");
        let (code, _) = ciliumctl_agents(&c, &["sysdump", "--output-file", &archive.display().to_string()])?;
        ensure!(code == 0, "sysdump exit {code}");
        let list = std::process::Command::new("tar").arg("tzf").arg(&archive).output()?;
        let list = String::from_utf8_lossy(&list.stdout).into_owned();
        for node in ["node-a", "node-b", "node-c"] {
            for file in ["status.json", "maps.json", "metrics.txt"] {
                let want = format!("agents/{node}-{file}");
                ensure!(list.lines().any(|l| l.ends_with(&want)), "sysdump lacks {want}:\n{list}");
            }
        }
        ensure!(list.lines().any(|l| l.ends_with("ciliumctl/health.json")), "sysdump lacks health.json:\n{list}");
        let maps = std::process::Command::new("tar")
            .arg("xzOf")
            .arg(&archive)
            .arg(list.lines().find(|l| l.ends_with("agents/node-a-maps.json")).context("maps")?)
            .output()?;
        let maps: Value = serde_json::from_slice(&maps.stdout).context("node-a maps.json")?;
        let entries: usize =
            maps["policy"].as_object().into_iter().flatten().map(|(_, v)| v.as_array().map_or(0, Vec::len)).sum();
        ensure!(entries >= 1980, "node-a's policy map dump has {entries} entries");
        ensure!(
            maps["ipcache"].as_array().is_some_and(|i| i.iter().any(|e| e["identity"] == 4)),
            "no health endpoint (reserved:health) in node-a's ipcache dump"
        );
        eprintln!(
            "health: node-c cut off seen by node-a after {:.1} s (interval {} s), healed after {:.1} s; \
             policy map pressure {below:.2} -> {above:.2} named by doctor; the xwing's drop explained: {line}",
            seen.as_secs_f64(),
            INTERVAL.as_secs(),
            healed_after.as_secs_f64()
        );
        Ok(())
    })();
    result.map_err(|e| e.context(c.agent_logs()))
}
