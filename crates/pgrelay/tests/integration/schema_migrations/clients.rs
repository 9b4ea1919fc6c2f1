//! Client migrations: applied by a connected replica and by one that was
//! offline, visible per client, a failing one reported and retried, and a
//! rollback undone in the replicas.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::{migrate_ok, write_migration};
use crate::support::raw::http;
use crate::support::{start_client, wait_for, World, BIN};

const TOKEN: &str = "admin-token-of-the-migration-tests";
const VERSION: i64 = 20261203130000;

/// What the replica's SQLite holds: object names, and its client schema
/// version.
fn replica_objects(db: &Path) -> (Vec<String>, i64) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let names = conn
        .prepare("SELECT name FROM sqlite_master ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let version = conn
        .query_row(
            "SELECT coalesce(max(version), 0) FROM _pgrelay_migrations",
            [],
            |r| r.get(0),
        )
        .unwrap_or(0);
    (names, version)
}

async fn wait_replica(db: &Path, what: &str, check: impl Fn(&[String], i64) -> bool) {
    wait_for(what, Duration::from_secs(30), || async {
        let (names, version) = replica_objects(db);
        check(&names, version).then_some(())
    })
    .await;
}

async fn start_server(world: &World) -> pgrelay_server::Server {
    let mut config = world.server_config();
    config.admin_token = Some(TOKEN.into());
    pgrelay_server::Server::start(config).await.unwrap()
}

/// `GET /api/admin/migrations`: the report of `client` on `version`.
async fn report(addr: SocketAddr, client: &str, version: i64) -> Option<Value> {
    let (status, body) = http(addr, Some(TOKEN), "GET", "/api/admin/migrations").await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    answer["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client_id"] == client && c["version"] == version)
        .cloned()
}

async fn wait_report(
    addr: SocketAddr,
    client: &str,
    version: i64,
    check: impl Fn(&Value) -> bool,
) -> Value {
    wait_for(
        &format!("{client}'s report on {version}"),
        Duration::from_secs(30),
        || async { report(addr, client, version).await.filter(|r| check(r)) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_migration_reaches_connected_and_offline_replicas_and_a_rollback_undoes_it() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE todos (id int PRIMARY KEY, title text); INSERT INTO todos VALUES (1, 'a')")
        .await;
    let server = start_server(&world).await;
    let addr = server.local_addr();
    let online_db = world.replica_path("online");
    let offline_db = world.replica_path("offline");
    let online = start_client(addr, &online_db, "online").await;
    let offline = start_client(addr, &offline_db, "offline").await;
    world.wait_equal(&online_db, Duration::from_secs(30)).await;
    world.wait_equal(&offline_db, Duration::from_secs(30)).await;
    offline.stop().await;

    let dir = world.dir.path().join("migrations");
    write_migration(
        &dir,
        VERSION,
        "drafts",
        &[
            ("up.sql", "COMMENT ON TABLE todos IS 'with local drafts';"),
            ("down.sql", "COMMENT ON TABLE todos IS NULL;"),
            (
                "client_up.sql",
                "CREATE INDEX todos_title ON todos (title);
                 CREATE TABLE local_drafts (id INTEGER PRIMARY KEY, body TEXT);",
            ),
            (
                "client_down.sql",
                "DROP INDEX todos_title; DROP TABLE local_drafts;",
            ),
        ],
    );
    migrate_ok(world.url(), &dir, &["up"]).await;

    // Live, to the connected replica.
    wait_replica(
        &online_db,
        "the index and local table in the online replica",
        |names, v| {
            names.iter().any(|n| n == "todos_title")
                && names.iter().any(|n| n == "local_drafts")
                && v == VERSION
        },
    )
    .await;
    let applied = wait_report(addr, "online", VERSION, |r| r["state"] == "applied").await;
    assert_eq!(applied["attempts"], 1);
    // The local-only table is the replica's own: its rows are not sent.
    online
        .replica
        .execute("INSERT INTO local_drafts (body) VALUES ('mine')")
        .await
        .unwrap();
    assert!(!online.replica.has_unsent_writes().await.unwrap());

    // On connect, to the replica that was offline.
    assert_eq!(replica_objects(&offline_db).1, 0);
    let offline = start_client(addr, &offline_db, "offline").await;
    wait_replica(
        &offline_db,
        "the migration in the offline replica",
        |names, v| names.iter().any(|n| n == "todos_title") && v == VERSION,
    )
    .await;
    wait_report(addr, "offline", VERSION, |r| r["state"] == "applied").await;

    // Per client in `admin clients`.
    let out = tokio::process::Command::new(BIN)
        .args([
            "admin",
            "clients",
            "--json",
            "--server",
            &format!("http://{addr}"),
            "--admin-token",
            TOKEN,
        ])
        .output()
        .await
        .unwrap();
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    for id in ["online", "offline"] {
        let row = rows.iter().find(|r| r["client_id"] == id).unwrap();
        assert_eq!(row["schema_version"], VERSION, "{row}");
    }

    // Rolling back sends the down part.
    migrate_ok(world.url(), &dir, &["down"]).await;
    for db in [&online_db, &offline_db] {
        wait_replica(db, "the rollback in the replica", |names, v| {
            !names
                .iter()
                .any(|n| n == "todos_title" || n == "local_drafts")
                && v == 0
        })
        .await;
    }
    wait_report(addr, "online", VERSION, |r| r["state"] == "rolled_back").await;
    online.stop().await;
    offline.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_client_migration_is_reported_and_retried_until_it_applies() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE todos (id int PRIMARY KEY, title text); INSERT INTO todos VALUES (1, 'a')")
        .await;
    let server = start_server(&world).await;
    let addr = server.local_addr();
    let db = world.replica_path("failing");
    let client = start_client(addr, &db, "failing").await;
    world.wait_equal(&db, Duration::from_secs(30)).await;

    let dir = world.dir.path().join("migrations");
    write_migration(
        &dir,
        VERSION,
        "needs_notes",
        &[
            ("up.sql", "SELECT 1;"),
            ("down.sql", "SELECT 1;"),
            // `notes` is not in the replica (yet): this fails.
            (
                "client_up.sql",
                "CREATE TABLE half (x); CREATE INDEX notes_body ON notes (body);",
            ),
        ],
    );
    migrate_ok(world.url(), &dir, &["up"]).await;
    let failed = wait_report(addr, "failing", VERSION, |r| {
        r["state"] == "failed" && r["attempts"].as_i64().unwrap_or(0) >= 2
    })
    .await;
    assert!(
        failed["error"].as_str().unwrap().contains("notes"),
        "{failed}"
    );
    let (names, version) = replica_objects(&db);
    assert!(
        !names.iter().any(|n| n == "half"),
        "a failed migration leaves nothing"
    );
    assert_eq!(version, 0);
    // Visible in `admin clients` too.
    let (_, body) = http(addr, Some(TOKEN), "GET", "/api/admin/clients").await;
    let rows: Vec<Value> = serde_json::from_str(&body).unwrap();
    let row = rows.iter().find(|r| r["client_id"] == "failing").unwrap();
    assert_eq!(row["failed_migrations"][0]["version"], VERSION, "{row}");

    // Cure the cause in the replica: the next retry applies it.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute_batch("CREATE TABLE notes (body TEXT)")
        .unwrap();
    drop(conn);
    let applied = wait_report(addr, "failing", VERSION, |r| r["state"] == "applied").await;
    assert!(applied["attempts"].as_i64().unwrap() >= 3, "{applied}");
    assert!(applied.get("error").is_none_or(Value::is_null), "{applied}");
    wait_replica(&db, "the retried migration", |names, v| {
        names.iter().any(|n| n == "notes_body") && v == VERSION
    })
    .await;
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
