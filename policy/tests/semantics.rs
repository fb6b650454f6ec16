//! Upstream semantics the first agent got wrong, each a regression test on
//! the engine's compiled entries (read back the way the datapath looks
//! them up). The same cases run through the kernel datapath in
//! node-agent-stub's tests and against upstream's engine in the
//! differential test.

use cilium_crds::policy::CiliumNetworkPolicy;
use cilium_policy::engine::{NamedPort, Selections, Universe, compile};
use cilium_policy::identity::{LOCAL_FLAG, WORLD, cidr_labels};
use cilium_policy::parse::{Entry, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP, parse_cnp};
use cilium_policy::service::Service;
use cilium_policy::{Config, LabelSet, Prefix};
use serde_json::json;

const WEB: u32 = 1001;
const DB: u32 = 1002;
const OTHER_NS: u32 = 1003;

fn universe(cidrs: &[&str]) -> Universe {
    let mut u = Universe::new(Config::default());
    let pod = |app: &str, ns: &str| {
        LabelSet::parse([
            format!("k8s:app={app}").as_str(),
            format!("k8s:io.kubernetes.pod.namespace={ns}").as_str(),
            "k8s:io.cilium.k8s.policy.cluster=default",
        ])
    };
    u.identities.insert(WEB, pod("web", "default"));
    u.identities.insert(DB, pod("db", "default"));
    u.identities.insert(OTHER_NS, pod("web", "other"));
    for (i, c) in cidrs.iter().enumerate() {
        let p = Prefix::parse(c, false).unwrap();
        u.identities.insert(LOCAL_FLAG | (i as u32 + 1), cidr_labels(&u.cfg, &p));
    }
    u
}

fn cidr_id(u: &Universe, c: &str) -> u32 {
    let p = Prefix::parse(c, false).unwrap();
    *u.identities.iter().find(|(_, l)| l.cidr() == Some(p)).unwrap().0
}

fn cnp(spec: serde_json::Value) -> Vec<Entry> {
    let p: CiliumNetworkPolicy =
        serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "default"}, "spec": spec})).unwrap();
    parse_cnp(&p, &Config::default()).expect("valid").entries
}

fn invalid(spec: serde_json::Value) -> String {
    let p: CiliumNetworkPolicy =
        serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "default"}, "spec": spec})).unwrap();
    parse_cnp(&p, &Config::default()).expect_err("invalid").0
}

struct Case {
    u: Universe,
    entries: Vec<Entry>,
}

impl Case {
    fn new(u: Universe, entries: Vec<Entry>) -> Case {
        Case { u, entries }
    }
    fn policy(&self, subject: u32) -> cilium_policy::EndpointPolicy {
        let ports = [NamedPort { name: "http".into(), proto: PROTO_TCP, port: 8080 }];
        let mut sel = Selections::new(&self.u);
        compile(&self.u.identities[&subject], &ports, &self.entries, &mut sel)
    }
    fn ingress(&self, subject: u32, peer: u32, proto: u8, port: u16) -> bool {
        self.policy(subject).ingress.allows(peer, proto, port)
    }
    fn egress(&self, subject: u32, peer: u32, proto: u8, port: u16) -> bool {
        self.policy(subject).egress.allows(peer, proto, port)
    }
}

fn from_web() -> serde_json::Value {
    json!({"matchLabels": {"app": "web"}})
}

#[test]
fn a_port_without_protocol_is_tcp_udp_and_sctp_for_allow_and_deny() {
    let c = Case::new(
        universe(&[]),
        cnp(json!({"endpointSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"fromEndpoints": [from_web()], "toPorts": [{"ports": [{"port": "80"}]}]}]})),
    );
    for proto in [PROTO_TCP, PROTO_UDP, PROTO_SCTP] {
        assert!(c.ingress(DB, WEB, proto, 80), "proto {proto}");
    }
    assert!(!c.ingress(DB, WEB, PROTO_ICMP, 80));
    assert!(!c.ingress(DB, WEB, PROTO_TCP, 81));
    assert!(!c.ingress(DB, OTHER_NS, PROTO_TCP, 80), "other namespace");

    let c = Case::new(
        universe(&[]),
        cnp(json!({"endpointSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"fromEntities": ["all"]}],
            "ingressDeny": [{"fromEndpoints": [from_web()], "toPorts": [{"ports": [{"port": "80"}]}]}]})),
    );
    for proto in [PROTO_TCP, PROTO_UDP, PROTO_SCTP] {
        assert!(!c.ingress(DB, WEB, proto, 80), "deny without protocol, proto {proto}");
    }
    assert!(c.ingress(DB, WEB, PROTO_TCP, 81));
    assert!(c.ingress(DB, OTHER_NS, PROTO_TCP, 80));
}

#[test]
fn peers_the_agent_cannot_resolve_select_nothing() {
    for peer in [
        json!({"toServices": [{"k8sService": "not an object"}]}),
        json!({"toGroups": [{"aws": {"securityGroupsIds": ["sg-1"]}}]}),
        json!({"toFQDNs": [{"matchName": "example.com"}]}),
    ] {
        let mut section = peer.clone();
        section["toPorts"] = json!([{"ports": [{"port": "5432", "protocol": "TCP"}]}]);
        let c = Case::new(universe(&[]), cnp(json!({"endpointSelector": {}, "egress": [section]})));
        assert!(!c.egress(WEB, DB, PROTO_TCP, 5432), "{peer}");
        assert!(!c.egress(WEB, WORLD, PROTO_TCP, 5432), "{peer}");
        assert!(!c.policy(WEB).not_enforced.is_empty(), "reported: {peer}");
    }
}

#[test]
fn fromrequires_and_fromnodes_are_refused_as_upstream() {
    let e = invalid(json!({"endpointSelector": {}, "ingress": [{"fromRequires": [from_web()]}]}));
    assert!(e.contains("Requires"), "{e}");
    let e = invalid(json!({"endpointSelector": {}, "ingress": [{"fromNodes": [{}]}]}));
    assert!(e.contains("enable-node-selector-labels"), "{e}");
}

#[test]
fn cidr_selects_every_identity_inside_it() {
    // A broad allow stays broad when another rule names a narrower prefix.
    let u = universe(&["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32"]);
    let c = Case::new(
        u,
        cnp(json!({"endpointSelector": {"matchLabels": {"app": "web"}},
            "egress": [{"toCIDR": ["10.0.0.0/8"]}]})),
    );
    for p in ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32"] {
        assert!(c.egress(WEB, cidr_id(&c.u, p), PROTO_TCP, 443), "{p}");
    }
    assert!(!c.egress(WEB, WORLD, PROTO_TCP, 443));
    // A broad deny is not bypassed by a narrower prefix.
    let c = Case::new(
        universe(&["10.0.0.0/8", "10.1.0.0/16"]),
        cnp(json!({"endpointSelector": {"matchLabels": {"app": "web"}},
            "egress": [{"toEntities": ["all"]}],
            "egressDeny": [{"toCIDR": ["10.0.0.0/8"]}]})),
    );
    assert!(!c.egress(WEB, cidr_id(&c.u, "10.1.0.0/16"), PROTO_TCP, 443));
    assert!(c.egress(WEB, WORLD, PROTO_TCP, 443));
}

#[test]
fn a_deny_set_with_except_spares_the_excepted_prefix() {
    let c = Case::new(
        universe(&["192.0.2.0/28", "192.0.2.5/32"]),
        cnp(json!({"endpointSelector": {"matchLabels": {"app": "web"}},
            "egress": [{"toEntities": ["all"]}],
            "egressDeny": [{"toCIDRSet": [{"cidr": "192.0.2.0/28", "except": ["192.0.2.5/32"]}]}]})),
    );
    assert!(!c.egress(WEB, cidr_id(&c.u, "192.0.2.0/28"), PROTO_TCP, 80));
    assert!(c.egress(WEB, cidr_id(&c.u, "192.0.2.5/32"), PROTO_TCP, 80));
}

#[test]
fn default_deny_off_keeps_deny_rules_and_empty_lists_say_nothing() {
    let c = Case::new(
        universe(&[]),
        cnp(json!({"endpointSelector": {"matchLabels": {"app": "db"}},
            "enableDefaultDeny": {"ingress": false},
            "ingressDeny": [{"fromEndpoints": [from_web()]}]})),
    );
    let p = c.policy(DB);
    assert!(!p.ingress.enforced);
    assert!(!c.ingress(DB, WEB, PROTO_TCP, 80), "the deny still denies");
    assert!(c.ingress(DB, OTHER_NS, PROTO_TCP, 80), "everything else passes");

    // `ingress: []` alone is no rule at all (upstream refuses the policy).
    let e = invalid(json!({"endpointSelector": {}, "ingress": []}));
    assert!(e.contains("at least one of"), "{e}");
    // Next to an egress rule, it turns nothing on.
    let c = Case::new(
        universe(&[]),
        cnp(json!({"endpointSelector": {}, "ingress": [], "egress": [{"toEndpoints": [from_web()]}]})),
    );
    assert!(!c.policy(DB).ingress.enforced);
    assert!(c.ingress(DB, OTHER_NS, PROTO_TCP, 1));
    // `fromEndpoints: []` selects no peer, but still turns default deny on.
    let c = Case::new(
        universe(&[]),
        cnp(
            json!({"endpointSelector": {}, "ingress": [{"fromEndpoints": [], "toPorts": [{"ports": [{"port": "80"}]}]}]}),
        ),
    );
    assert!(c.policy(DB).ingress.enforced);
    assert!(!c.ingress(DB, WEB, PROTO_TCP, 80));
}

#[test]
fn port_ranges_and_named_ports_for_allow_and_deny() {
    let c = Case::new(
        universe(&[]),
        cnp(json!({"endpointSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"fromEndpoints": [from_web()], "toPorts": [{"ports": [{"port": "8000", "endPort": 8080, "protocol": "TCP"}, {"port": "http"}]}]}],
            "ingressDeny": [{"fromEndpoints": [from_web()], "toPorts": [{"ports": [{"port": "8010", "endPort": 8019}]}]}]})),
    );
    for (port, want) in [
        (7999, false),
        (8000, true),
        (8009, true),
        (8010, false),
        (8019, false),
        (8020, true),
        (8080, true),
        (8081, false),
    ] {
        assert_eq!(c.ingress(DB, WEB, PROTO_TCP, port), want, "port {port}");
    }
    assert!(!c.ingress(DB, WEB, PROTO_UDP, 8000), "the range was TCP only");
}

#[test]
fn icmp_types_and_families() {
    let c = Case::new(
        universe(&[]),
        cnp(json!({"endpointSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"fromEndpoints": [from_web()], "icmps": [{"fields": [{"type": 8}, {"family": "IPv6", "type": "EchoRequest"}]}]}]})),
    );
    assert!(c.ingress(DB, WEB, PROTO_ICMP, 8));
    assert!(!c.ingress(DB, WEB, PROTO_ICMP, 13), "timestamp not allowed");
    assert!(c.ingress(DB, WEB, 58, 128));
    assert!(!c.ingress(DB, WEB, 58, 8), "IPv4 type number on IPv6");
    assert!(!c.ingress(DB, WEB, PROTO_TCP, 8));
}

mod arbitrary_input {
    //! Whatever a user or a program writes into a policy, reading and
    //! compiling it never panics: it is refused with a message or compiled.
    use super::*;
    use proptest::prelude::*;

    const KEYS: &[&str] = &[
        "endpointSelector",
        "nodeSelector",
        "ingress",
        "egress",
        "ingressDeny",
        "egressDeny",
        "fromEndpoints",
        "toEndpoints",
        "toPorts",
        "ports",
        "port",
        "endPort",
        "protocol",
        "fromCIDR",
        "toCIDR",
        "fromCIDRSet",
        "toCIDRSet",
        "cidr",
        "except",
        "icmps",
        "fields",
        "type",
        "family",
        "matchLabels",
        "matchExpressions",
        "key",
        "operator",
        "values",
        "fromEntities",
        "toEntities",
        "enableDefaultDeny",
        "fromRequires",
        "toServices",
        "toFQDNs",
        "rules",
        "http",
        "cidrGroupRef",
        "fromNodes",
        "app",
    ];

    fn value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            (0u32..70000).prop_map(serde_json::Value::from),
            proptest::sample::select(vec![
                "80",
                "0",
                "65536",
                "http",
                "TCP",
                "UDP",
                "ANY",
                "SCTP",
                "ICMP",
                "10.0.0.0/8",
                "::/0",
                "1.2.3.4",
                "10.0.0.1/33",
                "world",
                "cluster",
                "all",
                "In",
                "NotIn",
                "Exists",
                "DoesNotExist",
                "IPv4",
                "IPv6",
                "EchoRequest",
                "",
                "-",
                "k8s:app",
                "reserved:host",
                "x/y",
            ])
            .prop_map(serde_json::Value::from),
            ".{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(proptest::sample::select(KEYS.to_vec()), inner, 0..5)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]
        #[test]
        fn any_spec_is_refused_or_compiled_never_a_panic(spec in value(), clusterwide: bool) {
            let cfg = Config::default();
            let obj = serde_json::json!({"metadata": {"name": "p", "namespace": if clusterwide { "" } else { "default" }}, "spec": spec});
            let Ok(p) = serde_json::from_value::<CiliumNetworkPolicy>(obj) else { return Ok(()) };
            let Ok(parsed) = parse_cnp(&p, &cfg) else { return Ok(()) };
            let u = universe(&["10.0.0.0/8"]);
            let mut sel = cilium_policy::engine::Selections::new(&u);
            for id in [WEB, DB, OTHER_NS] {
                let c = cilium_policy::compile(&u.identities[&id], &[], &parsed.entries, &mut sel);
                // Rules are a set: their order never changes the result.
                let r = cilium_policy::compile(&u.identities[&id], &[], parsed.entries.iter().rev(), &mut sel);
                prop_assert_eq!(&c, &r);
            }
        }

        #[test]
        fn any_network_policy_is_refused_or_compiled(spec in value()) {
            let obj = serde_json::json!({"metadata": {"name": "k", "namespace": "default"}, "spec": spec});
            let Ok(np) = serde_json::from_value::<k8s_openapi::api::networking::v1::NetworkPolicy>(obj) else { return Ok(()) };
            let Ok(parsed) = cilium_policy::knp::parse_knp(&np, &Config::default()) else { return Ok(()) };
            let u = universe(&[]);
            let mut sel = cilium_policy::engine::Selections::new(&u);
            let c = cilium_policy::compile(&u.identities[&WEB], &[], &parsed.entries, &mut sel);
            let r = cilium_policy::compile(&u.identities[&WEB], &[], parsed.entries.iter().rev(), &mut sel);
            prop_assert_eq!(c, r);
        }
    }
}

fn service(name: &str, labels: &[(&str, &str)], selector: &[(&str, &str)], backends: &[&str]) -> Service {
    let m = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Service {
        namespace: "default".into(),
        name: name.into(),
        labels: m(labels),
        selector: m(selector),
        backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
    }
}

#[test]
fn to_services_selects_the_pods_or_addresses_behind_matching_services() {
    let services = [
        // A Service with a selector: its pods, in its namespace only.
        service("db", &[("tier", "data")], &[("app", "db")], &["10.0.0.9"]),
        // Without one: the addresses of its EndpointSlices.
        service("ext", &[("tier", "data")], &[], &["192.0.2.7"]),
        service("other", &[("tier", "web")], &[], &["192.0.2.8"]),
    ];
    let u = universe(&["192.0.2.7/32", "192.0.2.8/32"]);
    let (ext, other) = (cidr_id(&u, "192.0.2.7/32"), cidr_id(&u, "192.0.2.8/32"));
    let case = |to: serde_json::Value| {
        let mut entries = cnp(json!({"endpointSelector": {"matchLabels": {"app": "web"}},
            "egress": [{"toServices": to, "toPorts": [{"ports": [{"port": "5432", "protocol": "TCP"}]}]}]}));
        cilium_policy::service::resolve(&mut entries, &services, &Config::default());
        Case::new(u.clone(), entries)
    };
    let c = case(json!([{"k8sService": {"serviceName": "db", "namespace": "default"}}]));
    assert!(c.egress(WEB, DB, PROTO_TCP, 5432), "the Service's pod");
    assert!(!c.egress(WEB, DB, PROTO_TCP, 5433), "another port");
    assert!(!c.egress(WEB, OTHER_NS, PROTO_TCP, 5432), "not selected by the Service");
    assert!(!c.egress(WEB, ext, PROTO_TCP, 5432));
    assert!(!c.egress(WEB, WORLD, PROTO_TCP, 5432));
    let c = case(json!([{"k8sService": {"serviceName": "ext"}}]));
    assert!(c.egress(WEB, ext, PROTO_TCP, 5432), "the selectorless Service's address");
    assert!(!c.egress(WEB, other, PROTO_TCP, 5432));
    assert!(!c.egress(WEB, DB, PROTO_TCP, 5432));
    let c = case(json!([{"k8sServiceSelector": {"selector": {"matchLabels": {"tier": "data"}}}}]));
    assert!(c.egress(WEB, DB, PROTO_TCP, 5432) && c.egress(WEB, ext, PROTO_TCP, 5432), "both tier=data");
    assert!(!c.egress(WEB, other, PROTO_TCP, 5432), "tier=web");
    // Matching nothing selects nothing, never every peer on the port.
    for to in [
        json!([{"k8sService": {"serviceName": "db", "namespace": "elsewhere"}}]),
        json!([{"k8sService": {"serviceName": "gone"}}]),
        json!([{"k8sServiceSelector": {"selector": {"matchLabels": {"tier": "none"}}}}]),
    ] {
        let c = case(to.clone());
        for peer in [WEB, DB, OTHER_NS, ext, other, WORLD] {
            assert!(!c.egress(WEB, peer, PROTO_TCP, 5432), "{to} allowed {peer}");
        }
    }
    // A deny by Service beats an allow of everything.
    let mut entries = cnp(json!({"endpointSelector": {"matchLabels": {"app": "web"}},
        "egress": [{"toEntities": ["all"]}],
        "egressDeny": [{"toServices": [{"k8sService": {"serviceName": "ext"}}]}]}));
    cilium_policy::service::resolve(&mut entries, &services, &Config::default());
    let c = Case::new(u.clone(), entries);
    assert!(!c.egress(WEB, ext, PROTO_TCP, 80));
    assert!(c.egress(WEB, other, PROTO_TCP, 80));
}
