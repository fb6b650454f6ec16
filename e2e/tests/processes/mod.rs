//! Our own processes end cleanly: `demo --keep` stopped with SIGINT (what
//! Ctrl-C sends, as the README says to do) and with SIGTERM leaves no
//! process, network namespace, bpffs directory or temporary directory
//! behind.

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
    if dir.exists() {
        out.push(format!("{}", dir.display()));
    }
    // A process still using the control plane's directory or the prefix.
    let needle_dir = dir.display().to_string();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(cmd) = std::fs::read(p.path().join("cmdline")) else { continue };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&needle_dir)
                || cmd.contains(&format!("--netns-prefix {prefix}"))
                || cmd.contains(&format!("--netns-prefix={prefix}"))
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
    // Give killed grandchildren a moment to be reaped by init.
    std::thread::sleep(Duration::from_millis(500));
    let left = leftovers(&prefix, &dir);
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
