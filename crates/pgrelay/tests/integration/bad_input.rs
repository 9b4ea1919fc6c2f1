//! Promise 7: bad input gets a clear error and closes only that connection;
//! other clients go on. And a server on a PostgreSQL without logical
//! decoding refuses to start, saying how to fix it.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pgrelay_protocol::{CloseCode, ErrorCode, ServerMessage};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{start_client, wait_for, World, BIN};

/// Sends `frames` after connecting and returns the error frame and close
/// code the server answered with.
async fn refused(
    addr: std::net::SocketAddr,
    frames: Vec<Message>,
) -> (ErrorCode, String, Option<u16>) {
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/api/sync"))
        .await
        .unwrap();
    for frame in frames {
        // The server may close before a second frame; that is fine.
        let _ = socket.send(frame).await;
    }
    let mut error = None;
    let mut close = None;
    let read = async {
        while let Some(message) = socket.next().await {
            match message {
                Ok(Message::Text(text)) => {
                    if let Ok(ServerMessage::Error { code, message, .. }) =
                        serde_json::from_str(&text)
                    {
                        error = Some((code, message));
                    }
                }
                Ok(Message::Close(frame)) => {
                    close = frame.map(|f| u16::from(f.code));
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("the server neither answered nor closed");
    let (code, message) = error.expect("an error frame before the close");
    (code, message, close)
}

fn hello(version: u32) -> Message {
    Message::Text(
        format!(r#"{{"type":"hello","protocol_version":{version},"client_id":"bad"}}"#).into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_connection() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let server = world.start_server().await;
    let addr = server.local_addr();
    let path = world.replica_path("good");
    let good = start_client(addr, &path, "good").await;
    world.exec("INSERT INTO t VALUES (1)").await;
    world.wait_equal(&path, Duration::from_secs(30)).await;

    let cases: Vec<(Vec<Message>, ErrorCode, u16)> = vec![
        (
            vec![Message::Text("{not json".into())],
            ErrorCode::MalformedFrame,
            1002,
        ),
        (
            vec![Message::Binary(vec![0xff, 0x00, 0x13].into())],
            ErrorCode::MalformedFrame,
            1002,
        ),
        (
            vec![Message::Text(
                r#"{"type":"subscribe","tables":["t"]}"#.into(),
            )],
            ErrorCode::UnknownMessage,
            1002,
        ),
        (vec![hello(99)], ErrorCode::UpgradeRequired, 4426),
        (
            vec![hello(1), Message::Text(r#"{"type":"launch"}"#.into())],
            ErrorCode::UnknownMessage,
            1002,
        ),
        (vec![hello(1), hello(1)], ErrorCode::HandshakeRequired, 1002),
        (
            vec![Message::Text("x".repeat(2 << 20).into())],
            ErrorCode::FrameTooLarge,
            CloseCode::TOO_BIG.0,
        ),
    ];
    for (n, (frames, code, close)) in cases.into_iter().enumerate() {
        let (got, message, got_close) = refused(addr, frames).await;
        assert_eq!(got, code, "case {n}: {message}");
        assert!(!message.is_empty());
        assert_eq!(got_close, Some(close), "case {n}");
        // The good client keeps receiving after each bad connection.
        world
            .exec(&format!("INSERT INTO t VALUES ({})", n + 2))
            .await;
        world.wait_equal(&path, Duration::from_secs(30)).await;
    }
    let head: String = world
        .sql
        .query_one("SELECT max(lsn)::text FROM pgrelay.change_history", &[])
        .await
        .unwrap()
        .get(0);
    wait_for(
        "the good client at the head",
        Duration::from_secs(10),
        || async {
            good.replica
                .status()
                .await
                .ok()
                .and_then(|s| s.lsn)
                .filter(|l| *l == head)
                .map(|_| ())
        },
    )
    .await;
    good.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[test]
fn serve_refuses_wal_level_replica_with_instructions() {
    // The machine's stock PostgreSQL runs with wal_level=replica.
    let url = std::env::var("PGRELAY_REPLICA_LEVEL_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--database-url",
            &url,
            "--listen",
            "127.0.0.1:0",
            "--slot",
            "never_created",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve must refuse: {stderr}");
    assert!(stderr.contains("wal_level=replica"), "{stderr}");
    assert!(
        stderr.contains("ALTER SYSTEM SET wal_level = logical"),
        "{stderr}"
    );
}
