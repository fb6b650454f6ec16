//! The eBPF datapath of `bpf/policy.c`: map layouts (mirrored here as
//! `#[repr(C)]` types, one place for loader and tests), loading with every
//! map pinned by name under one bpffs directory, attaching both programs
//! to a pod's node-side veth inside the node's network namespace (TCX links,
//! pinned: an agent restart keeps them attached and re-attaches the new
//! program in place), and map updates.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader, Pod};

/// The compiled `bpf/policy.c`.
pub static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/policy.o"));

pub const IDENTITY_WORLD: u32 = 2;
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// Verdict reasons counted in `cilium_metrics`.
pub const REASON_ALLOWED_BY_POLICY: u8 = 0;
pub const REASON_NO_POLICY: u8 = 1;
pub const REASON_REPLY: u8 = 2;
pub const REASON_DENIED_BY_RULE: u8 = 10;
pub const REASON_NOT_ALLOWED: u8 = 11;

pub fn reason_name(r: u8) -> &'static str {
    match r {
        REASON_ALLOWED_BY_POLICY => "allowed-by-policy",
        REASON_NO_POLICY => "no-policy",
        REASON_REPLY => "reply",
        REASON_DENIED_BY_RULE => "denied-by-rule",
        REASON_NOT_ALLOWED => "not-allowed",
        _ => "unknown",
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheValue {
    pub identity: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub ifindex: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointValue {
    pub endpoint_id: u32,
    pub identity: u32,
    pub ingress_enforce: u8,
    pub egress_enforce: u8,
    pub pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub endpoint_id: u32,
    /// 0: any peer.
    pub identity: u32,
    /// Host byte order; 0: any port.
    pub dport: u16,
    /// IPPROTO_*; 0: any.
    pub proto: u8,
    pub direction: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    pub deny: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MetricsKey {
    pub endpoint_id: u32,
    pub direction: u8,
    pub reason: u8,
    pub pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MetricsValue {
    pub packets: u64,
    pub bytes: u64,
}

// SAFETY: plain-old-data with explicit padding, matching bpf/policy.c.
unsafe impl Pod for IpcacheValue {}
unsafe impl Pod for EndpointKey {}
unsafe impl Pod for EndpointValue {}
unsafe impl Pod for PolicyKey {}
unsafe impl Pod for PolicyValue {}
unsafe impl Pod for MetricsKey {}
unsafe impl Pod for MetricsValue {}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{path} is not on a bpffs mount (mount -t bpf bpf /sys/fs/bpf)")]
    NoBpffs { path: String },
    #[error("loading bpf/policy.c: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("attaching to {ifname} in {netns}: {reason}")]
    Attach { ifname: String, netns: String, reason: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Mounts bpffs on /sys/fs/bpf when nothing is mounted there yet.
pub fn ensure_bpffs() -> Result<(), DatapathError> {
    if is_bpffs(Path::new("/sys/fs/bpf")) {
        return Ok(());
    }
    let (src, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
    // SAFETY: mount(2) with valid NUL-terminated strings and no data.
    let r = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: statfs(2) into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    r == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// What the maps hold, read once at load (pins may come from a
    /// previous agent) and kept in step with every write, so a sync diffs
    /// in memory instead of walking the kernel maps.
    ipcache_now: BTreeMap<(Ipv4Addr, u8), u32>,
    policy_now: BTreeMap<u32, BTreeMap<PolicyKey, PolicyValue>>,
}

impl Datapath {
    /// Loads the programs; maps are created, or reused when already pinned
    /// in `pin_dir` (a restart: enforcement state is kept).
    pub fn load(pin_dir: &Path) -> Result<Datapath, DatapathError> {
        std::fs::create_dir_all(pin_dir)?;
        if !is_bpffs(pin_dir) {
            return Err(DatapathError::NoBpffs { path: pin_dir.display().to_string() });
        }
        let mut ebpf = EbpfLoader::new().default_map_pin_directory(pin_dir).load(OBJECT)?;
        for name in ["from_container", "to_container"] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .expect("program in object")
                .try_into()
                .map_err(|source| DatapathError::Program { name: "classifier", source })?;
            prog.load().map_err(|source| DatapathError::Program { name: "classifier", source })?;
        }
        let mut dp = Datapath {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            ipcache_now: BTreeMap::new(),
            policy_now: BTreeMap::new(),
        };
        dp.ipcache_now = dp.ipcache_entries()?;
        let entries: Vec<(PolicyKey, PolicyValue)> = dp.policy()?.iter().filter_map(Result::ok).collect();
        for (k, v) in entries {
            dp.policy_now.entry(k.endpoint_id).or_default().insert(k, v);
        }
        Ok(dp)
    }

    pub fn program(&self, name: &str) -> &SchedClassifier {
        self.ebpf.program(name).expect("program in object").try_into().expect("a classifier")
    }

    fn map(&mut self, name: &'static str) -> &mut aya::maps::Map {
        self.ebpf.map_mut(name).expect("map in object")
    }

    /// Attaches both programs to `ifname` in the network namespace at
    /// `netns`, pinning the links under `<pin_dir>/links/`. An existing pin
    /// (attached by a previous agent) gets the newly loaded program in place.
    pub fn attach(&mut self, netns: &Path, ifname: &str) -> Result<(), DatapathError> {
        let links = self.pin_dir.join("links");
        std::fs::create_dir_all(&links)?;
        let err = |reason: String| DatapathError::Attach {
            ifname: ifname.to_string(),
            netns: netns.display().to_string(),
            reason,
        };
        let ns = std::fs::File::open(netns).map_err(|e| err(e.to_string()))?;
        let ebpf = &mut self.ebpf;
        std::thread::scope(|s| {
            s.spawn(|| -> Result<(), DatapathError> {
                use std::os::fd::AsRawFd;
                // SAFETY: setns(2) on this fresh thread only.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(err(format!("setns: {}", std::io::Error::last_os_error())));
                }
                for (name, kind, suffix) in [
                    ("from_container", TcAttachType::Ingress, "ingress"),
                    ("to_container", TcAttachType::Egress, "egress"),
                ] {
                    let pin = links.join(format!("{ifname}_{suffix}"));
                    let prog: &mut SchedClassifier =
                        ebpf.program_mut(name).expect("program").try_into().expect("classifier");
                    let id = match PinnedLink::from_pin(&pin) {
                        Ok(old) => {
                            let link = FdLink::from(old).try_into().map_err(|e| err(format!("{e}")))?;
                            prog.attach_to_link(link).map_err(|e| err(format!("replace: {e}")))?
                        }
                        Err(_) => prog.attach(ifname, kind).map_err(|e| err(format!("{e}")))?,
                    };
                    let link = prog.take_link(id).map_err(|e| err(format!("{e}")))?;
                    let fd: FdLink = link.try_into().map_err(|e| err(format!("{e}")))?;
                    // Replacing an existing pin: remove it first.
                    let _ = std::fs::remove_file(&pin);
                    fd.pin(&pin).map_err(|e| err(format!("pin: {e}")))?;
                }
                Ok(())
            })
            .join()
            .unwrap_or_else(|_| Err(err("attach thread panicked".into())))
        })
    }

    /// Unpins the links of `ifname` (the veth is gone or going).
    pub fn detach(&mut self, ifname: &str) {
        for suffix in ["ingress", "egress"] {
            let _ = std::fs::remove_file(self.pin_dir.join("links").join(format!("{ifname}_{suffix}")));
        }
    }

    fn ipcache(&mut self) -> Result<LpmTrie<&mut MapData, u32, IpcacheValue>, DatapathError> {
        LpmTrie::try_from(self.map("cilium_ipcache"))
            .map_err(|source| DatapathError::Map { name: "cilium_ipcache", source })
    }

    /// The ipcache as it is: (address, prefix) -> identity.
    pub fn ipcache_entries(&mut self) -> Result<BTreeMap<(Ipv4Addr, u8), u32>, DatapathError> {
        let map = self.ipcache()?;
        let mut out = BTreeMap::new();
        for kv in map.iter() {
            let (k, v) = kv.map_err(|source| DatapathError::Map { name: "cilium_ipcache", source })?;
            out.insert((Ipv4Addr::from(k.data().to_ne_bytes()), k.prefix_len() as u8), v.identity);
        }
        Ok(out)
    }

    /// Makes the ipcache equal to `want` (inserting before deleting).
    pub fn sync_ipcache(&mut self, want: &BTreeMap<(Ipv4Addr, u8), u32>) -> Result<(), DatapathError> {
        if &self.ipcache_now == want {
            return Ok(());
        }
        let have = std::mem::take(&mut self.ipcache_now);
        let mut map = self.ipcache()?;
        let e = |source| DatapathError::Map { name: "cilium_ipcache", source };
        for ((ip, len), id) in want {
            if have.get(&(*ip, *len)) != Some(id) {
                let key = LpmKey::new(u32::from(*len), u32::from_ne_bytes(ip.octets()));
                map.insert(&key, IpcacheValue { identity: *id }, 0).map_err(e)?;
            }
        }
        for (ip, len) in have.keys().filter(|k| !want.contains_key(k)) {
            let key = LpmKey::new(u32::from(*len), u32::from_ne_bytes(ip.octets()));
            let _ = map.remove(&key);
        }
        self.ipcache_now = want.clone();
        Ok(())
    }

    fn endpoints(&mut self) -> Result<BpfHashMap<&mut MapData, EndpointKey, EndpointValue>, DatapathError> {
        BpfHashMap::try_from(self.map("cilium_endpoints"))
            .map_err(|source| DatapathError::Map { name: "cilium_endpoints", source })
    }

    pub fn set_endpoint(&mut self, ifindex: u32, value: EndpointValue) -> Result<(), DatapathError> {
        self.endpoints()?
            .insert(EndpointKey { ifindex }, value, 0)
            .map_err(|source| DatapathError::Map { name: "cilium_endpoints", source })
    }

    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        let _ = self.endpoints()?.remove(&EndpointKey { ifindex });
        Ok(())
    }

    fn policy(&mut self) -> Result<BpfHashMap<&mut MapData, PolicyKey, PolicyValue>, DatapathError> {
        BpfHashMap::try_from(self.map("cilium_policy"))
            .map_err(|source| DatapathError::Map { name: "cilium_policy", source })
    }

    /// Makes the policy entries of `endpoint_id` equal to `want`: new and
    /// changed entries first, then stale ones are removed.
    pub fn sync_policy(
        &mut self,
        endpoint_id: u32,
        want: &BTreeMap<PolicyKey, PolicyValue>,
    ) -> Result<(), DatapathError> {
        let have = self.policy_now.remove(&endpoint_id).unwrap_or_default();
        if &have == want {
            if !want.is_empty() {
                self.policy_now.insert(endpoint_id, have);
            }
            return Ok(());
        }
        let mut map = self.policy()?;
        let e = |source| DatapathError::Map { name: "cilium_policy", source };
        for (k, v) in want {
            if have.get(k) != Some(v) {
                map.insert(*k, *v, 0).map_err(e)?;
            }
        }
        let stale: HashSet<&PolicyKey> = have.keys().filter(|k| !want.contains_key(*k)).collect();
        for k in stale {
            let _ = map.remove(k);
        }
        if !want.is_empty() {
            self.policy_now.insert(endpoint_id, want.clone());
        }
        Ok(())
    }

    /// The counters read straight from the pinned map under `pin_dir` (for
    /// the metrics endpoint, without the loader).
    pub fn pinned_metrics(pin_dir: &Path) -> Result<Vec<(MetricsKey, MetricsValue)>, DatapathError> {
        let e = |source| DatapathError::Map { name: "cilium_metrics", source };
        let data = MapData::from_pin(pin_dir.join("cilium_metrics")).map_err(e)?;
        let map: BpfHashMap<MapData, MetricsKey, MetricsValue> =
            BpfHashMap::try_from(aya::maps::Map::HashMap(data)).map_err(e)?;
        Ok(map.iter().filter_map(Result::ok).collect())
    }

    /// Every counter: (endpoint, direction, reason) -> packets, bytes.
    pub fn metrics(&mut self) -> Result<Vec<(MetricsKey, MetricsValue)>, DatapathError> {
        let map: BpfHashMap<&mut MapData, MetricsKey, MetricsValue> = BpfHashMap::try_from(self.map("cilium_metrics"))
            .map_err(|source| DatapathError::Map { name: "cilium_metrics", source })?;
        Ok(map.iter().filter_map(Result::ok).collect())
    }
}
