//! A lost slot, dropped or invalidated by PostgreSQL while a writer runs,
//! is reported (`/ready` fails, `pgrelay_slot_lost_total`, `/health`) and
//! every replica is made whole: a new change-log epoch, every client told
//! `gone` once and repaired range by range (never hydrated again), and nothing written while no slot
//! existed goes missing (promise 1).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgrelay_testkit::PrivateCluster;
use tokio::task::JoinHandle;

use crate::support::raw::{http, metric};
use crate::support::{start_counted_client, wait_for, RunningClient, Tally, World};

const ITEMS: &str = "CREATE TABLE items (id bigint PRIMARY KEY, n int NOT NULL, note text);
    INSERT INTO items SELECT g, 0, 'row ' || g FROM generate_series(1, 20000) g;
    CREATE SCHEMA side; CREATE TABLE side.hold (id int); CREATE TABLE side.filler (x text);";

/// Small transactions (insert, update, delete) on `items` until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicI64>,
    task: JoinHandle<i64>,
}

impl Writer {
    fn start(url: &str) -> Writer {
        let url = url.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicI64::new(0));
        let (stopped, counter) = (Arc::clone(&stop), Arc::clone(&done));
        let task = tokio::spawn(async move {
            let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut i: i64 = 0;
            while !stopped.load(Ordering::Relaxed) {
                i += 1;
                let old = 1 + (i * 7919) % 20_000;
                db.batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO items VALUES ({}, 1, 'new {i}');
                     UPDATE items SET n = n + 1 WHERE id = {old};
                     DELETE FROM items WHERE id = {};
                     COMMIT;",
                    100_000 + i,
                    100_000 + i - 3
                ))
                .await
                .unwrap();
                counter.store(i, Ordering::Relaxed);
            }
            i
        });
        Writer { stop, done, task }
    }

    async fn wait_for_more(&self, n: i64) {
        let from = self.done.load(Ordering::Relaxed);
        wait_for("the writer to go on", Duration::from_secs(30), || async {
            (self.done.load(Ordering::Relaxed) >= from + n).then_some(())
        })
        .await;
    }

    async fn stop(self) -> i64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

async fn log_id(world: &World) -> String {
    world
        .sql
        .query_one("SELECT log_id FROM pgrelay.log_state", &[])
        .await
        .unwrap()
        .get(0)
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Two live replicas of `items`, equal to PostgreSQL, and a writer.
async fn two_live_replicas(
    world: &World,
    addr: std::net::SocketAddr,
) -> Vec<(RunningClient, Arc<std::sync::Mutex<Tally>>)> {
    let mut clients = Vec::new();
    for name in ["a", "b"] {
        let path = world.replica_path(name);
        clients.push(start_counted_client(addr, &path, name).await);
        world.wait_equal(&path, Duration::from_secs(60)).await;
    }
    wait_for("ready", Duration::from_secs(30), || async {
        (http(addr, None, "GET", "/ready").await.0 == 200).then_some(())
    })
    .await;
    clients
}

/// After the loss: the writer stops, every replica ends equal to
/// PostgreSQL, each told `gone` once and repaired once (no second full
/// snapshot), and the
/// server is ready again.
async fn every_replica_made_whole(
    world: &World,
    addr: std::net::SocketAddr,
    writer: Writer,
    clients: Vec<(RunningClient, Arc<std::sync::Mutex<Tally>>)>,
    old_log: &str,
) {
    wait_for(
        "a new change-log epoch",
        Duration::from_secs(60),
        || async { (log_id(world).await != old_log).then_some(()) },
    )
    .await;
    writer.wait_for_more(20).await;
    let writes = writer.stop().await;
    assert!(writes > 40, "the writer ran only {writes} transactions");
    for name in ["a", "b"] {
        world
            .wait_equal(&world.replica_path(name), Duration::from_secs(90))
            .await;
    }
    for (client, tally) in clients {
        let tally = tally.lock().unwrap().clone();
        assert_eq!(tally.gone, 1, "told gone once: {tally:?}");
        // Repaired, never downloaded whole again (promise 8).
        assert_eq!(tally.hydrations, 1, "no second full snapshot: {tally:?}");
        assert_eq!(tally.repairs, 1, "repaired once: {tally:?}");
        client.stop().await;
    }
    wait_for("ready again", Duration::from_secs(30), || async {
        (http(addr, None, "GET", "/ready").await.0 == 200).then_some(())
    })
    .await;
    let (_, health) = http(addr, None, "GET", "/health").await;
    assert!(health.contains("\"slot_losses\":1"), "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_under_a_running_server_is_reported_and_every_replica_ends_equal() {
    let world = World::new().await;
    world.exec(ITEMS).await;
    let server = world.start_server().await;
    let addr = server.local_addr();
    let clients = two_live_replicas(&world, addr).await;
    let old_log = log_id(&world).await;
    let writer = Writer::start(world.url());
    writer.wait_for_more(20).await;

    // Change rows and, in the same transaction, end the walsender and drop
    // the slot; the transaction stays open, so its changes commit while no
    // slot of before exists, and a new slot cannot become consistent (nor
    // the new epoch start) before it ends.
    let gap = connect(world.url()).await;
    let slot = world.slot();
    wait_for("the slot dropped", Duration::from_secs(30), || async {
        gap.batch_execute(
            "BEGIN;
             UPDATE items SET note = 'changed while no slot existed' WHERE id = 5;
             DELETE FROM items WHERE id = 6;",
        )
        .await
        .unwrap();
        gap.execute(
            "SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots
             WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&slot],
        )
        .await
        .unwrap();
        match gap
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Ok(_) => Some(()),
            Err(_) => {
                // Taken again by the reconnecting server: try again.
                gap.batch_execute("ROLLBACK").await.unwrap();
                None
            }
        }
    })
    .await;

    let reasons = wait_for(
        "/ready to fail for the lost slot",
        Duration::from_secs(30),
        || async {
            let (status, body) = http(addr, None, "GET", "/ready").await;
            (status == 503 && body.contains("new change-log epoch")).then_some(body)
        },
    )
    .await;
    assert!(reasons.contains("dropped"), "{reasons}");
    assert_eq!(
        metric(addr, "pgrelay_slot_lost_total{reason=\"missing\"}").await,
        1.0
    );
    gap.batch_execute("COMMIT").await.unwrap();

    every_replica_made_whole(&world, addr, writer, clients, &old_log).await;
    assert_eq!(
        world
            .count(
                "SELECT count(*) FROM items WHERE id = 6 OR note = 'changed while no slot existed'"
            )
            .await,
        1
    );
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_invalidated_by_max_slot_wal_keep_size_is_reported_and_every_replica_ends_equal() {
    // The setting applies to every slot of a cluster: a private one.
    let cluster =
        tokio::task::spawn_blocking(|| PrivateCluster::start_with("max_slot_wal_keep_size = 16MB"))
            .await
            .unwrap()
            .expect("starting a private cluster");
    let world = World::on(&cluster.admin_url()).await;
    world.exec(ITEMS).await;
    let server = world.start_server().await;
    let addr = server.local_addr();
    let clients = two_live_replicas(&world, addr).await;
    let old_log = log_id(&world).await;
    let writer = Writer::start(world.url());
    writer.wait_for_more(20).await;

    // Hold the slot back while the server streams: logical decoding keeps
    // a slot's restart position at the start of a transaction still open
    // with changes. Then move the WAL on past max_slot_wal_keep_size and
    // checkpoint until PostgreSQL invalidates the slot.
    let holder = connect(world.url()).await;
    holder
        .batch_execute("BEGIN; INSERT INTO side.hold VALUES (1);")
        .await
        .unwrap();
    let slot = world.slot();
    wait_for(
        "PostgreSQL to invalidate the slot",
        Duration::from_secs(60),
        || async {
            world
                .exec(
                    "INSERT INTO side.filler SELECT repeat('x', 1000) FROM generate_series(1, 100)",
                )
                .await;
            world.exec("SELECT pg_switch_wal()").await;
            world.exec("CHECKPOINT").await;
            let status = world
                .sql
                .query_opt(
                    "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .unwrap()
                .map(|row| row.get::<_, Option<String>>(0));
            // Gone already: the server dropped the invalidated slot.
            matches!(
                status.as_ref().map(|s| s.as_deref()),
                None | Some(Some("lost"))
            )
            .then_some(())
        },
    )
    .await;

    // The new slot cannot become consistent while the holder is open.
    let reasons = wait_for(
        "/ready to fail for the lost slot",
        Duration::from_secs(30),
        || async {
            let (status, body) = http(addr, None, "GET", "/ready").await;
            (status == 503 && body.contains("new change-log epoch")).then_some(body)
        },
    )
    .await;
    assert!(reasons.contains("invalidated"), "{reasons}");
    assert_eq!(
        metric(addr, "pgrelay_slot_lost_total{reason=\"invalidated\"}").await,
        1.0
    );
    holder.batch_execute("COMMIT").await.unwrap();

    every_replica_made_whole(&world, addr, writer, clients, &old_log).await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
    drop(cluster);
}
