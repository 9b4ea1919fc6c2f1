//! `bench writes`: client writes made with plain SQL on a replica, pushed
//! through the outbox and applied to PostgreSQL. Measures batched
//! throughput (changes applied per second) and, with single-row writes at
//! a steady rate, the time from the local write to the server's answer
//! (which follows the PostgreSQL commit).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use pgrelay_client::{ClientConfig, Event, SyncClient};
use serde_json::json;
use tokio::sync::broadcast::{self, error::RecvError};

use super::fleet::percentile;
use super::report::{thousands, Figure, Report, Series};
use super::{machine, BenchDb, CommonArgs};

const WRITES_DDL: &str =
    "CREATE TABLE public.bench_writes (id bigint PRIMARY KEY, n int NOT NULL, body text NOT NULL)";
const TABLE: &str = "public.bench_writes";

#[derive(Args, Debug, Clone)]
pub struct WritesArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Rows written for the throughput phase.
    #[arg(long, default_value_t = 20_000)]
    pub rows: u64,
    /// Rows per local statement (one client transaction) in that phase.
    #[arg(long, default_value_t = 100)]
    pub tx_size: u64,
    /// Single-row writes per second in the latency phase.
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    /// How long the latency phase writes.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

pub(crate) async fn run(args: WritesArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.rows > 0 && args.tx_size > 0 && args.rate > 0,
        "--rows, --tx-size and --rate must be positive"
    );
    let (env, db) = BenchDb::with_tables(args.common.database_url.as_deref(), WRITES_DDL).await?;
    let server = super::start_server(env.url(), "bench_writes", TABLE).await?;
    let dir = tempfile::tempdir()?;
    let mut client_config = ClientConfig::new(
        format!("ws://{}", server.local_addr()),
        dir.path().join("writer.sqlite"),
    );
    client_config.client_id = Some("bench-writer".to_owned());
    let client = Arc::new(SyncClient::open(client_config).await?);
    let mut events = client.subscribe();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let runner = Arc::clone(&client);
    let run = tokio::spawn(async move { runner.run(stopped).await });
    wait_for_event(&mut events, |e| matches!(e, Event::CaughtUp { .. })).await?;

    // Throughput: statements of --tx-size rows, as fast as the app makes them.
    eprintln!(
        "  throughput: {} rows in local transactions of {} ...",
        args.rows, args.tx_size
    );
    let started = Instant::now();
    let mut written = 0;
    while written < args.rows {
        let count = args.tx_size.min(args.rows - written);
        let values: Vec<String> = (written + 1..=written + count)
            .map(|id| format!("({id}, {}, 'local write {id}')", id % 1000))
            .collect();
        client
            .execute(format!(
                "INSERT INTO bench_writes (id, n, body) VALUES {}",
                values.join(", ")
            ))
            .await?;
        written += count;
    }
    let local_secs = started.elapsed().as_secs_f64();
    let (applied, rejected, _) = wait_answers(&mut events, args.rows, started).await?;
    let throughput_secs = started.elapsed().as_secs_f64();

    // Latency: single-row writes at a steady rate.
    let total = super::report::whole(args.rate as f64 * args.duration.as_secs_f64());
    eprintln!(
        "  latency: {total} single-row writes at {} per second ...",
        args.rate
    );
    let latency_started = Instant::now();
    let writer = {
        let client = Arc::clone(&client);
        let first = args.rows + 1;
        let period = 1.0 / args.rate as f64;
        tokio::spawn(async move {
            for i in 0..total {
                let due = latency_started + Duration::from_secs_f64(i as f64 * period);
                tokio::time::sleep_until(due.into()).await;
                let id = first + i;
                client
                    .execute(format!(
                        "INSERT INTO bench_writes (id, n, body) VALUES ({id}, 0, 'single')"
                    ))
                    .await?;
            }
            Ok::<(), pgrelay_client::ClientError>(())
        })
    };
    let (single_applied, single_rejected, mut latencies) =
        wait_answers(&mut events, total, latency_started).await?;
    writer.await??;
    let _ = stop.send(true);
    run.await??;

    let in_pg: i64 = db
        .query_one("SELECT count(*) FROM public.bench_writes", &[])
        .await?
        .get(0);
    let applied_once: i64 = db
        .query_one("SELECT count(*) FROM pgrelay.applied_changes", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1);
    server.shutdown().await?;
    latencies.sort_unstable();
    let ms = |us: u32| f64::from(us) / 1000.0;
    let (p50, p95, p99, max) = (
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 95.0)),
        ms(percentile(&latencies, 99.0)),
        ms(latencies.last().copied().unwrap_or(0)),
    );
    let rate = applied as f64 / throughput_secs;
    let expected = args.rows + total;

    let mut report = Report::new(
        "writes",
        format!(
            "writes: {} rows in local transactions of {}, then {total} single-row writes at {}/s",
            thousands(args.rows as f64),
            args.tx_size,
            args.rate
        ),
    );
    report.line("local SQLite writes took", format!("{local_secs:.2} s"));
    report.line(
        "applied to PostgreSQL",
        format!(
            "{} changes in {throughput_secs:.2} s",
            thousands(applied as f64)
        ),
    );
    report.line("client writes applied/s", thousands(rate));
    report.line(
        "single-row write → server answer p50",
        format!("{p50:.2} ms"),
    );
    report.line("p95", format!("{p95:.2} ms"));
    report.line("p99", format!("{p99:.2} ms"));
    report.line("max", format!("{max:.2} ms"));
    report.line(
        "rows in PostgreSQL",
        format!(
            "{} of {} written",
            thousands(in_pg as f64),
            thousands(expected as f64)
        ),
    );
    report.target(
        "≥ 5,000 client changes/s applied (batched)",
        rate >= 5_000.0,
    );
    if u64::try_from(in_pg).ok() != Some(expected)
        || rejected + single_rejected > 0
        || single_applied != total
    {
        report.failure = Some(format!(
            "PostgreSQL holds {in_pg} of {expected} rows; {} writes rejected",
            rejected + single_rejected
        ));
    }
    report.set("machine", machine(&db).await);
    report.set(
        "results",
        json!({
            "rows": args.rows, "tx_size": args.tx_size, "applied_per_sec": rate,
            "throughput_seconds": throughput_secs, "local_write_seconds": local_secs,
            "single_writes": total, "rate": args.rate,
            "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": max,
            "rows_in_postgres": in_pg, "applied_change_ids": applied_once,
            "complete": report.failure.is_none(),
        }),
    );
    report.figure = Some(Figure {
        title: format!(
            "single-row client writes at {}/s: local write → server answer",
            args.rate
        ),
        x_label: "ms".into(),
        y_label: "fraction of writes".into(),
        series: vec![Series {
            name: "writes".into(),
            points: super::latency::cdf(&latencies),
        }],
    });
    drop(db);
    env.close().await?;
    Ok(report)
}

async fn wait_for_event(
    events: &mut broadcast::Receiver<Event>,
    want: impl Fn(&Event) -> bool,
) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match events.recv().await {
                Ok(e) if want(&e) => return Ok(()),
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => anyhow::bail!("the client stopped"),
            }
        }
    })
    .await
    .context("waiting for the client to catch up")?
}

/// Sums answered changes until `expected` are applied or rejected; returns
/// (applied, rejected, latencies in µs).
async fn wait_answers(
    events: &mut broadcast::Receiver<Event>,
    expected: u64,
    started: Instant,
) -> anyhow::Result<(u64, u64, Vec<u32>)> {
    let (mut applied, mut rejected) = (0u64, 0u64);
    let mut latencies = Vec::new();
    let mut next_progress = 5.0;
    let deadline = Duration::from_secs(1800);
    while applied + rejected < expected {
        let event = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .context("no answer from the server for 60 s")?;
        match event {
            Ok(Event::WriteApplied {
                changes, latency, ..
            }) => {
                applied += changes as u64;
                latencies.push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
            }
            Ok(Event::WriteRejected { reason, .. }) => {
                tracing::warn!(%reason, "bench write rejected");
                rejected += 1;
            }
            Ok(_) => {}
            Err(RecvError::Lagged(n)) => anyhow::bail!("the bench missed {n} client events"),
            Err(RecvError::Closed) => anyhow::bail!("the client stopped"),
        }
        let t = started.elapsed().as_secs_f64();
        if t >= next_progress {
            eprintln!("  {t:>4.0}s: {applied} of {expected} changes applied");
            next_progress += 5.0;
        }
        anyhow::ensure!(
            started.elapsed() < deadline,
            "writes not answered in {deadline:?}"
        );
    }
    Ok((applied, rejected, latencies))
}
