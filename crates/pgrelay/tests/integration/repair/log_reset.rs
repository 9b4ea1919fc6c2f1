//! A replica that follows another change log (the log was reset).

use std::time::Duration;

use crate::support::{start_client, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_of_another_change_log_is_repaired() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 3000) g;
               CREATE TABLE loose (a int, b text); ALTER TABLE loose REPLICA IDENTITY FULL; INSERT INTO loose VALUES (1, 'x'), (1, 'x'), (2, NULL);")
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("other-log");
    let client = start_client(server.local_addr(), &path, "other-log").await;
    world.wait_equal(&path, Duration::from_secs(30)).await;
    client.stop().await;
    server.shutdown().await.unwrap();
    // The change log is replaced (as if pgrelay's schema were recreated),
    // and rows change meanwhile.
    world
        .exec("UPDATE pgrelay.log_state SET log_id = 'another';
               DELETE FROM t WHERE id IN (1, 1500); UPDATE t SET v = 'changed' WHERE id = 2999; INSERT INTO t VALUES (5000, 'new');
               DELETE FROM loose WHERE a = 2; INSERT INTO loose VALUES (3, 'y');")
        .await;
    let server = world.start_server().await;
    let client = start_client(server.local_addr(), &path, "other-log").await;
    let seen = super::watch(&client);
    world.wait_equal(&path, Duration::from_secs(30)).await;
    crate::support::wait_for("the repair", Duration::from_secs(10), || async {
        (!seen.lock().unwrap().repairs.is_empty()).then_some(())
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    assert!(seen.hydrations.is_empty(), "sent whole again: {seen:?}");
    let (_, received, removed, refetch) = &seen.repairs[0];
    assert!(refetch.is_empty(), "{refetch:?}");
    // `t`: a few small ranges around 4 changes; `loose` (no key): whole.
    assert!(*received < 100 && *removed < 100, "{seen:?}");
    // It follows the new log from now on.
    world.exec("INSERT INTO t VALUES (6000, 'after')").await;
    world.wait_equal(&path, Duration::from_secs(30)).await;
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

/// Writes the client pushes as soon as it is welcomed reach the server
/// while it repairs the replica: their answers arrive inside the repair
/// and are handled after it (once they ended the connection, and every
/// reconnection began the same repair again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_answered_during_a_repair_are_handled_after_it() {
    use crate::support::{free_port, ServerProcess};
    use crate::writes::{wait_count, wait_outbox_drained, WAIT};

    let world = World::new().await;
    world
        .exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 3000) g;")
        .await;
    let port = free_port();
    let mut server = ServerProcess::spawn(world.url(), &world.slot(), port);
    let path = world.replica_path("repair-writes");
    let client = start_client(server.addr, &path, "repair-writes").await;
    world.wait_equal(&path, WAIT).await;
    server.kill9();
    for n in 1..=200 {
        client
            .client
            .execute(format!("INSERT INTO t VALUES ({}, 'local')", 10_000 + n))
            .await
            .unwrap();
    }
    // Another change log, and a row changed meanwhile: the next
    // connection is repaired, with 200 writes waiting in the outbox.
    world
        .exec("UPDATE pgrelay.log_state SET log_id = 'another'; UPDATE t SET v = 'changed' WHERE id = 7;")
        .await;
    let seen = super::watch(&client);
    let _server = ServerProcess::spawn(world.url(), &world.slot(), port);
    wait_count(&world, "SELECT count(*) FROM t WHERE v = 'local'", 200).await;
    wait_outbox_drained(&client.replica).await;
    world.wait_equal(&path, WAIT).await;
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.repairs.is_empty(), "repaired: {seen:?}");
    assert!(seen.hydrations.is_empty(), "sent whole again: {seen:?}");
    assert_eq!(
        world
            .count("SELECT count(*) FROM pgrelay.applied_changes WHERE client_id = 'repair-writes'")
            .await,
        200,
        "each write applied once"
    );
    client.stop().await;
}
