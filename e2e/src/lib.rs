//! Test harness for end-to-end tests through the real binaries: a real
//! control plane ([`cluster`]), this workspace's processes ([`process`]) and
//! the external tools ([`tools`]).

pub mod cluster;
pub mod netns;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod realnode;
pub mod shutdown;
pub mod tools;

pub use cluster::{ControlPlane, Etcd, Options};
pub use process::{Agent, Operator, Process};

/// Runs a future to completion on a fresh multi-threaded runtime (test
/// bodies are synchronous; each gets its own runtime and clients).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// Polls `check` every 200 ms until it returns `Some`, or fails after
/// `timeout` with `what` and the last state seen.
pub async fn eventually<T, F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what} (last error: {last})");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Watches deletions of `api`'s objects until `n` are seen (spawned on the
/// current runtime); the time from the first deletion to the last. A
/// benchmark's external clock, the same for any operator: start it before
/// the deleting begins.
pub fn watch_deletions<K>(api: kube::Api<K>, n: usize) -> tokio::task::JoinHandle<anyhow::Result<f64>>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let times = watch_deletion_times(api, n);
    tokio::spawn(async move {
        let times = times.await??;
        Ok(match (times.first(), times.last()) {
            (Some(first), Some(last)) => last.duration_since(*first).as_secs_f64(),
            _ => 0.0,
        })
    })
}

/// As [`watch_deletions`], with the time each deletion was seen.
pub fn watch_deletion_times<K>(
    api: kube::Api<K>,
    n: usize,
) -> tokio::task::JoinHandle<anyhow::Result<Vec<std::time::Instant>>>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    use futures::TryStreamExt;
    use kube::runtime::watcher;
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()));
        let mut seen = Vec::with_capacity(n);
        while let Some(ev) = stream.try_next().await? {
            if let watcher::Event::Delete(_) = ev {
                seen.push(std::time::Instant::now());
                if seen.len() == n {
                    return Ok(seen);
                }
            }
        }
        anyhow::bail!("the watch ended after {} deletions", seen.len())
    })
}

/// The most of `times` (in order) within any window of `window`.
pub fn most_in_any_window(times: &[std::time::Instant], window: std::time::Duration) -> usize {
    let mut best = 0;
    let mut first = 0;
    for (last, t) in times.iter().enumerate() {
        while t.duration_since(times[first]) >= window {
            first += 1;
        }
        best = best.max(last + 1 - first);
    }
    best
}

/// Whether IPv4 `ip` is in `cidr` (a pod CIDR as a CiliumNode lists it); a
/// CIDR that does not parse holds nothing.
pub fn in_cidr(ip: std::net::Ipv4Addr, cidr: &str) -> bool {
    let ip = u128::from(u32::from(ip));
    cidr.parse::<cilium_ipam::Cidr>().is_ok_and(|c| !cidr.contains(':') && (c.first()..=c.last()).contains(&ip))
}

#[cfg(test)]
mod tests {
    #[test]
    fn most_in_any_window_slides() {
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        let times = [at(0), at(10), at(990), at(1000), at(1500), at(1600), at(1700)];
        let w = std::time::Duration::from_secs(1);
        assert_eq!(super::most_in_any_window(&times, w), 5, "990..1700");
        assert_eq!(super::most_in_any_window(&[], w), 0);
    }

    #[test]
    fn in_cidr_checks_the_prefix() {
        let ip = "10.0.1.5".parse().unwrap();
        assert!(super::in_cidr(ip, "10.0.1.0/24"));
        assert!(super::in_cidr(ip, "10.0.0.0/16"));
        assert!(!super::in_cidr(ip, "10.0.2.0/24"));
        assert!(!super::in_cidr(ip, "fd00::/64"));
        assert!(!super::in_cidr(ip, "not a cidr"));
    }
}
