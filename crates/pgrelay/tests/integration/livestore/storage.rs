//! Storage: the SQLite file survives a restart with the same backend id;
//! PostgreSQL storage admits pushes across nodes by the stored head.

use serde_json::Value;

use pgrelay::cmd::serve::ServeConfig;
use pgrelay_eventlog::{EventLogConfig, EventLogStorage};

use super::client::{assert_complete, chunk_seqs, config, events, start, store_id, Sock};
use crate::support::World;

/// Starts a live pull from the beginning; returns the backend id and the
/// sequence numbers of the first page.
async fn backend_of(sock: &mut Sock) -> (String, Vec<i64>) {
    sock.pull("0", None, true).await;
    let first: Value = sock.recv().await;
    let backend = first["values"][0]["backendId"].as_str().unwrap().to_owned();
    (backend, chunk_seqs(&first))
}

#[tokio::test]
async fn a_restart_on_the_same_sqlite_file_keeps_log_and_backend_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.eventlog.storage = EventLogStorage::Sqlite(Some(dir.path().join("events.sqlite")));
    let store = store_id("restart");

    let server = start(cfg.clone()).await;
    let mut a = Sock::open(server.local_addr(), "/livestore", &store).await;
    let (backend, _) = backend_of(&mut a).await;
    a.push("1", &events(0, 120, "w"), Some(&backend)).await;
    assert_eq!(
        a.until_exit("1", &mut Vec::new()).await["exit"]["_tag"],
        "Success"
    );
    server.shutdown().await.unwrap();
    // The socket is closed by the shutdown.
    while a.next().await.is_some() {}

    let server = start(cfg).await;
    let mut b = Sock::open(server.local_addr(), "/livestore", &store).await;
    b.pull("0", Some((&backend, 100)), true).await;
    let mut seen = Vec::new();
    b.chunks_until(120, &mut seen).await;
    assert_eq!(seen, (101..=120).collect::<Vec<_>>(), "the log survived");
    b.push("2", &events(120, 1, "w"), Some(&backend)).await;
    assert_eq!(
        b.until_exit("2", &mut Vec::new()).await["exit"]["_tag"],
        "Success"
    );
    let mut c = Sock::open(server.local_addr(), "/livestore", &store).await;
    let (again, mut all) = backend_of(&mut c).await;
    assert_eq!(again, backend, "the backend id is stable");
    c.chunks_until(121, &mut all).await;
    assert_complete("a new reader", &all, 121);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn postgres_storage_admits_pushes_across_two_nodes() {
    let world = World::new().await;
    let server = world.server_config();
    let eventlog = EventLogConfig {
        storage: EventLogStorage::Postgres(world.url().into()),
        ..EventLogConfig::default()
    };
    let cfg = ServeConfig {
        server,
        eventlog,
        eventlog_auth: None,
    };
    let node_a = start(cfg.clone()).await;
    let mut cfg_b = cfg.clone();
    cfg_b.server.slot = format!("{}_b", world.slot());
    let node_b = start(cfg_b).await;
    let store = store_id("pg");

    let mut a = Sock::open(node_a.local_addr(), "/livestore", &store).await;
    let mut b = Sock::open(node_b.local_addr(), "/livestore", &store).await;
    let (backend, _) = backend_of(&mut a).await;
    assert_eq!(
        backend_of(&mut b).await.0,
        backend,
        "both nodes see one backend id"
    );

    a.push("1", &events(0, 5, "a"), Some(&backend)).await;
    assert_eq!(
        a.until_exit("1", &mut Vec::new()).await["exit"]["_tag"],
        "Success"
    );
    // Node b has not seen that push; the stored head still refuses b's stale one.
    b.push("1", &events(0, 1, "b"), Some(&backend)).await;
    let exit = b.until_exit("1", &mut Vec::new()).await;
    assert_eq!(exit["exit"]["cause"]["error"]["_tag"], "ServerAheadError");
    assert_eq!(exit["exit"]["cause"]["error"]["minimumExpectedNum"], 5);
    b.push("2", &events(5, 2, "b"), Some(&backend)).await;
    assert_eq!(
        b.until_exit("2", &mut Vec::new()).await["exit"]["_tag"],
        "Success"
    );

    // Node a's live socket receives node b's batch (LISTEN/NOTIFY), and a
    // reader on either node gets the whole log from PostgreSQL.
    let mut a_seen = Vec::new();
    a.chunks_until(7, &mut a_seen).await;
    assert_eq!(
        a_seen,
        vec![6, 7],
        "node a's live socket got node b's batch"
    );
    let mut r = Sock::open(node_a.local_addr(), "/livestore", &store).await;
    r.pull("0", None, true).await;
    let mut seen = Vec::new();
    r.chunks_until(7, &mut seen).await;
    assert_complete("a reader on node a", &seen, 7);
    let stored = world
        .count(&format!(
            "SELECT count(*) FROM pgrelay.eventlog_events WHERE store_id = '{store}'"
        ))
        .await;
    assert_eq!(stored, 7);
    node_a.shutdown().await.unwrap();
    node_b.shutdown().await.unwrap();
}
