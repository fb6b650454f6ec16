//! cilium-node-agent: see the crate documentation (src/lib.rs) and README.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Parser;
use node_agent_stub::agent::{Agent, Snapshot};
use node_agent_stub::config::{Flags, Settings};
use node_agent_stub::datapath::{DIR_INGRESS, FIRST_DROP_REASON, reason_name};
use node_agent_stub::health::Health;
use node_agent_stub::monitor::Monitor;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let flags = Flags::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CILIUM_LOG_FILTER").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let settings = match Settings::from(flags) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    match rt.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "agent failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(s: Settings) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping (the datapath keeps enforcing)");
        token.cancel();
    });
    let config = match &s.flags.kubeconfig {
        Some(p) => {
            kube::Config::from_custom_kubeconfig(kube::config::Kubeconfig::read_from(p)?, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    let client = kube::Client::try_from(config)?;
    let snapshot = Arc::new(Mutex::new(Snapshot::default()));
    let addr = s.flags.prometheus_serve_addr.clone();
    let addr = if addr.starts_with(':') { format!("0.0.0.0{addr}") } else { addr };
    let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
    let monitor = Monitor::new(&s.flags.node_name, s.bpf_root());
    let health = s.health_checking.then(|| Arc::new(Health::default()));
    let api = Api {
        node: s.flags.node_name.clone(),
        pins: s.bpf_root(),
        snapshot: snapshot.clone(),
        monitor: monitor.clone(),
        health: health.clone(),
    };
    let for_metrics = api.clone();
    let app = axum::Router::new().route("/metrics", axum::routing::get(move || metrics(for_metrics.clone()))).route(
        "/healthz",
        axum::routing::get({
            let snap = snapshot.clone();
            move || async move { healthz(&snap) }
        }),
    );
    let server_stop = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(async move { server_stop.cancelled().await }).await;
    });
    // With the CNI plugin: its calls go from the API socket to the agent.
    let (cni_routes, calls) = if s.flags.cni {
        let (tx, rx) = node_agent_stub::cni::channel();
        (Some(node_agent_stub::cni::routes(tx, snapshot.clone())), Some(rx))
    } else {
        (None, None)
    };
    let api = serve_api(&s.flags.socket_path, api, cni_routes, stop.clone())?;
    tracing::info!(node = %s.flags.node_name, mode = %s.mode, metrics = %addr, api = %s.flags.socket_path.display(), "cilium-node-agent starting");
    let agent = tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        a = Agent::start(s, client, snapshot, monitor.clone(), health) => a?,
    };
    // The datapath's pins exist now: read its events.
    tokio::spawn(async move {
        if let Err(e) = monitor.run_reader().await {
            tracing::error!(error = format!("{e:#}"), "datapath event reader stopped: no monitor events");
        }
    });
    let r = agent.run(stop, calls).await;
    let _ = std::fs::remove_file(&api);
    r
}

/// What the API socket serves from.
#[derive(Clone)]
struct Api {
    node: String,
    pins: std::path::PathBuf,
    snapshot: Arc<Mutex<Snapshot>>,
    monitor: Arc<Monitor>,
    health: Option<Arc<Health>>,
}

/// `GET /v1/status`: what `ciliumctl doctor` checks on a node.
#[derive(serde::Serialize)]
struct AgentStatus {
    node: String,
    ready: bool,
    endpoints: usize,
    endpoints_not_ready: usize,
    /// This node's pod addresses in use.
    ipam: node_agent_stub::agent::IpamStatus,
    /// Map name -> entries / max entries (`cilium_bpf_map_pressure`).
    map_pressure: std::collections::BTreeMap<&'static str, f64>,
    /// None: health checking is off.
    health: Option<node_agent_stub::health::Report>,
    /// The last drops, oldest first, named now.
    recent_drops: Vec<node_agent_stub::monitor::Flow>,
    events_lost: u64,
}

impl Api {
    fn pressure(&self) -> Vec<(&'static str, f64)> {
        let (ipcache, policy) = {
            let s = self.snapshot.lock().expect("snapshot");
            (s.ipcache_entries, s.policy_entries)
        };
        node_agent_stub::datapath::Datapath::pinned_pressure(&self.pins, ipcache, policy)
    }

    fn status(&self) -> AgentStatus {
        let map_pressure = self.pressure().into_iter().collect();
        let (ready, endpoints, endpoints_not_ready, ipam) = {
            let s = self.snapshot.lock().expect("snapshot");
            (s.ready, s.endpoint_names.len(), s.endpoints_not_ready, s.ipam.clone())
        };
        AgentStatus {
            node: self.node.clone(),
            ready,
            endpoints,
            endpoints_not_ready,
            ipam,
            map_pressure,
            health: self.health.as_ref().map(|h| h.report.lock().expect("health report").clone()),
            recent_drops: self.monitor.recent_drops(),
            events_lost: self.monitor.ring_lost.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// `/healthz` (metrics port) and `/v1/healthz` (API socket): 200 once the
/// caches are synced.
fn healthz(snapshot: &Mutex<Snapshot>) -> (axum::http::StatusCode, &'static str) {
    if snapshot.lock().expect("snapshot").ready {
        (axum::http::StatusCode::OK, "ok")
    } else {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

fn json_response<T: serde::Serialize>(v: &T) -> axum::response::Response {
    use axum::response::IntoResponse;
    let body = serde_json::to_string(v).expect("serializes");
    ([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The agent's API on a unix socket (as upstream's
/// `/var/run/cilium/cilium.sock`): `GET /v1/healthz`, `/v1/status`,
/// `/v1/health` (the probes' results), `/v1/maps` (the datapath maps),
/// `/metrics`, `/v1/monitor?type=drop|verdict` (newline-delimited JSON,
/// streamed); with `--cni`, the plugin's `POST /v1/cni/{add,del,check}`.
fn serve_api(
    path: &std::path::Path,
    api: Api,
    cni_routes: Option<axum::Router>,
    stop: CancellationToken,
) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket left by an earlier agent (or a crash) is replaced.
    let _ = std::fs::remove_file(path);
    let listener =
        tokio::net::UnixListener::bind(path).with_context(|| format!("binding the API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o660))?;
    let (snapshot, monitor, health) = (api.snapshot.clone(), api.monitor.clone(), api.health.clone());
    let app = axum::Router::new()
        .route("/v1/maps", {
            let pins = api.pins.clone();
            axum::routing::get(move || async move {
                use axum::response::IntoResponse;
                match node_agent_stub::datapath::Datapath::pinned_dump(&pins) {
                    Ok(d) => json_response(&d),
                    Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
                }
            })
        })
        .route("/metrics", {
            let api = api.clone();
            axum::routing::get(move || metrics(api.clone()))
        })
        .route("/v1/status", axum::routing::get(move || async move { json_response(&api.status()) }))
        .route("/v1/healthz", axum::routing::get(move || async move { healthz(&snapshot) }))
        .route(
            "/v1/health",
            axum::routing::get(move || async move {
                use axum::response::IntoResponse;
                match &health {
                    Some(h) => json_response(&*h.report.lock().expect("health report")),
                    None => {
                        (axum::http::StatusCode::NOT_FOUND, "health checking is off (enable-health-checking=false)")
                            .into_response()
                    }
                }
            }),
        )
        .route(
            "/v1/monitor",
            axum::routing::get(move |axum::extract::RawQuery(q): axum::extract::RawQuery| async move {
                use axum::response::IntoResponse;
                match node_agent_stub::monitor::stream(&monitor, q.as_deref()) {
                    Ok(body) => (
                        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
                        axum::body::Body::from_stream(body),
                    )
                        .into_response(),
                    Err(e) => (axum::http::StatusCode::BAD_REQUEST, e).into_response(),
                }
            }),
        );
    let app = match cni_routes {
        Some(r) => app.merge(r),
        None => app,
    };
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
    });
    Ok(path.to_path_buf())
}

async fn metrics(api: Api) -> String {
    // Counters straight from the pinned map: always current.
    let counters = node_agent_stub::datapath::Datapath::pinned_metrics(&api.pins).unwrap_or_default();
    // Map pressure counts pinned maps: not under the snapshot's lock.
    let pressure = api.pressure();
    let s = api.snapshot.lock().expect("snapshot");
    let mut out = String::new();
    out.push_str("# HELP cilium_forward_count_total Packets forwarded by the policy datapath\n# TYPE cilium_forward_count_total counter\n");
    let mut drops = String::from(
        "# HELP cilium_drop_count_total Packets dropped by the policy datapath\n# TYPE cilium_drop_count_total counter\n",
    );
    let mut bytes = String::from(
        "# HELP cilium_forward_bytes_total Bytes forwarded by the policy datapath\n# TYPE cilium_forward_bytes_total counter\n",
    );
    for (k, v) in &counters {
        let ep = s.endpoint_names.get(&k.endpoint_id).cloned().unwrap_or_else(|| k.endpoint_id.to_string());
        let dir = if k.direction == DIR_INGRESS { "INGRESS" } else { "EGRESS" };
        let labels = format!("endpoint=\"{ep}\",direction=\"{dir}\",reason=\"{}\"", reason_name(k.reason));
        if k.reason >= FIRST_DROP_REASON {
            drops.push_str(&format!("cilium_drop_count_total{{{labels}}} {}\n", v.packets));
        } else {
            out.push_str(&format!("cilium_forward_count_total{{{labels}}} {}\n", v.packets));
            bytes.push_str(&format!("cilium_forward_bytes_total{{{labels}}} {}\n", v.bytes));
        }
    }
    out.push_str(&drops);
    out.push_str(&bytes);
    out.push_str(&format!(
        "# HELP cilium_endpoint_count Local endpoints\n# TYPE cilium_endpoint_count gauge\ncilium_endpoint_count {}\n",
        s.endpoint_names.len()
    ));
    let not_ready = s.endpoints_not_ready;
    out.push_str(&format!(
        "# HELP cilium_endpoint_state Local endpoints by state (not-ready: its policy could not be written, it drops all traffic)\n# TYPE cilium_endpoint_state gauge\ncilium_endpoint_state{{endpoint_state=\"ready\"}} {}\ncilium_endpoint_state{{endpoint_state=\"not-ready\"}} {not_ready}\n",
        s.endpoint_names.len().saturating_sub(not_ready)
    ));
    out.push_str(&format!(
        "# HELP cilium_bpf_map_ops_total Failed writes to the datapath maps\n# TYPE cilium_bpf_map_ops_total counter\ncilium_bpf_map_ops_total{{map_name=\"cilium_policy\",operation=\"update\",outcome=\"fail\"}} {}\n",
        s.policy_map_errors
    ));
    out.push_str("# HELP cilium_bpf_map_pressure Fill ratio of each datapath map (entries / max entries), by map name\n# TYPE cilium_bpf_map_pressure gauge\n");
    for (name, ratio) in pressure {
        out.push_str(&format!("cilium_bpf_map_pressure{{map_name=\"{name}\"}} {ratio}\n"));
    }
    out.push_str("# HELP cilium_k8s_malformed_objects_total Objects skipped because they cannot be decoded, by kind\n# TYPE cilium_k8s_malformed_objects_total counter\n");
    for (kind, n) in &s.malformed_objects {
        out.push_str(&format!("cilium_k8s_malformed_objects_total{{kind=\"{kind}\"}} {n}\n"));
    }
    out.push_str(&api.monitor.metrics());
    if let Some(h) = &api.health {
        out.push_str(&h.report.lock().expect("health report").metrics());
    }
    out
}
