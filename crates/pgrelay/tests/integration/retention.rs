//! Retention on a quiet database: when `--retain` prunes the change log
//! empty, its head stays where the log ended (it never moves backwards),
//! so a new client hydrates once and a returning client behind retention
//! is repaired (never told `gone`, never sent whole), before and after a
//! server restart.

use std::time::Duration;

use pgrelay_protocol::Lsn;
use pgrelay_server::Server;

use crate::support::{free_port, replica_lsn, start_counted_client, wait_for, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_database_past_retention_hydrates_once_and_repairs_a_returning_replica() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE notes (id int PRIMARY KEY, body text);
               INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 1000) g;",
        )
        .await;
    let mut config = world.server_config();
    config.retain = Duration::from_secs(1);
    // A fixed port, so clients reconnect to the restarted server by themselves.
    config.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let server = Server::start(config.clone()).await.unwrap();
    let addr = server.local_addr();

    // A client that syncs a write, then goes away.
    let returning_path = world.replica_path("returning");
    let (returning, _) = start_counted_client(addr, &returning_path, "returning").await;
    world.exec("INSERT INTO notes VALUES (1001, 'seen')").await;
    world
        .wait_equal(&returning_path, Duration::from_secs(30))
        .await;
    returning.stop().await;
    let position = replica_lsn(&returning_path).expect("a position");

    // One more write, then nothing for longer than --retain: the log is
    // pruned empty, past the returning client's position.
    world
        .exec("INSERT INTO notes VALUES (1002, 'missed')")
        .await;
    wait_for("the log pruned empty", Duration::from_secs(30), || async {
        let row = world
            .sql
            .query_one(
                "SELECT (SELECT count(*) FROM pgrelay.change_history),
                        (SELECT pruned_through::text FROM pgrelay.log_state)",
                &[],
            )
            .await
            .unwrap();
        let pruned: Lsn = row.get::<_, String>(1).parse().unwrap();
        (row.get::<_, i64>(0) == 0 && pruned > position).then_some(())
    })
    .await;

    // A new client while the log is empty.
    let early_path = world.replica_path("early");
    let (early, early_seen) = start_counted_client(addr, &early_path, "early").await;
    wait_for(
        "the early client caught up",
        Duration::from_secs(30),
        || async { (early_seen.lock().unwrap().caught_up >= 1).then_some(()) },
    )
    .await;

    // Restart with the log empty; the early client reconnects by itself.
    server.shutdown().await.unwrap();
    let server = Server::start(config).await.unwrap();
    let (late, late_seen) = start_counted_client(addr, &world.replica_path("late"), "late").await;
    let (back, back_seen) = start_counted_client(addr, &returning_path, "returning").await;
    wait_for(
        "every client caught up after the restart",
        Duration::from_secs(30),
        || async {
            (early_seen.lock().unwrap().caught_up >= 2
                && late_seen.lock().unwrap().caught_up >= 1
                && back_seen.lock().unwrap().caught_up >= 1)
                .then_some(())
        },
    )
    .await;

    // They stay synced: a write reaches all of them, with no more snapshots.
    world.exec("INSERT INTO notes VALUES (1003, 'after')").await;
    for name in ["early", "late", "returning"] {
        world
            .wait_equal(&world.replica_path(name), Duration::from_secs(30))
            .await;
    }
    let early_tally = early_seen.lock().unwrap().clone();
    let late_tally = late_seen.lock().unwrap().clone();
    let back_tally = back_seen.lock().unwrap().clone();
    assert_eq!(
        (early_tally.hydrations, early_tally.gone),
        (1, 0),
        "{early_tally:?}"
    );
    assert_eq!(
        (late_tally.hydrations, late_tally.gone),
        (1, 0),
        "{late_tally:?}"
    );
    // Behind retention: repaired range by range, not told `gone` and
    // not sent whole (promise 8).
    assert_eq!(
        (back_tally.hydrations, back_tally.gone, back_tally.repairs),
        (0, 0, 1),
        "{back_tally:?}"
    );
    for client in [early, late, back] {
        client.stop().await;
    }
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
