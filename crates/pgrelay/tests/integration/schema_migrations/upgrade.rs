//! `upgrade_required`: a client whose protocol version, or whose replica's
//! client schema, is outside what the server serves is told so with both
//! versions and a close code of its own, and does not retry.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pgrelay_protocol::{ErrorCode, ServerMessage};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{start_client, World};

/// Sends `hello` as JSON and reads the answer up to the close.
async fn refused(addr: std::net::SocketAddr, hello: serde_json::Value) -> (ServerMessage, u16) {
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/api/sync"))
        .await
        .unwrap();
    socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .unwrap();
    let mut error = None;
    let read = async {
        while let Some(Ok(message)) = socket.next().await {
            match message {
                Message::Text(text) => {
                    if let Ok(m @ ServerMessage::Error { .. }) = serde_json::from_str(&text) {
                        error = Some(m);
                    }
                }
                Message::Close(frame) => return frame.map(|f| u16::from(f.code)),
                _ => {}
            }
        }
        None
    };
    let close = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap()
        .expect("a close frame");
    (error.expect("an error frame"), close)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_outside_the_servers_window_is_told_upgrade_required_with_both_versions() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let server = world.start_server().await;
    let addr = server.local_addr();

    for (protocol, schema, what, client, max) in [
        (99, None, "protocol", 99, 1),
        (0, None, "protocol", 0, 1),
        (1, Some(20991231000000_i64), "schema", 20991231000000, 0),
    ] {
        let mut hello =
            serde_json::json!({"type": "hello", "protocol_version": protocol, "client_id": "old"});
        if let Some(schema) = schema {
            hello["schema_version"] = schema.into();
        }
        let (error, close) = refused(addr, hello).await;
        let ServerMessage::Error {
            code,
            message,
            upgrade,
        } = error
        else {
            unreachable!()
        };
        assert_eq!(code, ErrorCode::UpgradeRequired, "{message}");
        assert_eq!(close, 4426);
        let upgrade = upgrade.expect("both versions");
        assert_eq!(
            (upgrade.what.as_str(), upgrade.client, upgrade.server_max),
            (what, client, max)
        );
        assert!(message.contains(&client.to_string()), "{message}");
    }

    // The Rust client stops with the refusal instead of retrying forever.
    let db = world.replica_path("too_new");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "CREATE TABLE _pgrelay_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_us INTEGER NOT NULL);
             INSERT INTO _pgrelay_migrations VALUES (20991231000000, 'from_the_future', 0);",
        )
        .unwrap();
    }
    let client = start_client(addr, &db, "too_new").await;
    let ended = tokio::time::timeout(Duration::from_secs(30), client.task)
        .await
        .expect("the client stops")
        .unwrap();
    match ended {
        Err(pgrelay_client::ClientError::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::UpgradeRequired, "{message}");
        }
        other => panic!("expected upgrade_required, got {other:?}"),
    }
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
