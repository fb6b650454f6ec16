//! Leader election on a coordination.k8s.io/v1 Lease, with client-go's
//! semantics (lease duration, renew deadline, retry period).
//!
//! Validity is judged by when *we* last saw the lease record change, never by
//! the timestamps in it, so clock skew between replicas does not matter.
//! Writes are optimistic (replace with the observed resourceVersion): two
//! candidates can never both believe they acquired the lease.
//!
//! Timing: a record change seen at poll N is dated at poll N-1 (the earliest
//! it can have happened), so a standby takes over at most lease duration +
//! retry period after the holder's last renewal. The holder stops leading at
//! last renewal + renew deadline (10 s), well before a standby can take over
//! (15 s - 2 s at the earliest).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::LeaderElectionConfig;

/// The field manager of our Lease writes.
pub const FIELD_MANAGER: &str = "cilium-operator-leader-election";
/// Upstream's lease name.
pub const LEASE_NAME: &str = "cilium-operator-resource-lock";

/// The part of a Lease the decision looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub holder: Option<String>,
    pub lease_duration: Duration,
    pub transitions: i32,
}

impl Record {
    fn from_lease(lease: &Lease) -> Record {
        let spec = lease.spec.clone().unwrap_or_default();
        Record {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            lease_duration: Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64),
            transitions: spec.lease_transitions.unwrap_or(0),
        }
    }
}

/// What to do next, given what we observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease exists: create it holding it ourselves.
    Create,
    /// Nobody holds it, or the holder let it expire: take it over.
    Acquire { transitions: i32 },
    /// We hold it: renew.
    Renew,
    /// Someone else holds a valid lease.
    Wait { holder: String },
}

/// Pure decision of one election round. `observed_at` is when we first saw
/// the current version of `record`.
pub fn decide(me: &str, record: Option<&Record>, observed_at: Instant, now: Instant) -> Decision {
    let Some(r) = record else { return Decision::Create };
    match &r.holder {
        Some(h) if h == me => Decision::Renew,
        Some(h) if now < observed_at + r.lease_duration => Decision::Wait { holder: h.clone() },
        _ => Decision::Acquire { transitions: r.transitions + 1 },
    }
}

/// `<hostname>-<random>`, upstream's holder identity format.
pub fn holder_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "cilium-operator".into());
    let suffix: String = (0..10).map(|_| rand::random_range(b'a'..=b'z') as char).collect();
    format!("{host}-{suffix}")
}

/// How an election ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Shutdown was requested; the lease (if held) was released.
    Released,
    /// We held the lease and could not renew it within the renew deadline.
    Lost,
}

pub struct Elector {
    api: Api<Lease>,
    me: String,
    cfg: LeaderElectionConfig,
    observed: Option<(Lease, Record, Instant)>,
    last_poll: Option<Instant>,
}

impl Elector {
    pub fn new(client: kube::Client, namespace: &str, me: String, cfg: LeaderElectionConfig) -> Elector {
        Elector { api: Api::namespaced(client, namespace), me, cfg, observed: None, last_poll: None }
    }

    pub fn identity(&self) -> &str {
        &self.me
    }

    /// Runs the election until shutdown or loss of the lease. `leading` is
    /// set while we hold the lease. On shutdown while leading, `drain`
    /// (stopping the duties and waiting for their writes in flight) runs
    /// first, with the lease still renewed, and only then is the lease
    /// released: no other replica can lead while a write of ours may still
    /// land.
    pub async fn run<F>(mut self, leading: watch::Sender<bool>, shutdown: CancellationToken, drain: F) -> Outcome
    where
        F: std::future::Future<Output = ()>,
    {
        // Campaign until we hold the lease.
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election: cannot read or write the lease"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    drain.await;
                    return Outcome::Released;
                }
                _ = tokio::time::sleep(self.cfg.retry_period) => {}
            }
        }
        tracing::info!(identity = %self.me, lease = LEASE_NAME, "became leader");
        let _ = leading.send(true);
        // Renew every retry period; give up after the renew deadline.
        let mut last_renew = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = leading.send(false);
                    if !self.drain_holding(drain, last_renew).await {
                        return Outcome::Lost;
                    }
                    self.release().await;
                    return Outcome::Released;
                }
                _ = tokio::time::sleep(self.cfg.retry_period) => {}
            }
            // Never act as leader past `last_renew + renew_deadline`.
            let remaining = self.cfg.renew_deadline.saturating_sub(last_renew.elapsed());
            let attempt = tokio::time::timeout(remaining, self.try_acquire_or_renew()).await;
            match attempt {
                Ok(Ok(true)) => last_renew = Instant::now(),
                Ok(Ok(false)) => {
                    tracing::error!(identity = %self.me, "leader election lost: another replica holds the lease");
                    let _ = leading.send(false);
                    return Outcome::Lost;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "leader election: failed to renew the lease"),
                Err(_) => tracing::warn!("leader election: lease renewal timed out"),
            }
            if last_renew.elapsed() >= self.cfg.renew_deadline {
                tracing::error!(identity = %self.me, deadline = ?self.cfg.renew_deadline, "leader election lost: could not renew the lease in time");
                let _ = leading.send(false);
                return Outcome::Lost;
            }
        }
    }

    fn spec(&self, transitions: i32, acquire: bool, old: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(jiff::Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.me.clone()),
            lease_duration_seconds: Some(self.cfg.lease_duration.as_secs() as i32),
            acquire_time: if acquire { Some(now.clone()) } else { old.and_then(|o| o.acquire_time.clone()) },
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One round: returns whether we hold the lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let polled_at = Instant::now();
        let current = self.api.get_opt(LEASE_NAME).await?;
        let now = Instant::now();
        let previous_poll = self.last_poll.replace(polled_at);
        let record = current.as_ref().map(Record::from_lease);
        // When did the current record appear? Unchanged: as observed before.
        // Changed: after our previous poll, so count from that poll (the
        // holder renewed no earlier than that). First sight: now.
        let observed_at = match (&self.observed, &current) {
            (Some((old, _, at)), Some(cur)) if old.metadata.resource_version == cur.metadata.resource_version => *at,
            _ => previous_poll.unwrap_or(now),
        };
        if let (Some(lease), Some(rec)) = (current.clone(), record.clone()) {
            self.observed = Some((lease, rec, observed_at));
        }
        let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        let (transitions, acquire) = match decide(&self.me, record.as_ref(), observed_at, now) {
            Decision::Wait { holder } => {
                tracing::debug!(%holder, "lease held by another replica");
                return Ok(false);
            }
            Decision::Create => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(LEASE_NAME.into()), ..Default::default() },
                    spec: Some(self.spec(0, true, None)),
                };
                return match self.api.create(&pp, &lease).await {
                    Ok(l) => {
                        self.remember(l);
                        Ok(true)
                    }
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                };
            }
            Decision::Acquire { transitions } => (transitions, true),
            Decision::Renew => (record.map(|r| r.transitions).unwrap_or(0), false),
        };
        let Some(mut lease) = current else { return Ok(false) };
        lease.spec = Some(self.spec(transitions, acquire, lease.spec.as_ref()));
        match self.api.replace(LEASE_NAME, &pp, &lease).await {
            Ok(l) => {
                if acquire {
                    tracing::info!(identity = %self.me, transitions, "acquired the lease");
                }
                self.remember(l);
                Ok(true)
            }
            // Someone else wrote first: we did not get it this round.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn remember(&mut self, lease: Lease) {
        let rec = Record::from_lease(&lease);
        self.observed = Some((lease, rec, Instant::now()));
    }

    /// Gives the lease up so another replica can take over at once: empty
    /// holder, 1 s duration (as client-go's ReleaseOnCancel).
    /// Awaits `drain` while renewing the lease; false when the lease was
    /// lost meanwhile (then it is not ours to release).
    async fn drain_holding<F>(&mut self, drain: F, mut last_renew: Instant) -> bool
    where
        F: std::future::Future<Output = ()>,
    {
        let t0 = Instant::now();
        let mut drain = std::pin::pin!(drain);
        loop {
            tokio::select! {
                _ = &mut drain => {
                    tracing::info!(seconds = format!("{:.2}", t0.elapsed().as_secs_f64()), "duties stopped and drained; releasing the lease");
                    return true;
                }
                _ = tokio::time::sleep(self.cfg.retry_period) => {}
            }
            let remaining = self.cfg.renew_deadline.saturating_sub(last_renew.elapsed());
            if let Ok(Ok(true)) = tokio::time::timeout(remaining, self.try_acquire_or_renew()).await {
                last_renew = Instant::now();
            }
            if last_renew.elapsed() >= self.cfg.renew_deadline {
                tracing::error!("leader election lost while the duties were draining");
                return false;
            }
        }
    }

    async fn release(&mut self) {
        let Some((mut lease, _, _)) = self.observed.take() else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.me.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        match tokio::time::timeout(Duration::from_secs(5), self.api.replace(LEASE_NAME, &pp, &lease)).await {
            Ok(Ok(_)) => tracing::info!(identity = %self.me, "released the lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "failed to release the lease"),
            Err(_) => tracing::warn!("releasing the lease timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(holder: Option<&str>, secs: u64) -> Record {
        Record { holder: holder.map(String::from), lease_duration: Duration::from_secs(secs), transitions: 3 }
    }

    #[test]
    fn decisions() {
        let t0 = Instant::now();
        assert_eq!(decide("me", None, t0, t0), Decision::Create);
        assert_eq!(decide("me", Some(&rec(Some("me"), 15)), t0, t0), Decision::Renew);
        assert_eq!(decide("me", Some(&rec(None, 15)), t0, t0), Decision::Acquire { transitions: 4 });
        assert_eq!(
            decide("me", Some(&rec(Some("other"), 15)), t0, t0 + Duration::from_secs(14)),
            Decision::Wait { holder: "other".into() }
        );
        assert_eq!(
            decide("me", Some(&rec(Some("other"), 15)), t0, t0 + Duration::from_secs(15)),
            Decision::Acquire { transitions: 4 }
        );
    }

    #[test]
    fn holder_identity_format() {
        let id = holder_identity();
        let (host, suffix) = id.rsplit_once('-').unwrap();
        assert!(!host.is_empty());
        assert_eq!(suffix.len(), 10);
        assert_ne!(holder_identity(), id);
    }
}
