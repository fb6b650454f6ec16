//! A real Prometheus server (Debian's package) on loopback with a temporary
//! TSDB, scraping the targets it is given.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cluster::{free_port, http_get_plain};
use crate::process::Process;
use crate::tools;

pub struct Prometheus {
    pub proc: Process,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (host:port) every second under
    /// job `job`. `rule_files` are loaded too.
    pub fn start(job: &str, targets: &[String], rule_files: &[std::path::PathBuf]) -> anyhow::Result<Prometheus> {
        let dir = tempfile::Builder::new().prefix("cilium-rs-prom.").tempdir()?;
        let addr = format!("127.0.0.1:{}", free_port());
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let rules: Vec<String> = rule_files.iter().map(|r| format!("  - '{}'", r.display())).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}\nscrape_configs:\n  - job_name: '{job}'\n    static_configs:\n      - targets: [{}]\n",
            if rules.is_empty() { "  []".to_string() } else { rules.join("\n") },
            targets.join(", ")
        );
        let cfg_path = dir.path().join("prometheus.yml");
        std::fs::write(&cfg_path, config)?;
        let mut cmd = Command::new(tools::tool("prometheus")?);
        cmd.arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let mut proc = Process::spawn("prometheus", dir.path(), &mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get_plain(&addr, "/-/ready").is_err() {
            if let Some(s) = proc.try_exit() {
                bail!("prometheus exited ({s}):\n{}", proc.log_text());
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready:\n{}", proc.log_text());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(Prometheus { proc, addr, _dir: dir })
    }

    /// GET a Prometheus API path and parse the JSON.
    pub fn api(&self, path_and_query: &str) -> anyhow::Result<serde_json::Value> {
        let body = http_get_plain(&self.addr, path_and_query)?;
        serde_json::from_str(&body).with_context(|| format!("parsing {path_and_query}: {body}"))
    }

    /// An instant query's result vector.
    pub fn query(&self, promql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let v = self.api(&format!("/api/v1/query?query={}", urlencode(promql)))?;
        if v["status"] != "success" {
            bail!("query {promql} failed: {v}");
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until every target is `up` (polls /api/v1/targets).
    pub fn wait_targets_up(&self, timeout: Duration) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.api("/api/v1/targets")?;
            let active = v["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
            if !active.is_empty() && active.iter().all(|t| t["health"] == "up") {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("targets not up after {timeout:?}: {v}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Percent-encodes a query parameter value.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
