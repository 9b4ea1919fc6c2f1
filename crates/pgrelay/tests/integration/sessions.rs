//! Sessions at scale: subscriptions to some tables, a second connection
//! with the same client id replacing the first, and slow clients (promise
//! 8) that read the change log or are closed while the others stay live.

use std::time::Duration;

use pgrelay_client::ClientError;
use pgrelay_protocol::{CloseCode, ErrorCode, Lsn};
use tokio_tungstenite::tungstenite::Message;

use crate::support::raw::{
    hello, http, metric, read_to_caught_up, read_to_end, start_client_with, Socket,
};
use crate::support::{replica_lsn, start_client, wait_for, World, BIN};

async fn head(world: &World) -> String {
    world
        .sql
        .query_one("SELECT max(lsn)::text FROM pgrelay.change_history", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribed_client_gets_only_its_tables() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE b (id int PRIMARY KEY, v text);")
        .await;
    let server = world.start_server().await;
    let addr = server.local_addr();
    let path = world.replica_path("only-a");
    let client = start_client_with(addr, &path, "only-a", |c| {
        c.tables = Some(vec!["a".to_owned()])
    })
    .await;
    world
        .exec("INSERT INTO a VALUES (1, 'a1'); INSERT INTO b VALUES (1, 'b1');")
        .await;
    // One transaction over both tables: the client gets its half.
    world
        .exec("BEGIN; INSERT INTO a VALUES (2, 'a2'); INSERT INTO b VALUES (2, 'b2'); UPDATE a SET v = 'a1x' WHERE id = 1; COMMIT;")
        .await;
    let only_a = vec!["a".to_owned()];
    let url = world.url().to_owned();
    wait_for(
        "table a on the replica",
        Duration::from_secs(30),
        || async {
            pgrelay::cmd::verify::verify(&url, &path, Some(only_a.as_slice()))
                .await
                .ok()
                .filter(|r| r.all_match())
                .map(|_| ())
        },
    )
    .await;
    let status = client.replica.status().await.unwrap();
    let tables: Vec<&str> = status.tables.iter().map(|t| t.table.as_str()).collect();
    assert_eq!(tables, ["public.a"], "the replica holds only its table");

    // A new replica syncing only `a`, after a last transaction on `b` only,
    // still reaches the head and exits when caught up.
    world.exec("INSERT INTO b VALUES (3, 'b3')").await;
    // Six changes in all, the last one on `b` only.
    wait_for(
        "the change log to hold every change",
        Duration::from_secs(20),
        || async {
            (world
                .count("SELECT count(*) FROM pgrelay.change_history")
                .await
                == 6)
                .then_some(())
        },
    )
    .await;
    let head = head(&world).await;
    wait_for(
        "the server at the head",
        Duration::from_secs(20),
        || async {
            let (_, body) = http(addr, None, "GET", "/api/status").await;
            body.contains(&format!("\"head_lsn\":\"{head}\""))
                .then_some(())
        },
    )
    .await;
    let fresh = world.replica_path("fresh-a");
    let out = tokio::process::Command::new(BIN)
        .args(["client", "sync", "--server", &format!("ws://{addr}")])
        .args([
            "--client-id",
            "fresh-a",
            "--tables",
            "a",
            "--exit-when-caught-up",
        ])
        .arg("--db")
        .arg(&fresh)
        .env("PGRELAY_LOG", "warn")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the CLI client exits when caught up")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(replica_lsn(&fresh), Some(head.parse::<Lsn>().unwrap()));
    let report = pgrelay::cmd::verify::verify(&url, &fresh, Some(only_a.as_slice()))
        .await
        .unwrap();
    assert!(report.all_match(), "{}", report.render_table());

    // A table the server does not sync is refused by name.
    let mut socket = hello(addr, "typo", Some(vec!["a", "nope"])).await;
    let ended = read_to_end(&mut socket, Duration::from_secs(20)).await;
    let (code, message) = ended.error.expect("an error frame");
    assert_eq!(code, ErrorCode::UnknownTable);
    assert!(message.contains("nope"), "{message}");
    assert_eq!(ended.close, Some(CloseCode::POLICY_VIOLATION.0));

    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_the_same_id_replaces_the_first() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let server = world.start_server().await;
    let addr = server.local_addr();

    let mut first = hello(addr, "dup", None).await;
    read_to_caught_up(&mut first).await;
    let path = world.replica_path("dup");
    let second = start_client(addr, &path, "dup").await;
    let ended = read_to_end(&mut first, Duration::from_secs(20)).await;
    assert_eq!(ended.error.map(|e| e.0), Some(ErrorCode::Replaced));
    assert_eq!(ended.close, Some(CloseCode::REPLACED.0));

    world.exec("INSERT INTO t VALUES (1)").await;
    world.wait_equal(&path, Duration::from_secs(30)).await;
    wait_for("one session left", Duration::from_secs(10), || async {
        (metric(addr, "pgrelay_sessions").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(metric(addr, "pgrelay_sessions_replaced_total").await, 1.0);

    // The library client that is replaced stops for good instead of
    // reconnecting and taking the session back.
    let third = start_client(addr, &world.replica_path("dup-3"), "dup").await;
    let result = tokio::time::timeout(Duration::from_secs(20), second.task)
        .await
        .expect("the replaced client stops")
        .unwrap();
    match result {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, ErrorCode::Replaced),
        other => panic!("expected a refusal as replaced, got {other:?}"),
    }
    world.exec("INSERT INTO t VALUES (2)").await;
    world
        .wait_equal(&world.replica_path("dup-3"), Duration::from_secs(30))
        .await;
    third.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

/// A socket whose receive buffer is small, so the server's sends block
/// soon after the client stops reading.
async fn tight_socket(addr: std::net::SocketAddr, id: &str) -> Socket {
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_recv_buffer_size(4096).unwrap();
    let stream = tcp.connect(addr).await.unwrap();
    let (mut socket, _) = tokio_tungstenite::client_async(
        format!("ws://{addr}/api/sync"),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .unwrap();
    crate::support::raw::send_hello(&mut socket, id, None).await;
    socket
}

/// Writes `txs` transactions of 100 rows of about 1 KiB each.
async fn write_bulk(world: &World, from: i32, txs: i32) {
    for n in from..from + txs {
        let lo = n * 100;
        world
            .exec(&format!(
                "INSERT INTO big SELECT g, repeat('x', 1000) FROM generate_series({lo}, {lo} + 99) g"
            ))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_reads_the_change_log_while_others_stay_live() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE big (id int PRIMARY KEY, body text)")
        .await;
    let mut config = world.server_config();
    config.live_buffer = 8;
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let good_path = world.replica_path("good");
    let good = start_client(addr, &good_path, "good").await;

    let mut slow = tight_socket(addr, "slow").await;
    read_to_caught_up(&mut slow).await;
    // The slow client reads nothing while 60 transactions (about 6 MB) go
    // out: far more than its socket buffers and the live buffer hold.
    write_bulk(&world, 0, 60).await;
    // The fast client is not held up by the slow one.
    world.wait_equal(&good_path, Duration::from_secs(60)).await;

    // Now the slow client reads: every transaction arrives, in order, once.
    let head: Lsn = head(&world).await.parse().unwrap();
    let mut received: Vec<Lsn> = Vec::new();
    let mut rows = 0;
    let read = async {
        use futures_util::StreamExt;
        while let Some(message) = slow.next().await {
            if let Ok(Message::Text(text)) = message {
                if let Ok(pgrelay_protocol::ServerMessage::Tx(tx)) = serde_json::from_str(&text) {
                    rows += tx.changes.len();
                    received.push(tx.lsn);
                    if tx.lsn == head {
                        return;
                    }
                }
            }
        }
        panic!("the slow client was closed");
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the slow client gets everything");
    assert_eq!(received.len(), 60);
    assert!(
        received.windows(2).all(|w| w[0] < w[1]),
        "in commit order, once"
    );
    assert_eq!(rows, 6000);
    assert!(
        metric(addr, "pgrelay_session_catch_ups_total").await >= 1.0,
        "the slow session fell behind the live buffer and read the change log"
    );
    good.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_as_too_slow() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE big (id int PRIMARY KEY, body text)")
        .await;
    let mut config = world.server_config();
    config.live_buffer = 8;
    config.send_timeout = Duration::from_secs(2);
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let good_path = world.replica_path("good");
    let good = start_client(addr, &good_path, "good").await;
    let mut stuck = tight_socket(addr, "stuck").await;
    read_to_caught_up(&mut stuck).await;
    wait_for("two sessions", Duration::from_secs(10), || async {
        (metric(addr, "pgrelay_sessions").await == 2.0).then_some(())
    })
    .await;

    write_bulk(&world, 0, 60).await;
    world.wait_equal(&good_path, Duration::from_secs(60)).await;
    wait_for(
        "the stuck session closed",
        Duration::from_secs(30),
        || async { (metric(addr, "pgrelay_sessions_too_slow_total").await == 1.0).then_some(()) },
    )
    .await;
    wait_for("one session left", Duration::from_secs(10), || async {
        (metric(addr, "pgrelay_sessions").await == 1.0).then_some(())
    })
    .await;
    // The good client goes on after it.
    write_bulk(&world, 60, 2).await;
    world.wait_equal(&good_path, Duration::from_secs(30)).await;
    drop(stuck);
    good.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
