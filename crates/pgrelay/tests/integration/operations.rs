//! Operations: `/health`, `/ready` with stall detection, `/metrics`, the
//! admin API and its CLI, and the client registry shared through Redis by
//! two nodes (register, refresh, unregister, "gone").

use std::time::Duration;

use pgrelay_protocol::{CloseCode, ErrorCode};

use crate::support::raw::{
    hello, http, metric, read_to_caught_up, read_to_end, redis, redis_url, unique_prefix,
};
use crate::support::{start_client, wait_for, World, BIN};

const TOKEN: &str = "test-admin-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_fails_while_replication_stalls_and_metrics_show_it() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut config = world.server_config();
    config.stall_after = Duration::from_secs(2);
    config.monitor_interval = Duration::from_millis(200);
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let path = world.replica_path("c");
    let client = start_client(addr, &path, "c").await;
    wait_for("ready", Duration::from_secs(30), || async {
        (http(addr, None, "GET", "/ready").await.0 == 200).then_some(())
    })
    .await;
    world.exec("INSERT INTO t VALUES (1)").await;
    world.wait_equal(&path, Duration::from_secs(30)).await;

    let (status, body) = http(addr, None, "GET", "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "pgrelay_replication_lag_bytes",
        "pgrelay_replication_lag_seconds",
        "pgrelay_confirmed_lsn",
        "pgrelay_change_log_rows",
        "pgrelay_change_log_bytes",
        "pgrelay_sessions 1",
        "pgrelay_messages_sent_total",
        "pgrelay_bytes_sent_total",
        "pgrelay_session_lag_bytes_bucket{le=\"0.0\"}",
        "pgrelay_write_batches_total{outcome=\"applied\"}",
        "pgrelay_rate_limited_total{limit=\"connect\"}",
    ] {
        assert!(body.contains(name), "no {name} in\n{body}");
    }
    assert!(metric(addr, "pgrelay_confirmed_lsn").await > 0.0);

    // Hold the change log so the pipeline cannot write to it: PostgreSQL's
    // WAL moves on (rows keep coming) and the confirmed position does not.
    let (locker, conn) = tokio_postgres::connect(world.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    locker
        .batch_execute("BEGIN; LOCK TABLE pgrelay.change_history IN EXCLUSIVE MODE;")
        .await
        .unwrap();
    let mut n = 2;
    let world_ref = &world;
    let body = wait_for("not ready (stalled)", Duration::from_secs(30), || {
        n += 1;
        let insert = format!("INSERT INTO t VALUES ({n})");
        async move {
            world_ref.exec(&insert).await;
            let (status, body) = http(addr, None, "GET", "/ready").await;
            (status == 503 && body.contains("stalled")).then_some(body)
        }
    })
    .await;
    assert!(body.contains("\"ready\":false"), "{body}");
    assert_eq!(
        http(addr, None, "GET", "/health").await.0,
        200,
        "still alive"
    );
    assert_eq!(metric(addr, "pgrelay_replication_stalled").await, 1.0);

    locker.batch_execute("ROLLBACK").await.unwrap();
    wait_for("ready again", Duration::from_secs(30), || async {
        (http(addr, None, "GET", "/ready").await.0 == 200).then_some(())
    })
    .await;
    world.wait_equal(&path, Duration::from_secs(30)).await;
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

async fn admin_cli(addr: std::net::SocketAddr, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(BIN)
        .arg("admin")
        .args(args)
        .args([
            "--server",
            &format!("http://{addr}"),
            "--admin-token",
            TOKEN,
        ])
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_lists_disconnects_and_forgets_clients() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut config = world.server_config();
    config.admin_token = Some(TOKEN.into());
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let path = world.replica_path("alpha");
    let alpha = start_client(addr, &path, "alpha").await;
    let mut beta = hello(addr, "beta", None).await;
    read_to_caught_up(&mut beta).await;
    world.exec("INSERT INTO t VALUES (1)").await;
    world.wait_equal(&path, Duration::from_secs(30)).await;

    // The token is required, and checked.
    assert_eq!(http(addr, None, "GET", "/api/admin/clients").await.0, 401);
    assert_eq!(
        http(
            addr,
            Some("wrong-token-wrong-token"),
            "GET",
            "/api/admin/clients"
        )
        .await
        .0,
        401
    );
    let table = wait_for("both clients listed", Duration::from_secs(10), || async {
        let out = admin_cli(addr, &["clients"]).await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && text.contains("alpha") && text.contains("beta")).then_some(text)
    })
    .await;
    assert!(
        table.contains("connected") && table.contains("yes") && table.contains("2 clients"),
        "{table}"
    );
    let (_, json) = http(addr, Some(TOKEN), "GET", "/api/admin/clients").await;
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    let alpha_row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["client_id"] == "alpha")
        .unwrap();
    for field in [
        "connected",
        "node",
        "lsn",
        "lag_bytes",
        "last_seen_ms",
        "connected_at_ms",
    ] {
        assert!(
            !alpha_row[field].is_null(),
            "{field} missing in {alpha_row}"
        );
    }

    // Disconnect: beta's session closes with `disconnected`.
    let out = admin_cli(addr, &["disconnect", "beta"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ended = read_to_end(&mut beta, Duration::from_secs(20)).await;
    assert_eq!(ended.error.map(|e| e.0), Some(ErrorCode::Disconnected));
    assert_eq!(ended.close, Some(CloseCode::DISCONNECTED.0));
    // Admin actions are audited.
    wait_for("the admin action in the audit log", Duration::from_secs(10), || async {
        (world
            .count("SELECT count(*) FROM pgrelay.audit_log WHERE action = 'admin' AND client_id = 'beta' AND detail = 'admin: disconnect'")
            .await
            == 1)
            .then_some(())
    })
    .await;
    wait_for("beta unregistered", Duration::from_secs(10), || async {
        let (_, json) = http(addr, Some(TOKEN), "GET", "/api/admin/clients").await;
        (!json.contains("beta")).then_some(())
    })
    .await;
    // Unknown clients are answered 404, a notification for one with no
    // session "gone".
    let out = admin_cli(addr, &["disconnect", "beta"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
    assert_eq!(
        http(addr, Some(TOKEN), "POST", "/api/admin/clients/beta/notify")
            .await
            .0,
        410
    );
    assert_eq!(
        http(addr, Some(TOKEN), "POST", "/api/admin/clients/alpha/notify")
            .await
            .0,
        202
    );

    // Forget: alpha's record goes and its session closes; the library
    // client reconnects (disconnected is retryable) and registers again.
    let out = admin_cli(addr, &["forget", "alpha"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    world.exec("INSERT INTO t VALUES (2)").await;
    world.wait_equal(&path, Duration::from_secs(30)).await;
    alpha.stop().await;
    server.shutdown().await.unwrap();

    // Without --admin-token the admin API is off.
    let server = world.start_server().await;
    let (status, body) = http(
        server.local_addr(),
        Some(TOKEN),
        "GET",
        "/api/admin/clients",
    )
    .await;
    assert_eq!(status, 404);
    assert!(body.contains("--admin-token"), "{body}");
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_the_registry_through_redis() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let prefix = unique_prefix("two-nodes");
    let node = |name: &str, slot: String| {
        let mut config = world.server_config();
        config.slot = slot;
        config.admin_token = Some(TOKEN.into());
        config.registry = Some(redis_url().into());
        config.registry_prefix = prefix.clone();
        config.registry_refresh = Duration::from_millis(200);
        config.node = Some(name.to_owned());
        config
    };
    let a = pgrelay_server::Server::start(node("node-a", world.slot()))
        .await
        .unwrap();
    let b = pgrelay_server::Server::start(node("node-b", format!("{}_b", world.slot())))
        .await
        .unwrap();
    let (a_addr, b_addr) = (a.local_addr(), b.local_addr());

    // A client on node a is registered, with its metadata, in Redis.
    let mut c = hello(a_addr, "roamer", None).await;
    read_to_caught_up(&mut c).await;
    let key = format!("{prefix}client:roamer");
    let stored = redis(&["GET", &key]).await;
    for field in [
        "\"node\":\"node-a\"",
        "connected_at_ms",
        "last_lsn",
        "last_activity_ms",
        "\"session\"",
    ] {
        assert!(stored.contains(field), "{field} not in {stored}");
    }
    let ttl = redis(&["TTL", &key]).await;
    let ttl: i64 = ttl.trim().trim_start_matches(':').parse().unwrap();
    assert!(ttl > 23 * 3600 && ttl <= 24 * 3600, "TTL {ttl}");
    // Node b sees it, and passes a notification on to node a.
    let (_, list) = http(b_addr, Some(TOKEN), "GET", "/api/admin/clients").await;
    assert!(list.contains("roamer") && list.contains("node-a"), "{list}");
    let (status, body) = http(
        b_addr,
        Some(TOKEN),
        "POST",
        "/api/admin/clients/roamer/notify",
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert!(body.contains("node-a"), "{body}");
    assert_eq!(
        http(
            a_addr,
            Some(TOKEN),
            "POST",
            "/api/admin/clients/roamer/notify"
        )
        .await
        .0,
        202
    );

    // The same client connects through node b: node a learns it from the
    // registry and closes its session as replaced.
    let mut again = hello(b_addr, "roamer", None).await;
    read_to_caught_up(&mut again).await;
    let ended = read_to_end(&mut c, Duration::from_secs(20)).await;
    assert_eq!(ended.error.map(|e| e.0), Some(ErrorCode::Replaced));
    assert!(redis(&["GET", &key]).await.contains("node-b"));
    // Closing unregisters.
    drop(again);
    wait_for("unregistered on close", Duration::from_secs(10), || async {
        redis(&["EXISTS", &key]).await.contains(":0").then_some(())
    })
    .await;

    // A record left behind by a node that died: notifying it answers
    // "gone" (410) and removes it.
    let ghost = format!("{prefix}client:ghost");
    let record = r#"{"client_id":"ghost","node":"node-a","session":"node-a#dead/1","connected_at_ms":1,"last_lsn":"0/0","last_activity_ms":1}"#;
    redis(&["SET", &ghost, record, "EX", "60"]).await;
    let (_, list) = http(a_addr, Some(TOKEN), "GET", "/api/admin/clients").await;
    assert!(list.contains("ghost"), "{list}");
    let (status, body) = http(
        a_addr,
        Some(TOKEN),
        "POST",
        "/api/admin/clients/ghost/notify",
    )
    .await;
    assert_eq!(status, 410, "{body}");
    assert!(redis(&["EXISTS", &ghost]).await.contains(":0"));

    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_client_id_and_lsn_of_the_session() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut child = Command::new(BIN)
        .args(["serve", "--log-format", "json", "--listen", "127.0.0.1:0"])
        .args(["--database-url", world.url(), "--slot", &world.slot()])
        .env("PGRELAY_LOG", "info,pgrelay_server::session=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("pgrelay listening on ")
        .unwrap()
        .parse()
        .unwrap();
    let (lines, found) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut socket = hello(addr, "json-logger", None).await;
    read_to_caught_up(&mut socket).await;
    let event = tokio::task::spawn_blocking(move || loop {
        let line = found
            .recv_timeout(Duration::from_secs(20))
            .expect("a log line about the session");
        let value: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if value["message"] == "session started" {
            return value;
        }
    })
    .await
    .unwrap();
    assert_eq!(event["span"]["client_id"], "json-logger", "{event}");
    assert_eq!(event["span"]["lsn"], "0/0", "{event}");
    assert_eq!(event["level"], "DEBUG", "{event}");
    let _ = child.kill();
    let _ = child.wait();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_shows_a_hydrated_clients_real_position() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await;
    let mut config = world.server_config();
    config.admin_token = Some(TOKEN.into());
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    // Rows in the change log, so the head is not 0/0.
    world
        .exec("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 500) g")
        .await;
    wait_for("the change log", Duration::from_secs(20), || async {
        (world
            .count("SELECT count(*) FROM pgrelay.change_history")
            .await
            == 500)
            .then_some(())
    })
    .await;
    // A new replica: hydrated from a snapshot, nothing streamed after it.
    let path = world.replica_path("hydrated");
    let client = start_client(addr, &path, "hydrated").await;
    world.wait_equal(&path, Duration::from_secs(30)).await;
    let position = wait_for(
        "the replica's position",
        Duration::from_secs(10),
        || async { crate::support::replica_lsn(&path).filter(|lsn| lsn.0 > 0) },
    )
    .await;

    let (status, json) = http(addr, Some(TOKEN), "GET", "/api/admin/clients").await;
    assert_eq!(status, 200, "{json}");
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["client_id"] == "hydrated")
        .unwrap_or_else(|| panic!("hydrated not listed: {json}"));
    assert_eq!(
        row["lsn"].as_str(),
        Some(position.to_string().as_str()),
        "{row}"
    );
    assert_eq!(row["lag_bytes"], 0, "{row}");
    let out = admin_cli(addr, &["clients"]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains(&position.to_string()),
        "{table}"
    );
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
