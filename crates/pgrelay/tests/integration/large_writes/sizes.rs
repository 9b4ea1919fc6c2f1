//! Property: transactions of any size the protocol allows (one frame or
//! many `write_part` frames) reach PostgreSQL once each, whole.

use pgrelay_protocol::{MAX_CLIENT_FRAME_BYTES, MAX_TRANSACTION_BYTES, MAX_WRITE_CHANGES};
use proptest::prelude::*;

use super::{check_once_and_atomic, insert, wait_count, TABLE, WAIT};
use crate::support::{start_client, wait_for, World};

/// The longest body a row gets: its change still fits one frame of
/// `MAX_CLIENT_FRAME_BYTES`.
const ROW_BODY_MAX: usize = 1_000_000;

/// One transaction to run in a property case: `rows` rows whose bodies add
/// up to about `bytes`.
#[derive(Clone, Debug)]
struct Shape {
    rows: usize,
    bytes: usize,
}

fn shape() -> impl Strategy<Value = Shape> {
    let rows = prop_oneof![1usize..50, 50usize..2_000, 2_000usize..=MAX_WRITE_CHANGES];
    (rows, 0.0f64..1.0).prop_map(|(rows, fill)| {
        // Up to the byte limit, less what the changes take besides bodies,
        // and no row over what one frame carries (a larger one is refused
        // as `TooLarge::Change`: tests/integration/large_writes/client.rs).
        let most = (MAX_TRANSACTION_BYTES * 9 / 10 - rows * 150).min(rows * ROW_BODY_MAX);
        Shape {
            rows,
            bytes: (most as f64 * fill * fill) as usize,
        }
    })
}

async fn run_case(shapes: Vec<Shape>, deltas: Vec<i64>) {
    let world = World::new().await;
    world.exec(TABLE).await;
    let server = world.start_server().await;
    let path = world.replica_path("sizes");
    let client = start_client(server.local_addr(), &path, "sizes").await;
    world.wait_equal(&path, WAIT).await;
    let mut expected: Vec<(u32, usize)> = Vec::new();
    // Ids of ten digits and `tx` of three, so rows of the same body length
    // encode to the same size.
    let mut base = 1_000_000_000u64;
    let mut tx = 100u32;
    let mut run = |rows: usize, body: usize, last: usize| {
        let sql = insert(tx, base, rows, body, last);
        expected.push((tx, rows));
        base += rows as u64;
        tx += 1;
        sql
    };

    // Around one frame: a probe of 100 rows sizes the rows; the same rows
    // with a longer last body land exactly `delta` bytes from the limit.
    let probe = client.client.execute(run(100, 9_000, 9_000)).await.unwrap();
    assert_eq!(probe.frames, 1);
    for delta in deltas {
        let target = (MAX_CLIENT_FRAME_BYTES as i64 + delta) as usize;
        let last = 9_000 + target - probe.bytes;
        let executed = client.client.execute(run(100, 9_000, last)).await.unwrap();
        if target <= MAX_CLIENT_FRAME_BYTES {
            assert_eq!(
                (executed.frames, executed.bytes),
                (1, target),
                "delta {delta}"
            );
        } else {
            assert!(executed.frames >= 2, "delta {delta}: {executed:?}");
        }
    }
    // The most changes a transaction may have.
    let full = client
        .client
        .execute(run(MAX_WRITE_CHANGES, 20, 20))
        .await
        .unwrap();
    assert_eq!(full.captured, MAX_WRITE_CHANGES);
    for shape in shapes {
        let body = shape.bytes / shape.rows;
        let executed = client
            .client
            .execute(run(shape.rows, body, body))
            .await
            .unwrap();
        assert!(
            executed.bytes <= MAX_TRANSACTION_BYTES,
            "{shape:?}: {executed:?}"
        );
    }

    let total: usize = expected.iter().map(|(_, rows)| rows).sum();
    wait_count(&world, "SELECT count(*) FROM big", total as i64).await;
    for (tx, rows) in &expected {
        check_once_and_atomic(&world, *tx, *rows as i64, "sizes").await;
    }
    wait_for("every write answered", WAIT, || async {
        let report = client.replica.outbox(None, 0).await.ok()?;
        (report.unsent() == 0).then_some(report)
    })
    .await;
    let report = client.replica.outbox(None, 0).await.unwrap();
    assert_eq!((report.applied, report.rejected), (total as i64, 0));
    world.wait_equal(&path, WAIT).await;
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

proptest! {
    // Each case is a fresh database, server and client, and up to a few
    // tens of MB of writes: seconds each.
    #![proptest_config(ProptestConfig {
        cases: 4,
        max_shrink_iters: 4,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Transactions just under, at and just over one frame, of 10,000
    /// changes, and of random sizes up to the limits all reach PostgreSQL
    /// once each, whole, and the replica ends equal to it.
    #[test]
    fn transactions_of_any_size_the_protocol_allows_reach_postgres_once(
        shapes in proptest::collection::vec(shape(), 1..3),
        near in -3i64..=3,
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run_case(shapes, vec![-1, 0, 1, near]));
    }
}
