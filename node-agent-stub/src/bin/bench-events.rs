//! What the event stream costs the datapath, and how many events the
//! agent's monitor delivers (`bench-events [PACKETS]`, root; default
//! 2,000,000 packets per measurement).
//!
//! `to_container` runs through BPF_PROG_TEST_RUN (`repeat`, 10,000 per
//! call) on one endpoint: a dropped packet (default deny) with drop events
//! off (baseline) and on, and an allowed packet with verdict events off
//! (baseline) and on. While events are on, the agent's own monitor
//! (`Monitor::run_reader`: ring buffer, naming both ends) feeds one client
//! that serializes each line as the API stream does. Reported: packets per
//! second (the kernel's own time per run), events per second the client
//! got, and events lost (ring buffer full or client queue overrun; every
//! event is either delivered or reported lost, which the run checks).
//! Median of 3 runs each, interleaved with the baseline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use aya::programs::{TestRun, TestRunOptions};

use cilium_policy::{MapKey, Prefix};
use node_agent_stub::datapath::{
    DIR_INGRESS, Datapath, ENDPOINT_READY, EVENTS_NO_DROPS, EVENTS_VERDICTS, EndpointValue, PolicyEntry,
};
use node_agent_stub::monitor::{Directory, Message, Monitor};

const EP: u32 = 7;
const BATCH: u32 = 10_000;

/// Ethernet + IPv4 + TCP SYN from `src` to 10.0.1.5:80.
fn frame(src: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0u8; 54];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&[10, 0, 1, 5]);
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = 0x02;
    f
}

/// Kernel time per packet over `packets` runs of `data`.
fn datapath(dp: &Datapath, data: &[u8], packets: u64) -> anyhow::Result<(f64, u64)> {
    let prog = dp.program("to_container");
    let batches = packets.div_ceil(u64::from(BATCH));
    let mut kernel_ns = 0f64;
    for _ in 0..batches {
        let opts = TestRunOptions { data_in: Some(data), repeat: BATCH, ..Default::default() };
        kernel_ns += prog.test_run(opts)?.duration.as_nanos() as f64 * f64::from(BATCH);
    }
    let sent = batches * u64::from(BATCH);
    Ok((kernel_ns / sent as f64, sent))
}

/// Runs `data` through `to_container` at about `rate` packets per second
/// for one second, in calls of 1,000; returns how many were sent.
fn paced(dp: &Datapath, data: &[u8], rate: f64) -> anyhow::Result<u64> {
    const CALL: u32 = 1000;
    let prog = dp.program("to_container");
    let step = std::time::Duration::from_secs_f64(f64::from(CALL) / rate);
    let t0 = Instant::now();
    let (mut sent, mut next) = (0u64, t0);
    while t0.elapsed() < std::time::Duration::from_secs(1) {
        prog.test_run(TestRunOptions { data_in: Some(data), repeat: CALL, ..Default::default() })?;
        sent += u64::from(CALL);
        next += step;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Ok(sent)
}

const RATES: [f64; 6] = [50e3, 100e3, 200e3, 400e3, 800e3, 1.6e6];

/// Baseline for the sustained rate: a bare reader thread that only takes
/// events off the ring buffer (no naming, no client). The highest paced
/// rate with 3 clean one-second runs.
fn bare_sustained(dp: &Datapath, pins: &std::path::Path, data: &[u8], flags: u32) -> anyhow::Result<f64> {
    let mut ring = Datapath::pinned_events(pins)?;
    let read = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (r, st) = (read.clone(), stop.clone());
    let reader = std::thread::spawn(move || {
        while !st.load(Ordering::SeqCst) {
            let mut any = false;
            while ring.next().is_some() {
                any = true;
                r.fetch_add(1, Ordering::SeqCst);
            }
            if !any {
                std::thread::yield_now();
            }
        }
    });
    Datapath::set_event_flags(pins, flags)?;
    let mut sustained = 0.0;
    'rates: for rate in RATES {
        for _ in 0..3 {
            let (r0, l0) = (read.load(Ordering::SeqCst), Datapath::pinned_events_lost(pins)?);
            let sent = paced(dp, data, rate)?;
            let deadline = Instant::now() + std::time::Duration::from_secs(10);
            let lost = loop {
                let (r, l) = (read.load(Ordering::SeqCst) - r0, Datapath::pinned_events_lost(pins)? - l0);
                if r + l >= sent || Instant::now() > deadline {
                    anyhow::ensure!(r + l == sent, "bare reader: {sent} sent, {r} read, {l} lost");
                    break l;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            };
            if lost > 0 {
                break 'rates;
            }
        }
        sustained = rate;
    }
    stop.store(true, Ordering::SeqCst);
    reader.join().map_err(|_| anyhow::anyhow!("reader thread panicked"))?;
    Datapath::set_event_flags(pins, 0)?;
    Ok(sustained)
}

/// Waits until every one of `sent` events since (`f0`, `l0`) was read or
/// reported lost: (read, lost). Anything unaccounted for is an error.
fn accounted(got: &Got, f0: u64, l0: u64, sent: u64) -> anyhow::Result<(u64, u64)> {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (f, l) = (got.flows.load(Ordering::SeqCst) - f0, got.lost.load(Ordering::SeqCst) - l0);
        if f + l >= sent || Instant::now() > deadline {
            anyhow::ensure!(f + l == sent, "{sent} sent, {f} read, {l} lost: some unaccounted for");
            return Ok((f, l));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// What one monitor client got: events, and events reported lost (ring
/// buffer full, or the client's queue overrun).
#[derive(Default)]
struct Got {
    flows: AtomicU64,
    lost: AtomicU64,
    last: std::sync::Mutex<Option<Instant>>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let packets: u64 = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(2_000_000);
    node_agent_stub::datapath::ensure_bpffs()?;
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/bench-events-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pins);
    let result = (|| -> anyhow::Result<()> {
        let mut dp = Datapath::load(&pins)?;
        // One endpoint, ingress enforced: 10.0.2.7 (identity 2001) may
        // reach port 80/TCP, everyone else is denied.
        dp.set_endpoint(
            1,
            EndpointValue {
                endpoint_id: EP,
                identity: 1000,
                ingress_enforce: 1,
                egress_enforce: 0,
                state: ENDPOINT_READY,
                pad: 0,
            },
        )?;
        let mut ipc = BTreeMap::new();
        ipc.insert(Prefix::parse("0.0.0.0/0", false).expect("prefix"), 2);
        ipc.insert(Prefix::parse("::/0", false).expect("prefix"), 2);
        ipc.insert(Prefix::parse("10.0.2.7/32", false).expect("prefix"), 2001);
        dp.sync_ipcache(&ipc)?;
        let mut entries = BTreeMap::new();
        entries.insert(
            PolicyEntry { direction: DIR_INGRESS, key: MapKey { peer: 2001, proto: 6, port: 80, plen: 16 } },
            false,
        );
        dp.sync_policy(EP, &entries)?;
        let (denied, allowed) = (frame([10, 0, 2, 8]), frame([10, 0, 2, 7]));
        // Baselines of the sustained rates, before the agent's reader
        // takes the ring buffer.
        let bare = [bare_sustained(&dp, &pins, &denied, 0)?, bare_sustained(&dp, &pins, &allowed, EVENTS_VERDICTS)?];
        // The agent's own monitor: its ring buffer reader, and one client
        // that serializes each message as the API stream does.
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let monitor = Monitor::new("node-a", pins.clone());
        {
            let mut dir = Directory::default();
            dir.endpoints.insert(EP, "default/deathstar".into());
            dir.pods_by_ip.insert("10.0.2.7".parse()?, "default/tiefighter".into());
            *monitor.directory.lock().expect("directory") = Arc::new(dir);
        }
        rt.spawn(monitor.clone().run_reader());
        // The reader turns verdict events off when it starts: let it.
        std::thread::sleep(std::time::Duration::from_millis(300));
        // (name, frame, flags baseline, flags measured)
        let cases = [
            ("dropped packets, drop events", &denied, EVENTS_NO_DROPS, 0, false),
            ("allowed packets, verdict events", &allowed, 0, EVENTS_VERDICTS, true),
        ];
        println!("bench-events: {packets} packets per measurement, {BATCH} per BPF_PROG_TEST_RUN call, median of 3");
        for ((name, data, off, on, verdicts), bare) in cases.into_iter().zip(bare) {
            let mut sub = monitor.subscribe(verdicts);
            let got = Arc::new(Got::default());
            let g = got.clone();
            rt.spawn(async move {
                while let Some(m) = sub.next().await {
                    let line = serde_json::to_string(&*m).expect("serializes");
                    std::hint::black_box(line);
                    match &*m {
                        Message::Flow(_) => g.flows.fetch_add(1, Ordering::SeqCst),
                        Message::LostEvents { num_events_lost, .. } => {
                            g.lost.fetch_add(*num_events_lost, Ordering::SeqCst)
                        }
                    };
                    *g.last.lock().expect("last") = Some(Instant::now());
                }
            });
            let (mut base, mut with, mut eps) = (Vec::new(), Vec::new(), Vec::new());
            let (mut lost_all, mut read_all) = (0u64, 0u64);
            for _ in 0..3 {
                Datapath::set_event_flags(&pins, off)?;
                base.push(datapath(&dp, data, packets)?.0);
                Datapath::set_event_flags(&pins, on)?;
                let (f0, l0) = (got.flows.load(Ordering::SeqCst), got.lost.load(Ordering::SeqCst));
                let t0 = Instant::now();
                let (ns, sent) = datapath(&dp, data, packets)?;
                with.push(ns);
                // Every event is read, or reported lost.
                let (read, lost) = accounted(&got, f0, l0, sent)?;
                let last = got.last.lock().expect("last").unwrap_or_else(Instant::now);
                eps.push(read as f64 / last.duration_since(t0).as_secs_f64());
                lost_all += lost;
                read_all += read;
            }
            // The highest paced rate at which all of 3 one-second runs
            // lose nothing.
            let mut sustained = 0.0;
            for rate in RATES {
                let mut clean = true;
                for _ in 0..3 {
                    let (f0, l0) = (got.flows.load(Ordering::SeqCst), got.lost.load(Ordering::SeqCst));
                    let sent = paced(&dp, data, rate)?;
                    let (_, lost) = accounted(&got, f0, l0, sent)?;
                    clean &= lost == 0;
                }
                if !clean {
                    break;
                }
                sustained = rate;
            }
            Datapath::set_event_flags(&pins, 0)?;
            let (b, w) = (median(base), median(with));
            println!(
                "- datapath: {name} on = {:.2} Mpps (baseline {:.2} Mpps off, ratio {:.2}); {:.0} vs {:.0} ns per packet",
                1e3 / w,
                1e3 / b,
                b / w,
                w,
                b
            );
            println!(
                "- monitor: {name} at full datapath speed = {:.0} k events/s to one client; {read_all} read, {lost_all} reported lost ({:.2}%), 0 unaccounted, over 3 runs",
                median(eps) / 1e3,
                100.0 * lost_all as f64 / (read_all + lost_all).max(1) as f64
            );
            println!(
                "- monitor: {name} sustained without loss = {:.0} k events/s (baseline {:.0} k events/s bare ring reader, ratio {:.2}; highest of 50k..1.6M/s paced with 3 clean 1 s runs)",
                sustained / 1e3,
                bare / 1e3,
                bare / sustained.max(1.0)
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&pins);
    result
}
