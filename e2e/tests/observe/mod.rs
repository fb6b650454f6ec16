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
        let (line, _) = line_after_attempts(&verdicts, &tie, ds, Duration::from_secs(1), |l| l.contains("FORWARDED"))?;
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
