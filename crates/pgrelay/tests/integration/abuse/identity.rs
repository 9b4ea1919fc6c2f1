//! Client ids are bound to the token subject that first used them: another
//! subject can neither open a session under one (and have the owner closed
//! as `replaced`) nor pre-record its change ids, and no client learns
//! another's id from the `origin` of its transactions.

use futures_util::{SinkExt, StreamExt};
use pgrelay_protocol::ServerMessage;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::{one_change, post_changes};
use crate::auth::{token, Spy, SECRET, WAIT};
use crate::support::World;

async fn auth_server(world: &World) -> pgrelay_server::Server {
    let mut config = world.server_config();
    config.auth = Some(pgrelay_server::AuthConfig::new(
        pgrelay_server::JwtKey::Secret(SECRET.to_vec()),
    ));
    pgrelay_server::Server::start(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_under_another_subjects_client_id_is_refused() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let server = auth_server(&world).await;
    let addr = server.local_addr();
    let alice = Spy::connect(addr, "alice-phone", &token(json!({"sub": "alice"})), None).await;
    alice.wait_caught_up().await;

    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/api/sync"))
        .await
        .unwrap();
    let hello = json!({"type": "hello", "protocol_version": 1, "client_id": "alice-phone",
                       "token": token(json!({"sub": "mallory"}))});
    socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .unwrap();
    let (texts, code) = tokio::time::timeout(WAIT, async {
        let mut texts = Vec::new();
        while let Some(Ok(message)) = socket.next().await {
            match message {
                Message::Text(text) => texts.push(text.to_string()),
                Message::Close(frame) => return (texts, frame.map(|f| u16::from(f.code))),
                _ => {}
            }
        }
        (texts, None)
    })
    .await
    .expect("an answer");
    assert_eq!(code, Some(1008), "{texts:?}");
    assert!(
        texts
            .iter()
            .any(|t| t.contains("belongs to another token subject")),
        "{texts:?}"
    );
    // The owner was not replaced, and keeps receiving.
    world.exec("INSERT INTO t VALUES (1)").await;
    crate::support::wait_for("alice gets the insert", WAIT, || async {
        alice
            .messages()
            .iter()
            .any(|m| matches!(m, ServerMessage::Tx(_)))
            .then_some(())
    })
    .await;
    assert!(
        !alice
            .messages()
            .iter()
            .any(|m| matches!(m, ServerMessage::Error { .. })),
        "{:?}",
        alice.messages()
    );
    // The owner reconnects under its id with a fresh token of its subject.
    drop(alice);
    let again = Spy::connect(addr, "alice-phone", &token(json!({"sub": "alice"})), None).await;
    again.wait_caught_up().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_id_poisoned_by_another_subject_does_not_suppress_the_owners_write() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let server = auth_server(&world).await;
    let addr = server.local_addr();
    let alice = token(json!({"sub": "alice"}));
    let mallory = token(json!({"sub": "mallory"}));
    // Alice's client has written before: its id is hers.
    let first = one_change(
        "alice-1",
        "a0",
        json!({"table": "public.t", "op": "insert", "new": {"id": "0"}}),
    );
    let (status, answer) = post_changes(addr, Some(&alice), &first).await;
    assert_eq!(status, 200, "{answer}");

    // Mallory pre-records the change id Alice will use next.
    let poison = one_change(
        "alice-1",
        "a1",
        json!({"table": "public.t", "op": "insert", "new": {"id": "666"}}),
    );
    let (status, answer) = post_changes(addr, Some(&mallory), &poison).await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("forbidden"), "{answer}");

    let real = one_change(
        "alice-1",
        "a1",
        json!({"table": "public.t", "op": "insert", "new": {"id": "1"}}),
    );
    let (status, answer) = post_changes(addr, Some(&alice), &real).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"applied\""), "{answer}");
    assert!(!answer.contains("\"duplicate\":true"), "{answer}");
    assert_eq!(world.count("SELECT count(*) FROM t WHERE id = 1").await, 1);
    assert_eq!(
        world.count("SELECT count(*) FROM t WHERE id = 666").await,
        0
    );

    // Others see Alice's transactions with a tag, never her client id.
    let watcher = Spy::connect(addr, "bob-1", &token(json!({"sub": "bob"})), None).await;
    watcher.wait_caught_up().await;
    let more = one_change(
        "alice-1",
        "a2",
        json!({"table": "public.t", "op": "insert", "new": {"id": "2"}}),
    );
    assert_eq!(post_changes(addr, Some(&alice), &more).await.0, 200);
    let origin = crate::support::wait_for("the watcher gets alice's write", WAIT, || async {
        watcher.messages().iter().find_map(|m| match m {
            ServerMessage::Tx(tx) if tx.origin.is_some() => tx.origin.clone(),
            _ => None,
        })
    })
    .await;
    assert_ne!(origin, "alice-1");
    assert_eq!(origin, pgrelay_protocol::origin_tag("alice-1"));
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_id_recorded_by_another_subject_before_the_owner_connects_does_not_suppress_its_write(
) {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let server = auth_server(&world).await;
    let addr = server.local_addr();
    // A token without the owner claim owns nothing, so it may write under a
    // client id no one has claimed yet, such as one Carol's app will use.
    let ownerless = token(json!({"role": "writer"}));
    let poison = one_change(
        "carol-laptop",
        "c1",
        json!({"table": "public.t", "op": "insert", "new": {"id": "666"}}),
    );
    let (status, answer) = post_changes(addr, Some(&ownerless), &poison).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        world
            .count("SELECT count(*) FROM pgrelay.applied_changes WHERE change_id = 'c1-c1'")
            .await,
        1
    );
    // Carol's first write under her id uses the same change id: it is hers
    // to apply, not a duplicate of the other subject's.
    let carol = token(json!({"sub": "carol"}));
    let real = one_change(
        "carol-laptop",
        "c1",
        json!({"table": "public.t", "op": "insert", "new": {"id": "1"}}),
    );
    let (status, answer) = post_changes(addr, Some(&carol), &real).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"applied\""), "{answer}");
    assert!(!answer.contains("\"duplicate\":true"), "{answer}");
    assert_eq!(world.count("SELECT count(*) FROM t WHERE id = 1").await, 1);
    // Sent again, it is Carol's own duplicate.
    let (status, answer) = post_changes(addr, Some(&carol), &real).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"duplicate\":true"), "{answer}");
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
