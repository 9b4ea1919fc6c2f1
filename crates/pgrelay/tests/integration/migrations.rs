//! pgrelay's own schema: a server starts on a database whose schema an
//! older server (before versioned migrations) created, and carries on with
//! the same change log.

use std::time::Duration;

use crate::support::{wait_for, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_upgrades_a_schema_made_before_migrations_and_keeps_its_log() {
    let world = World::new().await;
    world
        .exec(include_str!("fixtures/schema_before_migrations.sql"))
        .await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let log_id: String = world
        .sql
        .query_one("SELECT log_id FROM pgrelay.log_state", &[])
        .await
        .unwrap()
        .get(0);

    let server = world.start_server().await;
    world.exec("INSERT INTO t VALUES (1)").await;
    wait_for(
        "the insert in the change log",
        Duration::from_secs(30),
        || async {
            let row = world
                .sql
                .query_one("SELECT count(*) FROM pgrelay.change_history", &[])
                .await
                .unwrap();
            (row.get::<_, i64>(0) > 0).then_some(())
        },
    )
    .await;
    let row = world
        .sql
        .query_one(
            "SELECT (SELECT log_id FROM pgrelay.log_state),
                    (SELECT array_agg(version ORDER BY version) FROM pgrelay.schema_migrations)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), log_id, "the same change log");
    assert_eq!(row.get::<_, Vec<i32>>(1), vec![1, 2, 3, 4, 5, 6]);
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
