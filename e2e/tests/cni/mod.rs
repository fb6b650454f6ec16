//! The `cilium-cni` plugin as a container runtime runs it: the CNI
//! project's own `cnitool` (libcni, the reference runtime library) reads a
//! conflist as the agent's DaemonSet installs it, makes the calls with the
//! spec's environment and checks every result. The sandboxes are network
//! namespaces made as a runtime makes them (not by the agent); policy is
//! then checked with real packets between them.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use cilium_crds::{CiliumEndpoint, CiliumNode};
use e2e::netns::serve;
use e2e::{ControlPlane, block_on, eventually};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

use crate::datapath::{Cluster, RULE1, cluster_with, expect_conn};

/// A runtime's view of one node: the conflist directory (the agent writes
/// its conflist there once it enforces, `--write-cni-conf-when-ready`) and
/// the plugin directory.
struct Runtime {
    netconf: PathBuf,
    plugins: PathBuf,
}

fn netconf_dir(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("cni-{node}/net.d"))
}

fn runtime(c: &Cluster, node: &str) -> anyhow::Result<Runtime> {
    let netconf = netconf_dir(c.cp.dir(), node);
    let written: Value = serde_json::from_slice(
        &std::fs::read(netconf.join("05-cilium.conflist")).context("the agent wrote no conflist")?,
    )?;
    ensure!(
        written["plugins"][0]["type"] == "cilium-cni"
            && written["plugins"][0]["socket-path"] == json!(c.agents[node].socket),
        "conflist of {node}: {written}"
    );
    let plugin = e2e::tools::workspace_bin("cilium-cni")?;
    Ok(Runtime { netconf, plugins: plugin.parent().context("plugin dir")?.to_path_buf() })
}

/// A sandbox's network namespace, made as a runtime makes it.
fn sandbox(c: &Cluster, pod: &str) -> anyhow::Result<String> {
    let name = format!("{}-sb-{pod}", c.prefix);
    let out = Command::new("ip").args(["netns", "add", &name]).output()?;
    ensure!(out.status.success(), "ip netns add {name}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(name)
}

/// `cnitool CMD cilium /var/run/netns/SANDBOX` for pod `pod`.
fn cnitool(rt: &Runtime, cmd: &str, sandbox: &str, pod: &str) -> anyhow::Result<Output> {
    Ok(Command::new(e2e::tools::tool("cnitool")?)
        .args([cmd, "cilium", &format!("/var/run/netns/{sandbox}")])
        .env("NETCONFPATH", &rt.netconf)
        .env("CNI_PATH", &rt.plugins)
        .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}"))
        .env("CNI_IFNAME", "eth0")
        .stdin(Stdio::null())
        .output()?)
}

/// ADD through cnitool; the result (checked against the spec by libcni).
fn add(rt: &Runtime, sandbox: &str, pod: &str) -> anyhow::Result<Value> {
    let out = cnitool(rt, "add", sandbox, pod)?;
    ensure!(
        out.status.success(),
        "cnitool add {pod}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).with_context(|| format!("ADD result of {pod}"))
}

fn succeeds(rt: &Runtime, cmd: &str, sandbox: &str, pod: &str) -> anyhow::Result<()> {
    let out = cnitool(rt, cmd, sandbox, pod)?;
    ensure!(out.status.success(), "cnitool {cmd} {pod}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// The plugin run by hand, as a runtime would, for what cnitool cannot ask;
/// whether it succeeded and what it printed.
fn plugin(env: &[(&str, &str)], stdin: &str) -> anyhow::Result<(bool, Value)> {
    let out = plugin_status(env, stdin)?;
    let v = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("plugin output {:?}", String::from_utf8_lossy(&out.stdout)))?;
    Ok((out.status.success(), v))
}

fn plugin_status(env: &[(&str, &str)], stdin: &str) -> anyhow::Result<Output> {
    use std::io::Write;
    let mut child = Command::new(e2e::tools::workspace_bin("cilium-cni")?)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().context("stdin")?.write_all(stdin.as_bytes())?;
    Ok(child.wait_with_output()?)
}

fn ipv4_of(result: &Value) -> anyhow::Result<Ipv4Addr> {
    let a = result["ips"][0]["address"].as_str().with_context(|| format!("no address in {result}"))?;
    Ok(a.trim_end_matches("/32").parse()?)
}

async fn create_pod(c: &Cluster, node: &str, name: &str, labels: Value) -> anyhow::Result<()> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": "default", "labels": labels },
        "spec": { "nodeName": node, "containers": [{ "name": "app", "image": "docker.io/cilium/starwars" }] }
    }))?;
    Api::<Pod>::namespaced(c.cp.client().await?, "default").create(&PostParams::default(), &pod).await?;
    Ok(())
}

pub fn plugin_through_libcni(_shared: &ControlPlane) -> anyhow::Result<()> {
    let mut c = cluster_with("cn", &["node-a", "node-b"], |cp| {
        let conf = netconf_dir(cp.dir(), "{node}").join("05-cilium.conflist");
        (Vec::new(), vec!["--cni".to_string(), format!("--write-cni-conf-when-ready={}", conf.display())])
    })?;
    let result = run(&mut c);
    result.map_err(|e| e.context(c.agent_logs()))
}

fn run(c: &mut Cluster) -> anyhow::Result<()> {
    let (rt_a, rt_b) = (runtime(c, "node-a")?, runtime(c, "node-b")?);
    // VERSION, as a runtime asks it first.
    let (ok, v) = plugin(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#)?;
    ensure!(ok && v["supportedVersions"].as_array().is_some_and(|a| a.contains(&json!("1.0.0"))), "VERSION: {v}");

    block_on(async {
        create_pod(c, "node-a", "deathstar", json!({ "org": "empire", "class": "deathstar" })).await?;
        create_pod(c, "node-b", "tiefighter", json!({ "org": "empire", "class": "tiefighter" })).await?;
        create_pod(c, "node-b", "xwing", json!({ "org": "alliance", "class": "xwing" })).await
    })?;
    let ds_sb = sandbox(c, "deathstar")?;
    let tie_sb = sandbox(c, "tiefighter")?;
    let xwing_sb = sandbox(c, "xwing")?;
    let t0 = Instant::now();
    let ds = add(&rt_a, &ds_sb, "deathstar")?;
    let add_time = t0.elapsed();
    let tie = add(&rt_b, &tie_sb, "tiefighter")?;
    let xwing = add(&rt_b, &xwing_sb, "xwing")?;
    let (ds_ip, tie_ip) = (ipv4_of(&ds)?, ipv4_of(&tie)?);
    println!("cni: ADD answered in {add_time:?} (deathstar {ds_ip}, tiefighter {tie_ip}, xwing {})", ipv4_of(&xwing)?);

    // Each address is from its node's pod CIDR, on the sandbox's eth0 with
    // the MAC the result gives; the pod has an endpoint with an identity.
    block_on(async {
        let client = c.cp.client().await?;
        let nodes: Api<CiliumNode> = Api::all(client.clone());
        let ceps: Api<CiliumEndpoint> = Api::namespaced(client, "default");
        for (node, pod, result, sb) in [
            ("node-a", "deathstar", &ds, &ds_sb),
            ("node-b", "tiefighter", &tie, &tie_sb),
            ("node-b", "xwing", &xwing, &xwing_sb),
        ] {
            let ip = ipv4_of(result)?;
            let cnode = nodes.get(node).await?;
            let cidrs = cnode.pod_cidrs();
            ensure!(
                cidrs.iter().any(|cidr| e2e::in_cidr(ip, cidr)),
                "{pod}: {ip} is not in {node}'s pod CIDRs {cidrs:?}"
            );
            let link = Command::new("ip").args(["-n", sb, "-j", "addr", "show", "dev", "eth0"]).output()?;
            let link: Value = serde_json::from_slice(&link.stdout).context("ip -j addr")?;
            ensure!(
                link[0]["address"] == result["interfaces"][0]["mac"]
                    && link[0]["addr_info"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|a| a["local"] == json!(ip.to_string())),
                "{pod}: eth0 in {sb} is {link}, the result says {result}"
            );
            ensure!(result["interfaces"][0]["sandbox"] == json!(format!("/var/run/netns/{sb}")), "{pod}: {result}");
            let cep = ceps.get(pod).await?;
            let status = cep.status.unwrap_or_default();
            let cep_ip = status.networking.and_then(|n| n.addressing.first()?.ipv4.clone());
            ensure!(
                cep_ip.as_deref() == Some(ip.to_string().as_str()) && status.identity.and_then(|i| i.id).is_some(),
                "{pod}: CiliumEndpoint has {cep_ip:?} (want {ip}) or no identity"
            );
        }
        anyhow::Ok(())
    })?;

    // Real packets: across the nodes, then under rule1.
    let _server = serve(&ds_sb, 80)?;
    let long = Duration::from_secs(20);
    expect_conn(c, "tiefighter before any policy", &tie_sb, ds_ip, 80, true, long)?;
    expect_conn(c, "xwing before any policy", &xwing_sb, ds_ip, 80, true, long)?;
    c.kubectl(&["apply", "-f", "-"], Some(RULE1))?;
    expect_conn(c, "xwing under rule1", &xwing_sb, ds_ip, 80, false, long)?;
    expect_conn(c, "tiefighter under rule1", &tie_sb, ds_ip, 80, true, long)?;

    // CHECK passes; a retried ADD of the same sandbox gets the same answer.
    succeeds(&rt_b, "check", &tie_sb, "tiefighter")?;
    let again = add(&rt_b, &tie_sb, "tiefighter")?;
    ensure!(again["ips"] == tie["ips"], "a retried ADD answered {again}, first {tie}");
    // CHECK of a sandbox the agent never saw: "unknown container" (3).
    let conf = r#"{"cniVersion":"1.0.0","name":"cilium","type":"cilium-cni","socket-path":"SOCK"}"#
        .replace("SOCK", &c.agents["node-b"].socket.display().to_string());
    let check_env = [
        ("CNI_COMMAND", "CHECK"),
        ("CNI_CONTAINERID", "never-added"),
        ("CNI_NETNS", "/var/run/netns/none"),
        ("CNI_IFNAME", "eth0"),
    ];
    let (ok, v) = plugin(&check_env, &conf)?;
    ensure!(!ok && v["code"] == 3, "CHECK of an unknown sandbox: {v}");

    // An ADD whose namespace is gone (the runtime removed it meanwhile)
    // fails at once with the reason; the runtime's DEL then frees it all.
    block_on(create_pod(c, "node-b", "ghost", json!({ "org": "alliance", "class": "ghost" })))?;
    let ghost_env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "ghost-1"),
        ("CNI_NETNS", "/var/run/netns/no-such-sandbox"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=ghost"),
    ];
    let t0 = Instant::now();
    let (ok, v) = plugin(&ghost_env, &conf)?;
    ensure!(
        !ok && v["code"] == 100 && v["msg"].as_str().is_some_and(|m| m.contains("no-such-sandbox")),
        "ADD into a missing namespace: {v}"
    );
    ensure!(t0.elapsed() < Duration::from_secs(10), "ADD into a missing namespace took {:?}", t0.elapsed());
    let ghost_del = [("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "ghost-1"), ("CNI_IFNAME", "eth0")];
    let out = plugin_status(&ghost_del, &conf)?;
    ensure!(out.status.success() && out.stdout.is_empty(), "DEL after a failed ADD: {out:?}");

    // The agent of node-b down: its pods keep their policy; an ADD there
    // fails with "try again later" (11) naming the agent; after a restart
    // the same ADD succeeds and the earlier endpoints kept their addresses.
    let agent_b = c.agents.get_mut("node-b").context("agent node-b")?;
    agent_b.proc.signal(libc::SIGKILL);
    ensure!(agent_b.proc.wait_exit(Duration::from_secs(10)).is_some(), "agent node-b did not die");
    block_on(create_pod(c, "node-b", "late", json!({ "org": "alliance", "class": "late" })))?;
    let late_sb = sandbox(c, "late")?;
    let late_ns = format!("/var/run/netns/{late_sb}");
    let add_env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "late-1"),
        ("CNI_NETNS", late_ns.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=late"),
    ];
    let (ok, v) = plugin(&add_env, &conf)?;
    ensure!(
        !ok && v["code"] == 11 && v["msg"].as_str().is_some_and(|m| m.contains("cannot reach the Cilium agent")),
        "ADD with the agent down: {v}"
    );
    expect_conn(c, "xwing under rule1, agent down", &xwing_sb, ds_ip, 80, false, Duration::from_secs(2))?;
    expect_conn(c, "tiefighter under rule1, agent down", &tie_sb, ds_ip, 80, true, Duration::from_secs(2))?;
    let agent_b = c.agents.get_mut("node-b").context("agent node-b")?;
    agent_b.respawn()?;
    agent_b.wait_ready(Duration::from_secs(60))?;
    let late = add(&rt_b, &late_sb, "late")?;
    ensure!(ipv4_of(&late)? != tie_ip && ipv4_of(&late)? != ipv4_of(&xwing)?, "late got a live address: {late}");
    succeeds(&rt_b, "check", &tie_sb, "tiefighter")?;
    let again = add(&rt_b, &tie_sb, "tiefighter")?;
    ensure!(again["ips"] == tie["ips"], "after the restart the tiefighter has {again}, was {tie}");
    expect_conn(c, "late (alliance) under rule1", &late_sb, ds_ip, 80, false, long)?;

    // DEL: the endpoint, its veth and its CiliumEndpoint go; a second DEL
    // succeeds too; the sandbox (the runtime's) stays.
    succeeds(&rt_b, "del", &xwing_sb, "xwing")?;
    succeeds(&rt_b, "del", &xwing_sb, "xwing")?;
    ensure!(Path::new(&format!("/var/run/netns/{xwing_sb}")).exists(), "DEL removed the runtime's namespace");
    let links = Command::new("ip").args(["-n", &xwing_sb, "-j", "link", "show"]).output()?;
    let links: Value = serde_json::from_slice(&links.stdout)?;
    ensure!(links.as_array().is_some_and(|l| l.iter().all(|l| l["ifname"] != "eth0")), "eth0 left after DEL: {links}");
    block_on(async {
        let ceps: Api<CiliumEndpoint> = Api::namespaced(c.cp.client().await?, "default");
        eventually("xwing's CiliumEndpoint gone", Duration::from_secs(10), || async {
            Ok(ceps.get_opt("xwing").await?.is_none().then_some(()))
        })
        .await
    })?;
    // The released address goes to the next pod, with its own policy.
    block_on(create_pod(c, "node-b", "xwing2", json!({ "org": "empire", "class": "tiefighter" })))?;
    let x2_sb = sandbox(c, "xwing2")?;
    let x2 = add(&rt_b, &x2_sb, "xwing2")?;
    expect_conn(c, "an empire pod after DEL", &x2_sb, ds_ip, 80, true, long)?;
    println!("cni: xwing had {}, the next pod got {}", ipv4_of(&xwing)?, ipv4_of(&x2)?);
    Ok(())
}
