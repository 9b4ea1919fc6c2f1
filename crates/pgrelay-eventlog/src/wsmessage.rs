//! The `@livestore/sync-cf` 0.3 protocol (`/websocket`): tagged
//! `WSMessage.*` JSON messages. A pull answers the history after its cursor
//! in `PullRes` pages (`context: "pull"`, with `remaining`), then the socket
//! receives every accepted batch as a `PullRes` with `context: "push"`.

use std::borrow::Cow;

use axum::extract::ws::Utf8Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::admin::AdminCheck;
use super::conn::{Conn, Flow, Protocol};
use super::event::{parse_batch, Page};
use super::pull::Pull;
use super::store::{Broadcast, PushRefused};

pub(crate) struct WsMessage;

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
            "WSMessage.PullReq" => {
                match Pull::start(&conn.store, id.clone(), frame.cursor.unwrap_or(0), true).await {
                    Some(pull) => {
                        conn.pull = Some(pull);
                        return Flow::Continue;
                    }
                    None => error(&id, "the server is shutting down"),
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
        pull_res(&page.items, "pull", &pull.request_id, remaining).into()
    }

    fn empty(&self, pull: &Pull) -> Utf8Bytes {
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
