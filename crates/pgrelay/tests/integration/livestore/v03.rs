//! The 0.3 protocol (`WSMessage.*`) at `/websocket`.

use serde_json::{json, Value};

use super::client::{config, events, start, store_id, Sock};

/// Sequence numbers of a `WSMessage.PullRes`.
fn res_seqs(frame: &Value) -> Vec<i64> {
    frame["batch"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| i["eventEncoded"]["seqNum"].as_i64().unwrap())
        .collect()
}

/// Reads until the answer to `id` (an ack or an error), collecting pushed batches.
async fn until_answer(sock: &mut Sock, id: &str, seqs: &mut Vec<i64>) -> Value {
    loop {
        let frame = sock.recv().await;
        if frame["_tag"] == "WSMessage.PullRes" {
            seqs.extend(res_seqs(&frame));
        } else if frame["requestId"] == id {
            return frame;
        }
    }
}

async fn pull_res_until(sock: &mut Sock, head: i64, seqs: &mut Vec<i64>) {
    while seqs.last().copied().unwrap_or(0) < head {
        let frame = sock.recv().await;
        if frame["_tag"] == "WSMessage.PullRes" {
            seqs.extend(res_seqs(&frame));
        }
    }
}

#[tokio::test]
async fn v03_pull_push_errors_ping_and_admin() {
    let mut cfg = config();
    cfg.server.admin_token = Some("admin-secret-for-tests".into());
    let server = start(cfg).await;
    let addr = server.local_addr();
    let store = store_id("v03");
    let mut a = Sock::open(addr, "/websocket", &store).await;
    let mut b = Sock::open(addr, "/websocket", &store).await;

    a.send(json!({"_tag": "WSMessage.Ping", "requestId": "ping"}))
        .await;
    assert_eq!(
        a.recv().await,
        json!({"_tag": "WSMessage.Pong", "requestId": "ping"})
    );

    a.send(json!({"_tag": "WSMessage.PullReq", "requestId": "r1"}))
        .await;
    assert_eq!(
        a.recv().await,
        json!({"_tag": "WSMessage.PullRes", "batch": [], "requestId": {"context": "pull", "requestId": "r1"}, "remaining": 0})
    );
    b.send(json!({"_tag": "WSMessage.PullReq", "requestId": "r1", "cursor": 0}))
        .await;
    assert_eq!(b.recv().await["remaining"], 0);

    // Acknowledged, then echoed to every socket with the push's request id.
    a.send(json!({"_tag": "WSMessage.PushReq", "requestId": "p1", "batch": events(0, 2, "a")}))
        .await;
    assert_eq!(
        a.recv().await,
        json!({"_tag": "WSMessage.PushAck", "requestId": "p1"})
    );
    let echo = a.recv().await;
    assert_eq!(
        echo["requestId"],
        json!({"context": "push", "requestId": "p1"})
    );
    assert_eq!(res_seqs(&echo), vec![1, 2]);
    let mut b_seen = Vec::new();
    pull_res_until(&mut b, 2, &mut b_seen).await;
    assert_eq!(b_seen, vec![1, 2]);

    // A stale parent: the seed's parent-number error, nothing stored.
    b.send(json!({"_tag": "WSMessage.PushReq", "requestId": "p2", "batch": events(0, 1, "b")}))
        .await;
    let error = until_answer(&mut b, "p2", &mut Vec::new()).await;
    assert_eq!(error["_tag"], "WSMessage.Error");
    assert_eq!(
        error["message"],
        "Invalid parent event number. Received e0 but expected e2"
    );

    // A malformed push fails alone; an unreadable frame is ignored.
    b.send_text("][").await;
    b.send(json!({"_tag": "WSMessage.PushReq", "requestId": "p3"}))
        .await;
    assert_eq!(
        until_answer(&mut b, "p3", &mut Vec::new()).await["_tag"],
        "WSMessage.Error"
    );

    // Admin: a wrong secret is refused; the right one answers.
    b.send(json!({"_tag": "WSMessage.AdminInfoReq", "requestId": "i1", "adminSecret": "nope"}))
        .await;
    assert_eq!(
        until_answer(&mut b, "i1", &mut Vec::new()).await["message"],
        "Invalid admin secret"
    );
    b.send(
        json!({"_tag": "WSMessage.AdminInfoReq", "requestId": "i2", "adminSecret": "admin-secret-for-tests"}),
    )
    .await;
    let info = until_answer(&mut b, "i2", &mut Vec::new()).await;
    assert_eq!(info["_tag"], "WSMessage.AdminInfoRes");
    assert!(info["info"]["durableObjectId"].as_str().is_some());

    // A late socket pulls the history with a cursor.
    let mut c = Sock::open(addr, "/websocket", &store).await;
    c.send(json!({"_tag": "WSMessage.PullReq", "requestId": "r1", "cursor": 1}))
        .await;
    let res = c.recv().await;
    assert_eq!(res_seqs(&res), vec![2]);
    assert_eq!(res["requestId"]["context"], "pull");

    b.send(json!({"_tag": "WSMessage.AdminResetRoomReq", "requestId": "x1", "adminSecret": "admin-secret-for-tests"})).await;
    let reset = until_answer(&mut b, "x1", &mut Vec::new()).await;
    assert_eq!(
        reset,
        json!({"_tag": "WSMessage.AdminResetRoomRes", "requestId": "x1"})
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn v03_racing_pushes_and_a_late_pull_see_every_event_once() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let store = store_id("v03race");
    let mut writers = Vec::new();
    for name in ["a", "b"] {
        let mut sock = Sock::open(addr, "/websocket", &store).await;
        writers.push(tokio::spawn(async move {
            sock.send(json!({"_tag": "WSMessage.PullReq", "requestId": "r"})).await;
            let mut seen = res_seqs(&sock.recv().await);
            let mut written = 0;
            let mut n = 0;
            while written < 30 {
                n += 1;
                let id = format!("{name}{n}");
                let head = seen.last().copied().unwrap_or(0);
                sock.send(json!({"_tag": "WSMessage.PushReq", "requestId": id, "batch": events(head, 2, name)}))
                    .await;
                let answer = until_answer(&mut sock, &id, &mut seen).await;
                if answer["_tag"] == "WSMessage.PushAck" {
                    written += 1;
                    pull_res_until(&mut sock, head + 2, &mut seen).await;
                } else {
                    // "... but expected eN": catch up to N.
                    let message = answer["message"].as_str().unwrap();
                    let expected: i64 = message.rsplit('e').next().unwrap().parse().unwrap();
                    pull_res_until(&mut sock, expected, &mut seen).await;
                }
            }
            seen
        }));
    }
    let mut late = Sock::open(addr, "/websocket", &store).await;
    late.send(json!({"_tag": "WSMessage.PullReq", "requestId": "late"}))
        .await;
    for writer in writers {
        let seen = writer.await.unwrap();
        let n = seen.len() as i64;
        assert_eq!(
            seen,
            (1..=n).collect::<Vec<_>>(),
            "a writer saw a gap or duplicate"
        );
    }
    let mut seen = Vec::new();
    pull_res_until(&mut late, 120, &mut seen).await;
    assert_eq!(seen, (1..=120).collect::<Vec<_>>());
    server.shutdown().await.unwrap();
}

/// The 0.3 client pulls once per client, not again when its socket
/// reconnects: a socket that never pulls still receives every batch
/// accepted after it connected, and a pull on it answers the history up to
/// then without repeating what the broadcast brings.
#[tokio::test]
async fn v03_sockets_receive_every_push_from_connect_without_pulling_again() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let store = store_id("v03-reconnect");
    let mut writer = Sock::open(addr, "/websocket", &store).await;
    writer
        .send(json!({"_tag": "WSMessage.PushReq", "requestId": "p1", "batch": events(0, 2, "w")}))
        .await;
    assert_eq!(
        until_answer(&mut writer, "p1", &mut Vec::new()).await["_tag"],
        "WSMessage.PushAck"
    );

    // A reconnected client: its socket opens and it does not pull.
    let mut reconnected = Sock::open(addr, "/websocket", &store).await;
    let mut puller = Sock::open(addr, "/websocket", &store).await;
    writer
        .send(json!({"_tag": "WSMessage.PushReq", "requestId": "p2", "batch": events(2, 3, "w")}))
        .await;
    until_answer(&mut writer, "p2", &mut Vec::new()).await;
    let frame = reconnected.recv().await;
    assert_eq!(frame["_tag"], "WSMessage.PullRes");
    assert_eq!(frame["requestId"]["context"], "push");
    assert_eq!(res_seqs(&frame), vec![3, 4, 5]);

    // A pull after the broadcast: history up to the head at connect only.
    puller
        .send(json!({"_tag": "WSMessage.PullReq", "requestId": "r", "cursor": 0}))
        .await;
    let mut pushed = Vec::new();
    let mut pulled = Vec::new();
    while pulled.len() + pushed.len() < 5 {
        let frame = puller.recv().await;
        match frame["requestId"]["context"].as_str() {
            Some("pull") => pulled.extend(res_seqs(&frame)),
            Some("push") => pushed.extend(res_seqs(&frame)),
            _ => {}
        }
    }
    assert_eq!(pulled, vec![1, 2]);
    assert_eq!(pushed, vec![3, 4, 5]);
    server.shutdown().await.unwrap();
}
