//! Writes outside a token's rules are rejected with a clear reason and
//! nothing of their transaction is applied; a row that changes tenant
//! leaves one client's replica and arrives in the other's.

use std::io::{Read, Write};
use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use pgrelay_client::Event;
use pgrelay_protocol::{RejectCode, ServerMessage, WriteStatus};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::{fixed, replica_rows, start_client, start_server, token, WAIT};
use crate::support::{wait_for, World};

const RULES: &str = r#"
default = "deny"
[tables.todos]
read  = "tenant = claims.tenant"
write = "tenant = claims.tenant"
[tables.projects]
read  = "owner = claims.sub OR claims.role = 'admin'"
"#;

async fn rejected(events: &mut tokio::sync::broadcast::Receiver<Event>, tx_id: &str) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(Event::WriteRejected { tx_id: id, reason }) if id == tx_id => return reason,
                Ok(Event::WriteApplied { tx_id: id, .. }) if id == tx_id => {
                    panic!("{tx_id} was applied")
                }
                _ => {}
            }
        }
    })
    .await
    .expect("an answer")
}

fn post(addr: SocketAddr, bearer: Option<&str>, body: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "POST /api/changes HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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
async fn writes_outside_the_rules_are_rejected_whole() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE todos (id int PRIMARY KEY, tenant text NOT NULL, title text);
             CREATE TABLE projects (id int PRIMARY KEY, owner text NOT NULL, name text);",
        )
        .await;
    let server = start_server(&world, RULES).await;
    world
        .exec(
            "INSERT INTO todos VALUES (1, 't1', 'mine'), (2, 't2', 'theirs');
             INSERT INTO projects VALUES (1, 'alice', 'p');",
        )
        .await;
    let alice = token(json!({"tenant": "t1", "sub": "alice"}));
    let path = world.replica_path("alice");
    let client = start_client(server.local_addr(), &path, "alice-1", fixed(alice.clone())).await;
    let mut events = client.client.subscribe();
    wait_for("alice's rows", WAIT, || async {
        let ok = replica_rows(&path, "todos").keys().eq([1].iter())
            && replica_rows(&path, "projects").contains_key(&1);
        ok.then_some(())
    })
    .await;

    // Another tenant's row: rejected, and the optimistic row disappears.
    let other = client
        .client
        .execute("INSERT INTO todos VALUES (3, 't2', 'sneaky')")
        .await
        .unwrap();
    let reason = rejected(&mut events, &other.tx_id).await;
    assert!(
        reason.contains("outside what your token may write"),
        "{reason}"
    );
    // Moving its own row to another tenant: rejected, rolled back to t1.
    let moved = client
        .client
        .execute("UPDATE todos SET tenant = 't2' WHERE id = 1")
        .await
        .unwrap();
    let reason = rejected(&mut events, &moved.tx_id).await;
    assert!(
        reason.contains("outside what your token may write"),
        "{reason}"
    );
    // One allowed and one forbidden change in one transaction: neither.
    let mixed = client
        .client
        .execute("INSERT INTO todos VALUES (4, 't1', 'fine'); INSERT INTO todos VALUES (5, 't2', 'not fine')")
        .await
        .unwrap();
    rejected(&mut events, &mixed.tx_id).await;
    // A read-only table.
    let read_only = client
        .client
        .execute("UPDATE projects SET name = 'renamed' WHERE id = 1")
        .await
        .unwrap();
    let reason = rejected(&mut events, &read_only.tx_id).await;
    assert!(reason.contains("not writable with your token"), "{reason}");
    // And an allowed write goes through.
    let fine = client
        .client
        .execute("INSERT INTO todos VALUES (6, 't1', 'allowed')")
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(Event::WriteApplied { tx_id, .. }) if tx_id == fine.tx_id => return,
                Ok(Event::WriteRejected { tx_id, reason }) if tx_id == fine.tx_id => {
                    panic!("rejected: {reason}")
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap();

    let rows = |sql: &'static str| {
        let world = &world;
        async move { world.count(sql).await }
    };
    assert_eq!(
        rows("SELECT count(*) FROM todos WHERE id IN (3, 4, 5)").await,
        0
    );
    assert_eq!(
        rows("SELECT count(*) FROM todos WHERE id = 1 AND tenant = 't1'").await,
        1
    );
    assert_eq!(rows("SELECT count(*) FROM todos WHERE id = 6").await, 1);
    assert_eq!(
        rows("SELECT count(*) FROM projects WHERE name = 'renamed'").await,
        0
    );
    wait_for("the replica back to the server's rows", WAIT, || async {
        let todos = replica_rows(&path, "todos");
        let ok = todos.keys().copied().collect::<Vec<_>>() == vec![1, 6]
            && todos[&1]["tenant"] == "t1"
            && replica_rows(&path, "projects")[&1]["name"] == "p";
        ok.then_some(())
    })
    .await;

    // A raw write naming another tenant's row by key: rejected, and the
    // rejection does not show that row.
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/api/sync", server.local_addr()))
            .await
            .unwrap();
    let hello =
        json!({"type": "hello", "protocol_version": 1, "client_id": "alice-raw", "token": alice});
    socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .unwrap();
    let write = json!({"type": "write", "batch_id": "b1", "transactions": [
        {"id": "raw-1", "changes": [{"id": "raw-1-c1", "table": "public.todos", "op": "update",
            "old": {"id": "2"}, "new": {"title": "defaced"}}]},
        {"id": "raw-2", "changes": [{"id": "raw-2-c1", "table": "public.todos", "op": "delete",
            "old": {"id": "2"}}]},
    ]});
    socket
        .send(Message::Text(write.to_string().into()))
        .await
        .unwrap();
    let results = tokio::time::timeout(WAIT, async {
        loop {
            let message = socket.next().await.unwrap().unwrap();
            if let Message::Text(text) = message {
                if let Ok(ServerMessage::WriteResult(results)) = serde_json::from_str(&text) {
                    return results;
                }
            }
        }
    })
    .await
    .unwrap();
    for result in &results.results {
        assert_eq!(result.status, WriteStatus::Rejected, "{result:?}");
        assert_eq!(result.code, Some(RejectCode::Forbidden), "{result:?}");
        assert!(
            result.rows.iter().all(|r| r.row.is_none()),
            "leaked {result:?}"
        );
    }
    assert_eq!(
        rows("SELECT count(*) FROM todos WHERE id = 2 AND title = 'theirs'").await,
        1
    );

    // POST /api/changes: a bearer token is required, and the rules apply.
    let body = json!({"client_id": "importer", "transactions": [{"id": "h1", "changes": [
        {"id": "h1-c1", "table": "public.todos", "op": "insert", "new": {"id": "7", "tenant": "t2"}}]}]})
    .to_string();
    let (status, answer) = post(server.local_addr(), None, &body);
    assert_eq!(status, 401, "{answer}");
    assert!(answer.contains("a token is required"), "{answer}");
    let (status, answer) = post(
        server.local_addr(),
        Some(&token(json!({"tenant": "t1", "sub": "importer"}))),
        &body,
    );
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("forbidden"), "{answer}");
    assert_eq!(rows("SELECT count(*) FROM todos WHERE id = 7").await, 0);

    wait_for("rejected writes in the audit log", WAIT, || async {
        let alice = world
            .count("SELECT count(*) FROM pgrelay.audit_log WHERE action = 'write_rejected' AND subject = 'alice'")
            .await;
        let importer = world
            .count("SELECT count(*) FROM pgrelay.audit_log WHERE action = 'write_rejected' AND subject = 'importer'")
            .await;
        (alice == 6 && importer == 1).then_some(())
    })
    .await;
    client.stop().await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_changing_tenant_moves_between_replicas() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE todos (id int PRIMARY KEY, tenant text NOT NULL, title text);
             CREATE TABLE projects (id int PRIMARY KEY, owner text NOT NULL, name text);",
        )
        .await;
    let server = start_server(&world, RULES).await;
    // The rule reads a column outside the key: the server set FULL identity.
    assert_eq!(
        world
            .count("SELECT count(*) FROM pg_class WHERE relname = 'todos' AND relreplident = 'f'")
            .await,
        1
    );
    let mut clients = Vec::new();
    for tenant in ["t1", "t2"] {
        let path = world.replica_path(tenant);
        let t = token(json!({"tenant": tenant, "sub": tenant}));
        clients.push((
            path.clone(),
            start_client(server.local_addr(), &path, tenant, fixed(t)).await,
        ));
    }
    world
        .exec("INSERT INTO todos VALUES (1, 't1', 'travelling'), (2, 't1', 'staying')")
        .await;
    wait_for("t1 has both rows", WAIT, || async {
        (replica_rows(&clients[0].0, "todos").len() == 2).then_some(())
    })
    .await;
    world
        .exec("UPDATE todos SET tenant = 't2' WHERE id = 1")
        .await;
    wait_for("row 1 to move from t1 to t2", WAIT, || async {
        let t1 = replica_rows(&clients[0].0, "todos");
        let t2 = replica_rows(&clients[1].0, "todos");
        let moved =
            t1.keys().eq([2].iter()) && t2.keys().eq([1].iter()) && t2[&1]["title"] == "travelling";
        moved.then_some(())
    })
    .await;
    // A snapshot applies the same rule (COPY with the rule's values bound
    // as settings): t1 is sent only its remaining row. A tenant name that
    // looks like SQL is just a value.
    for (tenant, want) in [
        (
            "t1",
            vec![("public.todos".to_owned(), "2\tt1\tstaying".to_owned())],
        ),
        ("t1' OR 'x' = 'x", vec![]),
    ] {
        let spy = super::Spy::connect(
            server.local_addr(),
            "snapshot-spy",
            &token(json!({"tenant": tenant})),
            None,
        )
        .await;
        spy.wait_caught_up().await;
        assert_eq!(spy.snapshot(), want, "snapshot for tenant {tenant:?}");
    }
    // Catch-up from the change log (and a fresh replica: a snapshot, then
    // the stream) applies the same rule: a replica that starts now ends
    // with the same rows.
    for tenant in ["t1", "t2"] {
        let path = world.replica_path(&format!("{tenant}-late"));
        let late = start_client(
            server.local_addr(),
            &path,
            &format!("{tenant}-late"),
            fixed(token(json!({"tenant": tenant}))),
        )
        .await;
        let want = if tenant == "t1" { vec![2] } else { vec![1] };
        wait_for("the late replica", WAIT, || async {
            (replica_rows(&path, "todos")
                .keys()
                .copied()
                .collect::<Vec<_>>()
                == want)
                .then_some(())
        })
        .await;
        late.stop().await;
    }
    for (_, client) in clients {
        client.stop().await;
    }
    server.shutdown().await.unwrap();
}
