//! The node agent and its eBPF datapath with real packets: two simulated
//! nodes (network namespaces joined by a fabric namespace), pods behind
//! them, CiliumNetworkPolicies applied with kubectl, TCP connections between
//! the pods' namespaces allowed or dropped by our programs in the kernel.
//! Needs root (namespaces, BPF), like the agent.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use cilium_crds::CiliumEndpoint;
use e2e::netns::{Cleanup, can_connect, external_host, serve};
use e2e::{Agent, ControlPlane, Operator, Options, block_on, eventually};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use serde_json::json;

const WAIT: Duration = Duration::from_millis(700);

pub struct Cluster {
    pub cp: ControlPlane,
    pub prefix: String,
    pub operator: Operator,
    pub agents: BTreeMap<String, Agent>,
    pub node_ips: BTreeMap<String, Ipv4Addr>,
    _cleanup: Cleanup,
}

/// A control plane, the operator, and one agent per node.
pub fn cluster(tag: &str, nodes: &[&str]) -> anyhow::Result<Cluster> {
    cluster_with(tag, nodes, |_| (Vec::new(), Vec::new()))
}

/// Like [`cluster`], with extra operator and agent flags made from the
/// control plane (e.g. its etcd address).
pub fn cluster_with(
    tag: &str,
    nodes: &[&str],
    flags: impl Fn(&ControlPlane) -> (Vec<String>, Vec<String>),
) -> anyhow::Result<Cluster> {
    let cp = ControlPlane::start(Options::default())?;
    let prefix = format!("{tag}{}", std::process::id() % 10000);
    let cleanup = Cleanup::new(prefix.clone());
    let (mut op_flags, agent_flags) = flags(&cp);
    op_flags.push("--cluster-pool-ipv4-cidr=10.200.0.0/16".into());
    let mut operator = Operator::start(&cp, &format!("operator-{tag}"), "kube-system", &op_flags)?;
    operator.wait_healthy(Duration::from_secs(60))?;
    block_on(async {
        let client = cp.client().await?;
        for n in nodes {
            let node: Node = serde_json::from_value(json!({ "metadata": { "name": n } }))?;
            Api::<Node>::all(client.clone()).create(&PostParams::default(), &node).await?;
        }
        anyhow::Ok(())
    })?;
    let mut agents = BTreeMap::new();
    let mut node_ips = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        let ip = Ipv4Addr::new(192, 168, 210, 11 + i as u8);
        node_ips.insert(n.to_string(), ip);
        agents.insert(n.to_string(), Agent::start(&cp, n, &format!("{ip}/24"), &prefix, &agent_flags)?);
    }
    for a in agents.values_mut() {
        a.wait_ready(Duration::from_secs(60))?;
    }
    Ok(Cluster { cp, prefix, operator, agents, node_ips, _cleanup: cleanup })
}

impl Cluster {
    pub fn pod_ns(&self, node: &str, ns: &str, pod: &str) -> String {
        format!("{}-{node}-{ns}-{pod}", self.prefix)
    }

    /// Creates a pod bound to `node` and waits for its ready endpoint; its IP.
    pub async fn pod(&self, node: &str, name: &str, labels: serde_json::Value) -> anyhow::Result<Ipv4Addr> {
        self.pod_with(node, "default", name, labels, json!([])).await
    }

    /// Like [`Cluster::pod`], in namespace `ns`, with container `ports`.
    pub async fn pod_with(
        &self,
        node: &str,
        ns: &str,
        name: &str,
        labels: serde_json::Value,
        ports: serde_json::Value,
    ) -> anyhow::Result<Ipv4Addr> {
        self.pod_sa(node, ns, name, labels, ports, None).await
    }

    /// Like [`Cluster::pod_with`], running as service account `sa`.
    pub async fn pod_sa(
        &self,
        node: &str,
        ns: &str,
        name: &str,
        labels: serde_json::Value,
        ports: serde_json::Value,
        sa: Option<&str>,
    ) -> anyhow::Result<Ipv4Addr> {
        let client = self.cp.client().await?;
        let mut spec = json!({ "nodeName": node, "containers": [{ "name": "app", "image": "docker.io/cilium/starwars", "ports": ports }] });
        if let Some(sa) = sa {
            spec["serviceAccountName"] = json!(sa);
        }
        let pod: Pod = serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": ns, "labels": labels },
            "spec": spec
        }))?;
        Api::<Pod>::namespaced(client.clone(), ns).create(&PostParams::default(), &pod).await?;
        let ceps: Api<CiliumEndpoint> = Api::namespaced(client, ns);
        eventually(&format!("endpoint of {name}"), Duration::from_secs(30), || async {
            let Some(c) = ceps.get_opt(name).await? else { return Ok(None) };
            let s = c.status.unwrap_or_default();
            let ready = s.state.is_some() && s.identity.as_ref().and_then(|i| i.id).is_some();
            let ip = s.networking.and_then(|n| n.addressing.first()?.ipv4.clone()).and_then(|i| i.parse().ok());
            Ok(ip.filter(|_| ready))
        })
        .await
        .map_err(|e| e.context(self.agent_logs()))
    }

    /// Runs `ciliumctl ARGS` against this cluster; its output, whatever
    /// the exit status.
    pub fn ciliumctl(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Ok(std::process::Command::new(e2e::tools::workspace_bin("ciliumctl")?)
            .args(args)
            .env("KUBECONFIG", &self.cp.kubeconfig)
            .stdin(Stdio::null())
            .output()?)
    }

    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<()> {
        let mut cmd = self.cp.kubectl()?;
        cmd.args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        if let Some(text) = stdin {
            use std::io::Write;
            child.stdin.take().context("stdin")?.write_all(text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        ensure!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    pub fn agent_logs(&self) -> String {
        self.agents.values().map(|a| format!("--- {}:\n{}", a.proc.name, tail(&a.proc.log_text(), 30))).collect()
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls `probe` until it says `want`.
pub fn expect_probe(
    c: &Cluster,
    what: &str,
    want: bool,
    timeout: Duration,
    probe: impl Fn() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    loop {
        if probe()? == want {
            return Ok(t0.elapsed());
        }
        ensure!(
            t0.elapsed() < timeout,
            "{what}: {} after {timeout:?}\n{}",
            if want { "still dropped" } else { "still allowed" },
            c.agent_logs()
        );
    }
}

/// Polls until `from -> ip:port` connects (`want` true) or not.
pub fn expect_conn(
    c: &Cluster,
    what: &str,
    from: &str,
    ip: impl Into<std::net::IpAddr>,
    port: u16,
    want: bool,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let ip = ip.into();
    let t0 = Instant::now();
    loop {
        let got = can_connect(from, ip, port, WAIT)?;
        if got == want {
            return Ok(t0.elapsed());
        }
        ensure!(
            t0.elapsed() < timeout,
            "{what}: connection {} after {timeout:?}\n{}",
            if want { "still dropped" } else { "still allowed" },
            c.agent_logs()
        );
    }
}

pub const RULE1: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: rule1
  namespace: default
spec:
  description: "L3-L4 policy to restrict deathstar access to empire ships only"
  endpointSelector:
    matchLabels:
      org: empire
      class: deathstar
  ingress:
  - fromEndpoints:
    - matchLabels:
        org: empire
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
"#;

/// The Star Wars demo's pods: the deathstar on node-a serving `ports`, the
/// tiefighter (org=empire) and the xwing (org=alliance) on node-b.
pub struct StarWars {
    pub deathstar: Ipv4Addr,
    /// Network namespaces of the two ships.
    pub tie: String,
    pub xwing: String,
    _servers: Vec<e2e::netns::Server>,
}

pub fn star_wars(c: &Cluster, ports: &[u16]) -> anyhow::Result<StarWars> {
    let deathstar = block_on(c.pod("node-a", "deathstar", json!({ "org": "empire", "class": "deathstar" })))?;
    block_on(c.pod("node-b", "tiefighter", json!({ "org": "empire", "class": "tiefighter" })))?;
    block_on(c.pod("node-b", "xwing", json!({ "org": "alliance", "class": "xwing" })))?;
    let ds_ns = c.pod_ns("node-a", "default", "deathstar");
    let servers = ports.iter().map(|p| serve(&ds_ns, *p)).collect::<anyhow::Result<Vec<_>>>()?;
    Ok(StarWars {
        deathstar,
        tie: c.pod_ns("node-b", "default", "tiefighter"),
        xwing: c.pod_ns("node-b", "default", "xwing"),
        _servers: servers,
    })
}

/// The Star Wars demo: tiefighter -> deathstar:80 allowed, xwing dropped;
/// removing the policy restores traffic; an agent restart (kill -9 and
/// start again) keeps enforcing throughout.
pub fn star_wars_policy_with_real_packets(_shared: &ControlPlane) -> anyhow::Result<()> {
    let mut c = cluster("sw", &["node-a", "node-b"])?;
    let result = (|| -> anyhow::Result<()> {
        let sw = star_wars(&c, &[80])?;
        let (deathstar, tie, xwing) = (sw.deathstar, sw.tie.clone(), sw.xwing.clone());
        let long = Duration::from_secs(20);
        expect_conn(&c, "tiefighter before any policy", &tie, deathstar, 80, true, long)?;
        expect_conn(&c, "xwing before any policy", &xwing, deathstar, 80, true, long)?;

        c.kubectl(&["apply", "-f", "-"], Some(RULE1))?;
        expect_conn(&c, "xwing under rule1", &xwing, deathstar, 80, false, long)?;
        expect_conn(&c, "tiefighter under rule1", &tie, deathstar, 80, true, long)?;
        // `ciliumctl policy selectors`: rule1's peer selector selects the
        // two empire ships' identities.
        let out = c.ciliumctl(&["policy", "selectors", "-o", "json"])?;
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("policy selectors: {}", String::from_utf8_lossy(&out.stderr)))?;
        let empire = rows
            .iter()
            .find(|r| r["selector"].as_str().is_some_and(|s| s.contains("org=empire")))
            .with_context(|| format!("no org=empire selector in {rows:?}"))?;
        ensure!(
            empire["identities"].as_array().map(Vec::len) == Some(2)
                && empire["policies"][0] == "CiliumNetworkPolicy default/rule1",
            "org=empire selector: {empire}"
        );
        // `ciliumctl policy trace` agrees with the packets and names the rule.
        for (src, want_code, want_text) in [
            ("default/tiefighter", 0, "CiliumNetworkPolicy default/rule1 rule 0 ingress[0]"),
            ("default/xwing", 2, "default deny by CiliumNetworkPolicy default/rule1"),
        ] {
            let out =
                c.ciliumctl(&["policy", "trace", "--src", src, "--dst", "default/deathstar", "--dport", "80/tcp"])?;
            let text = String::from_utf8_lossy(&out.stdout);
            ensure!(
                out.status.code() == Some(want_code) && text.contains(want_text),
                "ciliumctl policy trace {src} -> deathstar exited {:?} (want {want_code}), want {want_text:?}:\n{text}{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let m = c.agents["node-a"].metrics()?;
        ensure!(
            m.lines().any(|l| l.starts_with(
                "cilium_drop_count_total{endpoint=\"default/deathstar\",direction=\"INGRESS\",reason=\"not-allowed\"}"
            )),
            "no drop counter:\n{m}"
        );
        // Every metric the chart's Grafana dashboard queries exists: in the
        // operator's or an agent's scrape, or as a recording rule.
        let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            e2e::tools::workspace_root().join("charts/cilium/files/grafana-dashboard.json"),
        )?)?;
        let scraped = format!("{}\n{m}\n{}", c.operator.metrics()?, c.agents["node-b"].metrics()?);
        let rules =
            std::fs::read_to_string(e2e::tools::workspace_root().join("charts/cilium/files/prometheus-rules.yaml"))?;
        // The metric names in a PromQL expression.
        let names = |expr: &str| -> Vec<String> {
            expr.match_indices("cilium_")
                .map(|(i, _)| {
                    expr[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect()
                })
                .collect()
        };
        let mut checked = 0;
        for panel in dashboard["panels"].as_array().context("dashboard panels")? {
            for target in panel["targets"].as_array().into_iter().flatten() {
                for name in names(target["expr"].as_str().unwrap_or_default()) {
                    let name = name.as_str();
                    let known = if name.contains(':') {
                        rules.contains(&format!("record: {name}"))
                    } else {
                        scraped.contains(name.trim_end_matches("_total"))
                    };
                    ensure!(known, "dashboard panel {:?} queries {name}, which nothing exports", panel["title"]);
                    checked += 1;
                }
            }
        }
        ensure!(checked >= 8, "only {checked} metrics in the dashboard");
        // Map pressure for every map; the policy map holds rule1's entries.
        let pressure = |map: &str| {
            m.lines()
                .find_map(|l| l.strip_prefix(&format!("cilium_bpf_map_pressure{{map_name=\"{map}\"}} ")))
                .and_then(|v| v.parse::<f64>().ok())
        };
        for map in ["cilium_policy", "cilium_ipcache", "cilium_endpoints", "cilium_ct", "cilium_metrics"] {
            let p = pressure(map).with_context(|| format!("no cilium_bpf_map_pressure for {map}:\n{m}"))?;
            ensure!(p > 0.0 && p < 0.5, "{map} pressure {p}");
        }
        let cep: CiliumEndpoint = block_on(async {
            Ok::<_, anyhow::Error>(
                Api::<CiliumEndpoint>::namespaced(c.cp.client().await?, "default").get("deathstar").await?,
            )
        })?;
        let pol = cep.status.and_then(|s| s.policy).context("no policy status")?;
        ensure!(
            pol.ingress.is_some_and(|i| i.enforcing) && pol.egress.is_some_and(|e| !e.enforcing),
            "CEP policy status"
        );

        // The operator marks the policy Valid; a policy the schema accepts
        // but that cannot work is marked invalid with the reason.
        let bad = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: bad-except\n  namespace: default\nspec:\n  endpointSelector: {}\n  egress:\n  - toCIDRSet:\n    - cidr: 10.0.0.0/8\n      except:\n      - 192.168.0.0/16\n";
        c.kubectl(&["apply", "-f", "-"], Some(bad))?;
        block_on(async {
            let cnps: Api<cilium_crds::policy::CiliumNetworkPolicy> = Api::namespaced(c.cp.client().await?, "default");
            for (name, status, msg) in [
                ("rule1", "True", "Policy validation succeeded"),
                ("bad-except", "False", "does not contain exclude CIDR prefix"),
            ] {
                eventually(&format!("Valid={status} on {name}"), Duration::from_secs(15), || async {
                    let p = cnps.get(name).await?;
                    let cond = p
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .into_iter()
                        .find(|c| c.type_ == "Valid");
                    Ok(cond
                        .filter(|c| c.status == status && c.message.as_deref().is_some_and(|m| m.contains(msg)))
                        .map(|_| ()))
                })
                .await?;
            }
            anyhow::Ok(())
        })?;
        c.kubectl(&["delete", "ciliumnetworkpolicy", "bad-except", "-n", "default"], None)?;
        c.kubectl(&["delete", "ciliumnetworkpolicy", "rule1", "-n", "default"], None)?;
        expect_conn(&c, "xwing after the policy is removed", &xwing, deathstar, 80, true, long)?;

        // Restart: kill -9 the agent of the deathstar's node; enforcement
        // continues while it is down and after it is back.
        c.kubectl(&["apply", "-f", "-"], Some(RULE1))?;
        expect_conn(&c, "xwing under rule1 again", &xwing, deathstar, 80, false, long)?;
        let a = c.agents.get_mut("node-a").context("agent")?;
        a.proc.signal(libc::SIGKILL);
        a.proc.wait_exit(Duration::from_secs(5)).context("agent did not die")?;
        for _ in 0..3 {
            ensure!(!can_connect(&xwing, deathstar, 80, WAIT)?, "xwing got through while the agent was down");
            ensure!(
                can_connect(&tie, deathstar, 80, Duration::from_secs(2))?,
                "tiefighter dropped while the agent was down"
            );
        }
        let a = c.agents.get_mut("node-a").context("agent")?;
        a.respawn()?;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(4) {
            ensure!(
                !can_connect(&xwing, deathstar, 80, Duration::from_millis(300))?,
                "xwing got through during the agent restart"
            );
        }
        c.agents.get_mut("node-a").context("agent")?.wait_ready(Duration::from_secs(30))?;
        ensure!(!can_connect(&xwing, deathstar, 80, WAIT)?, "xwing got through after the restart");
        ensure!(can_connect(&tie, deathstar, 80, Duration::from_secs(2))?, "tiefighter dropped after the restart");
        // Same address after the restart.
        let again = block_on(c.pod_ip("deathstar"))?;
        ensure!(again == deathstar, "deathstar moved from {deathstar} to {again}");

        // A label change moves the xwing to a new identity: now an empire
        // ship, it may land.
        let old_id = block_on(c.identity_of("xwing"))?;
        c.kubectl(&["label", "pod", "xwing", "-n", "default", "org=empire", "--overwrite"], None)?;
        expect_conn(&c, "xwing relabelled org=empire", &xwing, deathstar, 80, true, long)?;
        let new_id = block_on(c.identity_of("xwing"))?;
        ensure!(new_id != old_id, "xwing kept identity {old_id} after its labels changed");

        // Deleting a pod tears its endpoint down and releases its address.
        let tie_ip = block_on(c.pod_ip("tiefighter"))?;
        c.kubectl(&["delete", "pod", "tiefighter", "-n", "default", "--wait=false"], None)?;
        block_on(async {
            let ceps: Api<CiliumEndpoint> = Api::namespaced(c.cp.client().await?, "default");
            eventually("the tiefighter's endpoint gone", Duration::from_secs(20), || async {
                Ok((ceps.get_opt("tiefighter").await?.is_none() && !e2e::netns::exists(&tie)).then_some(()))
            })
            .await
        })?;
        let reused = block_on(c.pod("node-b", "tiefighter-2", json!({ "org": "empire", "class": "tiefighter" })))?;
        ensure!(reused == tie_ip, "the released address {tie_ip} was not reused (got {reused})");
        Ok(())
    })();
    result.map_err(|e| e.context(c.cp.log_tails(5)))
}

impl Cluster {
    pub async fn identity_of(&self, name: &str) -> anyhow::Result<i64> {
        let c = Api::<CiliumEndpoint>::namespaced(self.cp.client().await?, "default").get(name).await?;
        c.status.and_then(|s| s.identity).and_then(|i| i.id).context("no identity")
    }

    pub async fn pod_ip(&self, name: &str) -> anyhow::Result<Ipv4Addr> {
        let p = Api::<Pod>::namespaced(self.cp.client().await?, "default").get(name).await?;
        Ok(p.status.and_then(|s| s.pod_ip).context("no podIP")?.parse()?)
    }
}

fn policy(kind: &str, name: &str, spec: &str) -> String {
    let ns = if kind == "CiliumNetworkPolicy" { "\n  namespace: default" } else { "" };
    format!("apiVersion: cilium.io/v2\nkind: {kind}\nmetadata:\n  name: {name}{ns}\nspec:\n{spec}")
}

/// Egress, deny, CIDR, entities (cluster, world, host) and matchExpressions, each applied with
/// kubectl and checked with real connections; an L7 rule is enforced at L4
/// and reported as not enforced at L7 in the CEP status and an Event.
pub fn egress_deny_cidr_entities_expressions(_shared: &ControlPlane) -> anyhow::Result<()> {
    let c = cluster("dp", &["node-a", "node-b"])?;
    let result = (|| -> anyhow::Result<()> {
        let sw = star_wars(&c, &[80, 8080])?;
        let (ds, tie, xwing) = (sw.deathstar, sw.tie.clone(), sw.xwing.clone());
        let via = c.node_ips["node-a"];
        let route = vec![(format!("{ds}/32"), via)];
        let ext1 = external_host(&c.prefix, "ext1", "192.168.210.100/24", &route)?;
        let ext2 = external_host(&c.prefix, "ext2", "192.168.210.101/24", &route)?;
        let t = Duration::from_secs(20);
        expect_conn(&c, "ext1 before any policy", &ext1, ds, 80, true, t)?;

        // Egress: the xwing may only reach the deathstar on 80.
        let spec = "  endpointSelector:\n    matchLabels:\n      class: xwing\n  egress:\n  - toEndpoints:\n    - matchLabels:\n        class: deathstar\n    toPorts:\n    - ports:\n      - port: \"80\"\n        protocol: TCP\n";
        c.kubectl(&["apply", "-f", "-"], Some(&policy("CiliumNetworkPolicy", "xwing-egress", spec)))?;
        expect_conn(&c, "egress: xwing -> deathstar:8080", &xwing, ds, 8080, false, t)?;
        expect_conn(&c, "egress: xwing -> deathstar:80", &xwing, ds, 80, true, t)?;
        expect_conn(&c, "egress: tiefighter -> deathstar:8080 (not selected)", &tie, ds, 8080, true, t)?;
        c.kubectl(&["delete", "cnp", "xwing-egress", "-n", "default"], None)?;
        expect_conn(&c, "egress policy removed", &xwing, ds, 8080, true, t)?;

        // Deny wins: allow all, deny tiefighters (clusterwide policy).
        let spec = "  endpointSelector:\n    matchLabels:\n      class: deathstar\n  ingress:\n  - fromEntities:\n    - all\n  ingressDeny:\n  - fromEndpoints:\n    - matchLabels:\n        class: tiefighter\n";
        c.kubectl(&["apply", "-f", "-"], Some(&policy("CiliumClusterwideNetworkPolicy", "deny-tie", spec)))?;
        expect_conn(&c, "deny: tiefighter", &tie, ds, 80, false, t)?;
        expect_conn(&c, "deny: xwing (allowed by all)", &xwing, ds, 80, true, t)?;
        expect_conn(&c, "deny: ext1 (allowed by all)", &ext1, ds, 80, true, t)?;
        c.kubectl(&["delete", "ccnp", "deny-tie"], None)?;
        expect_conn(&c, "deny policy removed", &tie, ds, 80, true, t)?;

        // CIDR and the cluster entity.
        let spec = "  endpointSelector:\n    matchLabels:\n      class: deathstar\n  ingress:\n  - fromCIDR:\n    - 192.168.210.100/32\n  - fromEntities:\n    - cluster\n";
        c.kubectl(&["apply", "-f", "-"], Some(&policy("CiliumNetworkPolicy", "cidr", spec)))?;
        expect_conn(&c, "cidr: ext2 outside the CIDR", &ext2, ds, 80, false, t)?;
        expect_conn(&c, "cidr: ext1 inside the CIDR", &ext1, ds, 80, true, t)?;
        expect_conn(&c, "cidr: tiefighter (cluster entity)", &tie, ds, 80, true, t)?;
        // The world entity instead: outside in, cluster out.
        let spec = "  endpointSelector:\n    matchLabels:\n      class: deathstar\n  ingress:\n  - fromEntities:\n    - world\n";
        c.kubectl(&["apply", "-f", "-"], Some(&policy("CiliumNetworkPolicy", "cidr", spec)))?;
        expect_conn(&c, "world: tiefighter", &tie, ds, 80, false, t)?;
        expect_conn(&c, "world: ext2", &ext2, ds, 80, true, t)?;
        expect_conn(&c, "world: ext1", &ext1, ds, 80, true, t)?;
        c.kubectl(&["delete", "cnp", "cidr", "-n", "default"], None)?;

        // The host entity: the deathstar's own node may reach it, nobody else.
        let spec = "  endpointSelector:\n    matchLabels:\n      class: deathstar\n  ingress:\n  - fromEntities:\n    - host\n";
        c.kubectl(&["apply", "-f", "-"], Some(&policy("CiliumNetworkPolicy", "host", spec)))?;
        let node_a = format!("{}-node-a", c.prefix);
        expect_conn(&c, "host: tiefighter", &tie, ds, 80, false, t)?;
        expect_conn(&c, "host: node-a itself", &node_a, ds, 80, true, t)?;
        c.kubectl(&["delete", "cnp", "host", "-n", "default"], None)?;

        // matchExpressions on both sides.
        let spec = "  endpointSelector:\n    matchExpressions:\n    - key: class\n      operator: In\n      values: [deathstar]\n  ingress:\n  - fromEndpoints:\n    - matchExpressions:\n      - key: org\n        operator: NotIn\n        values: [alliance]\n";
        c.kubectl(&["apply", "-f", "-"], Some(&policy("CiliumNetworkPolicy", "expr", spec)))?;
        expect_conn(&c, "expressions: xwing", &xwing, ds, 80, false, t)?;
        expect_conn(&c, "expressions: tiefighter", &tie, ds, 8080, true, t)?;
        c.kubectl(&["delete", "cnp", "expr", "-n", "default"], None)?;

        // L7: enforced at L4, reported as not enforced at L7.
        let spec = "  endpointSelector:\n    matchLabels:\n      class: deathstar\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        org: empire\n    toPorts:\n    - ports:\n      - port: \"80\"\n        protocol: TCP\n      rules:\n        http:\n        - method: POST\n          path: /v1/request-landing\n";
        c.kubectl(&["apply", "-f", "-"], Some(&policy("CiliumNetworkPolicy", "rule-l7", spec)))?;
        expect_conn(&c, "l7: xwing", &xwing, ds, 80, false, t)?;
        expect_conn(&c, "l7: tiefighter on 80", &tie, ds, 80, true, t)?;
        block_on(async {
            let client = c.cp.client().await?;
            let ceps: Api<CiliumEndpoint> = Api::namespaced(client.clone(), "default");
            eventually("the L7 note in the CEP status", Duration::from_secs(10), || async {
                let cep = ceps.get("deathstar").await?;
                let log = serde_json::to_string(&cep.status.and_then(|s| s.log))?;
                Ok(log.contains("HTTP rules on port 80 are not enforced").then_some(()))
            })
            .await?;
            let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client, "default");
            eventually("a PolicyNotEnforced Event", Duration::from_secs(10), || async {
                let list = events.list(&Default::default()).await?;
                Ok(list.items.into_iter().find(|e| e.reason.as_deref() == Some("PolicyNotEnforced")))
            })
            .await?;
            anyhow::Ok(())
        })?;
        let _ = &c.operator;
        Ok(())
    })();
    result.map_err(|e| e.context(c.cp.log_tails(5)))
}

/// kvstore identity mode: the agents allocate in etcd (upstream key
/// layout, value keys under their node IP); policies work the same.
pub fn kvstore_mode_identities(_shared: &ControlPlane) -> anyhow::Result<()> {
    identities_in_etcd("kv", "kvstore")
}

/// Double-write mode (reading the CRDs): every identity is both a
/// CiliumIdentity and etcd keys, with the same ID.
pub fn doublewrite_mode_identities(_shared: &ControlPlane) -> anyhow::Result<()> {
    identities_in_etcd("dw", "doublewrite-readcrd")
}

fn identities_in_etcd(tag: &str, mode: &str) -> anyhow::Result<()> {
    let c = cluster_with(tag, &["node-a", "node-b"], |cp| {
        let kv = format!("--kvstore-opt=etcd.address={}", cp.etcd_endpoint);
        let m = format!("--identity-allocation-mode={mode}");
        (vec![m.clone(), "--kvstore=etcd".into(), kv], vec![m, format!("--kvstore-endpoint={}", cp.etcd_endpoint)])
    })?;
    let result = (|| -> anyhow::Result<()> {
        let sw = star_wars(&c, &[80])?;
        let (ds, tie, xwing) = (sw.deathstar, sw.tie.clone(), sw.xwing.clone());
        let t = Duration::from_secs(20);
        c.kubectl(&["apply", "-f", "-"], Some(RULE1))?;
        expect_conn(&c, &format!("{mode}: xwing"), &xwing, ds, 80, false, t)?;
        expect_conn(&c, &format!("{mode}: tiefighter"), &tie, ds, 80, true, t)?;
        // The deathstar's identity lives in etcd, with node-a's value key.
        let id = block_on(c.identity_of("deathstar"))?;
        block_on(async {
            let mut etcd = etcd_client::Client::connect([c.cp.etcd_endpoint.as_str()], None).await?;
            let key = cilium_identity_alloc::kvstore::id_key(id as u32);
            let labels = etcd.get(key.as_str(), None).await?;
            let labels = labels.kvs().first().context("no id key in etcd")?.value_str()?.to_string();
            ensure!(labels.contains("k8s:class=deathstar;"), "id/{id} holds {labels}");
            let value = format!("{}{}", cilium_identity_alloc::kvstore::value_prefix(&labels), c.node_ips["node-a"]);
            let v = etcd.get(value.as_str(), None).await?;
            ensure!(
                v.kvs().first().and_then(|kv| kv.value_str().ok()) == Some(id.to_string().as_str()),
                "no value key {value}"
            );
            let ids: Api<cilium_crds::CiliumIdentity> = Api::all(c.cp.client().await?);
            if mode == "kvstore" {
                ensure!(
                    ids.list(&Default::default()).await?.items.is_empty(),
                    "CiliumIdentities written in kvstore mode"
                );
            } else {
                let crd = ids.get(&id.to_string()).await.context("no CiliumIdentity for the etcd identity")?;
                ensure!(cilium_identity_alloc::crd::key_of(&crd) == labels, "CRD and etcd labels differ for {id}");
            }
            anyhow::Ok(())
        })?;
        Ok(())
    })();
    result.map_err(|e| e.context(c.cp.log_tails(5)))
}

fn cidr_group(api_version: &str, name: &str, zone: &str, cidrs: &[&str]) -> String {
    let list: Vec<String> = cidrs.iter().map(|c| format!("\"{c}\"")).collect();
    format!(
        "apiVersion: {api_version}\nkind: CiliumCIDRGroup\nmetadata:\n  name: {name}\n  labels:\n    zone: {zone}\nspec:\n  externalCIDRs: [{}]\n",
        list.join(", ")
    )
}

/// CiliumCIDRGroups (`cilium.io/v2alpha1` and `v2`) through the agents,
/// with real connections from hosts outside the cluster: `cidrGroupRef`
/// with an except, `cidrGroupSelector`, a group changed under a policy,
/// and a deny by group.
pub fn cidr_groups_select_external_hosts(_shared: &ControlPlane) -> anyhow::Result<()> {
    let c = cluster("ccg", &["node-a", "node-b"])?;
    let result = (|| -> anyhow::Result<()> {
        let sw = star_wars(&c, &[80])?;
        let ds = sw.deathstar;
        let route = vec![(format!("{ds}/32"), c.node_ips["node-a"])];
        let ext1 = external_host(&c.prefix, "ext1", "192.168.210.100/24", &route)?;
        let ext2 = external_host(&c.prefix, "ext2", "192.168.210.101/24", &route)?;
        let ext3 = external_host(&c.prefix, "ext3", "192.168.210.102/24", &route)?;
        let t = Duration::from_secs(20);
        c.kubectl(
            &["apply", "-f", "-"],
            Some(&cidr_group("cilium.io/v2alpha1", "trusted", "dmz", &["192.168.210.100/32", "192.168.210.102/32"])),
        )?;
        c.kubectl(&["apply", "-f", "-"], Some(&cidr_group("cilium.io/v2", "lab", "lab", &["192.168.210.101/32"])))?;

        let by_ref = "  endpointSelector:\n    matchLabels:\n      class: deathstar\n  ingress:\n  - fromCIDRSet:\n    - cidrGroupRef: trusted\n      except: [\"192.168.210.102/32\"]\n";
        c.kubectl(&["apply", "-f", "-"], Some(&policy("CiliumNetworkPolicy", "ccg", by_ref)))?;
        expect_conn(&c, "cidrGroupRef: ext2 not in the group", &ext2, ds, 80, false, t)?;
        expect_conn(&c, "cidrGroupRef: ext1 in the group", &ext1, ds, 80, true, t)?;
        expect_conn(&c, "cidrGroupRef: ext3 excepted", &ext3, ds, 80, false, t)?;
        expect_conn(&c, "cidrGroupRef: tiefighter is no CIDR", &sw.tie, ds, 80, false, t)?;

        let by_labels = "  endpointSelector:\n    matchLabels:\n      class: deathstar\n  ingress:\n  - fromCIDRSet:\n    - cidrGroupSelector:\n        matchLabels:\n          zone: lab\n";
        c.kubectl(&["apply", "-f", "-"], Some(&policy("CiliumNetworkPolicy", "ccg", by_labels)))?;
        expect_conn(&c, "cidrGroupSelector: ext1 (zone dmz)", &ext1, ds, 80, false, t)?;
        expect_conn(&c, "cidrGroupSelector: ext2 (zone lab)", &ext2, ds, 80, true, t)?;
        // The group changes under the policy.
        c.kubectl(
            &["apply", "-f", "-"],
            Some(&cidr_group("cilium.io/v2", "lab", "lab", &["192.168.210.101/32", "192.168.210.100/32"])),
        )?;
        expect_conn(&c, "group grown: ext1 now in lab", &ext1, ds, 80, true, t)?;
        c.kubectl(&["delete", "ciliumcidrgroup", "lab"], None)?;
        expect_conn(&c, "group deleted: ext2", &ext2, ds, 80, false, t)?;
        c.kubectl(&["delete", "cnp", "ccg", "-n", "default"], None)?;

        // Deny by group beats an allow of the world.
        let deny = "  endpointSelector:\n    matchLabels:\n      class: deathstar\n  ingress:\n  - fromEntities: [world]\n  ingressDeny:\n  - fromCIDRSet:\n    - cidrGroupRef: trusted\n";
        c.kubectl(&["apply", "-f", "-"], Some(&policy("CiliumNetworkPolicy", "ccg-deny", deny)))?;
        expect_conn(&c, "deny by group: ext1", &ext1, ds, 80, false, t)?;
        expect_conn(&c, "deny by group: ext2 (world)", &ext2, ds, 80, true, t)?;
        expect_conn(&c, "deny by group: ext3", &ext3, ds, 80, false, t)?;
        eprintln!(
            "CIDR groups: cidrGroupRef with except, cidrGroupSelector, a group changed and deleted, deny by group: all enforced"
        );
        Ok(())
    })();
    result.map_err(|e| e.context(c.cp.log_tails(10)))
}

/// A Service and, for one without a selector, its EndpointSlice.
fn service(name: &str, tier: &str, selector: Option<&str>, port: u16, addrs: &[&str]) -> String {
    let sel = selector.map(|s| format!("  selector:\n    class: {s}\n")).unwrap_or_default();
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    tier: {tier}\nspec:\n{sel}  ports:\n  - port: {port}\n"
    );
    if selector.is_none() {
        let list: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
        out.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- port: {port}\n  protocol: TCP\nendpoints:\n- addresses: [{}]\n",
            list.join(", ")
        ));
    }
    out
}

/// `toServices` through the agents with real connections: by name to a
/// Service with a selector (its pods), by labels to a Service without one
/// (the addresses of its EndpointSlice, hosts outside the cluster), the
/// slice growing and the Service deleted under the policy, and a deny by
/// Service beating an allow of everything.
pub fn to_services_select_service_backends(_shared: &ControlPlane) -> anyhow::Result<()> {
    let c = cluster("svc", &["node-a", "node-b"])?;
    let result = (|| -> anyhow::Result<()> {
        let ds = block_on(c.pod("node-a", "deathstar", json!({ "org": "empire", "class": "deathstar" })))?;
        let tie = block_on(c.pod("node-b", "tiefighter", json!({ "org": "empire", "class": "tiefighter" })))?;
        let xwing_ip = block_on(c.pod("node-b", "xwing", json!({ "org": "alliance", "class": "xwing" })))?;
        let xwing = c.pod_ns("node-b", "default", "xwing");
        let _pod_servers = (
            serve(&c.pod_ns("node-a", "default", "deathstar"), 80)?,
            serve(&c.pod_ns("node-b", "default", "tiefighter"), 80)?,
        );
        let back = vec![(format!("{xwing_ip}/32"), c.node_ips["node-b"])];
        let ext1 = external_host(&c.prefix, "ext1", "192.168.210.100/24", &back)?;
        let ext2 = external_host(&c.prefix, "ext2", "192.168.210.101/24", &back)?;
        let (ext1_ip, ext2_ip) = (Ipv4Addr::new(192, 168, 210, 100), Ipv4Addr::new(192, 168, 210, 101));
        let _ext_servers = (serve(&ext1, 443)?, serve(&ext2, 443)?);
        let t = Duration::from_secs(20);
        expect_conn(&c, "xwing -> ext1 before any policy", &xwing, ext1_ip, 443, true, t)?;

        c.kubectl(&["apply", "-f", "-"], Some(&service("deathstar", "core", Some("deathstar"), 80, &[])))?;
        c.kubectl(&["apply", "-f", "-"], Some(&service("fighters", "core", Some("tiefighter"), 80, &[])))?;
        c.kubectl(&["apply", "-f", "-"], Some(&service("external-db", "external", None, 443, &["192.168.210.100"])))?;

        let by_name = "  endpointSelector:\n    matchLabels:\n      class: xwing\n  egress:\n  - toServices:\n    - k8sService:\n        serviceName: deathstar\n        namespace: default\n    toPorts:\n    - ports:\n      - port: \"80\"\n        protocol: TCP\n";
        c.kubectl(&["apply", "-f", "-"], Some(&policy("CiliumNetworkPolicy", "svc", by_name)))?;
        expect_conn(&c, "by name: xwing -> tiefighter (another Service's pod)", &xwing, tie, 80, false, t)?;
        expect_conn(&c, "by name: xwing -> deathstar (the Service's pod)", &xwing, ds, 80, true, t)?;
        expect_conn(&c, "by name: xwing -> ext1 (another Service)", &xwing, ext1_ip, 443, false, t)?;

        let by_labels = "  endpointSelector:\n    matchLabels:\n      class: xwing\n  egress:\n  - toServices:\n    - k8sServiceSelector:\n        selector:\n          matchLabels:\n            tier: external\n    toPorts:\n    - ports:\n      - port: \"443\"\n        protocol: TCP\n";
        c.kubectl(&["apply", "-f", "-"], Some(&policy("CiliumNetworkPolicy", "svc", by_labels)))?;
        expect_conn(&c, "by labels: xwing -> ext1 (the slice's address)", &xwing, ext1_ip, 443, true, t)?;
        expect_conn(&c, "by labels: xwing -> ext2 (not in the slice)", &xwing, ext2_ip, 443, false, t)?;
        expect_conn(&c, "by labels: xwing -> deathstar (tier core)", &xwing, ds, 80, false, t)?;
        // The slice grows under the policy, then the Service goes.
        c.kubectl(
            &["apply", "-f", "-"],
            Some(&service("external-db", "external", None, 443, &["192.168.210.100", "192.168.210.101"])),
        )?;
        expect_conn(&c, "slice grown: xwing -> ext2", &xwing, ext2_ip, 443, true, t)?;
        c.kubectl(&["delete", "service", "external-db", "-n", "default"], None)?;
        expect_conn(&c, "Service deleted: xwing -> ext1", &xwing, ext1_ip, 443, false, t)?;
        expect_conn(&c, "Service deleted: xwing -> ext2", &xwing, ext2_ip, 443, false, t)?;

        // A deny by Service beats an allow of everything.
        c.kubectl(&["apply", "-f", "-"], Some(&service("external-db", "external", None, 443, &["192.168.210.100"])))?;
        let deny = "  endpointSelector:\n    matchLabels:\n      class: xwing\n  egress:\n  - toEntities: [all]\n  egressDeny:\n  - toServices:\n    - k8sService:\n        serviceName: external-db\n";
        c.kubectl(&["apply", "-f", "-"], Some(&policy("CiliumNetworkPolicy", "svc", deny)))?;
        expect_conn(&c, "deny by Service: xwing -> ext1", &xwing, ext1_ip, 443, false, t)?;
        expect_conn(&c, "deny by Service: xwing -> ext2", &xwing, ext2_ip, 443, true, t)?;
        expect_conn(&c, "deny by Service: xwing -> deathstar", &xwing, ds, 80, true, t)?;
        eprintln!(
            "toServices: by name (selector Service), by labels (selectorless Service), slice grown, Service deleted, deny by Service: all enforced"
        );
        Ok(())
    })();
    result.map_err(|e| e.context(c.cp.log_tails(10)))
}

/// `fromNodes` with `enable-node-selector-labels` on the operator and the
/// agents: node labels (set with kubectl after the agents started) reach
/// the CiliumNodes and the nodes' identities; connections from the nodes
/// themselves to a pod are allowed by node label, and follow relabelling.
pub fn from_nodes_selects_nodes_by_label(_shared: &ControlPlane) -> anyhow::Result<()> {
    let on = || vec!["--enable-node-selector-labels=true".to_string()];
    let c = cluster_with("nsl", &["node-a", "node-b", "node-c"], |_| (on(), on()))?;
    let result = (|| -> anyhow::Result<()> {
        let ds = block_on(c.pod("node-a", "deathstar", json!({ "org": "empire", "class": "deathstar" })))?;
        let _server = serve(&c.pod_ns("node-a", "default", "deathstar"), 80)?;
        let (node_b, node_c) = (format!("{}-node-b", c.prefix), format!("{}-node-c", c.prefix));
        let t = Duration::from_secs(20);
        expect_conn(&c, "node-b -> deathstar before any policy", &node_b, ds, 80, true, t)?;
        c.kubectl(&["label", "node", "node-b", "zone=b"], None)?;
        c.kubectl(&["label", "node", "node-c", "zone=c"], None)?;
        block_on(async {
            let cnodes: Api<cilium_crds::CiliumNode> = Api::all(c.cp.client().await?);
            eventually("node-b's label on its CiliumNode", Duration::from_secs(15), || async {
                let n = cnodes.get("node-b").await?;
                Ok(n.metadata.labels.and_then(|l| l.get("zone").cloned()).filter(|z| z == "b"))
            })
            .await
        })?;

        let spec = "  endpointSelector:\n    matchLabels:\n      class: deathstar\n  ingress:\n  - fromNodes:\n    - matchLabels:\n        zone: b\n    toPorts:\n    - ports:\n      - port: \"80\"\n";
        c.kubectl(&["apply", "-f", "-"], Some(&policy("CiliumNetworkPolicy", "nodes", spec)))?;
        block_on(async {
            let cnps: Api<cilium_crds::policy::CiliumNetworkPolicy> = Api::namespaced(c.cp.client().await?, "default");
            eventually("Valid=True on a fromNodes policy", Duration::from_secs(15), || async {
                let p = cnps.get("nodes").await?;
                let valid = p.status.and_then(|s| s.conditions).into_iter().flatten().find(|c| c.type_ == "Valid");
                Ok(valid.filter(|v| v.status == "True").map(|_| ()))
            })
            .await
        })?;
        expect_conn(&c, "fromNodes zone=b: node-c (zone c)", &node_c, ds, 80, false, t)?;
        expect_conn(&c, "fromNodes zone=b: node-b (zone b)", &node_b, ds, 80, true, t)?;
        // `ciliumctl policy trace` from the nodes' addresses agrees (it
        // reads the flag from cilium-config, as a Helm install has it).
        c.kubectl(
            &[
                "create",
                "configmap",
                "cilium-config",
                "-n",
                "kube-system",
                "--from-literal=enable-node-selector-labels=true",
            ],
            None,
        )?;
        for (node, want) in [("node-b", 0), ("node-c", 2)] {
            let ip = c.node_ips[node].to_string();
            let out =
                c.ciliumctl(&["policy", "trace", "--src", &ip, "--dst", "default/deathstar", "--dport", "80/tcp"])?;
            ensure!(
                out.status.code() == Some(want),
                "trace {node} ({ip}) -> deathstar exited {:?}, want {want}:\n{}{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Relabelling moves the nodes in and out of the selection.
        c.kubectl(&["label", "node", "node-c", "zone=b", "--overwrite"], None)?;
        expect_conn(&c, "node-c relabelled zone=b", &node_c, ds, 80, true, t)?;
        c.kubectl(&["label", "node", "node-b", "zone-"], None)?;
        expect_conn(&c, "node-b's zone label removed", &node_b, ds, 80, false, t)?;
        eprintln!("fromNodes: selected by node label, CiliumNode labels follow the Node, relabelling enforced");
        Ok(())
    })();
    result.map_err(|e| e.context(c.cp.log_tails(10)))
}

/// A pod's IPv6 address (its Pod status `podIPs`).
async fn pod_ipv6(c: &Cluster, name: &str) -> anyhow::Result<std::net::Ipv6Addr> {
    let p = Api::<Pod>::namespaced(c.cp.client().await?, "default").get(name).await?;
    let ips = p.status.and_then(|s| s.pod_ips).unwrap_or_default();
    let v6 = ips.iter().find(|i| i.ip.contains(':')).with_context(|| format!("{name} has no IPv6 address: {ips:?}"))?;
    Ok(v6.ip.parse()?)
}

/// Dual stack: with the operator's IPv6 pool on, pods get an IPv6 address
/// next to their IPv4 one (Pod status, CiliumEndpoint), TCP over IPv6
/// flows between nodes and on one node, and the same policy applies to
/// both families (rule1 and an egress rule, with real packets).
pub fn dual_stack_pods_enforce_both_families(_shared: &ControlPlane) -> anyhow::Result<()> {
    let c = cluster_with("ds", &["node-a", "node-b"], |_| {
        let op = ["--enable-ipv6=true", "--cluster-pool-ipv6-cidr=fd00:10:200::/104"].map(String::from).to_vec();
        (op, Vec::new())
    })?;
    let result = (|| -> anyhow::Result<()> {
        let sw = star_wars(&c, &[80])?;
        let ds4 = sw.deathstar;
        let (ds6, tie6) =
            block_on(async { anyhow::Ok((pod_ipv6(&c, "deathstar").await?, pod_ipv6(&c, "tiefighter").await?)) })?;
        let cep: CiliumEndpoint = block_on(async {
            Ok::<_, anyhow::Error>(
                Api::<CiliumEndpoint>::namespaced(c.cp.client().await?, "default").get("deathstar").await?,
            )
        })?;
        let addressing = cep.status.and_then(|s| s.networking).map(|n| n.addressing).unwrap_or_default();
        ensure!(
            addressing.iter().any(|a| a.ipv6.as_deref() == Some(ds6.to_string().as_str())),
            "the CEP does not carry {ds6}: {addressing:?}"
        );
        let _tie_server = serve(&sw.tie, 80)?;
        let t = Duration::from_secs(20);
        expect_conn(&c, "tiefighter -> deathstar over IPv6 (other node)", &sw.tie, ds6, 80, true, t)?;
        expect_conn(&c, "xwing -> deathstar over IPv6", &sw.xwing, ds6, 80, true, t)?;
        expect_conn(&c, "xwing -> tiefighter over IPv6 (same node)", &sw.xwing, tie6, 80, true, t)?;

        c.kubectl(&["apply", "-f", "-"], Some(RULE1))?;
        expect_conn(&c, "rule1: xwing -> deathstar IPv6", &sw.xwing, ds6, 80, false, t)?;
        expect_conn(&c, "rule1: xwing -> deathstar IPv4", &sw.xwing, ds4, 80, false, t)?;
        expect_conn(&c, "rule1: tiefighter -> deathstar IPv6", &sw.tie, ds6, 80, true, t)?;
        expect_conn(&c, "rule1: tiefighter -> deathstar IPv4", &sw.tie, ds4, 80, true, t)?;
        // An egress rule on the xwing: only the tiefighter, either family.
        let egress = "  endpointSelector:\n    matchLabels:\n      class: xwing\n  egress:\n  - toEndpoints:\n    - matchLabels:\n        class: tiefighter\n";
        c.kubectl(&["apply", "-f", "-"], Some(&policy("CiliumNetworkPolicy", "xwing-out", egress)))?;
        expect_conn(&c, "egress: xwing -> tiefighter IPv6", &sw.xwing, tie6, 80, true, t)?;
        c.kubectl(&["delete", "cnp", "rule1", "-n", "default"], None)?;
        expect_conn(&c, "egress: xwing -> deathstar IPv6 (not the tiefighter)", &sw.xwing, ds6, 80, false, t)?;
        expect_conn(&c, "no rule1: tiefighter -> deathstar IPv6", &sw.tie, ds6, 80, true, t)?;
        eprintln!(
            "dual stack: pods with IPv4 and IPv6 ({ds6}), IPv6 between and within nodes, rule1 and an egress rule enforced on both families"
        );
        Ok(())
    })();
    result.map_err(|e| e.context(c.cp.log_tails(10)))
}
