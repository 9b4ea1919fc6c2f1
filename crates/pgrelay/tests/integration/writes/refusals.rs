//! A bad batch is refused whole, nothing partial is applied, and the
//! connection stays open; `POST /api/changes` answers the same way.

use std::io::{Read, Write};
use std::net::SocketAddr;

use futures_util::SinkExt;
use pgrelay_protocol::{BatchRefusal, RejectCode, ServerMessage, WriteResults, WriteStatus};
use tokio_tungstenite::tungstenite::Message;

use super::answer;
use crate::support::World;

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
