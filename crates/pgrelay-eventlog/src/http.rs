//! The backend's HTTP side: the two WebSocket endpoints and the HTTP
//! transport (checked before anything is served: the host's connect rate,
//! `storeId`, `payload`, the host's access rule) and the store admin API.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, Path, Query, State, WebSocketUpgrade};
use axum::http::{header, Extensions, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::access::AccessRefusal;
use super::admin::AdminCheck;
use super::conn::{self, Conn};
use super::rpc::Rpc;
use super::store::StoreHandle;
use super::wsmessage::WsMessage;
use super::{EventLog, OpenRefusal};

/// Largest client frame read: LiveStore splits pushes at 900 kB.
const MAX_FRAME_BYTES: usize = 4 << 20;
const MAX_STORE_ID_BYTES: usize = 256;

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

#[derive(Clone, Copy)]
pub(crate) enum Version {
    V04,
    V03,
    /// 0.4 over plain HTTP requests (`transport=http`).
    Http,
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

pub(crate) fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], body.into()).into_response()
}

/// A refusal as the row sync words it (`{code, message}`), closing the connection.
fn refusal(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        [(header::CONNECTION, "close")],
        Json(serde_json::json!({ "code": code, "message": message })),
    )
        .into_response()
}

/// The checks every sync request passes before it is served: the host's
/// connect rate for the client's address, then the store's access rule
/// and the store itself (loaded or created). `Err` is the answer instead.
pub(crate) async fn admit(
    log: &EventLog,
    request: &Extensions,
    params: &SyncParams,
) -> Result<StoreHandle, Response> {
    // The host puts the client's address there (axum's `ConnectInfo`).
    if let Some(ConnectInfo(peer)) = request.get::<ConnectInfo<SocketAddr>>() {
        if let Err(message) = log.admission().connect(peer.ip()) {
            return Err(refusal(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                message,
            ));
        }
    }
    match log
        .open_for_client(&params.store_id, params.payload.as_ref())
        .await
    {
        Ok(store) => Ok(store),
        Err(OpenRefusal::Access(AccessRefusal::Unauthorized(why))) => Err(text(
            StatusCode::UNAUTHORIZED,
            format!("LiveStore sync refused: {why}"),
        )),
        Err(OpenRefusal::Access(AccessRefusal::Forbidden(why))) => Err(text(
            StatusCode::FORBIDDEN,
            format!("LiveStore sync refused: {why}"),
        )),
        Err(OpenRefusal::Full(max)) => Err(refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_stores",
            format!(
                "the server holds its limit of {max} stores in memory, all in use (--eventlog-max-stores); retry with backoff"
            ),
        )),
        Err(OpenRefusal::Failed(e)) => {
            tracing::error!(store = %params.store_id, error = %e, "opening a store failed");
            Err(text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("opening the store failed: {e}"),
            ))
        }
    }
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

/// The query of a sync request, as `makeWsSync` and `makeHttpSync` build it.
#[derive(Debug)]
pub(crate) struct SyncParams {
    pub(crate) store_id: String,
    pub(crate) payload: Option<serde_json::Value>,
}

impl SyncParams {
    pub(crate) fn parse(
        query: &HashMap<String, String>,
        version: Version,
    ) -> Result<SyncParams, String> {
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
        match (version, query.get("transport").map(String::as_str)) {
            (Version::V04, Some(transport)) if transport != "ws" => {
                return Err(format!(
                    "transport={transport:?} on a WebSocket: use transport=ws (or POST for transport=http)"
                ))
            }
            (Version::Http, Some(transport)) if transport != "http" => {
                return Err(format!(
                    "transport={transport:?} in a POST: the HTTP transport is transport=http"
                ))
            }
            _ => {}
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
        assert!(SyncParams::parse(&http, Version::Http).is_ok());
        let ws = query(&[("storeId", "s"), ("transport", "ws")]);
        assert!(SyncParams::parse(&ws, Version::Http).is_err());
    }
}
