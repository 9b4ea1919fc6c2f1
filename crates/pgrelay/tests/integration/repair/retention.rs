//! A replica back after retention pruned past its position.

use std::time::Duration;

use crate::support::{replica_lsn, start_client, wait_for, World};

/// 20,000 rows; 1 % of them changed while the replica was away (updates,
/// inserts, deletes spread over the table), and local writes made offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_back_after_retention_is_repaired_with_a_fraction_of_a_hydration() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE items (id bigint PRIMARY KEY, n int NOT NULL, note text);
             INSERT INTO items SELECT g, g % 97, 'item number ' || g FROM generate_series(1, 20000) g;
             CREATE TABLE tags (name text PRIMARY KEY, weight float8);
             INSERT INTO tags SELECT 'tag-' || g, g / 3.0 FROM generate_series(1, 500) g;",
        )
        .await;
    let mut config = world.server_config();
    config.retain = Duration::from_secs(1);
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let path = world.replica_path("away");
    let client = start_client(addr, &path, "away").await;
    let first = super::watch(&client);
    world.wait_equal(&path, Duration::from_secs(60)).await;
    let replica = client.replica.clone();
    client.stop().await;
    let position = replica_lsn(&path).expect("a position");
    let hydrated_bytes = first.lock().unwrap().hydrations[0];

    // Away: local writes, while PostgreSQL changes 1 % of the rows and the
    // change log is pruned past the replica's position.
    replica
        .execute("INSERT INTO items VALUES (900001, 1, 'written offline'); UPDATE items SET note = 'edited offline' WHERE id = 7;")
        .await
        .unwrap();
    world
        .exec(
            "UPDATE items SET n = n + 1000 WHERE id % 200 = 3;
             DELETE FROM items WHERE id % 400 = 11;
             INSERT INTO items SELECT 100000 + g, 5, 'new ' || g FROM generate_series(1, 50) g;
             INSERT INTO items SELECT g * 400 + 500000, 6, 'spread ' || g FROM generate_series(1, 50) g;
             UPDATE tags SET weight = -1 WHERE name IN ('tag-17', 'tag-300');
             DELETE FROM tags WHERE name = 'tag-42';
             INSERT INTO tags VALUES ('Zebra', 1), ('ärger', 2), ('tag-17a', 3);",
        )
        .await;
    wait_for(
        "the log to be pruned past the replica",
        Duration::from_secs(30),
        || async {
            let pruned: String = world
                .sql
                .query_one("SELECT pruned_through::text FROM pgrelay.log_state", &[])
                .await
                .unwrap()
                .get(0);
            (pruned.parse::<pgrelay_protocol::Lsn>().unwrap() > position).then_some(())
        },
    )
    .await;
    drop(replica);

    let client = start_client(addr, &path, "away").await;
    let seen = super::watch(&client);
    wait_for(
        "the writes made offline to reach PostgreSQL",
        Duration::from_secs(60),
        || async {
            (world
                .count("SELECT count(*) FROM items WHERE id = 900001 OR note = 'edited offline'")
                .await
                == 2)
                .then_some(())
        },
    )
    .await;
    world.wait_equal(&path, Duration::from_secs(60)).await;
    let seen = seen.lock().unwrap().clone();
    assert!(seen.hydrations.is_empty(), "sent whole again: {seen:?}");
    let [(bytes, received, _, refetch)] = &seen.repairs[..] else {
        panic!("not repaired exactly once: {seen:?}");
    };
    assert!(refetch.is_empty(), "{refetch:?}");
    // About 300 rows changed of 20,500; the replaced ranges hold a few rows
    // each around every change.
    assert!(*received < 2_000, "received {received} rows");
    assert!(
        bytes * 10 < hydrated_bytes,
        "repair moved {bytes} bytes; the full snapshot held {hydrated_bytes}"
    );
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
