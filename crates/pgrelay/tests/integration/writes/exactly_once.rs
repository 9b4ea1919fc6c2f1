//! Writes reach PostgreSQL exactly once across a server outage and a
//! client killed mid-push.

use pgrelay_client::Replica;

use super::{wait_count, wait_outbox_drained, WAIT};
use crate::support::{free_port, spawn_client, start_client, wait_for, ServerProcess, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_writes_arrive_exactly_once_after_the_server_returns() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE notes (id bigint PRIMARY KEY, body text)")
        .await;
    let port = free_port();
    let mut server = ServerProcess::spawn(world.url(), &world.slot(), port);
    let path = world.replica_path("offline");
    let client = start_client(server.addr, &path, "offline").await;
    world.wait_equal(&path, WAIT).await;

    server.kill9();
    for n in 1..=1000 {
        client
            .client
            .execute(format!("INSERT INTO notes VALUES ({n}, 'note {n}')"))
            .await
            .unwrap();
    }
    let report = client.replica.outbox(None, 0).await.unwrap();
    assert_eq!(report.unsent(), 1000);
    assert_eq!(world.count("SELECT count(*) FROM notes").await, 0);

    let server = ServerProcess::spawn(world.url(), &world.slot(), port);
    wait_count(&world, "SELECT count(*) FROM notes", 1000).await;
    wait_outbox_drained(&client.replica).await;
    world.wait_equal(&path, WAIT).await;
    // The replica held the rows before the server did: wait for capture
    // before counting what the change log holds.
    wait_count(
        &world,
        "SELECT count(*) FROM pgrelay.change_history WHERE table_name = 'public.notes' AND operation = 'insert'",
        1000,
    )
    .await;
    assert_eq!(
        world
            .count("SELECT count(*) FROM pgrelay.change_history WHERE table_name = 'public.notes' AND operation = 'insert'")
            .await,
        1000
    );
    assert_eq!(
        world
            .count("SELECT count(*) FROM pgrelay.applied_changes WHERE client_id = 'offline'")
            .await,
        1000
    );
    // In order: the ids committed in the order they were written.
    assert_eq!(
        world
            .count("SELECT count(*) FROM (SELECT (data->>'id')::int AS id, lag((data->>'id')::int) OVER (ORDER BY lsn, ordinal) AS prev FROM pgrelay.change_history WHERE table_name = 'public.notes') s WHERE prev > id")
            .await,
        0
    );
    client.stop().await;
    drop(server);
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_push_loses_nothing_and_duplicates_nothing() {
    const ROWS: i64 = 20_000;
    let world = World::new().await;
    world
        .exec("CREATE TABLE events (id bigint PRIMARY KEY, payload text)")
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("pusher");
    let mut child = spawn_client(server.local_addr(), &path, "pusher", true);
    assert!(child.wait().unwrap().success());

    // Local writes made without a connection, by the application's own
    // SQLite connection: each row is a client transaction of its own.
    {
        let mut conn = rusqlite::Connection::open(&path).unwrap();
        let tx = conn.transaction().unwrap();
        for n in 1..=ROWS {
            tx.execute("INSERT INTO events VALUES (?1, 'payload ' || ?1)", [n])
                .unwrap();
        }
        tx.commit().unwrap();
    }
    let mut child = spawn_client(server.local_addr(), &path, "pusher", false);
    wait_for("the push to be part-way", WAIT, || async {
        (world.count("SELECT count(*) FROM events").await > 0).then_some(())
    })
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = world.count("SELECT count(*) FROM events").await;
    assert!(at_kill < ROWS, "the kill came too late to test anything");

    let mut child = spawn_client(server.local_addr(), &path, "pusher", true);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    assert_eq!(world.count("SELECT count(*) FROM events").await, ROWS);
    // The client exits once PostgreSQL has answered its writes; capture
    // into the change log may still be under way.
    wait_count(
        &world,
        "SELECT count(*) FROM pgrelay.change_history WHERE table_name = 'public.events'",
        ROWS,
    )
    .await;
    assert_eq!(
        world
            .count("SELECT count(*) FROM pgrelay.change_history WHERE table_name = 'public.events'")
            .await,
        ROWS,
        "each write committed exactly once"
    );
    let replica = Replica::open(&path).unwrap();
    let report = replica.outbox(None, 0).await.unwrap();
    assert_eq!(
        (report.applied, report.unsent(), report.rejected),
        (ROWS, 0, 0)
    );
    world.wait_equal(&path, WAIT).await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
