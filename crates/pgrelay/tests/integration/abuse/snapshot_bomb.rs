//! A man in the middle (or a malicious server) cannot make a client
//! allocate far more than arrives: a snapshot chunk that decompresses past
//! the size its frame announces is refused, the table fetched again, and
//! the client's peak memory stays bounded.

use std::time::Duration;

use crate::support::proxy::{Meddle, Proxy};
use crate::support::{spawn_client, wait_replica_rows, World};

/// Peak resident memory of a process, KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_that_lies_about_its_size_is_refused_with_bounded_memory() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 1000) g")
        .await;
    let server = world.start_server().await;
    let proxy = Proxy::start(server.local_addr(), Meddle::InflateChunks).await;
    let path = world.replica_path("bombed");
    let mut child = spawn_client(proxy.addr, &path, "bombed", false);
    let pid = child.id();
    wait_replica_rows(&path, "t", 1000, Duration::from_secs(60)).await;
    let peak = peak_rss_kib(pid);
    eprintln!(
        "client peak RSS after {} lying chunks of 200 MiB: {peak} KiB",
        crate::support::proxy::BOMBS
    );
    assert!(
        peak < 128 * 1024,
        "the client's memory peaked at {peak} KiB for chunks of a few KiB"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
