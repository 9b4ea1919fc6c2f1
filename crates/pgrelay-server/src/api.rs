//! HTTP routes: the sync WebSocket, health and status.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use pgrelay_protocol::MAX_CLIENT_FRAME_BYTES;
use serde::Serialize;
use tokio::sync::watch;

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
