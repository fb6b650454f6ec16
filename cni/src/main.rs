//! `cilium-cni`: run by the container runtime with `CNI_COMMAND` and friends
//! in the environment and the network configuration on stdin; prints the
//! result (or the error) as JSON on stdout, as CNI spec 1.0 says.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use cilium_cni::api::{self, AddReply, AddRequest, ApiError, AttachmentRef};
use cilium_cni::spec::{self, AddResult, Code, Command, Env, Error, NetConf};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The agent answers ADD once the endpoint's policy is in force (it waits
/// up to 25 s for the pod to show in its caches).
const AGENT_TIMEOUT: Duration = Duration::from_secs(40);

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let version = spec::requested_version(&stdin).unwrap_or_else(|| spec::DEFAULT_VERSION.to_string());
    let (out, code) = match run(&stdin, &version) {
        Ok(Some(v)) => (Some(v), ExitCode::SUCCESS),
        Ok(None) => (None, ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("cilium-cni: {} (code {})", e.msg, e.code as u32);
            (Some(e.to_json(&version)), ExitCode::FAILURE)
        }
    };
    if let Some(v) = out {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{v}");
    }
    code
}

fn run(stdin: &[u8], version: &str) -> Result<Option<Value>, Error> {
    let env = Env::from_vars(|k| std::env::var(k).ok())?;
    if env.command == Command::Version {
        return Ok(Some(spec::version_result(version)));
    }
    let conf = NetConf::parse(stdin)?;
    let socket = conf.socket_path.clone().unwrap_or_else(|| api::DEFAULT_SOCKET.to_string());
    let attachment =
        AttachmentRef { container_id: env.container_id.clone(), ifname: env.ifname.clone(), netns: env.netns.clone() };
    match env.command {
        Command::Add => {
            let (pod_namespace, pod_name) = env.pod()?;
            let req = AddRequest {
                container_id: env.container_id.clone(),
                netns: env.netns.clone(),
                ifname: env.ifname.clone(),
                pod_namespace,
                pod_name,
                pod_uid: env.args.get("K8S_POD_UID").cloned(),
            };
            let body = call(&socket, api::ADD_PATH, &req)?;
            let reply: AddReply = serde_json::from_slice(&body)
                .map_err(|e| Error::new(Code::Decoding, format!("the agent's ADD answer does not decode: {e}")))?;
            let mut ips = vec![(format!("{}/32", reply.ipv4), reply.gateway4.clone())];
            if let (Some(ip6), Some(gw6)) = (&reply.ipv6, &reply.gateway6) {
                ips.push((format!("{ip6}/128"), gw6.clone()));
            }
            let result = AddResult { ifname: reply.ifname, mac: reply.mac, sandbox: env.netns, ips };
            Ok(Some(result.to_json(&conf.cni_version)))
        }
        Command::Del => {
            call(&socket, api::DEL_PATH, &attachment)?;
            Ok(None)
        }
        Command::Check => {
            if conf.cni_version.starts_with("0.3") {
                return Err(Error::new(Code::IncompatibleVersion, "CHECK needs CNI version 0.4.0 or later"));
            }
            call(&socket, api::CHECK_PATH, &attachment)?;
            Ok(None)
        }
        Command::Version => unreachable!("answered above"),
    }
}

/// `POST path` with a JSON body to the agent; its answer's body. An agent
/// that cannot be reached is "try again later" (the kubelet retries).
fn call<T: serde::Serialize>(socket: &str, path: &str, body: &T) -> Result<Vec<u8>, Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::new(Code::Io, format!("starting the plugin's runtime: {e}")))?;
    let body = serde_json::to_vec(body).expect("request serializes");
    rt.block_on(async {
        match tokio::time::timeout(AGENT_TIMEOUT, post(socket, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                Code::TryAgainLater,
                format!("the Cilium agent at {socket} did not answer {path} within {}s", AGENT_TIMEOUT.as_secs()),
            )),
        }
    })
}

async fn post(socket: &str, path: &str, body: Vec<u8>) -> Result<Vec<u8>, Error> {
    let unreachable = |e: &dyn std::fmt::Display| {
        Error::new(
            Code::TryAgainLater,
            format!("cannot reach the Cilium agent at {socket}: {e} (is the cilium agent running on this node?)"),
        )
    };
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| unreachable(&e))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| unreachable(&e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, "cilium-agent")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
        .expect("request builds");
    let resp = send.send_request(req).await.map_err(|e| unreachable(&e))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Error::new(Code::Io, format!("reading the agent's answer: {e}")))?
        .to_bytes()
        .to_vec();
    if status.is_success() {
        return Ok(bytes);
    }
    Err(match serde_json::from_slice::<ApiError>(&bytes) {
        Ok(e) => Error::new(Code::from_u32(e.code), e.msg),
        Err(_) => Error::new(
            Code::Agent,
            format!("the Cilium agent answered {status}: {}", String::from_utf8_lossy(&bytes).trim()),
        ),
    })
}
