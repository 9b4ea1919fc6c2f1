//! HTTP routes: the sync WebSocket, client writes, health, readiness,
//! metrics and status (the admin API is in `ops::admin`); the accept loop
//! and connection limits (`serve`), what an untrusted connection may send
//! (`prelogin`) and per-address rate limits (`ratelimit`).

pub(crate) mod prelogin;
pub(crate) mod ratelimit;
pub(crate) mod serve;
pub(crate) mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Extension, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pgrelay_protocol::{
    valid_id, BatchRefusal, WriteBatch, MAX_CLIENT_FRAME_BYTES, MAX_TRANSACTION_BYTES,
};
use serde::Serialize;
use tokio::sync::watch;

use crate::auth::Action;
use crate::ops::metrics::add;
use crate::session;
use crate::state::AppState;

/// Readiness fails when replication has heard nothing from PostgreSQL for
/// this long (keepalives arrive at least every wal_sender_timeout / 2).
const STALL_AFTER: Duration = Duration::from_secs(120);

/// Initial read buffer per WebSocket, and what it reads at a time: a
/// hello without a token fits (it grows for larger frames); the socket
/// below reads ahead while a large frame streams in (`prelogin::Metered`).
const READ_BUFFER_BYTES: usize = 256;

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
            // HTTP has no frames: a body may be as large as the largest
            // transaction a WebSocket client may send in parts.
            post(changes).layer(DefaultBodyLimit::max(MAX_TRANSACTION_BYTES)),
        )
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .with_state(Ctx {
            state: Arc::clone(&state),
            shutdown,
        })
        .merge(crate::ops::admin::router(Arc::clone(&state)))
        .merge(crate::ops::migrations::router(state))
}

/// A refusal before the WebSocket upgrade, as JSON.
#[derive(Serialize)]
struct HttpError {
    code: &'static str,
    message: String,
}

/// The connection is closed after a refusal: kept alive, it would cost
/// memory and a file descriptor for nothing, and answer whatever came next.
fn http_error(status: StatusCode, code: &'static str, message: String) -> Response {
    (
        status,
        [(header::CONNECTION, "close")],
        Json(HttpError { code, message }),
    )
        .into_response()
}

/// `/api/sync`: refusals (rate limit, shutdown) are answered before the
/// upgrade; an accepted session keeps its connection's place under
/// `--max-connections` (the accept loop refuses connections past it).
async fn sync(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(place): Extension<crate::api::serve::ConnectionPlace>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let state = &ctx.state;
    if !state.connect_limiter.allow(peer.ip()) {
        add(&state.metrics.rate_limited_connects, 1);
        return http_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "more than {} connection attempts a second from {} (burst {}); retry with backoff",
                state.config.connect_rate,
                peer.ip(),
                state.config.connect_burst
            ),
        );
    }
    if *ctx.shutdown.borrow() {
        return http_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down; reconnect to another node or retry".to_owned(),
        );
    }
    // Frames a little over the protocol limit are still read, so the client
    // gets a clear `frame_too_large` error rather than a bare reset.
    upgrade
        // The default 128 KiB read buffer is allocated and touched per
        // connection; clients send small frames, so a small one keeps idle
        // connections cheap (it grows for the rare large frame).
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(MAX_CLIENT_FRAME_BYTES * 4)
        .max_frame_size(MAX_CLIENT_FRAME_BYTES * 4)
        .on_upgrade(move |socket| session::run(socket, ctx.state, ctx.shutdown, place))
}

#[derive(Serialize)]
struct Status {
    head_lsn: String,
    sessions: usize,
    replication: crate::replication::status::StatusReport,
    tables: Vec<pgrelay_protocol::TableSchema>,
}

/// Under `--auth` the status names every table and column, those the rules
/// hide included: only the admin token may read it then.
async fn status(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    let state = &ctx.state;
    if state.auth.is_some() {
        if let Err(refusal) = crate::ops::admin::authorize(state, &headers) {
            return refusal;
        }
    }
    Json(Status {
        head_lsn: state.hub.head().to_string(),
        sessions: state.sessions.len(),
        replication: state.replication.report(),
        tables: state.hub.schemas().values().cloned().collect(),
    })
    .into_response()
}

/// Liveness: the process serves HTTP. What replication is doing is in the
/// body, and decides `/ready`.
async fn health(State(ctx): State<Ctx>) -> Response {
    (StatusCode::OK, Json(ctx.state.replication.report())).into_response()
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    /// Why not, when not.
    reasons: Vec<String>,
    replication: crate::replication::status::StatusReport,
    lag: crate::replication::lag::LagReport,
    /// WAL bytes between the change log's newest transaction and the
    /// newest this node published (a following node's lag).
    log_lag_bytes: u64,
    /// The client registry's backend; its failures are shown here but do
    /// not make the node unready (sessions go on without it).
    registry: crate::registry::health::HealthReport,
}

/// Readiness: replication connected and hearing from PostgreSQL, not
/// stalled, lag under `--ready-max-lag`, no new change log under way after
/// a lost slot, and not shutting down.
async fn ready(State(ctx): State<Ctx>) -> Response {
    let state = &ctx.state;
    let config = &state.config;
    let replication = state.replication.report();
    let lag = state.lag.report();
    let mut reasons = Vec::new();
    if *ctx.shutdown.borrow() {
        reasons.push("shutting down".to_owned());
    }
    if let Some(why) = state.replication.new_epoch() {
        reasons.push(why);
    }
    if let Some(why) = state.replication.lost_database() {
        reasons.push(format!(
            "PostgreSQL is unreachable from this node ({why}); writes are refused"
        ));
    } else if !replication.connected {
        let why = replication
            .last_error
            .as_deref()
            .unwrap_or("not yet connected");
        reasons.push(format!("replication is not connected: {why}"));
    } else if !state.replication.is_healthy(STALL_AFTER) {
        reasons.push(format!(
            "nothing heard from PostgreSQL for {:.0} s",
            replication.seconds_since_last_event
        ));
    }
    if lag.stalled {
        reasons.push(format!(
            "replication stalled: PostgreSQL's WAL is at {} and the slot's confirmed position stays at {}",
            lag.wal_lsn, lag.confirmed_lsn
        ));
    }
    if lag.lag_seconds > config.ready_max_lag.as_secs_f64() {
        reasons.push(format!(
            "replication lags {:.0} s ({} bytes), over --ready-max-lag {:?}",
            lag.lag_seconds, lag.lag_bytes, config.ready_max_lag
        ));
    }
    let fresh = (config.monitor_interval * 3).max(Duration::from_secs(30));
    match lag.measured_seconds_ago {
        Some(ago) if ago <= fresh.as_secs_f64() => {}
        _ => reasons.push(format!(
            "replication lag not measured recently: {}",
            lag.error.as_deref().unwrap_or("no measurement yet")
        )),
    }
    let ready = reasons.is_empty();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        ready,
        reasons,
        replication,
        lag,
        log_lag_bytes: state
            .replication
            .log_head()
            .0
            .saturating_sub(state.hub.head().0),
        registry: state.registry.health(),
    };
    (code, Json(body)).into_response()
}

async fn metrics(State(ctx): State<Ctx>) -> Response {
    (
        [(header::CONTENT_TYPE, crate::ops::exposition::CONTENT_TYPE)],
        crate::ops::exposition::render(&ctx.state),
    )
        .into_response()
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
/// Rate-limited per address like `/api/sync` (at `--connect-rate`, its own
/// buckets), before
/// the token is checked: refused tokens cost an audit row each.
async fn changes(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let state = &ctx.state;
    if !state.write_limiter.allow(peer.ip()) {
        add(&state.metrics.rate_limited_connects, 1);
        return http_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "more than {} requests a second from {} (burst {}); retry with backoff",
                state.config.connect_rate,
                peer.ip(),
                state.config.connect_burst
            ),
        );
    }
    let response = apply_changes(&ctx.state, &headers, body).await;
    if response.status() != StatusCode::OK {
        add(&ctx.state.metrics.batches_refused, 1);
    }
    response
}

async fn apply_changes(state: &AppState, headers: &HeaderMap, body: Bytes) -> Response {
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
    let principal = match &state.auth {
        None => None,
        Some(auth) => {
            let token = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            match auth.authenticate(token) {
                Ok(principal) => Some(principal),
                Err(refused) => {
                    state.audit.record(
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
    if let Some(principal) = &principal {
        if let Err(refusal) = session::claim(state, &client_id, principal).await {
            let status = match refusal.code {
                pgrelay_protocol::ErrorCode::Unauthorized => StatusCode::FORBIDDEN,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            let code = if status == StatusCode::FORBIDDEN {
                "forbidden"
            } else {
                "retry"
            };
            let body = Json(serde_json::json!({"code": code, "message": refusal.message}));
            return (status, body).into_response();
        }
    }
    let scope = principal
        .as_ref()
        .filter(|_| state.hub.filtering())
        .map(|p| p.scope.as_ref());
    if let Some(why) = state.replication.lost_database() {
        let results = crate::writes::Writer::unreachable(&batch, &why);
        return (StatusCode::SERVICE_UNAVAILABLE, Json(results)).into_response();
    }
    let schemas = state.hub.schemas();
    let results = state
        .writer
        .apply(
            crate::writes::Author {
                client_id: &client_id,
                subject: principal.as_ref().and_then(|p| p.owner.as_deref()),
            },
            &batch,
            &schemas,
            scope,
        )
        .await;
    let subject = principal.as_ref().and_then(|p| p.subject.as_deref());
    session::audit_rejections(&state.audit, &client_id, subject, &results);
    state.metrics.record_results(&results);
    Json(results).into_response()
}
