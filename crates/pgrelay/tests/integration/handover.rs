//! Schema announcements are ordered with the data (issue 22, item 2): a
//! table created or a column added while a client hydrates, or waits for
//! its snapshot, reaches that client with its rows; and a change for a
//! table a client does not know makes it fetch the table, never exit.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pgrelay_client::{ClientConfig, Event, SyncClient};
use pgrelay_protocol::{ClientMessage, ServerMessage, PROTOCOL_VERSION};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::support::proxy::{Meddle, Proxy};
use crate::support::raw::http;
use crate::support::{start_client, wait_for, RunningClient, World};

/// `sql`'s single number read from the replica (`None` while the table or
/// column is missing).
fn replica_number(path: &Path, sql: &str) -> Option<i64> {
    let conn = rusqlite::Connection::open(path).ok()?;
    conn.query_row(sql, [], |r| r.get::<_, i64>(0)).ok()
}

/// Waits until `sql` on the replica gives `want`; fails at once if the
/// client stopped (it must never exit over a schema change).
async fn wait_replica(client: &RunningClient, path: &Path, sql: &str, want: i64) {
    wait_for(sql, Duration::from_secs(60), || async {
        assert!(
            !client.task.is_finished(),
            "the client exited while waiting for {sql}"
        );
        (replica_number(path, sql) == Some(want)).then_some(())
    })
    .await;
}

/// Waits until the replica equals PostgreSQL for `tables` (a table the
/// replica lacks counts as a difference).
async fn wait_equal(world: &World, client: &RunningClient, path: &Path, tables: &[&str]) {
    let tables: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
    let mut last;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(!client.task.is_finished(), "the client exited");
        match pgrelay::cmd::verify::verify(world.url(), path, Some(&tables)).await {
            Ok(report) if report.all_match() => return,
            Ok(report) => last = report.render_table(),
            Err(e) => last = format!("{e:#}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never equalled PostgreSQL:\n{last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the server syncs `table` (its table watch noticed it).
async fn wait_synced(addr: std::net::SocketAddr, table: &str) {
    wait_for(
        "the server to sync the new table",
        Duration::from_secs(30),
        || async {
            let (_, body) = http(addr, None, "GET", "/api/status").await;
            let status: serde_json::Value = serde_json::from_str(&body).ok()?;
            status["tables"]
                .as_array()?
                .iter()
                .any(|t| t["name"] == table && t["skipped"].is_null())
                .then_some(())
        },
    )
    .await;
}

async fn wait_logged(world: &World, table: &str, changes: i64) {
    let sql = format!("SELECT count(*) FROM pgrelay.change_history WHERE table_name = '{table}'");
    wait_for(
        "the changes in the change log",
        Duration::from_secs(30),
        || async { (world.count(&sql).await == changes).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_created_while_a_client_hydrates_reaches_it() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE big (id int PRIMARY KEY, v text);
             INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 20000) g;",
        )
        .await;
    let mut config = world.server_config();
    config.table_poll_interval = Duration::from_millis(200);
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let proxy = Proxy::start(server.local_addr(), Meddle::HoldSnapshot).await;
    let path = world.replica_path("handover");
    let client = start_client(proxy.addr, &path, "handover").await;

    // The client is loading its snapshot and stays there.
    proxy.wait_held().await;
    world
        .exec(
            "CREATE TABLE fresh (id int PRIMARY KEY, w text);
             INSERT INTO fresh VALUES (1, 'before it syncs');",
        )
        .await;
    wait_synced(server.local_addr(), "public.fresh").await;
    world
        .exec("INSERT INTO fresh SELECT g, 'w' || g FROM generate_series(2, 100) g;")
        .await;
    wait_logged(&world, "public.fresh", 99).await;
    proxy.release();

    wait_replica(&client, &path, "SELECT count(*) FROM fresh", 100).await;
    world.exec("INSERT INTO fresh VALUES (101, 'live');").await;
    wait_replica(&client, &path, "SELECT count(*) FROM fresh", 101).await;
    wait_equal(&world, &client, &path, &["big", "fresh"]).await;
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

/// A client syncing in this process whose events are watched from before
/// it connects.
async fn start_watched_client(
    server: std::net::SocketAddr,
    path: &Path,
    id: &str,
) -> (RunningClient, tokio::sync::broadcast::Receiver<Event>) {
    let mut config = ClientConfig::new(format!("ws://{server}"), path);
    config.client_id = Some(id.to_owned());
    config.backoff_base = Duration::from_millis(50);
    config.backoff_cap = Duration::from_millis(500);
    let client = Arc::new(SyncClient::open(config).await.unwrap());
    let events = client.subscribe();
    let (stop, stopped) = watch::channel(false);
    let runner = Arc::clone(&client);
    let task = tokio::spawn(async move { runner.run(stopped).await });
    let running = RunningClient {
        replica: client.replica().clone(),
        stop,
        task,
        client,
    };
    (running, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_and_a_table_added_while_a_client_waits_for_its_snapshot_reach_it() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE big (id int PRIMARY KEY, v text);
             INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 1000) g;
             CREATE TABLE other (id int PRIMARY KEY);
             INSERT INTO other SELECT g FROM generate_series(1, 100) g;",
        )
        .await;
    let mut config = world.server_config();
    config.table_poll_interval = Duration::from_millis(200);
    config.max_hydrations = 1;
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let addr = server.local_addr();

    // Another client takes the only snapshot slot and keeps it: its
    // snapshot is sent and the server waits for its verdict.
    let (mut holder, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/api/sync"))
        .await
        .unwrap();
    let hello = ClientMessage::Hello {
        protocol_version: PROTOCOL_VERSION,
        client_id: "holder".to_owned(),
        token: None,
        last_lsn: None,
        log_id: None,
        resync: Vec::new(),
        tables: Some(vec!["other".to_owned()]),
        repair: false,
        schema_version: None,
    };
    holder
        .send(Message::Text(serde_json::to_string(&hello).unwrap().into()))
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(message)) = holder.next().await {
            if let Message::Text(text) = message {
                if let Ok(ServerMessage::SnapshotEnd {}) = serde_json::from_str(&text) {
                    return;
                }
            }
        }
        panic!("the holder's connection closed before its snapshot ended");
    })
    .await;
    ended.expect("the holder's snapshot within 30 s");

    // The client under test is welcomed, then waits for the slot.
    let path = world.replica_path("queued");
    let (client, mut events) = start_watched_client(addr, &path, "queued").await;
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(Event::Connected { .. }) = events.recv().await {
                return;
            }
        }
    })
    .await
    .expect("the client welcomed");
    world
        .exec(
            "ALTER TABLE big ADD COLUMN extra text;
             UPDATE big SET extra = 'x' WHERE id <= 10;
             CREATE TABLE fresh (id int PRIMARY KEY, w text);
             INSERT INTO fresh VALUES (1, 'before it syncs');",
        )
        .await;
    wait_logged(&world, "public.big", 10).await;
    wait_synced(addr, "public.fresh").await;
    world
        .exec("INSERT INTO fresh SELECT g, 'w' || g FROM generate_series(2, 50) g;")
        .await;
    wait_logged(&world, "public.fresh", 49).await;
    // The slot frees up.
    drop(holder);

    wait_replica(
        &client,
        &path,
        "SELECT count(*) FROM big WHERE extra = 'x'",
        10,
    )
    .await;
    wait_replica(&client, &path, "SELECT count(*) FROM fresh", 50).await;
    world
        .exec("UPDATE big SET extra = 'y' WHERE id = 500; INSERT INTO fresh VALUES (51, 'live');")
        .await;
    wait_replica(
        &client,
        &path,
        "SELECT count(*) FROM big WHERE extra = 'y'",
        1,
    )
    .await;
    wait_equal(&world, &client, &path, &["big", "fresh", "other"]).await;
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_for_a_table_the_client_does_not_know_makes_it_fetch_the_table() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE a (id int PRIMARY KEY, v text);
             INSERT INTO a SELECT g, 'v' FROM generate_series(1, 10) g;",
        )
        .await;
    let mut config = world.server_config();
    config.table_poll_interval = Duration::from_millis(200);
    let server = pgrelay_server::Server::start(config).await.unwrap();
    // The client never hears a `schema` announcement.
    let proxy = Proxy::start(server.local_addr(), Meddle::DropSchema).await;
    let path = world.replica_path("unknown");
    let client = start_client(proxy.addr, &path, "unknown").await;
    wait_equal(&world, &client, &path, &["a"]).await;

    world
        .exec(
            "CREATE TABLE fresh (id int PRIMARY KEY, w text);
             INSERT INTO fresh VALUES (1, 'before it syncs');",
        )
        .await;
    wait_synced(server.local_addr(), "public.fresh").await;
    world
        .exec("INSERT INTO fresh SELECT g, 'w' || g FROM generate_series(2, 50) g; UPDATE a SET v = 'w' WHERE id = 1;")
        .await;
    wait_replica(&client, &path, "SELECT count(*) FROM fresh", 50).await;
    assert!(
        proxy.dropped.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "no schema frame was dropped: the test did not test anything"
    );
    world.exec("INSERT INTO fresh VALUES (51, 'live');").await;
    wait_replica(&client, &path, "SELECT count(*) FROM fresh", 51).await;
    wait_equal(&world, &client, &path, &["a", "fresh"]).await;
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
