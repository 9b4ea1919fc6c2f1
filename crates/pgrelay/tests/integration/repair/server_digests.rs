//! The digests the server keeps of each table: a repair's first round
//! reads from PostgreSQL only the ranges the change log says were written
//! since they were made, and the replica still ends equal to PostgreSQL,
//! whatever was written while they were made and after.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pgrelay_protocol::repair::{starts_bucket, starts_sub_bucket, KeyValue};

use super::Seen;
use crate::support::raw::metric;
use crate::support::{start_client, wait_for, RunningClient, World};
use crate::writes::WAIT;

/// Keys in `range` (of `step`) that start a bucket (or not).
fn keys(range: std::ops::Range<i64>, step: usize, starting: bool) -> Vec<i64> {
    range
        .step_by(step)
        .filter(|&k| starts_bucket(&vec![KeyValue::Int(k)]) == starting)
        .collect()
}

/// Starts client `id` on the replica at `path`, waits until it equals
/// PostgreSQL after a repair, and checks it was not sent whole again.
async fn repaired(world: &World, addr: SocketAddr, path: &Path, id: &str) -> (RunningClient, Seen) {
    let client = start_client(addr, path, id).await;
    let seen = super::watch(&client);
    world.wait_equal(path, WAIT).await;
    wait_for("the repair", WAIT, || async {
        (!seen.lock().unwrap().repairs.is_empty()).then_some(())
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    assert!(seen.hydrations.is_empty(), "sent whole again: {seen:?}");
    (client, seen)
}

async fn wait_kept(addr: SocketAddr, builds: f64) {
    wait_for("the server's kept digests", WAIT, || async move {
        (metric(addr, "pgrelay_repair_kept_builds_total").await >= builds).then_some(())
    })
    .await;
}

/// A replica away while 0.02 % of 100,000 rows changed (and the change
/// log was reset): the server made its digests after, and a few more rows
/// changed since, some at bucket bounds. Most first-round ranges come
/// from the kept digests; the server reads a fraction of the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_back_after_a_log_reset_is_repaired_mostly_from_the_servers_kept_digests() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE items (id bigint PRIMARY KEY, n int NOT NULL, note text);
             INSERT INTO items SELECT g * 2, g % 97, 'item number ' || g FROM generate_series(1, 100000) g;",
        )
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("away");
    let client = start_client(server.local_addr(), &path, "away").await;
    world.wait_equal(&path, WAIT).await;
    client.replica.build_digests().await.unwrap();
    client.stop().await;
    server.shutdown().await.unwrap();

    // Away: another change log, and 20 rows change.
    world
        .exec(
            "UPDATE pgrelay.log_state SET log_id = 'another';
             UPDATE items SET n = -1 WHERE id % 20000 = 2;
             DELETE FROM items WHERE id % 20000 = 10;
             INSERT INTO items SELECT g * 20000 + 5, 0, 'new' FROM generate_series(1, 9) g;",
        )
        .await;
    let server = world.start_server().await;
    let addr = server.local_addr();
    wait_kept(addr, 1.0).await;
    // Since the server made them: a bucket-starting key deleted, one
    // inserted, a row moved across buckets, a row updated.
    let starting = keys(150_000..200_000, 2, true);
    let new_start = keys(150_001..200_001, 2, true)[0];
    world
        .exec(&format!(
            "DELETE FROM items WHERE id = {};
             INSERT INTO items VALUES ({new_start}, 1, 'a new bucket');
             UPDATE items SET id = 1999 WHERE id = 120000;
             UPDATE items SET note = 'since' WHERE id = 40000;",
            starting[0]
        ))
        .await;

    let (client, seen) = repaired(&world, addr, &path, "away").await;
    assert!(seen.repairs[0].3.is_empty(), "refetched: {seen:?}");
    // About 780 first-round ranges, and the sub-bucket parts of the
    // second round: more ranges come from kept digests than the first
    // round has. Rows read: the buckets written since, and the few
    // sub-buckets that differ (not the differing buckets whole).
    let kept = metric(addr, "pgrelay_repair_kept_parts_total").await;
    let read = metric(addr, "pgrelay_repair_read_rows_total").await;
    let first_round = buckets(world.url()).await;
    assert!(
        kept > first_round,
        "{kept} ranges from kept digests, {first_round} in the first round"
    );
    assert!(read < 10_000.0, "the server read {read} rows of 100,000");
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

/// Buckets of the integer-keyed table `items` (the first round's ranges).
async fn buckets(url: &str) -> f64 {
    let (sql, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let rows = sql
        .query("SELECT id FROM items ORDER BY id", &[])
        .await
        .unwrap();
    let starts = rows
        .iter()
        .skip(1)
        .filter(|r| starts_bucket(&vec![KeyValue::Int(r.get(0))]))
        .count();
    (starts + 1) as f64
}

/// A bucket the replica differs in at one sub-bucket, while another of
/// its sub-buckets was written after the server made its digests: the
/// second round reads the written one from PostgreSQL (its kept sum is
/// stale, and equals the replica's), and answers the other from the
/// kept sums. Were the stale sum taken, the written row would never be
/// repaired and the table would be fetched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_bucket_written_since_the_kept_digests_is_read_not_taken_as_kept() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE items (id bigint PRIMARY KEY, note text);
             INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 20000) g;",
        )
        .await;
    // A bucket with at least three sub-buckets: its first holds `x`, its
    // last `y`.
    let starts: Vec<i64> = (2..=20_000)
        .filter(|&k| starts_bucket(&vec![KeyValue::Int(k)]))
        .collect();
    let (x, y) = starts
        .windows(2)
        .find(|w| {
            (w[0] + 1..w[1])
                .filter(|&k| starts_sub_bucket(&vec![KeyValue::Int(k)]))
                .count()
                >= 2
        })
        .map(|w| (w[0], w[1] - 1))
        .unwrap();
    let server = world.start_server().await;
    let path = world.replica_path("split");
    let client = start_client(server.local_addr(), &path, "split").await;
    world.wait_equal(&path, WAIT).await;
    client.replica.build_digests().await.unwrap();
    client.stop().await;
    server.shutdown().await.unwrap();
    world
        .exec(&format!(
            "UPDATE pgrelay.log_state SET log_id = 'another';
             UPDATE items SET note = 'away' WHERE id = {x};"
        ))
        .await;
    let server = world.start_server().await;
    let addr = server.local_addr();
    wait_kept(addr, 1.0).await;
    world
        .exec(&format!("UPDATE items SET note = 'since' WHERE id = {y};"))
        .await;

    let (client, seen) = repaired(&world, addr, &path, "split").await;
    assert!(seen.repairs[0].3.is_empty(), "fetched again: {seen:?}");
    // The second round's sub-bucket parts came from kept sums too.
    let kept = metric(addr, "pgrelay_repair_kept_parts_total").await;
    let first_round = buckets(world.url()).await;
    assert!(
        kept > first_round,
        "{kept} from kept, {first_round} buckets"
    );
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

/// Writes racing the making of the kept digests (a writer runs while the
/// server opens its snapshot and reads the table) and more after it,
/// moving rows across bucket bounds, deleting bucket-starting keys and
/// inserting new ones: the repair that uses them ends equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_racing_the_kept_digests_leave_the_repair_true() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t SELECT g * 2, 'v' || g FROM generate_series(1, 100000) g;",
        )
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("raced");
    let client = start_client(server.local_addr(), &path, "raced").await;
    world.wait_equal(&path, WAIT).await;
    client.replica.build_digests().await.unwrap();
    client.stop().await;
    server.shutdown().await.unwrap();
    world
        .exec("UPDATE pgrelay.log_state SET log_id = 'another'; UPDATE t SET v = 'away' WHERE id % 5000 = 0;")
        .await;

    // The writer runs from before the server starts until it has made
    // its digests; its writes stay in the first fiftieth of the keys (so
    // most buckets stay clean). At most 900 rounds of at most 5 changes,
    // with the ones after, stay under 5 % of the rows (the server's limit
    // for using kept digests) however slowly the server starts: the
    // digests are used.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = tokio::spawn(write_until(
        world.url().to_owned(),
        Arc::clone(&writing),
        0,
        900,
    ));
    let server = world.start_server().await;
    let addr = server.local_addr();
    wait_kept(addr, 1.0).await;
    writing.store(false, Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written > 0);
    // And after: the same kinds of writes, once more, and far away.
    let again = Arc::new(AtomicBool::new(false));
    write_until(world.url().to_owned(), again, 1_000_000, 1).await;
    world
        .exec("UPDATE t SET v = 'far' WHERE id = 25000; DELETE FROM t WHERE id = 27000;")
        .await;

    let (client, _) = repaired(&world, addr, &path, "raced").await;
    let kept = metric(addr, "pgrelay_repair_kept_parts_total").await;
    assert!(kept > 0.0, "no range came from kept digests");
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

/// Writes to keys below 3,000 (and rows moved up to 4,000), one
/// transaction each, while `writing` holds (at least one round, at most
/// `most`); returns the rounds written. `seed` varies the keys.
async fn write_until(url: String, writing: Arc<AtomicBool>, seed: i64, most: i64) -> i64 {
    let (sql, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let starting = keys(2..3_000, 2, true);
    let new_starts = keys(1..3_000, 2, true);
    let mut round = 0i64;
    loop {
        let at = 2 * (1 + (round * 7_919 + seed) % 1_499);
        let start = starting[usize::try_from(round).unwrap() % starting.len()];
        let new_start = new_starts[usize::try_from(round + seed).unwrap() % new_starts.len()];
        // Each may fail (the row moved or the key is taken already): a
        // failed write changes nothing, which is fine here.
        for statement in [
            format!("UPDATE t SET id = {} WHERE id = {at}", at + 1_001),
            format!("DELETE FROM t WHERE id = {start}"),
            format!("INSERT INTO t VALUES ({new_start}, 'new start {round}')"),
            format!("UPDATE t SET v = 'w{round}' WHERE id = {}", at + 2),
            format!("INSERT INTO t VALUES ({start}, 'back {round}') ON CONFLICT (id) DO UPDATE SET v = 'back'"),
        ] {
            let _ = sql.batch_execute(&statement).await;
        }
        round += 1;
        if !writing.load(Ordering::Relaxed) || round >= most {
            return round;
        }
    }
}

/// Tables truncated and refilled with the same keys, or rewritten by a
/// type change that logs no row change, after the server made its
/// digests: the repair does not take them (the log's truncate, the
/// table's new storage) and the replica ends equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_truncated_or_rewritten_after_the_digests_were_made_are_read_again() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE a (id int PRIMARY KEY, v text);
             INSERT INTO a SELECT g, 'v' || g FROM generate_series(1, 5000) g;
             CREATE TABLE b (id int PRIMARY KEY, price numeric(10, 2));
             INSERT INTO b SELECT g, g / 4.0 FROM generate_series(1, 5000) g;",
        )
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("rewritten");
    let client = start_client(server.local_addr(), &path, "rewritten").await;
    world.wait_equal(&path, WAIT).await;
    client.replica.build_digests().await.unwrap();
    client.stop().await;
    server.shutdown().await.unwrap();
    world
        .exec("UPDATE pgrelay.log_state SET log_id = 'another';")
        .await;
    let server = world.start_server().await;
    let addr = server.local_addr();
    wait_kept(addr, 2.0).await;
    world
        .exec(
            "TRUNCATE a; INSERT INTO a SELECT g, 'again ' || g FROM generate_series(1, 5000) g;
             ALTER TABLE b ALTER COLUMN price TYPE numeric(12, 4);",
        )
        .await;
    let client = start_client(addr, &path, "rewritten").await;
    world.wait_equal(&path, WAIT).await;
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
