//! Promise 7 under abuse: a flood of messages from one client closes that
//! client with `rate_limited` while the others keep receiving; too many
//! connection attempts from one address get 429; connections over
//! `--max-connections` get 503; a refused connection is closed after its
//! answer, and an idle HTTP connection after `--http-idle-timeout`, so
//! refusals cost nothing that stays.

use std::time::Duration;

use futures_util::SinkExt;
use pgrelay_client::Event;
use pgrelay_protocol::{CloseCode, ErrorCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::support::raw::{hello, metric, read_to_caught_up};
use crate::support::{free_port, start_client, wait_for, ServerProcess, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_is_cut_off_and_the_others_keep_up() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut config = world.server_config();
    config.message_rate = 50.0;
    config.message_burst = 100;
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let path = world.replica_path("good");
    let good = start_client(addr, &path, "good").await;
    let mut events = good.client.subscribe();
    world.exec("INSERT INTO t VALUES (0)").await;
    world.wait_equal(&path, Duration::from_secs(30)).await;

    // The flood: writes and pings as fast as the socket takes them, while
    // rows are inserted for the good client.
    let mut flooder = hello(addr, "flooder", None).await;
    read_to_caught_up(&mut flooder).await;
    let (mut sink, mut stream) = futures_util::StreamExt::split(flooder);
    let flood = tokio::spawn(async move {
        let write = r#"{"type":"write","transactions":[]}"#;
        for n in 0..100_000 {
            let frame = if n % 2 == 0 {
                Message::Text(write.into())
            } else {
                Message::Ping(Default::default())
            };
            if sink.send(frame).await.is_err() {
                break;
            }
        }
    });
    // Read what the server answers the flooder, until it closes.
    let reader = tokio::spawn(async move {
        use futures_util::StreamExt;
        let mut error = None;
        let mut close = None;
        while let Some(message) = stream.next().await {
            match message {
                Ok(Message::Text(text)) => {
                    if let Ok(pgrelay_protocol::ServerMessage::Error { code, .. }) =
                        serde_json::from_str(&text)
                    {
                        error = Some(code);
                    }
                }
                Ok(Message::Close(frame)) => {
                    close = frame.map(|f| u16::from(f.code));
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        (error, close)
    });
    for n in 1..=50 {
        world.exec(&format!("INSERT INTO t VALUES ({n})")).await;
    }
    world.wait_equal(&path, Duration::from_secs(30)).await;
    let (error, close) = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the server closes the flooder")
        .unwrap();
    flood.abort();
    assert_eq!(error, Some(ErrorCode::RateLimited));
    assert_eq!(close, Some(CloseCode::RATE_LIMITED.0));
    assert_eq!(
        metric(addr, "pgrelay_rate_limited_total{limit=\"message\"}").await,
        1.0
    );
    // The refused session reads what the flooder still sends until its
    // close frame or the socket ends (a second at most), then ends.
    wait_for(
        "the flooder's session to end",
        Duration::from_secs(10),
        || async { (metric(addr, "pgrelay_sessions").await <= 1.0).then_some(()) },
    )
    .await;

    // Delivery to the good client during the flood: every transaction
    // arrived, none late by more than a generous bound (a loaded CI
    // machine, not a speed target; benches measure latency).
    let mut worst_ms = 0;
    while let Ok(event) = events.try_recv() {
        if let Event::Applied { lag_ms, .. } = event {
            worst_ms = worst_ms.max(lag_ms);
        }
    }
    assert!(
        worst_ms < 5_000,
        "the good client lagged {worst_ms} ms during the flood"
    );
    good.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

fn http_status(result: Result<(), tungstenite::Error>) -> Option<(u16, String)> {
    match result {
        Err(tungstenite::Error::Http(response)) => Some((
            response.status().as_u16(),
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        _ => None,
    }
}

async fn try_connect(
    addr: std::net::SocketAddr,
) -> (
    Result<(), tungstenite::Error>,
    Option<crate::support::raw::Socket>,
) {
    match tokio_tungstenite::connect_async(format!("ws://{addr}/api/sync")).await {
        Ok((socket, _)) => (Ok(()), Some(socket)),
        Err(e) => (Err(e), None),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_answer_429_and_503() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut config = world.server_config();
    config.connect_rate = 0.001;
    config.connect_burst = 3;
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let mut held = Vec::new();
    for _ in 0..3 {
        let (result, socket) = try_connect(addr).await;
        result.expect("within the burst");
        held.push(socket);
    }
    let (result, _) = try_connect(addr).await;
    let (status, body) = http_status(result).expect("an HTTP refusal");
    assert_eq!(status, 429);
    assert!(body.contains("rate_limited"), "{body}");
    assert_eq!(
        metric(addr, "pgrelay_rate_limited_total{limit=\"connect\"}").await,
        1.0
    );
    server.shutdown().await.unwrap();

    let mut config = world.server_config();
    config.max_connections = 2;
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let mut first = hello(addr, "one", None).await;
    read_to_caught_up(&mut first).await;
    let mut second = hello(addr, "two", None).await;
    read_to_caught_up(&mut second).await;
    let (result, _) = try_connect(addr).await;
    let (status, body) = http_status(result).expect("an HTTP refusal");
    assert_eq!(status, 503);
    assert!(
        body.contains("too_many_connections") && body.contains("--max-connections"),
        "{body}"
    );
    // A place frees up when a session ends.
    first.close(None).await.unwrap();
    wait_for("a free place", Duration::from_secs(10), || async {
        let (result, socket) = try_connect(addr).await;
        result.ok().map(|_| socket)
    })
    .await;
    drop(second);
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

const UPGRADE: &str = "GET /api/sync HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n\
    Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
const HEALTH: &str = "GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n";

/// Sends `request` on a raw connection and reads one answer: its status
/// and its head, lowercased.
async fn ask(stream: &mut TcpStream, request: &str) -> (u16, String) {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        assert_eq!(n, 1, "closed before the answer's head ended: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {head}"));
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    (status, head)
}

/// Whether the server closed `stream` (end of stream or reset) within
/// `timeout`; `false` when it sent something or kept it open.
async fn closed_by_server(stream: &mut TcpStream, timeout: Duration) -> bool {
    let mut buf = [0u8; 512];
    match tokio::time::timeout(timeout, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(n)) => {
            eprintln!(
                "the server answered: {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
            false
        }
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_closed_after_its_answer() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut config = world.server_config();
    config.connect_rate = 0.001;
    config.connect_burst = 1;
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    // The burst goes to a real client.
    let mut first = hello(addr, "first", None).await;
    read_to_caught_up(&mut first).await;
    // Refused: answered, and the connection closed; a second request on
    // it gets no answer.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let (status, head) = ask(&mut tcp, UPGRADE).await;
    assert_eq!(status, 429, "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let _ = tcp.write_all(HEALTH.as_bytes()).await;
    assert!(
        closed_by_server(&mut tcp, Duration::from_secs(5)).await,
        "the refused connection stayed open"
    );
    drop(first);
    server.shutdown().await.unwrap();

    // Over --max-connections: the same.
    let mut config = world.server_config();
    config.max_connections = 1;
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let mut only = hello(addr, "only", None).await;
    read_to_caught_up(&mut only).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let (status, head) = ask(&mut tcp, UPGRADE).await;
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let _ = tcp.write_all(HEALTH.as_bytes()).await;
    assert!(
        closed_by_server(&mut tcp, Duration::from_secs(5)).await,
        "the refused connection stayed open"
    );
    drop(only);
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http_connection_is_closed_after_the_timeout() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut config = world.server_config();
    config.http_idle_timeout = Duration::from_millis(500);
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    // A connection that never sends a request.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_by_server(&mut silent, Duration::from_secs(10)).await,
        "a silent connection stayed open"
    );
    // A kept-alive connection after its answer.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    assert_eq!(ask(&mut kept, HEALTH).await.0, 200);
    assert!(
        closed_by_server(&mut kept, Duration::from_secs(10)).await,
        "an idle kept-alive connection stayed open"
    );
    // A WebSocket session is not an idle HTTP connection: it stays.
    let mut session = hello(addr, "session", None).await;
    read_to_caught_up(&mut session).await;
    tokio::time::sleep(Duration::from_secs(1)).await; // longer than the HTTP idle timeout, on purpose
    world.exec("INSERT INTO t VALUES (1)").await;
    let tx = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(message)) = futures_util::StreamExt::next(&mut session).await {
            if let Message::Text(text) = message {
                if let Ok(pgrelay_protocol::ServerMessage::Tx(tx)) = serde_json::from_str(&text) {
                    return Some(tx);
                }
            }
        }
        None
    })
    .await
    .expect("a transaction within 10 s");
    assert!(tx.is_some(), "the session was closed");
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

/// Open file descriptors and resident memory (KiB) of a process.
fn fds_and_rss(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    (fds, rss)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_attempts_leave_no_connection_open() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let server = ServerProcess::spawn_with(
        world.url(),
        &world.slot(),
        free_port(),
        &["--connect-rate", "0.001", "--connect-burst", "1"],
    );
    let addr = server.addr;
    let pid = server.child.id();
    // The one attempt the burst allows.
    let mut first = hello(addr, "first", None).await;
    read_to_caught_up(&mut first).await;
    let (fds_before, rss_before) = fds_and_rss(pid);

    // 1,000 refused attempts whose clients keep their end open.
    let mut kept = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        assert_eq!(ask(&mut tcp, UPGRADE).await.0, 429);
        kept.push(tcp);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (fds_after, rss_after) = loop {
        let (fds, rss) = fds_and_rss(pid);
        if fds <= fds_before + 10 || std::time::Instant::now() > deadline {
            break (fds, rss);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "1000 refused attempts: server fds {fds_before} -> {fds_after}, RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(
        fds_after <= fds_before + 10,
        "the server kept the refused connections open: {fds_before} -> {fds_after} fds"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "the server's memory grew from {rss_before} to {rss_after} KiB"
    );
    drop(kept);
    drop(first);
    drop(server);
    world.db.drop_database().await.unwrap();
}
