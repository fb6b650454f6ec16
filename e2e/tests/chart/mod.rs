//! The Helm chart against the real API server: install, upgrade (and a
//! refused upgrade that changes nothing), uninstall; and RBAC least
//! privilege: the operator runs an IPAM + GC + endpoint scenario
//! authenticated as the chart's ServiceAccount (a TokenRequest token), with
//! its configuration from the rendered `cilium-config`, and the audit log
//! shows zero 403s; with one rule removed, the duty that needs it fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};
use cilium_crds::{CiliumEndpoint, CiliumIdentity, CiliumNode};
use cilium_identity::Labels;
use cilium_identity_alloc::crd::identity_object;
use e2e::{ControlPlane, Operator, Options, block_on, eventually, tools};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node};
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const OPERATOR_SA: &str = "system:serviceaccount:kube-system:cilium-operator";
const AGENT_SA: &str = "system:serviceaccount:kube-system:cilium";

fn chart() -> PathBuf {
    tools::workspace_root().join("charts/cilium")
}

fn run(cp: &ControlPlane, tool: &str, args: &[&str]) -> anyhow::Result<Output> {
    Command::new(tools::tool(tool)?)
        .args(args)
        .env("KUBECONFIG", &cp.kubeconfig)
        .env("HELM_CACHE_HOME", cp.dir().join("helm-cache"))
        .env("HELM_CONFIG_HOME", cp.dir().join("helm-config"))
        .env("HELM_DATA_HOME", cp.dir().join("helm-data"))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {tool}"))
}

fn ok(cp: &ControlPlane, tool: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = run(cp, tool, args)?;
    ensure!(
        out.status.success(),
        "{tool} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn helm_install_upgrade_uninstall(_shared: &ControlPlane) -> anyhow::Result<()> {
    let cp = ControlPlane::start(Options::default())?;
    let chart = chart();
    let chart = chart.to_str().unwrap_or_default();
    let result = block_on(async {
        let client = cp.client().await?;
        ok(
            &cp,
            "helm",
            &[
                "install",
                "cilium",
                chart,
                "-n",
                "kube-system",
                "--set",
                "ipam.operator.clusterPoolIPv4PodCIDRList={10.50.0.0/16}",
            ],
        )?;
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), "kube-system");
        let d = deploys.get("cilium-operator").await?;
        ensure!(d.spec.as_ref().and_then(|s| s.replicas) == Some(2), "default replicas: {:?}", d.spec);
        let ds = Api::<DaemonSet>::namespaced(client.clone(), "kube-system").get("cilium").await?;
        // The agent accepts every flag the chart gives it, serves the CNI
        // plugin and writes the conflist where the runtime reads it; the
        // plugin is installed on the node by an init container.
        let pod = ds.spec.and_then(|s| s.template.spec).context("DaemonSet pod spec")?;
        let agent = pod.containers.iter().find(|c| c.name == "cilium-agent").context("cilium-agent container")?;
        let args = agent.args.clone().unwrap_or_default();
        let help = Command::new(tools::workspace_bin("cilium-node-agent")?).args(&args).arg("--help").output()?;
        ensure!(
            help.status.success(),
            "the agent refuses the chart's flags {args:?}: {}",
            String::from_utf8_lossy(&help.stderr)
        );
        ensure!(
            args.iter().any(|a| a == "--cni")
                && args.iter().any(|a| a == "--write-cni-conf-when-ready=/host/etc/cni/net.d/05-cilium.conflist"),
            "agent flags: {args:?}"
        );
        let mounted = |c: &k8s_openapi::api::core::v1::Container, volume: &str, at: &str| {
            c.volume_mounts.iter().flatten().any(|m| m.name == volume && m.mount_path == at)
        };
        let host_path = |volume: &str| {
            pod.volumes
                .iter()
                .flatten()
                .find(|v| v.name == volume)
                .and_then(|v| Some(v.host_path.as_ref()?.path.clone()))
        };
        let install = pod.init_containers.iter().flatten().find(|c| c.name == "install-cni-binaries");
        ensure!(
            install.is_some_and(|c| mounted(c, "cni-path", "/host/opt/cni/bin"))
                && mounted(agent, "etc-cni-netd", "/host/etc/cni/net.d")
                && host_path("cni-path").as_deref() == Some("/opt/cni/bin")
                && host_path("etc-cni-netd").as_deref() == Some("/etc/cni/net.d"),
            "CNI install: init containers {:?}, volumes {:?}",
            pod.init_containers,
            pod.volumes
        );
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
        let data = cms.get("cilium-config").await?.data.unwrap_or_default();
        ensure!(data.get("cluster-pool-ipv4-cidr").map(String::as_str) == Some("10.50.0.0/16"), "{data:?}");
        ensure!(data.get("identity-allocation-mode").map(String::as_str) == Some("crd"), "{data:?}");
        // The CRDs come from the chart's crds/ directory.
        ok(&cp, "kubectl", &["get", "crd", "ciliumidentities.cilium.io", "ciliumnodes.cilium.io"])?;
        // The rendered ConfigMap is one the operator accepts (same parser).
        let ctl = Command::new(tools::workspace_bin("ciliumctl")?)
            .args(["doctor", "-o", "json"])
            .env("KUBECONFIG", &cp.kubeconfig)
            .output()?;
        let findings: Vec<Value> = serde_json::from_slice(&ctl.stdout)
            .with_context(|| format!("ciliumctl doctor: {}", String::from_utf8_lossy(&ctl.stderr)))?;
        let config = findings.iter().find(|f| f["check"] == "config").context("config finding")?;
        ensure!(
            config["severity"] == "ok"
                && config["summary"].as_str().unwrap_or("").contains("kube-system/cilium-config"),
            "{config}"
        );

        ok(
            &cp,
            "helm",
            &[
                "upgrade",
                "cilium",
                chart,
                "-n",
                "kube-system",
                "--reuse-values",
                "--set",
                "operator.replicas=1",
                "--set",
                "operator.identityGCInterval=10m",
                "--set",
                "operator.podDisruptionBudget.enabled=true",
            ],
        )?;
        let d = deploys.get("cilium-operator").await?;
        ensure!(d.spec.as_ref().and_then(|s| s.replicas) == Some(1), "upgraded replicas: {:?}", d.spec);
        let data = cms.get("cilium-config").await?.data.unwrap_or_default();
        ensure!(data.get("identity-gc-interval").map(String::as_str) == Some("10m"), "{data:?}");
        let pdb = ok(
            &cp,
            "kubectl",
            &["get", "poddisruptionbudgets.v1.policy", "-n", "kube-system", "cilium-operator", "-o", "name"],
        )?;
        ensure!(pdb.contains("cilium-operator"), "{pdb}");

        // A bad value is refused by the schema with a readable message, and
        // the release is left as it was.
        let out = run(
            &cp,
            "helm",
            &[
                "upgrade",
                "cilium",
                chart,
                "-n",
                "kube-system",
                "--reuse-values",
                "--set",
                "identityAllocationMode=etcd",
            ],
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("identityAllocationMode"),
            "bad value accepted or unclear: {err}"
        );
        let history = ok(&cp, "helm", &["history", "cilium", "-n", "kube-system", "-o", "json"])?;
        let history: Vec<Value> = serde_json::from_str(&history)?;
        ensure!(history.len() == 2 && history[1]["status"] == "deployed", "{history:?}");
        let data = cms.get("cilium-config").await?.data.unwrap_or_default();
        ensure!(data.get("identity-allocation-mode").map(String::as_str) == Some("crd"), "{data:?}");

        ok(&cp, "helm", &["uninstall", "cilium", "-n", "kube-system"])?;
        ensure!(deploys.get_opt("cilium-operator").await?.is_none(), "operator Deployment left behind");
        ensure!(cms.get_opt("cilium-config").await?.is_none(), "cilium-config left behind");
        // Helm never deletes CRDs (nor the identities in them).
        ok(&cp, "kubectl", &["get", "crd", "ciliumidentities.cilium.io"])?;
        anyhow::Ok(())
    });
    result.map_err(|e| e.context(cp.log_tails(10)))
}

/// Audit entries of `user`: (all, refused with 403).
fn audit(cp: &ControlPlane, user: &str) -> anyhow::Result<(Vec<Value>, Vec<Value>)> {
    let text = std::fs::read_to_string(cp.audit_log()).context("reading the audit log")?;
    let mine: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["user"]["username"] == user && e["stage"] == "ResponseComplete")
        .collect();
    let refused = mine.iter().filter(|e| e["responseStatus"]["code"] == 403).cloned().collect();
    Ok((mine, refused))
}

fn describe(e: &Value) -> String {
    format!(
        "{} {}/{} {}",
        e["verb"].as_str().unwrap_or("?"),
        e["objectRef"]["resource"].as_str().unwrap_or("?"),
        e["objectRef"]["subresource"].as_str().unwrap_or(""),
        e["objectRef"]["name"].as_str().unwrap_or("")
    )
}

/// Writes the data of ConfigMap `cilium-config` as files, the way the
/// Deployment mounts it.
async fn mount_config(client: &kube::Client, dir: &Path) -> anyhow::Result<()> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), "kube-system").get("cilium-config").await?;
    std::fs::create_dir_all(dir)?;
    for (k, v) in cm.data.unwrap_or_default() {
        std::fs::write(dir.join(k), v)?;
    }
    Ok(())
}

pub fn rbac_least_privilege(_shared: &ControlPlane) -> anyhow::Result<()> {
    let cp = ControlPlane::start(Options { audit: true, ..Default::default() })?;
    let chart = chart();
    let chart = chart.to_str().unwrap_or_default();
    let result = block_on(async {
        let client = cp.client().await?;
        ok(
            &cp,
            "helm",
            &[
                "install",
                "cilium",
                chart,
                "-n",
                "kube-system",
                "--set",
                "ipam.operator.clusterPoolIPv4PodCIDRList={10.60.0.0/24}",
                "--set",
                "operator.identityGCInterval=2s",
                "--set",
                "operator.identityHeartbeatTimeout=1s",
                "--set",
                "operator.endpointGCInterval=2s",
                "--set",
                "operator.nodeGCInterval=2s",
                "--set",
                "operator.unmanagedPodWatcher.intervalSeconds=1",
            ],
        )?;
        let token = ok(&cp, "kubectl", &["create", "token", "cilium-operator", "-n", "kube-system", "--duration=2h"])?;
        let kubeconfig = cp.token_kubeconfig("cilium-operator", token.trim())?;
        let config_dir = cp.dir().join("cilium-config");
        mount_config(&client, &config_dir).await?;
        let mut op = Operator::start_with(
            &cp,
            "operator-rbac",
            "kube-system",
            &kubeconfig,
            &[format!("--config-dir={}", config_dir.display())],
        )?;
        op.wait_healthy(Duration::from_secs(60))?;
        eventually("leadership as the ServiceAccount", Duration::from_secs(20), || async {
            Ok(op.is_leader().then_some(()))
        })
        .await?;

        // IPAM: n1 gets the only /24; n2 finds the pool exhausted (status
        // error + Event).
        let pp = PostParams::default();
        let nodes: Api<Node> = Api::all(client.clone());
        let cnodes: Api<CiliumNode> = Api::all(client.clone());
        for n in ["n1", "n2"] {
            nodes.create(&pp, &crate::ipam::node(n)).await?;
            cnodes.create(&pp, &crate::ipam::cilium_node(n, &[])).await?;
        }
        // Node duties: n1 carries the agent-not-ready taint and its agent
        // pod is Ready (taint removed, CiliumIsUp set); a kube-dns pod
        // without an endpoint is restarted.
        let taint = json!([{ "key": "node.cilium.io/agent-not-ready", "effect": "NoExecute" }]);
        nodes.patch("n1", &PatchParams::default(), &Patch::Merge(json!({ "spec": { "taints": taint } }))).await?;
        crate::nodes::pod(&client, "kube-system", "cilium-n1", Some("n1"), json!({ "k8s-app": "cilium" }), true)
            .await?;
        crate::nodes::set_status(&client, "kube-system", "cilium-n1", true, Duration::from_secs(5)).await?;
        crate::nodes::pod(&client, "kube-system", "dns-1", None, json!({ "k8s-app": "kube-dns" }), false).await?;
        crate::nodes::set_status(&client, "kube-system", "dns-1", true, Duration::from_secs(120)).await?;
        let kpods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), "kube-system");
        // CiliumNode GC: a CiliumNode without a Node goes away.
        cnodes.create(&pp, &crate::ipam::cilium_node("gone", &[])).await?;
        // Endpoint GC: a CEP whose owner Pod does not exist goes away.
        let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": "rbac" } }))?;
        Api::<Namespace>::all(client.clone()).create(&pp, &ns).await?;
        let ceps: Api<CiliumEndpoint> = Api::namespaced(client.clone(), "rbac");
        let cep: CiliumEndpoint = serde_json::from_value(json!({
            "metadata": { "name": "orphan", "namespace": "rbac", "ownerReferences": [{
                "apiVersion": "v1", "kind": "Pod", "name": "orphan", "uid": "00000000-0000-0000-0000-000000000001" }] },
            "status": { "identity": { "id": 5000 }, "state": "ready" }
        }))?;
        ceps.create(&pp, &cep).await?;
        // Identity GC: an unused identity is marked, then deleted.
        let ids: Api<CiliumIdentity> = Api::all(client.clone());
        ids.create(&pp, &identity_object(5001, &Labels::from_k8s("rbac", [("app", "unused")]))).await?;

        eventually("the scenario to play out", Duration::from_secs(60), || async {
            let n1 = cnodes.get("n1").await?;
            let n2 = cnodes.get("n2").await?;
            let exhausted = format!("{:?}", n2.status).contains("allocator full");
            let done = !n1.pod_cidrs().is_empty()
                && exhausted
                && cnodes.get_opt("gone").await?.is_none()
                && ceps.get_opt("orphan").await?.is_none()
                && ids.get_opt("5001").await?.is_none();
            let n1_node = nodes.get("n1").await?;
            let marked = crate::nodes::taints(&n1_node).is_empty() && crate::nodes::cilium_is_up(&n1_node);
            let restarted = kpods.get_opt("dns-1").await?.is_none();
            Ok((done && marked && restarted).then_some(()))
        })
        .await?;
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(client.clone());
        eventually("a PodCIDRPoolExhausted Event", Duration::from_secs(10), || async {
            Ok(events
                .list(&Default::default())
                .await?
                .items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("PodCIDRPoolExhausted")))
        })
        .await?;
        // On-demand GC goes through the ConfigMap the operator may read/patch.
        let ctl = Command::new(tools::workspace_bin("ciliumctl")?)
            .args(["identity", "gc"])
            .env("KUBECONFIG", &cp.kubeconfig)
            .output()?;
        ensure!(ctl.status.success(), "ciliumctl identity gc: {}", String::from_utf8_lossy(&ctl.stderr));

        let (all, refused) = audit(&cp, OPERATOR_SA)?;
        ensure!(all.len() >= 30, "only {} audited requests by {OPERATOR_SA}: is the audit log working?", all.len());
        ensure!(
            refused.is_empty(),
            "{} of {} requests refused:\n{}",
            refused.len(),
            all.len(),
            refused.iter().map(describe).collect::<Vec<_>>().join("\n")
        );
        let verbs: std::collections::BTreeSet<String> =
            all.iter().map(describe).map(|d| d.rsplit_once(' ').map(|(a, _)| a.to_string()).unwrap_or(d)).collect();
        eprintln!("rbac: {} requests by {OPERATOR_SA}, 0 refused; verb/resource pairs used: {verbs:?}", all.len());

        // Remove the ciliumidentities rule: identity GC must fail (403) and
        // leave the unused identity in place.
        let roles: Api<ClusterRole> = Api::all(client.clone());
        let mut role = roles.get("cilium-operator").await?;
        let rules = role.rules.take().unwrap_or_default();
        let before = rules.len();
        let kept: Vec<_> = rules
            .into_iter()
            .filter(|r| r.resources.as_deref() != Some(&["ciliumidentities".to_string()][..]))
            .collect();
        ensure!(kept.len() + 1 == before, "the chart has no single ciliumidentities rule");
        role.rules = Some(kept);
        roles.replace("cilium-operator", &pp, &role).await?;
        ids.create(&pp, &identity_object(5002, &Labels::from_k8s("rbac", [("app", "kept")]))).await?;
        eventually("a 403 on ciliumidentities", Duration::from_secs(30), || async {
            let (_, refused) = audit(&cp, OPERATOR_SA)?;
            Ok(refused.iter().find(|e| e["objectRef"]["resource"] == "ciliumidentities").map(|_| ()))
        })
        .await?;
        eventually("a failed identity GC run", Duration::from_secs(20), || async {
            Ok((op
                .metric("cilium_operator_identity_gc_runs_total{outcome=\"failure\",identity_type=\"crd\"}")
                .unwrap_or(0.0)
                >= 1.0)
                .then_some(()))
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        ensure!(ids.get_opt("5002").await?.is_some(), "identity 5002 deleted without the right to");
        let (_, refused) = audit(&cp, OPERATOR_SA)?;
        ensure!(
            refused.iter().all(|e| e["objectRef"]["resource"] == "ciliumidentities"),
            "other refusals: {:?}",
            refused.iter().map(describe).collect::<Vec<_>>()
        );
        ensure!(op.proc.try_exit().is_none(), "the operator died on a 403:\n{}", op.proc.log_text());

        // The agent as the chart's `cilium` ServiceAccount: node
        // registration, a pod's endpoint (identity, CiliumEndpoint, Pod
        // status), a policy, with zero 403s.
        let token = ok(&cp, "kubectl", &["create", "token", "cilium", "-n", "kube-system", "--duration=2h"])?;
        let agent_kubeconfig = cp.token_kubeconfig("cilium", token.trim())?;
        let prefix = format!("rb{}", std::process::id() % 10000);
        let _cleanup = e2e::netns::Cleanup::new(prefix.clone());
        let mut agent = e2e::Agent::start_with(
            &cp,
            "n1",
            "192.168.211.11/24",
            &prefix,
            &agent_kubeconfig,
            &[format!("--config-dir={}", config_dir.display())],
        )?;
        agent.wait_ready(Duration::from_secs(60))?;
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), "rbac");
        let pod = |name: &str| -> anyhow::Result<k8s_openapi::api::core::v1::Pod> {
            Ok(serde_json::from_value(json!({
                "metadata": { "name": name, "namespace": "rbac", "labels": { "app": name } },
                "spec": { "nodeName": "n1", "containers": [{ "name": "c", "image": "busybox" }] }
            }))?)
        };
        pods.create(&pp, &pod("web")?).await?;
        let policy: cilium_crds::policy::CiliumNetworkPolicy = serde_json::from_value(json!({
            "metadata": { "name": "web", "namespace": "rbac" },
            "spec": { "endpointSelector": { "matchLabels": { "app": "web" } },
                      "ingress": [{ "fromEndpoints": [{ "matchLabels": { "app": "client" } }] }] }
        }))?;
        Api::<cilium_crds::policy::CiliumNetworkPolicy>::namespaced(client.clone(), "rbac")
            .create(&pp, &policy)
            .await?;
        eventually("the web endpoint, enforcing ingress", Duration::from_secs(30), || async {
            let Some(c) = ceps.get_opt("web").await? else { return Ok(None) };
            let enforcing = c.status.and_then(|s| s.policy).and_then(|p| p.ingress).is_some_and(|i| i.enforcing);
            Ok(enforcing.then_some(()))
        })
        .await
        .map_err(|e| e.context(agent.proc.log_text()))?;
        eventually("the Pod status written by the agent", Duration::from_secs(10), || async {
            Ok(pods.get("web").await?.status.and_then(|s| s.pod_ip).map(|_| ()))
        })
        .await?;
        let (all, refused) = audit(&cp, AGENT_SA)?;
        ensure!(all.len() >= 10, "only {} audited requests by {AGENT_SA}", all.len());
        ensure!(
            refused.is_empty(),
            "{} of {} agent requests refused:\n{}",
            refused.len(),
            all.len(),
            refused.iter().map(describe).collect::<Vec<_>>().join("\n")
        );
        let verbs: std::collections::BTreeSet<String> =
            all.iter().map(describe).map(|d| d.rsplit_once(' ').map(|(a, _)| a.to_string()).unwrap_or(d)).collect();
        eprintln!("rbac: {} requests by {AGENT_SA}, 0 refused; verb/resource pairs used: {verbs:?}", all.len());

        // Without its ciliumendpoints rule the agent cannot publish a new
        // endpoint: 403, and no CiliumEndpoint appears.
        let mut role = roles.get("cilium").await?;
        let rules = role.rules.take().unwrap_or_default();
        let before = rules.len();
        let kept: Vec<_> = rules
            .into_iter()
            .filter(|r| r.resources.as_deref() != Some(&["ciliumendpoints".to_string()][..]))
            .collect();
        ensure!(kept.len() + 1 == before, "the chart has no single ciliumendpoints rule for the agent");
        role.rules = Some(kept);
        roles.replace("cilium", &pp, &role).await?;
        pods.create(&pp, &pod("db")?).await?;
        eventually("a 403 on ciliumendpoints for the agent", Duration::from_secs(30), || async {
            let (_, refused) = audit(&cp, AGENT_SA)?;
            Ok(refused.iter().find(|e| e["objectRef"]["resource"] == "ciliumendpoints").map(|_| ()))
        })
        .await?;
        ensure!(ceps.get_opt("db").await?.is_none(), "a CiliumEndpoint was written without the right to");
        ensure!(agent.proc.try_exit().is_none(), "the agent died on a 403:\n{}", agent.proc.log_text());
        anyhow::Ok(())
    });
    result.map_err(|e| e.context(cp.log_tails(10)))
}
