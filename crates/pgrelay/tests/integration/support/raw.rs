//! Hand-driven connections for tests of sessions and operations: a raw
//! WebSocket client that speaks the protocol step by step, HTTP requests,
//! clients with their own configuration, and a Redis command.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pgrelay_client::{ClientConfig, SyncClient};
use pgrelay_protocol::{ClientMessage, ErrorCode, ServerMessage, PROTOCOL_VERSION};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::RunningClient;

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How a raw connection ended.
#[derive(Debug, Default)]
pub struct Ended {
    pub error: Option<(ErrorCode, String)>,
    pub close: Option<u16>,
    /// Transactions received before the end.
    pub txs: Vec<pgrelay_protocol::Transaction>,
}

/// Connects and sends `hello`; returns the socket before reading anything.
pub async fn hello(addr: SocketAddr, id: &str, tables: Option<Vec<&str>>) -> Socket {
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/api/sync"))
        .await
        .expect("connecting");
    send_hello(&mut socket, id, tables).await;
    socket
}

pub async fn send_hello(socket: &mut Socket, id: &str, tables: Option<Vec<&str>>) {
    let hello = ClientMessage::Hello {
        protocol_version: PROTOCOL_VERSION,
        client_id: id.to_owned(),
        token: None,
        // From the start of the log, not a snapshot: these tests read
        // transaction frames.
        last_lsn: Some(pgrelay_protocol::Lsn::ZERO),
        log_id: None,
        resync: Vec::new(),
        tables: tables.map(|t| t.into_iter().map(str::to_owned).collect()),
        repair: false,
        schema_version: None,
    };
    socket
        .send(Message::Text(serde_json::to_string(&hello).unwrap().into()))
        .await
        .expect("sending hello");
}

/// Reads until `caught_up`; returns the transactions before it.
pub async fn read_to_caught_up(socket: &mut Socket) -> Vec<pgrelay_protocol::Transaction> {
    let mut txs = Vec::new();
    let read = async {
        while let Some(message) = socket.next().await {
            if let Ok(Message::Text(text)) = message {
                match serde_json::from_str::<ServerMessage>(&text) {
                    Ok(ServerMessage::Tx(tx)) => txs.push(tx),
                    Ok(ServerMessage::CaughtUp { .. }) => return,
                    Ok(ServerMessage::Error { code, message, .. }) => {
                        panic!("refused during the handshake: {code:?} {message}")
                    }
                    _ => {}
                }
            }
        }
        panic!("closed before caught_up");
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("caught_up within 30 s");
    txs
}

/// Reads until the server closes; what it said on the way.
pub async fn read_to_end(socket: &mut Socket, timeout: Duration) -> Ended {
    let mut ended = Ended::default();
    let read = async {
        while let Some(message) = socket.next().await {
            match message {
                Ok(Message::Text(text)) => match serde_json::from_str::<ServerMessage>(&text) {
                    Ok(ServerMessage::Tx(tx)) => ended.txs.push(tx),
                    Ok(ServerMessage::Error { code, message, .. }) => {
                        ended.error = Some((code, message))
                    }
                    _ => {}
                },
                Ok(Message::Close(frame)) => {
                    ended.close = frame.map(|f| u16::from(f.code));
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .expect("the server neither closed nor stopped");
    ended
}

/// A client syncing in this process, configured by `configure`.
pub async fn start_client_with(
    server: SocketAddr,
    db: &Path,
    id: &str,
    configure: impl FnOnce(&mut ClientConfig),
) -> RunningClient {
    let mut config = ClientConfig::new(format!("ws://{server}"), db);
    config.client_id = Some(id.to_owned());
    config.backoff_base = Duration::from_millis(50);
    config.backoff_cap = Duration::from_millis(500);
    configure(&mut config);
    let client = std::sync::Arc::new(SyncClient::open(config).await.expect("opening the client"));
    let replica = client.replica().clone();
    let (stop, stopped) = watch::channel(false);
    let runner = std::sync::Arc::clone(&client);
    let task = tokio::spawn(async move { runner.run(stopped).await });
    RunningClient {
        replica,
        stop,
        task,
        client,
    }
}

/// `GET`/`POST`/`DELETE` on the server; status and body.
pub async fn http(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
) -> (u16, String) {
    pgrelay::cmd::admin::http(&format!("http://{addr}"), token, method, path)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"))
}

/// The value of an unlabelled metric in `/metrics`.
pub async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (status, body) = http(addr, None, "GET", "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("no metric {name} in:\n{body}"))
}

pub fn redis_url() -> String {
    std::env::var("PGRELAY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Runs one Redis command; returns the raw reply.
pub async fn redis(args: &[&str]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = redis_url();
    let addr = url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let mut stream = TcpStream::connect(addr).await.expect("connecting to Redis");
    let mut out = format!("*{}\r\n", args.len());
    for arg in args {
        out.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(out.as_bytes()).await.unwrap();
    let mut buf = vec![0; 65536];
    let n = stream.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A key prefix of this test's own.
pub fn unique_prefix(test: &str) -> String {
    format!("pgrelay-test:{test}:{:016x}:", rand::random::<u64>())
}
