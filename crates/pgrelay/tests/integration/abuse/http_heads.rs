//! Slowloris: connections that send a request head a few bytes at a time
//! are closed after `--http-idle-timeout` however they dribble, and while
//! they fill `--max-connections` the server stays reachable once they go.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::raw::http;
use crate::support::World;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_heads_are_closed_and_do_not_starve_health() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut config = world.server_config();
    config.http_idle_timeout = Duration::from_secs(1);
    config.max_connections = 20;
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let started = Instant::now();
    let mut slow = tokio::task::JoinSet::new();
    for i in 0..20 {
        slow.spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            let head = format!("GET /health HTTP/1.1\r\nHost: slow{i}\r\n");
            tcp.write_all(head.as_bytes()).await.unwrap();
            // A header byte every 100 ms, never the blank line.
            let mut buf = [0u8; 256];
            loop {
                tokio::select! {
                    read = tcp.read(&mut buf) => match read {
                        Ok(0) | Err(_) => return started.elapsed(),
                        Ok(_) => {}
                    },
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {
                        if tcp.write_all(b"X").await.is_err() {
                            return started.elapsed();
                        }
                    }
                }
            }
        });
    }
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        let mut after = Vec::new();
        while let Some(elapsed) = slow.join_next().await {
            after.push(elapsed.unwrap());
        }
        after
    })
    .await
    .expect("dribbling connections were still open after 20 s");
    let latest = closed.iter().max().unwrap();
    assert!(
        *latest < Duration::from_secs(10),
        "the last dribbling head was closed after {latest:?}"
    );
    // The places they held are free again.
    let (status, body) = http(addr, None, "GET", "/health").await;
    assert_eq!(status, 200, "{body}");
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
