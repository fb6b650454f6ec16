//! Policy validation: every CiliumNetworkPolicy and
//! CiliumClusterwideNetworkPolicy gets `status.conditions` type `Valid`
//! (True with "Policy validation succeeded", or False with upstream's
//! reason). The verdict is the shared engine's (`cilium-policy`), the same
//! reading the agents enforce: a policy marked invalid here is one no agent
//! enforces.

use std::collections::HashMap;
use std::time::Duration;

use cilium_crds::policy::{CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy, PolicyCondition};
use futures::StreamExt;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;

use crate::run::Context;

pub const FIELD_MANAGER: &str = "cilium-operator-policy-status";
pub const VALID_MESSAGE: &str = "Policy validation succeeded";
/// Start of the Valid=False message of a policy that cannot be decoded.
pub const UNDECODABLE: &str = "Policy cannot be decoded";

/// The engine's reading of the cluster (the agents read policies with the
/// same configuration, so what is Valid here is what they enforce).
fn engine_config(ctx: &Context) -> cilium_policy::Config {
    cilium_policy::Config {
        cluster_name: ctx.config.cluster_name.clone(),
        enable_node_selector_labels: ctx.config.node_selector_labels,
        ..Default::default()
    }
}

fn verdict<T>(parsed: Result<T, cilium_policy::Invalid>) -> Result<(), String> {
    parsed.map(|_| ()).map_err(|e| e.0)
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
    let cnps: Api<DeserializeGuard<CiliumNetworkPolicy>> = Api::all(ctx.client.clone());
    let ccnps: Api<DeserializeGuard<CiliumClusterwideNetworkPolicy>> = Api::all(ctx.client.clone());
    let pp = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let engine = engine_config(&ctx);
    let cfg = watcher::Config::default();
    let mut a = watcher(cnps, cfg.clone()).default_backoff().applied_objects().boxed();
    let mut b = watcher(ccnps.clone(), cfg).default_backoff().applied_objects().boxed();
    // Undecodable policies already marked, by uid (their old condition
    // cannot be read back, so this keeps from rewriting it on every event).
    let mut marked_bad: HashMap<String, String> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            Some(ev) = a.next() => {
                let Ok(p) = ev else { continue };
                let Some((verdict, body)) = judge(&ctx, &p, "CiliumNetworkPolicy", &mut marked_bad, |p| {
                    (p.status.as_ref().and_then(|s| s.conditions.as_ref()), verdict(cilium_policy::parse::parse_cnp(p, &engine)))
                }) else { continue };
                let (ns, name) = (p.meta().namespace.clone().unwrap_or_default(), p.meta().name.clone().unwrap_or_default());
                let api: Api<DeserializeGuard<CiliumNetworkPolicy>> = Api::namespaced(ctx.client.clone(), &ns);
                let err = api.patch_status(&name, &pp, &Patch::Merge(&body)).await.err();
                if err.is_some() { marked_bad.remove(p.meta().uid.as_deref().unwrap_or_default()); }
                log_outcome("CiliumNetworkPolicy", &format!("{ns}/{name}"), &verdict, err);
            }
            Some(ev) = b.next() => {
                let Ok(p) = ev else { continue };
                let Some((verdict, body)) = judge(&ctx, &p, "CiliumClusterwideNetworkPolicy", &mut marked_bad, |p| {
                    (p.status.as_ref().and_then(|s| s.conditions.as_ref()), verdict(cilium_policy::parse::parse_ccnp(p, &engine)))
                }) else { continue };
                let name = p.meta().name.clone().unwrap_or_default();
                let err = ccnps.patch_status(&name, &pp, &Patch::Merge(&body)).await.err();
                if err.is_some() { marked_bad.remove(p.meta().uid.as_deref().unwrap_or_default()); }
                log_outcome("CiliumClusterwideNetworkPolicy", &name, &verdict, err);
            }
            else => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// The verdict on one watched policy and the status to write, or None when
/// nothing needs writing. A policy that does not decode is invalid (no
/// agent enforces it): it is counted, logged and marked `Valid=False` once.
fn judge<K: kube::Resource>(
    ctx: &Context,
    p: &DeserializeGuard<K>,
    kind: &str,
    marked_bad: &mut HashMap<String, String>,
    read: impl Fn(&K) -> (Option<&Vec<PolicyCondition>>, Result<(), String>),
) -> Option<(Result<(), String>, serde_json::Value)> {
    let uid = p.meta().uid.clone().unwrap_or_default();
    match &p.0 {
        Ok(k) => {
            marked_bad.remove(&uid);
            let (conditions, verdict) = read(k);
            desired(conditions, &verdict).map(|body| (verdict, body))
        }
        Err(bad) => {
            ctx.metrics.malformed(kind, bad);
            let verdict = Err(format!("{UNDECODABLE}: {}", bad.error));
            let message = verdict.clone().unwrap_err();
            if marked_bad.get(&uid) == Some(&message) {
                return None;
            }
            marked_bad.insert(uid, message);
            desired(None, &verdict).map(|body| (verdict, body))
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

    fn cnp(spec: serde_json::Value) -> Result<(), String> {
        let p: CiliumNetworkPolicy = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "p", "namespace": "default"}, "spec": spec}),
        )
        .unwrap();
        verdict(cilium_policy::parse::parse_cnp(&p, &cilium_policy::Config::default()))
    }

    /// The operator's verdict is the engine's (the agent enforces exactly
    /// what is Valid); upstream's messages.
    #[test]
    fn valid_and_invalid_rules() {
        let ok = serde_json::json!({
            "endpointSelector": { "matchLabels": { "app": "web" } },
            "ingress": [{ "fromCIDRSet": [{ "cidr": "10.0.0.0/8", "except": ["10.96.0.0/12"] }],
                          "toPorts": [{ "ports": [{ "port": "80", "protocol": "TCP" }, { "port": "http" }] }] }]
        });
        assert_eq!(cnp(ok), Ok(()));
        let cases = [
            (serde_json::json!({ "ingress": [{}] }), "one of EndpointSelector or NodeSelector"),
            (
                serde_json::json!({ "endpointSelector": {}, "ingress": [{ "fromCIDRSet": [{ "cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"] }] }] }),
                "does not contain exclude CIDR prefix",
            ),
            (
                serde_json::json!({ "endpointSelector": {}, "egress": [{ "toCIDR": ["10.0.0.0/33"] }] }),
                "unable to parse CIDR",
            ),
            (
                serde_json::json!({ "endpointSelector": {}, "egress": [{ "toPorts": [{ "ports": [{ "port": "70000" }] }] }] }),
                "unable to parse port",
            ),
            (
                serde_json::json!({ "endpointSelector": { "matchExpressions": [{ "key": "a", "operator": "In" }] }, "ingress": [{}] }),
                "needs at least one value",
            ),
            (serde_json::json!({ "endpointSelector": {}, "ingress": [] }), "at least one of Ingress"),
        ];
        for (v, want) in cases {
            let e = cnp(v).unwrap_err();
            assert!(e.contains(want), "{e} lacks {want}");
        }
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
