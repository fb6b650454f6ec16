//! ciliumctl at scale: how long each command takes against a cluster of N
//! (default 20,000) CiliumIdentities, half of them used by CiliumEndpoints.
//!
//! Baseline, measured in the same run: `kubectl get ciliumidentities -o
//! json`, which transfers the same identities without doing anything with
//! them. Each command runs 3 times; the median counts.
//!
//! Usage: `cargo build --release --workspace --bins &&
//! target/release/bench-cli [N]`

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use cilium_crds::{CiliumEndpoint, CiliumIdentity};
use cilium_identity::Labels;
use cilium_identity_alloc::crd::identity_object;
use e2e::{ControlPlane, Operator, Options, tools};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use serde_json::json;

const RUNS: usize = 3;

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let cp = ControlPlane::start(Options::default())?;
    // The operator registers the CRDs and holds the Lease; identity GC off
    // so that the population stays put.
    let mut op = Operator::start(&cp, "bench-cli-operator", "kube-system", &["--identity-gc-interval=0".into()])?;
    op.wait_healthy(Duration::from_secs(60))?;
    let t0 = Instant::now();
    e2e::block_on(populate(&cp, n))?;
    eprintln!("created {n} identities and {} endpoints in {:.1}s", n / 2, t0.elapsed().as_secs_f64());

    let kubectl = tools::tool("kubectl")?;
    let base = median(|| {
        let out = Command::new(&kubectl)
            .args(["get", "ciliumidentities", "-o", "json"])
            .env("KUBECONFIG", &cp.kubeconfig)
            .stdin(Stdio::null())
            .output()?;
        ensure!(out.status.success(), "kubectl failed: {}", String::from_utf8_lossy(&out.stderr));
        ensure!(out.stdout.len() > n * 100, "kubectl output too small");
        Ok(())
    })?;
    eprintln!("baseline kubectl get ciliumidentities -o json: {base:.2}s");
    let ctl = tools::workspace_bin("ciliumctl")?;
    let commands: &[&[&str]] = &[
        &["status"],
        &["doctor"],
        &["identity", "list"],
        &["identity", "list", "-o", "json"],
        &["identity", "get", "10256"],
        &["identity", "gc", "--dry-run"],
        &["endpoint", "list"],
    ];
    let mut lines = Vec::new();
    for args in commands {
        let secs = median(|| {
            let out = Command::new(&ctl)
                .args(*args)
                .env("KUBECONFIG", &cp.kubeconfig)
                .stdin(Stdio::null())
                .output()
                .context("running ciliumctl")?;
            // doctor exits 2 here: half of the identities have no endpoint.
            let code = out.status.code().unwrap_or(-1);
            ensure!(
                code == 0 || (args[0] == "doctor" && code == 2),
                "ciliumctl {args:?} exited {code}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        })?;
        eprintln!("ciliumctl {}: {secs:.2}s", args.join(" "));
        lines.push(format!(
            "- cli: `ciliumctl {}` against {n} identities = {secs:.2} s (baseline {base:.2} s kubectl get ciliumidentities -o json, ratio {:.2})",
            args.join(" "),
            secs / base
        ));
    }
    let rss = peak_rss_of(&ctl, &cp, &["doctor"])?;
    lines.push(format!("- cli: peak RSS of `ciliumctl doctor` against {n} identities = {rss:.1} MiB"));
    op.stop()?;
    println!("\nFor docs/benchmarks.md:");
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

/// Median wall time of `RUNS` runs.
fn median(mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[RUNS / 2])
}

/// Peak RSS from /usr/bin/time-free accounting: getrusage of children.
fn peak_rss_of(ctl: &std::path::Path, cp: &ControlPlane, args: &[&str]) -> anyhow::Result<f64> {
    let mut child = Command::new(ctl)
        .args(args)
        .env("KUBECONFIG", &cp.kubeconfig)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let mut peak_kib = 0u64;
    loop {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(v) = status.lines().find(|l| l.starts_with("VmHWM:"))
        {
            peak_kib = peak_kib.max(v.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or(0));
        }
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(peak_kib as f64 / 1024.0)
}

async fn populate(cp: &ControlPlane, n: usize) -> anyhow::Result<()> {
    let client = cp.client().await?;
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": "bench" } }))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    let ids: Api<CiliumIdentity> = Api::all(client.clone());
    let ceps: Api<CiliumEndpoint> = Api::namespaced(client.clone(), "bench");
    let results: Vec<Result<(), kube::Error>> = futures::stream::iter(0..n)
        .map(|i| {
            let (ids, ceps) = (ids.clone(), ceps.clone());
            async move {
                let id = 10_000 + i as u32;
                // A few label keys, one with many values (as a build ID would).
                let labels = Labels::from_k8s(
                    "bench",
                    [("app", format!("app-{}", i % 50).as_str()), ("build-id", format!("b{i}").as_str())],
                );
                ids.create(&PostParams::default(), &identity_object(id, &labels)).await?;
                if i % 2 == 0 {
                    let cep: CiliumEndpoint = serde_json::from_value(json!({
                        "metadata": { "name": format!("ep-{i}"), "namespace": "bench" },
                        "status": { "identity": { "id": id }, "state": "ready",
                                    "networking": { "addressing": [{ "ipv4": format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256) }] } }
                    }))
                    .expect("cep");
                    ceps.create(&PostParams::default(), &cep).await?;
                }
                Ok(())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}
