//! What the agent must remember across restarts, in `<state-dir>/state.json`
//! (written atomically): each local endpoint's pod UID, IP, endpoint ID and
//! interface, so a restart never hands out a live address again and finds
//! the namespaces and datapath entries it made.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointRecord {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// The IPv6 address in dual stack (absent in records of single-stack
    /// agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<std::net::Ipv6Addr>,
    pub endpoint_id: u32,
    /// The pod's network namespace: a name under /var/run/netns that the
    /// agent made, or (CNI) the path the runtime gave.
    pub netns: String,
    pub lxc: String,
    /// CNI: the runtime's sandbox (container) ID and interface name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// Pod UID -> endpoint.
    pub endpoints: BTreeMap<String, EndpointRecord>,
    pub next_endpoint_id: u32,
    /// The node's health endpoint address (from the pod CIDR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_ip: Option<Ipv4Addr>,
}

pub struct Store {
    path: PathBuf,
    pub state: State,
}

impl Store {
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating state dir {}", dir.display()))?;
        let path = dir.join("state.json");
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Store { path, state })
    }

    pub fn save(&self) -> anyhow::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.state)?)?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(())
    }

    /// The lowest free host address of `cidr` (network and broadcast
    /// excluded), never one a recorded endpoint holds.
    pub fn free_ip(&self, first: u32, last: u32) -> Option<Ipv4Addr> {
        let used: std::collections::HashSet<Ipv4Addr> =
            self.state.endpoints.values().map(|e| e.ip).chain(self.state.health_ip).collect();
        (first + 1..last).map(Ipv4Addr::from).find(|ip| !used.contains(ip))
    }

    pub fn next_endpoint_id(&mut self) -> u32 {
        self.state.next_endpoint_id += 1;
        self.state.next_endpoint_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_survive_a_reopen_and_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let (first, last) = (u32::from(Ipv4Addr::new(10, 0, 1, 0)), u32::from(Ipv4Addr::new(10, 0, 1, 3)));
        let ip = s.free_ip(first, last).unwrap();
        assert_eq!(ip, Ipv4Addr::new(10, 0, 1, 1));
        let id = s.next_endpoint_id();
        s.state.endpoints.insert(
            "uid-1".into(),
            EndpointRecord {
                namespace: "d".into(),
                name: "a".into(),
                ip,
                ip6: None,
                endpoint_id: id,
                netns: "n".into(),
                lxc: "l".into(),
                container_id: None,
                ifname: None,
            },
        );
        s.save().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        assert_eq!(s.free_ip(first, last), Some(Ipv4Addr::new(10, 0, 1, 2)), "the live address is not handed out");
        assert_eq!(s.next_endpoint_id(), 2);
        s.state.endpoints.insert(
            "uid-2".into(),
            EndpointRecord {
                namespace: "d".into(),
                name: "b".into(),
                ip: Ipv4Addr::new(10, 0, 1, 2),
                ip6: None,
                endpoint_id: 2,
                netns: "n".into(),
                lxc: "l".into(),
                container_id: None,
                ifname: None,
            },
        );
        assert_eq!(s.free_ip(first, last), None, "a /30 has two host addresses");
    }
}
