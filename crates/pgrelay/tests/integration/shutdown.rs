//! Graceful shutdown: on SIGTERM the server stops accepting, finishes the
//! writes in flight, confirms to the slot what the change log holds and
//! closes every socket with "going away" (1001); clients reconnect with
//! backoff to the restarted server and nothing is lost or applied twice.

use std::time::Duration;

use pgrelay_protocol::{CloseCode, Lsn};

use crate::support::raw::{hello, read_to_caught_up, read_to_end};
use crate::support::{free_port, start_client, wait_for, ServerProcess, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_sessions_going_away_and_nothing_is_lost() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE t (id int PRIMARY KEY, src text NOT NULL)")
        .await;
    let port = free_port();
    let mut server = ServerProcess::spawn(world.url(), &world.slot(), port);
    let addr = server.addr;
    let path = world.replica_path("writer");
    let client = start_client(addr, &path, "writer").await;
    let mut observer = hello(addr, "observer", None).await;
    read_to_caught_up(&mut observer).await;
    // Local writes need the table in the replica: wait for its hydration.
    wait_for(
        "the writer's replica to hold t",
        Duration::from_secs(30),
        || async {
            let conn = rusqlite::Connection::open(&path).ok()?;
            conn.query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 't'",
                [],
                |_| Ok(()),
            )
            .ok()
        },
    )
    .await;

    // Client writes through the outbox and PostgreSQL writes, both going
    // on across the shutdown and restart.
    const CLIENT_WRITES: i32 = 300;
    let sync = std::sync::Arc::clone(&client.client);
    let client_writer = tokio::spawn(async move {
        for id in 1..=CLIENT_WRITES {
            sync.execute(format!("INSERT INTO t VALUES ({id}, 'client')"))
                .await
                .unwrap();
            tokio::task::yield_now().await;
        }
    });
    let (stop_pg, mut pg_stopped) = tokio::sync::watch::channel(false);
    let pg_writer = {
        let url = world.url().to_owned();
        tokio::spawn(async move {
            let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut id = 100_000;
            while !*pg_stopped.borrow_and_update() {
                db.execute("INSERT INTO t VALUES ($1, 'pg')", &[&id])
                    .await
                    .unwrap();
                id += 1;
            }
            id - 100_000
        })
    };
    wait_for("writes flowing", Duration::from_secs(30), || async {
        let rows = world
            .count("SELECT count(*) FROM t WHERE src = 'client'")
            .await;
        (rows >= 50).then_some(())
    })
    .await;

    let pid = server.child.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let ended = read_to_end(&mut observer, Duration::from_secs(30)).await;
    assert_eq!(ended.close, Some(CloseCode::GOING_AWAY.0), "{ended:?}");
    let status = wait_for("the server to exit", Duration::from_secs(30), || {
        let exited = server.child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(status.success(), "the server exits cleanly: {status:?}");
    // The slot was confirmed up to what the change log holds.
    let row = world
        .sql
        .query_one(
            "SELECT (SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1)::text,
                    (SELECT max(lsn) FROM pgrelay.change_history)::text",
            &[&world.slot()],
        )
        .await
        .unwrap();
    let confirmed: Lsn = row.get::<_, String>(0).parse().unwrap();
    let logged: Lsn = row.get::<_, String>(1).parse().unwrap();
    assert!(
        confirmed >= logged,
        "confirmed {confirmed} behind the change log {logged}"
    );

    // Back up on the same port: the client reconnects by itself.
    server = ServerProcess::spawn(world.url(), &world.slot(), port);
    client_writer.await.unwrap();
    stop_pg.send(true).unwrap();
    let pg_rows = pg_writer.await.unwrap();
    wait_for(
        "every client write answered",
        Duration::from_secs(60),
        || async {
            let report = client.client.outbox(0).await.unwrap();
            (report.pending == 0 && report.sent == 0).then_some(())
        },
    )
    .await;
    let report = client.client.outbox(0).await.unwrap();
    assert_eq!(report.rejected, 0);
    assert_eq!(
        world
            .count("SELECT count(*) FROM t WHERE src = 'client'")
            .await,
        i64::from(CLIENT_WRITES)
    );
    assert_eq!(
        world.count("SELECT count(*) FROM t WHERE src = 'pg'").await,
        i64::from(pg_rows)
    );
    world.wait_equal(&path, Duration::from_secs(60)).await;
    client.stop().await;
    drop(server);
    world.db.drop_database().await.unwrap();
}
