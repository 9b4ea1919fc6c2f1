//! The backend's HTTP side: the two WebSocket endpoints (checked before the
//! upgrade: `storeId`, `payload`, optional token) and the store admin API.

use std::collections::HashMap;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Path, Query, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::admin::{secret_matches, AdminCheck};
use super::conn::{self, Conn};
use super::rpc::Rpc;
use super::wsmessage::WsMessage;
use super::EventLog;

/// Largest client frame read: LiveStore splits pushes at 900 kB.
const MAX_FRAME_BYTES: usize = 4 << 20;
const MAX_STORE_ID_BYTES: usize = 256;

pub(crate) fn router(log: EventLog) -> Router {
    Router::new()
        .route("/livestore", get(livestore))
        .route("/websocket", get(websocket))
        .route("/admin/stores/{store_id}", get(admin_info))
        .route("/admin/stores/{store_id}/reset", post(admin_reset))
        .with_state(log)
}

#[derive(Clone, Copy)]
enum Version {
    V04,
    V03,
}

async fn livestore(
    State(log): State<EventLog>,
    Query(query): Query<HashMap<String, String>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    accept(log, query, upgrade, Version::V04).await
}

async fn websocket(
    State(log): State<EventLog>,
    Query(query): Query<HashMap<String, String>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    accept(log, query, upgrade, Version::V03).await
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], body.into()).into_response()
}

async fn accept(
    log: EventLog,
    query: HashMap<String, String>,
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
             Point a LiveStore client at it with makeWsSync({ url: 'ws://HOST:PORT/livestore' }).",
        );
    };
    if let Some(expected) = log.auth_token() {
        let given = params
            .payload
            .as_ref()
            .and_then(|p| p.get("authToken"))
            .and_then(|t| t.as_str());
        match given {
            None => return text(
                StatusCode::UNAUTHORIZED,
                "LiveStore sync refused: this server needs a token, give it as payload.authToken",
            ),
            Some(given) if !secret_matches(given, expected) => {
                return text(
                    StatusCode::FORBIDDEN,
                    "LiveStore sync refused: payload.authToken is not this server's token",
                )
            }
            Some(_) => {}
        }
    }
    let store = match log.store(&params.store_id).await {
        Ok(store) => store,
        Err(e) => {
            tracing::error!(store = %params.store_id, error = %e, "opening a store failed");
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("opening the store failed: {e}"),
            );
        }
    };
    upgrade
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| async move {
            let conn = Conn::new(socket, log, store);
            match version {
                Version::V04 => conn::run(conn, Rpc).await,
                Version::V03 => conn::run(conn, WsMessage).await,
            }
        })
}

/// The query of a sync socket, as `makeWsSync` builds it.
#[derive(Debug)]
struct SyncParams {
    store_id: String,
    payload: Option<serde_json::Value>,
}

impl SyncParams {
    fn parse(query: &HashMap<String, String>, version: Version) -> Result<SyncParams, String> {
        let store_id = query
            .get("storeId")
            .ok_or("the storeId query parameter is required")?;
        if store_id.is_empty()
            || store_id.len() > MAX_STORE_ID_BYTES
            || store_id.chars().any(char::is_control)
        {
            return Err(format!(
                "invalid storeId: 1-{MAX_STORE_ID_BYTES} bytes without control characters"
            ));
        }
        if let (Version::V04, Some(transport)) = (version, query.get("transport")) {
            if transport != "ws" {
                return Err(format!(
                    "transport={transport:?} is not served here: use the WebSocket transport (transport=ws)"
                ));
            }
        }
        // makeWsSync encodes the payload with encodeURIComponent and then
        // again as a query value; Query undid the second.
        let payload = match query.get("payload") {
            None => None,
            Some(encoded) => {
                let json = percent_encoding::percent_decode_str(encoded)
                    .decode_utf8()
                    .map_err(|_| "invalid payload: not URI-encoded UTF-8".to_owned())?;
                Some(
                    serde_json::from_str::<serde_json::Value>(&json)
                        .map_err(|e| format!("invalid payload: not JSON ({e})"))?,
                )
            }
        };
        Ok(SyncParams {
            store_id: store_id.clone(),
            payload,
        })
    }
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
        Ok(store) => store.info().await,
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
        Ok(store) => store.reset().await,
        Err(e) => Err(e),
    };
    match info {
        Ok(info) => Json(info).into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_payload_is_decoded_twice_as_makewssync_encodes_it() {
        let q = query(&[
            ("storeId", "s1"),
            ("payload", "%7B%22authToken%22%3A%22t%22%7D"),
            ("transport", "ws"),
        ]);
        let params = SyncParams::parse(&q, Version::V04).unwrap();
        assert_eq!(params.payload.unwrap()["authToken"], "t");
    }

    #[test]
    fn bad_store_ids_payloads_and_transports_are_refused() {
        assert!(SyncParams::parse(&query(&[]), Version::V04).is_err());
        assert!(SyncParams::parse(&query(&[("storeId", "")]), Version::V04).is_err());
        assert!(SyncParams::parse(&query(&[("storeId", "a\nb")]), Version::V04).is_err());
        let bad_payload = query(&[("storeId", "s"), ("payload", "%7Bnot-json")]);
        assert!(SyncParams::parse(&bad_payload, Version::V04).is_err());
        let http = query(&[("storeId", "s"), ("transport", "http")]);
        assert!(SyncParams::parse(&http, Version::V04).is_err());
        assert!(SyncParams::parse(&http, Version::V03).is_ok());
    }
}
