//! `POST /api/changes` under abuse: a flood of requests (each refused token
//! an audit row) is rate-limited, the audit log forgets what is past its
//! retention, and one client filling the write pool does not hold up
//! another's writes.

use std::time::Duration;

use serde_json::json;

use super::{one_change, post_changes};
use crate::support::{wait_for, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_changes_is_rate_limited_per_address() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut config = world.server_config();
    config.connect_rate = 0.01;
    config.connect_burst = 3;
    config.auth = Some(pgrelay_server::AuthConfig::new(
        pgrelay_server::JwtKey::Secret(crate::auth::SECRET.to_vec()),
    ));
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let body = one_change(
        "flood",
        "tx",
        json!({"table": "public.t", "op": "insert", "new": {"id": "1"}}),
    );
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(post_changes(addr, Some("not-a-token"), &body).await.0);
    }
    assert_eq!(&statuses[..3], &[401, 401, 401], "{statuses:?}");
    assert!(statuses[3..].iter().all(|s| *s == 429), "{statuses:?}");
    // Sync connections have their own buckets.
    let (status, _) = crate::support::raw::http(addr, None, "GET", "/health").await;
    assert_eq!(status, 200);
    wait_for(
        "the refusals in the audit log",
        Duration::from_secs(30),
        || async {
            let n = world
                .count(
                    "SELECT count(*) FROM pgrelay.audit_log WHERE detail LIKE 'POST /api/changes%'",
                )
                .await;
            (n == 3).then_some(())
        },
    )
    .await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_entries_past_the_retention_are_deleted() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    // The first start creates pgrelay.audit_log.
    world.start_server().await.shutdown().await.unwrap();
    world
        .exec(
            "INSERT INTO pgrelay.audit_log (at, action, detail) VALUES
                (now() - interval '2 hours', 'refused', 'old'),
                (now() - interval '10 minutes', 'refused', 'recent')",
        )
        .await;
    let mut config = world.server_config();
    config.audit_retention = Duration::from_secs(3600);
    let server = pgrelay_server::Server::start(config).await.unwrap();
    wait_for("the old entry deleted", Duration::from_secs(30), || async {
        let old = world
            .count("SELECT count(*) FROM pgrelay.audit_log WHERE detail = 'old'")
            .await;
        (old == 0).then_some(())
    })
    .await;
    assert_eq!(
        world
            .count("SELECT count(*) FROM pgrelay.audit_log WHERE detail = 'recent'")
            .await,
        1
    );
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_filling_the_write_pool_does_not_hold_up_another() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE hogged (id int PRIMARY KEY); CREATE TABLE free (id int PRIMARY KEY)")
        .await;
    let server = world.start_server().await;
    let addr = server.local_addr();
    // Every batch of the hog waits on this lock while it holds a connection.
    let (locker, connection) = tokio_postgres::connect(world.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    locker
        .batch_execute("BEGIN; LOCK TABLE hogged IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut hog = Vec::new();
    for i in 0..12 {
        let body = one_change(
            "hog",
            &format!("hog-{i}"),
            json!({"table": "public.hogged", "op": "insert", "new": {"id": i.to_string()}}),
        );
        hog.push(tokio::spawn(async move {
            post_changes(addr, None, &body).await
        }));
    }
    wait_for(
        "the hog's batches waiting on the lock",
        Duration::from_secs(30),
        || async {
            let waiting = world
                .count(
                    "SELECT count(*) FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND query LIKE '%hogged%'",
                )
                .await;
            (waiting >= 2).then_some(())
        },
    )
    .await;
    let other = one_change(
        "other",
        "other-1",
        json!({"table": "public.free", "op": "insert", "new": {"id": "1"}}),
    );
    let (status, answer) =
        tokio::time::timeout(Duration::from_secs(10), post_changes(addr, None, &other))
            .await
            .expect("another client's write waited for the hog's");
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"applied\""), "{answer}");
    locker.batch_execute("COMMIT").await.unwrap();
    for answer in hog {
        let (status, answer) = answer.await.unwrap();
        assert_eq!(status, 200, "{answer}");
        assert!(answer.contains("\"applied\""), "{answer}");
    }
    assert_eq!(world.count("SELECT count(*) FROM hogged").await, 12);
    drop(locker);
    let _ = connection.await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
