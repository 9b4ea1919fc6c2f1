//! "Caught up" means caught up with PostgreSQL (issue 22, item 4): `client
//! sync --exit-when-caught-up` run right after a write to PostgreSQL exits
//! with that write in its replica, also when the last write was to a table
//! nobody syncs.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::{spawn_client, World};

/// Runs `pgrelay client sync --exit-when-caught-up` to its end; fails the
/// test when it fails or takes over a minute.
async fn sync_once(server: std::net::SocketAddr, path: &Path, id: &str) {
    let mut child = spawn_client(server, path, id, true);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "client sync failed: {status}");
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("client sync --exit-when-caught-up did not exit within a minute");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stale_rows(path: &Path, round: i64) -> i64 {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("SELECT count(*) FROM t WHERE n <> ?1", [round], |r| {
        r.get(0)
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_when_caught_up_holds_what_postgres_committed_before_it_connected() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL);
             INSERT INTO t SELECT g, 0 FROM generate_series(1, 10001) g;",
        )
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("script");
    sync_once(server.local_addr(), &path, "script").await;
    assert_eq!(stale_rows(&path, 0), 0);
    for round in 1..=3 {
        // A script writes, then syncs at once.
        world.exec("UPDATE t SET n = n + 1").await;
        sync_once(server.local_addr(), &path, "script").await;
        let stale = stale_rows(&path, round);
        assert_eq!(stale, 0, "round {round}: {stale} of 10001 rows are stale");
    }
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_when_caught_up_ends_when_the_last_write_was_to_an_unsynced_table() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL);
             INSERT INTO t SELECT g, 0 FROM generate_series(1, 10001) g;
             CREATE SCHEMA side;
             CREATE TABLE side.audit (id serial PRIMARY KEY, note text);",
        )
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("unsynced");
    sync_once(server.local_addr(), &path, "unsynced").await;
    for round in 1..=2 {
        world.exec("UPDATE t SET n = n + 1").await;
        // Nothing the server syncs changes after this: the change log's
        // head stays below PostgreSQL's WAL position at connect time.
        world
            .exec("INSERT INTO side.audit (note) VALUES ('script ran')")
            .await;
        sync_once(server.local_addr(), &path, "unsynced").await;
        let stale = stale_rows(&path, round);
        assert_eq!(stale, 0, "round {round}: {stale} of 10001 rows are stale");
    }
    // Nothing written at all since the last sync: it still ends.
    sync_once(server.local_addr(), &path, "unsynced").await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
