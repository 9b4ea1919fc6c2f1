//! SIGKILL of the capturing node among three: another node captures within
//! seconds, resuming from the slot; clients on every node (those of the
//! dead node reconnecting to another) end equal to PostgreSQL, and the
//! change log has no gap and no duplicate.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pgrelay_client::{ClientConfig, SyncClient};

use super::{assert_log_exactly_once, wait_for_logged, write_accounts};
use crate::support::{free_port, run_client, wait_for, ServerProcess, World};

const ROWS: i64 = 600;

/// The node's role as `/ready` reports it (`None` when it does not answer).
pub(crate) async fn role(addr: SocketAddr) -> Option<String> {
    let (_, body) = pgrelay::cmd::admin::http(&format!("http://{addr}"), None, "GET", "/ready")
        .await
        .ok()?;
    let ready: serde_json::Value = serde_json::from_str(&body).ok()?;
    ready["replication"]["role"].as_str().map(str::to_owned)
}

/// The one node that captures, once exactly one does.
async fn capturer(nodes: &[&ServerProcess]) -> usize {
    wait_for(
        "exactly one capturing node",
        Duration::from_secs(30),
        || async {
            let mut capturing = Vec::new();
            for (i, node) in nodes.iter().enumerate() {
                if role(node.addr).await.as_deref() == Some("capturing") {
                    capturing.push(i);
                }
            }
            (capturing.len() == 1).then(|| capturing[0])
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_capturer_killed_is_replaced_and_every_client_ends_equal() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL)")
        .await;
    let mut nodes: Vec<ServerProcess> = (0..3)
        .map(|_| ServerProcess::spawn(world.url(), &world.slot(), free_port()))
        .collect();
    let first = capturer(&nodes.iter().collect::<Vec<_>>()).await;
    assert_eq!(first, 0, "the node started first captures");

    // A client on each node, each knowing every node (its own first).
    let urls: Vec<String> = nodes.iter().map(|n| format!("ws://{}", n.addr)).collect();
    let mut clients = Vec::new();
    for i in 0..nodes.len() {
        let mut order = urls.clone();
        order.rotate_left(i);
        let path = world.replica_path(&format!("client-{i}"));
        let mut config = ClientConfig::new(order.join(","), &path);
        config.client_id = Some(format!("client-{i}"));
        config.backoff_base = Duration::from_millis(50);
        config.backoff_cap = Duration::from_millis(500);
        let client = std::sync::Arc::new(SyncClient::open(config).await.unwrap());
        clients.push(run_client(client));
    }
    let writer = tokio::spawn(write_accounts(
        world.url().to_owned(),
        ROWS,
        Duration::from_millis(5),
    ));
    wait_for_logged(&world, ROWS / 4).await;

    nodes[first].kill9();
    let killed = Instant::now();
    let survivors: Vec<&ServerProcess> = nodes.iter().skip(1).collect();
    let next = capturer(&survivors).await;
    let took = killed.elapsed();
    eprintln!("capture taken over by node {} after {took:?}", next + 1);
    let logged = world
        .count("SELECT count(*) FROM pgrelay.change_history")
        .await;
    wait_for(
        "the new capturer to append",
        Duration::from_secs(30),
        || async {
            (world
                .count("SELECT count(*) FROM pgrelay.change_history")
                .await
                > logged)
                .then_some(())
        },
    )
    .await;

    writer.await.unwrap();
    for client in &clients {
        world
            .wait_equal(client.replica.path(), Duration::from_secs(60))
            .await;
    }
    assert_log_exactly_once(&world, ROWS).await;
    for client in clients {
        client.stop().await;
    }
    nodes.clear();
    world.db.drop_database().await.unwrap();
}
