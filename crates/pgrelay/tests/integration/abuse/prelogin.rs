//! Before login: sockets with no token that hold unfinished fragmented
//! messages, kept alive with pings, cannot grow the server's memory past a
//! bound, and the hello deadline is absolute.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{free_port, ServerProcess, World};

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A raw TCP connection upgraded to a WebSocket on `/api/sync`.
async fn upgraded(addr: std::net::SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /api/sync HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tcp.read(&mut byte).await.unwrap(),
            1,
            "closed during the upgrade"
        );
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

/// A masked client frame (mask key zero: the payload goes as is).
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
    out
}

/// Sends the first fragments of a 4 MiB text message with pings between
/// them, as long as the server takes them; returns the bytes it took.
async fn hold_fragments(mut tcp: TcpStream) -> (usize, TcpStream) {
    let piece = vec![b' '; 256 << 10];
    let mut sent = 0;
    for i in 0..15 {
        let opcode = if i == 0 { 0x1 } else { 0x0 };
        if tcp.write_all(&frame(false, opcode, &piece)).await.is_err() {
            break;
        }
        if tcp.write_all(&frame(true, 0x9, b"")).await.is_err() {
            break;
        }
        sent += piece.len();
    }
    (sent, tcp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_sockets_holding_partial_messages_stay_within_a_bound() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let secret = world.dir.path().join("jwt.secret");
    std::fs::write(&secret, crate::auth::SECRET).unwrap();
    let server = ServerProcess::spawn_with(
        world.url(),
        &world.slot(),
        free_port(),
        &[
            "--auth",
            "jwt",
            "--jwt-secret-file",
            secret.to_str().unwrap(),
        ],
    );
    let pid = server.child.id();
    let addr = server.addr;
    let before = rss_kib(pid);
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(tokio::spawn(hold_fragments(upgraded(addr).await)));
    }
    let mut sockets = Vec::new();
    for h in held {
        sockets.push(h.await.unwrap().1);
    }
    // Give the server every byte that is in flight before measuring.
    let after = {
        let mut peak = 0;
        for _ in 0..10 {
            peak = peak.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(100)).await; // sampling, not settling
        }
        peak
    };
    eprintln!("40 sockets with partial 4 MiB messages: server RSS {before} -> {after} KiB");
    assert!(
        after < before + 48 * 1024,
        "unauthenticated sockets grew the server from {before} to {after} KiB"
    );
    // The server still answers.
    let (status, _) = crate::support::raw::http(addr, None, "GET", "/health").await;
    assert_eq!(status, 200);
    drop(sockets);
    drop(server);
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_do_not_extend_the_hello_deadline() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let server = world.start_server().await;
    let mut tcp = upgraded(server.local_addr()).await;
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            tokio::select! {
                read = tcp.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return started.elapsed(),
                    Ok(_) => {}
                },
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if tcp.write_all(&frame(true, 0x9, b"")).await.is_err() {
                        return started.elapsed();
                    }
                }
            }
        }
    })
    .await
    .expect("a socket sending only pings was kept for 30 s");
    assert!(closed < Duration::from_secs(15), "closed after {closed:?}");
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
