//! `ciliumctl policy trace` and `policy selectors`, computed by the agents'
//! own engine (`cilium_policy`) from the objects in the API server, read
//! the way the agents read them (`cilium_policy::cluster`).
//!
//! `trace`: would a flow pass, and which rule decides: the source's egress
//! policy toward the destination's identity, then the destination's
//! ingress policy from the source's, each naming the rules that matched (a
//! matching deny wins, then any allow, then the direction's default).
//!
//! `selectors`: every peer selector in force, the identities it selects
//! and the policies using it (upstream's `cilium policy selectors`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{anyhow, bail};
use cilium_crds::policy::{CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy};
use cilium_crds::{CiliumCidrGroup, CiliumEndpoint, CiliumIdentity, CiliumNode};
use cilium_policy::engine::{NamedPort, Selections};
use cilium_policy::identity::LOCAL_FLAG;
use cilium_policy::parse::{PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use cilium_policy::trace::{Decision, Flow};
use cilium_policy::{LabelSet, Prefix, Universe};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::Api;
use kube::core::DeserializeGuard;
use serde::Serialize;

use crate::ctx::Ctx;
use crate::output::{Style, Table};

/// `80`, `80/tcp`, `53/udp`, `8/icmp` (ICMP: the type).
pub fn parse_dport(s: &str) -> anyhow::Result<(u8, u16)> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => PROTO_TCP,
        "udp" => PROTO_UDP,
        "sctp" => PROTO_SCTP,
        "icmp" => PROTO_ICMP,
        "icmpv6" => PROTO_ICMPV6,
        other => bail!("unknown protocol {other:?} in --dport {s:?}: use tcp, udp, sctp, icmp or icmpv6"),
    };
    let port: u16 = port.parse().map_err(|_| anyhow!("--dport {s:?}: the port must be a number (e.g. 80/tcp)"))?;
    if matches!(proto, PROTO_ICMP | PROTO_ICMPV6) && port > 255 {
        bail!("--dport {s:?}: an ICMP type is at most 255");
    }
    Ok((proto, port))
}

/// One end of the flow.
#[derive(Clone, Debug, Serialize)]
struct End {
    /// `ns/pod`, or the address.
    name: String,
    identity: u32,
    labels: Vec<String>,
    /// A local endpoint (its policy applies), not an address outside.
    endpoint: bool,
    #[serde(skip)]
    ports: Vec<NamedPort>,
}

#[derive(Serialize)]
struct Side {
    /// `egress of ns/src` or `ingress of ns/dst`.
    of: String,
    allowed: bool,
    #[serde(flatten)]
    decision: Option<Decision>,
}

#[derive(Serialize)]
pub struct Report {
    src: End,
    dst: End,
    protocol: u8,
    port: u16,
    pub allowed: bool,
    egress: Side,
    ingress: Side,
    /// Policies not enforced (invalid or marked Valid=False), with why.
    not_enforced: BTreeMap<String, String>,
}

async fn list_all<K>(ctx: &Ctx, what: &str) -> anyhow::Result<Vec<Arc<K>>>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let api: Api<DeserializeGuard<K>> = Api::all(ctx.client.clone());
    let list = api.list(&crate::snapshot::cached()).await.map_err(|e| ctx.kube_error(e, &format!("listing {what}")))?;
    Ok(crate::snapshot::decoded(ctx, what, list.items).into_iter().map(Arc::new).collect())
}

/// The endpoint an argument names: one of its addresses, or NAMESPACE/POD
/// (POD alone: in `default`).
fn find_endpoint<'c>(arg: &str, ceps: &'c [Arc<CiliumEndpoint>]) -> Option<&'c Arc<CiliumEndpoint>> {
    if let Ok(ip) = arg.parse::<IpAddr>() {
        return ceps.iter().find(|c| {
            c.status.iter().flat_map(|s| s.networking.iter()).flat_map(|n| n.addressing.iter()).any(|a| {
                [a.ipv4.as_deref(), a.ipv6.as_deref()]
                    .into_iter()
                    .flatten()
                    .any(|x| x.parse::<IpAddr>().ok() == Some(ip))
            })
        });
    }
    let (ns, name) = arg.split_once('/').unwrap_or(("default", arg));
    ceps.iter().find(|c| c.metadata.namespace.as_deref() == Some(ns) && c.metadata.name.as_deref() == Some(name))
}

fn resolve_end(
    arg: &str,
    ceps: &[Arc<CiliumEndpoint>],
    u: &Universe,
    cidr_ids: &BTreeMap<Prefix, u32>,
) -> anyhow::Result<End> {
    let labels_of = |id: u32| u.identities.get(&id).map(LabelSet::to_strings).unwrap_or_default();
    let cep_end = |c: &CiliumEndpoint| -> anyhow::Result<End> {
        let name = format!(
            "{}/{}",
            c.metadata.namespace.as_deref().unwrap_or_default(),
            c.metadata.name.as_deref().unwrap_or_default()
        );
        let status = c.status.as_ref();
        let id = status
            .and_then(|s| s.identity.as_ref())
            .and_then(|i| i.id)
            .ok_or_else(|| anyhow!("the CiliumEndpoint {name} has no identity yet"))? as u32;
        let ports = status
            .and_then(|s| s.named_ports.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| {
                cilium_policy::cluster::named_port(p.name.as_deref(), p.port.unwrap_or(0), p.protocol.as_deref())
            })
            .collect();
        Ok(End { name, identity: id, labels: labels_of(id), endpoint: true, ports })
    };
    if let Some(c) = find_endpoint(arg, ceps) {
        return cep_end(c);
    }
    if let Ok(ip) = arg.parse::<IpAddr>() {
        // An address outside the cluster: the identity of the longest
        // prefix a policy names that holds it, or world.
        let id = cidr_ids
            .iter()
            .filter(|(p, _)| p.contains_addr(ip))
            .max_by_key(|(p, _)| p.prefix_len())
            .map(|(_, id)| *id)
            .unwrap_or_else(|| cilium_policy::identity::world_id(&u.cfg, ip.is_ipv4()));
        return Ok(End {
            name: ip.to_string(),
            identity: id,
            labels: labels_of(id),
            endpoint: false,
            ports: Vec::new(),
        });
    }
    let (ns, name) = arg.split_once('/').unwrap_or(("default", arg));
    bail!("no CiliumEndpoint {ns}/{name} (give NAMESPACE/POD of a pod Cilium manages, or an IP)")
}

/// The node address (`status.networking.node`) of the endpoint an
/// argument names (NAMESPACE/POD or one of its addresses), if it names one.
fn endpoint_node(arg: &str, ceps: &[Arc<CiliumEndpoint>]) -> Option<String> {
    find_endpoint(arg, ceps)?.status.as_ref()?.networking.as_ref()?.node.clone()
}

/// A node's address as the other end's node sees it (see `policy_trace`),
/// adding the identity the agent would give it to `u`.
fn node_end(arg: &str, nodes: &[Arc<CiliumNode>], other_node: Option<&str>, u: &mut Universe) -> Option<End> {
    let ip = arg.parse::<IpAddr>().ok()?;
    let node = nodes.iter().find(|n| {
        n.spec.addresses.iter().flatten().any(|a| a.ip.as_deref().and_then(|x| x.parse::<IpAddr>().ok()) == Some(ip))
    })?;
    let local = other_node.and_then(|n| n.parse::<IpAddr>().ok()) == Some(ip);
    let node_labels = node.metadata.labels.clone().unwrap_or_default();
    let labels = cilium_policy::identity::node_labels(&u.cfg, local, &node_labels);
    let id = match (local, u.cfg.enable_node_selector_labels) {
        (true, _) => cilium_policy::identity::HOST,
        (false, false) => cilium_policy::identity::REMOTE_NODE,
        // Node-local numbers: any free one of the remote-node scope.
        (false, true) => cilium_policy::identity::REMOTE_NODE_SCOPE | 1,
    };
    if local || u.cfg.enable_node_selector_labels {
        u.identities.insert(id, labels.clone());
    }
    let name = format!("node {} ({ip})", node.metadata.name.as_deref().unwrap_or_default());
    Some(End { name, identity: id, labels: labels.to_strings(), endpoint: false, ports: Vec::new() })
}

/// What both commands read: the policies in force (Services resolved),
/// the endpoints, and the universe of identities with the CIDR identities
/// an agent would make.
struct Loaded {
    view: cilium_policy::cluster::PolicyView,
    ceps: Vec<Arc<CiliumEndpoint>>,
    nodes: Vec<Arc<CiliumNode>>,
    universe: Universe,
    cidr_ids: BTreeMap<Prefix, u32>,
}

async fn load(ctx: &Ctx) -> anyhow::Result<Loaded> {
    ctx.out.step("reading policies, endpoints, identities and Services");
    let cnps = list_all::<CiliumNetworkPolicy>(ctx, "CiliumNetworkPolicies").await?;
    let ccnps = list_all::<CiliumClusterwideNetworkPolicy>(ctx, "CiliumClusterwideNetworkPolicies").await?;
    let knps = list_all::<NetworkPolicy>(ctx, "NetworkPolicies").await?;
    let ceps = list_all::<CiliumEndpoint>(ctx, "CiliumEndpoints").await?;
    // Endpoints carry their identity's labels: without CRD identities
    // (kvstore mode) every endpoint's identity is still known.
    let ids = match list_all::<CiliumIdentity>(ctx, "CiliumIdentities").await {
        Ok(ids) => ids,
        Err(e) => {
            ctx.out.warn(&format!("{e:#}; identity labels come from the CiliumEndpoints only"));
            Vec::new()
        }
    };
    // What policies resolve through: a trace without them could say
    // allowed where the datapath drops, so a failure is an error.
    let groups = list_all::<CiliumCidrGroup>(ctx, "CiliumCIDRGroups").await?;
    let svcs = list_all::<Service>(ctx, "Services").await?;
    let slices = list_all::<EndpointSlice>(ctx, "EndpointSlices").await?;
    let nodes = list_all::<CiliumNode>(ctx, "CiliumNodes").await?;
    ctx.out.done();

    let cfg = cilium_policy::Config {
        cluster_name: ctx.config.cluster_name.clone(),
        ipv4: true,
        ipv6: ctx.config.ipv6_pool.is_some(),
        enable_node_selector_labels: ctx.config.node_selector_labels,
    };
    let mut view = cilium_policy::cluster::gather(&cnps, &ccnps, &knps, &cfg);
    let services = cilium_policy::cluster::services(&svcs, &slices);
    cilium_policy::service::resolve(&mut view.entries, &services, &cfg);
    let groups: Vec<_> = groups.iter().map(|g| cilium_policy::cidr_group::CidrGroup::from_crd(g).0).collect();
    // CIDR identities as an agent makes them (their numbers are node-local).
    let mut prefixes: BTreeSet<Prefix> = cilium_policy::engine::cidr_prefixes(&view.entries);
    prefixes.extend(groups.iter().flat_map(|g| g.cidrs.iter().copied()));
    let cidr_ids: BTreeMap<Prefix, u32> =
        prefixes.into_iter().enumerate().map(|(i, p)| (p, LOCAL_FLAG | (i as u32 + 1))).collect();
    let mut universe = cilium_policy::cluster::universe(&cfg, &ids, &ceps, &cidr_ids);
    universe.add_cidr_groups(&groups);
    Ok(Loaded { view, ceps, nodes, universe, cidr_ids })
}

/// The policies, endpoints and identities a trace reads, loaded once for
/// any number of traces (doctor explains every recent drop with it).
pub struct Tracer(Loaded);

impl Tracer {
    pub async fn load(ctx: &Ctx) -> anyhow::Result<Tracer> {
        Ok(Tracer(load(ctx).await?))
    }

    /// Whether `src` -> `dst` on (`proto`, `port`) passes, and why.
    pub fn trace(&self, src: &str, dst: &str, proto: u8, port: u16) -> anyhow::Result<Report> {
        trace(&self.0, src, dst, proto, port)
    }
}

/// One line: each direction's verdict and what decided it.
pub fn explain(r: &Report) -> String {
    let side = |s: &Side| format!("{} {}: {}", s.of, if s.allowed { "allowed" } else { "denied" }, why(&s.decision));
    format!("{}; {}", side(&r.egress), side(&r.ingress))
}

fn trace(l: &Loaded, src: &str, dst: &str, proto: u8, port: u16) -> anyhow::Result<Report> {
    let Loaded { view, ceps, nodes, universe, cidr_ids } = l;
    let mut u = universe.clone();
    // A node's address is `host` to the endpoints of that node and
    // `remote-node` (or, with node selector labels, that node's own
    // identity) to the others: which one depends on the other end.
    let (src_node, dst_node) = (endpoint_node(src, ceps), endpoint_node(dst, ceps));
    let src = match node_end(src, nodes, dst_node.as_deref(), &mut u) {
        Some(end) => end,
        None => resolve_end(src, ceps, &u, cidr_ids)?,
    };
    let dst = match node_end(dst, nodes, src_node.as_deref(), &mut u) {
        Some(end) => end,
        None => resolve_end(dst, ceps, &u, cidr_ids)?,
    };
    for end in [&src, &dst] {
        if !u.identities.contains_key(&end.identity) {
            bail!("the labels of identity {} ({}) are unknown: cannot trace", end.identity, end.name);
        }
    }
    let mut sel = Selections::new(&u);
    let side = |end: &End, ingress: bool, peer: u32, sel: &mut Selections| -> Side {
        let of = format!("{} of {}", if ingress { "ingress" } else { "egress" }, end.name);
        if !end.endpoint {
            return Side { of, allowed: true, decision: None };
        }
        let subject = u.identities[&end.identity].clone();
        let flow = Flow { ingress, peer, proto, port };
        let d = cilium_policy::trace::trace(&subject, &end.ports, &flow, &view.entries, sel);
        Side { of, allowed: d.allowed(), decision: Some(d) }
    };
    let egress = side(&src, false, dst.identity, &mut sel);
    let ingress = side(&dst, true, src.identity, &mut sel);
    Ok(Report {
        allowed: egress.allowed && ingress.allowed,
        not_enforced: view.refused.iter().map(|(r, why)| (r.to_string(), why.clone())).collect(),
        src,
        dst,
        protocol: proto,
        port,
        egress,
        ingress,
    })
}

/// Prints the trace; exit code 0 when the flow is allowed, 2 when denied
/// (1 stays "could not tell": an error).
pub async fn policy_trace(ctx: &Ctx, src: &str, dst: &str, dport: &str) -> anyhow::Result<u8> {
    let (proto, port) = parse_dport(dport)?;
    let report = trace(&load(ctx).await?, src, dst, proto, port)?;
    let code = if report.allowed { 0 } else { 2 };
    if !ctx.out.is_table() {
        ctx.out.machine(&report)?;
        return Ok(code);
    }
    println!(
        "{} (identity {}) -> {} (identity {}), {}",
        report.src.name,
        report.src.identity,
        report.dst.name,
        report.dst.identity,
        flow_text(proto, port)
    );
    let mut t = Table::new(&["DIRECTION", "VERDICT", "DECIDED BY"]);
    for s in [&report.egress, &report.ingress] {
        let verdict = if s.allowed { ctx.out.paint("allowed", Style::Ok) } else { ctx.out.paint("denied", Style::Bad) };
        t.row(vec![s.of.clone(), verdict, why(&s.decision)]);
    }
    print!("{}", t.render());
    for (policy, reason) in &report.not_enforced {
        ctx.out.warn(&format!("{policy} is not enforced: {reason}"));
    }
    let verdict =
        if report.allowed { ctx.out.paint("ALLOWED", Style::Ok) } else { ctx.out.paint("DENIED", Style::Bad) };
    println!("verdict: {verdict}");
    Ok(code)
}

fn flow_text(proto: u8, port: u16) -> String {
    match proto {
        PROTO_TCP => format!("TCP/{port}"),
        PROTO_UDP => format!("UDP/{port}"),
        PROTO_SCTP => format!("SCTP/{port}"),
        PROTO_ICMP => format!("ICMP type {port}"),
        PROTO_ICMPV6 => format!("ICMPv6 type {port}"),
        p => format!("protocol {p} port {port}"),
    }
}

fn why(d: &Option<Decision>) -> String {
    let matched = |m: &cilium_policy::trace::Match| format!("{} (peer {}, ports {})", m.rule, m.peer, m.ports);
    match d {
        None => "not a Cilium endpoint: no policy of its own".into(),
        Some(Decision::NoPolicy) => "no rule selecting it has this direction: default allow".into(),
        Some(Decision::DefaultDeny { policies }) => format!("no rule matches; default deny by {}", policies.join(", ")),
        Some(Decision::Allowed { by }) => by.iter().map(matched).collect::<Vec<_>>().join("; "),
        Some(Decision::Denied { by, .. }) => {
            format!("deny: {}", by.iter().map(matched).collect::<Vec<_>>().join("; "))
        }
    }
}

#[derive(Serialize)]
struct SelectorRow {
    selector: String,
    /// Every identity (the wildcard).
    all: bool,
    identities: Vec<u32>,
    policies: BTreeSet<String>,
}

/// Every peer selector in force, what it selects and who uses it.
pub async fn policy_selectors(ctx: &Ctx) -> anyhow::Result<()> {
    let Loaded { view, universe: u, .. } = load(ctx).await?;
    let mut sel = Selections::new(&u);
    let mut rows: BTreeMap<String, SelectorRow> = BTreeMap::new();
    for e in &view.entries {
        for peer in e.l3.iter().flatten() {
            let text = cilium_policy::trace::peer_text(peer);
            let row = rows.entry(text.clone()).or_insert_with(|| {
                let (all, identities) = match sel.select(peer) {
                    cilium_policy::engine::Selection::Any => (true, Vec::new()),
                    cilium_policy::engine::Selection::Ids(ids) => (false, ids.clone()),
                };
                SelectorRow { selector: text, all, identities, policies: BTreeSet::new() }
            });
            row.policies.insert(e.origin.policy.to_string());
        }
    }
    let rows: Vec<SelectorRow> = rows.into_values().collect();
    if !ctx.out.is_table() {
        return ctx.out.machine(&rows);
    }
    let mut t = Table::new(&["SELECTOR", "IDENTITIES", "USERS"]);
    for r in &rows {
        let ids = if r.all {
            "all".to_string()
        } else if r.identities.is_empty() {
            ctx.out.paint("none", Style::Dim)
        } else {
            r.identities.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        };
        t.row(vec![r.selector.clone(), ids, r.policies.iter().cloned().collect::<Vec<_>>().join(", ")]);
    }
    print!("{}", t.render());
    eprintln!("{} selectors", rows.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dport_forms() {
        assert_eq!(parse_dport("80").unwrap(), (PROTO_TCP, 80));
        assert_eq!(parse_dport("53/UDP").unwrap(), (PROTO_UDP, 53));
        assert_eq!(parse_dport("8/icmp").unwrap(), (PROTO_ICMP, 8));
        assert!(parse_dport("http/tcp").unwrap_err().to_string().contains("must be a number"));
        assert!(parse_dport("80/gre").unwrap_err().to_string().contains("unknown protocol"));
        assert!(parse_dport("300/icmp").is_err());
    }
}
