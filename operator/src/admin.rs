//! The health API (`/healthz`, upstream on 127.0.0.1:9234) and the metrics
//! endpoint (`/metrics`, upstream on :9963).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What `/healthz` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// CRDs registered and the API server reachable at start-up.
    pub started: bool,
    pub leader: bool,
}

#[derive(Clone)]
struct AppState {
    health: watch::Receiver<Health>,
    metrics: Arc<Metrics>,
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    let h = s.health.borrow().clone();
    let role = if h.leader { "leader" } else { "standby" };
    if h.started {
        (StatusCode::OK, format!("ok ({role})\n"))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_string())
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.encode())
}

/// Binds a listener, with the address in the error.
pub async fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr} for {what}: {e}"))
}

/// Serves `/healthz` (and, on the same listener, nothing else).
pub async fn serve_health(
    listener: TcpListener,
    health: watch::Receiver<Health>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let app = Router::new().route("/healthz", get(healthz)).with_state(AppState { health, metrics });
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
        tracing::error!(error = %e, "health server failed");
    }
}

/// Serves `/metrics`.
pub async fn serve_metrics(
    listener: TcpListener,
    health: watch::Receiver<Health>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let app = Router::new().route("/metrics", get(self::metrics)).with_state(AppState { health, metrics });
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
        tracing::error!(error = %e, "metrics server failed");
    }
}
