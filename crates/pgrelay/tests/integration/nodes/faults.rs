//! Faults of one part under several nodes. Redis gone: sessions go on,
//! and the failure is counted (`/metrics`) and shown (`/ready`, admin)
//! without making the node unready. PostgreSQL unreachable from one node
//! (its connections frozen): that node refuses writes with a clear
//! reason and reports not ready; the other node goes on; healed, it
//! serves again.

use std::time::Duration;

use pgrelay_server::Server;
use serde_json::json;

use super::{proxy_to_postgres, proxy_to_redis};
use crate::abuse::{one_change, post_changes};
use crate::support::raw::{http, metric, unique_prefix};
use crate::support::{start_client, wait_for, World};

/// `/ready`'s status and body.
async fn ready(addr: std::net::SocketAddr) -> (u16, serde_json::Value) {
    let (status, body) = http(addr, None, "GET", "/ready").await;
    (status, serde_json::from_str(&body).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_go_on_while_redis_is_down_and_the_failure_is_shown() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let (redis, through) = proxy_to_redis().await;
    let prefix = unique_prefix("redis-down");
    let node = |name: &str| {
        let mut config = world.server_config();
        config.registry = Some(through.clone().into());
        config.registry_prefix = prefix.clone();
        config.registry_refresh = Duration::from_millis(200);
        config.node = Some(name.to_owned());
        config.monitor_interval = Duration::from_millis(200);
        config
    };
    let a = Server::start(node("node-a")).await.unwrap();
    let b = Server::start(node("node-b")).await.unwrap();
    let on_a = start_client(a.local_addr(), &world.replica_path("on-a"), "on-a").await;
    let on_b = start_client(b.local_addr(), &world.replica_path("on-b"), "on-b").await;
    world
        .exec("INSERT INTO t SELECT generate_series(1, 10)")
        .await;
    world
        .wait_equal(on_a.replica.path(), Duration::from_secs(30))
        .await;
    world
        .wait_equal(on_b.replica.path(), Duration::from_secs(30))
        .await;

    redis.cut();
    // Both nodes notice (the registry's refresh, the signal subscription)
    // and say so, and stay ready.
    for addr in [a.local_addr(), b.local_addr()] {
        wait_for(
            "Redis shown unreachable",
            Duration::from_secs(30),
            || async {
                let (status, body) = ready(addr).await;
                (status == 200 && body["registry"]["reachable"] == json!(false)).then_some(())
            },
        )
        .await;
        assert!(metric(addr, "pgrelay_registry_errors_total").await > 0.0);
        assert_eq!(metric(addr, "pgrelay_registry_up").await, 0.0);
    }
    // Sessions go on: old ones receive, a new one connects and hydrates.
    world
        .exec("INSERT INTO t SELECT generate_series(11, 20)")
        .await;
    world
        .wait_equal(on_a.replica.path(), Duration::from_secs(30))
        .await;
    world
        .wait_equal(on_b.replica.path(), Duration::from_secs(30))
        .await;
    let late = start_client(b.local_addr(), &world.replica_path("late"), "late").await;
    world
        .wait_equal(late.replica.path(), Duration::from_secs(30))
        .await;

    redis.release();
    wait_for("Redis reachable again", Duration::from_secs(30), || async {
        let (_, body) = ready(b.local_addr()).await;
        (body["registry"]["reachable"] == json!(true)
            && body["registry"]["receiving_signals"] == json!(true))
        .then_some(())
    })
    .await;

    for client in [on_a, on_b, late] {
        client.stop().await;
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_postgres_refuses_writes_and_is_not_ready_while_the_other_goes_on() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let (proxy, through) = proxy_to_postgres(world.url()).await;
    let mut a_config = world.server_config();
    a_config.monitor_interval = Duration::from_millis(200);
    a_config.capture_retry = Duration::from_millis(200);
    a_config.capture_lease = Duration::from_secs(1);
    let a = Server::start(a_config.clone()).await.expect("node A");
    assert!(a.capturing());
    // Node B reaches PostgreSQL through the proxy and follows.
    let mut b_config = a_config.clone();
    b_config.database_url = Some(through.into());
    let b = Server::start(b_config).await.expect("node B");
    assert!(!b.capturing());
    let (a_addr, b_addr) = (a.local_addr(), b.local_addr());
    let on_a = start_client(a_addr, &world.replica_path("on-a"), "on-a").await;
    let on_b = start_client(b_addr, &world.replica_path("on-b"), "on-b").await;
    world.exec("INSERT INTO t VALUES (1)").await;
    world
        .wait_equal(on_b.replica.path(), Duration::from_secs(30))
        .await;
    let write = |id: &str, row: i32| {
        one_change(
            "writer",
            id,
            json!({"table": "public.t", "op": "insert", "new": {"id": row.to_string()}}),
        )
    };
    let (status, body) = post_changes(b_addr, None, &write("w2", 2)).await;
    assert_eq!(status, 200, "{body}");

    proxy.freeze();
    let reasons = wait_for("node B not ready", Duration::from_secs(60), || async {
        let (status, body) = ready(b_addr).await;
        (status == 503).then(|| body["reasons"].to_string())
    })
    .await;
    assert!(
        reasons.contains("PostgreSQL is unreachable from this node"),
        "{reasons}"
    );
    let (status, body) = post_changes(b_addr, None, &write("w3", 3)).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("cannot reach PostgreSQL") && body.contains("retry"),
        "{body}"
    );

    // Node A goes on: it takes writes and its clients receive.
    let (status, body) = post_changes(a_addr, None, &write("w4", 4)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("applied"), "{body}");
    world.exec("INSERT INTO t VALUES (5)").await;
    world
        .wait_equal(on_a.replica.path(), Duration::from_secs(30))
        .await;
    wait_for("node A ready", Duration::from_secs(30), || async {
        (ready(a_addr).await.0 == 200).then_some(())
    })
    .await;

    // Healed: node B is ready again, takes writes, and its client catches up.
    proxy.release();
    wait_for("node B ready again", Duration::from_secs(60), || async {
        (ready(b_addr).await.0 == 200).then_some(())
    })
    .await;
    let (status, body) = post_changes(b_addr, None, &write("w6", 6)).await;
    assert_eq!(status, 200, "{body}");
    world
        .wait_equal(on_b.replica.path(), Duration::from_secs(30))
        .await;
    assert_eq!(
        world.count("SELECT count(*) FROM t").await,
        5,
        "row 3 was never written"
    );

    on_a.stop().await;
    on_b.stop().await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
