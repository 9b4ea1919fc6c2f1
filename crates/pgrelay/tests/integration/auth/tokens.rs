//! Bad tokens are refused with a clear error and nothing else is sent,
//! and public keys pin their algorithm.

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use pgrelay_protocol::{ErrorCode, ServerMessage};
use pgrelay_server::{AuthConfig, JwtKey, Server};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::{now, start_server, token, WAIT};
use crate::support::{wait_for, World};

pub(super) const RULES: &str = r#"
default = "deny"
[tables.todos]
read  = "tenant = claims.tenant"
write = "tenant = claims.tenant"
"#;

/// Everything the server sends after a hello with `token`, until it closes;
/// and the close code.
async fn exchange(addr: std::net::SocketAddr, token: Option<&str>) -> (Vec<ServerMessage>, u16) {
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/api/sync"))
        .await
        .unwrap();
    let mut hello = json!({"type": "hello", "protocol_version": 1, "client_id": "probe"});
    if let Some(token) = token {
        hello["token"] = token.into();
    }
    socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let read = async {
        while let Some(message) = socket.next().await {
            match message.unwrap() {
                Message::Text(text) => seen.push(serde_json::from_str(&text).unwrap()),
                Message::Close(frame) => return frame.map_or(0, |f| u16::from(f.code)),
                _ => {}
            }
        }
        0
    };
    let code = tokio::time::timeout(WAIT, read)
        .await
        .expect("the server neither answered nor closed");
    (seen, code)
}

fn b64(value: serde_json::Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_and_nothing_is_sent() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE todos (id int PRIMARY KEY, tenant text NOT NULL, title text)")
        .await;
    let server = start_server(&world, RULES).await;
    world
        .exec("INSERT INTO todos VALUES (1, 't1', 'secret')")
        .await;
    wait_for("the row in the change log", WAIT, || async {
        (world
            .count("SELECT count(*) FROM pgrelay.change_history")
            .await
            == 1)
            .then_some(())
    })
    .await;
    let claims = json!({"tenant": "t1", "sub": "alice", "exp": now() + 600});
    let other_key = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(b"not the server's secret, but long enough"),
    )
    .unwrap();
    let expired = token(json!({"tenant": "t1", "sub": "alice", "exp": now() - 120}));
    let hs512 = encode(
        &Header::new(Algorithm::HS512),
        &claims,
        &EncodingKey::from_secret(super::SECRET),
    )
    .unwrap();
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(claims.clone())
    );
    let not_yet = token(json!({"tenant": "t1", "nbf": now() + 600, "exp": now() + 900}));
    let cases: Vec<(&str, Option<String>, ErrorCode, u16, &str)> = vec![
        (
            "missing",
            None,
            ErrorCode::Unauthorized,
            1008,
            "a token is required",
        ),
        (
            "wrong signature",
            Some(other_key),
            ErrorCode::Unauthorized,
            1008,
            "signature is not valid",
        ),
        (
            "expired",
            Some(expired),
            ErrorCode::TokenExpired,
            4401,
            "token expired",
        ),
        (
            "wrong algorithm",
            Some(hs512),
            ErrorCode::Unauthorized,
            1008,
            "\"HS512\" is not accepted",
        ),
        (
            "alg none",
            Some(none),
            ErrorCode::Unauthorized,
            1008,
            "\"none\" is not accepted",
        ),
        (
            "not yet valid",
            Some(not_yet),
            ErrorCode::Unauthorized,
            1008,
            "not valid yet",
        ),
        (
            "garbage",
            Some("a.b.c".to_owned()),
            ErrorCode::Unauthorized,
            1008,
            "malformed",
        ),
    ];
    for (what, bad, code, close, reason) in &cases {
        let (seen, closed) = exchange(server.local_addr(), bad.as_deref()).await;
        assert_eq!(
            seen.len(),
            1,
            "{what}: the server sent more than its refusal: {seen:?}"
        );
        match &seen[0] {
            ServerMessage::Error { code: got, message } => {
                assert_eq!(got, code, "{what}: {message}");
                assert!(
                    message.contains(reason),
                    "{what}: {message:?} lacks {reason:?}"
                );
            }
            other => panic!("{what}: expected an error, got {other:?}"),
        }
        assert_eq!(closed, *close, "{what}: close code");
    }

    // A good token gets in, and sees only its tables.
    let good = token(json!({"tenant": "t1", "sub": "alice"}));
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/api/sync", server.local_addr()))
            .await
            .unwrap();
    let hello =
        json!({"type": "hello", "protocol_version": 1, "client_id": "alice-1", "token": good});
    socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .unwrap();
    let first = tokio::time::timeout(WAIT, socket.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let welcome: ServerMessage = serde_json::from_str(first.to_text().unwrap()).unwrap();
    assert!(
        matches!(welcome, ServerMessage::Welcome { .. }),
        "{welcome:?}"
    );
    drop(socket);

    // The audit trail has each refusal and the connect, and no token.
    wait_for("the audit entries", WAIT, || async {
        let refused = world
            .count("SELECT count(*) FROM pgrelay.audit_log WHERE action = 'refused' AND client_id = 'probe'")
            .await;
        let connected = world
            .count("SELECT count(*) FROM pgrelay.audit_log WHERE action = 'connect' AND subject = 'alice'")
            .await;
        (refused == cases.len() as i64 && connected == 1).then_some(())
    })
    .await;
    let leaked = world
        .count("SELECT count(*) FROM pgrelay.audit_log WHERE concat(detail, subject, client_id) LIKE '%eyJ%'")
        .await;
    assert_eq!(leaked, 0, "a token reached the audit log");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_keys_pin_their_algorithm() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/integration/fixtures");
    let read = |name: &str| std::fs::read(format!("{fixtures}/{name}")).unwrap();
    let claims = json!({"tenant": "t1", "sub": "bob", "exp": now() + 600});
    let rs256 = encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&read("rsa_private.pem")).unwrap(),
    )
    .unwrap();
    let es256 = encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(&read("ec_private.pem")).unwrap(),
    )
    .unwrap();
    // Algorithm confusion: an HS256 token "signed" with the public key.
    let confused = |public: &[u8]| {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(public),
        )
        .unwrap()
    };
    let world = World::new().await;
    world
        .exec("CREATE TABLE todos (id int PRIMARY KEY, tenant text NOT NULL)")
        .await;
    for (public, good, other) in [
        ("rsa_public.pem", &rs256, &es256),
        ("ec_public.pem", &es256, &rs256),
    ] {
        let mut config = world.server_config();
        let mut auth = AuthConfig::new(JwtKey::PublicKeyPem(read(public)));
        auth.rules = Some(RULES.to_owned());
        config.auth = Some(auth);
        let server = Server::start(config).await.unwrap();
        let spy = super::Spy::connect(server.local_addr(), "good", good, None).await;
        spy.wait_caught_up().await;
        assert!(
            matches!(spy.messages().first(), Some(ServerMessage::Welcome { .. })),
            "{public}: {:?}",
            spy.messages()
        );
        drop(spy);
        for bad in [other.clone(), confused(&read(public))] {
            let (seen, closed) = exchange(server.local_addr(), Some(&bad)).await;
            assert_eq!(seen.len(), 1, "{public}: {seen:?}");
            assert!(
                matches!(&seen[0], ServerMessage::Error { code: ErrorCode::Unauthorized, message } if message.contains("is not accepted")),
                "{public}: {seen:?}"
            );
            assert_eq!(closed, 1008);
        }
        server.shutdown().await.unwrap();
    }
}
