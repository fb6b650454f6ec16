//! The kvstore (etcd) connection and the heartbeat the operator writes.
//!
//! Heartbeat: `cilium/.heartbeat` holds the current time (RFC3339), written
//! every `kvstore-heartbeat-interval` (upstream: 1 minute) with a 25 s
//! timeout per write, attached to the operator's session lease so it
//! disappears if the operator dies. Agents count a quorum error when it has
//! not changed for 2 minutes. When etcd is unreachable the writer keeps
//! retrying at the same interval (the client reconnects by itself), logs
//! each failure, and exports how stale the key is.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::config::KvstoreConfig;
use crate::run::Context;

/// Key of the heartbeat.
pub const HEARTBEAT_KEY: &str = "cilium/.heartbeat";
/// Timeout of one heartbeat write (upstream's).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(25);
/// TTL of the operator's session lease (upstream's agent session TTL).
pub const SESSION_TTL: i64 = 15 * 60;

/// Metrics of the `kvstore` sub-registry.
#[derive(Clone, Default)]
pub struct KvstoreMetrics {
    /// Unix time of the last successful heartbeat write.
    pub heartbeat_last_success_seconds: Gauge<f64, AtomicU64>,
    /// Failed heartbeat writes.
    pub heartbeat_errors: Counter,
    /// Successful heartbeat writes.
    pub heartbeat_writes: Counter,
}

impl KvstoreMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("kvstore");
        r.register(
            "heartbeat_last_success_seconds",
            "Unix time of the last successful cilium/.heartbeat write",
            self.heartbeat_last_success_seconds.clone(),
        );
        r.register("heartbeat_errors", "Failed cilium/.heartbeat writes", self.heartbeat_errors.clone());
        r.register("heartbeat_writes", "Successful cilium/.heartbeat writes", self.heartbeat_writes.clone());
    }
}

/// Connects lazily: the first request (and every one after an outage)
/// (re)establishes the connection.
pub async fn connect(cfg: &KvstoreConfig) -> Result<Client, etcd_client::Error> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(WRITE_TIMEOUT)
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
    Client::connect(&cfg.endpoints, Some(opts)).await
}

/// Keys per page of [`get_prefix`]: a page stays far below the 4 MiB gRPC
/// message limit whatever the keys hold.
pub const PAGE: i64 = 2000;

/// One key of a paged read.
pub struct Entry {
    pub key: String,
    pub value: String,
    pub mod_revision: i64,
}

/// Every key under `prefix`, read in pages of [`PAGE`] at one revision (a
/// consistent snapshot, like one big read, without its size limit).
pub async fn get_prefix(client: &mut Client, prefix: &str, keys_only: bool) -> Result<Vec<Entry>, etcd_client::Error> {
    let mut end = prefix.as_bytes().to_vec();
    // The range end of a prefix: its last byte plus one.
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            break;
        }
    }
    let mut out = Vec::new();
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if keys_only {
            opts = opts.with_keys_only();
        }
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let resp = client.get(from.clone(), Some(opts)).await?;
        if revision == 0 {
            revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        for kv in resp.kvs() {
            out.push(Entry {
                key: kv.key_str().unwrap_or_default().to_string(),
                value: kv.value_str().unwrap_or_default().to_string(),
                mod_revision: kv.mod_revision(),
            });
        }
        if !resp.more() || resp.kvs().is_empty() {
            return Ok(out);
        }
        let mut next = resp.kvs().last().map(|kv| kv.key().to_vec()).unwrap_or_default();
        next.push(0);
        from = next;
    }
}

/// The heartbeat value: the current time as RFC3339 (second precision with
/// offset, like Go's time.RFC3339).
pub fn heartbeat_value(now: jiff::Timestamp) -> String {
    now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Writes the heartbeat until `stop`.
pub async fn run_heartbeat(ctx: Context, stop: CancellationToken) -> anyhow::Result<()> {
    let Some(cfg) = ctx.config.kvstore.clone() else {
        return Ok(());
    };
    let interval = ctx.config.kvstore_heartbeat_interval;
    let metrics = ctx.metrics.kvstore.clone();
    let mut client: Option<Client> = None;
    let mut lease: Option<i64> = None;
    let mut failing_since: Option<std::time::Instant> = None;
    loop {
        let result = tokio::time::timeout(WRITE_TIMEOUT, write_once(&cfg, &mut client, &mut lease)).await;
        match result {
            Ok(Ok(())) => {
                metrics.heartbeat_writes.inc();
                metrics.heartbeat_last_success_seconds.set(jiff::Timestamp::now().as_millisecond() as f64 / 1000.0);
                if let Some(since) = failing_since.take() {
                    tracing::info!(after = ?since.elapsed(), "kvstore heartbeat written again");
                }
            }
            Ok(Err(e)) => heartbeat_failed(&metrics, &mut failing_since, &mut lease, e.to_string()),
            Err(_) => {
                heartbeat_failed(&metrics, &mut failing_since, &mut lease, format!("timed out after {WRITE_TIMEOUT:?}"))
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

fn heartbeat_failed(
    metrics: &KvstoreMetrics,
    failing_since: &mut Option<std::time::Instant>,
    lease: &mut Option<i64>,
    error: String,
) {
    metrics.heartbeat_errors.inc();
    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
    // A lease may have expired during the outage: take a fresh one.
    *lease = None;
    tracing::warn!(key = HEARTBEAT_KEY, %error, failing_for = ?since.elapsed(), "cannot write the kvstore heartbeat");
}

async fn write_once(
    cfg: &KvstoreConfig,
    client: &mut Option<Client>,
    lease: &mut Option<i64>,
) -> Result<(), etcd_client::Error> {
    if client.is_none() {
        *client = Some(connect(cfg).await?);
    }
    let c = client.as_mut().expect("set above");
    let id = match *lease {
        Some(id) => {
            // Refresh the session lease with one keep-alive round trip.
            let (mut keeper, mut stream) = c.lease_keep_alive(id).await?;
            keeper.keep_alive().await?;
            match stream.message().await? {
                Some(r) if r.ttl() > 0 => id,
                _ => grant(c, lease).await?,
            }
        }
        None => grant(c, lease).await?,
    };
    c.put(HEARTBEAT_KEY, heartbeat_value(jiff::Timestamp::now()), Some(PutOptions::new().with_lease(id))).await?;
    Ok(())
}

async fn grant(c: &mut Client, lease: &mut Option<i64>) -> Result<i64, etcd_client::Error> {
    let id = c.lease_grant(SESSION_TTL, None).await?.id();
    *lease = Some(id);
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_value_is_rfc3339() {
        let t: jiff::Timestamp = "2026-11-23T18:01:02.345Z".parse().unwrap();
        assert_eq!(heartbeat_value(t), "2026-11-23T18:01:02Z");
        assert!(heartbeat_value(jiff::Timestamp::now()).parse::<jiff::Timestamp>().is_ok());
    }
}
