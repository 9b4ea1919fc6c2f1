//! A following node publishes every transaction exactly once and in the
//! change log's order, whether the append's notice carried it (small
//! transactions: no read of PostgreSQL) or the node read it from the log
//! (big ones, and whatever does not follow its head), the two interleaved.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use pgrelay_protocol::{Lsn, ServerMessage, Transaction};
use pgrelay_server::Server;
use tokio_tungstenite::tungstenite::Message;

use crate::support::raw::{self, Socket};
use crate::support::World;

/// A body too big for a notice (PostgreSQL's limit is 8,000 bytes).
const BIG: usize = 9_000;

/// Reads transactions from `socket` until `want` ids arrived; fails on a
/// deadline rather than waiting forever.
async fn read_ids(socket: &mut Socket, seen: &mut Vec<Transaction>, want: usize) {
    let ids = |seen: &[Transaction]| seen.iter().map(|t| t.changes.len()).sum::<usize>();
    let read = async {
        while ids(seen) < want {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    if let Ok(ServerMessage::Tx(tx)) = serde_json::from_str(&text) {
                        seen.push(tx);
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("the follower's socket ended: {other:?}"),
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .is_err()
    {
        panic!(
            "the follower published {} of {want} rows within 60 s",
            ids(seen)
        );
    }
}

/// `pgrelay_followed_transactions_total` by source.
async fn followed(addr: SocketAddr, source: &str) -> u64 {
    let (_, body) = raw::http(addr, None, "GET", "/metrics").await;
    let key = format!("pgrelay_followed_transactions_total{{source=\"{source}\"}}");
    body.lines()
        .find_map(|line| line.strip_prefix(&key)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in:\n{body}"))
}

fn body(id: i32) -> String {
    if id % 3 == 0 {
        "x".repeat(BIG)
    } else {
        format!("small {id}")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_publishes_small_and_big_transactions_once_each_in_log_order() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE events (id int PRIMARY KEY, body text NOT NULL)")
        .await;
    let a = Server::start(world.server_config()).await.expect("node a");
    let b = Server::start(world.server_config()).await.expect("node b");
    assert!(a.capturing() && !b.capturing());
    let mut socket = raw::hello(b.local_addr(), "watcher", None).await;
    raw::read_to_caught_up(&mut socket).await;
    let mut seen = Vec::new();

    // One at a time, each seen before the next is written: every append
    // holds one transaction, so the small ones come in their notice and
    // the big ones are read.
    for id in 1..=12 {
        world
            .sql
            .execute("INSERT INTO events VALUES ($1, $2)", &[&id, &body(id)])
            .await
            .unwrap();
        read_ids(&mut socket, &mut seen, usize::try_from(id).unwrap()).await;
    }
    let (notice, log) = (
        followed(b.local_addr(), "notice").await,
        followed(b.local_addr(), "log").await,
    );
    assert!(
        notice >= 4 && log >= 4,
        "small from notices ({notice}), big read ({log})"
    );

    // Then bursts from four connections at once, small and big mixed, some
    // transactions of several rows: appends batch several transactions,
    // notices queue up while the follower reads.
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4 {
        let url = world.url().to_owned();
        writers.spawn(async move {
            let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            for i in 0..50 {
                let id = 100 + w * 1_000 + i * 2;
                if i % 4 == 0 {
                    // Two rows in one transaction.
                    db.batch_execute(&format!(
                        "BEGIN; INSERT INTO events VALUES ({id}, 'pair'); \
                         INSERT INTO events VALUES ({}, '{}'); COMMIT",
                        id + 1,
                        body(id + 1)
                    ))
                    .await
                    .unwrap();
                } else {
                    db.execute("INSERT INTO events VALUES ($1, $2)", &[&id, &body(id)])
                        .await
                        .unwrap();
                }
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    let rows = usize::try_from(world.count("SELECT count(*) FROM events").await).unwrap();
    read_ids(&mut socket, &mut seen, rows).await;

    // Exactly the change log, in its order: no gap, no duplicate.
    let logged: Vec<(Lsn, i32)> = world
        .sql
        .query(
            "SELECT lsn, (data->>'id')::int FROM pgrelay.change_history ORDER BY lsn, ordinal",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                Lsn(u64::from(r.get::<_, tokio_postgres::types::PgLsn>(0))),
                r.get(1),
            )
        })
        .collect();
    let published: Vec<(Lsn, i32)> = seen
        .iter()
        .flat_map(|t| {
            t.changes.iter().map(move |c| {
                let id = c.new.as_ref().and_then(|r| r.get("id").cloned().flatten());
                (t.lsn, id.and_then(|v| v.parse().ok()).unwrap_or(-1))
            })
        })
        .collect();
    assert_eq!(published.len(), rows);
    assert_eq!(
        published, logged,
        "the follower's stream is the change log, in order"
    );
    assert!(
        seen.windows(2).all(|w| w[0].lsn < w[1].lsn),
        "positions strictly increase"
    );
    let (notice, log) = (
        followed(b.local_addr(), "notice").await,
        followed(b.local_addr(), "log").await,
    );
    assert_eq!(
        usize::try_from(notice + log).unwrap(),
        seen.len(),
        "each transaction published once: {notice} from notices, {log} read"
    );
    drop(socket);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
