//! The server refuses over-limit or out-of-order `write_part` frames
//! without harming anyone else.

use futures_util::SinkExt;
use pgrelay_protocol::{
    BatchRefusal, ClientChange, ClientMessage, Op, Row, ServerMessage, WritePart, WriteStatus,
    MAX_CLIENT_FRAME_BYTES, MAX_TRANSACTION_BYTES,
};
use tokio_tungstenite::tungstenite::Message;

use super::{insert, wait_count, TABLE, WAIT};
use crate::support::{start_client, World};

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
    crate::writes::next_answer(socket, WAIT).await
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
