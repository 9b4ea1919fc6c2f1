//! Promise 8 for WAL: the slot's confirmed position follows the change log,
//! and keeps moving when only unpublished tables change.

use std::time::Duration;

use tokio_postgres::types::PgLsn;

use crate::support::{wait_for, World};

async fn confirmed(world: &World) -> u64 {
    let row = world
        .sql
        .query_one(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&world.slot()],
        )
        .await
        .unwrap();
    row.get::<_, Option<PgLsn>>(0).map(u64::from).unwrap_or(0)
}

async fn current_wal(world: &World) -> u64 {
    u64::from(
        world
            .sql
            .query_one("SELECT pg_current_wal_lsn()", &[])
            .await
            .unwrap()
            .get::<_, PgLsn>(0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_flush_lsn_advances_with_changes_and_when_idle() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE synced (id int PRIMARY KEY); CREATE TABLE unrelated (x int, y text);")
        .await;
    let server = world.start_server().await;
    let start = confirmed(&world).await;

    world
        .exec("INSERT INTO synced SELECT generate_series(1, 5000)")
        .await;
    let after_writes = current_wal(&world).await;
    wait_for(
        "confirmed_flush_lsn to pass the writes",
        Duration::from_secs(30),
        || async { (confirmed(&world).await >= after_writes).then_some(()) },
    )
    .await;
    // The log holds the changes the slot confirmed (durable before acknowledged).
    assert_eq!(
        world
            .count("SELECT count(*) FROM pgrelay.change_history")
            .await,
        5000
    );

    // Only an unpublished table changes: the slot must not hold WAL back.
    world
        .exec("INSERT INTO unrelated SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g")
        .await;
    let after_unrelated = current_wal(&world).await;
    wait_for(
        "confirmed_flush_lsn to pass unrelated WAL",
        Duration::from_secs(60),
        || async { (confirmed(&world).await >= after_unrelated).then_some(()) },
    )
    .await;
    assert!(after_unrelated > start);
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

/// Two `pgrelay serve` on one cluster with the same `--slot` (as with the
/// default name): the second is refused with the database that holds the
/// slot named, and told to pick its own with `--slot`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_of_another_database_is_refused_naming_that_database() {
    let first = World::new().await;
    let second = World::new().await;
    for world in [&first, &second] {
        world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    }
    let server = first.start_server().await;
    let output = tokio::process::Command::new(crate::support::BIN)
        .args([
            "serve",
            "--database-url",
            second.url(),
            "--slot",
            &first.slot(),
        ])
        .args(["--listen", "127.0.0.1:0"])
        .env("PGRELAY_LOG", "warn")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("belongs to database \"{}\"", first.db.name())),
        "{stderr}"
    );
    assert!(stderr.contains(second.db.name()), "{stderr}");
    assert!(stderr.contains("--slot"), "{stderr}");
    assert!(!stderr.contains("Some("), "{stderr}");
    server.shutdown().await.unwrap();
    first.db.drop_database().await.unwrap();
    second.db.drop_database().await.unwrap();
}
