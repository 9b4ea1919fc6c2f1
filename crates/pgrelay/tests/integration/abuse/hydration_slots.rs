//! Hydration slots cannot be held hostage: clients that take a snapshot
//! and never confirm it lose their slot within a bound set by the
//! snapshot's size, and the next replica hydrates.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{start_client, wait_replica_rows, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_non_confirming_hydrations_do_not_block_a_fifth_for_long() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' FROM generate_series(1, 500) g")
        .await;
    let mut config = world.server_config();
    config.max_hydrations = 4;
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    // Each reads everything it is sent and never sends snapshot_done.
    let mut hostages = tokio::task::JoinSet::new();
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let (holding_tx, mut holding) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..4 {
        let ended_tx = ended_tx.clone();
        let holding_tx = holding_tx.clone();
        hostages.spawn(async move {
            let (mut socket, _) =
                tokio_tungstenite::connect_async(format!("ws://{addr}/api/sync"))
                    .await
                    .unwrap();
            let hello = serde_json::json!({"type": "hello", "protocol_version": 1, "client_id": format!("hostage-{i}")});
            socket
                .send(Message::Text(hello.to_string().into()))
                .await
                .unwrap();
            let mut snapshot = false;
            while let Some(Ok(message)) = socket.next().await {
                if let Message::Text(text) = &message {
                    if text.contains("\"snapshot_end\"") && !snapshot {
                        snapshot = true;
                        let _ = holding_tx.send(());
                    }
                }
            }
            let _ = ended_tx.send(snapshot);
        });
    }
    // The four hold the slots: each has had its whole snapshot.
    for _ in 0..4 {
        tokio::time::timeout(Duration::from_secs(30), holding.recv())
            .await
            .expect("a hostage's snapshot");
    }
    let started = Instant::now();
    let path = world.replica_path("fifth");
    let fifth = start_client(addr, &path, "fifth").await;
    wait_replica_rows(&path, "t", 500, Duration::from_secs(60)).await;
    let waited = started.elapsed();
    eprintln!("the fifth replica hydrated after {waited:?}");
    assert!(
        waited < Duration::from_secs(40),
        "the fifth waited {waited:?}"
    );
    // The hostages were closed after being sent a whole snapshot.
    for _ in 0..4 {
        let had_snapshot = tokio::time::timeout(Duration::from_secs(30), ended.recv())
            .await
            .expect("a hostage still connected")
            .unwrap();
        assert!(had_snapshot);
    }
    fifth.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
