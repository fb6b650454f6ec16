//! Policies in the forms users write (upstream's defaults: a port without
//! a protocol, named ports, deny rules, CIDRs that overlap, `enableDefaultDeny`,
//! peers the agent cannot resolve, invalid policies) and Kubernetes
//! NetworkPolicies, applied with kubectl and judged by the agents' eBPF
//! datapath with real TCP, UDP and ICMP between pod namespaces. Each case
//! is a regression test of a way the first agent failed open.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::ensure;
use e2e::netns::{can_connect, external_host, ping, serve, serve_udp, udp_refused, udp_roundtrip};
use e2e::{ControlPlane, block_on, eventually};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use serde_json::json;

use crate::datapath::{Cluster, cluster, expect_probe};

const T: Duration = Duration::from_secs(20);
const PROBE: Duration = Duration::from_millis(700);

fn apply(c: &Cluster, yaml: &str) -> anyhow::Result<()> {
    c.kubectl(&["apply", "-f", "-"], Some(yaml))
}

fn cnp(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n{spec}"
    )
}

fn tcp(c: &Cluster, what: &str, from: &str, ip: Ipv4Addr, port: u16, want: bool) -> anyhow::Result<()> {
    let from = from.to_string();
    expect_probe(c, what, want, T, || can_connect(&from, ip, port, PROBE)).map(|_| ())
}

fn udp(c: &Cluster, what: &str, from: &str, ip: Ipv4Addr, port: u16, want: bool) -> anyhow::Result<()> {
    let from = from.to_string();
    expect_probe(c, what, want, T, || udp_roundtrip(&from, ip, port, PROBE)).map(|_| ())
}

fn icmp(c: &Cluster, what: &str, from: &str, ip: Ipv4Addr, id: u16, want: bool) -> anyhow::Result<()> {
    let from = from.to_string();
    expect_probe(c, what, want, T, || ping(&from, ip, id, PROBE)).map(|_| ())
}

/// Routes back from an external host to both nodes' pod CIDRs.
fn routes_back(c: &Cluster, a: Ipv4Addr, b: Ipv4Addr) -> Vec<(String, Ipv4Addr)> {
    let net = |ip: Ipv4Addr| {
        let o = ip.octets();
        format!("{}.{}.{}.0/24", o[0], o[1], o[2])
    };
    vec![(net(a), c.node_ips["node-a"]), (net(b), c.node_ips["node-b"])]
}

pub fn upstream_forms_through_the_agents(_shared: &ControlPlane) -> anyhow::Result<()> {
    let c = cluster("uf", &["node-a", "node-b"])?;
    let result = (|| -> anyhow::Result<()> {
        let http = json!([{ "name": "http", "containerPort": 80, "protocol": "TCP" }]);
        let ds = block_on(c.pod_with(
            "node-a",
            "default",
            "deathstar",
            json!({ "org": "empire", "class": "deathstar" }),
            http,
        ))?;
        let tie_ip = block_on(c.pod("node-b", "tiefighter", json!({ "org": "empire", "class": "tiefighter" })))?;
        block_on(c.pod("node-b", "xwing", json!({ "org": "alliance", "class": "xwing" })))?;
        let ds_ns = c.pod_ns("node-a", "default", "deathstar");
        let _servers = (serve(&ds_ns, 80)?, serve(&ds_ns, 8080)?, serve_udp(&ds_ns, 80)?);
        let tie = c.pod_ns("node-b", "default", "tiefighter");
        let xwing = c.pod_ns("node-b", "default", "xwing");
        let back = routes_back(&c, ds, tie_ip);
        let ext1 = external_host(&c.prefix, "ext1", "192.168.210.100/24", &back)?;
        let ext2 = external_host(&c.prefix, "ext2", "192.168.210.101/24", &back)?;
        let (ext1_ip, ext2_ip) = (Ipv4Addr::new(192, 168, 210, 100), Ipv4Addr::new(192, 168, 210, 101));
        let _ext_servers = (serve(&ext1, 443)?, serve(&ext2, 443)?);
        tcp(&c, "tiefighter before any policy", &tie, ds, 80, true)?;
        udp(&c, "tiefighter udp before any policy", &tie, ds, 80, true)?;
        tcp(&c, "xwing -> ext1 before any policy", &xwing, ext1_ip, 443, true)?;

        // A port without a protocol is TCP, UDP and SCTP (upstream's ANY).
        let spec = "  endpointSelector:\n    matchLabels:\n      class: deathstar\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        org: empire\n    toPorts:\n    - ports:\n      - port: \"80\"\n";
        apply(&c, &cnp("any-proto", spec))?;
        tcp(&c, "any-proto: xwing tcp/80", &xwing, ds, 80, false)?;
        udp(&c, "any-proto: xwing udp/80", &xwing, ds, 80, false)?;
        tcp(&c, "any-proto: tiefighter tcp/80", &tie, ds, 80, true)?;
        udp(&c, "any-proto: tiefighter udp/80", &tie, ds, 80, true)?;
        tcp(&c, "any-proto: tiefighter tcp/8080", &tie, ds, 8080, false)?;
        c.kubectl(&["delete", "cnp", "any-proto", "-n", "default"], None)?;

        // ... also in a deny rule: it denies every protocol on the port.
        let spec = "  endpointSelector:\n    matchLabels:\n      class: deathstar\n  ingress:\n  - fromEntities:\n    - all\n  ingressDeny:\n  - fromEndpoints:\n    - matchLabels:\n        class: tiefighter\n    toPorts:\n    - ports:\n      - port: \"80\"\n";
        apply(&c, &cnp("deny-any-proto", spec))?;
        tcp(&c, "deny-any-proto: tiefighter tcp/80", &tie, ds, 80, false)?;
        udp(&c, "deny-any-proto: tiefighter udp/80", &tie, ds, 80, false)?;
        tcp(&c, "deny-any-proto: tiefighter tcp/8080", &tie, ds, 8080, true)?;
        tcp(&c, "deny-any-proto: xwing tcp/80", &xwing, ds, 80, true)?;
        c.kubectl(&["delete", "cnp", "deny-any-proto", "-n", "default"], None)?;

        // A named port: the deathstar's container port "http" (80).
        let spec = "  endpointSelector:\n    matchLabels:\n      class: deathstar\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        org: empire\n    toPorts:\n    - ports:\n      - port: http\n        protocol: TCP\n";
        apply(&c, &cnp("named", spec))?;
        tcp(&c, "named: tiefighter tcp/8080", &tie, ds, 8080, false)?;
        tcp(&c, "named: tiefighter tcp/80 (http)", &tie, ds, 80, true)?;
        c.kubectl(&["delete", "cnp", "named", "-n", "default"], None)?;

        // A peer the agent cannot resolve selects nothing: toServices with
        // ports does not open the ports to every peer.
        let spec = "  endpointSelector:\n    matchLabels:\n      class: xwing\n  egress:\n  - toServices:\n    - k8sService:\n        serviceName: deathstar\n        namespace: default\n    toPorts:\n    - ports:\n      - port: \"443\"\n        protocol: TCP\n";
        apply(&c, &cnp("to-services", spec))?;
        tcp(&c, "to-services: xwing -> ext1:443", &xwing, ext1_ip, 443, false)?;
        c.kubectl(&["delete", "cnp", "to-services", "-n", "default"], None)?;

        // CIDRs: a broad allow stays broad while another policy names a
        // narrower prefix inside it ...
        let narrow = "  endpointSelector:\n    matchLabels:\n      class: tiefighter\n  egress:\n  - toCIDR:\n    - 192.168.210.100/32\n";
        apply(&c, &cnp("narrow", narrow))?;
        let broad = "  endpointSelector:\n    matchLabels:\n      class: xwing\n  egress:\n  - toCIDR:\n    - 192.168.210.0/24\n";
        apply(&c, &cnp("broad", broad))?;
        tcp(&c, "broad allow: xwing -> deathstar (not in the CIDR)", &xwing, ds, 80, false)?;
        tcp(&c, "broad allow: xwing -> ext1 (narrower prefix inside)", &xwing, ext1_ip, 443, true)?;
        tcp(&c, "broad allow: xwing -> ext2", &xwing, ext2_ip, 443, true)?;
        // ... and a broad deny is not bypassed by it.
        let deny = "  endpointSelector:\n    matchLabels:\n      class: xwing\n  egress:\n  - toEntities:\n    - all\n  egressDeny:\n  - toCIDR:\n    - 192.168.210.0/24\n";
        apply(&c, &cnp("broad", deny))?;
        tcp(&c, "broad deny: xwing -> ext1 (narrower prefix inside)", &xwing, ext1_ip, 443, false)?;
        tcp(&c, "broad deny: xwing -> ext2", &xwing, ext2_ip, 443, false)?;
        tcp(&c, "broad deny: xwing -> deathstar", &xwing, ds, 80, true)?;
        // A deny set with an except spares the excepted address.
        let except = "  endpointSelector:\n    matchLabels:\n      class: xwing\n  egress:\n  - toEntities:\n    - all\n  egressDeny:\n  - toCIDRSet:\n    - cidr: 192.168.210.96/28\n      except:\n      - 192.168.210.100/32\n";
        apply(&c, &cnp("broad", except))?;
        tcp(&c, "deny except: xwing -> ext2 (denied)", &xwing, ext2_ip, 443, false)?;
        tcp(&c, "deny except: xwing -> ext1 (the except)", &xwing, ext1_ip, 443, true)?;
        c.kubectl(&["delete", "cnp", "broad", "narrow", "-n", "default"], None)?;

        // enableDefaultDeny off: deny rules still deny, the rest passes.
        let spec = "  endpointSelector:\n    matchLabels:\n      class: deathstar\n  enableDefaultDeny:\n    ingress: false\n  ingressDeny:\n  - fromEndpoints:\n    - matchLabels:\n        class: xwing\n";
        apply(&c, &cnp("no-default-deny", spec))?;
        tcp(&c, "no-default-deny: xwing", &xwing, ds, 80, false)?;
        tcp(&c, "no-default-deny: tiefighter", &tie, ds, 80, true)?;
        tcp(&c, "no-default-deny: ext1", &ext1, ds, 80, true)?;
        c.kubectl(&["delete", "cnp", "no-default-deny", "-n", "default"], None)?;

        // ICMP: an echo the deathstar allowed in is answered; its own echo
        // to the same peer is a request, not a reply, and egress is closed.
        let spec = "  endpointSelector:\n    matchLabels:\n      class: deathstar\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        class: tiefighter\n    icmps:\n    - fields:\n      - type: 8\n        family: IPv4\n  egress:\n  - {}\n";
        apply(&c, &cnp("icmp", spec))?;
        icmp(&c, "icmp: xwing -> deathstar", &xwing, ds, 4242, false)?;
        icmp(&c, "icmp: tiefighter -> deathstar", &tie, ds, 4243, true)?;
        icmp(&c, "icmp: deathstar -> tiefighter, right after", &ds_ns, tie_ip, 4243, false)?;
        tcp(&c, "icmp: tiefighter tcp/80 (only echo allowed)", &tie, ds, 80, false)?;
        c.kubectl(&["delete", "cnp", "icmp", "-n", "default"], None)?;

        // ICMP errors related to a connection pass both ways while every
        // ICMP is otherwise denied: the deathstar's port unreachable for a
        // UDP datagram the tiefighter may send (deathstar egress: nothing
        // allowed) reaches the tiefighter (ingress: nothing allowed).
        let ds_spec = "  endpointSelector:\n    matchLabels:\n      class: deathstar\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        class: tiefighter\n    toPorts:\n    - ports:\n      - port: \"9999\"\n        protocol: UDP\n  egress:\n  - toEndpoints:\n    - matchLabels:\n        class: nobody\n";
        let tie_spec = "  endpointSelector:\n    matchLabels:\n      class: tiefighter\n  egress:\n  - toEndpoints:\n    - matchLabels:\n        class: deathstar\n    toPorts:\n    - ports:\n      - port: \"9999\"\n        protocol: UDP\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        class: nobody\n";
        apply(&c, &cnp("related-ds", ds_spec))?;
        apply(&c, &cnp("related-tie", tie_spec))?;
        let tie_ns = tie.clone();
        expect_probe(&c, "related: port unreachable back to the tiefighter", true, T, || {
            udp_refused(&tie_ns, ds, 9999, PROBE)
        })?;
        icmp(&c, "related: a plain ping is still denied", &tie, ds, 4244, false)?;
        c.kubectl(&["delete", "cnp", "related-ds", "related-tie", "-n", "default"], None)?;

        // A policy upstream refuses (here `ingress: []` alone) is marked
        // Valid=False by the operator, not enforced, and reported.
        let spec = "  endpointSelector:\n    matchLabels:\n      class: deathstar\n  ingress: []\n";
        apply(&c, &cnp("empty", spec))?;
        block_on(async {
            let client = c.cp.client().await?;
            let cnps: Api<cilium_crds::CiliumNetworkPolicy> = Api::namespaced(client.clone(), "default");
            eventually("Valid=False on the empty policy", Duration::from_secs(15), || async {
                let p = cnps.get("empty").await?;
                let cond = p.status.and_then(|s| s.conditions).unwrap_or_default();
                Ok(cond.into_iter().find(|c| c.type_ == "Valid" && c.status == "False"))
            })
            .await?;
            let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client, "default");
            eventually("a PolicyNotEnforced Event on the empty policy", Duration::from_secs(15), || async {
                let list = events.list(&Default::default()).await?;
                Ok(list.items.into_iter().find(|e| {
                    e.reason.as_deref() == Some("PolicyNotEnforced")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("empty")
                }))
            })
            .await?;
            anyhow::Ok(())
        })?;
        ensure!(can_connect(&xwing, ds, 80, Duration::from_secs(2))?, "the refused policy was enforced");
        Ok(())
    })();
    result.map_err(|e| e.context(c.cp.log_tails(5)))
}

fn knp(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}"
    )
}

pub fn kubernetes_network_policies(_shared: &ControlPlane) -> anyhow::Result<()> {
    let c = cluster("kn", &["node-a", "node-b"])?;
    let result = (|| -> anyhow::Result<()> {
        block_on(async {
            let nss: Api<Namespace> = Api::all(c.cp.client().await?);
            for (n, team) in [("empire", "empire"), ("rebels", "rebels")] {
                let ns: Namespace =
                    serde_json::from_value(json!({ "metadata": { "name": n, "labels": { "team": team } } }))?;
                nss.create(&PostParams::default(), &ns).await?;
            }
            anyhow::Ok(())
        })?;
        let http = json!([{ "name": "http", "containerPort": 80, "protocol": "TCP" }]);
        let ds = block_on(c.pod_with("node-a", "empire", "deathstar", json!({ "app": "deathstar" }), http))?;
        let tie_ip = block_on(c.pod_with("node-b", "empire", "tiefighter", json!({ "app": "tiefighter" }), json!([])))?;
        block_on(c.pod_with("node-b", "rebels", "xwing", json!({ "app": "xwing" }), json!([])))?;
        let ds_ns = c.pod_ns("node-a", "empire", "deathstar");
        let _servers = (serve(&ds_ns, 80)?, serve(&ds_ns, 8080)?);
        let tie = c.pod_ns("node-b", "empire", "tiefighter");
        let xwing = c.pod_ns("node-b", "rebels", "xwing");
        let back = routes_back(&c, ds, tie_ip);
        let ext1 = external_host(&c.prefix, "ext1", "192.168.210.100/24", &back)?;
        let ext2 = external_host(&c.prefix, "ext2", "192.168.210.101/24", &back)?;
        let _ext_server = serve(&ext1, 443)?;
        tcp(&c, "xwing before any policy", &xwing, ds, 80, true)?;

        // podSelector peers: the policy's namespace only; TCP by default.
        let spec = "  podSelector:\n    matchLabels:\n      app: deathstar\n  ingress:\n  - from:\n    - podSelector: {}\n    ports:\n    - port: 80\n";
        apply(&c, &knp("empire", "same-ns", spec))?;
        tcp(&c, "knp same-ns: xwing (other namespace)", &xwing, ds, 80, false)?;
        tcp(&c, "knp same-ns: tiefighter", &tie, ds, 80, true)?;
        tcp(&c, "knp same-ns: tiefighter 8080", &tie, ds, 8080, false)?;
        tcp(&c, "knp same-ns: ext1", &ext1, ds, 80, false)?;
        c.kubectl(&["delete", "networkpolicy", "same-ns", "-n", "empire"], None)?;

        // namespaceSelector on namespace labels.
        let spec = "  podSelector:\n    matchLabels:\n      app: deathstar\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabels:\n          team: rebels\n";
        apply(&c, &knp("empire", "rebels-only", spec))?;
        tcp(&c, "knp namespaceSelector: tiefighter", &tie, ds, 80, false)?;
        tcp(&c, "knp namespaceSelector: xwing", &xwing, ds, 8080, true)?;
        c.kubectl(&["delete", "networkpolicy", "rebels-only", "-n", "empire"], None)?;

        // ipBlock with except, and a named port.
        let spec = "  podSelector:\n    matchLabels:\n      app: deathstar\n  ingress:\n  - from:\n    - ipBlock:\n        cidr: 192.168.210.0/24\n        except:\n        - 192.168.210.101/32\n    ports:\n    - port: http\n";
        apply(&c, &knp("empire", "ipblock", spec))?;
        tcp(&c, "knp ipBlock: ext2 (the except)", &ext2, ds, 80, false)?;
        tcp(&c, "knp ipBlock: ext1", &ext1, ds, 80, true)?;
        tcp(&c, "knp ipBlock: ext1 8080 (not the named port)", &ext1, ds, 8080, false)?;
        tcp(&c, "knp ipBlock: tiefighter (a pod, not a CIDR)", &tie, ds, 80, false)?;
        c.kubectl(&["delete", "networkpolicy", "ipblock", "-n", "empire"], None)?;

        // policyTypes Ingress with no rule: deny all in.
        let spec = "  podSelector: {}\n  policyTypes:\n  - Ingress\n";
        apply(&c, &knp("empire", "deny-all", spec))?;
        tcp(&c, "knp deny-all: tiefighter", &tie, ds, 80, false)?;
        tcp(&c, "knp deny-all: xwing", &xwing, ds, 80, false)?;
        c.kubectl(&["delete", "networkpolicy", "deny-all", "-n", "empire"], None)?;

        // Egress from another namespace to the deathstar's port only.
        let spec = "  podSelector:\n    matchLabels:\n      app: xwing\n  policyTypes:\n  - Egress\n  egress:\n  - to:\n    - namespaceSelector: {}\n      podSelector:\n        matchLabels:\n          app: deathstar\n    ports:\n    - protocol: TCP\n      port: 80\n";
        apply(&c, &knp("rebels", "xwing-egress", spec))?;
        tcp(&c, "knp egress: xwing -> deathstar:8080", &xwing, ds, 8080, false)?;
        tcp(&c, "knp egress: xwing -> deathstar:80", &xwing, ds, 80, true)?;
        tcp(&c, "knp egress: xwing -> ext1:443", &xwing, Ipv4Addr::new(192, 168, 210, 100), 443, false)?;
        c.kubectl(&["delete", "networkpolicy", "xwing-egress", "-n", "rebels"], None)?;

        // A CiliumNetworkPolicy on namespace labels (identity labels
        // io.cilium.k8s.namespace.labels.*): no namespace restriction added.
        let spec = "  endpointSelector:\n    matchLabels:\n      app: deathstar\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        io.cilium.k8s.namespace.labels.team: rebels\n";
        apply(
            &c,
            &format!(
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: ns-labels\n  namespace: empire\nspec:\n{spec}"
            ),
        )?;
        tcp(&c, "cnp on namespace labels: tiefighter", &tie, ds, 80, false)?;
        tcp(&c, "cnp on namespace labels: xwing", &xwing, ds, 80, true)?;
        Ok(())
    })();
    result.map_err(|e| e.context(c.cp.log_tails(5)))
}
