//! A real cluster on one machine: two nodes, each a kubelet with its own
//! containerd in its network namespace; kube-scheduler places the pods of a
//! Deployment, containerd runs them from images imported without a
//! registry, and our `cilium-cni` (through the agent on each node) gives
//! them their network. Checked as a user would: every replica Running with
//! an address from its node's pod CIDR, a CiliumEndpoint and an identity;
//! `kubectl exec` traffic within and across nodes; a policy enforced on
//! these pods. The agents run in their nodes' network namespaces as the
//! chart's host-network pods do (`--node-netns=host`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use cilium_crds::{CiliumEndpoint, CiliumNode};
use e2e::netns::{Cleanup, external_host};
use e2e::realnode::{BUSYBOX_IMAGE, NodeOptions, RealNode, build_images, fabric_with_host_leg};
use e2e::{Agent, ControlPlane, Operator, Options, block_on, eventually};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

const NODES: &[&str] = &["node-a", "node-b"];
const REPLICAS: usize = 20;

struct Cluster {
    // Dropped in this order: agents, nodes (kubelets, pods, containerd),
    // operator, namespaces, control plane, the lock on real nodes.
    agents: Vec<Agent>,
    nodes: Vec<RealNode>,
    _operator: Operator,
    _cleanup: Cleanup,
    cp: ControlPlane,
    _exclusive: std::sync::MutexGuard<'static, ()>,
}

impl Cluster {
    fn logs(&self) -> String {
        let mut s: String = self.nodes.iter().map(|n| n.log_tails(15)).collect();
        for a in &self.agents {
            let text = a.proc.log_text();
            let lines: Vec<&str> = text.lines().collect();
            s += &format!("--- {}:\n{}\n", a.proc.name, lines[lines.len().saturating_sub(15)..].join("\n"));
        }
        s + &self.cp.log_tails(10)
    }
}

fn start() -> anyhow::Result<Cluster> {
    let exclusive = e2e::realnode::exclusive();
    let cp = ControlPlane::start(Options { real_nodes: true, ..Default::default() })?;
    let prefix = format!("rn{}", std::process::id() % 10000);
    let cleanup = Cleanup::new(prefix.clone());
    fabric_with_host_leg(&cp, &prefix)?;
    let images = build_images(cp.dir())?;
    let mut operator =
        Operator::start(&cp, "operator-rn", "kube-system", &["--cluster-pool-ipv4-cidr=10.210.0.0/16".to_string()])?;
    operator.wait_healthy(Duration::from_secs(60))?;
    let mut nodes = Vec::new();
    let mut agents = Vec::new();
    for (i, name) in NODES.iter().enumerate() {
        let ip = cp.nodes_subnet().ip(11 + i as u8);
        let netns = external_host(&prefix, name, &format!("{ip}/24"), &[])?;
        nodes.push(RealNode::start(&cp, &prefix, name, &netns, ip, &images, &NodeOptions::default())?);
    }
    // The kubelets register their Nodes; then each agent (which needs its
    // Node) starts and writes the conflist that makes its node Ready.
    registered(&cp, &nodes)?;
    for (i, node) in nodes.iter().enumerate() {
        let ip = cp.nodes_subnet().ip(11 + i as u8);
        // The node's /etc/cni/net.d, as the agent sees it in the node's
        // mount namespace.
        let conf = std::path::Path::new("/etc/cni/net.d/05-cilium.conflist");
        let flags = ["--cni".to_string(), format!("--write-cni-conf-when-ready={}", conf.display())];
        let mut agent = Agent::start_on_node(&cp, node, ip, &prefix, &flags)?;
        agent.wait_ready(Duration::from_secs(60))?;
        agents.push(agent);
    }
    Ok(Cluster { agents, nodes, _operator: operator, _cleanup: cleanup, cp, _exclusive: exclusive })
}

/// `GET /` from `pod` to `ip:80` (busybox `nc`; Debian's static
/// busybox `wget` crashes without NSS files): the body's last line.
fn get(cp: &ControlPlane, pod: &str, ip: Ipv4Addr) -> anyhow::Result<String> {
    let out = exec(cp, pod, &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} 80"))?;
    Ok(out.lines().last().unwrap_or_default().trim().to_string())
}

/// `kubectl exec POD -- sh -c SCRIPT`: its output, or the error.
fn exec(cp: &ControlPlane, pod: &str, script: &str) -> anyhow::Result<String> {
    let out = cp.kubectl()?.args(["exec", pod, "--", "/bin/sh", "-c", script]).stderr(Stdio::piped()).output()?;
    ensure!(out.status.success(), "exec in {pod}: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Waits for the kubelets to register their Nodes.
fn registered(cp: &ControlPlane, nodes: &[RealNode]) -> anyhow::Result<()> {
    block_on(async {
        let api: Api<Node> = Api::all(cp.client().await?);
        for n in nodes {
            let name = n.name.as_str();
            eventually(&format!("Node {name} registered by its kubelet"), Duration::from_secs(60), || async {
                Ok(api.get_opt(name).await?.map(|_| ()))
            })
            .await?;
        }
        anyhow::Ok(())
    })
    .map_err(|e| e.context(nodes.iter().map(|n| n.log_tails(20)).collect::<String>()))
}

pub fn kubelets_run_a_deployment_through_cilium_cni(_shared: &ControlPlane) -> anyhow::Result<()> {
    let c = start()?;
    let result = workload(&c.cp, NODES).map(|_| ());
    result.map_err(|e| e.context(c.logs()))
}

/// Where [`workload`] put the replicas: node -> (pod, address).
type Placed = BTreeMap<String, Vec<(String, Ipv4Addr)>>;

/// The nodes Ready; a Deployment of 20 replicas placed by the scheduler
/// over them, each networked (address from its node's pod CIDR,
/// CiliumEndpoint, one identity for all); traffic within and across nodes;
/// a policy on them enforced.
fn workload(cp: &ControlPlane, nodes: &[&str]) -> anyhow::Result<Placed> {
    // One runtime per block_on: a client is made inside each.
    // Both nodes Ready (the kubelet sees the agent's conflist).
    block_on(async {
        let client = cp.client().await?;
        let api: Api<Node> = Api::all(client.clone());
        for name in nodes {
            eventually(&format!("Node {name} Ready"), Duration::from_secs(60), || async {
                let n = api.get(name).await?;
                let ready = n
                    .status
                    .and_then(|s| s.conditions)
                    .into_iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                Ok(ready.then_some(()))
            })
            .await?;
        }
        anyhow::Ok(())
    })?;

    // A Deployment of 20 replicas, placed by the scheduler.
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": { "name": "web", "namespace": "default" },
        "spec": {
            "replicas": REPLICAS,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                "spec": {
                    "automountServiceAccountToken": false,
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "httpd",
                        "image": BUSYBOX_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["/bin/sh", "-c", "hostname > /var/www/index.html; exec httpd -f -p 80 -h /var/www"],
                        "ports": [{ "containerPort": 80 }],
                    }],
                },
            },
        },
    }))?;
    let t0 = Instant::now();
    block_on(async {
        let client = cp.client().await?;
        Api::<Deployment>::namespaced(client, "default").create(&PostParams::default(), &deployment).await?;
        anyhow::Ok(())
    })?;
    let pods: Vec<Pod> = block_on(async {
        let client = cp.client().await?;
        let api: Api<Pod> = Api::namespaced(client.clone(), "default");
        eventually("20 replicas Running with an IP", Duration::from_secs(180), || async {
            let list = api.list(&ListParams::default().labels("app=web")).await?.items;
            let running = list
                .iter()
                .filter(|p| {
                    let s = p.status.as_ref();
                    s.and_then(|s| s.phase.as_deref()) == Some("Running") && s.and_then(|s| s.pod_ip.as_ref()).is_some()
                })
                .count();
            if running == REPLICAS && list.len() == REPLICAS {
                return Ok(Some(list));
            }
            // What the others wait for, as the last error if this times out.
            let mut states: BTreeMap<String, usize> = BTreeMap::new();
            for p in &list {
                let s = p.status.as_ref();
                let waiting =
                    s.and_then(|s| s.container_statuses.as_ref()?.first()?.state.as_ref()?.waiting.as_ref()).map(|w| {
                        format!("{}: {}", w.reason.clone().unwrap_or_default(), w.message.clone().unwrap_or_default())
                    });
                let cond = s
                    .and_then(|s| s.conditions.as_ref()?.iter().find(|c| c.status != "True").cloned())
                    .map(|c| format!("{} {}", c.type_, c.message.unwrap_or_default()));
                let phase = s.and_then(|s| s.phase.clone()).unwrap_or_default();
                *states.entry(format!("{phase} {}", waiting.or(cond).unwrap_or_default())).or_default() += 1;
            }
            anyhow::bail!("{} pods, {running} running; {states:?}", list.len())
        })
        .await
    })?;
    let all_running = t0.elapsed();

    // Spread over both nodes; each address from its node's pod CIDR; each
    // pod has its CiliumEndpoint (same address) and one identity for all.
    let (cnodes, ceps) = block_on(async {
        let client = cp.client().await?;
        let cn = Api::<CiliumNode>::all(client.clone()).list(&ListParams::default()).await?.items;
        let ceps =
            Api::<CiliumEndpoint>::namespaced(client.clone(), "default").list(&ListParams::default()).await?.items;
        anyhow::Ok((cn, ceps))
    })?;
    let cidrs: BTreeMap<String, Vec<String>> =
        cnodes.iter().map(|n| (n.metadata.name.clone().unwrap_or_default(), n.pod_cidrs().to_vec())).collect();
    let mut per_node: BTreeMap<String, Vec<(String, Ipv4Addr)>> = BTreeMap::new();
    let mut identities = std::collections::BTreeSet::new();
    for p in &pods {
        let name = p.metadata.name.clone().unwrap_or_default();
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone()).context("pod without a node")?;
        let ip: Ipv4Addr = p.status.as_ref().and_then(|s| s.pod_ip.as_deref()).context("pod IP")?.parse()?;
        let node_cidrs = cidrs.get(&node).cloned().unwrap_or_default();
        ensure!(node_cidrs.iter().any(|c| e2e::in_cidr(ip, c)), "{name} on {node} has {ip}, not from {node_cidrs:?}");
        let cep = ceps.iter().find(|c| c.metadata.name.as_deref() == Some(name.as_str()));
        let status = cep.and_then(|c| c.status.clone()).with_context(|| format!("no CiliumEndpoint for {name}"))?;
        let cep_ip = status.networking.and_then(|n| n.addressing.first()?.ipv4.clone());
        ensure!(cep_ip.as_deref() == Some(ip.to_string().as_str()), "{name}: CiliumEndpoint has {cep_ip:?}, pod {ip}");
        identities.insert(status.identity.and_then(|i| i.id).with_context(|| format!("{name}: no identity"))?);
        per_node.entry(node).or_default().push((name, ip));
    }
    ensure!(identities.len() == 1, "20 replicas of one template have identities {identities:?}");
    ensure!(
        nodes.iter().all(|n| per_node.get(*n).is_some_and(|v| !v.is_empty())),
        "the scheduler left a node empty: {:?}",
        per_node.iter().map(|(n, v)| (n, v.len())).collect::<Vec<_>>()
    );
    let spread: Vec<String> = per_node.iter().map(|(n, v)| format!("{n}: {}", v.len())).collect();
    println!("real nodes: {REPLICAS} replicas Running in {all_running:.1?} ({})", spread.join(", "));

    // Traffic with kubectl exec: within node-a, and node-a -> node-b.
    let a = &per_node[nodes[0]];
    let b = &per_node[nodes[1]];
    let (from, _) = &a[0];
    let same_node = a.get(1).unwrap_or(&a[0]);
    for (what, (to, ip)) in [("within the first node", same_node), ("first node -> second node", &b[0])] {
        let got = get(cp, from, *ip)?;
        ensure!(got == *to, "{what}: {from} -> {to} ({ip}) answered {got:?}");
    }

    // A policy on these pods: only role=client may reach them on port 80.
    cp.apply(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: web-from-clients
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: web
  ingress:
  - fromEndpoints:
    - matchLabels:
        role: client
    toPorts:
    - ports:
      - port: "80"
"#,
    )?;
    let (to, ip) = &b[0];
    block_on(async {
        eventually("web -> web dropped under the policy", Duration::from_secs(20), || async {
            Ok(get(cp, from, *ip).map_or(true, |body| body != *to).then_some(()))
        })
        .await
    })?;
    cp.apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: default
  labels:
    role: client
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: {BUSYBOX_IMAGE}
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "sleep 3600"]
"#
    ))?;
    let got = block_on(async {
        eventually("client -> web allowed under the policy", Duration::from_secs(60), || async {
            Ok(get(cp, "client", *ip).ok().filter(|body| body == to))
        })
        .await
    })?;
    ensure!(got == *to, "client -> {to} answered {got:?}");
    Ok(per_node)
}

/// `helm install` with the chart's defaults but for what this machine
/// needs (images imported, not pulled; the API server's address for the
/// host network; no CAP_SYS_RESOURCE to give): the operator Deployment and
/// the agent DaemonSet run from our image on the real nodes, the agents
/// install cilium-cni and make their nodes Ready, and the workload of
/// [`kubelets_run_a_deployment_through_cilium_cni`] runs on them.
pub fn helm_install_on_real_nodes(_shared: &ControlPlane) -> anyhow::Result<()> {
    let _exclusive = e2e::realnode::exclusive();
    let cp = ControlPlane::start(Options { real_nodes: true, ..Default::default() })?;
    let prefix = format!("hm{}", std::process::id() % 10000);
    let _cleanup = Cleanup::new(prefix.clone());
    let names: Vec<String> = ["a", "b"].iter().map(|n| format!("{prefix}-{n}")).collect();
    let _pins = e2e::realnode::Pins::new(&names);
    fabric_with_host_leg(&cp, &prefix)?;
    let mut images = build_images(cp.dir())?;
    let (image, tar) = e2e::realnode::build_cilium_image(cp.dir())?;
    images.push(tar);
    let mut nodes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let ip = cp.nodes_subnet().ip(21 + i as u8);
        let netns = external_host(&prefix, name, &format!("{ip}/24"), &[])?;
        let opts = NodeOptions { agent_not_ready_taint: true };
        nodes.push(RealNode::start(&cp, &prefix, name, &netns, ip, &images, &opts)?);
    }
    let logs = |nodes: &[RealNode]| -> String {
        let mut s: String = nodes.iter().map(|n| n.log_tails(15)).collect();
        if let Ok(out) = cp.kubectl().and_then(|mut k| Ok(k.args(["get", "pods", "-A", "-o", "wide"]).output()?)) {
            s += &String::from_utf8_lossy(&out.stdout);
        }
        for sel in ["k8s-app=cilium", "io.cilium/app=operator"] {
            if let Ok(out) = cp.kubectl().and_then(|mut k| {
                Ok(k.args(["logs", "-n", "kube-system", "-l", sel, "--tail=15", "--all-containers", "--prefix"])
                    .output()?)
            }) {
                s += &String::from_utf8_lossy(&out.stdout);
                s += &String::from_utf8_lossy(&out.stderr);
            }
        }
        s + &cp.log_tails(5)
    };
    let result = (|| -> anyhow::Result<()> {
        registered(&cp, &nodes)?;
        e2e::realnode::helm(&cp, "install", &[])?;
        println!("real nodes: helm install of {image} done");
        let t0 = Instant::now();
        e2e::realnode::wait_cilium_ready(&cp, 2, Duration::from_secs(180))?;
        println!("real nodes: agents and operators Ready {:.1?} after helm install", t0.elapsed());
        // The nodes registered with the agent-not-ready taint: the operator
        // lifted it once each node's agent pod was Ready, and set
        // NetworkUnavailable=False (CiliumIsUp); the CRDs are served.
        block_on(async {
            let api: Api<Node> = Api::all(cp.client().await?);
            for name in &names {
                eventually(&format!("{name}: taint lifted, CiliumIsUp"), Duration::from_secs(30), || async {
                    let n = api.get(name).await?;
                    let tainted = n
                        .spec
                        .as_ref()
                        .and_then(|s| s.taints.as_ref())
                        .into_iter()
                        .flatten()
                        .any(|t| t.key == "node.cilium.io/agent-not-ready");
                    let up = n.status.as_ref().and_then(|s| s.conditions.as_ref()).into_iter().flatten().any(|c| {
                        c.type_ == "NetworkUnavailable"
                            && c.status == "False"
                            && c.reason.as_deref() == Some("CiliumIsUp")
                    });
                    anyhow::ensure!(!tainted && up, "tainted {tainted}, CiliumIsUp {up}");
                    Ok(Some(()))
                })
                .await?;
            }
            anyhow::Ok(())
        })?;
        let crds = cp
            .kubectl()?
            .args(["get", "ciliumnodes,ciliumendpoints,ciliumidentities,ciliumnetworkpolicies", "-A"])
            .output()?;
        ensure!(crds.status.success(), "Cilium CRDs not served: {}", String::from_utf8_lossy(&crds.stderr));
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let placed = workload(&cp, &names)?;
        agent_killed(&cp, &nodes[0], &placed)?;
        deleted_pods_release_addresses(&cp, &nodes, &placed)?;
        upgrade_then_uninstall(&cp, &nodes)
    })();
    result.map_err(|e| e.context(logs(&nodes)))
}

/// The agent processes serving `node`: `cilium-node-agent` in the node's
/// network namespace (the DaemonSet's pods are on the host network).
fn agent_pids(node: &RealNode) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(want) = std::fs::metadata(format!("/var/run/netns/{}", node.netns)).map(|m| m.ino()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        // comm is cut at 15 characters.
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.starts_with("cilium-node-age")
            && std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino()).ok() == Some(want)
        {
            out.push(pid);
        }
    }
    out
}

/// `kubectl get ... -o jsonpath=...`: its output.
fn jsonpath(cp: &ControlPlane, args: &[&str], path: &str) -> anyhow::Result<String> {
    let out = cp.kubectl()?.args(args).arg(format!("-o=jsonpath={path}")).output()?;
    ensure!(out.status.success(), "kubectl get {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn pod_ip(cp: &ControlPlane, pod: &str) -> anyhow::Result<Option<Ipv4Addr>> {
    let out = jsonpath(cp, &["get", "pod", pod], "{.status.phase} {.status.podIP}")?;
    Ok(match out.split_once(' ') {
        Some(("Running", ip)) => ip.parse().ok(),
        _ => None,
    })
}

/// kill -9 of the node's agent, kept down until the operator has tainted
/// the node and the kubelet has tried to network a new pod there: while no
/// agent runs, the policy is still enforced and traffic still flows; the
/// kubelet's ADD fails with cilium-cni's "try again" and the kubelet
/// retries until the restarted agent answers; the taint goes again; the
/// node's pods keep their addresses and CiliumEndpoints.
fn agent_killed(cp: &ControlPlane, node: &RealNode, placed: &Placed) -> anyhow::Result<()> {
    let name = node.name.as_str();
    let (target, target_ip) = placed[name][0].clone();
    let (peer, _) = placed.iter().find(|(n, _)| n.as_str() != name).context("no pod on another node")?.1[0].clone();
    let before: Vec<(String, Ipv4Addr)> = placed[name].clone();
    ensure!(!agent_pids(node).is_empty(), "no agent process found on {name}");
    let t0 = Instant::now();
    let mut kills = 0;
    let kill_all = |kills: &mut usize| {
        for pid in agent_pids(node) {
            // SAFETY: kill(2) with a pid read from /proc.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                *kills += 1;
            }
        }
    };
    kill_all(&mut kills);
    // A pod for this node made while its agent is down (bound by name: the
    // scheduler would keep it off the tainted node).
    cp.apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: late
  namespace: default
  labels:
    app: late
spec:
  nodeName: {name}
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - name: httpd
    image: {BUSYBOX_IMAGE}
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "hostname > /var/www/index.html; exec httpd -f -p 80 -h /var/www"]
"#
    ))?;
    let (mut enforced_while_down, mut tainted, mut retried) = (false, false, None::<String>);
    while !(enforced_while_down && tainted && retried.is_some()) {
        ensure!(
            t0.elapsed() < Duration::from_secs(150),
            "with {name}'s agent kept down for {:.0?} ({kills} kills): enforced while down {enforced_while_down}, \
             tainted {tainted}, kubelet ADD failed {retried:?}",
            t0.elapsed()
        );
        kill_all(&mut kills);
        if !enforced_while_down && agent_pids(node).is_empty() {
            let allowed = get(cp, "client", target_ip)?;
            let denied = get(cp, &peer, target_ip).unwrap_or_default();
            // Counts only if no agent ran meanwhile.
            if agent_pids(node).is_empty() {
                ensure!(allowed == target, "agent down: client -> {target} answered {allowed:?}");
                ensure!(denied != target, "agent down: {peer} -> {target} got through the policy");
                enforced_while_down = true;
            }
        }
        tainted = tainted
            || jsonpath(cp, &["get", "node", name], "{.spec.taints[*].key}")?
                .contains("node.cilium.io/agent-not-ready");
        if retried.is_none() {
            let events = jsonpath(
                cp,
                &["get", "events", "--field-selector=involvedObject.name=late"],
                "{range .items[*]}{.reason}: {.message}{'\\n'}{end}",
            )?;
            retried = events
                .lines()
                .find(|l| l.starts_with("FailedCreatePodSandBox") && l.contains("Cilium agent"))
                .map(str::to_string);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let down_for = t0.elapsed();
    println!(
        "real nodes: {name}'s agent kept down {down_for:.1?} ({kills} kill -9): policy enforced meanwhile, node \
         tainted, kubelet's ADD refused ({})",
        retried.as_deref().and_then(|r| r.find("plugin type").map(|i| &r[i..])).unwrap_or_default()
    );
    // The agent is restarted by the kubelet; the kubelet's retried ADD
    // networks the pod; the operator lifts the taint.
    let late_ip = block_on(async {
        eventually("late pod Running once the agent is back", Duration::from_secs(240), || async { pod_ip(cp, "late") })
            .await
    })?;
    let late_running = t0.elapsed() - down_for;
    block_on(async {
        eventually(&format!("{name}: agent-not-ready taint lifted"), Duration::from_secs(120), || async {
            let keys = jsonpath(cp, &["get", "node", name], "{.spec.taints[*].key}")?;
            Ok((!keys.contains("node.cilium.io/agent-not-ready")).then_some(()))
        })
        .await
    })?;
    println!("real nodes: late pod Running {late_running:.1?} after the last kill, taint lifted");
    // Same pods, same addresses, CiliumEndpoints kept; the new pod's
    // address is new; policy and traffic as before.
    for (pod, ip) in &before {
        ensure!(pod_ip(cp, pod)? == Some(*ip), "{pod} no longer Running at {ip} after the agent restart");
        let cep = jsonpath(cp, &["get", "ciliumendpoint", pod], "{.status.networking.addressing[0].ipv4}")?;
        ensure!(cep == ip.to_string(), "{pod}: CiliumEndpoint has {cep:?}, pod {ip}");
    }
    ensure!(before.iter().all(|(_, ip)| *ip != late_ip), "late got {late_ip}, an address in use");
    let got = get(cp, "client", target_ip)?;
    ensure!(got == target, "after the restart: client -> {target} answered {got:?}");
    let got = get(cp, &peer, target_ip).unwrap_or_default();
    ensure!(got != target, "after the restart: {peer} -> {target} got through the policy");
    let got = get(cp, &peer, late_ip)?;
    ensure!(got == "late", "{peer} -> late ({late_ip}) answered {got:?}");
    Ok(())
}

/// Each node's pod CIDR use as the agents report it (`ciliumctl doctor`'s
/// ipam-pod-cidr evidence): node -> allocated.
fn allocated(cp: &ControlPlane, nodes: &[RealNode]) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut cmd = std::process::Command::new(e2e::tools::workspace_bin("ciliumctl")?);
    cmd.args(["doctor", "-o", "json"]).arg(format!("--kubeconfig={}", cp.kubeconfig.display()));
    for n in nodes {
        // The chart's agent socket, /var/run/cilium/cilium.sock in the node.
        cmd.arg(format!("--host=unix://{}", n.dir.join("run-cilium/cilium.sock").display()));
    }
    let out = cmd.stdin(Stdio::null()).output()?;
    let findings: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("ciliumctl doctor: {}", String::from_utf8_lossy(&out.stderr)))?;
    let f = findings.iter().find(|f| f["check"] == "ipam-pod-cidr").context("no ipam-pod-cidr finding")?;
    let mut out = BTreeMap::new();
    for e in f["evidence"].as_array().into_iter().flatten().filter_map(|e| e.as_str()) {
        // "<node>: <allocated>/<capacity> allocated from <cidr>"
        let (node, rest) = e.split_once(": ").context("evidence line")?;
        let used = rest.split('/').next().and_then(|u| u.parse().ok()).with_context(|| format!("in {e:?}"))?;
        out.insert(node.to_string(), used);
    }
    ensure!(out.len() == nodes.len(), "agents reported {out:?}: {f}");
    Ok(out)
}

/// Scaling the Deployment to zero releases the replicas' addresses on
/// their nodes (the agents' pools shrink by what each node ran) and their
/// CiliumEndpoints go.
fn deleted_pods_release_addresses(cp: &ControlPlane, nodes: &[RealNode], placed: &Placed) -> anyhow::Result<()> {
    let before = allocated(cp, nodes)?;
    let out = cp.kubectl()?.args(["scale", "deployment", "web", "--replicas=0"]).output()?;
    ensure!(out.status.success(), "kubectl scale: {}", String::from_utf8_lossy(&out.stderr));
    let t0 = Instant::now();
    let expected: BTreeMap<String, usize> =
        before.iter().map(|(n, used)| (n.clone(), used - placed.get(n).map_or(0, Vec::len))).collect();
    block_on(async {
        eventually("the replicas' addresses and CiliumEndpoints released", Duration::from_secs(120), || async {
            let now = allocated(cp, nodes)?;
            let ceps = jsonpath(cp, &["get", "ciliumendpoints", "-l", "app=web"], "{.items[*].metadata.name}")?;
            anyhow::ensure!(now == expected && ceps.is_empty(), "allocated {now:?} (want {expected:?}), CEPs {ceps:?}");
            Ok(Some(()))
        })
        .await
    })?;
    println!("real nodes: {REPLICAS} replicas deleted, addresses {before:?} -> {expected:?} in {:.1?}", t0.elapsed());
    Ok(())
}

/// `helm upgrade` rolls the agents (pods keep their network through it);
/// `helm uninstall` (after an upgrade setting `cni.uninstall`) leaves no
/// object of the release, no process of ours on the nodes and no CNI
/// configuration.
fn upgrade_then_uninstall(cp: &ControlPlane, nodes: &[RealNode]) -> anyhow::Result<()> {
    let pids: Vec<i32> = nodes.iter().flat_map(agent_pids).collect();
    let late_ip = pod_ip(cp, "late")?.context("late not Running")?;
    let t0 = Instant::now();
    e2e::realnode::helm(cp, "upgrade", &["--set", "cni.uninstall=true", "--set", "rollOutCiliumPods=true"])?;
    block_on(async {
        eventually("agents rolled by helm upgrade and Ready", Duration::from_secs(180), || async {
            let st = jsonpath(
                cp,
                &["get", "daemonset", "-n", "kube-system", "cilium"],
                "{.status.updatedNumberScheduled} {.status.numberReady} {.status.numberAvailable}",
            )?;
            let new: Vec<i32> = nodes.iter().flat_map(agent_pids).collect();
            let rolled = new.len() == nodes.len() && new.iter().all(|p| !pids.contains(p));
            anyhow::ensure!(st == "2 2 2" && rolled, "DaemonSet {st:?}, agents {new:?} (before {pids:?})");
            Ok(Some(()))
        })
        .await
    })?;
    println!("real nodes: helm upgrade rolled the agents in {:.1?}", t0.elapsed());
    let got = get(cp, "client", late_ip)?;
    ensure!(got == "late", "after the upgrade: client -> late answered {got:?}");

    let t0 = Instant::now();
    let out = std::process::Command::new(e2e::tools::tool("helm")?)
        .arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
        .args(["uninstall", "cilium", "-n", "kube-system", "--wait", "--timeout=120s"])
        .stdin(Stdio::null())
        .output()?;
    ensure!(out.status.success(), "helm uninstall: {}", String::from_utf8_lossy(&out.stderr));
    block_on(async {
        eventually("nothing of the release left", Duration::from_secs(120), || async {
            let objects = jsonpath(
                cp,
                &[
                    "get",
                    "all,configmaps,secrets,serviceaccounts,roles,rolebindings,clusterroles,clusterrolebindings",
                    "-A",
                    "-l",
                    "app.kubernetes.io/instance=cilium",
                ],
                "{range .items[*]}{.kind}/{.metadata.name} {end}",
            )?;
            let procs: Vec<i32> = nodes.iter().flat_map(agent_pids).collect();
            let confs: Vec<String> = nodes
                .iter()
                .flat_map(|n| std::fs::read_dir(&n.cni_conf).into_iter().flatten().flatten())
                .map(|e| e.path().display().to_string())
                .filter(|p| p.contains("cilium"))
                .collect();
            anyhow::ensure!(
                objects.is_empty() && procs.is_empty() && confs.is_empty(),
                "objects [{objects}], agent processes {procs:?}, CNI configuration {confs:?}"
            );
            Ok(Some(()))
        })
        .await
    })?;
    println!("real nodes: helm uninstall left nothing in {:.1?}", t0.elapsed());
    Ok(())
}
