//! The event-log endpoints under `--auth jwt`: a client's sync payload
//! carries a token the server's JWT settings accept, whose store claim
//! names the store; serving without auth only when the operator asks.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, EncodingKey, Header};
use pgrelay::cmd::eventlog_host::EventLogAuth;
use pgrelay_server::{AuthConfig, JwtKey};
use serde_json::{json, Value};

use super::client::{config, http_url, start, sync_url, upgrade};

const SECRET: &[u8] = b"livestore-jwt-secret-for-tests-0123456789";

fn token(claims: Value, secret: &[u8]) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn exp() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600
}

fn payload(token: &str) -> String {
    json!({ "authToken": token }).to_string()
}

#[tokio::test]
async fn under_jwt_auth_a_token_must_name_the_store_it_uses() {
    let mut cfg = config();
    cfg.server.auth = Some(AuthConfig::new(JwtKey::Secret(SECRET.to_vec())));
    let server = start(cfg).await;
    let addr = server.local_addr();
    let alice = token(
        json!({"sub": "alice", "exp": exp(), "livestore_stores": ["alice-*", "shared"]}),
        SECRET,
    );
    for path in ["/livestore", "/websocket"] {
        let (status, body) = upgrade(&sync_url(addr, path, "alice-todos", None)).await;
        assert_eq!(status, 401, "no payload on {path}: {body}");
        assert!(body.contains("payload.authToken"), "{body}");
        let forged = token(
            json!({"exp": exp(), "livestore_stores": "*"}),
            b"not-the-servers-secret-0123456789abcdef",
        );
        let (status, body) = upgrade(&sync_url(
            addr,
            path,
            "alice-todos",
            Some(&payload(&forged)),
        ))
        .await;
        assert_eq!(status, 401, "forged token on {path}: {body}");
        assert!(body.contains("signature"), "{body}");
        let (status, body) =
            upgrade(&sync_url(addr, path, "bob-todos", Some(&payload(&alice)))).await;
        assert_eq!(status, 403, "another's store on {path}: {body}");
        assert!(body.contains("does not allow store"), "{body}");
        let no_claim = token(json!({"sub": "x", "exp": exp()}), SECRET);
        let (status, body) = upgrade(&sync_url(
            addr,
            path,
            "alice-todos",
            Some(&payload(&no_claim)),
        ))
        .await;
        assert_eq!(status, 403, "no store claim on {path}: {body}");
        for store in ["alice-todos", "shared"] {
            let (status, body) =
                upgrade(&sync_url(addr, path, store, Some(&payload(&alice)))).await;
            assert_eq!(status, 101, "{store} on {path}: {body}");
        }
    }
    // The HTTP transport is checked the same way.
    let http = reqwest::Client::new();
    let url =
        |store: &str, token: Option<&str>| http_url(addr, store, token.map(payload).as_deref());
    let ping = json!({"_tag": "Request", "id": "0", "tag": "SyncHttpRpc.Ping",
        "payload": {"storeId": "alice-todos"}, "headers": []});
    let refused = http
        .post(url("alice-todos", None))
        .body(ping.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    let allowed = http
        .post(url("alice-todos", Some(&alice)))
        .body(ping.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status().as_u16(), 200);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn under_jwt_auth_the_event_log_is_open_only_when_the_operator_asks() {
    let mut cfg = config();
    cfg.server.auth = Some(AuthConfig::new(JwtKey::Secret(SECRET.to_vec())));
    cfg.eventlog_auth = Some(EventLogAuth::None);
    let server = start(cfg).await;
    let (status, body) = upgrade(&sync_url(server.local_addr(), "/livestore", "any", None)).await;
    assert_eq!(status, 101, "{body}");
    server.shutdown().await.unwrap();
}
