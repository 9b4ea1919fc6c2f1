//! A table leaving pgrelay's publication: PostgreSQL stops streaming it, so
//! replicas drop it (connected ones at once, late ones at their next
//! welcome) instead of keeping rows that go stale; put back, it is fetched
//! alone. With every table of `public` synced and with `--tables`.

use std::time::Duration;

use pgrelay_pg::TableFilter;

use super::schema_changes::{columns, refetched, start_watched, wait_columns};
use crate::support::World;

async fn leaves_and_comes_back(explicit: bool) {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE kept (id int PRIMARY KEY, v text);
             INSERT INTO kept SELECT g, 'k' || g FROM generate_series(1, 100) g;
             CREATE TABLE leaving (id int PRIMARY KEY, v text);
             INSERT INTO leaving SELECT g, 'l' || g FROM generate_series(1, 50) g;",
        )
        .await;
    let mut config = world.server_config();
    config.table_poll_interval = Duration::from_millis(300);
    if explicit {
        config.tables =
            TableFilter::Only(vec!["public.kept".to_owned(), "public.leaving".to_owned()]);
    }
    let publication = config.publication();
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let (live, live_loads) = start_watched(&world, addr, "live").await;
    let (late, _) = start_watched(&world, addr, "late").await;
    let (live_db, late_db) = (world.replica_path("live"), world.replica_path("late"));
    world.wait_equal(&live_db, Duration::from_secs(60)).await;
    world.wait_equal(&late_db, Duration::from_secs(60)).await;
    late.stop().await;

    world
        .exec(&format!(
            "ALTER PUBLICATION {publication} DROP TABLE leaving"
        ))
        .await;
    wait_columns(&live_db, "leaving", &[]).await;
    // It stays out (the watch does not put it back), and the rest syncs.
    world.exec("INSERT INTO kept VALUES (101, 'after')").await;
    world.wait_equal(&live_db, Duration::from_secs(30)).await;
    assert_eq!(columns(&live_db, "leaving"), Vec::new());
    let published = world
        .count(&format!(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = '{publication}' AND tablename = 'leaving'"
        ))
        .await;
    assert_eq!(published, 0);

    // The late replica drops it at its welcome.
    let (late, _) = start_watched(&world, addr, "late").await;
    wait_columns(&late_db, "leaving", &[]).await;
    world.wait_equal(&late_db, Duration::from_secs(30)).await;

    // Put back: fetched alone.
    let before = live_loads.lock().unwrap().len();
    world
        .exec(&format!(
            "ALTER PUBLICATION {publication} ADD TABLE leaving"
        ))
        .await;
    wait_columns(&live_db, "leaving", &[("id", 1), ("v", 0)]).await;
    world
        .exec("UPDATE leaving SET v = 'back' WHERE id = 1")
        .await;
    world.wait_equal(&live_db, Duration::from_secs(30)).await;
    let (tables, _) = refetched(&live_loads, before);
    assert_eq!(tables, vec!["public.leaving".to_owned()]);
    live.stop().await;
    late.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_leaving_the_publication_is_dropped_from_replicas() {
    leaves_and_comes_back(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_leaving_an_explicit_lists_publication_is_dropped_from_replicas() {
    leaves_and_comes_back(true).await;
}
