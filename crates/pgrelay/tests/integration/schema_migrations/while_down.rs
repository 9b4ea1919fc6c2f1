//! Tables dropped or renamed while no server ran, and a drop a replica
//! missed before a restart: a replica that comes back after the restart
//! drops the old tables (the server announces every table it synced before
//! and no longer finds), fetches the renamed one alone, and its offline
//! writes follow the rename or are refused with the reason.

use std::time::Duration;

use super::schema_changes::{
    offline_writes_follow_the_rename, refetched, start_watched, wait_columns,
};
use crate::support::{wait_for, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_dropped_or_renamed_while_the_server_was_stopped_leave_a_late_replica() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE old_name (id int PRIMARY KEY, v text);
             INSERT INTO old_name SELECT g, 'o' || g FROM generate_series(1, 20) g;
             CREATE TABLE doomed (id int PRIMARY KEY);
             INSERT INTO doomed VALUES (1);
             CREATE TABLE dropped_live (id int PRIMARY KEY);
             INSERT INTO dropped_live VALUES (1);
             CREATE TABLE big (id int PRIMARY KEY, body text);
             INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 500) g;",
        )
        .await;
    let server = world.start_server().await;
    let (late, _) = start_watched(&world, server.local_addr(), "late").await;
    let late_db = world.replica_path("late");
    world.wait_equal(&late_db, Duration::from_secs(60)).await;
    late.stop().await;
    {
        let conn = rusqlite::Connection::open(&late_db).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.execute_batch(
            "UPDATE old_name SET v = 'offline edit' WHERE id = 3;
             INSERT INTO doomed VALUES (2);",
        )
        .unwrap();
    }
    // Dropped while the server runs and the replica is away: announced
    // then, and again by the next server.
    world.exec("DROP TABLE dropped_live").await;
    wait_for(
        "the running server to record dropped_live as gone",
        Duration::from_secs(30),
        || async {
            (world
                .count("SELECT count(*) FROM pgrelay.table_schemas WHERE name = 'public.dropped_live' AND schema->>'skipped' IS NOT NULL")
                .await
                == 1)
                .then_some(())
        },
    )
    .await;
    server.shutdown().await.unwrap();

    // While no server runs.
    world
        .exec("DROP TABLE doomed; ALTER TABLE old_name RENAME TO new_name;")
        .await;

    let server = world.start_server().await;
    let (late, late_loads) = start_watched(&world, server.local_addr(), "late").await;
    wait_columns(&late_db, "new_name", &[("id", 1), ("v", 0)]).await;
    wait_columns(&late_db, "old_name", &[]).await;
    wait_columns(&late_db, "doomed", &[]).await;
    wait_columns(&late_db, "dropped_live", &[]).await;
    world.wait_equal(&late_db, Duration::from_secs(30)).await;
    let (tables, _) = refetched(&late_loads, 0);
    assert!(!tables.contains(&"public.big".to_owned()), "{tables:?}");
    offline_writes_follow_the_rename(&world, &late).await;
    world.wait_equal(&late_db, Duration::from_secs(30)).await;
    late.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
