//! The node agents' API on their unix sockets (upstream's
//! `/var/run/cilium/cilium.sock`): plain HTTP/1.1 over the socket.

use anyhow::{Context, anyhow, bail};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// Upstream's agent socket.
pub const DEFAULT_HOST: &str = "unix:///var/run/cilium/cilium.sock";

/// A socket path from `unix:///path` or `/path`.
pub fn socket_path(host: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = host.strip_prefix("unix://").unwrap_or(host);
    if !path.starts_with('/') {
        bail!("agent address {host:?}: expected unix:///path/to/cilium.sock");
    }
    Ok(path.into())
}

/// `GET path` on the agent at `host`; the response body streams. A status
/// other than 200 is an error carrying the agent's message.
pub async fn get(host: &str, path: &str) -> anyhow::Result<Incoming> {
    let sock = socket_path(host)?;
    let stream = tokio::net::UnixStream::connect(&sock).await.map_err(|e| {
        anyhow!(
            "cannot reach the agent at {}: {e} (is cilium-node-agent running there? pick another with --host)",
            sock.display()
        )
    })?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.context("talking to the agent")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, "cilium-agent")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())?;
    let resp = send.send_request(req).await.with_context(|| format!("GET {path} from the agent"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        bail!("the agent at {} answered {status}: {}", sock.display(), String::from_utf8_lossy(&body).trim());
    }
    Ok(resp.into_body())
}

/// A streamed body read line by line.
pub struct Lines {
    body: Incoming,
    buf: Vec<u8>,
}

impl Lines {
    pub fn new(body: Incoming) -> Lines {
        Lines { body, buf: Vec::new() }
    }

    /// The next line; None when the agent ends the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<String>> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let l: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(Some(String::from_utf8_lossy(&l[..l.len() - 1]).into_owned()));
            }
            let Some(frame) = self.body.frame().await else { return Ok(None) };
            if let Some(data) = frame.context("reading from the agent")?.data_ref() {
                self.buf.extend_from_slice(data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths() {
        assert_eq!(socket_path(DEFAULT_HOST).unwrap(), std::path::PathBuf::from("/var/run/cilium/cilium.sock"));
        assert_eq!(socket_path("/tmp/a.sock").unwrap(), std::path::PathBuf::from("/tmp/a.sock"));
        assert!(socket_path("tcp://1.2.3.4:80").is_err());
    }
}
