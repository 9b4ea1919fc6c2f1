//! The server's limits at the event-log endpoints: `--max-connections`,
//! `--connect-rate`/`--connect-burst`, `--message-rate`, and the bound on
//! stores held in memory and on which store ids may be used.

use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::client::{config, events, start, store_id, sync_url, upgrade, Sock};

#[tokio::test]
async fn event_log_sockets_count_under_max_connections() {
    let mut cfg = config();
    cfg.server.max_connections = 2;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let store = store_id("maxconn");
    let mut a = Sock::open(addr, "/livestore", &store).await;
    let _b = Sock::open(addr, "/websocket", &store).await;
    let (status, body) = upgrade(&sync_url(addr, "/livestore", &store, None)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too_many_connections"), "{body}");
    // The open sockets go on; a closed one frees its place.
    a.send(json!({"_tag": "Ping"})).await;
    assert_eq!(a.recv().await["_tag"], "Pong");
    drop(a);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match tokio_tungstenite::connect_async(sync_url(addr, "/livestore", &store, None)).await {
            Ok(_) => break,
            Err(_) if std::time::Instant::now() < deadline => tokio::task::yield_now().await,
            Err(e) => panic!("the closed socket's place was not given back: {e}"),
        }
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn event_log_connection_attempts_obey_the_connect_rate() {
    let mut cfg = config();
    cfg.server.connect_rate = 0.001;
    cfg.server.connect_burst = 2;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let store = store_id("rate");
    let _a = Sock::open(addr, "/livestore", &store).await;
    let _b = Sock::open(addr, "/websocket", &store).await;
    let (status, body) = upgrade(&sync_url(addr, "/livestore", &store, None)).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("rate_limited"), "{body}");
    assert!(body.contains("connection attempts a second"), "{body}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_socket_over_the_message_rate_is_closed_with_4429() {
    let mut cfg = config();
    cfg.server.message_rate = 0.001;
    cfg.server.message_burst = 5;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let store = store_id("msgrate");
    let mut other = Sock::open(addr, "/livestore", &store).await;
    let url = sync_url(addr, "/livestore", &store, Some(r#"{"authToken":"t0ken"}"#));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    use futures_util::SinkExt;
    for _ in 0..6 {
        let _ = ws.send(Message::Text(r#"{"_tag":"Ping"}"#.into())).await;
    }
    let mut pongs = 0;
    let close = loop {
        match tokio::time::timeout(std::time::Duration::from_secs(15), ws.next())
            .await
            .expect("the socket answers or closes")
        {
            Some(Ok(Message::Text(_))) => pongs += 1,
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let close = close.expect("a close frame with a code");
    assert_eq!(u16::from(close.code), 4429);
    assert!(close.reason.contains("rate_limited"), "{}", close.reason);
    assert_eq!(pongs, 5, "the burst is answered");
    // Other sockets go on.
    other.send(json!({"_tag": "Ping"})).await;
    assert_eq!(other.recv().await["_tag"], "Pong");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn idle_stores_are_evicted_past_the_bound_and_reload_with_their_log() {
    let mut cfg = config();
    cfg.eventlog.max_stores = 2;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let first = store_id("evict-a");
    let mut a = Sock::open(addr, "/livestore", &first).await;
    a.pull("0", None, true).await;
    let backend = a.recv().await["values"][0]["backendId"]
        .as_str()
        .unwrap()
        .to_owned();
    a.push("1", &events(0, 3, "w"), Some(&backend)).await;
    a.until_exit("1", &mut Vec::new()).await;
    let _b = Sock::open(addr, "/livestore", &store_id("evict-b")).await;
    // Both stores are in use: a third is refused, clearly.
    let (status, body) = upgrade(&sync_url(addr, "/livestore", &store_id("evict-c"), None)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too_many_stores"), "{body}");
    // Once the first store's socket is gone, it is evicted for a new one...
    drop(a);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let third = store_id("evict-c");
    loop {
        let (status, body) = upgrade(&sync_url(addr, "/livestore", &third, Some("{}"))).await;
        if status == 101 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status} {body}");
        tokio::task::yield_now().await;
    }
    // ...and comes back from storage with its log and backend id.
    let mut again = Sock::open(addr, "/livestore", &first).await;
    again.pull("0", Some((&backend, 0)), false).await;
    let mut seqs = Vec::new();
    let exit = again.until_exit("0", &mut seqs).await;
    assert_eq!(exit["exit"]["_tag"], "Success", "{exit}");
    assert_eq!(seqs, vec![1, 2, 3]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn store_ids_outside_the_allowed_patterns_are_refused() {
    let mut cfg = config();
    cfg.eventlog.allow_stores = vec!["todos-*".to_owned()];
    let server = start(cfg).await;
    let addr = server.local_addr();
    let (status, body) = upgrade(&sync_url(addr, "/livestore", "other-store", None)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--eventlog-allow-stores"), "{body}");
    let (status, _) = upgrade(&sync_url(addr, "/websocket", "other-store", None)).await;
    assert_eq!(status, 403);
    let mut ok = Sock::open(addr, "/livestore", &store_id("todos")).await;
    ok.send(json!({"_tag": "Ping"})).await;
    assert_eq!(ok.recv().await["_tag"], "Pong");
    server.shutdown().await.unwrap();
}
