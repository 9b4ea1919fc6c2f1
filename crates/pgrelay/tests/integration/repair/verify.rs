//! `pgrelay verify` names the key ranges (and rows) where a replica differs.

use std::time::Duration;

use pgrelay::cmd::verify::{explain, verify, RowDifference};
use pgrelay_protocol::repair::KeyValue;

use crate::support::{start_client, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_points_at_a_damaged_range() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 10000) g;")
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("damaged");
    let client = start_client(server.local_addr(), &path, "damaged").await;
    world.wait_equal(&path, Duration::from_secs(30)).await;
    client.stop().await;
    server.shutdown().await.unwrap();

    // Damage the replica behind pgrelay's back.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "DELETE FROM t WHERE id = 4000; UPDATE t SET v = 'damaged' WHERE id = 7000;",
    )
    .unwrap();
    drop(conn);

    let mut report = verify(world.url(), &path, None).await.unwrap();
    assert!(!report.all_match());
    explain(world.url(), &path, &mut report, true)
        .await
        .unwrap();
    let check = report
        .tables
        .iter()
        .find(|t| t.table == "public.t")
        .unwrap();
    let inside = |id: i64| {
        let key = vec![KeyValue::Int(id)];
        check.ranges.iter().any(|r| {
            r.lo.as_ref().is_none_or(|lo| *lo <= key) && r.hi.as_ref().is_none_or(|hi| key < *hi)
        })
    };
    assert!(inside(4000) && inside(7000), "{:?}", check.ranges);
    // Small ranges: the rest of the table is not blamed.
    let blamed: u64 = check.ranges.iter().map(|r| r.pg_rows).sum();
    assert!(blamed <= 20, "{:?}", check.ranges);
    let rows: Vec<&RowDifference> = check.ranges.iter().flat_map(|r| &r.rows).collect();
    assert!(
        rows.contains(&&RowDifference::MissingInReplica(vec![KeyValue::Int(4000)])),
        "{rows:?}"
    );
    assert!(
        rows.contains(&&RowDifference::Differs(vec![KeyValue::Int(7000)])),
        "{rows:?}"
    );
    assert_eq!(rows.len(), 2, "{rows:?}");
    let text = report.render_table();
    assert!(
        text.contains("row (4000): missing in the replica"),
        "{text}"
    );
    world.db.drop_database().await.unwrap();
}
