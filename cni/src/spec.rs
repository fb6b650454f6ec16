//! The CNI protocol as a plugin sees it (spec 1.0, <https://www.cni.dev/docs/spec/>):
//! the runtime's environment variables and network configuration in, a
//! result or an error out, both JSON on stdout.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Value, json};

/// The spec versions this plugin answers in (CHECK exists from 0.4.0 on).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// The version errors are written in when the configuration gives none we
/// know.
pub const DEFAULT_VERSION: &str = "1.0.0";

/// The spec's well-known error codes (section "Error").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decoding = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// Plugin-specific: the agent refused or failed the request.
    Agent = 100,
}

impl Code {
    pub fn from_u32(c: u32) -> Code {
        match c {
            1 => Code::IncompatibleVersion,
            2 => Code::UnsupportedField,
            3 => Code::UnknownContainer,
            4 => Code::InvalidEnvironment,
            5 => Code::Io,
            6 => Code::Decoding,
            7 => Code::InvalidConfig,
            11 => Code::TryAgainLater,
            _ => Code::Agent,
        }
    }
}

/// An error as the runtime reads it: a code, a message, details.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct Error {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl Error {
    pub fn new(code: Code, msg: impl Into<String>) -> Error {
        Error { code, msg: msg.into(), details: String::new() }
    }

    pub fn details(mut self, details: impl Into<String>) -> Error {
        self.details = details.into();
        self
    }

    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({ "cniVersion": version, "code": self.code as u32, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

/// What the runtime passes in environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    /// Empty on a DEL whose namespace is gone already.
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS`: `K1=V1;K2=V2` (the kubelet's runtime passes
    /// `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`, ...).
    pub args: BTreeMap<String, String>,
}

impl Env {
    /// Reads and checks the variables as the spec requires them per
    /// command.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Env, Error> {
        let command = match var("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            Some(other) => {
                return Err(Error::new(Code::InvalidEnvironment, format!("unknown CNI_COMMAND {other:?}")));
            }
            None => return Err(Error::new(Code::InvalidEnvironment, "CNI_COMMAND is not set")),
        };
        let get = |k: &str| var(k).unwrap_or_default();
        let env = Env {
            command,
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: parse_args(&get("CNI_ARGS"))?,
        };
        if command == Command::Version {
            return Ok(env);
        }
        check_container_id(&env.container_id)?;
        check_ifname(&env.ifname)?;
        if command != Command::Del && env.netns.is_empty() {
            return Err(Error::new(Code::InvalidEnvironment, "CNI_NETNS is not set"));
        }
        Ok(env)
    }

    /// The pod's namespace and name from `CNI_ARGS`.
    pub fn pod(&self) -> Result<(String, String), Error> {
        match (self.args.get("K8S_POD_NAMESPACE"), self.args.get("K8S_POD_NAME")) {
            (Some(ns), Some(name)) if !ns.is_empty() && !name.is_empty() => Ok((ns.clone(), name.clone())),
            _ => Err(Error::new(
                Code::InvalidEnvironment,
                "CNI_ARGS has no K8S_POD_NAMESPACE and K8S_POD_NAME: cilium-cni only networks Kubernetes pods",
            )),
        }
    }
}

fn parse_args(s: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| Error::new(Code::InvalidEnvironment, format!("CNI_ARGS: {pair:?} is not KEY=VALUE")))?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// The spec: not empty; letters, digits, `_`, `.`, `-`, starting with a
/// letter or digit.
fn check_container_id(id: &str) -> Result<(), Error> {
    let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else if id.is_empty() {
        Err(Error::new(Code::InvalidEnvironment, "CNI_CONTAINERID is not set"))
    } else {
        Err(Error::new(Code::InvalidEnvironment, format!("CNI_CONTAINERID {id:?} has characters the spec refuses")))
    }
}

/// A Linux interface name: 1 to 15 bytes, not `.` or `..`, no `/`, `:` or
/// white space.
fn check_ifname(name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::new(Code::InvalidEnvironment, "CNI_IFNAME is not set"));
    }
    let bad = name.len() > 15
        || name == "."
        || name == ".."
        || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
    if bad {
        return Err(Error::new(Code::InvalidEnvironment, format!("CNI_IFNAME {name:?} is not a valid interface name")));
    }
    Ok(())
}

/// The network configuration on stdin (the fields this plugin reads; the
/// runtime may add others, which are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The agent's socket (ours; upstream's path by default).
    #[serde(rename = "socket-path", default)]
    pub socket_path: Option<String>,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<NetConf, Error> {
        let conf: NetConf = serde_json::from_slice(stdin)
            .map_err(|e| Error::new(Code::Decoding, format!("the network configuration does not decode: {e}")))?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(Error::new(
                Code::IncompatibleVersion,
                format!("CNI version {:?} is not supported", conf.cni_version),
            )
            .details(format!("supported: {}", SUPPORTED_VERSIONS.join(", "))));
        }
        if conf.name.is_empty() {
            return Err(Error::new(Code::InvalidConfig, "the network configuration has no name"));
        }
        Ok(conf)
    }
}

/// The `cniVersion` a VERSION request or a broken configuration asks for,
/// if it is one we speak.
pub fn requested_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    let version = v.get("cniVersion")?.as_str()?;
    SUPPORTED_VERSIONS.contains(&version).then(|| version.to_string())
}

/// The answer to VERSION.
pub fn version_result(version: &str) -> Value {
    json!({ "cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS })
}

/// What ADD made: one interface in the sandbox, its addresses with their
/// gateways, default routes through them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddResult {
    pub ifname: String,
    pub mac: String,
    pub sandbox: String,
    /// (address with prefix length, gateway), IPv4 first.
    pub ips: Vec<(String, String)>,
}

impl AddResult {
    /// The result in the shape of `version` (0.3.x and 0.4.0 also carry
    /// each address's family as `version`).
    pub fn to_json(&self, version: &str) -> Value {
        let old = version.starts_with("0.");
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|(address, gateway)| {
                let mut ip = json!({ "address": address, "gateway": gateway, "interface": 0 });
                if old {
                    ip["version"] = json!(if address.contains(':') { "6" } else { "4" });
                }
                ip
            })
            .collect();
        let routes: Vec<Value> = self
            .ips
            .iter()
            .map(|(address, gateway)| {
                let dst = if address.contains(':') { "::/0" } else { "0.0.0.0/0" };
                json!({ "dst": dst, "gw": gateway })
            })
            .collect();
        json!({
            "cniVersion": version,
            "interfaces": [{ "name": self.ifname, "mac": self.mac, "sandbox": self.sandbox }],
            "ips": ips,
            "routes": routes,
            "dns": {},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn environment_is_checked_per_command() {
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=u-1"),
        ];
        let env = Env::from_vars(vars(&add)).unwrap();
        assert_eq!(env.command, Command::Add);
        assert_eq!(env.pod().unwrap(), ("default".to_string(), "web-0".to_string()));
        assert_eq!(env.args["K8S_POD_UID"], "u-1");

        // DEL without a namespace (the runtime removed it) is fine; ADD is not.
        let del = [("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "abc123"), ("CNI_IFNAME", "eth0")];
        assert_eq!(Env::from_vars(vars(&del)).unwrap().command, Command::Del);
        let add_no_ns = [("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc123"), ("CNI_IFNAME", "eth0")];
        assert_eq!(Env::from_vars(vars(&add_no_ns)).unwrap_err().code, Code::InvalidEnvironment);

        for (k, bad) in [
            ("CNI_CONTAINERID", ""),
            ("CNI_CONTAINERID", "-lead"),
            ("CNI_CONTAINERID", "a/b"),
            ("CNI_IFNAME", "a-very-long-ifname0"),
            ("CNI_IFNAME", "eth:0"),
            ("CNI_IFNAME", ".."),
            ("CNI_ARGS", "K8S_POD_NAME"),
            ("CNI_COMMAND", "GC"),
        ] {
            let mut v: Vec<(&str, &str)> = add.iter().filter(|(key, _)| *key != k).copied().collect();
            v.push((k, bad));
            assert_eq!(Env::from_vars(vars(&v)).unwrap_err().code, Code::InvalidEnvironment, "{k}={bad:?}");
        }
        let no_pod =
            [("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc123"), ("CNI_NETNS", "/x"), ("CNI_IFNAME", "eth0")];
        assert_eq!(Env::from_vars(vars(&no_pod)).unwrap().pod().unwrap_err().code, Code::InvalidEnvironment);
        // VERSION needs nothing else.
        assert!(Env::from_vars(vars(&[("CNI_COMMAND", "VERSION")])).is_ok());
        assert_eq!(Env::from_vars(vars(&[])).unwrap_err().code, Code::InvalidEnvironment);
    }

    #[test]
    fn configuration_versions_and_results() {
        let conf = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"cilium","type":"cilium-cni","x":1}"#).unwrap();
        assert_eq!(conf.kind, "cilium-cni");
        assert_eq!(conf.socket_path, None);
        let e = NetConf::parse(br#"{"cniVersion":"2.0.0","name":"cilium","type":"cilium-cni"}"#).unwrap_err();
        assert_eq!(e.code, Code::IncompatibleVersion);
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code, Code::Decoding);
        assert_eq!(NetConf::parse(br#"{"cniVersion":"1.0.0","type":"x"}"#).unwrap_err().code, Code::InvalidConfig);
        assert_eq!(requested_version(br#"{"cniVersion":"0.3.1"}"#).as_deref(), Some("0.3.1"));
        assert_eq!(requested_version(br#"{"cniVersion":"9"}"#), None);

        let r = AddResult {
            ifname: "eth0".into(),
            mac: "02:00:00:00:00:01".into(),
            sandbox: "/var/run/netns/cni-1".into(),
            ips: vec![("10.0.1.5/32".into(), "10.0.1.1".into()), ("fd00::5/128".into(), "fd00::1".into())],
        };
        let v1 = r.to_json("1.0.0");
        assert_eq!(v1["ips"][0], json!({ "address": "10.0.1.5/32", "gateway": "10.0.1.1", "interface": 0 }));
        assert_eq!(v1["routes"][1], json!({ "dst": "::/0", "gw": "fd00::1" }));
        assert_eq!(v1["interfaces"][0]["sandbox"], "/var/run/netns/cni-1");
        let v031 = r.to_json("0.3.1");
        assert_eq!(v031["ips"][0]["version"], "4");
        assert_eq!(v031["ips"][1]["version"], "6");
        let err = Error::new(Code::TryAgainLater, "agent down").to_json("0.4.0");
        assert_eq!(err, json!({ "cniVersion": "0.4.0", "code": 11, "msg": "agent down" }));
    }
}
