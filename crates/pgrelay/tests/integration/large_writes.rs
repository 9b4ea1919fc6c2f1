//! Large client transactions (promises 4 and 5): any local transaction the
//! protocol allows — up to 10,000 changes and `MAX_TRANSACTION_BYTES` on
//! the wire, in one frame or in `write_part` frames — reaches PostgreSQL
//! once, in one PostgreSQL transaction; a larger one is refused by
//! `execute` and never enters the outbox; the server refuses an over-limit
//! or out-of-order multi-part write without harming anyone else; and a
//! write the client cannot send is set aside with its rows restored.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pgrelay_client::{ClientError, Replica};
use pgrelay_protocol::{
    BatchRefusal, ClientChange, ClientMessage, Op, Row, ServerMessage, TooLarge, WritePart,
    WriteStatus, MAX_CLIENT_FRAME_BYTES, MAX_TRANSACTION_BYTES, MAX_WRITE_CHANGES,
};
use proptest::prelude::*;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{spawn_client, start_client, wait_for, World, BIN};

const WAIT: Duration = Duration::from_secs(120);
const TABLE: &str = "CREATE TABLE big (id bigint PRIMARY KEY, tx int NOT NULL, body text NOT NULL)";

/// SQL inserting `rows` rows of transaction `tx` (ids `base`..), each body
/// `body` characters long, the last one `last` characters.
fn insert(tx: u32, base: u64, rows: usize, body: usize, last: usize) -> String {
    format!(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {max}) \
         INSERT INTO big (id, tx, body) \
         SELECT {base} + i, {tx}, substr(replace(hex(zeroblob(len / 2 + 1)), '0', 'x'), 1, len) \
         FROM (SELECT i, CASE WHEN i = {max} THEN {last} ELSE {body} END AS len FROM n)",
        max = rows - 1
    )
}

fn local_count(path: &Path, sql: &str) -> i64 {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

async fn wait_count(world: &World, sql: &str, want: i64) {
    wait_for(&format!("{sql} = {want}"), WAIT, || async {
        (world.count(sql).await == want).then_some(())
    })
    .await;
}

/// Each transaction's rows committed once, in one PostgreSQL transaction,
/// as the client's write (its echo is recognised by origin).
async fn check_once_and_atomic(world: &World, tx: u32, rows: i64, origin: &str) {
    let origin = pgrelay_protocol::origin_tag(origin);
    let history = format!(
        "SELECT count(*) FROM pgrelay.change_history WHERE table_name = 'public.big' AND data->>'tx' = '{tx}'"
    );
    wait_count(world, &history, rows).await;
    let lsns = format!(
        "SELECT count(DISTINCT lsn) FROM pgrelay.change_history WHERE table_name = 'public.big' AND data->>'tx' = '{tx}'"
    );
    assert_eq!(
        world.count(&lsns).await,
        1,
        "transaction {tx} split in PostgreSQL"
    );
    let echoed = format!(
        "SELECT count(*) FROM pgrelay.change_history WHERE table_name = 'public.big' AND data->>'tx' = '{tx}' AND origin_client = '{origin}'"
    );
    assert_eq!(
        world.count(&echoed).await,
        rows,
        "transaction {tx} not tagged with its origin"
    );
}

/// The reproduction from the issue, through the CLI: one `client exec` of
/// 1,000 rows of 400 characters (about 504 KB on the wire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_rows_of_400_characters_reach_postgres() {
    let world = World::new().await;
    world.exec(TABLE).await;
    let server = world.start_server().await;
    let path = world.replica_path("cli");
    let mut first = spawn_client(server.local_addr(), &path, "cli", true);
    assert!(first.wait().unwrap().success());

    let out = Command::new(BIN)
        .args(["client", "exec", "--db"])
        .arg(&path)
        .arg(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000) \
             INSERT INTO big (id, tx, body) SELECT i, 1, hex(randomblob(200)) FROM n",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let executed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(executed["captured"], 1000, "{executed}");
    let bytes = executed["bytes"].as_u64().unwrap() as usize;
    assert!(
        bytes > 500_000 && bytes <= MAX_CLIENT_FRAME_BYTES,
        "{executed}"
    );

    let mut sync = spawn_client(server.local_addr(), &path, "cli", true);
    let status = tokio::task::spawn_blocking(move || sync.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    assert_eq!(world.count("SELECT count(*) FROM big").await, 1000);
    check_once_and_atomic(&world, 1, 1000, "cli").await;
    let verify = Command::new(BIN)
        .args(["verify", "--database-url", world.url(), "--db"])
        .arg(&path)
        .env("PGRELAY_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

/// A transaction the protocol cannot carry is refused by `execute`, naming
/// the limit, and leaves the replica and its outbox as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_over_the_limit_is_refused_at_execute() {
    let world = World::new().await;
    world.exec(TABLE).await;
    world.exec("INSERT INTO big VALUES (1, 0, 'kept')").await;
    let server = world.start_server().await;
    let path = world.replica_path("limits");
    let client = start_client(server.local_addr(), &path, "limits").await;
    world.wait_equal(&path, WAIT).await;

    let many = client
        .client
        .execute(insert(2, 100, MAX_WRITE_CHANGES + 1, 1, 1))
        .await
        .unwrap_err();
    assert!(
        matches!(many, ClientError::TooLarge(TooLarge::Changes { changes }) if changes == MAX_WRITE_CHANGES + 1),
        "{many}"
    );
    assert!(many.to_string().contains("10000"), "{many}");
    // Nine rows of a million characters: each fits a frame, together over
    // the byte limit.
    let heavy = client
        .client
        .execute(insert(3, 100, 9, 1_000_000, 1_000_000))
        .await
        .unwrap_err();
    assert!(
        matches!(heavy, ClientError::TooLarge(TooLarge::Bytes { bytes }) if bytes > MAX_TRANSACTION_BYTES),
        "{heavy}"
    );
    assert!(
        heavy
            .to_string()
            .contains(&MAX_TRANSACTION_BYTES.to_string()),
        "{heavy}"
    );
    let wide = client
        .client
        .execute("UPDATE big SET body = substr(replace(hex(zeroblob(600000)), '0', 'x'), 1, 1100000) WHERE id = 1")
        .await
        .unwrap_err();
    assert!(
        matches!(wide, ClientError::TooLarge(TooLarge::Change { .. })),
        "{wide}"
    );

    // The CLI says the same and exits non-zero.
    let out = Command::new(BIN)
        .args(["client", "exec", "--db"])
        .arg(&path)
        .arg(insert(4, 100, MAX_WRITE_CHANGES + 1, 1, 1))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("10000") && stderr.contains("rolled back"),
        "{stderr}"
    );

    // Nothing of them was kept: not in the replica, not in the outbox.
    assert_eq!(local_count(&path, "SELECT count(*) FROM big"), 1);
    assert_eq!(
        local_count(&path, "SELECT body = 'kept' FROM big WHERE id = 1"),
        1
    );
    let report = client.replica.outbox(None, 10).await.unwrap();
    assert_eq!(
        (report.unsent(), report.rejected, report.applied),
        (0, 0, 0)
    );
    // And the replica goes on as before.
    client
        .client
        .execute(insert(5, 200, 3, 10, 10))
        .await
        .unwrap();
    wait_count(&world, "SELECT count(*) FROM big", 4).await;
    world.wait_equal(&path, WAIT).await;
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

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
        // Up to the byte limit, less what the changes take besides bodies.
        let most = MAX_TRANSACTION_BYTES * 9 / 10 - rows * 150;
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

/// A `write_part` of `changes` rows of `body` characters each.
fn part(tx: &str, n: u32, last: bool, first_id: usize, changes: usize, body: usize) -> String {
    let changes = (0..changes)
        .map(|i| {
            let id = first_id + i;
            let mut row = Row::new();
            row.insert("id".into(), Some(id.to_string()));
            row.insert("tx".into(), Some("9".into()));
            row.insert("body".into(), Some("y".repeat(body)));
            ClientChange {
                id: format!("{tx}-c{id}"),
                table: "public.big".into(),
                op: Op::Insert,
                new: Some(row),
                old: None,
            }
        })
        .collect();
    serde_json::to_string(&ClientMessage::WritePart(WritePart {
        batch_id: Some(format!("b-{tx}")),
        transaction_id: tx.into(),
        part: n,
        last,
        changes,
    }))
    .unwrap()
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn raw(addr: std::net::SocketAddr, id: &str) -> Socket {
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/api/sync"))
        .await
        .unwrap();
    // From the start of the change log: no snapshot to answer.
    let hello =
        format!(r#"{{"type":"hello","protocol_version":1,"client_id":"{id}","last_lsn":"0/0"}}"#);
    socket.send(Message::Text(hello.into())).await.unwrap();
    socket
}

/// Sends `frames` and returns the next answer to a write.
async fn send_parts(socket: &mut Socket, frames: Vec<String>) -> ServerMessage {
    for frame in frames {
        assert!(frame.len() <= MAX_CLIENT_FRAME_BYTES);
        socket.send(Message::Text(frame.into())).await.unwrap();
    }
    next_answer(socket).await
}

async fn next_answer(socket: &mut Socket) -> ServerMessage {
    tokio::time::timeout(WAIT, async {
        loop {
            let message = socket.next().await.expect("connection open").unwrap();
            if let Message::Text(text) = message {
                let m = serde_json::from_str::<ServerMessage>(&text).unwrap();
                if matches!(
                    m,
                    ServerMessage::WriteResult(_)
                        | ServerMessage::WriteRefused { .. }
                        | ServerMessage::Error { .. }
                ) {
                    return m;
                }
            }
        }
    })
    .await
    .expect("an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_bad_multi_part_writes_and_serves_everyone_else() {
    let world = World::new().await;
    world.exec(TABLE).await;
    let server = world.start_server().await;
    let addr = server.local_addr();
    let path = world.replica_path("bystander");
    let bystander = start_client(addr, &path, "bystander").await;
    world.wait_equal(&path, WAIT).await;
    let mut socket = raw(addr, "parts").await;

    // Nine full frames: over MAX_TRANSACTION_BYTES, refused once, nothing applied.
    let frames = (0..9u32)
        .map(|n| part("over", n, n == 8, n as usize * 10, 10, 100_000))
        .collect();
    match send_parts(&mut socket, frames).await {
        ServerMessage::WriteRefused {
            batch_id,
            code,
            message,
        } => {
            assert_eq!(batch_id.as_deref(), Some("b-over"));
            assert_eq!(code, BatchRefusal::BatchTooLarge);
            assert!(
                message.contains(&MAX_TRANSACTION_BYTES.to_string()),
                "{message}"
            );
        }
        other => panic!("expected write_refused, got {other:?}"),
    }
    // More changes than a transaction may have, in small frames.
    let frames = (0..3u32)
        .map(|n| part("many", n, n == 2, n as usize * 4_000, 4_000, 0))
        .collect();
    match send_parts(&mut socket, frames).await {
        ServerMessage::WriteRefused { code, message, .. } => {
            assert_eq!(code, BatchRefusal::BatchTooLarge);
            assert!(message.contains("10000"), "{message}");
        }
        other => panic!("expected write_refused, got {other:?}"),
    }
    // Out of order.
    let frames = vec![
        part("skip", 0, false, 0, 1, 1),
        part("skip", 2, true, 1, 1, 1),
    ];
    match send_parts(&mut socket, frames).await {
        ServerMessage::WriteRefused { code, .. } => assert_eq!(code, BatchRefusal::MalformedBatch),
        other => panic!("expected write_refused, got {other:?}"),
    }
    assert_eq!(world.count("SELECT count(*) FROM big").await, 0);

    // Meanwhile everyone else is served.
    bystander
        .client
        .execute(insert(1, 1, 2, 5, 5))
        .await
        .unwrap();
    wait_count(&world, "SELECT count(*) FROM big", 2).await;

    // The same connection then sends a good one in three parts: applied as
    // one transaction; sent again, recognised as a duplicate.
    let good: Vec<String> = (0..3u32)
        .map(|n| part("good", n, n == 2, 1_000 + n as usize * 5, 5, 150_000))
        .collect();
    match send_parts(&mut socket, good.clone()).await {
        ServerMessage::WriteResult(r) => {
            assert_eq!(
                (r.results[0].status, r.results[0].duplicate),
                (WriteStatus::Applied, false)
            );
        }
        other => panic!("expected write_result, got {other:?}"),
    }
    match send_parts(&mut socket, good).await {
        ServerMessage::WriteResult(r) => {
            assert_eq!(
                (r.results[0].status, r.results[0].duplicate),
                (WriteStatus::Applied, true)
            );
        }
        other => panic!("expected write_result, got {other:?}"),
    }
    wait_count(&world, "SELECT count(*) FROM big", 17).await;
    wait_count(
        &world,
        &format!(
            "SELECT count(*) FROM pgrelay.change_history WHERE table_name = 'public.big' AND origin_client = '{}'",
            pgrelay_protocol::origin_tag("parts")
        ),
        15,
    )
    .await;
    assert_eq!(
        world
            .count(&format!(
                "SELECT count(DISTINCT lsn) FROM pgrelay.change_history WHERE table_name = 'public.big' AND origin_client = '{}'",
                pgrelay_protocol::origin_tag("parts")
            ))
            .await,
        1
    );

    // A connection lost half-way: nothing of it is applied, and the whole
    // transaction sent again on a new connection is applied once.
    let lost: Vec<String> = (0..2u32)
        .map(|n| part("lost", n, n == 1, 2_000 + n as usize * 5, 5, 150_000))
        .collect();
    socket
        .send(Message::Text(lost[0].clone().into()))
        .await
        .unwrap();
    socket.close(None).await.unwrap();
    let mut again = raw(addr, "parts").await;
    match send_parts(&mut again, lost).await {
        ServerMessage::WriteResult(r) => {
            assert_eq!(
                (r.results[0].status, r.results[0].duplicate),
                (WriteStatus::Applied, false)
            );
        }
        other => panic!("expected write_result, got {other:?}"),
    }
    wait_count(&world, "SELECT count(*) FROM big", 27).await;
    world.wait_equal(&path, WAIT).await;
    let _ = again.close(None).await;
    bystander.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

/// A write the client can never send (a row over a frame, written on the
/// application's own SQLite connection, which `execute` does not see) is
/// set aside, and its rows come back as the server has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_too_large_to_send_is_set_aside_and_its_rows_restored() {
    let world = World::new().await;
    world.exec(TABLE).await;
    world
        .exec("INSERT INTO big VALUES (1, 0, 'original')")
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("aside");
    let mut first = spawn_client(server.local_addr(), &path, "aside", true);
    assert!(first.wait().unwrap().success());
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "UPDATE big SET body = substr(replace(hex(zeroblob(600000)), '0', 'x'), 1, 1100000) WHERE id = 1;
             INSERT INTO big VALUES (2, 0, substr(replace(hex(zeroblob(600000)), '0', 'x'), 1, 1100000));
             INSERT INTO big VALUES (3, 0, 'small');",
        )
        .unwrap();
    }
    let mut sync = spawn_client(server.local_addr(), &path, "aside", true);
    let status = tokio::task::spawn_blocking(move || sync.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    // The small write went through; the two large ones did not, and the
    // replica holds what the server has.
    assert_eq!(world.count("SELECT count(*) FROM big").await, 2);
    world.wait_equal(&path, WAIT).await;
    assert_eq!(
        local_count(
            &path,
            "SELECT count(*) FROM big WHERE id = 1 AND body = 'original'"
        ),
        1
    );
    let replica = Replica::open(&path).unwrap();
    let report = replica.outbox(Some("rejected".into()), 10).await.unwrap();
    assert_eq!(report.rejected, 2);
    for entry in &report.entries {
        let error = entry.error.as_deref().unwrap_or("");
        assert!(
            error.contains(&MAX_CLIENT_FRAME_BYTES.to_string()),
            "{error}"
        );
    }
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
