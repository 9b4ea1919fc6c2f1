//! The admin API, behind `--admin-token` (`Authorization: Bearer ...`,
//! compared in constant time): list the registered clients, disconnect
//! one, forget one, and notify one (answered 410 Gone and removed from the
//! registry when it has no live session: the seeds' "gone"). Any node
//! answers for any client: a session on another node is reached through
//! the shared registry ([`crate::registry::relay`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use secrecy::ExposeSecret;
use serde::Serialize;

use crate::registry::relay::Relayed;
use crate::registry::{self, ClientRecord};
use crate::session::table::{now_ms, Signal};
use crate::state::AppState;

pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/admin/clients", get(list))
        .route("/api/admin/node", get(node))
        .route("/api/admin/clients/{id}", delete(forget))
        .route("/api/admin/clients/{id}/disconnect", post(disconnect))
        .route("/api/admin/clients/{id}/notify", post(notify))
        .with_state(state)
}

#[derive(Serialize)]
struct Answer {
    code: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<String>,
}

fn answer(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    (
        status,
        Json(Answer {
            code,
            message: message.into(),
            node: None,
        }),
    )
        .into_response()
}

/// Equal strings, in time that depends on their length only.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

/// [`authorize`], then records the action on `client_id` in the audit log.
#[allow(clippy::result_large_err)] // built once per refused request
fn authorize_action(
    state: &AppState,
    headers: &HeaderMap,
    client_id: &str,
    action: &str,
) -> Result<(), Response> {
    authorize(state, headers)?;
    state.audit.record(
        crate::auth::Action::Admin,
        Some(client_id),
        None,
        format!("admin: {action}"),
    );
    Ok(())
}

/// `Err` holds the refusal to answer with.
#[allow(clippy::result_large_err)] // built once per refused request
pub(crate) fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), Response> {
    let Some(expected) = state.config.admin_token.as_ref().map(|t| t.expose_secret()) else {
        return Err(answer(
            StatusCode::NOT_FOUND,
            "admin_disabled",
            "the admin API is off; start the server with --admin-token",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        state.audit.record(
            crate::auth::Action::Refused,
            None,
            None,
            "admin API: missing or wrong admin token",
        );
        Err(answer(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong admin token (Authorization: Bearer <token>)",
        ))
    }
}

fn registry_failed(_state: &AppState, e: registry::RegistryError) -> Response {
    // Counted by the registry's health (`pgrelay_registry_errors_total`).
    answer(
        StatusCode::SERVICE_UNAVAILABLE,
        "registry_unavailable",
        e.to_string(),
    )
}

#[derive(Serialize)]
struct ClientRow {
    client_id: String,
    /// Whether a session serves it now (on this node, or registered by
    /// another node that keeps its record fresh).
    connected: bool,
    node: String,
    connected_at_ms: u64,
    lsn: String,
    /// WAL bytes between the newest transaction and the client's position.
    lag_bytes: u64,
    last_seen_ms: u64,
    last_seen_seconds_ago: f64,
    /// Its client migrations (`pgrelay migrate`).
    #[serde(flatten)]
    schema: super::migrations::ClientSchema,
}

/// `GET /api/admin/clients`: the registry, with this node's live sessions
/// filling in their current position and activity.
async fn list(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(refused) = authorize(&state, &headers) {
        return refused;
    }
    let records = match state.registry.list().await {
        Ok(records) => records,
        Err(e) => return registry_failed(&state, e),
    };
    let mut rows: BTreeMap<String, ClientRecord> = records
        .into_iter()
        .map(|r| (r.client_id.clone(), r))
        .collect();
    for session in state.sessions.all() {
        rows.insert(
            session.client_id.clone(),
            registry::record(&state.node, &state.instance, &session),
        );
    }
    let head = state.hub.head();
    let now = now_ms();
    let mut schemas = super::migrations::by_client(&state).await;
    let rows: Vec<ClientRow> = rows
        .into_values()
        .map(|r| ClientRow {
            connected: r.node != state.node || state.sessions.get(&r.client_id).is_some(),
            lag_bytes: head.0.saturating_sub(r.last_lsn.0),
            lsn: r.last_lsn.to_string(),
            last_seen_seconds_ago: std::time::Duration::from_millis(
                now.saturating_sub(r.last_activity_ms),
            )
            .as_secs_f64(),
            last_seen_ms: r.last_activity_ms,
            connected_at_ms: r.connected_at_ms,
            schema: schemas.remove(&r.client_id).unwrap_or_default(),
            node: r.node,
            client_id: r.client_id,
        })
        .collect();
    Json(rows).into_response()
}

/// `GET /api/admin/node`: this node's role (capturing or following), who
/// holds the slot, the capture term and how far this node is behind the
/// change log.
async fn node(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(refused) = authorize(&state, &headers) {
        return refused;
    }
    let report = state.replication.report();
    Json(serde_json::json!({
        "node": state.node,
        "instance": state.instance,
        "role": report.role,
        "capturer": report.capturer,
        "term": report.term,
        "stand_downs": report.stand_downs,
        "head_lsn": state.hub.head().to_string(),
        "log_lag_bytes": state.replication.log_head().0.saturating_sub(state.hub.head().0),
        "sessions": state.sessions.len(),
        "registry": state.registry.health(),
    }))
    .into_response()
}

/// `POST /api/admin/clients/{id}/disconnect`: closes the client's session
/// on this node with `disconnected`; the client may come back.
async fn disconnect(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = authorize_action(&state, &headers, &id, "disconnect") {
        return refused;
    }
    if let Some(session) = state.sessions.get(&id) {
        session.signal(Signal::Disconnect);
        return answer(
            StatusCode::OK,
            "disconnected",
            format!("closing {id}'s session"),
        );
    }
    match state.registry.get(&id).await {
        Ok(Some(record))
            if record.node != state.node || record.session_elsewhere(&state.instance) =>
        {
            match state.registry.relay(&record, Relayed::Disconnect).await {
                Ok(true) => relayed(
                    StatusCode::OK,
                    "disconnected",
                    format!("closing {id}'s session on node {}", record.node),
                    record.node,
                ),
                Ok(false) => gone(&state, &id, &record).await,
                Err(e) => registry_failed(&state, e),
            }
        }
        Ok(_) => answer(
            StatusCode::NOT_FOUND,
            "unknown_client",
            format!("{id} has no live session"),
        ),
        Err(e) => registry_failed(&state, e),
    }
}

/// `DELETE /api/admin/clients/{id}`: removes the client's registration and
/// closes its session here, if any.
async fn forget(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = authorize_action(&state, &headers, &id, "forget") {
        return refused;
    }
    let live = state.sessions.get(&id);
    // Registered when this call began: the other node may remove the
    // record itself as it closes the session, before `forget` below.
    let mut registered = false;
    if let Some(session) = &live {
        session.signal(Signal::Disconnect);
    } else if let Ok(Some(record)) = state.registry.get(&id).await {
        registered = true;
        // Its session is on another node: closed there (if that node is
        // gone, there is nothing to close).
        if let Err(e) = state.registry.relay(&record, Relayed::Disconnect).await {
            return registry_failed(&state, e);
        }
    }
    match state.registry.forget(&id).await {
        Ok(found) if found || registered || live.is_some() => {
            tracing::info!(client_id = %id, "client forgotten");
            answer(
                StatusCode::OK,
                "forgotten",
                format!("{id} is no longer registered"),
            )
        }
        Ok(_) => answer(
            StatusCode::NOT_FOUND,
            "unknown_client",
            format!("{id} is not registered"),
        ),
        Err(e) => registry_failed(&state, e),
    }
}

/// `POST /api/admin/clients/{id}/notify`: tells the client's session to
/// read the change log now. A client with no live session is gone: its
/// registration is removed and the answer is 410.
async fn notify(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = authorize_action(&state, &headers, &id, "notify") {
        return refused;
    }
    if let Some(session) = state.sessions.get(&id) {
        session.signal(Signal::Nudge);
        return answer(
            StatusCode::ACCEPTED,
            "notified",
            format!("{id}'s session reads the change log"),
        );
    }
    let record = match state.registry.get(&id).await {
        Ok(record) => record,
        Err(e) => return registry_failed(&state, e),
    };
    match record {
        Some(record) if record.node != state.node || record.session_elsewhere(&state.instance) => {
            match state.registry.relay(&record, Relayed::Nudge).await {
                Ok(true) => relayed(
                    StatusCode::ACCEPTED,
                    "notified",
                    format!(
                        "{id}'s session on node {} reads the change log",
                        record.node
                    ),
                    record.node,
                ),
                Ok(false) => gone(&state, &id, &record).await,
                Err(e) => registry_failed(&state, e),
            }
        }
        // Registered here without a session (a crash before it could
        // unregister), or not at all.
        Some(record) => gone(&state, &id, &record).await,
        None => gone_unregistered(&id),
    }
}

/// The client's record names a session no node serves: it is removed
/// from the registry and the answer is 410 Gone.
async fn gone(state: &AppState, id: &str, record: &ClientRecord) -> Response {
    if let Err(e) = state.registry.unregister(id, &record.session).await {
        return registry_failed(state, e);
    }
    tracing::info!(client_id = %id, node = %record.node, "a client with no live session: gone, removed from the registry");
    gone_unregistered(id)
}

fn gone_unregistered(id: &str) -> Response {
    answer(
        StatusCode::GONE,
        "gone",
        format!("{id} has no live session; removed from the registry"),
    )
}

/// Done through the node that serves the client's session.
fn relayed(status: StatusCode, code: &'static str, message: String, node: String) -> Response {
    (
        status,
        Json(Answer {
            code,
            message,
            node: Some(node),
        }),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret-token-123", b"secret-token-123"));
        assert!(!constant_time_eq(b"secret-token-123", b"secret-token-124"));
        assert!(!constant_time_eq(b"secret", b"secret-token-123"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
