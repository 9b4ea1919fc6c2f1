//! Promise 1 across crashes: kill -9 of the server, of the client, and a
//! PostgreSQL crash, each in the middle of a stream; afterwards the replica
//! equals PostgreSQL and the change log holds every change exactly once.

use std::time::Duration;

use pgrelay_testkit::{PrivateCluster, TestDatabase};

use crate::support::{
    free_port, replica_lsn, spawn_client, start_client, wait_for, ServerProcess, World,
};

const ROWS: i64 = 100_000;

async fn write_rows(url: String, rows: i64, per_tx: i64) {
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut id = 0;
    while id < rows {
        let hi = (id + per_tx).min(rows);
        db.batch_execute(&format!(
            "INSERT INTO items SELECT g, 'item ' || g, g * 2 FROM generate_series({}, {hi}) g",
            id + 1
        ))
        .await
        .unwrap();
        id = hi;
    }
}

async fn assert_log_exactly_once(sql: &tokio_postgres::Client, rows: i64) {
    let row = sql
        .query_one(
            "SELECT count(*), count(DISTINCT data->>'id') FROM pgrelay.change_history WHERE table_name = 'public.items' AND operation = 'insert'",
            &[],
        )
        .await
        .unwrap();
    let (all, distinct): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(
        (all, distinct),
        (rows, rows),
        "the change log must hold each insert exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_stream_resumes_without_loss_or_duplicates() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE items (id bigint PRIMARY KEY, name text, n bigint)")
        .await;
    let port = free_port();
    let mut server = ServerProcess::spawn(world.url(), &world.slot(), port);
    let path = world.replica_path("server-crash");
    let client = start_client(server.addr, &path, "server-crash").await;

    let writer = tokio::spawn(write_rows(world.url().to_owned(), ROWS, 500));
    wait_for(
        "the change log to be part-way",
        Duration::from_secs(60),
        || async {
            (world
                .count("SELECT count(*) FROM pgrelay.change_history")
                .await
                >= ROWS / 5)
                .then_some(())
        },
    )
    .await;
    server.kill9();
    let logged_at_kill = world
        .count("SELECT count(*) FROM pgrelay.change_history")
        .await;
    assert!(
        logged_at_kill < ROWS,
        "the kill came too late to test anything"
    );
    let mut server = ServerProcess::spawn(world.url(), &world.slot(), port);
    writer.await.unwrap();
    world.wait_equal(&path, Duration::from_secs(120)).await;
    assert_log_exactly_once(&world.sql, ROWS).await;
    client.stop().await;
    server.kill9();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_apply_resumes_to_an_equal_replica() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE items (id bigint PRIMARY KEY, name text, n bigint)")
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("client-crash");
    let mut child = spawn_client(server.local_addr(), &path, "client-crash", false);

    let writer = tokio::spawn(write_rows(world.url().to_owned(), ROWS, 500));
    wait_for(
        "the client to be part-way",
        Duration::from_secs(60),
        || async { replica_lsn(&path).filter(|l| l.0 > 0).map(|_| ()) },
    )
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let lsn_at_kill = replica_lsn(&path);
    writer.await.unwrap();
    let mut child = spawn_client(server.local_addr(), &path, "client-crash", false);
    world.wait_equal(&path, Duration::from_secs(120)).await;
    assert!(replica_lsn(&path) > lsn_at_kill);
    child.kill().unwrap();
    child.wait().unwrap();
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_mid_stream_is_survived() {
    crate::support::init_tracing();
    // A cluster of its own: other tests share the common one.
    let cluster = tokio::task::spawn_blocking(PrivateCluster::start)
        .await
        .unwrap()
        .unwrap();
    let db = TestDatabase::create_on(&cluster.admin_url()).await.unwrap();
    let sql = db.connect().await.unwrap();
    sql.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, name text, n bigint)")
        .await
        .unwrap();
    let mut config = pgrelay_server::ServerConfig::new(db.url());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.slot = db.name().to_owned();
    config.status_interval = Duration::from_millis(200);
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pg-crash.sqlite");
    let client = start_client(server.local_addr(), &path, "pg-crash").await;

    write_rows(db.url().to_owned(), 20_000, 500).await;
    wait_for(
        "the first half to arrive",
        Duration::from_secs(60),
        || async { replica_lsn(&path).filter(|l| l.0 > 0).map(|_| ()) },
    )
    .await;
    let cluster = tokio::task::spawn_blocking(move || cluster.restart_immediate().map(|_| cluster))
        .await
        .unwrap()
        .unwrap();
    // Rows after the crash, through a new connection.
    let (sql, conn) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    sql.batch_execute(
        "INSERT INTO items SELECT g, 'after', 0 FROM generate_series(20001, 30000) g",
    )
    .await
    .unwrap();

    let url = db.url().to_owned();
    wait_for(
        "the replica to equal PostgreSQL after the crash",
        Duration::from_secs(120),
        || async {
            match pgrelay::cmd::verify::verify(&url, &path, None).await {
                Ok(report) if report.all_match() && !report.tables.is_empty() => Some(()),
                _ => None,
            }
        },
    )
    .await;
    assert_log_exactly_once(&sql, 30_000).await;
    client.stop().await;
    server.shutdown().await.unwrap();
    db.drop_database().await.unwrap();
    drop(cluster);
}
