//! Wiring: signals, admin servers, CRD registration, leader election and the
//! leader-only duties.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Health};
use crate::config::Config;
use crate::leader::{self, Elector, Outcome};
use crate::metrics::Metrics;

/// Shared by every duty: one client, one metrics registry, the config.
#[derive(Clone)]
pub struct Context {
    pub client: kube::Client,
    pub metrics: Arc<Metrics>,
    pub config: Arc<Config>,
}

/// Cancels `token` on SIGTERM or SIGINT.
fn watch_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
        }
        token.cancel();
    });
}

async fn kube_client(cfg: &Config) -> anyhow::Result<kube::Client> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("reading --k8s-kubeconfig-path {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// Runs the operator until SIGTERM (exit 0) or the loss of the lease (exit 1).
pub async fn run(cfg: Config) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone());
    let metrics = Arc::new(Metrics::new());
    let (health_tx, health_rx) = watch::channel(Health::default());

    let health_listener = admin::bind(&cfg.health_addr, "the health API (--operator-api-serve-addr)").await?;
    let mut servers =
        vec![tokio::spawn(admin::serve_health(health_listener, health_rx.clone(), metrics.clone(), shutdown.clone()))];
    if let Some(addr) = &cfg.metrics_addr {
        let l = admin::bind(addr, "metrics (--operator-prometheus-serve-addr)").await?;
        servers.push(tokio::spawn(admin::serve_metrics(l, health_rx.clone(), metrics.clone(), shutdown.clone())));
    }
    tracing::info!(
        health = %cfg.health_addr,
        metrics = cfg.metrics_addr.as_deref().unwrap_or("disabled"),
        identity_allocation_mode = cfg.identity_allocation_mode.as_str(),
        "cilium-operator starting"
    );

    let client = kube_client(&cfg).await?;
    // Register the CRDs, retrying while the API server is unreachable.
    loop {
        match crate::crds::register(&client, Duration::from_secs(60)).await {
            Ok(()) => break,
            Err(e) => tracing::warn!(error = format!("{e:#}"), "cannot register CRDs yet, retrying in 2s"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(ExitCode::SUCCESS),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
    metrics.process.crds_established_time.set(jiff::Timestamp::now().as_millisecond() as f64 / 1000.0);
    health_tx.send_modify(|h| h.started = true);

    let ctx = Context { client: client.clone(), metrics: metrics.clone(), config: Arc::new(cfg.clone()) };
    let elector = Elector::new(client, &cfg.namespace, leader::holder_identity(), cfg.leader_election);
    tracing::info!(identity = elector.identity(), lease = leader::LEASE_NAME, namespace = %cfg.namespace, "campaigning for leadership");
    let (leading_tx, leading_rx) = watch::channel(false);
    let duties_stop = CancellationToken::new();
    let duties = tokio::spawn(run_duties(ctx, leading_rx, health_tx, duties_stop.clone()));
    // On shutdown: stop the duties and wait for their writes in flight
    // (bounded), all while still holding the lease; only then release it.
    let stop = duties_stop.clone();
    let drain = async move {
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), duties).await;
    };
    let outcome = elector.run(leading_tx, shutdown.clone(), drain).await;
    // Lost: the duties stop at once (another replica may lead already).
    duties_stop.cancel();
    match outcome {
        Outcome::Released => {
            shutdown.cancel();
            for s in servers {
                let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
            }
            tracing::info!("shut down cleanly");
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Lost => {
            tracing::error!("leader election lost, exiting so that a fresh process campaigns again");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Starts the leader-only duties once this replica leads, and stops them
/// when `stop` fires.
async fn run_duties(
    ctx: Context,
    mut leading: watch::Receiver<bool>,
    health: watch::Sender<Health>,
    stop: CancellationToken,
) {
    tokio::select! {
        _ = stop.cancelled() => return,
        r = leading.wait_for(|l| *l) => if r.is_err() { return },
    }
    ctx.metrics.process.is_leader.set(1);
    health.send_modify(|h| h.leader = true);
    tracing::info!("leading: starting duties");
    let mut duties = tokio::task::JoinSet::new();
    let (c, s) = (&ctx, &stop);
    duties.spawn(supervise("ipam", s.clone(), crate::ipam::run(c.clone(), c.metrics.ipam.clone(), s.clone())));
    duties.spawn(supervise("endpoint-gc", s.clone(), crate::endpoint_gc::run(c.clone(), s.clone())));
    duties.spawn(supervise("identity-gc", s.clone(), crate::identity_gc::run(c.clone(), s.clone())));
    duties.spawn(supervise("kvstore-heartbeat", s.clone(), crate::kvstore::run_heartbeat(c.clone(), s.clone())));
    duties.spawn(supervise("doublewrite-reporter", s.clone(), crate::doublewrite::run(c.clone(), s.clone())));
    duties.spawn(supervise("nodes-gc", s.clone(), crate::nodes_gc::run(c.clone(), s.clone())));
    duties.spawn(supervise("node-taints", s.clone(), crate::node_taints::run(c.clone(), s.clone())));
    duties.spawn(supervise("unmanaged-pods", s.clone(), crate::unmanaged_pods::run(c.clone(), s.clone())));
    duties.spawn(supervise("policy-status", s.clone(), crate::policy_status::run(c.clone(), s.clone())));
    stop.cancelled().await;
    while duties.join_next().await.is_some() {}
    ctx.metrics.process.is_leader.set(0);
    health.send_modify(|h| h.leader = false);
}

/// Runs one duty and logs why it ended. Duties retry transient errors
/// themselves and return only on stop or on an unrecoverable error, which
/// never takes the other duties down.
async fn supervise<F>(name: &'static str, stop: CancellationToken, duty: F)
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    match duty.await {
        Ok(()) => tracing::debug!(duty = name, "duty stopped"),
        Err(e) => {
            if !stop.is_cancelled() {
                tracing::error!(duty = name, error = format!("{e:#}"), "duty failed");
            }
        }
    }
}
