//! Policy documents -> compiled endpoint policy: any bytes read as a
//! CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or Kubernetes
//! NetworkPolicy (JSON) are refused with an error or compiled; compiling
//! never panics and does not depend on the order of the rules.
#![no_main]

use cilium_crds::policy::{CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy};
use cilium_policy::engine::NamedPort;
use cilium_policy::identity::{LOCAL_FLAG, cidr_labels};
use cilium_policy::parse::{parse_ccnp, parse_cnp};
use cilium_policy::{Config, LabelSet, Parsed, Prefix, Selections, Universe, compile};
use libfuzzer_sys::fuzz_target;

fn universe() -> Universe {
    let mut u = Universe::new(Config::default());
    for (id, app, ns) in [(1001, "web", "default"), (1002, "db", "default"), (1003, "web", "other")] {
        u.identities.insert(
            id,
            LabelSet::parse([
                format!("k8s:app={app}").as_str(),
                format!("k8s:io.kubernetes.pod.namespace={ns}").as_str(),
                "k8s:io.cilium.k8s.policy.cluster=default",
            ]),
        );
    }
    u.named_ports.insert(1002, vec![NamedPort { name: "http".into(), proto: 6, port: 8080 }]);
    for (i, c) in ["10.0.0.0/8", "10.1.0.0/16", "192.168.1.1/32", "fd00::/64"].iter().enumerate() {
        let p = Prefix::parse(c, false).unwrap();
        u.identities.insert(LOCAL_FLAG | (i as u32 + 1), cidr_labels(&u.cfg, &p));
    }
    u
}

fn check(parsed: Parsed) {
    let u = universe();
    let mut sel = Selections::new(&u);
    for id in [1001u32, 1002, 1003] {
        let ports = u.named_ports.get(&id).cloned().unwrap_or_default();
        let a = compile(&u.identities[&id], &ports, &parsed.entries, &mut sel);
        let b = compile(&u.identities[&id], &ports, parsed.entries.iter().rev(), &mut sel);
        assert_eq!(a, b, "rule order changed the result");
        let _ = a.ingress.allows(1001, 6, 80);
    }
}

fuzz_target!(|data: &[u8]| {
    let cfg = Config::default();
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let doc = |ns: &str| serde_json::json!({"metadata": {"name": "p", "namespace": ns}, "spec": v.clone()});
    if let Ok(p) = serde_json::from_value::<CiliumNetworkPolicy>(doc("default"))
        && let Ok(parsed) = parse_cnp(&p, &cfg)
    {
        check(parsed);
    }
    if let Ok(p) = serde_json::from_value::<CiliumClusterwideNetworkPolicy>(doc(""))
        && let Ok(parsed) = parse_ccnp(&p, &cfg)
    {
        check(parsed);
    }
    if let Ok(np) = serde_json::from_value::<k8s_openapi::api::networking::v1::NetworkPolicy>(doc("default"))
        && let Ok(parsed) = cilium_policy::knp::parse_knp(&np, &cfg)
    {
        check(parsed);
    }
});
