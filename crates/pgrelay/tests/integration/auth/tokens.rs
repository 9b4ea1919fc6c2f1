//! Bad tokens are refused with a clear error and nothing else is sent; a
//! token that expires mid-session ends the session at expiry, and the
//! client reconnects with a fresh token without losing anything.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use pgrelay_client::{Event, TokenProvider};
use pgrelay_protocol::{ErrorCode, ServerMessage};
use pgrelay_server::{AuthConfig, JwtKey, Server};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::{now, replica_rows, start_client, start_server, token, WAIT};
use crate::support::{wait_for, World};

const RULES: &str = r#"
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
            ServerMessage::Error {
                code: got, message, ..
            } => {
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
                matches!(&seen[0], ServerMessage::Error { code: ErrorCode::Unauthorized, message, .. } if message.contains("is not accepted")),
                "{public}: {seen:?}"
            );
            assert_eq!(closed, 1008);
        }
        server.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_token_ends_the_session_and_a_fresh_one_resumes_it() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE todos (id int PRIMARY KEY, tenant text NOT NULL, title text)")
        .await;
    let server = start_server(&world, RULES).await;
    let lifetime = 4;
    let current = Arc::new(Mutex::new(token(
        json!({"tenant": "t1", "sub": "carol", "exp": now() + lifetime}),
    )));
    let provided = Arc::clone(&current);
    let provider = TokenProvider::new(move || {
        let token = provided.lock().unwrap().clone();
        async move { Ok(token) }
    });
    let path = world.replica_path("carol");
    let client = start_client(server.local_addr(), &path, "carol-1", provider).await;
    let mut events = client.client.subscribe();
    let connected_at = Instant::now();
    world
        .exec("INSERT INTO todos VALUES (1, 't1', 'one'), (2, 't2', 'hidden')")
        .await;
    wait_for("row 1 in the replica", WAIT, || async {
        replica_rows(&path, "todos").contains_key(&1).then_some(())
    })
    .await;
    // The provider has a fresh token from now on; the session still runs
    // on the old one, until it expires.
    *current.lock().unwrap() = token(json!({"tenant": "t1", "sub": "carol"}));
    let writer = {
        let url = world.url().to_owned();
        tokio::spawn(async move {
            let info = pgrelay_pg::ConnInfo::parse(&url).unwrap();
            let db = pgrelay_pg::connect(&info).await.unwrap();
            for id in 3..200 {
                db.execute(
                    "INSERT INTO todos VALUES ($1, CASE WHEN $1 % 3 = 0 THEN 't2' ELSE 't1' END, 'row')",
                    &[&id],
                )
                .await
                .unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            }
        })
    };
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Event::Disconnected { error, .. }) = events.recv().await {
                return error;
            }
        }
    })
    .await
    .expect("the session to end");
    let after = connected_at.elapsed().as_secs_f64();
    assert!(ended.contains("TokenExpired"), "{ended}");
    assert!(
        after > (lifetime - 2) as f64 && after < (lifetime + 3) as f64,
        "the session ended {after:.1} s after connecting; the token lived {lifetime} s"
    );
    writer.await.unwrap();
    let want = world
        .count("SELECT count(*) FROM todos WHERE tenant = 't1'")
        .await;
    wait_for(
        "every t1 row, and only those, in the replica",
        WAIT,
        || async {
            let rows = replica_rows(&path, "todos");
            let only_t1 = rows.values().all(|r| r["tenant"] == "t1");
            assert!(only_t1, "a t2 row reached the replica");
            (rows.len() as i64 == want).then_some(())
        },
    )
    .await;
    wait_for("the expiry in the audit log", WAIT, || async {
        (world
            .count("SELECT count(*) FROM pgrelay.audit_log WHERE action = 'token_expired' AND subject = 'carol'")
            .await
            == 1)
            .then_some(())
    })
    .await;
    client.stop().await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_takes_a_secret_file_rules_and_a_token_file() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE todos (id int PRIMARY KEY, tenant text NOT NULL, title text);
             CREATE TABLE hidden (id int PRIMARY KEY);",
        )
        .await;
    let dir = world.dir.path();
    std::fs::write(dir.join("secret"), [super::SECRET, b"\n"].concat()).unwrap();
    std::fs::write(dir.join("rules.toml"), RULES).unwrap();
    std::fs::write(
        dir.join("token.jwt"),
        token(json!({"tenant": "t2", "sub": "dave"})),
    )
    .unwrap();
    let mut server = Command::new(crate::support::BIN)
        .args([
            "serve",
            "--database-url",
            world.url(),
            "--slot",
            &world.slot(),
        ])
        .args(["--listen", "127.0.0.1:0", "--auth", "jwt"])
        .arg("--jwt-secret-file")
        .arg(dir.join("secret"))
        .arg("--rules")
        .arg(dir.join("rules.toml"))
        .env("PGRELAY_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("pgrelay listening on ")
        .unwrap()
        .to_owned();
    world
        .exec("INSERT INTO todos VALUES (1, 't1', 'a'), (2, 't2', 'b'); INSERT INTO hidden VALUES (1)")
        .await;
    wait_for("the rows in the change log", WAIT, || async {
        (world
            .count("SELECT count(*) FROM pgrelay.change_history")
            .await
            == 3)
            .then_some(())
    })
    .await;
    let path = world.replica_path("dave");
    let status = Command::new(crate::support::BIN)
        .args([
            "client",
            "sync",
            "--server",
            &format!("ws://{addr}"),
            "--client-id",
            "dave-1",
        ])
        .arg("--db")
        .arg(&path)
        .arg("--token-file")
        .arg(dir.join("token.jwt"))
        .arg("--exit-when-caught-up")
        .env("PGRELAY_LOG", "warn")
        .status()
        .unwrap();
    assert!(status.success());
    let rows = replica_rows(&path, "todos");
    assert_eq!(rows.keys().copied().collect::<Vec<_>>(), vec![2]);
    assert!(!super::has_table(&path, "hidden"));
    let _ = server.kill();
    let _ = server.wait();
}

/// `pgrelay serve --auth jwt` as a child process; its address.
fn spawn_auth_server(world: &World) -> (std::process::Child, String) {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let secret = world.dir.path().join("secret");
    std::fs::write(&secret, [super::SECRET, b"\n"].concat()).unwrap();
    let mut server = Command::new(crate::support::BIN)
        .args([
            "serve",
            "--database-url",
            world.url(),
            "--slot",
            &world.slot(),
        ])
        .args(["--listen", "127.0.0.1:0", "--auth", "jwt"])
        .arg("--jwt-secret-file")
        .arg(&secret)
        .env("PGRELAY_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("pgrelay listening on ")
        .unwrap()
        .to_owned();
    (server, addr)
}

/// With `--exit-when-caught-up`, an expired token ends the command with
/// the server's reason after one more read of the token file, instead of
/// retrying forever and hanging the script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_when_caught_up_ends_on_a_refused_token() {
    use std::process::{Command, Stdio};

    let world = World::new().await;
    world
        .exec("CREATE TABLE todos (id int PRIMARY KEY, tenant text NOT NULL, title text)")
        .await;
    let (mut server, addr) = spawn_auth_server(&world);
    let file = world.dir.path().join("token.jwt");
    std::fs::write(&file, token(json!({"sub": "erin", "exp": now() - 120}))).unwrap();
    let mut child = Command::new(crate::support::BIN)
        .args(["client", "sync", "--server", &format!("ws://{addr}")])
        .args(["--client-id", "erin-1", "--exit-when-caught-up"])
        .arg("--db")
        .arg(world.replica_path("erin"))
        .arg("--token-file")
        .arg(&file)
        .env("PGRELAY_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = server.kill();
            let _ = server.wait();
            panic!("the client still retries 30 s after its token was refused");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("TokenExpired") && stderr.contains("token expired"),
        "{stderr}"
    );
    // The first refusal, and one more after reading the file again.
    wait_for("both refusals in the audit log", WAIT, || async {
        (world
            .count("SELECT count(*) FROM pgrelay.audit_log WHERE action = 'refused' AND client_id = 'erin-1'")
            .await
            == 2)
            .then_some(())
    })
    .await;
    let _ = server.kill();
    let _ = server.wait();
}

/// The one more read of the token provider finds a good token: the sync
/// goes on and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_when_caught_up_asks_the_provider_once_more() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE todos (id int PRIMARY KEY, tenant text NOT NULL, title text)")
        .await;
    world.exec("INSERT INTO todos VALUES (1, 't1', 'a')").await;
    let server = start_server(&world, RULES).await;
    let asked = Arc::new(Mutex::new(0u32));
    let counter = Arc::clone(&asked);
    let provider = TokenProvider::new(move || {
        let counter = Arc::clone(&counter);
        async move {
            let mut n = counter.lock().unwrap();
            *n += 1;
            // A token signed with another key first: `unauthorized`.
            Ok(if *n == 1 {
                encode(
                    &Header::new(Algorithm::HS256),
                    &json!({"tenant": "t1", "exp": now() + 600}),
                    &EncodingKey::from_secret(b"not the server's secret, but long enough"),
                )
                .unwrap()
            } else {
                token(json!({"tenant": "t1", "sub": "frank"}))
            })
        }
    });
    let path = world.replica_path("frank");
    let mut config =
        pgrelay_client::ClientConfig::new(format!("ws://{}", server.local_addr()), &path);
    config.client_id = Some("frank-1".into());
    config.token_provider = Some(provider);
    config.exit_when_caught_up = true;
    let client = pgrelay_client::SyncClient::open(config).await.unwrap();
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::time::timeout(WAIT, client.run(stopped))
        .await
        .expect("the sync to finish")
        .expect("the sync to succeed with the second token");
    assert_eq!(*asked.lock().unwrap(), 2);
    assert_eq!(replica_rows(&path, "todos").len(), 1);
    server.shutdown().await.unwrap();
}
