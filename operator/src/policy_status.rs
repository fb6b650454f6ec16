//! Policy validation: every CiliumNetworkPolicy and
//! CiliumClusterwideNetworkPolicy gets `status.conditions` type `Valid`
//! (True with "Policy validation succeeded", or False with the first
//! problem found). The API server's schema catches malformed fields; this
//! catches what a schema cannot: a rule selecting nothing, bad CIDRs or
//! excepts outside their CIDR, bad ports and port ranges, and selector
//! requirements that Kubernetes would refuse.

use std::time::Duration;

use cilium_crds::policy::{
    Cidr, CidrRule, CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy, PolicyCondition, PortProtocol, Rule,
};
use cilium_crds::selector::{EndpointSelector, SelectorOperator};
use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;

use crate::run::Context;

pub const FIELD_MANAGER: &str = "cilium-operator-policy-status";
pub const VALID_MESSAGE: &str = "Policy validation succeeded";

fn check_selector(what: &str, sel: &EndpointSelector) -> Result<(), String> {
    for r in sel.match_expressions.iter().flatten() {
        let n = r.values.as_ref().map_or(0, Vec::len);
        match r.operator {
            SelectorOperator::In | SelectorOperator::NotIn if n == 0 => {
                return Err(format!("{what}: operator {:?} on key {:?} needs at least one value", r.operator, r.key));
            }
            SelectorOperator::Exists | SelectorOperator::DoesNotExist if n > 0 => {
                return Err(format!("{what}: operator {:?} on key {:?} takes no values", r.operator, r.key));
            }
            _ => {}
        }
    }
    Ok(())
}

fn parse_cidr(what: &str, c: &Cidr) -> Result<cilium_ipam::Cidr, String> {
    let text = c.as_str();
    let full = if text.contains('/') {
        text.to_string()
    } else if text.contains(':') {
        format!("{text}/128")
    } else {
        format!("{text}/32")
    };
    full.parse().map_err(|e| format!("{what}: invalid CIDR {text:?}: {e}"))
}

fn check_cidr_set(what: &str, set: &CidrRule) -> Result<(), String> {
    let Some(c) = &set.cidr else {
        if set.cidr_group_ref.is_none() && set.cidr_group_selector.is_none() {
            return Err(format!("{what}: a cidrSet entry needs cidr, cidrGroupRef or cidrGroupSelector"));
        }
        return Ok(());
    };
    let outer = parse_cidr(what, c)?;
    for ex in set.except.iter().flatten() {
        let inner = parse_cidr(what, ex)?;
        if !outer.contains(&inner) {
            return Err(format!("{what}: except {:?} is not inside {:?}", ex.as_str(), c.as_str()));
        }
    }
    Ok(())
}

fn check_port(what: &str, p: &PortProtocol) -> Result<(), String> {
    let Some(port) = p.port.as_deref() else { return Ok(()) };
    match port.parse::<u32>() {
        Ok(n) if n > 65535 => Err(format!("{what}: port {n} is out of range 0-65535")),
        Ok(n) => match p.end_port {
            Some(e) if (e as i64) < n as i64 || e > 65535 => {
                Err(format!("{what}: endPort {e} must be between port {n} and 65535"))
            }
            _ => Ok(()),
        },
        Err(_) => {
            let named = !port.is_empty()
                && port.len() <= 15
                && port.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && port.chars().any(|c| c.is_ascii_lowercase());
            if named { Ok(()) } else { Err(format!("{what}: port {port:?} is neither a number nor a port name")) }
        }
    }
}

/// The first problem of one rule, if any (`n`: its index, for messages).
pub fn validate_rule(n: usize, rule: &Rule) -> Result<(), String> {
    let what = format!("rule {n}");
    match (&rule.endpoint_selector, &rule.node_selector) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(format!("{what}: exactly one of endpointSelector and nodeSelector is required"));
        }
        (Some(s), None) | (None, Some(s)) => check_selector(&format!("{what} selector"), s)?,
    }
    let sels = |v: Option<&Vec<EndpointSelector>>, name: &str| -> Result<(), String> {
        for s in v.into_iter().flatten() {
            check_selector(&format!("{what} {name}"), s)?;
        }
        Ok(())
    };
    let cidrs = |v: Option<&Vec<Cidr>>, sets: Option<&Vec<CidrRule>>, name: &str| -> Result<(), String> {
        for c in v.into_iter().flatten() {
            parse_cidr(&format!("{what} {name}"), c)?;
        }
        for s in sets.into_iter().flatten() {
            check_cidr_set(&format!("{what} {name}Set"), s)?;
        }
        Ok(())
    };
    let ports = |v: Vec<&Vec<PortProtocol>>, name: &str| -> Result<(), String> {
        for p in v.into_iter().flatten() {
            check_port(&format!("{what} {name}"), p)?;
        }
        Ok(())
    };
    for r in rule.ingress.iter().flatten() {
        sels(r.from_endpoints.as_ref(), "fromEndpoints")?;
        cidrs(r.from_cidr.as_ref(), r.from_cidr_set.as_ref(), "fromCIDR")?;
        ports(r.to_ports.iter().flatten().filter_map(|p| p.ports.as_ref()).collect(), "ingress toPorts")?;
    }
    for r in rule.ingress_deny.iter().flatten() {
        sels(r.from_endpoints.as_ref(), "fromEndpoints")?;
        cidrs(r.from_cidr.as_ref(), r.from_cidr_set.as_ref(), "fromCIDR")?;
        ports(r.to_ports.iter().flatten().filter_map(|p| p.ports.as_ref()).collect(), "ingressDeny toPorts")?;
    }
    for r in rule.egress.iter().flatten() {
        sels(r.to_endpoints.as_ref(), "toEndpoints")?;
        cidrs(r.to_cidr.as_ref(), r.to_cidr_set.as_ref(), "toCIDR")?;
        ports(r.to_ports.iter().flatten().filter_map(|p| p.ports.as_ref()).collect(), "egress toPorts")?;
    }
    for r in rule.egress_deny.iter().flatten() {
        sels(r.to_endpoints.as_ref(), "toEndpoints")?;
        cidrs(r.to_cidr.as_ref(), r.to_cidr_set.as_ref(), "toCIDR")?;
        ports(r.to_ports.iter().flatten().filter_map(|p| p.ports.as_ref()).collect(), "egressDeny toPorts")?;
    }
    Ok(())
}

/// The first problem of a policy's rules, if any.
pub fn validate<'a>(rules: impl Iterator<Item = &'a Rule>) -> Result<(), String> {
    let mut any = false;
    for (n, r) in rules.enumerate() {
        any = true;
        validate_rule(n, r)?;
    }
    if !any {
        return Err("the policy has neither spec nor specs".into());
    }
    Ok(())
}

/// The Valid condition to write, or None when the current one already says it.
fn desired(current: Option<&Vec<PolicyCondition>>, verdict: &Result<(), String>) -> Option<serde_json::Value> {
    let (status, message) = match verdict {
        Ok(()) => ("True", VALID_MESSAGE.to_string()),
        Err(e) => ("False", e.clone()),
    };
    let old = current.into_iter().flatten().find(|c| c.type_ == "Valid");
    if old.is_some_and(|c| c.status == status && c.message.as_deref() == Some(message.as_str())) {
        return None;
    }
    let transition = match old {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => None,
    }
    .unwrap_or_else(|| jiff::Timestamp::now().round(jiff::Unit::Second).unwrap_or(jiff::Timestamp::now()).to_string());
    Some(serde_json::json!({ "status": { "conditions": [{
        "type": "Valid", "status": status, "lastTransitionTime": transition, "message": message,
    }] } }))
}

pub async fn run(ctx: Context, stop: CancellationToken) -> anyhow::Result<()> {
    let cnps: Api<CiliumNetworkPolicy> = Api::all(ctx.client.clone());
    let ccnps: Api<CiliumClusterwideNetworkPolicy> = Api::all(ctx.client.clone());
    let pp = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let cfg = watcher::Config::default();
    let mut a = watcher(cnps.clone(), cfg.clone()).default_backoff().applied_objects().boxed();
    let mut b = watcher(ccnps.clone(), cfg).default_backoff().applied_objects().boxed();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            Some(ev) = a.next() => {
                let Ok(p) = ev else { continue };
                let verdict = validate(p.rules());
                if let Some(body) = desired(p.status.as_ref().and_then(|s| s.conditions.as_ref()), &verdict) {
                    let (ns, name) = (p.metadata.namespace.clone().unwrap_or_default(), p.metadata.name.clone().unwrap_or_default());
                    let api: Api<CiliumNetworkPolicy> = Api::namespaced(ctx.client.clone(), &ns);
                    log_outcome("CiliumNetworkPolicy", &format!("{ns}/{name}"), &verdict, api.patch_status(&name, &pp, &Patch::Merge(&body)).await.err());
                }
            }
            Some(ev) = b.next() => {
                let Ok(p) = ev else { continue };
                let verdict = validate(p.rules());
                if let Some(body) = desired(p.status.as_ref().and_then(|s| s.conditions.as_ref()), &verdict) {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    log_outcome("CiliumClusterwideNetworkPolicy", &name, &verdict, ccnps.patch_status(&name, &pp, &Patch::Merge(&body)).await.err());
                }
            }
            else => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

fn log_outcome(kind: &str, name: &str, verdict: &Result<(), String>, err: Option<kube::Error>) {
    match (verdict, err) {
        (_, Some(e)) => tracing::warn!(kind, name, error = %e, "cannot write the Valid condition"),
        (Ok(()), None) => tracing::debug!(kind, name, "policy valid"),
        (Err(why), None) => tracing::warn!(kind, name, reason = %why, "policy invalid"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(v: serde_json::Value) -> Vec<Rule> {
        vec![serde_json::from_value(v).unwrap()]
    }

    #[test]
    fn valid_and_invalid_rules() {
        let ok = rules(serde_json::json!({
            "endpointSelector": { "matchLabels": { "app": "web" } },
            "ingress": [{ "fromCIDRSet": [{ "cidr": "10.0.0.0/8", "except": ["10.96.0.0/12"] }],
                          "toPorts": [{ "ports": [{ "port": "80", "protocol": "TCP" }, { "port": "http" }] }] }]
        }));
        assert_eq!(validate(ok.iter()), Ok(()));
        let cases = [
            (serde_json::json!({ "ingress": [{}] }), "exactly one of endpointSelector and nodeSelector"),
            (
                serde_json::json!({ "endpointSelector": {}, "ingress": [{ "fromCIDRSet": [{ "cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"] }] }] }),
                "is not inside",
            ),
            (serde_json::json!({ "endpointSelector": {}, "egress": [{ "toCIDR": ["10.0.0.0/33"] }] }), "invalid CIDR"),
            (
                serde_json::json!({ "endpointSelector": {}, "egress": [{ "toPorts": [{ "ports": [{ "port": "70000" }] }] }] }),
                "out of range",
            ),
            (
                serde_json::json!({ "endpointSelector": {}, "egress": [{ "toPorts": [{ "ports": [{ "port": "80", "endPort": 70 }] }] }] }),
                "endPort 70",
            ),
            (
                serde_json::json!({ "endpointSelector": { "matchExpressions": [{ "key": "a", "operator": "In" }] } }),
                "needs at least one value",
            ),
        ];
        for (v, want) in cases {
            let r = rules(v);
            let e = validate(r.iter()).unwrap_err();
            assert!(e.contains(want), "{e} lacks {want}");
        }
        assert!(validate(std::iter::empty()).unwrap_err().contains("neither spec nor specs"));
    }

    #[test]
    fn condition_written_only_on_change() {
        let ok: Result<(), String> = Ok(());
        let body = desired(None, &ok).unwrap();
        assert_eq!(body["status"]["conditions"][0]["status"], "True");
        assert_eq!(body["status"]["conditions"][0]["message"], VALID_MESSAGE);
        let current = vec![PolicyCondition {
            type_: "Valid".into(),
            status: "True".into(),
            last_transition_time: Some("2026-11-23T00:00:00Z".into()),
            message: Some(VALID_MESSAGE.into()),
            reason: None,
        }];
        assert!(desired(Some(&current), &ok).is_none());
        let bad = desired(Some(&current), &Err("rule 0: x".into())).unwrap();
        assert_eq!(bad["status"]["conditions"][0]["status"], "False");
        assert_ne!(bad["status"]["conditions"][0]["lastTransitionTime"], "2026-11-23T00:00:00Z");
    }
}
