//! The `@livestore/sync-cf` 0.3 protocol (`/websocket`): tagged
//! `WSMessage.*` JSON messages. As LiveStore's 0.3 backend does, a socket
//! receives every batch accepted after it connected as a `PullRes` with
//! `context: "push"`, whether it pulled or not (the 0.3 client pulls once
//! per client, not again after its socket reconnects). A pull answers the
//! history after its cursor up to the head at connect in `PullRes` pages
//! (`context: "pull"`, with `remaining`); the client stashes broadcasts
//! that arrive before that answer.

use std::sync::Arc;

use std::borrow::Cow;

use axum::extract::ws::Utf8Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::admin::AdminCheck;
use super::conn::{Conn, Flow, Protocol};
use super::event::{parse_batch, Page};
use super::pull::Pull;
use super::store::{Broadcast, PushRefused};

/// The request id of a socket's broadcast subscription (not one a client can pull under).
const BROADCAST_ID: &str = "";

pub(crate) struct WsMessage {
    /// The store's head when the socket connected: broadcasts cover what
    /// comes after it, pulls what comes before.
    connect_head: i64,
    backend_id: Arc<str>,
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "_tag", borrow)]
    kind: Cow<'a, str>,
    #[serde(rename = "requestId")]
    request_id: Option<String>,
    cursor: Option<i64>,
    #[serde(borrow)]
    batch: Option<Vec<&'a RawValue>>,
    #[serde(rename = "adminSecret")]
    admin_secret: Option<String>,
}

fn quoted(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

fn error(request_id: &str, message: &str) -> String {
    format!(
        r#"{{"_tag":"WSMessage.Error","requestId":{},"message":{}}}"#,
        quoted(request_id),
        quoted(message)
    )
}

fn pull_res(items: &str, context: &str, request_id: &str, remaining: i64) -> String {
    format!(
        r#"{{"_tag":"WSMessage.PullRes","batch":{items},"requestId":{{"context":"{context}","requestId":{}}},"remaining":{remaining}}}"#,
        quoted(request_id)
    )
}

impl WsMessage {
    /// Subscribes a new socket to every batch from now on; `None` when the
    /// server is shutting down.
    pub(crate) async fn connect(conn: &mut Conn) -> Option<WsMessage> {
        let broadcast = Pull::broadcast(&conn.store).await?;
        let protocol = WsMessage {
            connect_head: broadcast.start_head(),
            backend_id: Arc::clone(&broadcast.backend_id),
        };
        conn.add_pull(broadcast).ok()?;
        Some(protocol)
    }

    async fn push(&mut self, conn: &mut Conn, id: &str, batch: &[&RawValue]) -> String {
        let events = match parse_batch(batch) {
            Ok(events) => events,
            Err(e) => return error(id, &e),
        };
        match conn.store.push(events, None, id.to_owned()).await {
            Ok(()) => format!(
                r#"{{"_tag":"WSMessage.PushAck","requestId":{}}}"#,
                quoted(id)
            ),
            Err(PushRefused::ServerAhead {
                minimum_expected,
                provided,
            }) => error(
                id,
                &format!(
                    "Invalid parent event number. Received e{provided} but expected e{minimum_expected}"
                ),
            ),
            Err(PushRefused::BackendIdMismatch { expected, .. }) => {
                error(id, &format!("backend id mismatch: expected {expected}"))
            }
            Err(PushRefused::Failed(message)) => error(id, &message),
        }
    }

    async fn admin(
        &mut self,
        conn: &mut Conn,
        id: &str,
        kind: &str,
        secret: Option<&str>,
    ) -> String {
        if conn.log.admin().check(secret) != AdminCheck::Allowed {
            return error(id, "Invalid admin secret");
        }
        let result = if kind == "WSMessage.AdminResetRoomReq" {
            conn.store.reset().await.map(|_| {
                format!(
                    r#"{{"_tag":"WSMessage.AdminResetRoomRes","requestId":{}}}"#,
                    quoted(id)
                )
            })
        } else {
            conn.store.info().await.map(|info| {
                format!(
                    r#"{{"_tag":"WSMessage.AdminInfoRes","requestId":{},"info":{{"durableObjectId":{}}}}}"#,
                    quoted(id),
                    quoted(&info.backend_id)
                )
            })
        };
        result.unwrap_or_else(|e| error(id, &e.to_string()))
    }
}

impl Protocol for WsMessage {
    async fn on_text(&mut self, conn: &mut Conn, text: &str) -> Flow {
        let frame: Frame<'_> = match serde_json::from_str(text) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::debug!(store = %conn.store.id, error = %e, "unreadable LiveStore 0.3 message ignored");
                return Flow::Continue;
            }
        };
        let id = frame.request_id.clone().unwrap_or_default();
        let reply = match frame.kind.as_ref() {
            "WSMessage.Ping" => r#"{"_tag":"WSMessage.Pong","requestId":"ping"}"#.to_owned(),
            "WSMessage.PullReq" if id == BROADCAST_ID => {
                error(&id, "WSMessage.PullReq needs a requestId")
            }
            "WSMessage.PullReq" => {
                let cursor = frame.cursor.unwrap_or(0).max(0);
                let history = Pull::history(
                    &conn.store,
                    id.clone(),
                    Arc::clone(&self.backend_id),
                    cursor,
                    self.connect_head.max(cursor),
                );
                match conn.add_pull(history) {
                    Ok(()) => return Flow::Continue,
                    Err(_) => error(&id, "too many pulls under way on this socket"),
                }
            }
            "WSMessage.PushReq" => match &frame.batch {
                Some(batch) => {
                    let reply = self.push(conn, &id, batch).await;
                    // 0.3 acknowledges before the echo arrives.
                    if conn.send(reply).await.is_err() || conn.flush_live(&*self).await.is_err() {
                        return Flow::Close;
                    }
                    return Flow::Continue;
                }
                None => error(&id, "WSMessage.PushReq needs a batch"),
            },
            kind @ ("WSMessage.AdminResetRoomReq" | "WSMessage.AdminInfoReq") => {
                self.admin(conn, &id, kind, frame.admin_secret.as_deref())
                    .await
            }
            other => error(&id, &format!("unknown message {other:?}")),
        };
        match conn.send(reply).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Close,
        }
    }

    fn page(&self, pull: &Pull, page: &Page, remaining: i64) -> Utf8Bytes {
        if pull.is_live() {
            // The broadcast catching up from storage after it fell behind.
            pull_res(&page.items, "push", BROADCAST_ID, 0).into()
        } else {
            pull_res(&page.items, "pull", &pull.request_id, remaining).into()
        }
    }

    fn empty(&self, pull: &Pull) -> Utf8Bytes {
        // Only a pull is ever empty: the broadcast starts answered.
        pull_res("[]", "pull", &pull.request_id, 0).into()
    }

    fn live(&self, _pull: &Pull, batch: &Broadcast) -> Vec<Utf8Bytes> {
        batch
            .pages
            .iter()
            .map(|page| pull_res(&page.items, "push", &batch.push_request_id, 0).into())
            .collect()
    }

    fn done(&self, _pull: &Pull) -> Option<Utf8Bytes> {
        None
    }

    fn failed(&self, pull: &Pull, message: &str) -> Utf8Bytes {
        error(&pull.request_id, message).into()
    }
}
