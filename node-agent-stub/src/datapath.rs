//! The eBPF datapath of `bpf/policy.c`: map layouts (mirrored here as
//! `#[repr(C)]` types, one place for loader and tests), loading with every
//! map pinned by name under one bpffs directory, attaching both programs
//! to a pod's node-side veth inside the node's network namespace (TCX links,
//! pinned: an agent restart keeps them attached and re-attaches the new
//! program in place), and map updates.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use cilium_policy::Prefix;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader, Pod};

/// The compiled `bpf/policy.c`.
pub static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/policy.o"));

pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// Verdict reasons counted in `cilium_metrics`.
pub const REASON_ALLOWED_BY_POLICY: u8 = 0;
pub const REASON_NO_POLICY: u8 = 1;
pub const REASON_REPLY: u8 = 2;
pub const REASON_ARP: u8 = 3;
pub const REASON_NDP: u8 = 4;
pub const REASON_RELATED: u8 = 5;
pub const REASON_DENIED_BY_RULE: u8 = 10;
pub const REASON_NOT_ALLOWED: u8 = 11;
pub const REASON_MALFORMED: u8 = 12;
pub const REASON_UNSUPPORTED_L3: u8 = 13;
pub const REASON_ENDPOINT_NOT_READY: u8 = 14;

/// Reasons at or above this one drop the packet.
pub const FIRST_DROP_REASON: u8 = REASON_DENIED_BY_RULE;

pub fn reason_name(r: u8) -> &'static str {
    match r {
        REASON_ALLOWED_BY_POLICY => "allowed-by-policy",
        REASON_NO_POLICY => "no-policy",
        REASON_REPLY => "reply",
        REASON_ARP => "arp",
        REASON_NDP => "neighbor-discovery",
        REASON_RELATED => "related",
        REASON_DENIED_BY_RULE => "denied-by-rule",
        REASON_NOT_ALLOWED => "not-allowed",
        REASON_MALFORMED => "malformed",
        REASON_UNSUPPORTED_L3 => "unsupported-l3-protocol",
        REASON_ENDPOINT_NOT_READY => "endpoint-not-ready",
        _ => "unknown",
    }
}

/// `endpoint_value.state`: ready, or its policy could not be written (every
/// packet is dropped until it is).
pub const ENDPOINT_READY: u8 = 0;
pub const ENDPOINT_FAILED: u8 = 1;

/// Bump when a map's layout changes: pins of another layout are replaced
/// at load.
pub const MAP_LAYOUT: &str = "2";

/// An address in the ipcache's 128-bit space (IPv4 as IPv4-mapped IPv6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr16 {
    pub bytes: [u8; 16],
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
    /// `ENDPOINT_READY` or `ENDPOINT_FAILED`.
    pub state: u8,
    pub pad: u8,
}

/// The bytes of a policy map key after its prefix length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKeyData {
    pub endpoint_id: u32,
    /// 0: any peer.
    pub identity: u32,
    pub direction: u8,
    /// IPPROTO_*; 0 (with prefix 72): every protocol.
    pub proto: u8,
    /// Network byte order.
    pub dport_be: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    pub deny: u8,
    pub pad: [u8; 3],
}

/// One policy entry of an endpoint, as the engine computes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEntry {
    pub direction: u8,
    pub key: cilium_policy::MapKey,
}

impl PolicyEntry {
    fn lpm_key(&self, endpoint_id: u32) -> LpmKey<PolicyKeyData> {
        let k = &self.key;
        let prefix = if k.proto == 0 { 72 } else { 80 + u32::from(k.plen) };
        LpmKey::new(
            prefix,
            PolicyKeyData {
                endpoint_id,
                identity: k.peer,
                direction: self.direction,
                proto: k.proto,
                dport_be: k.port.to_be(),
            },
        )
    }

    fn from_lpm(key: &LpmKey<PolicyKeyData>) -> (u32, PolicyEntry) {
        let d = key.data();
        let plen = if key.prefix_len() <= 72 { 0 } else { (key.prefix_len() - 80) as u8 };
        let port = u16::from_be(d.dport_be);
        (
            d.endpoint_id,
            PolicyEntry {
                direction: d.direction,
                key: cilium_policy::MapKey { peer: d.identity, proto: d.proto, port, plen },
            },
        )
    }
}

/// A tracked connection: the endpoint and direction that allowed its first
/// packet, and that packet's tuple (ports: network byte order; ICMP echo:
/// the identifier in both).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub endpoint_id: u32,
    pub direction: u8,
    pub proto: u8,
    pub pad: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    pub expires_ns: u64,
    pub reply_seen: u32,
    pub pad: u32,
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

/// The maps as `/v1/maps` shows them.
#[derive(Debug, Default, serde::Serialize)]
pub struct MapsDump {
    pub ipcache: Vec<IpcacheDump>,
    pub endpoints: Vec<EndpointDump>,
    /// Endpoint id -> its entries.
    pub policy: BTreeMap<u32, Vec<PolicyDump>>,
}

#[derive(Debug, serde::Serialize)]
pub struct IpcacheDump {
    pub prefix: String,
    pub identity: u32,
}

#[derive(Debug, serde::Serialize)]
pub struct EndpointDump {
    pub ifindex: u32,
    pub endpoint_id: u32,
    pub identity: u32,
    pub ingress_enforce: bool,
    pub egress_enforce: bool,
    pub ready: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct PolicyDump {
    pub direction: &'static str,
    /// Peer identity, 0: any.
    pub peer: u32,
    /// 0: any protocol.
    pub proto: u8,
    pub port: u16,
    /// Bits of the port that must match (16: one port, 0: any).
    pub port_prefix_len: u8,
    pub deny: bool,
}

/// `event.match`: which policy entry decided.
pub const MATCH_NONE: u8 = 0;
pub const MATCH_PEER: u8 = 1;
pub const MATCH_ANY_PEER: u8 = 2;

/// `cilium_events_config.flags` (0: drops only).
pub const EVENTS_NO_DROPS: u32 = 1;
pub const EVENTS_VERDICTS: u32 = 2;

/// Size of the `cilium_events` ring buffer in bytes.
pub const EVENTS_RING_SIZE: u32 = 1 << 20;

/// One datapath event from `cilium_events` (a drop, or any verdict while
/// asked for).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub ts_ns: u64,
    pub endpoint_id: u32,
    pub identity: u32,
    pub peer_identity: u32,
    pub len: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub direction: u8,
    pub reason: u8,
    pub matched: u8,
}

impl Event {
    /// Decodes one ring buffer record (None when it has another size).
    pub fn from_bytes(b: &[u8]) -> Option<Event> {
        if b.len() != std::mem::size_of::<Event>() {
            return None;
        }
        // SAFETY: the size matches and every bit pattern is a valid Event.
        Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<Event>()) })
    }
}

/// A 16-byte datapath address as an IP address (IPv4-mapped ones as IPv4).
pub fn ip_of(a: &[u8; 16]) -> std::net::IpAddr {
    let v6 = std::net::Ipv6Addr::from(*a);
    match v6.to_ipv4_mapped() {
        Some(v4) => v4.into(),
        None => v6.into(),
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventsConfig {
    pub flags: u32,
}

// SAFETY: plain-old-data with explicit padding, matching bpf/policy.c.
unsafe impl Pod for EventsConfig {}
unsafe impl Pod for Addr16 {}
unsafe impl Pod for IpcacheValue {}
unsafe impl Pod for EndpointKey {}
unsafe impl Pod for EndpointValue {}
unsafe impl Pod for PolicyKeyData {}
unsafe impl Pod for PolicyValue {}
unsafe impl Pod for CtKey {}
unsafe impl Pod for CtValue {}
unsafe impl Pod for MetricsKey {}
unsafe impl Pod for MetricsValue {}

fn addr16(prefix: &Prefix) -> (Addr16, u32) {
    let (bits, len) = prefix.mapped();
    (Addr16 { bytes: bits.to_be_bytes() }, u32::from(len))
}

fn prefix_of(key: &LpmKey<Addr16>) -> Option<Prefix> {
    let bits = u128::from_be_bytes(key.data().bytes);
    let len = key.prefix_len() as u8;
    let v6 = std::net::Ipv6Addr::from(bits);
    match v6.to_ipv4_mapped() {
        Some(v4) if len >= 96 => Prefix::new(IpAddr::V4(v4), len - 96),
        _ => Prefix::new(IpAddr::V6(v6), len),
    }
}

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
    /// previous agent) and changed only after each successful write, so a
    /// sync diffs in memory and a failed write never hides an entry.
    ipcache_now: BTreeMap<Prefix, u32>,
    policy_now: BTreeMap<u32, BTreeMap<PolicyEntry, bool>>,
}

/// Every map with the layout this build expects: (name, type, key size,
/// value size, max entries).
fn map_layouts(policy_max: u32) -> [(&'static str, aya::maps::MapType, usize, usize, u32); 8] {
    use aya::maps::MapType as T;
    use std::mem::size_of;
    [
        ("cilium_ipcache", T::LpmTrie, 4 + size_of::<Addr16>(), size_of::<IpcacheValue>(), 65536),
        ("cilium_endpoints", T::Hash, size_of::<EndpointKey>(), size_of::<EndpointValue>(), 4096),
        ("cilium_policy", T::LpmTrie, 4 + size_of::<PolicyKeyData>(), size_of::<PolicyValue>(), policy_max),
        ("cilium_ct", T::LruHash, size_of::<CtKey>(), size_of::<CtValue>(), 65536),
        ("cilium_metrics", T::Hash, size_of::<MetricsKey>(), size_of::<MetricsValue>(), 65536),
        ("cilium_events", T::RingBuf, 0, 0, EVENTS_RING_SIZE),
        ("cilium_events_config", T::Array, 4, size_of::<EventsConfig>(), 1),
        ("cilium_events_lost", T::Array, 4, 8, 1),
    ]
}

/// Default capacity of `cilium_policy` (entries of every endpoint
/// together; `--bpf-policy-map-max`).
pub const POLICY_MAP_SIZE: u32 = 262144;

/// A map pinned by an agent of another version with another layout cannot
/// be reused (aya would take it as it is, and the programs would read it
/// with the wrong layout): such pins are removed, so the maps are made
/// anew and rewritten by the first sync. Links stay.
fn replace_incompatible_pins(pin_dir: &Path, policy_max: u32) {
    for (name, ty, key, value, max) in map_layouts(policy_max) {
        let pin = pin_dir.join(name);
        let Ok(info) = aya::maps::MapInfo::from_pin(&pin) else { continue };
        let same = info.map_type().ok() == Some(ty)
            && info.key_size() as usize == key
            && info.value_size() as usize == value
            && info.max_entries() == max;
        if !same {
            tracing::warn!(
                map = name,
                "pinned map has another layout or size (an older agent, or a new size): replacing it"
            );
            let _ = std::fs::remove_file(&pin);
        }
    }
}

impl Datapath {
    /// Loads the programs; maps are created, or reused when already pinned
    /// in `pin_dir` (a restart: enforcement state is kept).
    pub fn load(pin_dir: &Path) -> Result<Datapath, DatapathError> {
        Datapath::load_sized(pin_dir, POLICY_MAP_SIZE)
    }

    /// Like [`Datapath::load`] with a policy map of `policy_max` entries.
    pub fn load_sized(pin_dir: &Path, policy_max: u32) -> Result<Datapath, DatapathError> {
        std::fs::create_dir_all(pin_dir)?;
        if !is_bpffs(pin_dir) {
            return Err(DatapathError::NoBpffs { path: pin_dir.display().to_string() });
        }
        replace_incompatible_pins(pin_dir, policy_max);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries("cilium_policy", policy_max)
            .load(OBJECT)?;
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
        dp.policy_now = dp.policy_entries()?;
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

    fn ipcache(&mut self) -> Result<LpmTrie<&mut MapData, Addr16, IpcacheValue>, DatapathError> {
        LpmTrie::try_from(self.map("cilium_ipcache"))
            .map_err(|source| DatapathError::Map { name: "cilium_ipcache", source })
    }

    /// The ipcache as it is: prefix -> identity.
    pub fn ipcache_entries(&mut self) -> Result<BTreeMap<Prefix, u32>, DatapathError> {
        let map = self.ipcache()?;
        let mut out = BTreeMap::new();
        for kv in map.iter() {
            let (k, v) = kv.map_err(|source| DatapathError::Map { name: "cilium_ipcache", source })?;
            if let Some(p) = prefix_of(&k) {
                out.insert(p, v.identity);
            }
        }
        Ok(out)
    }

    /// Makes the ipcache equal to `want` (inserting before deleting). The
    /// in-memory copy follows each write that succeeded.
    pub fn sync_ipcache(&mut self, want: &BTreeMap<Prefix, u32>) -> Result<(), DatapathError> {
        if &self.ipcache_now == want {
            return Ok(());
        }
        let mut now = std::mem::take(&mut self.ipcache_now);
        let r = (|| {
            let mut map = self.ipcache()?;
            let e = |source| DatapathError::Map { name: "cilium_ipcache", source };
            for (p, id) in want {
                if now.get(p) != Some(id) {
                    let (addr, len) = addr16(p);
                    map.insert(&LpmKey::new(len, addr), IpcacheValue { identity: *id }, 0).map_err(e)?;
                    now.insert(*p, *id);
                }
            }
            let stale: Vec<Prefix> = now.keys().filter(|k| !want.contains_key(k)).copied().collect();
            for p in stale {
                let (addr, len) = addr16(&p);
                match map.remove(&LpmKey::new(len, addr)) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {
                        now.remove(&p);
                    }
                    Err(source) => return Err(e(source)),
                }
            }
            Ok(())
        })();
        self.ipcache_now = now;
        r
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

    fn policy(&mut self) -> Result<LpmTrie<&mut MapData, PolicyKeyData, PolicyValue>, DatapathError> {
        LpmTrie::try_from(self.map("cilium_policy"))
            .map_err(|source| DatapathError::Map { name: "cilium_policy", source })
    }

    /// Every endpoint's policy entries as the map holds them.
    pub fn policy_entries(&mut self) -> Result<BTreeMap<u32, BTreeMap<PolicyEntry, bool>>, DatapathError> {
        let map = self.policy()?;
        let mut out: BTreeMap<u32, BTreeMap<PolicyEntry, bool>> = BTreeMap::new();
        for kv in map.iter() {
            let (k, v) = kv.map_err(|source| DatapathError::Map { name: "cilium_policy", source })?;
            let (ep, entry) = PolicyEntry::from_lpm(&k);
            out.entry(ep).or_default().insert(entry, v.deny != 0);
        }
        Ok(out)
    }

    /// The entries of `endpoint_id` as last written.
    pub fn endpoint_policy(&self, endpoint_id: u32) -> Option<&BTreeMap<PolicyEntry, bool>> {
        self.policy_now.get(&endpoint_id)
    }

    /// Makes the policy entries of `endpoint_id` equal to `want` (entry ->
    /// deny): new and changed entries first, then stale ones are removed;
    /// when the map is full, stale entries go first and the rest is tried
    /// again. The in-memory copy follows each write that succeeded, so a
    /// failure loses nothing: the next sync retries what is missing and
    /// still removes what is stale. On error the caller must treat the
    /// endpoint as not ready (its datapath state is partial).
    pub fn sync_policy(&mut self, endpoint_id: u32, want: &BTreeMap<PolicyEntry, bool>) -> Result<(), DatapathError> {
        let mut now = self.policy_now.remove(&endpoint_id).unwrap_or_default();
        let r = if &now == want { Ok(()) } else { self.write_policy(endpoint_id, &mut now, want) };
        if !now.is_empty() {
            self.policy_now.insert(endpoint_id, now);
        }
        r
    }

    fn write_policy(
        &mut self,
        endpoint_id: u32,
        now: &mut BTreeMap<PolicyEntry, bool>,
        want: &BTreeMap<PolicyEntry, bool>,
    ) -> Result<(), DatapathError> {
        let mut map = self.policy()?;
        let e = |source| DatapathError::Map { name: "cilium_policy", source };
        let insert_all = |map: &mut LpmTrie<&mut MapData, PolicyKeyData, PolicyValue>,
                          now: &mut BTreeMap<PolicyEntry, bool>| {
            for (k, deny) in want {
                if now.get(k) != Some(deny) {
                    let v = PolicyValue { deny: u8::from(*deny), pad: [0; 3] };
                    map.insert(&k.lpm_key(endpoint_id), v, 0)?;
                    now.insert(*k, *deny);
                }
            }
            Ok::<(), aya::maps::MapError>(())
        };
        let first = insert_all(&mut map, now);
        let stale: Vec<PolicyEntry> = now.keys().filter(|k| !want.contains_key(k)).copied().collect();
        for k in stale {
            match map.remove(&k.lpm_key(endpoint_id)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {
                    now.remove(&k);
                }
                Err(source) => return Err(e(source)),
            }
        }
        if first.is_err() {
            // Room may have been made by the removals above.
            insert_all(&mut map, now).map_err(e)?;
        }
        Ok(())
    }

    /// Empties the connection tracking table (as `cilium-dbg bpf ct flush`):
    /// every connection is judged by policy again from its next packet.
    pub fn ct_flush(&mut self) -> Result<usize, DatapathError> {
        let e = |source| DatapathError::Map { name: "cilium_ct", source };
        let mut map: BpfHashMap<&mut MapData, CtKey, CtValue> =
            BpfHashMap::try_from(self.map("cilium_ct")).map_err(e)?;
        let keys: Vec<CtKey> = map.keys().filter_map(Result::ok).collect();
        let mut n = 0;
        for k in keys {
            if map.remove(&k).is_ok() {
                n += 1;
            }
        }
        Ok(n)
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

    /// How full each map is (entries / max entries), by map name
    /// (upstream's `cilium_bpf_map_pressure`): the ipcache and the policy
    /// map from the agent's copy (they change only through it), the
    /// others counted in the pinned maps.
    pub fn pinned_pressure(pin_dir: &Path, ipcache: usize, policy: usize) -> Vec<(&'static str, f64)> {
        fn count<K: Pod, V: Pod>(pin_dir: &Path, name: &str) -> Option<usize> {
            // (An LRU hash reads like a hash.)
            let data = MapData::from_pin(pin_dir.join(name)).ok()?;
            let map: BpfHashMap<MapData, K, V> = BpfHashMap::try_from(aya::maps::Map::HashMap(data)).ok()?;
            Some(map.keys().filter(Result::is_ok).count())
        }
        let mut out = Vec::new();
        for (name, ..) in map_layouts(POLICY_MAP_SIZE) {
            // The size of the map as made (the policy map's is configurable).
            let Some(max) = aya::maps::MapInfo::from_pin(pin_dir.join(name)).ok().map(|i| i.max_entries()) else {
                continue;
            };
            let used = match name {
                "cilium_ipcache" => Some(ipcache),
                "cilium_policy" => Some(policy),
                "cilium_endpoints" => count::<EndpointKey, EndpointValue>(pin_dir, name),
                "cilium_ct" => count::<CtKey, CtValue>(pin_dir, name),
                "cilium_metrics" => count::<MetricsKey, MetricsValue>(pin_dir, name),
                _ => None,
            };
            if let Some(used) = used {
                out.push((name, used as f64 / f64::from(max.max(1))));
            }
        }
        out
    }

    /// The ipcache, endpoints and policy maps as the kernel holds them,
    /// read from the pins (for `/v1/maps` and sysdump).
    pub fn pinned_dump(pin_dir: &Path) -> Result<MapsDump, DatapathError> {
        let open = |name: &'static str| {
            MapData::from_pin(pin_dir.join(name)).map_err(|source| DatapathError::Map { name, source })
        };
        let err = |name: &'static str| move |source| DatapathError::Map { name, source };
        let ipcache: LpmTrie<MapData, Addr16, IpcacheValue> =
            LpmTrie::try_from(aya::maps::Map::LpmTrie(open("cilium_ipcache")?)).map_err(err("cilium_ipcache"))?;
        let mut dump = MapsDump::default();
        for kv in ipcache.iter() {
            let (k, v) = kv.map_err(err("cilium_ipcache"))?;
            if let Some(p) = prefix_of(&k) {
                dump.ipcache.push(IpcacheDump { prefix: p.to_string(), identity: v.identity });
            }
        }
        let endpoints: BpfHashMap<MapData, EndpointKey, EndpointValue> =
            BpfHashMap::try_from(aya::maps::Map::HashMap(open("cilium_endpoints")?))
                .map_err(err("cilium_endpoints"))?;
        for kv in endpoints.iter() {
            let (k, v) = kv.map_err(err("cilium_endpoints"))?;
            dump.endpoints.push(EndpointDump {
                ifindex: k.ifindex,
                endpoint_id: v.endpoint_id,
                identity: v.identity,
                ingress_enforce: v.ingress_enforce != 0,
                egress_enforce: v.egress_enforce != 0,
                ready: v.state == ENDPOINT_READY,
            });
        }
        let policy: LpmTrie<MapData, PolicyKeyData, PolicyValue> =
            LpmTrie::try_from(aya::maps::Map::LpmTrie(open("cilium_policy")?)).map_err(err("cilium_policy"))?;
        for kv in policy.iter() {
            let (k, v) = kv.map_err(err("cilium_policy"))?;
            let (ep, e) = PolicyEntry::from_lpm(&k);
            dump.policy.entry(ep).or_default().push(PolicyDump {
                direction: if e.direction == DIR_INGRESS { "ingress" } else { "egress" },
                peer: e.key.peer,
                proto: e.key.proto,
                port: e.key.port,
                port_prefix_len: e.key.plen,
                deny: v.deny != 0,
            });
        }
        dump.ipcache.sort_by(|a, b| a.prefix.cmp(&b.prefix));
        dump.endpoints.sort_by_key(|e| e.endpoint_id);
        Ok(dump)
    }

    /// The event ring buffer, opened from its pin (one reader at a time).
    pub fn pinned_events(pin_dir: &Path) -> Result<aya::maps::RingBuf<MapData>, DatapathError> {
        let e = |source| DatapathError::Map { name: "cilium_events", source };
        let data = MapData::from_pin(pin_dir.join("cilium_events")).map_err(e)?;
        aya::maps::RingBuf::try_from(aya::maps::Map::RingBuf(data)).map_err(e)
    }

    /// Sets which verdicts make events (`EVENTS_*` flags).
    pub fn set_event_flags(pin_dir: &Path, flags: u32) -> Result<(), DatapathError> {
        let e = |source| DatapathError::Map { name: "cilium_events_config", source };
        let data = MapData::from_pin(pin_dir.join("cilium_events_config")).map_err(e)?;
        let mut map: aya::maps::Array<MapData, EventsConfig> =
            aya::maps::Array::try_from(aya::maps::Map::Array(data)).map_err(e)?;
        map.set(0, EventsConfig { flags }, 0).map_err(e)
    }

    /// Events that found the ring buffer full, since the map was made.
    pub fn pinned_events_lost(pin_dir: &Path) -> Result<u64, DatapathError> {
        let map = Datapath::pinned_events_lost_map(pin_dir)?;
        map.get(&0, 0).map_err(|source| DatapathError::Map { name: "cilium_events_lost", source })
    }

    /// The lost-events counter map (index 0), opened from its pin.
    pub fn pinned_events_lost_map(pin_dir: &Path) -> Result<aya::maps::Array<MapData, u64>, DatapathError> {
        let e = |source| DatapathError::Map { name: "cilium_events_lost", source };
        let data = MapData::from_pin(pin_dir.join("cilium_events_lost")).map_err(e)?;
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).map_err(e)
    }

    /// Entries the agent holds in the ipcache and in the policy map.
    pub fn mirrored_entries(&self) -> (usize, usize) {
        (self.ipcache_now.len(), self.policy_now.values().map(BTreeMap::len).sum())
    }

    /// Every counter: (endpoint, direction, reason) -> packets, bytes.
    pub fn metrics(&mut self) -> Result<Vec<(MetricsKey, MetricsValue)>, DatapathError> {
        let map: BpfHashMap<&mut MapData, MetricsKey, MetricsValue> = BpfHashMap::try_from(self.map("cilium_metrics"))
            .map_err(|source| DatapathError::Map { name: "cilium_metrics", source })?;
        Ok(map.iter().filter_map(Result::ok).collect())
    }
}
