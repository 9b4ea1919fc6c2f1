//! A new column's default: PostgreSQL fills existing rows without
//! streaming them (no row changes in the WAL), so a replica fetches that
//! table alone again and holds the default in every existing row, whether
//! it was connected or comes back after further changes.

use std::time::Duration;

use super::schema_changes::{refetched, start_watched, wait_columns};
use crate::support::World;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_columns_default_reaches_live_and_late_replicas_refetching_only_that_table() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE todos (id int PRIMARY KEY, title text);
             INSERT INTO todos SELECT g, 'title ' || g FROM generate_series(1, 200) g;
             CREATE TABLE big (id int PRIMARY KEY, body text);
             INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 2000) g;",
        )
        .await;
    let server = world.start_server().await;
    let addr = server.local_addr();
    let (live, live_loads) = start_watched(&world, addr, "live").await;
    let (late, _) = start_watched(&world, addr, "late").await;
    let (live_db, late_db) = (world.replica_path("live"), world.replica_path("late"));
    world.wait_equal(&live_db, Duration::from_secs(60)).await;
    world.wait_equal(&late_db, Duration::from_secs(60)).await;
    late.stop().await;
    let before = live_loads.lock().unwrap().len();

    // NOT NULL DEFAULT, then a nullable DEFAULT: every existing row holds
    // the value in the replica too.
    world
        .exec("ALTER TABLE todos ADD COLUMN prio int NOT NULL DEFAULT 5")
        .await;
    wait_columns(&live_db, "todos", &[("id", 1), ("title", 0), ("prio", 0)]).await;
    world.wait_equal(&live_db, Duration::from_secs(30)).await;
    world
        .exec("ALTER TABLE todos ADD COLUMN tag text DEFAULT 'new'")
        .await;
    wait_columns(
        &live_db,
        "todos",
        &[("id", 1), ("title", 0), ("prio", 0), ("tag", 0)],
    )
    .await;
    world.wait_equal(&live_db, Duration::from_secs(30)).await;
    let (mut tables, _) = refetched(&live_loads, before);
    tables.dedup();
    assert_eq!(tables, vec!["public.todos".to_owned()]);
    // A later column without a default (NULL in existing rows) fetches
    // nothing; the late replica must still see the earlier defaults.
    let before = live_loads.lock().unwrap().len();
    world.exec("ALTER TABLE todos ADD COLUMN plain text").await;
    world
        .exec("UPDATE todos SET title = 'after' WHERE id = 1")
        .await;
    wait_columns(
        &live_db,
        "todos",
        &[
            ("id", 1),
            ("title", 0),
            ("prio", 0),
            ("tag", 0),
            ("plain", 0),
        ],
    )
    .await;
    world.wait_equal(&live_db, Duration::from_secs(30)).await;
    assert_eq!(refetched(&live_loads, before).0, Vec::<String>::new());

    let (late, late_loads) = start_watched(&world, addr, "late").await;
    wait_columns(
        &late_db,
        "todos",
        &[
            ("id", 1),
            ("title", 0),
            ("prio", 0),
            ("tag", 0),
            ("plain", 0),
        ],
    )
    .await;
    world.wait_equal(&late_db, Duration::from_secs(30)).await;
    let (tables, _) = refetched(&late_loads, 0);
    assert_eq!(tables, vec!["public.todos".to_owned()]);
    let conn = rusqlite::Connection::open(&late_db).unwrap();
    let filled: i64 = conn
        .query_row(
            "SELECT count(*) FROM todos WHERE prio = 5 AND tag = 'new'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(filled, 200);
    live.stop().await;
    late.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
