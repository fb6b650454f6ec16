//! Ending cleanly on SIGINT and SIGTERM: the demo and the test harness
//! register what they start (child processes, network-namespace prefixes,
//! bpffs directories, temporary directories, clean-up hooks); on either signal every child
//! gets SIGTERM (SIGKILL after 5 s), then every namespace, pin directory and
//! temporary directory is removed, and the process exits with 128 + signal.
//! Without it, Ctrl-C (which the README tells demo users to press) would kill
//! the process before any destructor runs and leave all of that behind.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// Clean-up that needs more than killing our children (what the real
/// nodes' runtimes started: containers, shims, cgroups).
type Hook = std::sync::Arc<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct Registry {
    pids: BTreeSet<i32>,
    prefixes: BTreeSet<String>,
    dirs: BTreeSet<PathBuf>,
    hooks: std::collections::BTreeMap<u64, Hook>,
    next_hook: u64,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pids: BTreeSet::new(),
    prefixes: BTreeSet::new(),
    dirs: BTreeSet::new(),
    hooks: std::collections::BTreeMap::new(),
    next_hook: 0,
});
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

fn with<T>(f: impl FnOnce(&mut Registry) -> T) -> T {
    f(&mut REGISTRY.lock().unwrap_or_else(|e| e.into_inner()))
}

pub fn register_pid(pid: u32) {
    with(|r| r.pids.insert(pid as i32));
}

pub fn unregister_pid(pid: u32) {
    with(|r| r.pids.remove(&(pid as i32)));
}

/// Network namespaces `<prefix>-*` and `/sys/fs/bpf/<prefix>`.
pub fn register_prefix(prefix: &str) {
    with(|r| r.prefixes.insert(prefix.to_string()));
}

pub fn unregister_prefix(prefix: &str) {
    with(|r| r.prefixes.remove(prefix));
}

/// Runs `hook` on SIGINT/SIGTERM, after our children are stopped and
/// before namespaces and directories are removed; the id unregisters it.
pub fn register_hook(hook: Hook) -> u64 {
    with(|r| {
        r.next_hook += 1;
        r.hooks.insert(r.next_hook, hook);
        r.next_hook
    })
}

pub fn unregister_hook(id: u64) {
    with(|r| r.hooks.remove(&id));
}

pub fn register_dir(dir: PathBuf) {
    with(|r| r.dirs.insert(dir));
}

pub fn unregister_dir(dir: &std::path::Path) {
    with(|r| r.dirs.remove(dir));
}

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = PIPE_WRITE.load(Ordering::SeqCst);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; one byte to our own pipe.
        unsafe {
            libc::write(fd, (&b as *const u8).cast(), 1);
        }
    }
}

/// Installs the SIGINT/SIGTERM handlers (once per process).
pub fn install() {
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) into a local array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return;
    }
    if PIPE_WRITE.compare_exchange(-1, fds[1], Ordering::SeqCst, Ordering::SeqCst).is_err() {
        // SAFETY: closing the pipe we just made and do not use.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        return;
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a handler that only writes to a pipe; SA_RESTART keeps
        // interrupted system calls of other threads going.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    let read_fd = fds[0];
    std::thread::spawn(move || {
        let mut b = 0u8;
        // SAFETY: read(2) of one byte from our own pipe.
        let n = unsafe { libc::read(read_fd, (&mut b as *mut u8).cast(), 1) };
        if n == 1 {
            eprintln!("\nsignal {b} received: stopping everything and cleaning up");
            clean_up();
            std::process::exit(128 + i32::from(b));
        }
    });
}

/// Stops every registered child and removes every registered namespace,
/// pin directory and temporary directory.
pub fn clean_up() {
    let (pids, prefixes, dirs, hooks) =
        with(|r| (r.pids.clone(), r.prefixes.clone(), r.dirs.clone(), r.hooks.values().cloned().collect::<Vec<_>>()));
    // Only our own children (waitpid tells; an exited one is reaped here).
    let alive = |pid: i32| {
        let mut status = 0;
        // SAFETY: waitpid(2) with WNOHANG on a pid we spawned.
        unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) == 0 }
    };
    for &pid in &pids {
        if alive(pid) {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && pids.iter().any(|p| alive(*p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &pid in &pids {
        if alive(pid) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let mut status = 0;
            unsafe { libc::waitpid(pid, &mut status, 0) };
        }
    }
    for hook in hooks {
        hook();
    }
    for prefix in &prefixes {
        crate::netns::remove_prefix(prefix);
    }
    for d in &dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}
