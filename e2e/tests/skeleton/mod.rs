//! Walking skeleton: CRDs and policy fixtures against the real API server,
//! operator config errors, leader election, Prometheus.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use e2e::prometheus::Prometheus;
use e2e::tools::{self, workspace_root};
use e2e::{ControlPlane, Operator};

/// Runs a command, returning (success, stdout, stderr).
fn run(cmd: &mut Command) -> anyhow::Result<(bool, String, String)> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn kubectl_ok(cp: &ControlPlane, args: &[&str]) -> anyhow::Result<String> {
    let (ok, out, err) = run(cp.kubectl()?.args(args))?;
    ensure!(ok, "kubectl {args:?} failed: {err}");
    Ok(out)
}

fn create_namespace(cp: &ControlPlane, ns: &str) -> anyhow::Result<()> {
    let (ok, _, err) = run(cp.kubectl()?.args(["create", "namespace", ns]))?;
    ensure!(ok || err.contains("AlreadyExists"), "creating namespace {ns}: {err}");
    Ok(())
}

fn yaml_files(dir: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// The committed `crds/*.yaml` register on the real API server, become
/// Established, accept every valid policy fixture and reject every invalid
/// one (server-side dry run, so the schema is what decides).
pub fn crds_and_policy_fixtures(cp: &ControlPlane) -> anyhow::Result<()> {
    let root = workspace_root();
    let crds = yaml_files(&root.join("crds"))?;
    ensure!(crds.len() == 6, "expected 6 CRD manifests in crds/, found {}", crds.len());
    for f in &crds {
        kubectl_ok(cp, &["apply", "--server-side", "--field-manager=e2e", "-f", f.to_str().unwrap()])?;
    }
    kubectl_ok(cp, &["wait", "--for=condition=Established", "--timeout=60s", "crd", "--all"])?;
    // Discovery must have caught up before dry runs resolve the kinds.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !kubectl_ok(cp, &["api-resources", "--api-group=cilium.io"])
        .is_ok_and(|o| o.contains("ciliumnetworkpolicies"))
    {
        ensure!(Instant::now() < deadline, "cilium.io resources never appeared in discovery");
        std::thread::sleep(Duration::from_millis(300));
    }
    let fixtures = root.join("e2e/fixtures/policies");
    let valid = yaml_files(&fixtures.join("valid"))?;
    let invalid = yaml_files(&fixtures.join("invalid"))?;
    ensure!(
        valid.len() >= 10 && invalid.len() >= 5,
        "too few fixtures: {} valid, {} invalid",
        valid.len(),
        invalid.len()
    );
    let mut failures = Vec::new();
    for f in &valid {
        let (ok, _, err) =
            run(cp.kubectl()?.args(["apply", "--dry-run=server", "--validate=false", "-f", f.to_str().unwrap()]))?;
        if !ok {
            failures.push(format!("valid fixture rejected: {}: {}", f.display(), err.trim()));
        }
    }
    for f in &invalid {
        let (ok, out, err) =
            run(cp.kubectl()?.args(["apply", "--dry-run=server", "--validate=false", "-f", f.to_str().unwrap()]))?;
        if ok {
            failures.push(format!("invalid fixture accepted: {}: {}", f.display(), out.trim()));
        } else if !(err.contains("Invalid value")
            || err.contains("Unsupported value")
            || err.contains("invalid")
            || err.contains("Required value"))
        {
            failures.push(format!("invalid fixture failed for an unexpected reason: {}: {}", f.display(), err.trim()));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("policy fixtures: {} valid accepted, {} invalid rejected", valid.len(), invalid.len());
    Ok(())
}

/// Every bad configuration exits non-zero with one line naming the flag and
/// the value; nothing is started.
pub fn bad_config_exits_with_one_line(cp: &ControlPlane) -> anyhow::Result<()> {
    let bin = tools::workspace_bin("cilium-operator")?;
    let cfg_dir = tempfile::tempdir()?;
    std::fs::write(cfg_dir.path().join("identity-allocation-mode"), "etcd-please\n")?;
    let cfg_dir_arg = format!("--config-dir={}", cfg_dir.path().display());
    let kubeconfig = format!("--k8s-kubeconfig-path={}", cp.kubeconfig.display());
    // (arguments, environment, option named in the error, value named)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: &[Case] = &[
        (&["--identity-allocation-mode=foo"], &[], "--identity-allocation-mode", "foo"),
        (&[], &[("CILIUM_IDENTITY_ALLOCATION_MODE", "bar")], "CILIUM_IDENTITY_ALLOCATION_MODE", "bar"),
        (&[&cfg_dir_arg], &[], "--identity-allocation-mode", "etcd-please"),
        (&["--cluster-pool-ipv4-cidr=10.0.0.0/33"], &[], "--cluster-pool-ipv4-cidr", "10.0.0.0/33"),
        (&["--cluster-pool-ipv4-cidr=10.0.0.0/8,10.20.0.0/16"], &[], "--cluster-pool-ipv4-cidr", "overlaps"),
        (&["--cluster-pool-ipv4-cidr=fd00::/104"], &[], "--cluster-pool-ipv4-cidr", "fd00::/104"),
        (
            &["--cluster-pool-ipv4-cidr=10.0.0.0/8", "--cluster-pool-ipv4-mask-size=7"],
            &[],
            "--cluster-pool-ipv4-mask-size",
            "7",
        ),
        (
            &["--cluster-pool-ipv4-cidr=10.0.0.0/8", "--identity-gc-interval=15minutes"],
            &[],
            "--identity-gc-interval",
            "15minutes",
        ),
        (&["--cluster-pool-ipv4-cidr=10.0.0.0/8", "--nodes-gc-interval=-5m"], &[], "--nodes-gc-interval", "-5m"),
        (
            &["--cluster-pool-ipv4-cidr=10.0.0.0/8", "--identity-heartbeat-timeout=30"],
            &[],
            "--identity-heartbeat-timeout",
            "30",
        ),
        (
            &["--cluster-pool-ipv4-cidr=10.0.0.0/8", "--leader-election-lease-duration=5s"],
            &[],
            "--leader-election-renew-deadline",
            "10s",
        ),
        (&[], &[], "--cluster-pool-ipv4-cidr", "required"),
    ];
    for (args, env, flag, value) in cases {
        let mut cmd = Command::new(&bin);
        cmd.arg(&kubeconfig).args(*args).stdin(std::process::Stdio::null());
        for (k, v) in *env {
            cmd.env(k, v);
        }
        if !args.iter().any(|a| a.starts_with("--cluster-pool-ipv4-cidr")) && !flag.contains("ipv4-cidr") {
            cmd.arg("--cluster-pool-ipv4-cidr=10.0.0.0/8");
        }
        let started = Instant::now();
        let out = cmd.output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{args:?} {env:?}: exited 0, expected an error");
        ensure!(started.elapsed() < Duration::from_secs(5), "{args:?}: took {:?} to refuse", started.elapsed());
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        ensure!(lines.len() == 1, "{args:?} {env:?}: expected one error line, got:\n{stderr}");
        ensure!(
            lines[0].contains(flag) && lines[0].contains(value),
            "{args:?} {env:?}: {flag} / {value} not named in: {}",
            lines[0]
        );
    }
    eprintln!("{} bad configurations refused with one line each", cases.len());
    Ok(())
}

fn lease_holder(cp: &ControlPlane, ns: &str) -> anyhow::Result<Option<String>> {
    let (ok, out, err) =
        run(cp.kubectl()?.args(["get", "lease", "-n", ns, "cilium-operator-resource-lock", "-o", "json"]))?;
    if !ok {
        if err.contains("NotFound") {
            return Ok(None);
        }
        bail!("reading lease: {err}");
    }
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["spec"]["holderIdentity"].as_str().filter(|s| !s.is_empty()).map(String::from))
}

/// Two replicas: exactly one leads; `kill -9` of the leader hands the lease
/// to the other within lease duration + retry period; SIGTERM exits 0 and
/// releases the lease.
pub fn leader_election_failover_and_release(cp: &ControlPlane) -> anyhow::Result<()> {
    let ns = "e2e-leader";
    create_namespace(cp, ns)?;
    let mut a = Operator::start(cp, "operator-a", ns, &[])?;
    let mut b = Operator::start(cp, "operator-b", ns, &[])?;
    a.wait_healthy(Duration::from_secs(60))?;
    b.wait_healthy(Duration::from_secs(60))?;

    // Exactly one leader, stable for a few renewals.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(a.is_leader() || b.is_leader()) {
        ensure!(Instant::now() < deadline, "no leader after 30s:\n{}\n{}", a.proc.log_text(), b.proc.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    for _ in 0..15 {
        let (la, lb) = (a.is_leader(), b.is_leader());
        ensure!(la != lb, "expected exactly one leader, got a={la} b={lb}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (mut leader, mut standby) = if a.is_leader() { (a, b) } else { (b, a) };
    let holder = lease_holder(cp, ns)?.context("lease has no holder")?;
    ensure!(leader.proc.log_text().contains(&holder), "lease holder {holder} is not the leading replica");
    let leader_metrics = leader.metrics()?;
    ensure!(leader_metrics.contains("cilium_operator_is_leader 1"), "leader metrics: {leader_metrics}");
    ensure!(standby.metrics()?.contains("cilium_operator_is_leader 0"));

    // kill -9 the leader: the standby must lead within 15s + 2s.
    let killed_at = Instant::now();
    leader.proc.signal(libc::SIGKILL);
    leader.proc.wait_exit(Duration::from_secs(5)).context("killed leader did not exit")?;
    let budget = Duration::from_secs(15 + 2);
    while !standby.is_leader() {
        ensure!(
            killed_at.elapsed() < budget + Duration::from_secs(2),
            "standby did not take over within {budget:?}:\n{}",
            standby.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let takeover = killed_at.elapsed();
    ensure!(takeover <= budget + Duration::from_millis(500), "takeover took {takeover:?}, budget {budget:?}");
    let new_holder = lease_holder(cp, ns)?.context("lease has no holder after takeover")?;
    ensure!(new_holder != holder, "lease still held by the killed replica");

    // SIGTERM: clean exit and the lease released.
    let term_at = Instant::now();
    standby.proc.signal(libc::SIGTERM);
    let status = standby.proc.wait_exit(Duration::from_secs(15)).context("no exit 15s after SIGTERM")?;
    ensure!(status.success(), "exit after SIGTERM: {status}\n{}", standby.proc.log_text());
    ensure!(lease_holder(cp, ns)?.is_none(), "lease not released after SIGTERM");
    let log = standby.proc.log_text();
    let (drained, released) = (log.find("duties stopped and drained"), log.find("released the lease"));
    ensure!(
        matches!((drained, released), (Some(d), Some(r)) if d < r),
        "the lease must be released only after the duties stopped and drained:\n{log}"
    );
    eprintln!(
        "leader election: takeover after kill -9 in {:.1}s (budget {}s), SIGTERM exit+release in {:.2}s",
        takeover.as_secs_f64(),
        budget.as_secs(),
        term_at.elapsed().as_secs_f64()
    );
    // A new replica takes the released lease at once.
    let mut c = Operator::start(cp, "operator-c", ns, &[])?;
    c.wait_healthy(Duration::from_secs(60))?;
    let started = Instant::now();
    while !c.is_leader() {
        ensure!(started.elapsed() < Duration::from_secs(5), "released lease not taken within 5s");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// A real Prometheus scrapes the operator: `up == 1`, the operator's own
/// series are queryable, and `promtool check metrics` finds no parse error.
pub fn prometheus_scrapes_operator(cp: &ControlPlane) -> anyhow::Result<()> {
    let ns = "e2e-prometheus";
    create_namespace(cp, ns)?;
    let mut op = Operator::start(cp, "operator-prom", ns, &[])?;
    op.wait_healthy(Duration::from_secs(60))?;
    // The chart's alert and recording rules, evaluated by the real server.
    let rules = tools::workspace_root().join("charts/cilium/files/prometheus-rules.yaml");
    let prom = Prometheus::start("cilium-operator", std::slice::from_ref(&op.metrics_addr), &[rules])?;
    prom.wait_targets_up(Duration::from_secs(30))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = prom.query("up{job=\"cilium-operator\"}")?;
        let info = prom.query("cilium_operator_build_info")?;
        let leader = prom.query("cilium_operator_is_leader")?;
        if up.first().is_some_and(|s| s["value"][1] == "1") && !info.is_empty() && !leader.is_empty() {
            break;
        }
        ensure!(Instant::now() < deadline, "series never appeared: up={up:?} build_info={info:?}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // Recording rules evaluate to the ratios they name.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let identity = prom.query("cilium_operator:identity_space_usage:ratio{identity_type=\"crd\"}")?;
        let pool = prom.query("cilium_operator:ipam_pool_usage:ratio{pool=\"10.0.0.0/8\"}")?;
        let family = prom.query("cilium_operator:ipam_family_usage:ratio")?;
        let value = |v: &[serde_json::Value]| v.first().and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok());
        if let (Some(i), Some(p), Some(_)) = (value(&identity), value(&pool), value(&family)) {
            ensure!((0.0..1.0).contains(&i) && (0.0..1.0).contains(&p), "ratios out of range: {i} {p}");
            let groups = prom.api("/api/v1/rules")?;
            let bad: Vec<&serde_json::Value> = groups["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .filter(|r| r["health"] != "ok")
                .collect();
            ensure!(bad.is_empty(), "rules not healthy: {bad:?}");
            // The failure counter exists at 0 before any failure, so the
            // GC-failure alert's increase() sees the first one.
            let failures =
                prom.query("cilium_operator_identity_gc_runs_total{outcome=\"failure\",identity_type=\"crd\"}")?;
            ensure!(value(&failures) == Some(0.0), "failure counter not pre-created: {failures:?}");
            let firing = prom.query("ALERTS{alertstate=\"firing\"}")?;
            ensure!(firing.is_empty(), "alerts firing on a healthy operator: {firing:?}");
            break;
        }
        ensure!(Instant::now() < deadline, "recording rules never evaluated: {identity:?} {pool:?} {family:?}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // promtool: no parse errors. promtool 2.42 flags OpenMetrics counters
    // from prometheus-client as "no help text" (a known false positive):
    // lint findings are printed, parse errors fail.
    let text = op.metrics()?;
    let mut child = Command::new(tools::tool("promtool")?)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    use std::io::Write;
    child.stdin.take().context("stdin")?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let code = out.status.code().unwrap_or(-1);
    let parse_error = report.lines().any(|l| l.contains("error while linting") || l.contains("parse"));
    ensure!(!parse_error && (code == 0 || code == 3), "promtool check metrics exit {code}: {report}");
    let lint_findings: Vec<&str> = report.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(lint_findings.iter().all(|l| l.contains("no help text")), "unexpected promtool findings: {report}");
    eprintln!(
        "prometheus: target up, series queryable; promtool exit {code} ({} known no-help lint lines)",
        lint_findings.len()
    );
    Ok(())
}
