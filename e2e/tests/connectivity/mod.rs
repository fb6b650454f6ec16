//! Upstream's `cilium connectivity test` L3/L4 policy scenarios, re-expressed
//! on our simulated nodes: the same pods (client and client2 on node-a,
//! client3 on node-b, echo-same-node with container port `http-8080` on
//! node-a, echo-other-node on node-b, each with its service account and
//! upstream's labels), the same policies (CNP, CCNP and KNP variants), the
//! same traffic (pod to pod on TCP 8080, client to client ping, pod to
//! external CIDR on TCP 443, pod to node ping, node to pod on TCP 8080) and
//! the verdicts upstream's test expects, checked with real packets.
//!
//! "External" is two hosts on the fabric: ExternalIP 192.168.210.100 and
//! ExternalOtherIP 192.168.210.101, inside ExternalCIDR 192.168.210.96/28
//! (upstream: 1.1.1.1, 1.0.0.1, 1.0.0.0/8). Out of scope, and why, in
//! docs/policy.md.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use e2e::netns::{can_connect, external_host, ping, serve};
use e2e::{ControlPlane, block_on};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use serde_json::json;

use crate::datapath::{Cluster, cluster};

const NS: &str = "cilium-test";
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 210, 100);
const EXTERNAL_OTHER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 210, 101);
const EXTERNAL_CIDR: &str = "192.168.210.96/28";

/// A pod of the test topology.
struct Pod {
    name: &'static str,
    node: &'static str,
    labels: &'static [(&'static str, &'static str)],
}

const PODS: &[Pod] = &[
    Pod { name: "client", node: "node-a", labels: &[("name", "client"), ("kind", "client")] },
    Pod { name: "client2", node: "node-a", labels: &[("name", "client2"), ("kind", "client"), ("other", "client")] },
    Pod {
        name: "client3",
        node: "node-b",
        labels: &[("name", "client3"), ("kind", "client"), ("other", "client-other-node")],
    },
    Pod {
        name: "echo-same-node",
        node: "node-a",
        labels: &[("name", "echo-same-node"), ("kind", "echo"), ("other", "echo")],
    },
    Pod {
        name: "echo-other-node",
        node: "node-b",
        labels: &[("name", "echo-other-node"), ("kind", "echo"), ("first", "echo")],
    },
];

fn has(pod: &str, key: &str, value: &str) -> bool {
    PODS.iter().any(|p| p.name == pod && p.labels.iter().any(|(k, v)| *k == key && *v == value))
}

fn has_key(pod: &str, key: &str) -> bool {
    PODS.iter().any(|p| p.name == pod && p.labels.iter().any(|(k, _)| *k == key))
}

/// One check of a scenario.
#[derive(Clone, Debug)]
enum Traffic {
    /// client pod -> echo pod, TCP 8080 (PodToPod).
    PodToPod { from: &'static str, to: &'static str },
    /// client pod -> client pod, ICMP echo (ClientToClient).
    ClientToClient { from: &'static str, to: &'static str },
    /// client pod -> external address, TCP 443 (PodToCIDR).
    PodToCidr { from: &'static str, to: Ipv4Addr },
    /// client pod -> node address, ICMP echo (PodToHost).
    PodToHost { from: &'static str, node: &'static str },
    /// node -> echo pod, TCP 8080 (HostToPod).
    HostToPod { node: &'static str, to: &'static str },
}

const CLIENTS: &[&str] = &["client", "client2", "client3"];
const ECHOS: &[&str] = &["echo-same-node", "echo-other-node"];

fn pod_to_pod(from: &[&'static str]) -> Vec<Traffic> {
    from.iter().flat_map(|f| ECHOS.iter().map(move |t| Traffic::PodToPod { from: f, to: t })).collect()
}

fn client_to_client() -> Vec<Traffic> {
    CLIENTS
        .iter()
        .flat_map(|f| CLIENTS.iter().filter(move |t| *t != f).map(move |t| Traffic::ClientToClient { from: f, to: t }))
        .collect()
}

fn pod_to_cidr() -> Vec<Traffic> {
    CLIENTS.iter().flat_map(|f| [EXTERNAL_IP, EXTERNAL_OTHER_IP].map(|to| Traffic::PodToCidr { from: f, to })).collect()
}

fn pod_to_host() -> Vec<Traffic> {
    CLIENTS.iter().flat_map(|f| ["node-a", "node-b"].map(|node| Traffic::PodToHost { from: f, node })).collect()
}

fn host_to_pod() -> Vec<Traffic> {
    ["node-a", "node-b"].iter().flat_map(|n| ECHOS.iter().map(move |t| Traffic::HostToPod { node: n, to: t })).collect()
}

/// A scenario: its manifests, its traffic, and upstream's expectation
/// (true: the connection succeeds).
struct Scenario {
    name: &'static str,
    manifests: Vec<String>,
    traffic: Vec<Traffic>,
    expect: fn(&Traffic) -> bool,
}

fn cnp(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n{spec}"
    )
}

fn ccnp(name: &str, spec: &str) -> String {
    format!("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

fn knp(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n{spec}"
    )
}

const CLUSTER_EXISTS: &str = "{ key: io.cilium.k8s.policy.cluster, operator: Exists }";

fn allow_all_egress() -> String {
    cnp(
        "allow-all-egress",
        &format!(
            "  endpointSelector: {{}}\n  egress:\n  - toEndpoints:\n    - matchExpressions:\n      - {CLUSTER_EXISTS}\n  - toCIDR:\n    - 0.0.0.0/0\n    - ::/0\n"
        ),
    )
}

fn allow_all_ingress() -> String {
    cnp(
        "allow-all-ingress",
        &format!(
            "  endpointSelector: {{}}\n  ingress:\n  - fromEndpoints:\n    - matchExpressions:\n      - {CLUSTER_EXISTS}\n"
        ),
    )
}

fn with_allow_all(mut m: Vec<String>) -> Vec<String> {
    m.insert(0, allow_all_egress());
    m.insert(1, allow_all_ingress());
    m
}

fn client_egress_to_echo(name: &str, ports: &str, cluster: bool) -> String {
    let expr = if cluster { format!("\n      matchExpressions:\n      - {CLUSTER_EXISTS}") } else { String::new() };
    cnp(
        name,
        &format!(
            "  endpointSelector:\n    matchLabels:\n      kind: client\n  egress:\n  - toPorts:\n    - ports:\n{ports}    toEndpoints:\n    - matchLabels:\n        io.kubernetes.pod.namespace: {NS}\n        kind: echo{expr}\n"
        ),
    )
}

const PORT_8080: &str = "      - port: \"8080\"\n        protocol: TCP\n";
const PORT_RANGE: &str = "      - port: \"4096\"\n        endPort: 8191\n        protocol: TCP\n";

fn scenarios() -> Vec<Scenario> {
    let ok = |_: &Traffic| true;
    let mut v = vec![
        Scenario {
            name: "no-policies",
            manifests: vec![],
            traffic: [pod_to_pod(CLIENTS), client_to_client(), pod_to_cidr(), pod_to_host(), host_to_pod()].concat(),
            expect: ok,
        },
        Scenario {
            name: "allow-all-except-world",
            manifests: vec![cnp(
                "allow-all-except-world",
                &format!(
                    "  endpointSelector: {{}}\n  egress:\n  - toEntities:\n    - host\n    - remote-node\n    - cluster\n    - init\n    - health\n    - kube-apiserver\n  - toEndpoints:\n    - matchExpressions:\n      - {CLUSTER_EXISTS}\n  - toPorts:\n    - ports:\n      - port: \"53\"\n        protocol: UDP\n      - port: \"53\"\n        protocol: TCP\n    toEntities:\n      - world\n  ingress:\n  - fromEntities:\n    - host\n    - remote-node\n    - cluster\n    - init\n    - health\n    - kube-apiserver\n  - fromEndpoints:\n    - matchExpressions:\n      - {CLUSTER_EXISTS}\n"
                ),
            )],
            traffic: [pod_to_pod(CLIENTS), client_to_client(), pod_to_host()].concat(),
            expect: ok,
        },
        Scenario {
            name: "client-ingress",
            manifests: vec![cnp(
                "client-ingress-from-client2",
                "  endpointSelector:\n    matchLabels:\n      kind: client\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        other: client\n",
            )],
            traffic: client_to_client(),
            expect: |t| matches!(t, Traffic::ClientToClient { from, .. } if has(from, "other", "client")),
        },
        Scenario {
            name: "client-ingress-knp",
            manifests: vec![knp(
                "client-ingress-from-client2",
                &format!(
                    "  podSelector:\n    matchLabels:\n      kind: client\n  ingress:\n    - from:\n        - podSelector:\n            matchLabels:\n              other: client\n            matchExpressions:\n            - {CLUSTER_EXISTS}\n"
                ),
            )],
            traffic: client_to_client(),
            expect: |t| matches!(t, Traffic::ClientToClient { from, .. } if has(from, "other", "client")),
        },
        Scenario {
            name: "all-ingress-deny",
            manifests: vec![cnp("all-ingress-deny", "  endpointSelector: {}\n  ingress:\n    - {}\n")],
            traffic: [pod_to_pod(CLIENTS), pod_to_cidr()].concat(),
            expect: |t| matches!(t, Traffic::PodToCidr { .. }),
        },
        Scenario {
            name: "all-ingress-deny-knp",
            manifests: vec![knp("all-ingress-deny", "  podSelector: {}\n  policyTypes:\n  - Ingress\n")],
            traffic: [pod_to_pod(CLIENTS), pod_to_cidr()].concat(),
            expect: |t| matches!(t, Traffic::PodToCidr { .. }),
        },
        Scenario {
            name: "all-egress-deny",
            manifests: vec![cnp("all-egress-deny", "  endpointSelector: {}\n  egress:\n    - {}\n")],
            traffic: pod_to_pod(CLIENTS),
            expect: |_| false,
        },
        Scenario {
            name: "all-egress-deny-knp",
            manifests: vec![knp("all-egress-deny", "  podSelector: {}\n  policyTypes:\n  - Egress\n")],
            traffic: pod_to_pod(CLIENTS),
            expect: |_| false,
        },
        Scenario {
            name: "all-entities-deny",
            manifests: vec![cnp(
                "all-entities-deny",
                "  endpointSelector: {}\n  egressDeny:\n  - toEntities:\n    - \"all\"\n",
            )],
            traffic: [pod_to_pod(CLIENTS), pod_to_cidr()].concat(),
            expect: |_| false,
        },
        Scenario {
            name: "cluster-entity",
            manifests: vec![cnp(
                "entity-cluster",
                "  endpointSelector:\n    matchLabels:\n      kind: client\n  egress:\n    - toEntities:\n        - cluster\n",
            )],
            traffic: CLIENTS.iter().map(|f| Traffic::PodToPod { from: f, to: "echo-same-node" }).collect(),
            expect: ok,
        },
        Scenario {
            name: "host-entity-egress",
            manifests: vec![cnp(
                "host-cluster-egress",
                "  endpointSelector:\n    matchLabels: {}\n  egress:\n    - toEntities:\n        - host\n        - remote-node\n",
            )],
            traffic: [pod_to_host(), pod_to_pod(&["client"])].concat(),
            expect: |t| matches!(t, Traffic::PodToHost { .. }),
        },
        Scenario {
            name: "host-entity-ingress",
            manifests: vec![cnp(
                "host-cluster-ingress",
                "  endpointSelector:\n    matchLabels: {}\n  ingress:\n    - fromEntities:\n        - host\n        - remote-node\n",
            )],
            traffic: [host_to_pod(), pod_to_pod(&["client"])].concat(),
            expect: |t| matches!(t, Traffic::HostToPod { .. }),
        },
        Scenario {
            name: "echo-ingress",
            manifests: vec![cnp(
                "echo-ingress-from-other-client",
                &format!(
                    "  endpointSelector:\n    matchLabels:\n      kind: echo\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        other: client\n      matchExpressions:\n      - {CLUSTER_EXISTS}\n"
                ),
            )],
            traffic: pod_to_pod(CLIENTS),
            expect: |t| matches!(t, Traffic::PodToPod { from, .. } if has(from, "other", "client")),
        },
        Scenario {
            name: "echo-ingress-knp",
            manifests: vec![knp(
                "echo-ingress-from-other-client",
                &format!(
                    "  podSelector:\n    matchLabels:\n      kind: echo\n  ingress:\n    - from:\n        - podSelector:\n            matchLabels:\n              other: client\n            matchExpressions:\n            - {CLUSTER_EXISTS}\n"
                ),
            )],
            traffic: pod_to_pod(CLIENTS),
            expect: |t| matches!(t, Traffic::PodToPod { from, .. } if has(from, "other", "client")),
        },
        Scenario {
            name: "client-ingress-icmp",
            manifests: vec![cnp(
                "client-ingress-from-client2-icmp",
                &format!(
                    "  endpointSelector:\n    matchLabels:\n      kind: client\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        other: client\n      matchExpressions:\n      - {CLUSTER_EXISTS}\n    icmps:\n    - fields:\n      - family: IPv4\n        type: 8\n      - family: IPv6\n        type: 128\n"
                ),
            )],
            traffic: client_to_client(),
            expect: |t| matches!(t, Traffic::ClientToClient { from, .. } if has(from, "other", "client")),
        },
        Scenario {
            name: "client-egress",
            manifests: vec![client_egress_to_echo("client-egress-to-echo", PORT_8080, true)],
            traffic: pod_to_pod(CLIENTS),
            expect: ok,
        },
        Scenario {
            name: "client-egress-port-range",
            manifests: vec![client_egress_to_echo("client-egress-to-echo-port-range", PORT_RANGE, false)],
            traffic: pod_to_pod(CLIENTS),
            expect: ok,
        },
        Scenario {
            name: "client-egress-knp",
            manifests: vec![knp(
                "client-egress-to-echo",
                &format!(
                    "  podSelector:\n    matchLabels:\n      kind: client\n  egress:\n    - to:\n        - podSelector:\n            matchLabels:\n              kind: echo\n            matchExpressions:\n              - {CLUSTER_EXISTS}\n      ports:\n        - port: 8080\n          protocol: TCP\n"
                ),
            )],
            traffic: [pod_to_pod(CLIENTS), pod_to_cidr()].concat(),
            expect: |t| matches!(t, Traffic::PodToPod { .. }),
        },
        // Needs a current API server: 1.20 dropped `endPort` (the policy
        // then allowed port 4096 only and the echo on 8080 was dropped).
        Scenario {
            name: "client-egress-knp-port-range",
            manifests: vec![knp(
                "client-egress-to-echo-port-range",
                &format!(
                    "  podSelector:\n    matchLabels:\n      kind: client\n  egress:\n    - to:\n        - podSelector:\n            matchLabels:\n              kind: echo\n            matchExpressions:\n              - {CLUSTER_EXISTS}\n      ports:\n        - port: 4096\n          endPort: 8191\n          protocol: TCP\n"
                ),
            )],
            traffic: [pod_to_pod(CLIENTS), pod_to_cidr()].concat(),
            expect: |t| matches!(t, Traffic::PodToPod { .. }),
        },
        Scenario {
            name: "client-egress-expression",
            manifests: vec![cnp(
                "client-egress-to-echo-expression",
                &format!(
                    "  endpointSelector:\n    matchExpressions:\n    - {{ key: 'other', operator: Exists }}\n  egress:\n  - toPorts:\n    - ports:\n{PORT_8080}    toEndpoints:\n    - matchLabels:\n        io.kubernetes.pod.namespace: {NS}\n        kind: echo\n      matchExpressions:\n      - {CLUSTER_EXISTS}\n"
                ),
            )],
            traffic: [pod_to_pod(CLIENTS), pod_to_cidr()].concat(),
            // The selector picks client2 and client3: their other egress is closed.
            expect: |t| match t {
                Traffic::PodToPod { .. } => true,
                Traffic::PodToCidr { from, .. } => !has_key(from, "other"),
                _ => unreachable!(),
            },
        },
        Scenario {
            name: "client-egress-expression-port-range",
            manifests: vec![cnp(
                "client-egress-to-echo-expression-port-range",
                &format!(
                    "  endpointSelector:\n    matchExpressions:\n    - {{ key: 'other', operator: Exists }}\n  egress:\n  - toPorts:\n    - ports:\n      - port: \"4196\"\n        endPort: 8191\n        protocol: TCP\n    toEndpoints:\n    - matchLabels:\n        io.kubernetes.pod.namespace: {NS}\n        kind: echo\n      matchExpressions:\n      - {CLUSTER_EXISTS}\n"
                ),
            )],
            traffic: pod_to_pod(CLIENTS),
            expect: ok,
        },
        Scenario {
            name: "client-egress-expression-knp",
            manifests: vec![knp(
                "client-egress-to-echo-expression",
                &format!(
                    "  podSelector:\n    matchExpressions:\n      - {{ key: 'other', operator: Exists }}\n  policyTypes:\n    - Egress\n  egress:\n    - to:\n        - podSelector:\n            matchLabels:\n              kind: echo\n            matchExpressions:\n              - {CLUSTER_EXISTS}\n      ports:\n        - protocol: TCP\n          port: 8080\n"
                ),
            )],
            traffic: pod_to_pod(CLIENTS),
            expect: ok,
        },
    ];
    for (name, ports) in [("", PORT_8080), ("-port-range", PORT_RANGE)] {
        v.push(Scenario {
            name: if name.is_empty() {
                "client-with-service-account-egress-to-echo"
            } else {
                "client-with-service-account-egress-to-echo-port-range"
            },
            manifests: vec![cnp(
                &format!("client-with-service-account-egress-to-echo{name}"),
                &format!("  endpointSelector:\n    matchLabels:\n      io.cilium.k8s.policy.serviceaccount: client\n  egress:\n  - toPorts:\n    - ports:\n{ports}    toEndpoints:\n    - matchLabels:\n        io.kubernetes.pod.namespace: {NS}\n        kind: echo\n"),
            )],
            traffic: [pod_to_pod(CLIENTS), pod_to_cidr()].concat(),
            expect: |t| match t {
                Traffic::PodToPod { .. } => true,
                Traffic::PodToCidr { from, .. } => *from != "client",
                _ => unreachable!(),
            },
        });
        v.push(Scenario {
            name: if name.is_empty() {
                "client-egress-to-echo-service-account"
            } else {
                "client-egress-to-echo-service-account-port-range"
            },
            manifests: vec![cnp(
                &format!("client-egress-to-echo-service-account{name}"),
                &format!("  endpointSelector:\n    matchLabels:\n      kind: client\n  egress:\n  - toPorts:\n    - ports:\n{ports}    toEndpoints:\n    - matchLabels:\n        io.cilium.k8s.policy.serviceaccount: echo-same-node\n"),
            )],
            traffic: pod_to_pod(CLIENTS),
            expect: |t| matches!(t, Traffic::PodToPod { to: "echo-same-node", .. }),
        });
        v.push(Scenario {
            name: if name.is_empty() { "client-egress-to-echo-deny" } else { "client-egress-to-echo-deny-port-range" },
            manifests: with_allow_all(vec![cnp(
                &format!("client-egress-to-echo-deny{name}"),
                &format!("  endpointSelector:\n    matchLabels:\n      kind: client\n  egressDeny:\n  - toPorts:\n    - ports:\n{ports}    toEndpoints:\n    - matchLabels:\n        io.kubernetes.pod.namespace: {NS}\n        kind: echo\n"),
            )]),
            traffic: [client_to_client(), pod_to_pod(CLIENTS)].concat(),
            expect: |t| matches!(t, Traffic::ClientToClient { .. }),
        });
        v.push(Scenario {
            name: if name.is_empty() {
                "client-egress-to-echo-expression-deny"
            } else {
                "client-egress-to-echo-expression-deny-port-range"
            },
            manifests: with_allow_all(vec![cnp(
                &format!("client-egress-to-echo-expression-deny{name}"),
                &format!("  endpointSelector:\n    matchExpressions:\n    - {{ key: 'name', operator: In, values: [ 'client' ] }}\n  egressDeny:\n  - toPorts:\n    - ports:\n{ports}    toEndpoints:\n    - matchExpressions:\n      - {{ key: 'kind', operator: In, values: [ \"echo\" ] }}\n"),
            )]),
            traffic: pod_to_pod(&["client", "client2"]),
            expect: |t| matches!(t, Traffic::PodToPod { from, .. } if *from != "client"),
        });
        v.push(Scenario {
            name: if name.is_empty() {
                "client-with-service-account-egress-to-echo-deny"
            } else {
                "client-with-service-account-egress-to-echo-deny-port-range"
            },
            manifests: with_allow_all(vec![cnp(
                &format!("client-with-service-account-egress-to-echo-deny{name}"),
                &format!("  endpointSelector:\n    matchLabels:\n      io.cilium.k8s.policy.serviceaccount: client\n  egressDeny:\n  - toPorts:\n    - ports:\n{ports}    toEndpoints:\n    - matchLabels:\n        io.kubernetes.pod.namespace: {NS}\n        kind: echo\n"),
            )]),
            traffic: pod_to_pod(&["client", "client2"]),
            expect: |t| matches!(t, Traffic::PodToPod { from, .. } if *from != "client"),
        });
        v.push(Scenario {
            name: if name.is_empty() {
                "client-egress-to-echo-service-account-deny"
            } else {
                "client-egress-to-echo-service-account-deny-port-range"
            },
            manifests: with_allow_all(vec![cnp(
                &format!("client-egress-to-echo-service-account-deny{name}"),
                &format!("  endpointSelector:\n    matchLabels:\n      io.cilium.k8s.policy.serviceaccount: client\n  egressDeny:\n  - toPorts:\n    - ports:\n{ports}    toEndpoints:\n    - matchLabels:\n        io.cilium.k8s.policy.serviceaccount: echo-same-node\n"),
            )]),
            traffic: pod_to_pod(&["client"]),
            expect: |t| !matches!(t, Traffic::PodToPod { to: "echo-same-node", .. }),
        });
    }
    let cidr_set = |except: Ipv4Addr| {
        format!("  - toCIDRSet:\n    - cidr: \"{EXTERNAL_CIDR}\"\n      except:\n      - \"{except}/32\"\n")
    };
    v.extend([
        Scenario {
            name: "to-cidr-external",
            manifests: vec![cnp(
                "client-egress-to-cidr",
                &format!("  endpointSelector:\n    matchLabels:\n      kind: client\n  egress:\n{}", cidr_set(EXTERNAL_OTHER_IP)),
            )],
            traffic: pod_to_cidr(),
            expect: |t| matches!(t, Traffic::PodToCidr { to, .. } if *to == EXTERNAL_IP),
        },
        Scenario {
            name: "to-cidr-external-knp",
            manifests: vec![knp(
                "client-egress-to-cidr",
                &format!("  podSelector:\n    matchLabels:\n      kind: client\n  egress:\n    - to:\n        - ipBlock:\n            cidr: \"{EXTERNAL_CIDR}\"\n            except:\n              - \"{EXTERNAL_OTHER_IP}/32\"\n"),
            )],
            traffic: pod_to_cidr(),
            expect: |t| matches!(t, Traffic::PodToCidr { to, .. } if *to == EXTERNAL_IP),
        },
        Scenario {
            name: "echo-ingress-from-other-client-deny",
            manifests: with_allow_all(vec![cnp(
                "echo-ingress-from-other-client-deny",
                &format!("  endpointSelector:\n    matchLabels:\n      kind: echo\n  ingressDeny:\n  - fromEndpoints:\n    - matchLabels:\n        other: client\n      matchExpressions:\n      - {CLUSTER_EXISTS}\n"),
            )]),
            traffic: [pod_to_pod(&["client", "client2"]), client_to_client()].concat(),
            expect: |t| !matches!(t, Traffic::PodToPod { from, .. } if has(from, "other", "client")),
        },
        Scenario {
            name: "client-ingress-from-other-client-icmp-deny",
            manifests: with_allow_all(vec![cnp(
                "client-ingress-from-other-client-icmp-deny",
                &format!("  endpointSelector:\n    matchLabels:\n      kind: client\n  ingressDeny:\n  - fromEndpoints:\n    - matchLabels:\n        other: client\n      matchExpressions:\n      - {CLUSTER_EXISTS}\n    icmps:\n    - fields:\n      - family: IPv4\n        type: 8\n      - family: IPv6\n        type: 128\n"),
            )]),
            traffic: [pod_to_pod(CLIENTS), client_to_client()].concat(),
            expect: |t| !matches!(t, Traffic::ClientToClient { from, .. } if has(from, "other", "client")),
        },
        Scenario {
            name: "client-ingress-to-echo-named-port-deny",
            manifests: with_allow_all(vec![cnp(
                "client-ingress-to-echo-named-port-deny",
                &format!("  endpointSelector:\n    matchLabels:\n      kind: echo\n  ingressDeny:\n  - toPorts:\n    - ports:\n      - port: \"http-8080\"\n        protocol: TCP\n    fromEndpoints:\n    - matchLabels:\n        io.kubernetes.pod.namespace: {NS}\n        name: client\n      matchExpressions:\n        - {CLUSTER_EXISTS}\n"),
            )]),
            traffic: pod_to_pod(&["client", "client2"]),
            expect: |t| matches!(t, Traffic::PodToPod { from, .. } if *from != "client"),
        },
        Scenario {
            name: "client-egress-to-cidr-deny",
            manifests: vec![
                allow_all_egress(),
                cnp(
                    "client-egress-to-cidr-deny",
                    &format!("  endpointSelector:\n    matchLabels:\n      kind: client\n  egressDeny:\n{}", cidr_set(EXTERNAL_IP)),
                ),
            ],
            traffic: pod_to_cidr(),
            expect: |t| matches!(t, Traffic::PodToCidr { to, .. } if *to == EXTERNAL_IP),
        },
        Scenario {
            name: "client-egress-to-cidr-deny-default",
            manifests: vec![cnp(
                "client-egress-to-cidr-deny",
                &format!("  endpointSelector:\n    matchLabels:\n      kind: client\n  egressDeny:\n{}", cidr_set(EXTERNAL_IP)),
            )],
            traffic: pod_to_cidr(),
            expect: |_| false,
        },
        // CCNP variants (upstream's -ccnp twins: clusterwide, no cluster expression).
        Scenario {
            name: "all-ingress-deny-ccnp",
            manifests: vec![ccnp("all-ingress-deny-ccnp", "  endpointSelector: {}\n  ingress:\n    - {}\n")],
            traffic: [pod_to_pod(CLIENTS), pod_to_cidr()].concat(),
            expect: |t| matches!(t, Traffic::PodToCidr { .. }),
        },
        Scenario {
            name: "echo-ingress-ccnp",
            manifests: vec![ccnp(
                "echo-ingress-from-other-client-ccnp",
                "  endpointSelector:\n    matchLabels:\n      kind: echo\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        other: client\n",
            )],
            traffic: pod_to_pod(CLIENTS),
            expect: |t| matches!(t, Traffic::PodToPod { from, .. } if has(from, "other", "client")),
        },
        Scenario {
            name: "client-egress-ccnp",
            manifests: vec![ccnp(
                "client-egress-to-echo-ccnp",
                &format!("  endpointSelector:\n    matchLabels:\n      kind: client\n  egress:\n  - toPorts:\n    - ports:\n{PORT_8080}    toEndpoints:\n    - matchLabels:\n        io.kubernetes.pod.namespace: {NS}\n        kind: echo\n"),
            )],
            traffic: [pod_to_pod(CLIENTS), pod_to_cidr()].concat(),
            expect: |t| matches!(t, Traffic::PodToPod { .. }),
        },
    ]);
    v
}

struct Topology<'c> {
    c: &'c Cluster,
    ips: BTreeMap<&'static str, Ipv4Addr>,
}

impl Topology<'_> {
    fn ns(&self, pod: &str) -> String {
        let node = PODS.iter().find(|p| p.name == pod).map(|p| p.node).unwrap_or("node-a");
        self.c.pod_ns(node, NS, pod)
    }

    /// Whether the traffic gets through (one attempt).
    fn probe(&self, t: &Traffic, id: u16) -> anyhow::Result<bool> {
        let wait = Duration::from_millis(600);
        match t {
            Traffic::PodToPod { from, to } => can_connect(&self.ns(from), self.ips[to], 8080, wait),
            Traffic::ClientToClient { from, to } => ping(&self.ns(from), self.ips[to], id, wait),
            Traffic::PodToCidr { from, to } => can_connect(&self.ns(from), *to, 443, wait),
            Traffic::PodToHost { from, node } => ping(&self.ns(from), self.c.node_ips[*node], id, wait),
            Traffic::HostToPod { node, to } => {
                can_connect(&format!("{}-{node}", self.c.prefix), self.ips[to], 8080, wait)
            }
        }
    }
}

/// Runs every probe in parallel until each gives its expected result (the
/// policy may still be on its way to the agents) or `timeout` passes; then
/// once more, all at once, to be sure nothing flips back.
fn check(top: &Topology, s: &Scenario, timeout: Duration) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut round = 0u16;
    loop {
        round += 1;
        let results: Vec<(Traffic, bool, bool)> = std::thread::scope(|scope| {
            let handles: Vec<_> = s
                .traffic
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let id = 1000 + round * 64 + i as u16;
                    scope.spawn(move || (t.clone(), (s.expect)(t), top.probe(t, id).unwrap_or(false)))
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("probe thread")).collect()
        });
        let wrong: Vec<String> = results
            .iter()
            .filter(|(_, want, got)| want != got)
            .map(|(t, want, _)| format!("{t:?}: expected {}", if *want { "allowed" } else { "dropped" }))
            .collect();
        if wrong.is_empty() {
            return Ok(());
        }
        if t0.elapsed() > timeout {
            bail!(
                "scenario {}: {} of {} checks wrong:\n{}\n{}",
                s.name,
                wrong.len(),
                results.len(),
                wrong.join("\n"),
                top.c.agent_logs()
            );
        }
    }
}

pub fn upstream_connectivity_scenarios(_shared: &ControlPlane) -> anyhow::Result<()> {
    let c = cluster("ct", &["node-a", "node-b"])?;
    let result = (|| -> anyhow::Result<()> {
        block_on(async {
            let client = c.cp.client().await?;
            let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": NS } }))?;
            Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
            for p in PODS {
                let sa: ServiceAccount =
                    serde_json::from_value(json!({ "metadata": { "name": p.name, "namespace": NS } }))?;
                Api::<ServiceAccount>::namespaced(client.clone(), NS).create(&PostParams::default(), &sa).await?;
            }
            anyhow::Ok(())
        })?;
        let mut ips = BTreeMap::new();
        for p in PODS {
            let labels: serde_json::Map<String, serde_json::Value> =
                p.labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
            let ports = if p.name.starts_with("echo") {
                json!([{ "name": "http-8080", "containerPort": 8080, "protocol": "TCP" }])
            } else {
                json!([])
            };
            let ip = block_on(c.pod_sa(p.node, NS, p.name, json!(labels), ports, Some(p.name)))?;
            ips.insert(p.name, ip);
        }
        let top = Topology { c: &c, ips };
        let _servers: Vec<_> = ECHOS.iter().map(|e| serve(&top.ns(e), 8080)).collect::<Result<_, _>>()?;
        let net = |ip: Ipv4Addr| format!("{}.{}.{}.0/24", ip.octets()[0], ip.octets()[1], ip.octets()[2]);
        let back =
            vec![(net(top.ips["client"]), c.node_ips["node-a"]), (net(top.ips["client3"]), c.node_ips["node-b"])];
        let ext = external_host(&c.prefix, "ext", &format!("{EXTERNAL_IP}/24"), &back)?;
        let ext_other = external_host(&c.prefix, "extother", &format!("{EXTERNAL_OTHER_IP}/24"), &back)?;
        let _ext_servers = (serve(&ext, 443)?, serve(&ext_other, 443)?);
        let all = scenarios();
        for s in &all {
            for m in &s.manifests {
                c.kubectl(&["apply", "-f", "-"], Some(m)).with_context(|| format!("scenario {}", s.name))?;
            }
            check(&top, s, Duration::from_secs(30))?;
            for m in s.manifests.iter().rev() {
                c.kubectl(&["delete", "-f", "-", "--wait=true"], Some(m))?;
            }
            // Back to no policy before the next scenario.
            check(
                &top,
                &Scenario { name: "cleanup", manifests: vec![], traffic: s.traffic.clone(), expect: |_| true },
                Duration::from_secs(30),
            )?;
            eprintln!("connectivity: {} ok ({} checks)", s.name, s.traffic.len());
        }
        eprintln!("connectivity: {} upstream scenarios passed", all.len());
        Ok(())
    })();
    result.map_err(|e| e.context(c.cp.log_tails(5)))
}
