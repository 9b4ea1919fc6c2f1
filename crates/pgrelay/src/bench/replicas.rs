//! `pgrelay bench reader --full` (hidden): the full clients of `bench
//! latency|fanout --processes N`, run as separate processes. Each process
//! runs `--connections` real clients (pgrelay-client, each with its own
//! SQLite replica in a temporary directory) that apply every transaction,
//! and speaks the light readers' line protocol with the bench (see
//! `reader`): `ready`, then `expect TXS CHANGES`, then one JSON line.
//!
//! Completeness is counted where it matters, in the replicas: once every
//! client's events say it applied the expected changes (or a deadline
//! passes), the rows of `--table` in every replica are counted, and a
//! replica with another count is reported short. Each change of the
//! benches is a new row, so rows = changes.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;

use super::fleet::Fleet;
use super::reader::{ready_then_expectation, write_samples, ReaderArgs};

/// How long the clients may take to apply what the bench wrote; shorter
/// than the bench's own wait, so a short client is reported, not lost.
const APPLY_TIMEOUT: Duration = Duration::from_secs(540);

pub(crate) async fn run(args: ReaderArgs) -> anyhow::Result<()> {
    let addr: SocketAddr = args
        .url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .and_then(|host| host.parse().ok())
        .with_context(|| format!("--url {} is not ws://IP:PORT/...", args.url))?;
    let dir = tempfile::tempdir()?;
    let fleet = Fleet::start_spread(
        &args.prefix,
        &[addr],
        args.connections,
        dir.path(),
        true,
        &[],
    )
    .await?;
    fleet.wait_connected(Duration::from_secs(300)).await?;
    let cpu_ready = super::capture::cpu_seconds("self").unwrap_or(0.0);
    let (_, changes) = ready_then_expectation().await?;
    if let Err(e) = fleet
        .wait_applied(changes, &args.table, APPLY_TIMEOUT)
        .await
    {
        // The counts below say which replicas are short.
        eprintln!("reader {}: {e:#}", args.prefix);
    }
    let cpu_seconds = super::capture::cpu_seconds("self").unwrap_or(0.0) - cpu_ready;
    let counts = fleet.row_counts(&args.table).await?;
    let transactions = fleet.applied_transactions.load(Ordering::Relaxed);
    let missed_events = fleet.missed_events.load(Ordering::Relaxed);
    let deliveries = fleet.stop().await?;
    let short = counts
        .iter()
        .filter(|&&rows| u64::try_from(rows).ok() != Some(changes))
        .count();
    let rows: i64 = counts.iter().sum();
    let applied: Vec<u32> = deliveries.iter().map(|d| d.latency_us()).collect();
    write_samples(&args.samples, &applied)?;
    if let Some(path) = &args.received {
        let received: Vec<u32> = deliveries
            .iter()
            .map(|d| u32::try_from((d.received_us - d.commit_us).max(0)).unwrap_or(u32::MAX))
            .collect();
        write_samples(path, &received)?;
    }
    println!(
        "{}",
        serde_json::json!({
            "connections": args.connections, "txs": transactions, "changes": rows,
            "frames": transactions, "bytes": 0, "short": short, "out_of_order": 0,
            "missed_events": missed_events, "cpu_seconds": cpu_seconds,
        })
    );
    Ok(())
}
