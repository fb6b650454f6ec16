//! The agent's side of the CNI plugin (`cilium-cni`): `POST /v1/cni/add`,
//! `/v1/cni/del` and `/v1/cni/check` on the API socket. The routes hand each
//! call to the agent's loop, which owns addresses, interfaces and the
//! datapath, and wait for its answer.

use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cilium_cni::api::{self, AddReply, AddRequest, ApiError, AttachmentRef};
use cilium_cni::spec::Code;
use tokio::sync::{mpsc, oneshot};

use crate::agent::Snapshot;

/// One plugin call on its way to the agent's loop, with where to answer.
pub enum Call {
    Add(AddRequest, oneshot::Sender<Result<AddReply, ApiError>>),
    Del(AttachmentRef, oneshot::Sender<Result<(), ApiError>>),
    Check(AttachmentRef, oneshot::Sender<Result<(), ApiError>>),
}

pub fn error(code: Code, msg: impl Into<String>) -> ApiError {
    ApiError { code: code as u32, msg: msg.into() }
}

/// The channel from the API routes to the agent's loop.
pub fn channel() -> (mpsc::Sender<Call>, mpsc::Receiver<Call>) {
    mpsc::channel(64)
}

/// The three routes. Calls made before the agent enforces (caches not yet
/// synced, no pod CIDR yet) are "try again later".
pub fn routes(tx: mpsc::Sender<Call>, snapshot: Arc<Mutex<Snapshot>>) -> axum::Router {
    let add = {
        let (tx, snapshot) = (tx.clone(), snapshot.clone());
        move |body: axum::body::Bytes| async move {
            let req: AddRequest = decode(&body)?;
            ask(&tx, &snapshot, |reply| Call::Add(req, reply)).await.map(|r| json(StatusCode::OK, &r))
        }
    };
    let del = {
        let (tx, snapshot) = (tx.clone(), snapshot.clone());
        move |body: axum::body::Bytes| async move {
            let req: AttachmentRef = decode(&body)?;
            ask(&tx, &snapshot, |reply| Call::Del(req, reply)).await
        }
    };
    let check = move |body: axum::body::Bytes| async move {
        let req: AttachmentRef = decode(&body)?;
        ask(&tx, &snapshot, |reply| Call::Check(req, reply)).await
    };
    axum::Router::new()
        .route(api::ADD_PATH, axum::routing::post(add))
        .route(api::DEL_PATH, axum::routing::post(del))
        .route(api::CHECK_PATH, axum::routing::post(check))
}

fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body)
        .map_err(|e| Refusal(error(Code::Decoding, format!("the request does not decode: {e}"))))
}

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response {
    let body = serde_json::to_string(v).expect("serializes");
    (status, [(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn ask<T>(
    tx: &mpsc::Sender<Call>,
    snapshot: &Mutex<Snapshot>,
    call: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> Call,
) -> Result<T, Refusal> {
    if !snapshot.lock().expect("snapshot").ready {
        return Err(Refusal(error(
            Code::TryAgainLater,
            "the Cilium agent is starting (no pod CIDR or caches not synced yet)",
        )));
    }
    let (reply, answer) = oneshot::channel();
    tx.send(call(reply)).await.map_err(|_| Refusal(error(Code::TryAgainLater, "the Cilium agent is stopping")))?;
    answer
        .await
        .map_err(|_| Refusal(error(Code::TryAgainLater, "the Cilium agent stopped before answering")))?
        .map_err(Refusal)
}

/// The network configuration list the runtime reads (`05-cilium.conflist`
/// by upstream's name), written atomically.
pub fn conflist(socket: &std::path::Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "cilium",
        "plugins": [{ "type": "cilium-cni", "socket-path": socket }],
    })
}

pub fn write_conflist(path: &std::path::Path, socket: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let body = serde_json::to_vec_pretty(&conflist(socket)).expect("serializes");
    std::fs::write(&tmp, body).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// An [`ApiError`] as an HTTP answer.
pub struct Refusal(pub ApiError);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let status = match Code::from_u32(self.0.code) {
            Code::TryAgainLater => StatusCode::SERVICE_UNAVAILABLE,
            Code::UnknownContainer => StatusCode::NOT_FOUND,
            Code::InvalidEnvironment | Code::InvalidConfig | Code::Decoding => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        json(status, &self.0)
    }
}
