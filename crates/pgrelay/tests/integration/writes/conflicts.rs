//! Conflicts: concurrent writers converge (last write wins), a stale write
//! under a version check is rolled back, and a rejection restores every row
//! the transaction wrote.

use std::time::Duration;

use futures_util::SinkExt;
use pgrelay_client::{Event, Replica};
use pgrelay_protocol::{RejectCode, ServerMessage};
use tokio_tungstenite::tungstenite::Message;

use super::{answer, local, wait_count, wait_outbox_drained, WAIT};
use crate::support::{start_client, World};

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
