//! The checks every sync request passes before it is served, over a
//! WebSocket or the HTTP transport: the query (`storeId`, `payload`,
//! `transport`), the host's connect rate, and the host's access rule.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use axum::http::{header, Extensions, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::access::AccessRefusal;
use super::store::StoreHandle;
use super::{EventLog, OpenRefusal};

const MAX_STORE_ID_BYTES: usize = 256;

#[derive(Clone, Copy)]
pub(crate) enum Version {
    V04,
    V03,
    /// 0.4 over plain HTTP requests (`transport=http`).
    Http,
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
