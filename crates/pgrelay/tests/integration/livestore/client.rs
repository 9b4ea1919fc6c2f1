//! A bare LiveStore protocol client for the tests: frames as JSON values.

#![allow(unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pgrelay::cmd::serve::ServeConfig;
use pgrelay_eventlog::EventLogConfig;
use pgrelay_server::{Server, ServerConfig};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const RECV_TIMEOUT: Duration = Duration::from_secs(15);

/// An event-log-only server on a free port, in memory unless told otherwise.
pub fn config() -> ServeConfig {
    let mut server = ServerConfig::without_database();
    server.listen = "127.0.0.1:0".parse().expect("address");
    ServeConfig {
        server,
        eventlog: EventLogConfig::default(),
        eventlog_auth: None,
    }
}

/// The server as `pgrelay serve` runs it: the LiveStore routes mounted.
pub async fn start(config: ServeConfig) -> Server {
    crate::support::init_tracing();
    pgrelay::cmd::serve::start(config)
        .await
        .expect("starting the server")
}

/// A fresh store id per test, so tests never share a log.
pub fn store_id(name: &str) -> String {
    format!("{name}-{}", rand::random::<u32>())
}

/// `count` events chained after `parent`, as a LiveStore client encodes them.
pub fn events(parent: i64, count: usize, client: &str) -> Vec<Value> {
    (0..count as i64)
        .map(|i| {
            json!({
                "name": "v1.TodoCreated",
                "args": {"id": format!("{client}-{}", parent + i + 1), "text": "todo"},
                "seqNum": parent + i + 1,
                "parentSeqNum": parent + i,
                "clientId": client,
                "sessionId": format!("{client}-session"),
            })
        })
        .collect()
}

pub struct Sock {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub store: String,
}

impl Sock {
    /// Opens `path` (`/livestore` or `/websocket`) for `store` as makeWsSync does.
    pub async fn open(addr: SocketAddr, path: &str, store: &str) -> Sock {
        Sock::open_with_payload(addr, path, store, r#"{"authToken":"t0ken"}"#).await
    }

    pub async fn open_with_payload(
        addr: SocketAddr,
        path: &str,
        store: &str,
        payload: &str,
    ) -> Sock {
        let url = sync_url(addr, path, store, Some(payload));
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("opening a LiveStore socket");
        Sock {
            ws,
            store: store.to_owned(),
        }
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("sending a frame");
    }

    /// The next text frame as JSON; `None` when the socket closed.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            let message = tokio::time::timeout(RECV_TIMEOUT, self.ws.next())
                .await
                .expect("timed out waiting for a frame");
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Some(serde_json::from_str(&text).expect("a JSON frame"))
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    pub async fn recv(&mut self) -> Value {
        self.next().await.expect("the socket closed")
    }

    /// 0.4: `SyncWsRpc.Pull` with a cursor `(backendId, seqNum)`.
    pub async fn pull(&mut self, id: &str, cursor: Option<(&str, i64)>, live: bool) {
        let cursor = match cursor {
            None => json!({"_tag": "None"}),
            Some((backend, seq)) => {
                json!({"_tag": "Some", "value": {"backendId": backend, "eventSequenceNumber": seq}})
            }
        };
        let store = self.store.clone();
        self.send(json!({
            "_tag": "Request", "id": id, "tag": "SyncWsRpc.Pull",
            "payload": {"storeId": store, "payload": {"authToken": "t0ken"}, "live": live, "cursor": cursor},
            "traceId": "t", "spanId": "s", "sampled": false, "headers": [],
        }))
        .await;
    }

    /// 0.4: `SyncWsRpc.Push`.
    pub async fn push(&mut self, id: &str, batch: &[Value], backend: Option<&str>) {
        let backend = match backend {
            None => json!({"_tag": "None"}),
            Some(b) => json!({"_tag": "Some", "value": b}),
        };
        let store = self.store.clone();
        self.send(json!({
            "_tag": "Request", "id": id, "tag": "SyncWsRpc.Push",
            "payload": {"storeId": store, "payload": {"authToken": "t0ken"}, "batch": batch, "backendId": backend},
            "traceId": "t", "spanId": "s", "sampled": false, "headers": [],
        }))
        .await;
    }

    /// 0.4: reads frames until the `Exit` of `id`, collecting the sequence
    /// numbers of every `Chunk` seen on the way.
    pub async fn until_exit(&mut self, id: &str, seqs: &mut Vec<i64>) -> Value {
        loop {
            let frame = self.recv().await;
            match frame["_tag"].as_str() {
                Some("Chunk") => seqs.extend(chunk_seqs(&frame)),
                Some("Exit") if frame["requestId"] == id => return frame,
                _ => {}
            }
        }
    }

    /// 0.4: reads chunks until the last sequence number seen is `head`.
    pub async fn chunks_until(&mut self, head: i64, seqs: &mut Vec<i64>) {
        while seqs.last().copied().unwrap_or(0) < head {
            let frame = self.recv().await;
            if frame["_tag"] == "Chunk" {
                seqs.extend(chunk_seqs(&frame));
            }
        }
    }
}

/// The status of an upgrade attempt, and the refusal's body.
pub async fn upgrade(url: &str) -> (u16, String) {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => (101, String::new()),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            (response.status().as_u16(), body)
        }
        Err(e) => panic!("connecting to {url}: {e}"),
    }
}

pub fn sync_url(addr: SocketAddr, path: &str, store: &str, payload: Option<&str>) -> String {
    let mut url = format!("ws://{addr}{path}?storeId={store}");
    if let Some(payload) = payload {
        // encodeURIComponent, then again as a query value, as makeWsSync does.
        let once = percent(payload);
        url.push_str(&format!("&payload={}", percent(&once)));
    }
    if path == "/livestore" {
        url.push_str("&transport=ws");
    }
    url
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn chunk_seqs(frame: &Value) -> Vec<i64> {
    frame["values"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|v| v["batch"].as_array().cloned().unwrap_or_default())
        .map(|item| item["eventEncoded"]["seqNum"].as_i64().expect("a seqNum"))
        .collect()
}

/// Asserts `seqs` is exactly 1..=n, in order.
pub fn assert_complete(who: &str, seqs: &[i64], n: i64) {
    let expected: Vec<i64> = (1..=n).collect();
    assert_eq!(
        seqs,
        expected.as_slice(),
        "{who} saw a gap, a duplicate or disorder"
    );
}

/// The URL `makeHttpSync` posts to for `store`.
pub fn http_url(addr: SocketAddr, store: &str, payload: Option<&str>) -> String {
    let ws = sync_url(addr, "/websocket", store, payload);
    format!(
        "{}&transport=http",
        ws.replacen("ws://", "http://", 1)
            .replacen("/websocket", "/livestore", 1)
    )
}
