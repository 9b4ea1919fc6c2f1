//! Two nodes on one slot sharing the registry in Redis: "notify",
//! "disconnect" and "forget" sent to either node reach the client's
//! session on the other; a record whose node or session is gone is
//! answered "gone" and removed.

use std::time::Duration;

use pgrelay_protocol::ErrorCode;
use pgrelay_server::{Server, ServerConfig};

use crate::support::raw::{
    hello, http, read_to_caught_up, read_to_end, redis, redis_url, unique_prefix,
};
use crate::support::{wait_for, World};

const TOKEN: &str = "test-admin-token-signals-0123";

fn node(world: &World, name: &str, prefix: &str) -> ServerConfig {
    let mut config = world.server_config();
    config.admin_token = Some(TOKEN.into());
    config.registry = Some(redis_url().into());
    config.registry_prefix = prefix.to_owned();
    config.registry_refresh = Duration::from_millis(200);
    config.node = Some(name.to_owned());
    config
}

async fn gone_from_redis(key: &str) {
    wait_for(
        &format!("{key} removed"),
        Duration::from_secs(20),
        || async { redis(&["EXISTS", key]).await.contains(":0").then_some(()) },
    )
    .await;
}

/// Waits until the registry holds the client's record (a node writes it
/// after the welcome, not before).
async fn in_redis(key: &str) {
    wait_for(
        &format!("{key} registered"),
        Duration::from_secs(20),
        || async { redis(&["EXISTS", key]).await.contains(":1").then_some(()) },
    )
    .await;
}

/// The instance (this run) of the node at `addr`, from the admin API.
async fn instance(addr: std::net::SocketAddr) -> String {
    let (_, body) = http(addr, Some(TOKEN), "GET", "/api/admin/node").await;
    let node: serde_json::Value = serde_json::from_str(&body).unwrap();
    node["instance"]
        .as_str()
        .expect("the node's instance")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_and_disconnect_reach_a_client_on_another_node() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let prefix = unique_prefix("signals");
    let a = Server::start(node(&world, "node-a", &prefix))
        .await
        .unwrap();
    let b = Server::start(node(&world, "node-b", &prefix))
        .await
        .unwrap();
    let (a_addr, b_addr) = (a.local_addr(), b.local_addr());
    wait_for(
        "node b receiving signals",
        Duration::from_secs(20),
        || async {
            let (_, body) = http(b_addr, Some(TOKEN), "GET", "/api/admin/node").await;
            body.contains("\"receiving_signals\":true").then_some(())
        },
    )
    .await;
    wait_for(
        "node a receiving signals",
        Duration::from_secs(20),
        || async {
            let (_, body) = http(a_addr, Some(TOKEN), "GET", "/api/admin/node").await;
            body.contains("\"receiving_signals\":true").then_some(())
        },
    )
    .await;

    // A client on node a, notified through node b.
    let mut roamer = hello(a_addr, "roamer", None).await;
    read_to_caught_up(&mut roamer).await;
    let key = format!("{prefix}client:roamer");
    in_redis(&key).await;
    let (status, body) = http(
        b_addr,
        Some(TOKEN),
        "POST",
        "/api/admin/clients/roamer/notify",
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert!(body.contains("node-a"), "{body}");

    // Disconnected through node b: its session on node a closes with
    // `disconnected` and unregisters; a notification then finds it gone.
    let (status, body) = http(
        b_addr,
        Some(TOKEN),
        "POST",
        "/api/admin/clients/roamer/disconnect",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let ended = read_to_end(&mut roamer, Duration::from_secs(20)).await;
    assert_eq!(ended.error.map(|e| e.0), Some(ErrorCode::Disconnected));
    gone_from_redis(&key).await;
    let (status, body) = http(
        b_addr,
        Some(TOKEN),
        "POST",
        "/api/admin/clients/roamer/notify",
    )
    .await;
    assert_eq!(status, 410, "{body}");

    // Forgotten through node a while it is on node b: closed there too.
    let mut other = hello(b_addr, "wanderer", None).await;
    read_to_caught_up(&mut other).await;
    in_redis(&format!("{prefix}client:wanderer")).await;
    let (status, body) = http(a_addr, Some(TOKEN), "DELETE", "/api/admin/clients/wanderer").await;
    assert_eq!(status, 200, "{body}");
    let ended = read_to_end(&mut other, Duration::from_secs(20)).await;
    assert_eq!(ended.error.map(|e| e.0), Some(ErrorCode::Disconnected));

    // A record naming a session node a no longer has (left behind): node
    // a receives the notification, finds no such session and removes the
    // record; the next notification is answered "gone".
    let stale = format!("{prefix}client:stale");
    let record = format!(
        r#"{{"client_id":"stale","node":"node-a","session":"{}/999999","connected_at_ms":1,"last_lsn":"0/0","last_activity_ms":1}}"#,
        instance(a_addr).await
    );
    redis(&["SET", &stale, &record, "EX", "60"]).await;
    let (status, body) = http(
        b_addr,
        Some(TOKEN),
        "POST",
        "/api/admin/clients/stale/notify",
    )
    .await;
    assert_eq!(status, 202, "{body}");
    gone_from_redis(&stale).await;

    // A record of a node run that no longer listens: "gone" at once.
    let ghost = format!("{prefix}client:ghost");
    let record = r#"{"client_id":"ghost","node":"node-a","session":"node-a#dead/1","connected_at_ms":1,"last_lsn":"0/0","last_activity_ms":1}"#;
    redis(&["SET", &ghost, record, "EX", "60"]).await;
    let (status, body) = http(
        b_addr,
        Some(TOKEN),
        "POST",
        "/api/admin/clients/ghost/disconnect",
    )
    .await;
    assert_eq!(status, 410, "{body}");
    gone_from_redis(&ghost).await;

    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
