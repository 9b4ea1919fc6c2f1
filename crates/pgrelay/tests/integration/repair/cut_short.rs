//! A replica of another change log that is cut off after the welcome and
//! before its repair must still say, on its next connection, that it
//! follows the other log: had it taken the new log's id at the welcome,
//! the next server would resume it from its old position as if nothing had
//! been missed.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pgrelay_client::Event;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{open_client, run_client, wait_for, World};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_before_its_repair_keeps_following_its_old_log() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 3000) g;")
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("cut-short");
    let client = run_client(open_client(server.local_addr(), &path, "cut-short").await);
    world.wait_equal(&path, WAIT).await;
    client.stop().await;
    server.shutdown().await.unwrap();
    let old = stored_log_id(&path).expect("the replica's log id");

    // Another change log, and a row changed meanwhile.
    world
        .exec("UPDATE pgrelay.log_state SET log_id = 'another'; UPDATE t SET v = 'changed' WHERE id = 7;")
        .await;
    // One hydration slot, held by a client that takes a snapshot and does
    // not confirm it: the replica is welcomed, then waits for the slot.
    let mut config = world.server_config();
    config.max_hydrations = 1;
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let hostage = hold_the_slot(server.local_addr()).await;
    let sync = open_client(server.local_addr(), &path, "cut-short").await;
    let mut events = sync.subscribe();
    let client = run_client(sync);
    tokio::time::timeout(WAIT, async {
        while !matches!(events.recv().await, Ok(Event::Connected { .. })) {}
    })
    .await
    .expect("the welcome");
    client.stop().await;
    assert_eq!(
        stored_log_id(&path).as_deref(),
        Some(old.as_str()),
        "welcomed by the new log but not repaired yet"
    );

    // Once the slot is free, the next connection repairs it.
    drop(hostage);
    let sync = open_client(server.local_addr(), &path, "cut-short").await;
    let mut events = sync.subscribe();
    let client = run_client(sync);
    world.wait_equal(&path, WAIT).await;
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(Event::Repaired { .. }) => return,
                Ok(Event::Hydrated { full: true, .. }) => panic!("hydrated whole again"),
                _ => {}
            }
        }
    })
    .await
    .expect("the repair");
    wait_for("the new log's id", WAIT, || async {
        (stored_log_id(&path).as_deref() == Some("another")).then_some(())
    })
    .await;
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

/// A raw client that takes a full snapshot and never confirms it; the
/// slot is held until the socket is dropped (or the server's verdict
/// timeout, 10 s at the least).
async fn hold_the_slot(
    addr: SocketAddr,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/api/sync"))
        .await
        .unwrap();
    let hello = serde_json::json!({"type": "hello", "protocol_version": 1, "client_id": "hostage"});
    socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        while let Some(Ok(message)) = socket.next().await {
            if matches!(&message, Message::Text(text) if text.contains("\"snapshot_end\"")) {
                return;
            }
        }
        panic!("the hostage's connection ended before its snapshot");
    })
    .await
    .expect("the hostage's snapshot");
    socket
}

fn stored_log_id(db: &Path) -> Option<String> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.query_row(
        "SELECT value FROM _pgrelay_meta WHERE key = 'log_id'",
        [],
        |r| r.get(0),
    )
    .ok()
}
