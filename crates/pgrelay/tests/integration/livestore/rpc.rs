//! The 0.4 protocol (`SyncWsRpc` over Effect RPC) at `/livestore`.

use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::Notify;

use super::client::{assert_complete, chunk_seqs, config, events, start, store_id, Sock};

#[tokio::test]
async fn pull_push_broadcast_and_typed_errors() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let store = store_id("rpc");
    let mut a = Sock::open(addr, "/livestore", &store).await;
    let mut b = Sock::open(addr, "/livestore", &store).await;

    a.send(json!({"_tag": "Ping"})).await;
    assert_eq!(a.recv().await, json!({"_tag": "Pong"}));

    // An empty store answers one empty page with its backend id.
    a.pull("0", None, true).await;
    let first = a.recv().await;
    assert_eq!(first["_tag"], "Chunk");
    assert_eq!(first["requestId"], "0");
    assert_eq!(first["values"][0]["batch"], json!([]));
    assert_eq!(first["values"][0]["pageInfo"], json!({"_tag": "NoMore"}));
    let backend = first["values"][0]["backendId"].as_str().unwrap().to_owned();
    assert!(!backend.is_empty());
    a.send(json!({"_tag": "Ack", "requestId": "0"})).await;
    b.pull("0", None, true).await;
    assert_eq!(b.recv().await["values"][0]["backendId"], backend.as_str());

    // A push reaches every socket, the pusher first as a Chunk, then its Exit.
    let batch = events(0, 3, "writer1");
    a.push("1", &batch, Some(&backend)).await;
    let echo = a.recv().await;
    assert_eq!(echo["_tag"], "Chunk");
    assert_eq!(chunk_seqs(&echo), vec![1, 2, 3]);
    let item = &echo["values"][0]["batch"][0];
    assert_eq!(
        item["eventEncoded"], batch[0],
        "the event comes back as pushed"
    );
    assert_eq!(item["metadata"]["_tag"], "Some");
    assert_eq!(
        item["metadata"]["value"]["_tag"],
        "SyncMessage.SyncMetadata"
    );
    assert!(item["metadata"]["value"]["createdAt"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    let exit = a.recv().await;
    assert_eq!(
        exit,
        json!({"_tag": "Exit", "requestId": "1", "exit": {"_tag": "Success", "value": {}}})
    );
    // The client interrupts a finished push: tolerated, no answer.
    a.send(json!({"_tag": "Interrupt", "requestId": "1"})).await;
    let mut seen = Vec::new();
    b.chunks_until(3, &mut seen).await;
    assert_eq!(seen, vec![1, 2, 3]);

    // A push from behind the head: ServerAheadError, nothing stored.
    b.push("1", &events(0, 1, "writer2"), Some(&backend)).await;
    let exit = b.until_exit("1", &mut Vec::new()).await;
    assert_eq!(
        exit["exit"],
        json!({"_tag": "Failure", "cause": {"_tag": "Fail", "error":
            {"_tag": "ServerAheadError", "minimumExpectedNum": 3, "providedNum": 0}}})
    );

    // A push naming another backend: BackendIdMismatchError.
    b.push("2", &events(3, 1, "writer2"), Some("not-the-backend"))
        .await;
    let exit = b.until_exit("2", &mut Vec::new()).await;
    assert_eq!(
        exit["exit"]["cause"]["error"]["_tag"],
        "BackendIdMismatchError"
    );
    assert_eq!(exit["exit"]["cause"]["error"]["expected"], backend.as_str());
    assert_eq!(
        exit["exit"]["cause"]["error"]["received"],
        "not-the-backend"
    );

    // A pull whose cursor names another backend: BackendIdMismatchError.
    let mut c = Sock::open(addr, "/livestore", &store).await;
    c.pull("0", Some(("old-backend", 2)), true).await;
    let exit = c.until_exit("0", &mut Vec::new()).await;
    assert_eq!(
        exit["exit"]["cause"]["error"]["_tag"],
        "BackendIdMismatchError"
    );

    // The retried push is accepted and reaches both sockets.
    b.push("3", &events(3, 2, "writer2"), Some(&backend)).await;
    let mut b_seen = Vec::new();
    let exit = b.until_exit("3", &mut b_seen).await;
    assert_eq!(exit["exit"]["_tag"], "Success");
    assert_eq!(b_seen, vec![4, 5]);
    let mut a_seen = Vec::new();
    a.chunks_until(5, &mut a_seen).await;
    assert_eq!(a_seen, vec![4, 5]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_frames_fail_only_their_own_request() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let store = store_id("malformed");
    let mut a = Sock::open(addr, "/livestore", &store).await;
    a.pull("0", None, true).await;
    let backend = a.recv().await["values"][0]["backendId"]
        .as_str()
        .unwrap()
        .to_owned();

    // Not JSON, no request id, stray ack and interrupt: ignored.
    a.send_text("{not json").await;
    a.send(json!({"_tag": "Ack", "requestId": "99"})).await;
    a.send(json!({"_tag": "Interrupt", "requestId": "98"}))
        .await;
    a.send(json!({"_tag": "Whatever"})).await;
    // A request with a bad payload, an unknown RPC, a broken event chain:
    // each fails with UnknownError for its own id.
    a.send(json!({"_tag": "Request", "id": "5", "tag": "SyncWsRpc.Push", "payload": {"storeId": store}}))
        .await;
    let exit = a.until_exit("5", &mut Vec::new()).await;
    assert_eq!(exit["exit"]["cause"]["error"]["_tag"], "UnknownError");
    a.send(json!({"_tag": "Request", "id": "6", "tag": "SyncWsRpc.Nope", "payload": {}}))
        .await;
    let exit = a.until_exit("6", &mut Vec::new()).await;
    assert_eq!(exit["exit"]["cause"]["error"]["_tag"], "UnknownError");
    let mut broken = events(0, 2, "w");
    broken[1]["parentSeqNum"] = json!(7);
    a.push("7", &broken, Some(&backend)).await;
    let exit = a.until_exit("7", &mut Vec::new()).await;
    assert_eq!(exit["exit"]["cause"]["error"]["_tag"], "UnknownError");
    // Another store's id in the request: refused.
    a.send(json!({"_tag": "Request", "id": "8", "tag": "SyncWsRpc.Push",
        "payload": {"storeId": "other", "batch": events(0, 1, "w"), "backendId": {"_tag": "None"}}}))
        .await;
    let exit = a.until_exit("8", &mut Vec::new()).await;
    assert_eq!(exit["exit"]["cause"]["error"]["_tag"], "UnknownError");

    // The socket, its live pull and the store go on.
    a.send(json!({"_tag": "Ping"})).await;
    assert_eq!(a.recv().await["_tag"], "Pong");
    a.push("9", &events(0, 1, "w"), Some(&backend)).await;
    let mut seen = Vec::new();
    let exit = a.until_exit("9", &mut seen).await;
    assert_eq!(exit["exit"]["_tag"], "Success");
    assert_eq!(seen, vec![1]);

    // Interrupting the live pull ends it with an interrupt exit.
    a.send(json!({"_tag": "Interrupt", "requestId": "0"})).await;
    let exit = a.until_exit("0", &mut Vec::new()).await;
    assert_eq!(exit["exit"]["cause"]["_tag"], "Interrupt");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_long_log_is_paged_and_a_cursor_resumes() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let store = store_id("paged");
    let mut w = Sock::open(addr, "/livestore", &store).await;
    w.pull("0", None, true).await;
    let backend = w.recv().await["values"][0]["backendId"]
        .as_str()
        .unwrap()
        .to_owned();
    for i in 0..3 {
        w.push(&format!("p{i}"), &events(i * 100, 100, "w"), Some(&backend))
            .await;
        let exit = w.until_exit(&format!("p{i}"), &mut Vec::new()).await;
        assert_eq!(exit["exit"]["_tag"], "Success");
    }
    w.push("p3", &events(300, 50, "w"), Some(&backend)).await;
    w.until_exit("p3", &mut Vec::new()).await;

    // From the start: pages of at most 100 events, with what remains.
    let mut r = Sock::open(addr, "/livestore", &store).await;
    r.pull("0", None, false).await;
    let mut infos = Vec::new();
    let mut seqs = Vec::new();
    loop {
        let frame = r.recv().await;
        if frame["_tag"] == "Exit" {
            assert_eq!(frame["exit"]["_tag"], "Success", "a non-live pull ends");
            break;
        }
        let page = chunk_seqs(&frame);
        assert!(page.len() <= 100);
        seqs.extend(page);
        infos.push(frame["values"][0]["pageInfo"].clone());
    }
    assert_complete("the reader", &seqs, 350);
    assert_eq!(
        infos,
        vec![
            json!({"_tag": "MoreKnown", "remaining": 250}),
            json!({"_tag": "MoreKnown", "remaining": 150}),
            json!({"_tag": "MoreKnown", "remaining": 50}),
            json!({"_tag": "NoMore"}),
        ]
    );

    // From a cursor: only what follows it, then live.
    let mut c = Sock::open(addr, "/livestore", &store).await;
    c.pull("0", Some((&backend, 320)), true).await;
    let mut seqs = Vec::new();
    c.chunks_until(350, &mut seqs).await;
    assert_eq!(seqs, (321..=350).collect::<Vec<_>>());
    w.push("p4", &events(350, 1, "w"), Some(&backend)).await;
    c.chunks_until(351, &mut seqs).await;
    assert_eq!(seqs.last(), Some(&351));
    server.shutdown().await.unwrap();
}

/// A writer that behaves like a LiveStore client: it pushes from the head
/// it knows and, when the server is ahead, rebases on what it pulled.
async fn racing_writer(
    mut sock: Sock,
    name: &'static str,
    batches: usize,
    started: Arc<Notify>,
) -> (Vec<i64>, usize) {
    sock.pull("0", None, true).await;
    let first = sock.recv().await;
    let backend = first["values"][0]["backendId"].as_str().unwrap().to_owned();
    let mut seen: Vec<i64> = chunk_seqs(&first);
    let mut written = 0;
    let mut request = 1;
    while written < batches {
        let head = seen.last().copied().unwrap_or(0);
        let size = 1 + (written % 4);
        let id = request.to_string();
        request += 1;
        sock.push(&id, &events(head, size, name), Some(&backend))
            .await;
        let exit: Value = sock.until_exit(&id, &mut seen).await;
        if exit["exit"]["_tag"] == "Success" {
            written += 1;
            if written == 3 {
                started.notify_one();
            }
        } else {
            let error = &exit["exit"]["cause"]["error"];
            assert_eq!(error["_tag"], "ServerAheadError", "{exit}");
            // Catch up to what the server has before pushing again.
            let minimum = error["minimumExpectedNum"].as_i64().unwrap();
            sock.chunks_until(minimum, &mut seen).await;
        }
    }
    (seen, written)
}

#[tokio::test]
async fn racing_pushes_and_a_pull_during_them_see_no_gap_or_duplicate() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let store = store_id("race");
    let started = Arc::new(Notify::new());
    let a = tokio::spawn(racing_writer(
        Sock::open(addr, "/livestore", &store).await,
        "a",
        40,
        Arc::clone(&started),
    ));
    let b = tokio::spawn(racing_writer(
        Sock::open(addr, "/livestore", &store).await,
        "b",
        40,
        Arc::new(Notify::new()),
    ));
    // A reader arrives while the writers are busy.
    started.notified().await;
    let mut late = Sock::open(addr, "/livestore", &store).await;
    late.pull("0", None, true).await;
    let (a_seen, _) = a.await.unwrap();
    let (b_seen, _) = b.await.unwrap();
    let head = *a_seen.iter().chain(&b_seen).max().unwrap();
    // 40 batches each of 1-4 events.
    assert_eq!(head, 2 * (10 * (1 + 2 + 3 + 4)));
    // Each writer's socket may not have received the other's last batches
    // yet, but what it saw starts at 1 with no gap or duplicate.
    assert_complete("writer a", &a_seen, a_seen.len() as i64);
    assert_complete("writer b", &b_seen, b_seen.len() as i64);
    let mut late_seen = Vec::new();
    late.chunks_until(head, &mut late_seen).await;
    assert_complete("the late reader", &late_seen, head);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_socket_that_falls_behind_catches_up_from_storage() {
    let mut cfg = config();
    cfg.eventlog.subscriber_buffer = 2;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let store = store_id("slow");
    let mut slow = Sock::open(addr, "/livestore", &store).await;
    slow.pull("0", None, true).await;
    let backend = slow.recv().await["values"][0]["backendId"]
        .as_str()
        .unwrap()
        .to_owned();
    // The slow socket reads nothing while 60 batches of large events go by,
    // more than its socket buffers and its two queued batches hold.
    let mut w = Sock::open(addr, "/livestore", &store).await;
    let big = "x".repeat(4000);
    let mut head = 0;
    for i in 0..60 {
        let mut batch = events(head, 50, "w");
        for e in &mut batch {
            e["args"]["text"] = json!(big);
        }
        w.push(&format!("{i}"), &batch, Some(&backend)).await;
        let mut ignored = Vec::new();
        let exit = w.until_exit(&format!("{i}"), &mut ignored).await;
        assert_eq!(exit["exit"]["_tag"], "Success");
        head += 50;
    }
    let mut seen = Vec::new();
    slow.chunks_until(head, &mut seen).await;
    assert_complete("the slow socket", &seen, head);
    server.shutdown().await.unwrap();
}
