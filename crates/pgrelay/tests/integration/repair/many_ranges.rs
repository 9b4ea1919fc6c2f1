//! A repair that replaces more ranges at once than one COPY reads: the
//! server must read each COPY to its end before it opens the next on the
//! snapshot's connection (two open at once waited on each other forever:
//! the stall `bench repair` hit at 200,000 rows).

use std::time::Duration;

use crate::support::{start_client, wait_for, World};

/// Rows of about 530 bytes; every 100th changes while the replica is away,
/// so the last round replaces about 400 ranges of up to 4 rows at once
/// (several COPYs of 64 ranges, each well over what the connection buffers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_that_replaces_hundreds_of_ranges_at_once_completes() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE wide (id bigint PRIMARY KEY, n int NOT NULL, pad text NOT NULL);
             INSERT INTO wide SELECT g, 0, repeat(md5(g::text), 16) FROM generate_series(1, 40000) g;",
        )
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("wide");
    let client = start_client(server.local_addr(), &path, "wide").await;
    world.wait_equal(&path, Duration::from_secs(120)).await;
    client.stop().await;
    server.shutdown().await.unwrap();

    world
        .exec(
            "UPDATE pgrelay.log_state SET log_id = 'another';
             UPDATE wide SET n = 1, pad = upper(pad) WHERE id % 100 = 7;
             DELETE FROM wide WHERE id % 1000 = 50;
             INSERT INTO wide SELECT 100000 + g, 2, repeat('x', 500) FROM generate_series(1, 20) g;",
        )
        .await;
    let server = world.start_server().await;
    let client = start_client(server.local_addr(), &path, "wide").await;
    let seen = super::watch(&client);
    world.wait_equal(&path, Duration::from_secs(120)).await;
    wait_for("the repair's event", Duration::from_secs(30), || async {
        (!seen.lock().unwrap().repairs.is_empty()).then_some(())
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    assert!(seen.hydrations.is_empty(), "sent whole again: {seen:?}");
    let (_, received, _, refetch) = &seen.repairs[0];
    assert!(refetch.is_empty(), "{refetch:?}");
    // 420 rows updated or new, each in a small replaced range.
    assert!((420..4_000).contains(received), "{seen:?}");
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
