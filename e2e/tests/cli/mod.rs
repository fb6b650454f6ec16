//! ciliumctl against a real control plane: a clean bill on a healthy
//! cluster, then seeded faults (exhausted pool, label explosion, orphaned
//! identities, stopped heartbeat writer, stuck lock, endpoint not ready)
//! that `doctor` must each name with its fix; every other subcommand, and
//! one-line errors for bad input and unreachable servers.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};
use cilium_crds::{CiliumEndpoint, CiliumIdentity, CiliumNode};
use cilium_identity::Labels;
use cilium_identity_alloc::HEARTBEAT_ANNOTATION;
use cilium_identity_alloc::crd::{CrdAllocator, identity_object};
use e2e::{ControlPlane, Operator, Options, block_on, eventually, tools};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

const NS: &str = "cli-test";

/// Output of one ciliumctl run.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn ctl(cp: &ControlPlane, args: &[&str]) -> anyhow::Result<Run> {
    let out = Command::new(tools::workspace_bin("ciliumctl")?)
        .args(args)
        .env("KUBECONFIG", &cp.kubeconfig)
        .stdin(Stdio::null())
        .output()
        .context("running ciliumctl")?;
    Ok(Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs ciliumctl expecting exit status `code`.
fn ctl_ok(cp: &ControlPlane, args: &[&str], code: i32) -> anyhow::Result<String> {
    let r = ctl(cp, args)?;
    ensure!(r.code == code, "ciliumctl {args:?} exited {} (want {code}):\n{}\n{}", r.code, r.stdout, r.stderr);
    Ok(r.stdout)
}

/// Runs ciliumctl expecting a one-line error containing `want`.
fn ctl_err(cp: &ControlPlane, args: &[&str], want: &str) -> anyhow::Result<()> {
    let r = ctl(cp, args)?;
    ensure!(r.code == 1, "ciliumctl {args:?} exited {} (want 1):\n{}\n{}", r.code, r.stdout, r.stderr);
    let line = r.stderr.trim_end();
    ensure!(
        line.lines().count() == 1 && line.starts_with("ciliumctl: error: ") && line.contains(want),
        "ciliumctl {args:?}: want one error line containing {want:?}, got:\n{}",
        r.stderr
    );
    Ok(())
}

fn doctor_json(cp: &ControlPlane, code: i32) -> anyhow::Result<Vec<Value>> {
    let out = ctl_ok(cp, &["doctor", "-o", "json"], code)?;
    serde_json::from_str::<Vec<Value>>(&out).with_context(|| format!("doctor json:\n{out}"))
}

fn finding<'a>(findings: &'a [Value], check: &str) -> anyhow::Result<&'a Value> {
    findings.iter().find(|f| f["check"] == check).with_context(|| format!("no {check} finding"))
}

async fn cep(api: &Api<CiliumEndpoint>, name: &str, id: u32, state: &str) -> anyhow::Result<()> {
    let cep: CiliumEndpoint = serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": NS },
        "status": { "identity": { "id": id }, "state": state,
                    "networking": { "addressing": [{ "ipv4": "10.31.0.9" }], "node": "n1" } }
    }))?;
    api.create(&PostParams::default(), &cep).await?;
    Ok(())
}

pub fn doctor_and_commands_on_seeded_faults(_shared: &ControlPlane) -> anyhow::Result<()> {
    let cp = ControlPlane::start(Options::default())?;
    let settings = [
        ("cluster-pool-ipv4-cidr", "10.31.0.0/23"),
        ("cluster-pool-ipv4-mask-size", "24"),
        ("identity-gc-interval", "1h"),
        ("identity-heartbeat-timeout", "1h"),
        ("kvstore", "etcd"),
        ("kvstore-opt", &format!("etcd.address={}", cp.etcd_endpoint) as &str),
        ("kvstore-heartbeat-interval", "2s"),
    ];
    let flags: Vec<String> = settings.iter().map(|(k, v)| format!("--{k}={v}")).collect();
    let result = block_on(async {
        let client = cp.client().await?;
        // The same settings the operator gets, as the Helm chart renders them.
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": { "name": "cilium-config", "namespace": "kube-system" },
            "data": settings.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect::<serde_json::Map<_, _>>(),
        }))?;
        Api::<ConfigMap>::namespaced(client.clone(), "kube-system").create(&PostParams::default(), &cm).await?;
        let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": NS } }))?;
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
        let mut op = Operator::start(&cp, "operator-cli", "kube-system", &flags)?;
        op.wait_healthy(Duration::from_secs(60))?;
        eventually("leadership", Duration::from_secs(20), || async { Ok(op.is_leader().then_some(())) }).await?;

        // Healthy: one node with its CIDR, one identity used by a ready endpoint.
        let nodes: Api<Node> = Api::all(client.clone());
        let cnodes: Api<CiliumNode> = Api::all(client.clone());
        let pp = PostParams::default();
        nodes.create(&pp, &crate::ipam::node("n1")).await?;
        cnodes.create(&pp, &crate::ipam::cilium_node("n1", &[])).await?;
        eventually("n1's pod CIDR", Duration::from_secs(20), || async {
            Ok((!cnodes.get("n1").await?.pod_cidrs().is_empty()).then_some(()))
        })
        .await?;
        let alloc = CrdAllocator::new(client.clone(), 256..=65535, "e2e-cli");
        let web = alloc.allocate(&Labels::from_k8s(NS, [("app", "web")])).await?.id;
        let ceps: Api<CiliumEndpoint> = Api::namespaced(client.clone(), NS);
        cep(&ceps, "web", web, "ready").await?;
        eventually("the kvstore heartbeat", Duration::from_secs(20), || async {
            Ok(ctl(&cp, &["kvstore", "get", "cilium/.heartbeat"])?.stdout.contains("cilium/.heartbeat").then_some(()))
        })
        .await?;

        let out = ctl_ok(&cp, &["doctor"], 0)?;
        ensure!(out.contains("All 10 checks passed"), "healthy cluster:\n{out}");
        let status = ctl_ok(&cp, &["status"], 0)?;
        ensure!(
            status.contains("1 of 65280 used") && status.contains("10.31.0.0/23 (/24) 1 of 2 used, 1 free"),
            "{status}"
        );
        ensure!(!status.contains("problem(s) found"), "{status}");
        let s: Value = serde_json::from_str(&ctl_ok(&cp, &["status", "-o", "json"], 0)?)?;
        ensure!(s["identities_used"] == 1 && s["endpoints_ready"] == 1 && s["nodes"] == 1, "{s}");

        // Fault: exhausted pool. n2 takes the last /24, n3 gets nothing.
        for n in ["n2", "n3"] {
            nodes.create(&pp, &crate::ipam::node(n)).await?;
            cnodes.create(&pp, &crate::ipam::cilium_node(n, &[])).await?;
        }
        eventually("allocator full on one node", Duration::from_secs(20), || async {
            let errs = cnodes
                .list(&Default::default())
                .await?
                .items
                .iter()
                .filter(|n| format!("{:?}", n.status).contains("allocator full"))
                .count();
            Ok((errs == 1).then_some(()))
        })
        .await?;
        // Fault: label explosion, 60 build-ids, each in use.
        let mut batch = Vec::new();
        for i in 0..60 {
            let l = Labels::from_k8s(NS, [("app", "batch"), ("build-id", &format!("b{i:03}") as &str)]);
            let id = alloc.allocate(&l).await?.id;
            cep(&ceps, &format!("batch-{i}"), id, "ready").await?;
            batch.push(id);
        }
        // `identity gc` asks the running leader for a pass (all in use).
        let out = ctl_ok(&cp, &["identity", "gc"], 0)?;
        ensure!(out.contains("identity GC pass run by") && out.contains("crd: alive=61 deleted=0 marked=0"), "{out}");
        // Fault: orphaned identities, marked 3h ago (timeout 1h), no endpoint.
        let identities: Api<CiliumIdentity> = Api::all(client.clone());
        let marked = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(3)).to_string();
        let mut orphans = Vec::new();
        for (i, id) in [40001u32, 40002, 40003].into_iter().enumerate() {
            let mut obj = identity_object(id, &Labels::from_k8s(NS, [("app", &format!("orphan{i}") as &str)]));
            obj.metadata.annotations = Some([(HEARTBEAT_ANNOTATION.to_string(), marked.clone())].into());
            identities.create(&pp, &obj).await?;
            orphans.push(id);
        }
        // Fault: an endpoint stuck waiting for its identity.
        cep(&ceps, "stuck", web, "waiting-for-identity").await?;
        // Fault: a lock with no lease (never expires).
        let mut etcd = etcd_client::Client::connect([cp.etcd_endpoint.as_str()], None).await?;
        let lock_key = format!("{}locks/k8s:app=stuck;/694d9a1b2c3d4e5f", cilium_identity_alloc::kvstore::PREFIX);
        etcd.put(lock_key.as_str(), "", None).await?;

        // Fault: the heartbeat writer stops (the operator goes away); the
        // key it left is 10 minutes old.
        op.stop()?;
        let old = (jiff::Timestamp::now() - jiff::SignedDuration::from_mins(10)).to_string();
        etcd.put("cilium/.heartbeat", old.as_str(), None).await?;

        let out = ctl_ok(&cp, &["doctor", "--color", "never"], 3)?;
        for want in [
            "pod CIDR pool exhausted",
            "allocator full",
            "label explosion: k8s:build-id",
            r#""k8s:!build-id$""#,
            "orphaned identities",
            "identity 40001",
            "no operator leader",
            "stale kvstore heartbeat",
            "stuck identity lock",
            "k8s:app=stuck;",
            "cli-test/stuck: state waiting-for-identity",
            "fix: append a new CIDR to cluster-pool-ipv4-cidr",
        ] {
            ensure!(out.contains(want), "doctor output lacks {want:?}:\n{out}");
        }
        let f = doctor_json(&cp, 3)?;
        for (check, severity) in [
            ("ipam-pools", "critical"),
            ("label-explosion", "warning"),
            ("identities-without-endpoints", "warning"),
            ("operator-leader", "critical"),
            ("kvstore-heartbeat", "critical"),
            ("kvstore-locks", "warning"),
            ("endpoints-not-ready", "warning"),
            ("config", "ok"),
            ("identity-space", "ok"),
        ] {
            let got = &finding(&f, check)?["severity"];
            ensure!(got == severity, "{check}: severity {got}, want {severity}");
            if severity != "ok" {
                ensure!(finding(&f, check)?["fix"].as_str().is_some_and(|s| !s.is_empty()), "{check} has no fix");
            }
        }

        // The other subcommands.
        let out = ctl_ok(&cp, &["identity", "list", "--color", "never"], 0)?;
        ensure!(out.lines().count() == 1 + 64 && out.starts_with("ID"), "{out}");
        let one: Vec<Value> =
            serde_json::from_str(&ctl_ok(&cp, &["identity", "list", "--label", "build-id=b007", "-o", "json"], 0)?)?;
        ensure!(one.len() == 1 && one[0]["id"] == batch[7] && one[0]["users"] == 1, "{one:?}");
        let sel: Vec<Value> =
            serde_json::from_str(&ctl_ok(&cp, &["identity", "list", "-l", "app=batch", "-o", "json"], 0)?)?;
        ensure!(sel.len() == 60, "selector app=batch: {} identities", sel.len());
        let yaml = ctl_ok(&cp, &["identity", "list", "--unused", "-o", "yaml"], 0)?;
        let unused: Vec<Value> = serde_saphyr::from_str(&yaml).with_context(|| format!("yaml output:\n{yaml}"))?;
        ensure!(unused.len() == 3 && unused[0]["id"] == 40001, "unused: {unused:?}");
        let out = ctl_ok(&cp, &["identity", "get", &web.to_string()], 0)?;
        ensure!(out.contains("k8s:app=web") && out.contains("cli-test/web"), "{out}");
        let out = ctl_ok(&cp, &["identity", "gc", "--dry-run"], 0)?;
        ensure!(out.contains("40001") && out.contains("delete"), "{out}");
        ensure!(!out.contains(&format!("\n{web} ")), "dry run lists the used identity:\n{out}");
        ctl_err(&cp, &["identity", "delete", &web.to_string()], "is in use: 2 endpoint(s)")?;
        let out = ctl_ok(&cp, &["identity", "delete", "40001"], 0)?;
        ensure!(out.contains("identity 40001 deleted"), "{out}");
        ensure!(identities.get_opt("40001").await?.is_none(), "40001 still exists");
        let out = ctl_ok(&cp, &["ipam", "status", "--color", "never"], 0)?;
        ensure!(out.contains("10.31.0.0/23") && out.contains("100.0%") && out.contains("allocator full"), "{out}");
        let out = ctl_ok(&cp, &["endpoint", "list", "-n", NS], 0)?;
        ensure!(out.lines().count() == 1 + 62 && out.contains("waiting-for-identity"), "{out}");
        let out = ctl_ok(&cp, &["endpoint", "get", &format!("{NS}/web")], 0)?;
        ensure!(out.contains(&format!("id: {web}")), "{out}");
        let out = ctl_ok(&cp, &["kvstore", "status", "--color", "never"], 0)?;
        ensure!(
            out.contains("Heartbeat:")
                && out.contains("10m")
                && out.lines().any(|l| l.starts_with("Locks:") && l.trim_end().ends_with(" 1")),
            "{out}"
        );
        let out = ctl_ok(&cp, &["kvstore", "locks", "--color", "never"], 0)?;
        ensure!(out.contains("k8s:app=stuck;") && out.contains("stuck (no lease)"), "{out}");

        // Bad input and unreachable servers: one line, exit 1.
        ctl_err(&cp, &["identity", "get", "99999"], "identity 99999 not found (crd)")?;
        ctl_err(&cp, &["identity", "get", "web"], "invalid identity \"web\"")?;
        ctl_err(&cp, &["identity", "list", "-l", "app in (web"], "invalid label selector")?;
        ctl_err(&cp, &["identity", "list", "--label", "app"], "expected source:key=value")?;
        ctl_err(&cp, &["endpoint", "get", "nope/nothing"], "endpoint nope/nothing not found")?;
        ctl_err(&cp, &["identity", "gc"], "no operator leader")?;
        ctl_err(&cp, &["kvstore", "get", "no/such/key"], "not found")?;
        ctl_err(&cp, &["kvstore", "status", "--kvstore-endpoint", "http://127.0.0.1:1"], "cannot reach etcd")?;
        let dead = cp.dir().join("dead.kubeconfig");
        let text = std::fs::read_to_string(&cp.kubeconfig)?.replace(&cp.server, "https://127.0.0.1:1");
        std::fs::write(&dead, text)?;
        let dead = dead.to_str().unwrap_or_default().to_string();
        ctl_err(&cp, &["status", "--kubeconfig", &dead], "cannot reach the API server at https://127.0.0.1:1")?;
        ctl_err(&cp, &["doctor", "--kubeconfig", "/nonexistent/kubeconfig"], "cannot read kubeconfig")?;

        // sysdump: one archive with the reports, the objects, the config and
        // the Events; a Secret in the Cilium namespace never goes in.
        let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "cilium-etcd-secrets", "namespace": "kube-system" },
            "stringData": { "password": "s3cr3t-sysdump-canary" }
        }))?;
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), "kube-system")
            .create(&Default::default(), &secret)
            .await?;
        let archive = cp.dir().join("dump.tar.gz");
        let archive_s = archive.to_str().unwrap_or_default().to_string();
        let out = ctl_ok(&cp, &["sysdump", "--output-file", &archive_s], 0)?;
        ensure!(out.contains("dump.tar.gz") && out.contains("files"), "{out}");
        let list = Command::new("tar").args(["-tzf", &archive_s]).output()?;
        let list = String::from_utf8_lossy(&list.stdout).into_owned();
        for want in [
            "/ciliumctl/doctor.txt",
            "/ciliumctl/doctor.json",
            "/ciliumctl/status.txt",
            "/ciliumctl/policy-selectors.json",
            "/objects/ciliumidentities.json",
            "/objects/ciliumendpoints.json",
            "/objects/ciliumnodes.json",
            "/config/cilium-config.json",
            "/events/kube-system.json",
            "/MANIFEST.txt",
        ] {
            ensure!(list.lines().any(|l| l.ends_with(want)), "sysdump lacks {want}:\n{list}");
        }
        let all = Command::new("tar").args(["-xzOf", &archive_s]).output()?;
        let all = String::from_utf8_lossy(&all.stdout).into_owned();
        ensure!(all.contains("pod CIDR pool exhausted"), "the doctor report is not in the archive");
        ensure!(
            all.contains(&format!("\"{web}\"")) || all.contains(&web.to_string()),
            "identity {web} not in the archive"
        );
        ensure!(!all.contains("s3cr3t-sysdump-canary"), "a Secret's value is in the sysdump");
        ensure!(all.contains("logs: no pod in kube-system matches"), "MANIFEST does not say why logs are missing");
        anyhow::Ok(())
    });
    result.map_err(|e| e.context(cp.log_tails(10)))
}
