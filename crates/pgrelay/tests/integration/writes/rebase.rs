//! Local writes never flicker (docs/writes.md, "Rebase"): while a local
//! write travels, another writer's older version of the row never
//! replaces it on the replica; once the server's answer lands the row
//! follows the server's order (last write wins).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::{wait_outbox_drained, WAIT};
use crate::support::{start_client, World};

/// Our writes; each one races the other writer's stream of updates. Each
/// sets both columns to values never written before (an update sends only
/// the columns it changed, so reusing `who` would leave PostgreSQL's `who`
/// to the other writer: a row no single writer wrote).
const ROUNDS: i64 = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_write_never_goes_backwards_while_another_writer_changes_the_row() {
    let world = World::new().await;
    // Every version of the row PostgreSQL commits, in commit order (updates
    // of one row serialize on its lock, so `n` follows commit order).
    world
        .exec(
            "CREATE TABLE cell (id int PRIMARY KEY, v bigint NOT NULL, who text NOT NULL);
             CREATE SCHEMA audit;
             CREATE TABLE audit.versions (n bigserial PRIMARY KEY, v bigint NOT NULL, who text NOT NULL);
             CREATE FUNCTION audit.record() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO audit.versions (v, who) VALUES (NEW.v, NEW.who); RETURN NEW; END $$;
             CREATE TRIGGER record AFTER INSERT OR UPDATE ON cell FOR EACH ROW EXECUTE FUNCTION audit.record();",
        )
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("me");
    let me = start_client(server.local_addr(), &path, "me").await;
    world.exec("INSERT INTO cell VALUES (1, 0, 'pg')").await;
    world.wait_equal(&path, WAIT).await;

    // The other writer: a busy stream of updates to the same row.
    let stop = Arc::new(AtomicBool::new(false));
    let url = world.url().to_owned();
    let writer_stop = Arc::clone(&stop);
    let writer = tokio::spawn(async move {
        let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut k = 1i64;
        while !writer_stop.load(Ordering::Relaxed) {
            db.batch_execute(&format!("UPDATE cell SET v = {k}, who = 'pg' WHERE id = 1"))
                .await
                .unwrap();
            k += 1;
        }
        k
    });

    // The watcher: every state of the row a reader of the replica sees.
    let seen: Arc<Mutex<Vec<(i64, String)>>> = Arc::default();
    let watcher = {
        let (seen, stop, path) = (Arc::clone(&seen), Arc::clone(&stop), path.clone());
        std::thread::spawn(move || {
            let conn = rusqlite::Connection::open_with_flags(
                &path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .unwrap();
            let mut read = conn
                .prepare("SELECT v, who FROM cell WHERE id = 1")
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                let row: Option<(i64, String)> =
                    read.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).ok();
                if let Some(row) = row {
                    let mut seen = seen.lock().unwrap();
                    if seen.last() != Some(&row) {
                        seen.push(row);
                    }
                }
                std::thread::yield_now();
            }
        })
    };

    for round in 1..=ROUNDS {
        me.client
            .execute_and_wait(
                format!(
                    "UPDATE cell SET v = {}, who = 'me{round}' WHERE id = 1",
                    -round
                ),
                WAIT,
            )
            .await
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let pg_writes = writer.await.unwrap();
    watcher.join().unwrap();
    wait_outbox_drained(&me.replica).await;
    world.wait_equal(&path, WAIT).await;

    // Place every state seen in PostgreSQL's commit order.
    let versions = world
        .sql
        .query("SELECT n, v, who FROM audit.versions ORDER BY n", &[])
        .await
        .unwrap();
    let position: HashMap<(i64, String), i64> = versions
        .iter()
        .map(|r| ((r.get::<_, i64>(1), r.get::<_, String>(2)), r.get(0)))
        .collect();
    let seen = seen.lock().unwrap().clone();
    let mut previous = 0;
    for state in &seen {
        let at = *position
            .get(state)
            .unwrap_or_else(|| panic!("the replica showed {state:?}, never in PostgreSQL"));
        assert!(
            at >= previous,
            "the row went backwards: {state:?} (version {at}) after version {previous}; seen: {seen:?}"
        );
        previous = at;
    }
    // Our writes raced the other writer's (its versions lie between ours),
    // and the watcher saw ours.
    let ours: Vec<i64> = versions
        .iter()
        .filter(|r| r.get::<_, String>(2).starts_with("me"))
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ours.len(), usize::try_from(ROUNDS).unwrap());
    let raced = ours.windows(2).filter(|w| w[1] > w[0] + 1).count();
    assert!(raced > 0, "no write of the other writer between ours");
    assert!(pg_writes > ROUNDS, "{pg_writes} writes of the other writer");
    assert!(
        seen.iter().any(|(_, who)| who.starts_with("me")),
        "{seen:?}"
    );
    // Last write wins: the replica ends at PostgreSQL's last version.
    let last = versions.last().unwrap();
    let final_row = super::local(&path, "SELECT v || '/' || who FROM cell WHERE id = 1");
    assert_eq!(
        final_row,
        Some(format!(
            "{}/{}",
            last.get::<_, i64>(1),
            last.get::<_, String>(2)
        ))
    );
    me.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
