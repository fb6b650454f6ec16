//! On-demand identity GC: `ciliumctl identity gc` writes a request id into
//! the ConfigMap `cilium-operator-identity-gc` in the operator's namespace;
//! the leader notices it within a second, wakes every identity GC loop, waits
//! for a pass of each that started after the request, and writes the
//! outcome back into the same ConfigMap. A request pending when a new leader
//! starts is served by that leader.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use tokio_util::sync::CancellationToken;

use crate::identity_gc::Backend;
use crate::run::Context;

/// The request/answer ConfigMap, in the operator's namespace.
pub const CONFIG_MAP: &str = "cilium-operator-identity-gc";
/// Written by the requester: a new value asks for a pass.
pub const REQUEST_ID: &str = "request-id";
pub const REQUESTED_AT: &str = "requested-at";
/// Written by the leader once every GC loop has run a pass for the request.
pub const COMPLETED_ID: &str = "completed-request-id";
pub const COMPLETED_AT: &str = "completed-at";
/// One line per backend: `crd: alive=.. deleted=.. marked=..`.
pub const RESULT: &str = "result";
/// Field manager of the answer.
pub const FIELD_MANAGER: &str = "cilium-operator-identity-gc-request";

const POLL: Duration = Duration::from_secs(1);

/// Serves requests until `stop`. With no backends (identity GC disabled)
/// every request is answered with that fact.
pub async fn serve(ctx: &Context, stop: &CancellationToken, backends: Vec<Backend<'_>>) {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        let data = match api.get_opt(CONFIG_MAP).await {
            Ok(Some(cm)) => cm.data.unwrap_or_default(),
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read {CONFIG_MAP}");
                continue;
            }
        };
        let Some(id) = data.get(REQUEST_ID).cloned() else { continue };
        if data.get(COMPLETED_ID) == Some(&id) {
            continue;
        }
        tracing::info!(request = %id, "identity GC requested on demand");
        let result = if backends.is_empty() {
            "identity GC is disabled (identity-gc-interval is 0)".to_string()
        } else {
            // The next pass of each loop starts after this point.
            let targets: Vec<u64> = backends.iter().map(|b| b.progress.borrow().started + 1).collect();
            for b in &backends {
                b.wake.notify_one();
            }
            let mut parts = Vec::new();
            for (b, target) in backends.iter().zip(targets) {
                let mut rx = b.progress.subscribe();
                let last = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = rx.wait_for(|p| p.finished >= target) => match r {
                        Ok(p) => p.last.clone(),
                        Err(_) => return,
                    },
                };
                parts.push(format!("{}: {last}", b.name));
            }
            parts.join("; ")
        };
        let body = serde_json::json!({ "data": {
            COMPLETED_ID: id,
            COMPLETED_AT: jiff::Timestamp::now().to_string(),
            RESULT: result,
        } });
        let pp = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        match api.patch(CONFIG_MAP, &pp, &Patch::Merge(&body)).await {
            Ok(_) => tracing::info!(request = %id, %result, "on-demand identity GC done"),
            Err(e) => tracing::warn!(error = %e, request = %id, "cannot write the identity GC answer"),
        }
    }
}
