//! Differential test against upstream Cilium's own policy engine.
//!
//! Generated policy sets (CNPs and CCNPs with random selectors, entities,
//! CIDRs with excepts, node selectors (with and without
//! `enable-node-selector-labels`), ports, ranges, named ports, protocols,
//! ICMP types, deny rules and default-deny settings) over a fixed set of
//! identities
//! are judged twice:
//!
//! - ours: parsed and compiled by `cilium-policy`, written into the maps
//!   as the agent writes them, and every query sent as a real frame
//!   through `bpf/policy.c` (BPF_PROG_TEST_RUN);
//! - upstream's: `policy-oracle` (scripts/oracle: github.com/cilium/cilium
//!   pkg/policy, built by scripts/setup.sh), asked for the verdict of the
//!   same (subject, direction, peer identity, protocol, port).
//!
//! Every verdict and every policy's validity must agree, and the policy
//! trace (`cilium_policy::trace`, what `ciliumctl policy trace` prints)
//! must reach the same verdict rule by rule. The peer of a
//! query is an address; its identity is the longest prefix in the same
//! ipcache the kernel holds (pods, nodes, the policies' CIDRs, world).
//!
//! `DIFF_CASES` sets the number of policy sets (default 700, ~160 queries
//! each); `DIFF_SEED` replays a run (the seed is printed, and proptest
//! prints the smallest failing policy set).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use cilium_crds::policy::{CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy};
use cilium_policy::engine::{NamedPort, Selections, Universe};
use cilium_policy::identity::{LOCAL_FLAG, cidr_labels};
use cilium_policy::{Config, Entry, LabelSet, Prefix};
use common::*;
use node_agent_stub::datapath::{DIR_EGRESS, DIR_INGRESS};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{Value, json};

// ---------------------------------------------------------------- the fixed cluster

struct Pod {
    id: u32,
    v4: &'static str,
    v6: &'static str,
    labels: &'static [&'static str],
}

const PODS: &[Pod] = &[
    Pod {
        id: 1001,
        v4: "10.0.0.1",
        v6: "fd00::1",
        labels: &[
            "k8s:app=web",
            "k8s:tier=front",
            "k8s:io.kubernetes.pod.namespace=default",
            "k8s:io.cilium.k8s.namespace.labels.team=a",
            "k8s:io.cilium.k8s.policy.serviceaccount=web",
        ],
    },
    Pod {
        id: 1002,
        v4: "10.0.0.2",
        v6: "fd00::2",
        labels: &[
            "k8s:app=db",
            "k8s:tier=back",
            "k8s:io.kubernetes.pod.namespace=default",
            "k8s:io.cilium.k8s.namespace.labels.team=a",
            "k8s:io.cilium.k8s.policy.serviceaccount=db",
        ],
    },
    Pod {
        id: 1003,
        v4: "10.0.0.3",
        v6: "fd00::3",
        labels: &[
            "k8s:app=api",
            "k8s:tier=back",
            "k8s:io.kubernetes.pod.namespace=default",
            "k8s:io.cilium.k8s.namespace.labels.team=a",
            "k8s:io.cilium.k8s.policy.serviceaccount=default",
        ],
    },
    Pod {
        id: 1004,
        v4: "10.0.1.1",
        v6: "fd00::11",
        labels: &[
            "k8s:app=web",
            "k8s:tier=front",
            "k8s:io.kubernetes.pod.namespace=other",
            "k8s:io.cilium.k8s.namespace.labels.team=b",
            "k8s:io.cilium.k8s.policy.serviceaccount=default",
        ],
    },
    Pod {
        id: 1005,
        v4: "10.0.1.2",
        v6: "fd00::12",
        labels: &[
            "k8s:app=db",
            "k8s:io.kubernetes.pod.namespace=other",
            "k8s:io.cilium.k8s.namespace.labels.team=b",
            "k8s:io.cilium.k8s.policy.serviceaccount=default",
        ],
    },
];

/// Every pod carries the cluster label (the agent adds it).
const CLUSTER_LABEL: &str = "k8s:io.cilium.k8s.policy.cluster=default";

/// Named container ports of some pods.
fn named_ports(id: u32) -> Vec<NamedPort> {
    match id {
        1002 => vec![
            NamedPort { name: "http".into(), proto: TCP, port: 8080 },
            NamedPort { name: "dns".into(), proto: UDP, port: 53 },
        ],
        1003 => vec![NamedPort { name: "http".into(), proto: TCP, port: 80 }],
        1005 => vec![NamedPort { name: "http".into(), proto: TCP, port: 9090 }],
        _ => vec![],
    }
}

const HOST_IP: &str = "192.168.1.1";
const REMOTE_NODE_IP: &str = "192.168.1.2";
const REMOTE_NODE2_IP: &str = "192.168.1.3";

/// Node labels (with `enable-node-selector-labels` the nodes' identities
/// carry them): this node, and the two remote nodes by address.
const NODES: &[(&str, &[(&str, &str)])] = &[
    (HOST_IP, &[("kubernetes.io/hostname", "node-a"), ("zone", "a"), ("role", "worker")]),
    (REMOTE_NODE_IP, &[("kubernetes.io/hostname", "node-b"), ("zone", "b"), ("role", "worker")]),
    (REMOTE_NODE2_IP, &[("kubernetes.io/hostname", "node-c"), ("zone", "a"), ("role", "control-plane")]),
];

/// CIDRs the generated policies name (pairs nest and overlap on purpose).
const CIDRS: &[&str] = &[
    "192.0.2.0/24",
    "192.0.2.0/28",
    "192.0.2.16/28",
    "192.0.2.5/32",
    "198.51.100.0/24",
    "198.51.100.128/25",
    "203.0.113.0/24",
    "192.0.0.0/8",
    "0.0.0.0/0",
    "2001:db8::/32",
    "2001:db8:1::/48",
    "::/0",
];

/// Excepts, each inside the CIDR it is generated with.
fn excepts_of(cidr: &str) -> &'static [&'static str] {
    match cidr {
        "192.0.2.0/24" => &["192.0.2.0/28", "192.0.2.5/32", "192.0.2.128/25"],
        "192.0.2.0/28" => &["192.0.2.5/32"],
        "198.51.100.0/24" => &["198.51.100.128/25"],
        "192.0.0.0/8" => &["192.0.2.0/24", "192.0.2.16/28"],
        "0.0.0.0/0" => &["192.0.2.0/24", "10.0.0.0/8"],
        "2001:db8::/32" => &["2001:db8:1::/48"],
        "::/0" => &["2001:db8::/32"],
        _ => &[],
    }
}

/// Peer addresses of the queries: pods, nodes, inside and outside the CIDRs.
const WORLD_ADDRS: &[&str] = &[
    "192.0.2.5",
    "192.0.2.3",
    "192.0.2.17",
    "192.0.2.200",
    "198.51.100.7",
    "198.51.100.200",
    "203.0.113.9",
    "192.1.2.3",
    "8.8.8.8",
    "2001:db8::5",
    "2001:db8:1::9",
    "2001:db9::1",
];

// ---------------------------------------------------------------- generation

fn pick<T: Clone + std::fmt::Debug + 'static>(items: &'static [T]) -> impl Strategy<Value = T> {
    proptest::sample::select(items)
}

fn selector() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({})),
        pick(&["web", "db", "api", "nope"]).prop_map(|a| json!({"matchLabels": {"app": a}})),
        pick(&["front", "back"]).prop_map(|t| json!({"matchLabels": {"k8s:tier": t}})),
        Just(json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "api"]}]})),
        Just(json!({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]})),
        Just(json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]})),
        pick(&["default", "other"]).prop_map(|n| json!({"matchLabels": {"k8s:io.kubernetes.pod.namespace": n}})),
        pick(&["default", "other"])
            .prop_map(|n| json!({"matchLabels": {"io.kubernetes.pod.namespace": n, "app": "web"}})),
        pick(&["a", "b"]).prop_map(|t| json!({"matchLabels": {"io.cilium.k8s.namespace.labels.team": t}})),
        Just(json!({"matchLabels": {"io.cilium.k8s.policy.serviceaccount": "db"}})),
        Just(json!({"matchLabels": {"reserved:host": ""}})),
        Just(json!({"matchLabels": {"k8s:io.cilium.k8s.policy.cluster": "other-cluster"}})),
    ]
}

fn node_selector() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({})),
        pick(&["a", "b", "c"]).prop_map(|z| json!({"matchLabels": {"zone": z}})),
        pick(&["node-a", "node-b", "node-c"]).prop_map(|n| json!({"matchLabels": {"kubernetes.io/hostname": n}})),
        Just(json!({"matchLabels": {"node:role": "worker"}})),
        Just(json!({"matchLabels": {"k8s:role": "worker"}})),
        Just(json!({"matchExpressions": [{"key": "role", "operator": "NotIn", "values": ["worker"]}]})),
        Just(json!({"matchExpressions": [{"key": "zone", "operator": "Exists"}]})),
        Just(json!({"matchLabels": {"reserved:host": ""}})),
    ]
}

fn entities() -> impl Strategy<Value = Value> {
    proptest::sample::subsequence(
        vec![
            "all",
            "world",
            "world-ipv4",
            "world-ipv6",
            "cluster",
            "host",
            "remote-node",
            "health",
            "init",
            "unmanaged",
            "kube-apiserver",
            "ingress",
            "none",
        ],
        0..=3,
    )
    .prop_map(|v| json!(v))
}

/// The CiliumCIDRGroups of every case: name, labels, CIDRs (one nested in
/// another group's, one prefix in two groups, one group empty).
/// (name, labels, CIDRs) of one group.
type GroupDef = (&'static str, &'static [(&'static str, &'static str)], &'static [&'static str]);

const GROUPS: &[GroupDef] = &[
    ("corp", &[("team", "a"), ("env", "prod")], &["192.0.2.0/24", "2001:db8::/32"]),
    ("partners", &[("team", "b")], &["198.51.100.0/24", "192.0.2.16/28"]),
    ("edge", &[("env", "prod")], &["203.0.113.0/24", "192.0.2.16/28"]),
    ("empty", &[("team", "c")], &[]),
];

fn cidr_groups() -> Vec<cilium_policy::cidr_group::CidrGroup> {
    GROUPS
        .iter()
        .map(|(name, labels, cidrs)| cilium_policy::cidr_group::CidrGroup {
            name: name.to_string(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            cidrs: cidrs.iter().map(|c| Prefix::parse(c, false).unwrap()).collect(),
        })
        .collect()
}

fn group_selector() -> impl Strategy<Value = Value> {
    prop_oneof![
        pick(&["a", "b", "c"]).prop_map(|t| json!({"matchLabels": {"team": t}})),
        Just(json!({"matchLabels": {"env": "prod"}})),
        Just(json!({"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["a"]}]})),
        Just(json!({"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "b"]}]})),
        Just(json!({"matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]})),
        Just(json!({"matchExpressions": [{"key": "env", "operator": "Exists"}]})),
    ]
}

fn cidr_set() -> impl Strategy<Value = Value> {
    let with_except = |mut v: Value, e: Vec<&str>| {
        if !e.is_empty() {
            v["except"] = json!(e);
        }
        v
    };
    let group_excepts =
        || proptest::sample::subsequence(vec!["192.0.2.16/28", "192.0.2.5/32", "2001:db8:1::/48"], 0..=1);
    prop_oneof![
        3 => pick(CIDRS).prop_flat_map(move |c| {
            let ex = excepts_of(c);
            proptest::sample::subsequence(ex.to_vec(), 0..=ex.len().min(2))
                .prop_map(move |e| with_except(json!({"cidr": c}), e))
        }),
        1 => (pick(&["corp", "partners", "edge", "empty", "missing"]), group_excepts())
            .prop_map(move |(g, e)| with_except(json!({"cidrGroupRef": g}), e)),
        1 => (group_selector(), group_excepts()).prop_map(move |(g, e)| with_except(json!({"cidrGroupSelector": g}), e)),
    ]
}

/// One peer field of a section (or none), including empty lists.
fn l3(ingress: bool) -> impl Strategy<Value = Option<(String, Value)>> {
    let f = |name: &str| format!("{}{name}", if ingress { "from" } else { "to" });
    let (ep, ent, cidr, set, nodes) = (f("Endpoints"), f("Entities"), f("CIDR"), f("CIDRSet"), f("Nodes"));
    prop_oneof![
        3 => Just(None),
        2 => proptest::collection::vec(node_selector(), 0..=2).prop_map(move |v| Some((nodes.clone(), json!(v)))),
        4 => proptest::collection::vec(selector(), 1..=2).prop_map({ let ep = ep.clone(); move |v| Some((ep.clone(), json!(v))) }),
        1 => Just(Some((ep, json!([])))),
        3 => entities().prop_map({ let ent = ent.clone(); move |v| Some((ent.clone(), v)) }),
        2 => proptest::collection::vec(pick(CIDRS), 0..=2).prop_map(move |v| Some((cidr.clone(), json!(v)))),
        3 => proptest::collection::vec(cidr_set(), 1..=2).prop_map(move |v| Some((set.clone(), json!(v)))),
    ]
}

fn port() -> impl Strategy<Value = Value> {
    let number = pick(&["80", "53", "443", "8080", "0", "8000", "http", "dns"]);
    let proto = pick(&["", "TCP", "UDP", "SCTP", "ANY"]);
    let end = pick(&[0u16, 0, 0, 90, 8100, 443]);
    (number, proto, end).prop_map(|(n, p, e)| {
        let mut v = json!({"port": n});
        if !p.is_empty() {
            v["protocol"] = json!(p);
        }
        if e != 0 && n.parse::<u16>().is_ok() {
            v["endPort"] = json!(e);
        }
        v
    })
}

fn l4(deny: bool) -> impl Strategy<Value = Option<(String, Value)>> {
    let _ = deny;
    let icmp = (
        pick(&["", "IPv4", "IPv6"]),
        proptest::sample::select(vec![json!(8), json!(0), json!(13), json!("EchoRequest"), json!(128)]),
    )
        .prop_map(|(fam, ty)| {
            let ty = if fam == "IPv6" && ty == json!(13) { json!(129) } else { ty };
            let ty = if fam != "IPv6" && ty == json!(128) { json!(8) } else { ty };
            if fam.is_empty() { json!({"type": ty}) } else { json!({"family": fam, "type": ty}) }
        });
    prop_oneof![
        3 => Just(None),
        1 => Just(Some(("toPorts".to_string(), json!([])))),
        5 => proptest::collection::vec(proptest::collection::vec(port(), 1..=3), 1..=2)
            .prop_map(|rules| Some(("toPorts".to_string(), json!(rules.into_iter().map(|p| json!({"ports": p})).collect::<Vec<_>>())))),
        2 => proptest::collection::vec(icmp, 1..=2).prop_map(|f| Some(("icmps".to_string(), json!([{"fields": f}])))),
    ]
}

fn section(ingress: bool, deny: bool) -> impl Strategy<Value = Value> {
    (l3(ingress), l4(deny)).prop_map(|(a, b)| {
        let mut s = json!({});
        if let Some((k, v)) = a {
            s[k] = v;
        }
        if let Some((k, v)) = b {
            s[k] = v;
        }
        s
    })
}

fn sections(ingress: bool, deny: bool) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        4 => Just(None),
        1 => Just(Some(json!([]))),
        5 => proptest::collection::vec(section(ingress, deny), 1..=2).prop_map(|v| Some(json!(v))),
    ]
}

fn rule() -> impl Strategy<Value = Value> {
    let dd = || pick(&[None, Some(true), Some(false)]);
    (selector(), sections(true, false), sections(true, true), sections(false, false), sections(false, true), dd(), dd())
        .prop_map(|(sel, i, id, e, ed, ddi, dde)| {
            let mut r = json!({"endpointSelector": sel});
            for (k, v) in [("ingress", i), ("ingressDeny", id), ("egress", e), ("egressDeny", ed)] {
                if let Some(v) = v {
                    r[k] = v;
                }
            }
            if ddi.is_some() || dde.is_some() {
                let mut d = json!({});
                if let Some(x) = ddi {
                    d["ingress"] = json!(x);
                }
                if let Some(x) = dde {
                    d["egress"] = json!(x);
                }
                r["enableDefaultDeny"] = d;
            }
            r
        })
}

fn policy(n: usize) -> impl Strategy<Value = Value> {
    (any::<bool>(), proptest::collection::vec(rule(), 1..=2), pick(&["default", "other"])).prop_map(move |(clusterwide, rules, ns)| {
        let name = format!("p{n}");
        let spec_or_specs = if rules.len() == 1 { json!({"spec": rules[0]}) } else { json!({"specs": rules}) };
        let mut obj = if clusterwide {
            json!({"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy", "metadata": {"name": name}})
        } else {
            json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": name, "namespace": ns}})
        };
        for (k, v) in spec_or_specs.as_object().unwrap() {
            obj[k] = v.clone();
        }
        obj
    })
}

fn knp_selector() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({})),
        pick(&["web", "db", "api"]).prop_map(|a| json!({"matchLabels": {"app": a}})),
        Just(json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["back"]}]})),
    ]
}

fn knp_peer() -> impl Strategy<Value = Value> {
    let ns_sel = prop_oneof![Just(json!({})), pick(&["a", "b"]).prop_map(|t| json!({"matchLabels": {"team": t}}))];
    prop_oneof![
        knp_selector().prop_map(|p| json!({"podSelector": p})),
        (ns_sel, proptest::option::of(knp_selector())).prop_map(|(n, p)| match p {
            Some(p) => json!({"namespaceSelector": n, "podSelector": p}),
            None => json!({"namespaceSelector": n}),
        }),
        pick(&["192.0.2.0/24", "198.51.100.0/24", "0.0.0.0/0", "2001:db8::/32"]).prop_flat_map(|c| {
            let ex = excepts_of(c);
            proptest::sample::subsequence(ex.to_vec(), 0..=ex.len().min(1)).prop_map(move |e| {
                if e.is_empty() {
                    json!({"ipBlock": {"cidr": c}})
                } else {
                    json!({"ipBlock": {"cidr": c, "except": e}})
                }
            })
        }),
    ]
}

fn knp_port() -> impl Strategy<Value = Value> {
    (
        pick(&["", "TCP", "UDP", "SCTP"]),
        prop_oneof![Just(json!(null)), Just(json!(80)), Just(json!(8000)), Just(json!("http")), Just(json!(53))],
        pick(&[0, 0, 8100]),
    )
        .prop_map(|(proto, port, end)| {
            let mut v = json!({});
            if !proto.is_empty() {
                v["protocol"] = json!(proto);
            }
            if !port.is_null() {
                v["port"] = port.clone();
                if end != 0 && port.is_number() {
                    v["endPort"] = json!(end);
                }
            }
            v
        })
}

fn knp_rules(peer_key: &'static str) -> impl Strategy<Value = Option<Value>> {
    let rule = (
        proptest::option::of(proptest::collection::vec(knp_peer(), 0..=2)),
        proptest::option::of(proptest::collection::vec(knp_port(), 0..=2)),
    )
        .prop_map(move |(peers, ports)| {
            let mut r = json!({});
            if let Some(p) = peers {
                r[peer_key] = json!(p);
            }
            if let Some(p) = ports {
                r["ports"] = json!(p);
            }
            r
        });
    proptest::option::of(proptest::collection::vec(rule, 0..=2).prop_map(|v| json!(v)))
}

fn knp(n: usize) -> impl Strategy<Value = Value> {
    let types = proptest::option::of(proptest::sample::subsequence(vec!["Ingress", "Egress"], 0..=2));
    (knp_selector(), types, knp_rules("from"), knp_rules("to"), pick(&["default", "other"])).prop_map(move |(sel, types, ing, eg, ns)| {
        let mut spec = json!({"podSelector": sel});
        if let Some(t) = types {
            spec["policyTypes"] = json!(t);
        }
        if let Some(i) = ing {
            spec["ingress"] = i;
        }
        if let Some(e) = eg {
            spec["egress"] = e;
        }
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": format!("k{n}"), "namespace": ns}, "spec": spec})
    })
}

#[derive(Clone, Debug)]
struct Query {
    subject: usize,
    ingress: bool,
    peer: &'static str,
    proto: u8,
    port: u16,
}

fn query() -> impl Strategy<Value = Query> {
    let peer = prop_oneof![
        3 => (0..PODS.len(), any::<bool>()).prop_map(|(i, v6)| if v6 { PODS[i].v6 } else { PODS[i].v4 }),
        2 => pick(&[HOST_IP, REMOTE_NODE_IP, REMOTE_NODE2_IP]),
        4 => pick(WORLD_ADDRS),
    ];
    let l4 = prop_oneof![
        6 => (pick(&[TCP, UDP, SCTP]), pick(&[53u16, 80, 81, 443, 8000, 8050, 8080, 8100, 9090, 1])),
        1 => pick(&[0u16, 8, 13, 128, 129]).prop_map(|t| (0u8, t)),
    ];
    (0..PODS.len(), any::<bool>(), peer, l4).prop_map(|(subject, ingress, peer, (proto, port))| Query {
        subject,
        ingress,
        peer,
        proto,
        port,
    })
}

#[derive(Clone, Debug)]
struct Case {
    dual_stack: bool,
    /// `enable-node-selector-labels`.
    node_labels: bool,
    policies: Vec<Value>,
    queries: Vec<Query>,
}

fn case() -> impl Strategy<Value = Case> {
    let one = |n: usize| prop_oneof![3 => policy(n), 1 => knp(n)];
    let policies = (1usize..=3).prop_flat_map(move |n| (0..n).map(one).collect::<Vec<_>>());
    (any::<bool>(), any::<bool>(), policies, proptest::collection::vec(query(), 1..=380))
        .prop_map(|(dual_stack, node_labels, policies, queries)| Case { dual_stack, node_labels, policies, queries })
}

// ---------------------------------------------------------------- the oracle

struct Oracle {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Oracle {
    fn start() -> Oracle {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools/bin/policy-oracle");
        let mut child = Command::new(path)
            .arg("--stream")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {path} ({e}): run scripts/setup.sh, which builds it"));
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Oracle { child, stdin, stdout }
    }

    fn ask(&mut self, input: &Value) -> Value {
        serde_json::to_writer(&mut self.stdin, input).unwrap();
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "policy-oracle ended (see its message above)");
        serde_json::from_str(&line).unwrap()
    }
}

impl Drop for Oracle {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- ours

fn parse(p: &Value, cfg: &Config) -> Result<Vec<Entry>, String> {
    let r = if p["kind"] == "NetworkPolicy" {
        let np: k8s_openapi::api::networking::v1::NetworkPolicy =
            serde_json::from_value(p.clone()).map_err(|e| format!("decode: {e}"))?;
        cilium_policy::knp::parse_knp(&np, cfg)
    } else if p["kind"] == "CiliumNetworkPolicy" {
        let cnp: CiliumNetworkPolicy = serde_json::from_value(p.clone()).map_err(|e| format!("decode: {e}"))?;
        cilium_policy::parse::parse_cnp(&cnp, cfg)
    } else {
        let ccnp: CiliumClusterwideNetworkPolicy =
            serde_json::from_value(p.clone()).map_err(|e| format!("decode: {e}"))?;
        cilium_policy::parse::parse_ccnp(&ccnp, cfg)
    };
    r.map(|p| p.entries).map_err(|e| e.0)
}

fn pod_labels(p: &Pod) -> LabelSet {
    LabelSet::parse(p.labels.iter().copied().chain([CLUSTER_LABEL]))
}

struct Stats {
    cases: usize,
    queries: usize,
    allowed: usize,
    invalid_policies: usize,
}

fn check(b: &mut Bench, oracle: &mut Oracle, c: &Case, stats: &mut Stats) -> Result<(), TestCaseError> {
    let cfg = Config { ipv6: c.dual_stack, enable_node_selector_labels: c.node_labels, ..Config::default() };
    // Our reading of every policy, and the CIDR identities they need.
    let mut entries = Vec::new();
    let mut ours_valid = Vec::new();
    for p in &c.policies {
        match parse(p, &cfg) {
            Ok(e) => {
                entries.extend(e);
                ours_valid.push(Ok(()));
            }
            Err(e) => ours_valid.push(Err(e)),
        }
    }
    // The policies' CIDRs and every group's (upstream puts each group CIDR
    // in the ipcache whether or not a policy names the group).
    let groups = cidr_groups();
    let mut prefixes = cilium_policy::engine::cidr_prefixes(&entries);
    prefixes.extend(groups.iter().flat_map(|g| g.cidrs.iter().copied()));
    let mut u = Universe::new(cfg.clone());
    let mut ipc: Vec<(Prefix, u32)> = vec![
        (Prefix::parse("0.0.0.0/0", false).unwrap(), cilium_policy::identity::world_id(&cfg, true)),
        (Prefix::parse("::/0", false).unwrap(), cilium_policy::identity::world_id(&cfg, false)),
    ];
    let mut oracle_ids = Vec::new();
    // Nodes: host and remote-node, each remote node its own identity with
    // its labels when node selector labels are on (as the agent does).
    for (i, (ip, labels)) in NODES.iter().enumerate() {
        let local = i == 0;
        let id = match (local, c.node_labels) {
            (true, _) => cilium_policy::identity::HOST,
            (false, false) => cilium_policy::identity::REMOTE_NODE,
            (false, true) => cilium_policy::identity::REMOTE_NODE_SCOPE | i as u32,
        };
        ipc.push((Prefix::parse(ip, true).unwrap(), id));
        if local || c.node_labels {
            let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let set = cilium_policy::identity::node_labels(&cfg, local, &labels);
            oracle_ids.push(json!({"id": id, "labels": set.to_strings()}));
            u.identities.insert(id, set);
        }
    }
    let mut oracle_ports = serde_json::Map::new();
    for p in PODS {
        u.identities.insert(p.id, pod_labels(p));
        u.named_ports.insert(p.id, named_ports(p.id));
        ipc.push((Prefix::parse(p.v4, true).unwrap(), p.id));
        ipc.push((Prefix::parse(p.v6, true).unwrap(), p.id));
        let labels: Vec<&str> = p.labels.iter().copied().chain([CLUSTER_LABEL]).collect();
        oracle_ids.push(json!({"id": p.id, "labels": labels}));
        let ports: Vec<Value> = named_ports(p.id)
            .iter()
            .map(|n| json!({"name": n.name, "port": n.port, "protocol": if n.proto == UDP { "UDP" } else { "TCP" }}))
            .collect();
        if !ports.is_empty() {
            oracle_ports.insert(p.id.to_string(), json!(ports));
        }
    }
    for (i, p) in prefixes.iter().enumerate() {
        let id = LOCAL_FLAG | (i as u32 + 1);
        u.identities.insert(id, cidr_labels(&cfg, p));
        ipc.push((*p, id));
    }
    // Group labels on the CIDR identities: the oracle gets those labels
    // as they are (its own selectors then match them).
    u.add_cidr_groups(&groups);
    for (i, p) in prefixes.iter().enumerate() {
        let id = LOCAL_FLAG | (i as u32 + 1);
        let labels = &u.identities[&id];
        if labels == &cidr_labels(&cfg, p) {
            oracle_ids.push(json!({"id": id, "cidr": p.to_string()}));
        } else {
            oracle_ids.push(json!({"id": id, "labels": labels.to_strings()}));
        }
    }
    b.dp.ct_flush().unwrap();
    let ipc_strings: Vec<(String, u32)> = ipc.iter().map(|(p, id)| (p.to_string(), *id)).collect();
    let ipc_refs: Vec<(&str, u32)> = ipc_strings.iter().map(|(p, id)| (p.as_str(), *id)).collect();
    ipcache(&mut b.dp, &ipc_refs);
    // The peer identity: the longest prefix holding the address.
    let peer_id = |addr: &str| -> u32 {
        let a: IpAddr = addr.parse().unwrap();
        ipc.iter().filter(|(p, _)| p.contains_addr(a)).max_by_key(|(p, _)| p.prefix_len()).map(|(_, id)| *id).unwrap()
    };

    // Upstream's answers.
    let queries: Vec<&Query> = c
        .queries
        .iter()
        .filter(|q| {
            // Single stack: only IPv4 traffic exists; ports 0 only for ICMP.
            let v6 = q.peer.contains(':');
            (c.dual_stack || !v6) && (q.proto == 0 || q.port != 0)
        })
        .collect();
    let proto_of = |q: &Query| {
        if q.proto != 0 {
            q.proto
        } else if q.peer.contains(':') {
            ICMPV6
        } else {
            ICMP
        }
    };
    let oracle_queries: Vec<Value> = queries
        .iter()
        .map(|q| {
            json!({"subject": PODS[q.subject].id, "direction": if q.ingress { "ingress" } else { "egress" },
                   "peer": peer_id(q.peer), "proto": proto_of(q), "port": q.port})
        })
        .collect();
    let answer = oracle.ask(&json!({
        "cluster_name": "default", "ipv4": true, "ipv6": c.dual_stack, "enable_node_selector_labels": c.node_labels,
        "identities": oracle_ids, "policies": c.policies, "named_ports": oracle_ports, "queries": oracle_queries,
    }));
    let upstream_invalid: BTreeMap<usize, String> = answer["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["policy"].as_u64().unwrap() as usize, e["error"].as_str().unwrap_or_default().to_string()))
        .collect();
    for (i, ours) in ours_valid.iter().enumerate() {
        prop_assert_eq!(
            ours.is_ok(),
            !upstream_invalid.contains_key(&i),
            "validity of policy {} differs: ours {:?}, upstream {:?}\n{}",
            i,
            ours,
            upstream_invalid.get(&i),
            serde_json::to_string_pretty(&c.policies[i]).unwrap()
        );
        stats.invalid_policies += usize::from(ours.is_err());
    }

    // Ours, per subject: compile, install, send each query as a frame.
    let mut sel = Selections::new(&u);
    let mut compiled = BTreeMap::new();
    for (qi, q) in queries.iter().enumerate() {
        let pod = &PODS[q.subject];
        let policy = compiled
            .entry(q.subject)
            .or_insert_with(|| cilium_policy::compile(&u.identities[&pod.id], &named_ports(pod.id), &entries, &mut sel))
            .clone();
        install(&mut b.dp, &policy);
        let me = if q.peer.contains(':') { pod.v6 } else { pod.v4 };
        let proto = proto_of(q);
        // Unique source ports / echo identifiers: no query is another's reply.
        let unique = 20000 + (stats.queries % 10000) as u16;
        let pkt = match (proto, q.ingress) {
            (ICMP | ICMPV6, true) => Pkt::icmp(q.peer, me, q.port as u8, unique),
            (ICMP | ICMPV6, false) => Pkt::icmp(me, q.peer, q.port as u8, unique),
            (p, true) => Pkt::new(p, q.peer, me, unique, q.port),
            (p, false) => Pkt::new(p, me, q.peer, unique, q.port),
        };
        let dir = if q.ingress { DIR_INGRESS } else { DIR_EGRESS };
        let kernel = allowed(&b.dp, dir, &pkt);
        let engine = if q.ingress { &policy.ingress } else { &policy.egress }.allows(peer_id(q.peer), proto, q.port);
        let upstream = answer["verdicts"][qi] == "allow";
        stats.queries += 1;
        stats.allowed += usize::from(upstream);
        prop_assert_eq!(kernel, engine, "kernel and engine differ on {:?} (peer identity {})", q, peer_id(q.peer));
        // `ciliumctl policy trace` reads the same entries rule by rule: it
        // must reach the kernel's verdict too.
        let flow = cilium_policy::trace::Flow { ingress: q.ingress, peer: peer_id(q.peer), proto, port: q.port };
        let traced =
            cilium_policy::trace::trace(&u.identities[&pod.id], &named_ports(pod.id), &flow, &entries, &mut sel);
        prop_assert_eq!(traced.allowed(), kernel, "trace and kernel differ on {:?}: {:?}", q, traced);
        prop_assert_eq!(
            kernel,
            upstream,
            "ours {} upstream {} for subject {} {} peer {} (identity {}) proto {} port {}\npolicies:\n{}",
            if kernel { "allow" } else { "deny" },
            if upstream { "allow" } else { "deny" },
            pod.id,
            if q.ingress { "ingress" } else { "egress" },
            q.peer,
            peer_id(q.peer),
            proto,
            q.port,
            serde_json::to_string_pretty(&c.policies).unwrap()
        );
    }
    stats.cases += 1;
    Ok(())
}

#[test]
fn verdicts_equal_upstreams() {
    let cases: u32 = std::env::var("DIFF_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(700);
    let seed: u64 = std::env::var("DIFF_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(rand_seed);
    eprintln!("differential test: {cases} policy sets, DIFF_SEED={seed}");
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let config = PtConfig { cases, failure_persistence: None, max_shrink_iters: 2000, ..PtConfig::default() };
    let mut runner = TestRunner::new_with_rng(config, rng);
    let b = std::cell::RefCell::new(bench("differential"));
    let oracle = std::cell::RefCell::new(Oracle::start());
    let stats = std::cell::RefCell::new(Stats { cases: 0, queries: 0, allowed: 0, invalid_policies: 0 });
    let t0 = std::time::Instant::now();
    let result =
        runner.run(&case(), |c| check(&mut b.borrow_mut(), &mut oracle.borrow_mut(), &c, &mut stats.borrow_mut()));
    let s = stats.borrow();
    eprintln!(
        "differential test: {} policy sets, {} verdicts compared ({} allowed by upstream), {} invalid policies, {:.1} s (DIFF_SEED={seed})",
        s.cases,
        s.queries,
        s.allowed,
        s.invalid_policies,
        t0.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("{e}\nreplay with DIFF_SEED={seed}");
    }
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
}
