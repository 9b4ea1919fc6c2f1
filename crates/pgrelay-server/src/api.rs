//! HTTP routes: the sync WebSocket, client writes, health and status.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pgrelay_protocol::{valid_id, BatchRefusal, WriteBatch, MAX_CLIENT_FRAME_BYTES};
use serde::Serialize;
use tokio::sync::watch;

use crate::auth::Action;
use crate::session;
use crate::state::AppState;

/// Readiness fails when replication has heard nothing from PostgreSQL for
/// this long (keepalives arrive at least every wal_sender_timeout / 2).
const STALL_AFTER: Duration = Duration::from_secs(120);

/// Initial read buffer per WebSocket.
const READ_BUFFER_BYTES: usize = 1024;

#[derive(Clone)]
struct Ctx {
    state: Arc<AppState>,
    shutdown: watch::Receiver<bool>,
}

pub(crate) fn router(state: Arc<AppState>, shutdown: watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/api/sync", get(sync))
        .route(
            "/api/changes",
            post(changes).layer(DefaultBodyLimit::max(MAX_CLIENT_FRAME_BYTES)),
        )
        .route("/health", get(health))
        .route("/api/status", get(status))
        .with_state(Ctx { state, shutdown })
}

async fn sync(State(ctx): State<Ctx>, upgrade: WebSocketUpgrade) -> Response {
    // Frames a little over the protocol limit are still read, so the client
    // gets a clear `frame_too_large` error rather than a bare reset.
    upgrade
        // The default 128 KiB read buffer is allocated and touched per
        // connection; clients send small frames, so a small one keeps idle
        // connections cheap (it grows for the rare large frame).
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(MAX_CLIENT_FRAME_BYTES * 4)
        .max_frame_size(MAX_CLIENT_FRAME_BYTES * 4)
        .on_upgrade(move |socket| session::run(socket, ctx.state, ctx.shutdown))
}

#[derive(Serialize)]
struct Status {
    head_lsn: String,
    sessions: usize,
    replication: crate::status::StatusReport,
    tables: Vec<pgrelay_protocol::TableSchema>,
}

async fn status(State(ctx): State<Ctx>) -> Json<Status> {
    let state = &ctx.state;
    Json(Status {
        head_lsn: state.hub.head().to_string(),
        sessions: state.hub.sessions(),
        replication: state.replication.report(),
        tables: state.hub.schemas().values().cloned().collect(),
    })
}

async fn health(State(ctx): State<Ctx>) -> Response {
    let report = ctx.state.replication.report();
    let code = if ctx.state.replication.is_healthy(STALL_AFTER) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(report)).into_response()
}

#[derive(Serialize)]
struct Refused {
    code: BatchRefusal,
    message: String,
}

fn refused(status: StatusCode, code: BatchRefusal, message: impl Into<String>) -> Response {
    (
        status,
        Json(Refused {
            code,
            message: message.into(),
        }),
    )
        .into_response()
}

/// `POST /api/changes`: the body of a `write` message with a `client_id`;
/// answers with the results (the `write_result` message without its type).
async fn changes(State(ctx): State<Ctx>, headers: HeaderMap, body: Bytes) -> Response {
    let batch: WriteBatch = match serde_json::from_slice(&body) {
        Ok(batch) => batch,
        Err(e) => {
            return refused(
                StatusCode::BAD_REQUEST,
                BatchRefusal::MalformedBatch,
                format!("invalid write: {e}"),
            )
        }
    };
    let Some(client_id) = batch.client_id.clone().filter(|c| valid_id(c)) else {
        return refused(
            StatusCode::BAD_REQUEST,
            BatchRefusal::MalformedBatch,
            "client_id is required: 1-128 characters of letters, digits, '-', '_', '.', ':'",
        );
    };
    if let Err((code, message)) = batch.check() {
        let status = match code {
            BatchRefusal::BatchTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            BatchRefusal::MalformedBatch => StatusCode::BAD_REQUEST,
        };
        return refused(status, code, message);
    }
    // With --auth the writer's token comes as `Authorization: Bearer ...`.
    let principal = match &ctx.state.auth {
        None => None,
        Some(auth) => {
            let token = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            match auth.authenticate(token) {
                Ok(principal) => Some(principal),
                Err(refused) => {
                    ctx.state.audit.record(
                        Action::Refused,
                        Some(&client_id),
                        None,
                        format!("POST /api/changes: {}", refused.reason),
                    );
                    let body = Json(serde_json::json!({
                        "code": if refused.expired { "token_expired" } else { "unauthorized" },
                        "message": format!("token refused: {}", refused.reason),
                    }));
                    return (StatusCode::UNAUTHORIZED, body).into_response();
                }
            }
        }
    };
    let scope = principal
        .as_ref()
        .filter(|_| ctx.state.hub.filtering())
        .map(|p| p.scope.as_ref());
    let schemas = ctx.state.hub.schemas();
    let results = ctx
        .state
        .writer
        .apply(&client_id, &batch, &schemas, scope)
        .await;
    let subject = principal.as_ref().and_then(|p| p.subject.as_deref());
    session::audit_rejections(&ctx.state.audit, &client_id, subject, &results);
    Json(results).into_response()
}
