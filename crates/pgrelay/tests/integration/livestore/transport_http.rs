//! The HTTP transport (`makeHttpSync`, `transport=http`): one Effect RPC
//! request per POST, answered with the JSON array of its frames.

use serde_json::{json, Value};

use super::client::{chunk_seqs, config, events, http_url, start, store_id, Sock};

async fn call(url: &str, request: Value) -> Vec<Value> {
    let response = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(request.to_string())
        .send()
        .await
        .expect("an HTTP answer");
    assert_eq!(response.status().as_u16(), 200);
    let body = response.text().await.expect("a body");
    serde_json::from_str(&body).expect("a JSON array of frames")
}

fn request(id: &str, tag: &str, payload: Value) -> Value {
    json!({"_tag": "Request", "id": id, "tag": tag, "payload": payload,
        "traceId": "t", "spanId": "s", "sampled": false, "headers": []})
}

#[tokio::test]
async fn http_transport_pings_pushes_and_pulls_beside_websockets() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let store = store_id("http");
    let url = http_url(addr, &store, Some(r#"{"authToken":"t0ken"}"#));

    let pong = call(
        &url,
        request("0", "SyncHttpRpc.Ping", json!({"storeId": store})),
    )
    .await;
    assert_eq!(
        pong,
        vec![
            json!({"_tag": "Exit", "requestId": "0", "exit": {"_tag": "Success", "value": {"_tag": "SyncMessage.Pong"}}})
        ]
    );

    // An empty store: one empty page, then the pull's end.
    let pull = |cursor: Value| {
        request(
            "1",
            "SyncHttpRpc.Pull",
            json!({"storeId": store, "cursor": cursor}),
        )
    };
    let frames = call(&url, pull(json!({"_tag": "None"}))).await;
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert_eq!(frames[0]["values"][0]["batch"], json!([]));
    let backend = frames[0]["values"][0]["backendId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        frames[1],
        json!({"_tag": "Exit", "requestId": "1", "exit": {"_tag": "Success"}})
    );

    // A WebSocket client's live pull sees what is pushed over HTTP.
    let mut ws = Sock::open(addr, "/livestore", &store).await;
    ws.pull("0", None, true).await;
    ws.recv().await;
    let push = |id: &str, parent: i64, n: usize| {
        request(
            id,
            "SyncHttpRpc.Push",
            json!({"storeId": store,
            "batch": events(parent, n, "http"), "backendId": {"_tag": "Some", "value": backend}}),
        )
    };
    let answer = call(&url, push("2", 0, 150)).await;
    assert_eq!(
        answer,
        vec![json!({"_tag": "Exit", "requestId": "2", "exit": {"_tag": "Success", "value": {}}})]
    );
    let mut seen = Vec::new();
    ws.chunks_until(150, &mut seen).await;
    assert_eq!(seen, (1..=150).collect::<Vec<_>>());

    // A stale push gets the typed error.
    let stale = call(&url, push("3", 0, 1)).await;
    assert_eq!(
        stale[0]["exit"]["cause"]["error"]["_tag"], "ServerAheadError",
        "{stale:?}"
    );

    // A pull from a cursor pages the history and ends; a live flag is
    // ignored over HTTP (the client polls).
    let mut from_cursor =
        pull(json!({"_tag": "Some", "value": {"backendId": backend, "eventSequenceNumber": 20}}));
    from_cursor["payload"]["live"] = json!(true);
    let frames = call(&url, from_cursor).await;
    let seqs: Vec<i64> = frames.iter().flat_map(chunk_seqs).collect();
    assert_eq!(seqs, (21..=150).collect::<Vec<_>>());
    assert_eq!(
        frames[0]["values"][0]["pageInfo"],
        json!({"_tag": "MoreKnown", "remaining": 30})
    );
    assert_eq!(frames.last().unwrap()["_tag"], "Exit");

    // Not an RPC request: 400; another store's id in the request: a typed error.
    let bad = reqwest::Client::new()
        .post(&url)
        .body("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    let other = call(
        &url,
        request("4", "SyncHttpRpc.Ping", json!({"storeId": "x"})),
    )
    .await;
    assert_eq!(
        other[0]["exit"]["_tag"], "Success",
        "a ping names no store to check"
    );
    let wrong = call(
        &url,
        request(
            "5",
            "SyncHttpRpc.Pull",
            json!({"storeId": "x", "cursor": {"_tag": "None"}}),
        ),
    )
    .await;
    assert_eq!(
        wrong[0]["exit"]["cause"]["error"]["_tag"], "UnknownError",
        "{wrong:?}"
    );
    server.shutdown().await.unwrap();
}
