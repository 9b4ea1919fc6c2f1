//! Client writes (promises 4 and 5): local SQL writes reach PostgreSQL
//! exactly once, come back as the server's version of the row, survive a
//! server outage and a client crash, conflicts are resolved (last write
//! wins, or a version check that rolls the stale writer back), and a bad
//! batch is refused whole while the connection stays open.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pgrelay_client::{Event, Replica};
use pgrelay_protocol::{BatchRefusal, RejectCode, ServerMessage, WriteResults, WriteStatus};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{free_port, spawn_client, start_client, wait_for, ServerProcess, World};

const WAIT: Duration = Duration::from_secs(60);

/// One value from the replica's SQLite file.
fn local(path: &Path, sql: &str) -> Option<String> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.query_row(sql, [], |r| r.get::<_, Option<rusqlite::types::Value>>(0))
        .ok()
        .flatten()
        .map(|v| match v {
            rusqlite::types::Value::Integer(i) => i.to_string(),
            rusqlite::types::Value::Real(f) => f.to_string(),
            rusqlite::types::Value::Text(t) => t,
            other => format!("{other:?}"),
        })
}

async fn wait_outbox_drained(replica: &Replica) {
    wait_for("the outbox to drain", WAIT, || async {
        let report = replica.outbox(None, 0).await.ok()?;
        (report.unsent() == 0).then_some(())
    })
    .await;
}

async fn wait_count(world: &World, sql: &str, want: i64) {
    wait_for(&format!("{sql} = {want}"), WAIT, || async {
        (world.count(sql).await == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_write_ends_as_the_servers_version() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE todos (id bigint PRIMARY KEY, title text NOT NULL, done boolean NOT NULL DEFAULT false, \
               source text DEFAULT 'server-default', title_len int);
             CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN NEW.title := upper(NEW.title); NEW.title_len := length(NEW.title); RETURN NEW; END $$;
             CREATE TRIGGER stamp BEFORE INSERT OR UPDATE ON todos FOR EACH ROW EXECUTE FUNCTION stamp();",
        )
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("writer");
    let client = start_client(server.local_addr(), &path, "writer").await;
    let mut events = client.client.subscribe();
    world.wait_equal(&path, WAIT).await;

    let executed = client
        .client
        .execute("INSERT INTO todos (id, title) VALUES (1, 'buy milk'), (2, 'walk')")
        .await
        .unwrap();
    assert_eq!(executed.captured, 2);
    // Optimistic: the replica has the row at once, as written.
    assert_eq!(
        local(&path, "SELECT title FROM todos WHERE id = 1").as_deref(),
        Some("buy milk")
    );
    let applied = tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await.unwrap() {
                Event::WriteApplied { tx_id, changes, .. } => break (tx_id, changes),
                Event::WriteRejected { reason, .. } => panic!("rejected: {reason}"),
                _ => {}
            }
        }
    })
    .await
    .expect("the write's answer");
    assert_eq!(applied, (executed.tx_id.clone(), 2));
    // One client transaction, one PostgreSQL transaction, tagged with its origin.
    let tag = pgrelay_protocol::origin_tag("writer");
    let tagged = world
        .count(&format!(
            "SELECT count(DISTINCT lsn) FROM pgrelay.change_history WHERE origin_client = '{tag}'"
        ))
        .await;
    assert!(tagged <= 1);
    wait_count(
        &world,
        &format!("SELECT count(*) FROM pgrelay.change_history WHERE origin_client = '{tag}'"),
        2,
    )
    .await;

    // The echo replaces the optimistic row with PostgreSQL's: trigger and defaults.
    wait_for("the server's version locally", WAIT, || async {
        (local(&path, "SELECT title || '/' || done || '/' || source || '/' || title_len FROM todos WHERE id = 1").as_deref()
            == Some("BUY MILK/0/server-default/8"))
        .then_some(())
    })
    .await;
    client
        .client
        .execute("UPDATE todos SET title = 'oat milk', done = 1 WHERE id = 1; DELETE FROM todos WHERE id = 2")
        .await
        .unwrap();
    wait_count(
        &world,
        "SELECT count(*) FROM todos WHERE title = 'OAT MILK' AND done",
        1,
    )
    .await;
    wait_count(&world, "SELECT count(*) FROM todos", 1).await;
    world.wait_equal(&path, WAIT).await;
    wait_outbox_drained(&client.replica).await;
    let report = client.replica.outbox(None, 10).await.unwrap();
    assert_eq!((report.applied, report.rejected), (4, 0));

    // Writes made by another process on the same file (the CLI) are pushed too.
    let out = std::process::Command::new(crate::support::BIN)
        .args(["client", "exec", "--db"])
        .arg(&path)
        .arg("INSERT INTO todos (id, title) VALUES (3, 'from the cli')")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_count(
        &world,
        "SELECT count(*) FROM todos WHERE title = 'FROM THE CLI'",
        1,
    )
    .await;
    world.wait_equal(&path, WAIT).await;
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_converge() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE counters (id int PRIMARY KEY, a int NOT NULL DEFAULT 0, b int NOT NULL DEFAULT 0, who text);",
        )
        .await;
    let server = world.start_server().await;
    let paths = [world.replica_path("w1"), world.replica_path("w2")];
    let c1 = start_client(server.local_addr(), &paths[0], "w1").await;
    let c2 = start_client(server.local_addr(), &paths[1], "w2").await;
    // Rows written after the server started reach the replicas (snapshots
    // of older rows are another feature).
    world
        .exec("INSERT INTO counters (id) SELECT generate_series(1, 20)")
        .await;
    for path in &paths {
        world.wait_equal(path, WAIT).await;
    }

    let url = world.url().to_owned();
    let direct = tokio::spawn(async move {
        let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        for round in 0..200 {
            let id = round % 20 + 1;
            let sql = format!("UPDATE counters SET a = a + 1, who = 'pg' WHERE id = {id}");
            // An application retries a deadlock; so does this writer.
            for attempt in 0.. {
                match db.batch_execute(&sql).await {
                    Ok(()) => break,
                    Err(e) if attempt < 20 && e.as_db_error().is_some() => {}
                    Err(e) => panic!("{sql}: {e}"),
                }
            }
        }
    });
    let write = |client: std::sync::Arc<pgrelay_client::SyncClient>, name: &'static str| async move {
        for round in 0..200 {
            let id = (round * 7) % 20 + 1;
            let sql = match round % 4 {
                0 => format!("UPDATE counters SET b = b + 1, who = '{name}' WHERE id = {id}"),
                1 => format!("UPDATE counters SET a = {round}, who = '{name}' WHERE id IN ({id}, {})", id % 20 + 1),
                2 => format!("DELETE FROM counters WHERE id = {id}; INSERT INTO counters (id, who) VALUES ({id}, '{name}')"),
                _ => format!("INSERT INTO counters (id, who) VALUES ({}, '{name}') ON CONFLICT (id) DO UPDATE SET who = excluded.who", 100 + round % 5),
            };
            client.execute(sql).await.unwrap();
        }
    };
    let w1 = tokio::spawn(write(std::sync::Arc::clone(&c1.client), "w1"));
    let w2 = tokio::spawn(write(std::sync::Arc::clone(&c2.client), "w2"));
    direct.await.unwrap();
    w1.await.unwrap();
    w2.await.unwrap();

    wait_outbox_drained(&c1.replica).await;
    wait_outbox_drained(&c2.replica).await;
    for path in &paths {
        world.wait_equal(path, Duration::from_secs(120)).await;
    }
    // Both clients' writes reached PostgreSQL (some may lose races, e.g.
    // an insert of a key the other client inserted first: those are
    // rejected, rolled back and reported, never lost silently).
    for (client, name) in [(&c1, "w1"), (&c2, "w2")] {
        let report = client.replica.outbox(None, 1000).await.unwrap();
        assert_eq!(report.unsent(), 0);
        assert!(report.applied > 0, "{name}: nothing applied");
        for entry in report.entries.iter().filter(|e| e.status == "rejected") {
            assert!(
                entry.error.is_some(),
                "{name}: a rejection without a reason"
            );
        }
    }
    c1.stop().await;
    c2.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_writes_arrive_exactly_once_after_the_server_returns() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE notes (id bigint PRIMARY KEY, body text)")
        .await;
    let port = free_port();
    let mut server = ServerProcess::spawn(world.url(), &world.slot(), port);
    let path = world.replica_path("offline");
    let client = start_client(server.addr, &path, "offline").await;
    world.wait_equal(&path, WAIT).await;

    server.kill9();
    for n in 1..=1000 {
        client
            .client
            .execute(format!("INSERT INTO notes VALUES ({n}, 'note {n}')"))
            .await
            .unwrap();
    }
    let report = client.replica.outbox(None, 0).await.unwrap();
    assert_eq!(report.unsent(), 1000);
    assert_eq!(world.count("SELECT count(*) FROM notes").await, 0);

    let server = ServerProcess::spawn(world.url(), &world.slot(), port);
    wait_count(&world, "SELECT count(*) FROM notes", 1000).await;
    wait_outbox_drained(&client.replica).await;
    world.wait_equal(&path, WAIT).await;
    // The replica held the rows before the server did: wait for capture
    // before counting what the change log holds.
    wait_count(
        &world,
        "SELECT count(*) FROM pgrelay.change_history WHERE table_name = 'public.notes' AND operation = 'insert'",
        1000,
    )
    .await;
    assert_eq!(
        world
            .count("SELECT count(*) FROM pgrelay.change_history WHERE table_name = 'public.notes' AND operation = 'insert'")
            .await,
        1000
    );
    assert_eq!(
        world
            .count("SELECT count(*) FROM pgrelay.applied_changes WHERE client_id = 'offline'")
            .await,
        1000
    );
    // In order: the ids committed in the order they were written.
    assert_eq!(
        world
            .count("SELECT count(*) FROM (SELECT (data->>'id')::int AS id, lag((data->>'id')::int) OVER (ORDER BY lsn, ordinal) AS prev FROM pgrelay.change_history WHERE table_name = 'public.notes') s WHERE prev > id")
            .await,
        0
    );
    client.stop().await;
    drop(server);
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_push_loses_nothing_and_duplicates_nothing() {
    const ROWS: i64 = 20_000;
    let world = World::new().await;
    world
        .exec("CREATE TABLE events (id bigint PRIMARY KEY, payload text)")
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("pusher");
    let mut child = spawn_client(server.local_addr(), &path, "pusher", true);
    assert!(child.wait().unwrap().success());

    // Local writes made without a connection, by the application's own
    // SQLite connection: each row is a client transaction of its own.
    {
        let mut conn = rusqlite::Connection::open(&path).unwrap();
        let tx = conn.transaction().unwrap();
        for n in 1..=ROWS {
            tx.execute("INSERT INTO events VALUES (?1, 'payload ' || ?1)", [n])
                .unwrap();
        }
        tx.commit().unwrap();
    }
    let mut child = spawn_client(server.local_addr(), &path, "pusher", false);
    wait_for("the push to be part-way", WAIT, || async {
        (world.count("SELECT count(*) FROM events").await > 0).then_some(())
    })
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = world.count("SELECT count(*) FROM events").await;
    assert!(at_kill < ROWS, "the kill came too late to test anything");

    let mut child = spawn_client(server.local_addr(), &path, "pusher", true);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    assert_eq!(world.count("SELECT count(*) FROM events").await, ROWS);
    // The client exits once PostgreSQL has answered its writes; capture
    // into the change log may still be under way.
    wait_count(
        &world,
        "SELECT count(*) FROM pgrelay.change_history WHERE table_name = 'public.events'",
        ROWS,
    )
    .await;
    assert_eq!(
        world
            .count("SELECT count(*) FROM pgrelay.change_history WHERE table_name = 'public.events'")
            .await,
        ROWS,
        "each write committed exactly once"
    );
    let replica = Replica::open(&path).unwrap();
    let report = replica.outbox(None, 0).await.unwrap();
    assert_eq!(
        (report.applied, report.unsent(), report.rejected),
        (ROWS, 0, 0)
    );
    world.wait_equal(&path, WAIT).await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_write_under_a_version_check_is_rolled_back() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE docs (id int PRIMARY KEY, body text, version int NOT NULL DEFAULT 1);
             CREATE TABLE notes (id int PRIMARY KEY, body text);
             CREATE FUNCTION bump() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN NEW.version := OLD.version + 1; RETURN NEW; END $$;
             CREATE TRIGGER bump BEFORE UPDATE ON docs FOR EACH ROW EXECUTE FUNCTION bump();",
        )
        .await;
    let mut config = world.server_config();
    config.conflicts = vec![("docs".to_owned(), "version".to_owned())];
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let path = world.replica_path("stale");
    let client = start_client(server.local_addr(), &path, "stale").await;
    world
        .exec(
            "INSERT INTO docs (id, body) VALUES (1, 'original'), (2, 'untouched');
             INSERT INTO notes VALUES (1, 'original');",
        )
        .await;
    world.wait_equal(&path, WAIT).await;
    client.stop().await;

    // Offline, the client edits rows it read at version 1 ...
    let replica = Replica::open(&path).unwrap();
    replica
        .execute("UPDATE docs SET body = 'mine' WHERE id = 1; UPDATE notes SET body = 'mine' WHERE id = 1")
        .await
        .unwrap();
    replica
        .execute("UPDATE docs SET body = 'mine too' WHERE id = 2")
        .await
        .unwrap();
    drop(replica);
    // ... while someone else changes row 1 on the server (version 2).
    world
        .exec("UPDATE docs SET body = 'theirs' WHERE id = 1; UPDATE notes SET body = 'theirs' WHERE id = 1")
        .await;

    let client = start_client(server.local_addr(), &path, "stale").await;
    wait_outbox_drained(&client.replica).await;
    let report = client.replica.outbox(None, 10).await.unwrap();
    assert_eq!((report.rejected, report.applied), (2, 1), "{report:?}");
    let rejected = report
        .entries
        .iter()
        .find(|e| e.status == "rejected")
        .unwrap();
    let error = rejected.error.as_deref().unwrap();
    assert!(
        error.contains("Conflict") && error.contains("version = 1"),
        "{error}"
    );
    // The whole client transaction was refused (the notes update with it),
    // and the replica is back to the server's rows.
    world.wait_equal(&path, WAIT).await;
    assert_eq!(
        local(
            &path,
            "SELECT body || '/' || version FROM docs WHERE id = 1"
        )
        .as_deref(),
        Some("theirs/2")
    );
    assert_eq!(
        local(&path, "SELECT body FROM notes WHERE id = 1").as_deref(),
        Some("theirs")
    );
    // The write based on the current version went through.
    assert_eq!(
        world
            .count("SELECT count(*) FROM docs WHERE id = 2 AND body = 'mine too' AND version = 2")
            .await,
        1
    );

    // Without a version check the last write wins.
    client
        .client
        .execute("UPDATE notes SET body = 'last' WHERE id = 1")
        .await
        .unwrap();
    wait_count(&world, "SELECT count(*) FROM notes WHERE body = 'last'", 1).await;
    world.wait_equal(&path, WAIT).await;
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

/// Sends `frame` and returns the server's answer to it, skipping the stream.
async fn answer<S>(socket: &mut S, frame: String) -> ServerMessage
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures_util::Sink<Message>
        + Unpin,
    <S as futures_util::Sink<Message>>::Error: std::fmt::Debug,
{
    socket.send(Message::Text(frame.into())).await.unwrap();
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

fn post_changes(addr: SocketAddr, body: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "POST /api/changes HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batches_are_refused_and_nothing_partial_is_applied() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL CHECK (n >= 0))")
        .await;
    let server = world.start_server().await;
    let addr = server.local_addr();
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/api/sync"))
        .await
        .unwrap();
    socket
        .send(Message::Text(
            r#"{"type":"hello","protocol_version":1,"client_id":"raw"}"#.into(),
        ))
        .await
        .unwrap();

    let refused = |m: ServerMessage| match m {
        ServerMessage::WriteRefused { code, message, .. } => {
            assert!(!message.is_empty());
            code
        }
        other => panic!("expected write_refused, got {other:?}"),
    };
    // Not a batch at all.
    let m = answer(
        &mut socket,
        r#"{"type":"write","transactions":"nope"}"#.into(),
    )
    .await;
    assert_eq!(refused(m), BatchRefusal::MalformedBatch);
    // A good transaction next to an impossible one: refused whole.
    let m = answer(
        &mut socket,
        r#"{"type":"write","transactions":[
            {"id":"good","changes":[{"id":"g1","table":"public.t","op":"insert","new":{"id":"1","n":"1"}}]},
            {"id":"bad","changes":[{"id":"b1","table":"public.t","op":"truncate"}]}]}"#
            .into(),
    )
    .await;
    assert_eq!(refused(m), BatchRefusal::MalformedBatch);
    assert_eq!(world.count("SELECT count(*) FROM t").await, 0);
    // Too many transactions.
    let txs: Vec<String> = (0..=pgrelay_protocol::MAX_WRITE_TRANSACTIONS)
        .map(|n| format!(r#"{{"id":"t{n}","changes":[{{"id":"c{n}","table":"public.t","op":"insert","new":{{"id":"{n}","n":"0"}}}}]}}"#))
        .collect();
    let m = answer(
        &mut socket,
        format!(r#"{{"type":"write","transactions":[{}]}}"#, txs.join(",")),
    )
    .await;
    assert_eq!(refused(m), BatchRefusal::BatchTooLarge);
    // A frame over the limit.
    let m = answer(
        &mut socket,
        format!(
            r#"{{"type":"write","transactions":[],"pad":"{}"}}"#,
            "x".repeat(pgrelay_protocol::MAX_CLIENT_FRAME_BYTES)
        ),
    )
    .await;
    assert_eq!(refused(m), BatchRefusal::BatchTooLarge);
    assert_eq!(world.count("SELECT count(*) FROM t").await, 0);

    // Per transaction: each bad one is rejected with its reason, the rest apply.
    let batch = r#"{"type":"write","batch_id":"b1","transactions":[
        {"id":"ok","changes":[{"id":"k1","table":"public.t","op":"insert","new":{"id":"1","n":"1"}},
                              {"id":"k2","table":"public.t","op":"insert","new":{"id":"2","n":"2"}}]},
        {"id":"column","changes":[{"id":"x1","table":"public.t","op":"insert","new":{"id":"3","nope":"1"}}]},
        {"id":"type","changes":[{"id":"x2","table":"public.t","op":"insert","new":{"id":"4","n":"four"}}]},
        {"id":"check","changes":[{"id":"x3","table":"public.t","op":"insert","new":{"id":"5","n":"5"}},
                                 {"id":"x4","table":"public.t","op":"update","old":{"id":"1"},"new":{"n":"-1"}}]},
        {"id":"table","changes":[{"id":"x5","table":"public.nope","op":"insert","new":{"id":"6"}}]},
        {"id":"dup","changes":[{"id":"x6","table":"public.t","op":"insert","new":{"id":"2","n":"9"}}]}]}"#;
    let m = answer(&mut socket, batch.to_owned()).await;
    let ServerMessage::WriteResult(WriteResults {
        batch_id, results, ..
    }) = m
    else {
        panic!("expected write_result, got {m:?}");
    };
    assert_eq!(batch_id.as_deref(), Some("b1"));
    let summary: Vec<(&str, WriteStatus, Option<RejectCode>)> = results
        .iter()
        .map(|r| (r.id.as_str(), r.status, r.code))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("ok", WriteStatus::Applied, None),
            (
                "column",
                WriteStatus::Rejected,
                Some(RejectCode::UnknownColumn)
            ),
            (
                "type",
                WriteStatus::Rejected,
                Some(RejectCode::InvalidValue)
            ),
            (
                "check",
                WriteStatus::Rejected,
                Some(RejectCode::ConstraintViolation)
            ),
            (
                "table",
                WriteStatus::Rejected,
                Some(RejectCode::UnknownTable)
            ),
            (
                "dup",
                WriteStatus::Rejected,
                Some(RejectCode::ConstraintViolation)
            ),
        ]
    );
    for r in &results[1..] {
        assert!(r.reason.as_deref().is_some_and(|s| !s.is_empty()), "{r:?}");
    }
    // The rejected `check` transaction reports the rows it touched as the
    // server has them: row 5 absent (its insert was undone), row 1 unchanged.
    let check = &results[3];
    assert_eq!(check.rows.len(), 2, "{check:?}");
    assert!(check
        .rows
        .iter()
        .any(|r| r.key["id"].as_deref() == Some("5") && r.row.is_none()));
    assert!(check
        .rows
        .iter()
        .any(|r| r.key["id"].as_deref() == Some("1")
            && r.row
                .as_ref()
                .is_some_and(|row| row["n"].as_deref() == Some("1"))));
    assert_eq!(
        world.count("SELECT count(*) FROM t").await,
        2,
        "only the good transaction's rows"
    );

    // Resent after a lost answer: answered applied, applied nothing twice.
    let m = answer(&mut socket, batch.to_owned()).await;
    let ServerMessage::WriteResult(again) = m else {
        panic!("expected write_result, got {m:?}");
    };
    assert_eq!(again.results[0].status, WriteStatus::Applied);
    assert!(again.results[0].duplicate);
    assert_eq!(world.count("SELECT count(*) FROM t").await, 2);

    // The same body over HTTP, with the client id.
    let body = batch.replace(r#""type":"write","#, r#""client_id":"raw","#);
    let (status, response) = tokio::task::spawn_blocking(move || post_changes(addr, &body))
        .await
        .unwrap();
    assert_eq!(status, 200, "{response}");
    let over_http: WriteResults = serde_json::from_str(&response).unwrap();
    assert!(over_http.results[0].duplicate);
    assert_eq!(over_http.results[2].code, Some(RejectCode::InvalidValue));
    let (status, response) = tokio::task::spawn_blocking(move || {
        post_changes(
            addr,
            r#"{"client_id":"raw","transactions":[{"id":"t","changes":[]}]}"#,
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 400, "{response}");
    assert!(response.contains("malformed_batch"), "{response}");
    let (status, _) = tokio::task::spawn_blocking(move || {
        post_changes(addr, r#"{"client_id":"http","transactions":[{"id":"h","changes":[{"id":"h1","table":"public.t","op":"insert","new":{"id":"10","n":"10"}}]}]}"#)
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(world.count("SELECT count(*) FROM t").await, 3);

    // The connection is still open and still streams.
    let m = answer(
        &mut socket,
        r#"{"type":"write","transactions":[{"id":"last","changes":[{"id":"l1","table":"public.t","op":"delete","old":{"id":"10"}}]}]}"#.into(),
    )
    .await;
    assert!(
        matches!(m, ServerMessage::WriteResult(ref r) if r.results[0].status == WriteStatus::Applied),
        "{m:?}"
    );
    assert_eq!(world.count("SELECT count(*) FROM t").await, 2);
    let _ = socket.close(None).await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

/// Read-your-writes: `execute_and_wait` returns once the replica holds the
/// PostgreSQL transaction carrying the write (found by origin and the
/// `(lsn_floor, lsn]` bounds of `write_result`), so the very next local
/// read shows the row as PostgreSQL committed it; a refused write is an
/// error, already rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_and_wait_reads_the_servers_version_of_its_own_write() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE todos (id bigint PRIMARY KEY, title text NOT NULL CHECK (length(title) < 40), \
               source text DEFAULT 'server-default');
             CREATE FUNCTION shout() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN NEW.title := upper(NEW.title); RETURN NEW; END $$;
             CREATE TRIGGER shout BEFORE INSERT OR UPDATE ON todos FOR EACH ROW EXECUTE FUNCTION shout();",
        )
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("ryw");
    let client = start_client(server.local_addr(), &path, "ryw").await;
    world.wait_equal(&path, WAIT).await;

    for i in 1..=5 {
        let executed = client
            .client
            .execute_and_wait(
                format!("INSERT INTO todos (id, title) VALUES ({i}, 'write {i}')"),
                WAIT,
            )
            .await
            .expect("applied and back in the replica");
        assert_eq!(executed.captured, 1);
        // No waiting here: the replica already has PostgreSQL's version.
        assert_eq!(
            local(
                &path,
                &format!("SELECT title || '/' || source FROM todos WHERE id = {i}")
            )
            .as_deref(),
            Some(format!("WRITE {i}/server-default").as_str())
        );
    }

    let refused = client
        .client
        .execute_and_wait(
            format!(
                "INSERT INTO todos (id, title) VALUES (99, '{}')",
                "x".repeat(60)
            ),
            WAIT,
        )
        .await;
    match refused {
        Err(pgrelay_client::ClientError::WriteRejected { reason, .. }) => {
            assert!(reason.contains("check"), "{reason}")
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(
        local(&path, "SELECT count(*) FROM todos WHERE id = 99").as_deref(),
        Some("0")
    );
    client.stop().await;
}

/// A rejected transaction names every row it wrote, so the replica gets
/// each back: both rows of an update that changed half of a two-column
/// key, and the row of a change the server could not even plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_restores_every_row_the_transaction_wrote() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE pairs (a int, b int, note text, PRIMARY KEY (a, b), CHECK (b < 3));
             INSERT INTO pairs VALUES (1, 1, 'one'), (1, 2, 'two');",
        )
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("keys");
    let client = start_client(server.local_addr(), &path, "keys").await;
    world.wait_equal(&path, WAIT).await;
    let mut events = client.client.subscribe();
    // The replica has no CHECK: the move succeeds locally, the server
    // refuses it.
    let moved = client
        .client
        .execute("UPDATE pairs SET b = 5 WHERE a = 1 AND b = 1")
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await.unwrap() {
                Event::WriteRejected { tx_id, .. } if tx_id == moved.tx_id => break,
                Event::WriteApplied { tx_id, .. } if tx_id == moved.tx_id => {
                    panic!("the server took a row it must refuse")
                }
                _ => {}
            }
        }
    })
    .await
    .expect("the rejection");
    world.wait_equal(&path, WAIT).await;
    assert_eq!(
        local(
            &path,
            "SELECT group_concat(a || ':' || b, ',') FROM (SELECT * FROM pairs ORDER BY a, b)"
        )
        .as_deref(),
        Some("1:1,1:2")
    );

    // Over the wire: an insert next to a change naming a column the table
    // does not have; the rejection reports both rows.
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/api/sync", server.local_addr()))
            .await
            .unwrap();
    socket
        .send(Message::Text(
            r#"{"type":"hello","protocol_version":1,"client_id":"raw","last_lsn":"0/0"}"#.into(),
        ))
        .await
        .unwrap();
    let m = answer(
        &mut socket,
        r#"{"type":"write","transactions":[{"id":"t","changes":[
            {"id":"k1","table":"public.pairs","op":"insert","new":{"a":"7","b":"1"}},
            {"id":"k2","table":"public.pairs","op":"insert","new":{"a":"8","b":"1","nope":"x"}}]}]}"#
            .into(),
    )
    .await;
    let ServerMessage::WriteResult(results) = m else {
        panic!("expected write_result, got {m:?}");
    };
    let result = &results.results[0];
    assert_eq!(result.code, Some(RejectCode::UnknownColumn));
    let mut keys: Vec<String> = result
        .rows
        .iter()
        .map(|r| {
            format!(
                "{}:{}",
                r.key["a"].as_deref().unwrap(),
                r.key["b"].as_deref().unwrap()
            )
        })
        .collect();
    keys.sort();
    assert_eq!(keys, vec!["7:1", "8:1"]);
    assert!(result.rows.iter().all(|r| r.row.is_none()));
    let _ = socket.close(None).await;
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
