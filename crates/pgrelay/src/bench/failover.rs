//! `bench failover`: several `pgrelay serve` nodes on one slot, a writer
//! committing steadily; the capturing node is killed with SIGKILL again and
//! again (and restarted as a follower). Measures, per kill, the time until
//! another node captures and until a client of the killed node (which
//! knows every node's URL) receives a transaction committed after the
//! kill; at the end checks that the change log holds every insert once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use pgrelay_client::{ClientConfig, Event, SyncClient};
use serde_json::json;

use super::report::Report;
use super::{current_wal_lsn, machine, spawn_server, BenchDb, CommonArgs};

const DDL: &str = "CREATE TABLE public.bench_failover (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())";
const TABLE: &str = "public.bench_failover";
const SLOT: &str = "bench_failover";

#[derive(Args, Debug, Clone)]
pub struct FailoverArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Nodes serving the slot.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Times the capturing node is killed.
    #[arg(long, default_value_t = 10)]
    pub kills: usize,
}

struct Node {
    child: tokio::process::Child,
    addr: String,
}

async fn spawn(url: &str) -> anyhow::Result<Node> {
    let (child, addr) = spawn_server(url, SLOT, TABLE, &[]).await?;
    Ok(Node { child, addr })
}

/// The node's role from `/ready` (`None` when it does not answer).
async fn role(addr: &str) -> Option<String> {
    let (_, body) = crate::cmd::admin::http(&format!("http://{addr}"), None, "GET", "/ready")
        .await
        .ok()?;
    let ready: serde_json::Value = serde_json::from_str(&body).ok()?;
    ready["replication"]["role"].as_str().map(str::to_owned)
}

/// Waits until exactly one node captures; returns its index.
async fn capturer(nodes: &[Node], timeout: Duration) -> anyhow::Result<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut capturing = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            if role(&node.addr).await.as_deref() == Some("capturing") {
                capturing.push(i);
            }
        }
        if capturing.len() == 1 {
            return Ok(capturing[0]);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no single capturing node after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn run(args: FailoverArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.nodes >= 2, "--nodes must be at least 2");
    let (env, db) = BenchDb::with_tables(args.common.database_url.as_deref(), DDL).await?;
    let url = env.url().to_owned();
    let mut nodes = Vec::new();
    for _ in 0..args.nodes {
        nodes.push(spawn(&url).await?);
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(write_steadily(url.clone(), stopped));
    let dir = tempfile::tempdir()?;
    let (mut capture_ms, mut client_ms) = (Vec::new(), Vec::new());
    for kill in 0..args.kills {
        let first = capturer(&nodes, Duration::from_secs(60)).await?;
        // A client of the capturing node that knows every node.
        let mut urls: Vec<String> = nodes.iter().map(|n| format!("ws://{}", n.addr)).collect();
        urls.rotate_left(first);
        let mut config =
            ClientConfig::new(urls.join(","), dir.path().join(format!("c{kill}.sqlite")));
        config.backoff_base = Duration::from_millis(20);
        config.backoff_cap = Duration::from_millis(200);
        let client = Arc::new(SyncClient::open(config).await?);
        let mut events = client.subscribe();
        let (client_stop, client_stopped) = tokio::sync::watch::channel(false);
        let runner = Arc::clone(&client);
        let running = tokio::spawn(async move { runner.run(client_stopped).await });
        while !matches!(events.recv().await?, Event::CaughtUp { .. }) {}

        nodes[first].child.start_kill()?;
        let killed = Instant::now();
        nodes[first].child.wait().await?;
        let after = current_wal_lsn(&db).await?;
        let dead = nodes.remove(first);
        drop(dead);
        capturer(&nodes, Duration::from_secs(60)).await?;
        capture_ms.push(killed.elapsed().as_secs_f64() * 1000.0);
        let received = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match events.recv().await {
                    Ok(Event::Applied { lsn, .. }) if lsn > after => return Ok(()),
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(e) => return Err(anyhow::anyhow!("client events ended: {e}")),
                }
            }
        })
        .await
        .context("the killed node's client never received again")?;
        received?;
        client_ms.push(killed.elapsed().as_secs_f64() * 1000.0);
        eprintln!(
            "kill {}: captured again after {:.0} ms, client receiving after {:.0} ms",
            kill + 1,
            capture_ms[kill],
            client_ms[kill]
        );
        let _ = client_stop.send(true);
        let _ = running.await;
        nodes.push(spawn(&url).await?);
    }
    let _ = stop.send(true);
    let written = writer.await??;
    capturer(&nodes, Duration::from_secs(60)).await?;
    // Every insert in the log once: wait for the capture to reach the last.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (logged, distinct) = loop {
        let row = db
            .query_one(
                "SELECT count(*), count(DISTINCT data->>'id') FROM pgrelay.change_history WHERE table_name = $1",
                &[&TABLE],
            )
            .await?;
        let (all, distinct): (i64, i64) = (row.get(0), row.get(1));
        if all >= written || Instant::now() > deadline {
            break (all, distinct);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let mut report = Report::new(
        "failover",
        format!(
            "failover: {} nodes, {} SIGKILLs of the capturing node",
            args.nodes, args.kills
        ),
    );
    let stat = |v: &[f64], percent: usize| {
        let mut sorted = v.to_vec();
        sorted.sort_by(f64::total_cmp);
        let at = sorted.len().saturating_sub(1) * percent / 100;
        sorted.get(at).copied().unwrap_or(0.0)
    };
    report.line(
        "capture taken over (p50 / max)",
        format!(
            "{:.0} ms / {:.0} ms",
            stat(&capture_ms, 50),
            stat(&capture_ms, 100)
        ),
    );
    report.line(
        "killed node's client receiving again (p50 / max)",
        format!(
            "{:.0} ms / {:.0} ms",
            stat(&client_ms, 50),
            stat(&client_ms, 100)
        ),
    );
    report.line(
        "rows written / logged / distinct",
        format!("{written} / {logged} / {distinct}"),
    );
    report.target(
        "capture taken over within 5 s of every kill",
        capture_ms.iter().all(|ms| *ms <= 5000.0),
    );
    if logged != written || distinct != written {
        report.failure = Some(format!(
            "the change log holds {logged} inserts ({distinct} distinct) of {written} written"
        ));
    }
    report.set("machine", machine(&db).await);
    report.set("capture_ms", json!(capture_ms));
    report.set("client_ms", json!(client_ms));
    report.set("written", json!(written));
    report.set("logged", json!(logged));
    drop(nodes);
    drop(db);
    env.close().await?;
    Ok(report)
}

/// One insert every 10 ms until stopped; returns how many committed.
async fn write_steadily(
    url: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<i64> {
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let mut written = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return Ok(written),
            _ = tick.tick() => {
                db.execute("INSERT INTO public.bench_failover DEFAULT VALUES", &[]).await?;
                written += 1;
            }
        }
    }
}
