//! Promise 7 under abuse: a flood of messages from one client closes that
//! client with `rate_limited` while the others keep receiving; too many
//! connection attempts from one address get 429; connections over
//! `--max-connections` get 503.

use std::time::Duration;

use futures_util::SinkExt;
use pgrelay_client::Event;
use pgrelay_protocol::{CloseCode, ErrorCode};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::support::raw::{hello, metric, read_to_caught_up};
use crate::support::{start_client, wait_for, World};

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
    assert!(metric(addr, "pgrelay_sessions").await <= 1.0);

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
