//! Snapshot hydration (promise 3): a new replica of busy tables ends equal
//! to PostgreSQL; a damaged chunk is fetched again, never kept; schema
//! changes reach a connected client without a full resync. (A replica
//! whose history was pruned is repaired: `repair::`.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pgrelay_client::Event;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{start_client, wait_for, World};

/// A `Hydrated` event: full, tables, rows, tables fetched again.
type Hydrated = (bool, Vec<String>, u64, Vec<String>);

/// Collects a client's `Hydrated` events.
fn hydrations(client: &crate::support::RunningClient) -> Arc<std::sync::Mutex<Vec<Hydrated>>> {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut events = client.client.subscribe();
    let sink = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            if let Event::Hydrated {
                full,
                tables,
                rows,
                refetched,
                ..
            } = event
            {
                sink.lock().unwrap().push((full, tables, rows, refetched));
            }
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hydrating_while_a_writer_is_busy_ends_equal() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE items (id bigint PRIMARY KEY, n int NOT NULL, note text);
             INSERT INTO items SELECT g, 0, 'row ' || g FROM generate_series(1, 120000) g;",
        )
        .await;
    let server = world.start_server().await;

    // Inserts, updates and deletes in small transactions, all through the
    // snapshot and the hand-over.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let writer = {
        let url = world.url().to_owned();
        let stop = Arc::clone(&stop);
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut i: i64 = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let id = 200_000 + i;
                let old = 1 + (i * 7919) % 120_000;
                db.batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO items VALUES ({id}, 1, 'new {i}');
                     UPDATE items SET n = n + 1 WHERE id = {old};
                     DELETE FROM items WHERE id = {} ;
                     COMMIT;",
                    id - 3
                ))
                .await
                .unwrap();
                done.store(i, Ordering::Relaxed);
            }
            i
        })
    };
    // Let the writer get going, so the snapshot lands mid-stream.
    wait_for("the writer to start", Duration::from_secs(10), || async {
        (done.load(Ordering::Relaxed) > 20).then_some(())
    })
    .await;

    let path = world.replica_path("hydrate");
    let client = start_client(server.local_addr(), &path, "hydrate").await;
    let seen = hydrations(&client);
    wait_for("the snapshot to load", Duration::from_secs(60), || async {
        (!seen.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    // Keep writing a while after the hand-over, then stop.
    let after = done.load(Ordering::Relaxed);
    wait_for(
        "more writes after the hand-over",
        Duration::from_secs(20),
        || async { (done.load(Ordering::Relaxed) > after + 50).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 50, "the writer ran only {writes} transactions");
    world.wait_equal(&path, Duration::from_secs(60)).await;

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "one snapshot expected: {seen:?}");
    let (full, tables, rows, refetched) = &seen[0];
    assert!(full);
    assert_eq!(tables, &vec!["public.items".to_owned()]);
    assert!(*rows >= 100_000, "snapshot held {rows} rows");
    assert!(refetched.is_empty());
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

/// A WebSocket relay that passes the first snapshot chunk it forwards
/// through `corrupt` (which decompresses, changes and compresses it
/// again, so the frame itself is well formed).
async fn corrupting_proxy(
    upstream: std::net::SocketAddr,
    corrupt: fn(&[u8]) -> Vec<u8>,
) -> (std::net::SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let corrupted = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&corrupted);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let flag = Arc::clone(&flag);
            tokio::spawn(async move {
                let Ok(client) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let Ok((server, _)) =
                    tokio_tungstenite::connect_async(format!("ws://{upstream}/api/sync")).await
                else {
                    return;
                };
                let (mut c_tx, mut c_rx) = client.split();
                let (mut s_tx, mut s_rx) = server.split();
                let up = async move {
                    while let Some(Ok(m)) = c_rx.next().await {
                        if s_tx.send(m).await.is_err() {
                            break;
                        }
                    }
                };
                let down = async move {
                    while let Some(Ok(m)) = s_rx.next().await {
                        let m = match m {
                            Message::Binary(b) if !flag.swap(true, Ordering::SeqCst) => {
                                Message::Binary(corrupt(&b).into())
                            }
                            other => other,
                        };
                        if c_tx.send(m).await.is_err() {
                            break;
                        }
                    }
                };
                tokio::join!(up, down);
            });
        }
    });
    (addr, corrupted)
}

/// A chunk frame whose COPY text `change` altered, compressed again.
fn recompressed(frame: &[u8], change: fn(&mut Vec<u8>)) -> Vec<u8> {
    let (table, seq, payload) = pgrelay_protocol::parse_chunk(frame).expect("a chunk frame");
    let mut raw = zstd::bulk::decompress(payload, 64 << 20).expect("decompress");
    change(&mut raw);
    let mut out = pgrelay_protocol::chunk_header(table, seq).to_vec();
    out.extend(zstd::bulk::compress(&raw, 1).unwrap());
    out
}

/// Where a digit is, from the middle of `raw` on.
fn digit_past_middle(raw: &[u8]) -> usize {
    (raw.len() / 2..raw.len())
        .find(|i| raw[*i].is_ascii_digit())
        .expect("a digit")
}

/// One digit changed in the middle: still valid COPY text and a valid
/// value, just not the one PostgreSQL holds (only the checksum can tell).
fn wrong_value(frame: &[u8]) -> Vec<u8> {
    recompressed(frame, |raw| {
        let at = digit_past_middle(raw);
        raw[at] = if raw[at] == b'7' { b'8' } else { b'7' };
    })
}

/// A byte that is not UTF-8 in the middle: text the client cannot take.
fn not_text(frame: &[u8]) -> Vec<u8> {
    recompressed(frame, |raw| {
        let at = digit_past_middle(raw);
        raw[at] = 0xff;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_chunk_is_fetched_again_not_kept() {
    damaged_chunk_is_fetched_again(wrong_value).await;
}

/// Refused where it is split into values (the connection's task, not the
/// replica's thread): the table is fetched again all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_of_malformed_text_is_fetched_again_not_kept() {
    damaged_chunk_is_fetched_again(not_text).await;
}

async fn damaged_chunk_is_fetched_again(corrupt: fn(&[u8]) -> Vec<u8>) {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g;",
        )
        .await;
    let server = world.start_server().await;
    let (proxy, corrupted) = corrupting_proxy(server.local_addr(), corrupt).await;
    let path = world.replica_path("damaged");
    let client = start_client(proxy, &path, "damaged").await;
    let seen = hydrations(&client);
    wait_for("the snapshot to load", Duration::from_secs(60), || async {
        (!seen.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    assert!(
        corrupted.load(Ordering::SeqCst),
        "the proxy never corrupted a chunk"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen[0].3,
        vec!["public.t".to_owned()],
        "the damaged table was not fetched again"
    );
    assert_eq!(seen[0].2, 20_000);
    world.wait_equal(&path, Duration::from_secs(30)).await;
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_reach_a_connected_client_without_a_full_resync() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE a (id int PRIMARY KEY, v text); INSERT INTO a SELECT g, 'v' FROM generate_series(1, 100) g;")
        .await;
    let mut config = world.server_config();
    config.table_poll_interval = Duration::from_millis(200);
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let path = world.replica_path("schema");
    let client = start_client(server.local_addr(), &path, "schema").await;
    let seen = hydrations(&client);
    world.wait_equal(&path, Duration::from_secs(30)).await;
    let replica_rows = |sql: &'static str| {
        let path = path.clone();
        async move {
            let conn = rusqlite::Connection::open(&path).ok()?;
            conn.query_row(sql, [], |r| r.get::<_, i64>(0)).ok()
        }
    };

    // TRUNCATE empties the replica's table.
    world
        .exec("TRUNCATE a; INSERT INTO a VALUES (1, 'after truncate');")
        .await;
    wait_for("the truncate", Duration::from_secs(20), || async {
        (replica_rows("SELECT count(*) FROM a").await == Some(1)).then_some(())
    })
    .await;

    // A new column appears and its values flow.
    world
        .exec("ALTER TABLE a ADD COLUMN score int; INSERT INTO a VALUES (2, 'x', 42);")
        .await;
    wait_for(
        "the new column's value",
        Duration::from_secs(20),
        || async {
            (replica_rows("SELECT score FROM a WHERE id = 2").await == Some(42)).then_some(())
        },
    )
    .await;

    // A new table starts syncing, rows written before it was noticed too.
    world
        .exec("CREATE TABLE b (id int PRIMARY KEY, w text); INSERT INTO b SELECT g, 'w' FROM generate_series(1, 500) g;")
        .await;
    wait_for("the new table's rows", Duration::from_secs(30), || async {
        (replica_rows("SELECT count(*) FROM b").await == Some(500)).then_some(())
    })
    .await;
    world.exec("INSERT INTO b VALUES (501, 'live');").await;
    world.wait_equal(&path, Duration::from_secs(30)).await;

    // A column added with a default fills existing rows in PostgreSQL
    // without streaming them: that table alone is fetched again.
    world
        .exec("ALTER TABLE a ADD COLUMN flag text NOT NULL DEFAULT 'yes'; INSERT INTO b VALUES (502, 'nudge');")
        .await;
    wait_for("the backfilled column", Duration::from_secs(30), || async {
        (replica_rows("SELECT count(*) FROM a WHERE flag = 'yes'").await == Some(2)).then_some(())
    })
    .await;
    world.wait_equal(&path, Duration::from_secs(30)).await;

    // A column type change re-hydrates that table alone.
    world
        .exec("ALTER TABLE a ALTER COLUMN score TYPE numeric(10,2); INSERT INTO a VALUES (3, 'y', 1.5);")
        .await;
    wait_for("the retyped table", Duration::from_secs(30), || async {
        (replica_rows("SELECT count(*) FROM a WHERE id = 3").await == Some(1)).then_some(())
    })
    .await;
    world.wait_equal(&path, Duration::from_secs(30)).await;

    let seen = seen.lock().unwrap().clone();
    assert!(seen[0].0, "the first snapshot is the full one");
    let later: Vec<_> = seen[1..].iter().map(|h| (h.0, h.1.clone())).collect();
    assert!(
        later.iter().all(|(full, _)| !full),
        "a schema change caused a full resync: {seen:?}"
    );
    assert!(
        later.iter().any(|(_, t)| t == &vec!["public.b".to_owned()]),
        "{seen:?}"
    );
    assert!(
        later.iter().any(|(_, t)| t == &vec!["public.a".to_owned()]),
        "{seen:?}"
    );
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
