//! A capturer cut off from PostgreSQL (its connections frozen, not closed)
//! is taken over; when the cut heals it finds its term over, stands down
//! and follows, and nothing is appended twice or lost.

use std::time::Duration;

use pgrelay_server::Server;

use super::{assert_log_exactly_once, proxy_to_postgres, wait_for_logged, write_accounts};
use crate::support::{start_client, wait_for, World};

const ROWS: i64 = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_capturer_is_fenced_off_and_nothing_is_logged_twice_or_lost() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL)")
        .await;
    let (proxy, through_proxy) = proxy_to_postgres(world.url()).await;

    // Node A reaches PostgreSQL through the proxy and starts first: it captures.
    let mut a_config = world.server_config();
    a_config.database_url = Some(through_proxy.into());
    a_config.capture_retry = Duration::from_millis(200);
    a_config.capture_lease = Duration::from_secs(1);
    let a = Server::start(a_config.clone()).await.expect("node A");
    assert!(a.capturing(), "the first node captures");
    let mut b_config = world.server_config();
    b_config.capture_retry = a_config.capture_retry;
    b_config.capture_lease = a_config.capture_lease;
    let b = Server::start(b_config).await.expect("node B");
    assert!(!b.capturing(), "a second node on the slot follows");

    let on_a = start_client(a.local_addr(), &world.replica_path("on-a"), "on-a").await;
    let on_b = start_client(b.local_addr(), &world.replica_path("on-b"), "on-b").await;
    let writer = tokio::spawn(write_accounts(
        world.url().to_owned(),
        ROWS,
        Duration::from_millis(10),
    ));
    wait_for_logged(&world, ROWS / 4).await;

    proxy.freeze();
    wait_for("node B to take over", Duration::from_secs(30), || async {
        b.capturing().then_some(())
    })
    .await;
    let logged = world
        .count("SELECT count(*) FROM pgrelay.change_history")
        .await;
    wait_for("node B to append", Duration::from_secs(30), || async {
        (world
            .count("SELECT count(*) FROM pgrelay.change_history")
            .await
            > logged)
            .then_some(())
    })
    .await;
    proxy.release();
    wait_for("node A to stand down", Duration::from_secs(30), || async {
        (!a.capturing() && a.stand_downs() >= 1).then_some(())
    })
    .await;
    let term: i64 = world
        .sql
        .query_one(
            "SELECT term FROM pgrelay.capture WHERE slot = $1",
            &[&world.slot()],
        )
        .await
        .unwrap()
        .get(0);
    assert!(term >= 2, "the takeover started a new term ({term})");

    writer.await.unwrap();
    world
        .wait_equal(on_b.replica.path(), Duration::from_secs(60))
        .await;
    world
        .wait_equal(on_a.replica.path(), Duration::from_secs(60))
        .await;
    assert_log_exactly_once(&world, ROWS).await;
    assert!(b.capturing() && !a.capturing(), "one capturer at the end");

    on_a.stop().await;
    on_b.stop().await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
