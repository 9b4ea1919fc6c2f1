//! The HTTP transport of `@livestore/sync-cf` 0.4 (`makeHttpSync`,
//! `transport=http`): each request is one Effect RPC `Request` frame POSTed
//! as JSON to `/livestore?storeId=..&payload=..&transport=http`, and the
//! answer is a JSON array of the frames a socket would have received for
//! it (`Chunk`s, then the `Exit`). A pull always ends: the 0.4 client gets
//! live updates by pulling again from its cursor (every 5 s by default).
//! A pull's pages are streamed into the body one at a time, so a long
//! history never sits in memory whole.

use std::collections::HashMap;
use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, Extensions, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::admission::{admit, text, SyncParams, Version};
use super::pull::{Pull, PullStep};
use super::rpc::{
    done_frame, empty_frame, id_of, page_frame, push, start_pull, success, unknown_error,
};
use super::storage::Storage;
use super::EventLog;

/// Largest request body read: the client splits pushes at 900 kB.
pub(crate) const MAX_REQUEST_BYTES: usize = 4 << 20;

#[derive(Deserialize)]
struct Request<'a> {
    #[serde(rename = "_tag")]
    kind: &'a str,
    id: Option<serde_json::Value>,
    tag: Option<&'a str>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
}

fn json_array(frames: impl IntoIterator<Item = String>) -> Response {
    let body = format!("[{}]", frames.into_iter().collect::<Vec<_>>().join(","));
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

pub(crate) async fn serve(
    State(log): State<EventLog>,
    Query(query): Query<HashMap<String, String>>,
    request: Extensions,
    body: Bytes,
) -> Response {
    let params = match SyncParams::parse(&query, Version::Http) {
        Ok(params) => params,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    let store = match admit(&log, &request, &params).await {
        Ok(store) => store,
        Err(refused) => return refused,
    };
    let request: Request<'_> = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("the body is not an Effect RPC request frame: {e}"),
            )
        }
    };
    let (Some(id), "Request") = (request.id.as_ref().map(id_of), request.kind) else {
        return text(
            StatusCode::BAD_REQUEST,
            "the body must be one {\"_tag\":\"Request\",\"id\",..} frame",
        );
    };
    let Some(payload) = request.payload else {
        return json_array([unknown_error(&id, "a request needs a payload")]);
    };
    match request.tag {
        Some("SyncHttpRpc.Ping") => json_array([success(&id, r#"{"_tag":"SyncMessage.Pong"}"#)]),
        Some("SyncHttpRpc.Push") => json_array([push(&store, &id, payload).await]),
        Some("SyncHttpRpc.Pull") => match start_pull(&store, &id, payload, false).await {
            Ok(pull) => streamed(pull, log.storage().clone()),
            Err(exit) => json_array([exit]),
        },
        other => json_array([unknown_error(
            &id,
            &format!("unknown RPC {:?}", other.unwrap_or_default()),
        )]),
    }
}

/// Where a streamed pull's body is.
enum Streaming {
    Open(Box<Pull>, Storage),
    Closed,
}

/// The pull's frames as one JSON array, written page by page.
fn streamed(pull: Pull, storage: Storage) -> Response {
    let pages = stream::unfold(
        (Streaming::Open(Box::new(pull), storage), true),
        |(state, first)| async move {
            let Streaming::Open(mut pull, storage) = state else {
                return None;
            };
            let separator = if first { "[" } else { "," };
            let (frame, more) = match pull.step(&storage).await {
                PullStep::Page { page, remaining } => (page_frame(&pull, &page, remaining), true),
                PullStep::Empty => (empty_frame(&pull), true),
                PullStep::Done => (done_frame(&pull), false),
                PullStep::Failed(message) => {
                    tracing::error!(store = %pull.request_id, error = %message, "an HTTP pull failed");
                    (unknown_error(&pull.request_id, &message), false)
                }
                // Only a live pull ends this way, and HTTP pulls are never live.
                PullStep::Live(_) | PullStep::Ended(_) => {
                    (unknown_error(&pull.request_id, "the pull ended"), false)
                }
            };
            let mut chunk = String::with_capacity(frame.len() + 2);
            chunk.push_str(separator);
            chunk.push_str(&frame);
            let next = if more {
                Streaming::Open(pull, storage)
            } else {
                chunk.push(']');
                Streaming::Closed
            };
            Some((Ok::<_, Infallible>(Bytes::from(chunk)), (next, false)))
        },
    );
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(pages),
    )
        .into_response()
}
