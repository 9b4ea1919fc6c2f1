//! A replica repaired from the range digests it kept while it lived: the
//! server's transactions, its own local writes and a write the server
//! refused (rolled back) all changed rows after the digests were made.
//! Were a kept digest stale, the table's full digest would not match at
//! the end and the table would be fetched whole again.

use crate::support::{start_client, World};
use crate::writes::{wait_outbox_drained, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_digests_stay_true_through_live_applies_and_local_writes() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE t (id int PRIMARY KEY, v text CHECK (v <> 'refused'));
               INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 6000) g;",
        )
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("kept");
    let client = start_client(server.local_addr(), &path, "kept").await;
    world.wait_equal(&path, WAIT).await;
    client.replica.build_digests().await.unwrap();

    // Live, after the digests were made.
    world
        .exec(
            "UPDATE t SET v = 'live' WHERE id % 500 = 1;
               DELETE FROM t WHERE id BETWEEN 2000 AND 2010;
               INSERT INTO t VALUES (7000, 'live new'), (0, 'first');",
        )
        .await;
    client
        .client
        .execute(
            "INSERT INTO t VALUES (8000, 'local'); UPDATE t SET v = 'local edit' WHERE id = 4321;",
        )
        .await
        .unwrap();
    client
        .client
        .execute("UPDATE t SET v = 'refused' WHERE id = 1234")
        .await
        .unwrap();
    wait_outbox_drained(&client.replica).await;
    world.wait_equal(&path, WAIT).await;
    let report = client.replica.outbox(None, 10).await.unwrap();
    assert_eq!(report.rejected, 1, "{report:?}");
    client.stop().await;
    server.shutdown().await.unwrap();

    // Away: another change log, and rows change meanwhile.
    world
        .exec(
            "UPDATE pgrelay.log_state SET log_id = 'another';
               UPDATE t SET v = 'away' WHERE id IN (10, 3000, 5999); DELETE FROM t WHERE id = 4000;
               INSERT INTO t VALUES (9000, 'away new');",
        )
        .await;
    let server = world.start_server().await;
    let client = start_client(server.local_addr(), &path, "kept").await;
    let seen = super::watch(&client);
    world.wait_equal(&path, WAIT).await;
    crate::support::wait_for("the repair", WAIT, || async {
        (!seen.lock().unwrap().repairs.is_empty()).then_some(())
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    assert!(seen.hydrations.is_empty(), "sent whole again: {seen:?}");
    let (_, received, removed, refetch) = &seen.repairs[0];
    assert!(refetch.is_empty(), "a kept digest was stale: {refetch:?}");
    assert!(*received < 100 && *removed < 100, "{seen:?}");
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
