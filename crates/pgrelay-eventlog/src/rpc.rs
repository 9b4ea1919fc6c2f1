//! The `@livestore/sync-cf` 0.4 protocol: Effect RPC over a WebSocket with
//! JSON frames. `SyncWsRpc.Pull` is a stream that stays open while live;
//! `SyncWsRpc.Push` answers with an `Exit`. A frame that cannot be read
//! fails only its own request (an `Exit` with `UnknownError`); never a
//! `Defect`, which would fail every request of the client. The HTTP
//! transport (`httprpc`) answers the same requests with the same frames.

use std::borrow::Cow;

use axum::extract::ws::Utf8Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::conn::{Conn, Flow, Protocol, MAX_PULLS};
use super::event::{parse_batch, Page};
use super::pull::Pull;
use super::store::{Broadcast, PushRefused, StoreHandle};

pub(crate) struct Rpc;

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "_tag", borrow)]
    kind: Cow<'a, str>,
    id: Option<serde_json::Value>,
    #[serde(rename = "requestId")]
    request_id: Option<serde_json::Value>,
    #[serde(borrow)]
    tag: Option<Cow<'a, str>>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
}

/// Effect's encoding of `Option`.
#[derive(Deserialize)]
#[serde(tag = "_tag")]
enum Maybe<T> {
    None,
    Some { value: T },
}

impl<T> Maybe<T> {
    fn into_option(self) -> Option<T> {
        match self {
            Maybe::None => None,
            Maybe::Some { value } => Some(value),
        }
    }
}

#[derive(Deserialize)]
struct Cursor {
    #[serde(rename = "backendId")]
    backend_id: String,
    #[serde(rename = "eventSequenceNumber")]
    seq: i64,
}

#[derive(Deserialize)]
struct PullPayload {
    #[serde(rename = "storeId")]
    store_id: String,
    /// The HTTP transport's pull has no `live`: it always ends.
    #[serde(default)]
    live: bool,
    cursor: Maybe<Cursor>,
}

#[derive(Deserialize)]
struct PushPayload<'a> {
    #[serde(rename = "storeId")]
    store_id: String,
    #[serde(borrow)]
    batch: Vec<&'a RawValue>,
    #[serde(rename = "backendId")]
    backend_id: Maybe<String>,
}

/// A request id as the client sent it (a string; a number is tolerated).
fn id_text(id: &serde_json::Value) -> String {
    match id {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(crate) fn id_of(id: &serde_json::Value) -> String {
    id_text(id)
}

fn quoted(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

fn exit_failure(request_id: &str, error: &str) -> String {
    format!(
        r#"{{"_tag":"Exit","requestId":{},"exit":{{"_tag":"Failure","cause":{{"_tag":"Fail","error":{error}}}}}}}"#,
        quoted(request_id)
    )
}

pub(crate) fn unknown_error(request_id: &str, message: &str) -> String {
    exit_failure(
        request_id,
        &format!(r#"{{"_tag":"UnknownError","cause":{}}}"#, quoted(message)),
    )
}

fn chunk(request_id: &str, items: &str, page_info: &str, backend_id: &str) -> String {
    format!(
        r#"{{"_tag":"Chunk","requestId":{},"values":[{{"batch":{items},"pageInfo":{page_info},"backendId":{}}}]}}"#,
        quoted(request_id),
        quoted(backend_id)
    )
}

const NO_MORE: &str = r#"{"_tag":"NoMore"}"#;

/// The `Chunk` of one page of a pull's history.
pub(crate) fn page_frame(pull: &Pull, page: &Page, remaining: i64) -> String {
    let info = if remaining > 0 {
        format!(r#"{{"_tag":"MoreKnown","remaining":{remaining}}}"#)
    } else {
        NO_MORE.to_owned()
    };
    chunk(&pull.request_id, &page.items, &info, &pull.backend_id)
}

/// The one empty `Chunk` of a pull with nothing after its cursor.
pub(crate) fn empty_frame(pull: &Pull) -> String {
    chunk(&pull.request_id, "[]", NO_MORE, &pull.backend_id)
}

/// The `Exit` that ends a pull that is not live.
pub(crate) fn done_frame(pull: &Pull) -> String {
    format!(
        r#"{{"_tag":"Exit","requestId":{},"exit":{{"_tag":"Success"}}}}"#,
        quoted(&pull.request_id)
    )
}

/// A successful `Exit` carrying `value` (JSON).
pub(crate) fn success(request_id: &str, value: &str) -> String {
    format!(
        r#"{{"_tag":"Exit","requestId":{},"exit":{{"_tag":"Success","value":{value}}}}}"#,
        quoted(request_id)
    )
}

/// Starts the pull a `Pull` request asks for on `store` (live only if it
/// asks and `live_allowed`); `Err` is the `Exit` frame that answers it instead.
pub(crate) async fn start_pull(
    store: &StoreHandle,
    id: &str,
    payload: &RawValue,
    live_allowed: bool,
) -> Result<Pull, String> {
    let pull: PullPayload = serde_json::from_str(payload.get())
        .map_err(|e| unknown_error(id, &format!("invalid Pull payload: {e}")))?;
    if *pull.store_id != *store.id {
        return Err(unknown_error(
            id,
            "the request's storeId is not the connection's storeId",
        ));
    }
    let cursor = pull.cursor.into_option();
    let after = cursor.as_ref().map(|c| c.seq).unwrap_or(0);
    let live = pull.live && live_allowed;
    let Some(started) = Pull::start(store, id.to_owned(), after, live).await else {
        return Err(unknown_error(id, "the server is shutting down"));
    };
    if let Some(cursor) = cursor.filter(|c| *c.backend_id != *started.backend_id) {
        return Err(exit_failure(
            id,
            &format!(
                r#"{{"_tag":"BackendIdMismatchError","expected":{},"received":{}}}"#,
                quoted(&started.backend_id),
                quoted(&cursor.backend_id)
            ),
        ));
    }
    Ok(started)
}

/// Admits the batch a `Push` request carries to `store`; the `Exit` that answers it.
pub(crate) async fn push(store: &StoreHandle, id: &str, payload: &RawValue) -> String {
    let push: PushPayload<'_> = match serde_json::from_str(payload.get()) {
        Ok(push) => push,
        Err(e) => return unknown_error(id, &format!("invalid Push payload: {e}")),
    };
    if *push.store_id != *store.id {
        return unknown_error(id, "the request's storeId is not the connection's storeId");
    }
    let events = match parse_batch(&push.batch) {
        Ok(events) => events,
        Err(e) => return unknown_error(id, &e),
    };
    let backend_id = push.backend_id.into_option();
    match store.push(events, backend_id, id.to_owned()).await {
        Ok(()) => success(id, "{}"),
        Err(PushRefused::ServerAhead {
            minimum_expected,
            provided,
        }) => exit_failure(
            id,
            &format!(
                r#"{{"_tag":"ServerAheadError","minimumExpectedNum":{minimum_expected},"providedNum":{provided}}}"#
            ),
        ),
        Err(PushRefused::BackendIdMismatch { expected, received }) => exit_failure(
            id,
            &format!(
                r#"{{"_tag":"BackendIdMismatchError","expected":{},"received":{}}}"#,
                quoted(&expected),
                quoted(&received)
            ),
        ),
        Err(PushRefused::Failed(message)) => unknown_error(id, &message),
    }
}

impl Rpc {
    async fn pull(&mut self, conn: &mut Conn, id: &str, payload: &RawValue) -> Option<String> {
        let started = match start_pull(&conn.store, id, payload, true).await {
            Ok(started) => started,
            Err(exit) => return Some(exit),
        };
        match conn.add_pull(started) {
            Ok(()) => None,
            Err(_) => Some(unknown_error(
                id,
                &format!("a socket holds at most {MAX_PULLS} pulls; interrupt one first"),
            )),
        }
    }
}

impl Protocol for Rpc {
    async fn on_text(&mut self, conn: &mut Conn, text: &str) -> Flow {
        let frame: Frame<'_> = match serde_json::from_str(text) {
            Ok(frame) => frame,
            Err(e) => {
                // Without a request id there is no request to fail.
                tracing::debug!(store = %conn.store.id, error = %e, "unreadable LiveStore frame ignored");
                return Flow::Continue;
            }
        };
        let reply = match frame.kind.as_ref() {
            "Ping" => Some(r#"{"_tag":"Pong"}"#.to_owned()),
            "Ack" | "Eof" => None,
            "Interrupt" => {
                let id = frame.request_id.as_ref().map(id_text);
                match id {
                    Some(id) if conn.end_pull(&id) => Some(format!(
                        r#"{{"_tag":"Exit","requestId":{},"exit":{{"_tag":"Failure","cause":{{"_tag":"Interrupt","fiberId":{{"_tag":"None"}}}}}}}}"#,
                        quoted(&id)
                    )),
                    // A push is answered before its interrupt arrives: nothing to stop.
                    _ => None,
                }
            }
            "Request" => {
                let Some(id) = frame.id.as_ref().map(id_text) else {
                    tracing::debug!(store = %conn.store.id, "a request without an id ignored");
                    return Flow::Continue;
                };
                match (frame.tag.as_deref(), frame.payload) {
                    (Some("SyncWsRpc.Pull"), Some(payload)) => self.pull(conn, &id, payload).await,
                    (Some("SyncWsRpc.Push"), Some(payload)) => {
                        let reply = push(&conn.store, &id, payload).await;
                        if conn.flush_live(&*self).await.is_err() {
                            return Flow::Close;
                        }
                        Some(reply)
                    }
                    (Some(tag), Some(_)) => {
                        Some(unknown_error(&id, &format!("unknown RPC {tag:?}")))
                    }
                    _ => Some(unknown_error(&id, "a request needs a tag and a payload")),
                }
            }
            other => {
                let id = frame.request_id.as_ref().or(frame.id.as_ref()).map(id_text);
                id.map(|id| unknown_error(&id, &format!("unknown message {other:?}")))
            }
        };
        if let Some(reply) = reply {
            if conn.send(reply).await.is_err() {
                return Flow::Close;
            }
        }
        Flow::Continue
    }

    fn page(&self, pull: &Pull, page: &Page, remaining: i64) -> Utf8Bytes {
        page_frame(pull, page, remaining).into()
    }

    fn empty(&self, pull: &Pull) -> Utf8Bytes {
        empty_frame(pull).into()
    }

    fn live(&self, pull: &Pull, batch: &Broadcast) -> Vec<Utf8Bytes> {
        let build = || -> Vec<Utf8Bytes> {
            batch
                .pages
                .iter()
                .map(|page| chunk(&pull.request_id, &page.items, NO_MORE, &pull.backend_id).into())
                .collect()
        };
        let (request_id, frames) = batch
            .rpc_frames
            .get_or_init(|| (pull.request_id.clone(), build()));
        if *request_id == pull.request_id {
            frames.clone()
        } else {
            build()
        }
    }

    fn done(&self, pull: &Pull) -> Option<Utf8Bytes> {
        Some(done_frame(pull).into())
    }

    fn failed(&self, pull: &Pull, message: &str) -> Utf8Bytes {
        unknown_error(&pull.request_id, message).into()
    }
}
