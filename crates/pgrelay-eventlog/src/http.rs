//! The backend's HTTP side: the routes of the two WebSocket endpoints, the
//! HTTP transport ([`super::httprpc`]) and the store admin API; every sync
//! request passes [`super::admission`] first.

use std::collections::HashMap;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Path, Query, State, WebSocketUpgrade};
use axum::http::{header, Extensions, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::admin::AdminCheck;
use super::admission::{admit, text, SyncParams, Version};
use super::conn::{self, Conn};
use super::rpc::Rpc;
use super::wsmessage::WsMessage;
use super::EventLog;

/// What a socket reads at a time (its buffer grows for larger frames).
/// tungstenite zero-fills the whole read buffer before every read, and a
/// socket is polled for reading each time it sends a live batch: with the
/// default 128 KiB that was 12.8 MB of zeroes per push to 100
/// subscribers, a sixth of the server's CPU.
const READ_BUFFER_BYTES: usize = 16 * 1024;

/// Largest client frame read: LiveStore splits pushes at 900 kB.
const MAX_FRAME_BYTES: usize = 4 << 20;

pub(crate) fn router(log: EventLog) -> Router {
    Router::new()
        .route(
            "/livestore",
            get(livestore)
                .post(super::httprpc::serve)
                .layer(axum::extract::DefaultBodyLimit::max(
                    super::httprpc::MAX_REQUEST_BYTES,
                )),
        )
        .route("/websocket", get(websocket))
        .route("/admin/stores/{store_id}", get(admin_info))
        .route("/admin/stores/{store_id}/reset", post(admin_reset))
        .with_state(log)
}

async fn livestore(
    State(log): State<EventLog>,
    Query(query): Query<HashMap<String, String>>,
    request: Extensions,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    accept(log, query, request, upgrade, Version::V04).await
}

async fn websocket(
    State(log): State<EventLog>,
    Query(query): Query<HashMap<String, String>>,
    request: Extensions,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    accept(log, query, request, upgrade, Version::V03).await
}

async fn accept(
    log: EventLog,
    query: HashMap<String, String>,
    request: Extensions,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    version: Version,
) -> Response {
    let params = if query.is_empty() && upgrade.is_err() {
        None
    } else {
        match SyncParams::parse(&query, version) {
            Ok(params) => Some(params),
            Err(message) => return text(StatusCode::BAD_REQUEST, message),
        }
    };
    let (Ok(upgrade), Some(params)) = (upgrade, params) else {
        return text(
            StatusCode::OK,
            "Info: pgrelay LiveStore sync backend (@livestore/sync-cf protocol 0.4 at /livestore, 0.3 at /websocket). \
             Point a LiveStore client at it with makeWsSync({ url: 'ws://HOST:PORT/livestore' }) \
             or makeHttpSync({ url: 'http://HOST:PORT/livestore' }).",
        );
    };
    let store = match admit(&log, &request, &params).await {
        Ok(store) => store,
        Err(refused) => return refused,
    };
    upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| async move {
            let mut conn = Conn::new(socket, log, store, request);
            match version {
                Version::V04 | Version::Http => conn::run(conn, Rpc).await,
                Version::V03 => {
                    if let Some(protocol) = WsMessage::connect(&mut conn).await {
                        conn::run(conn, protocol).await;
                    }
                }
            }
        })
}

fn admin_refusal(log: &EventLog, headers: &HeaderMap) -> Option<Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match log.admin().check(given) {
        AdminCheck::Allowed => None,
        AdminCheck::Off => Some(text(
            StatusCode::NOT_FOUND,
            "the admin API is off: start pgrelay serve with --admin-token",
        )),
        AdminCheck::Refused => Some(text(
            StatusCode::UNAUTHORIZED,
            "a valid admin token is required",
        )),
    }
}

async fn admin_info(
    State(log): State<EventLog>,
    Path(store_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refusal) = admin_refusal(&log, &headers) {
        return refusal;
    }
    let info = match log.store(&store_id).await {
        Ok(Ok(store)) => store.info().await,
        Ok(Err(full)) => return admin_full(full),
        Err(e) => Err(e),
    };
    match info {
        Ok(info) => Json(info).into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn admin_reset(
    State(log): State<EventLog>,
    Path(store_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refusal) = admin_refusal(&log, &headers) {
        return refusal;
    }
    let info = match log.store(&store_id).await {
        Ok(Ok(store)) => store.reset().await,
        Ok(Err(full)) => return admin_full(full),
        Err(e) => Err(e),
    };
    match info {
        Ok(info) => Json(info).into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn admin_full(full: super::registry::Full) -> Response {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "the server holds its limit of {} stores in memory, all in use",
            full.0
        ),
    )
}
