//! Our own processes end cleanly: `demo --keep` (a cluster of real nodes
//! with our chart installed) stopped with SIGINT (what Ctrl-C sends, as the
//! README says to do) and with SIGTERM leaves no process (the nodes', the
//! pods' and ours), network namespace, bpffs directory, cgroup, link or
//! temporary directory behind.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use e2e::{ControlPlane, tools};

fn leftovers(prefix: &str, dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/var/run/netns") {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&format!("{prefix}-")) {
                out.push(format!("netns {n}"));
            }
        }
    }
    if std::path::Path::new(&format!("/sys/fs/bpf/{prefix}")).exists() {
        out.push(format!("/sys/fs/bpf/{prefix}"));
    }
    // The real nodes': the chart's agents' pins, the nodes' cgroup roots
    // (every hierarchy), the host's leg on their fabric.
    let starting = |dir: &str, start: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().display().to_string())
            .filter(|p| p.rsplit('/').next().is_some_and(|n| n.starts_with(start)))
            .collect()
    };
    out.extend(starting("/sys/fs/bpf/cilium-rs", &format!("{prefix}-")));
    let cgroup = format!("cilium-rs-{prefix}-");
    for h in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
        out.extend(starting(&h.path().display().to_string(), &cgroup));
    }
    let leg = format!("{}h", &prefix[..prefix.len().min(13)]);
    if std::path::Path::new("/sys/class/net").join(&leg).exists() {
        out.push(format!("link {leg}"));
    }
    if dir.exists() {
        out.push(format!("{}", dir.display()));
    }
    // A process still using the control plane's directory or the prefix.
    let needle_dir = dir.display().to_string();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(cmd) = std::fs::read(p.path().join("cmdline")) else { continue };
            // A zombie has ended (init reaps it when it gets to it).
            let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
            if stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')) {
                continue;
            }
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            // The pods' processes are in the nodes' cgroups.
            let cgroups = std::fs::read_to_string(p.path().join("cgroup")).unwrap_or_default();
            if cmd.contains(&needle_dir)
                || cmd.contains(&format!("--netns-prefix {prefix}"))
                || cmd.contains(&format!("--netns-prefix={prefix}"))
                || cgroups.contains(&cgroup)
            {
                out.push(format!("process {}: {cmd}", p.file_name().to_string_lossy()));
            }
        }
    }
    out
}

fn run_and_stop(sig: i32) -> anyhow::Result<(Duration, usize)> {
    let demo = tools::workspace_bin("demo")?;
    let mut child = Command::new(demo).arg("--keep").stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let pid = child.id();
    let prefix = format!("demo{}", pid % 10000);
    let mut kubeconfig = None;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let deadline = Instant::now() + Duration::from_secs(180);
    for line in lines.by_ref() {
        let line = line?;
        if let Some(p) = line.strip_prefix("export KUBECONFIG=") {
            kubeconfig = Some(PathBuf::from(p.trim()));
        }
        if line.contains("Ctrl-C to stop everything") {
            break;
        }
        ensure!(Instant::now() < deadline, "demo not ready after 180s");
    }
    let kubeconfig = kubeconfig.context("the demo printed no KUBECONFIG")?;
    let dir = kubeconfig.parent().context("kubeconfig dir")?.to_path_buf();
    ensure!(dir.exists(), "{} does not exist while the demo runs", dir.display());
    let before = leftovers(&prefix, &dir).len();
    ensure!(before > 0, "nothing found while the demo runs: the leftover check would prove nothing");
    let t0 = Instant::now();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, sig) };
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        ensure!(t0.elapsed() < Duration::from_secs(60), "demo still running 60s after signal {sig}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = t0.elapsed();
    ensure!(status.code() == Some(128 + sig), "demo exit status {status} after signal {sig}");
    // Killed grandchildren (the pods' processes) end a moment later.
    let mut left = leftovers(&prefix, &dir);
    let ended = Instant::now();
    while !left.is_empty() && ended.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(200));
        left = leftovers(&prefix, &dir);
    }
    ensure!(left.is_empty(), "after signal {sig} these were left behind:\n{}", left.join("\n"));
    drop(lines);
    Ok((took, before))
}

pub fn demo_ends_cleanly_on_sigint_and_sigterm(_shared: &ControlPlane) -> anyhow::Result<()> {
    for (sig, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        let (took, found) = run_and_stop(sig)?;
        eprintln!(
            "demo --keep: {name} stopped it in {:.1}s; {found} things were running, 0 left behind",
            took.as_secs_f64()
        );
    }
    Ok(())
}
