//! `bench latency`: a writer commits single-row transactions at a fixed
//! rate while many real clients apply them; measures PostgreSQL commit →
//! client SQLite commit per transaction per client, and checks that every
//! client received every transaction. With `--nodes N`, N servers in this
//! process serve one slot: the first captures, the others follow its
//! change log, and the clients are spread over them; the latency of the
//! clients of following nodes is reported beside that of the capturing
//! node's clients.

use std::time::{Duration, Instant};

use clap::Args;
use pgrelay_server::Server;
use serde_json::json;
use tokio::sync::mpsc;

use super::fleet::{percentile, Fleet};
use super::report::{thousands, Figure, Report, Series};
use super::spread::SpreadArgs;
use super::{machine, BenchDb, CommonArgs};

pub(crate) const EVENTS_DDL: &str =
    "CREATE TABLE public.bench_events (id bigserial PRIMARY KEY, payload text NOT NULL, at timestamptz NOT NULL DEFAULT now())";
pub(crate) const TABLE: &str = "public.bench_events";
/// Connections the writer spreads its transactions over, so one commit's
/// fsync does not hold up the next.
const WRITER_CONNECTIONS: usize = 8;

#[derive(Args, Debug, Clone)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Clients, each with its own SQLite replica.
    #[arg(long, default_value_t = 1_000)]
    pub clients: usize,
    /// Transactions per second the writer commits.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// How long the writer writes.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Nodes serving the slot (in this process); clients spread over them.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    #[command(flatten)]
    pub spread: SpreadArgs,
}

/// Issue 20's latency targets (p50, p99 in ms): light readers; a full
/// replica alone; many full replicas.
pub(crate) fn targets(light: bool, clients: usize) -> (f64, f64) {
    match (light, clients) {
        (true, _) => (10.0, 50.0),
        (false, 1) => (3.0, 10.0),
        (false, _) => (10.0, 30.0),
    }
}

pub(crate) async fn run(args: LatencyArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.clients > 0 && args.rate > 0 && args.nodes > 0,
        "--clients, --rate and --nodes must be positive"
    );
    args.spread.check()?;
    if args.spread.apart() {
        return Box::pin(super::processes::latency(args)).await;
    }
    let (env, db) = BenchDb::with_tables(args.common.database_url.as_deref(), EVENTS_DDL).await?;
    // Stage timestamps of the in-process servers, for the breakdown.
    pgrelay_server::stages::enable();
    let mut servers = Vec::with_capacity(args.nodes);
    for _ in 0..args.nodes {
        servers.push(super::start_server(env.url(), "bench_latency", TABLE).await?);
    }
    anyhow::ensure!(servers[0].capturing(), "the first node does not capture");
    let server = &servers[0];
    let addrs: Vec<_> = servers.iter().map(Server::local_addr).collect();
    let dir = tempfile::tempdir()?;
    eprintln!(
        "  starting {} clients on {} nodes ...",
        args.clients, args.nodes
    );
    let fleet = Fleet::start_spread("bench", &addrs, args.clients, dir.path(), true, &[]).await?;
    fleet.wait_connected(Duration::from_secs(300)).await?;

    eprintln!("  writing {} tx/s for {:?} ...", args.rate, args.duration);
    let applied = std::sync::Arc::clone(&fleet.applied_changes);
    let written = write_at_rate(env.url(), args.rate, args.duration, move || {
        applied.load(std::sync::atomic::Ordering::Relaxed)
    })
    .await?;

    let captured = wait_captured(server, written).await?;
    let head = server.capture_stats().head;
    fleet.wait_at(head, Duration::from_secs(600)).await?;
    let counts = fleet.row_counts(TABLE).await?;
    let missed_events = fleet
        .missed_events
        .load(std::sync::atomic::Ordering::Relaxed);
    let clients = fleet.len();
    let per_node = fleet.stop_per_node().await?;
    for server in servers {
        server.shutdown().await?;
    }
    let records = pgrelay_server::stages::take();
    let deliveries: Vec<_> = per_node.iter().flatten().copied().collect();
    let mut latencies: Vec<u32> = deliveries.iter().map(|d| d.latency_us()).collect();
    latencies.sort_unstable();
    let mut capturing: Vec<u32> = per_node
        .first()
        .map(|d| d.iter().map(|d| d.latency_us()).collect())
        .unwrap_or_default();
    capturing.sort_unstable();
    let mut following: Vec<u32> = per_node
        .iter()
        .skip(1)
        .flatten()
        .map(|d| d.latency_us())
        .collect();
    following.sort_unstable();

    let short: Vec<(usize, i64)> = counts
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, c)| u64::try_from(c).ok() != Some(written))
        .collect();
    let ms = |us: u32| f64::from(us) / 1000.0;
    let (p50, p95, p99, max) = (
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 95.0)),
        ms(percentile(&latencies, 99.0)),
        ms(latencies.last().copied().unwrap_or(0)),
    );
    let mut report = Report::new(
        "latency",
        format!(
            "latency: {} clients on {} node(s), {} tx/s for {:?} (PostgreSQL commit → client SQLite commit)",
            args.clients, args.nodes, args.rate, args.duration
        ),
    );
    report.line("transactions written", thousands(written as f64));
    report.line(
        "achieved write rate",
        format!(
            "{} tx/s",
            thousands(written as f64 / args.duration.as_secs_f64())
        ),
    );
    report.line(
        "deliveries measured",
        format!(
            "{} of {} ({} events skipped by the bench's own watcher)",
            thousands(latencies.len() as f64),
            thousands((written * clients as u64) as f64),
            missed_events
        ),
    );
    report.line("p50", format!("{p50:.2} ms"));
    report.line("p95", format!("{p95:.2} ms"));
    report.line("p99", format!("{p99:.2} ms"));
    report.line("max", format!("{max:.2} ms"));
    super::stages::add(&mut report, &records, &deliveries);
    report.line(
        "every client has every transaction",
        if short.is_empty() {
            "yes".to_owned()
        } else {
            format!("NO: {} clients short", short.len())
        },
    );
    let roles = (!following.is_empty()).then(|| {
        let at = |v: &[u32], p| ms(percentile(v, p));
        let (c50, c99) = (at(&capturing, 50.0), at(&capturing, 99.0));
        let (f50, f99) = (at(&following, 50.0), at(&following, 99.0));
        (c50, c99, f50, f99)
    });
    if let Some((c50, c99, f50, f99)) = roles {
        report.line(
            "clients of the capturing node (p50 / p99)",
            format!("{c50:.2} ms / {c99:.2} ms"),
        );
        report.line(
            "clients of following nodes (p50 / p99)",
            format!("{f50:.2} ms / {f99:.2} ms"),
        );
        report.line("following node's extra p50", format!("{:.2} ms", f50 - c50));
        report.target("extra p50 on a following node ≤ 5 ms", f50 - c50 <= 5.0);
    }
    let (p50_max, p99_max) = targets(false, clients);
    report.target(format!("p50 ≤ {p50_max} ms"), p50 <= p50_max);
    report.target(format!("p99 ≤ {p99_max} ms"), p99 <= p99_max);
    if !short.is_empty() || captured != written {
        report.failure = Some(format!(
            "{} of {clients} replicas do not hold all {written} transactions (e.g. client {:?}); change log captured {captured}",
            short.len(),
            short.first()
        ));
    }
    report.set("machine", machine(&db).await);
    report.set(
        "results",
        json!({
            "clients": clients, "nodes": args.nodes, "rate": args.rate, "duration_seconds": args.duration.as_secs_f64(),
            "by_role_ms": roles.map(|(c50, c99, f50, f99)| json!({
                "capturing_p50": c50, "capturing_p99": c99, "following_p50": f50, "following_p99": f99,
            })),
            "written": written, "samples": latencies.len(), "missed_events": missed_events,
            "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": max,
            "complete": short.is_empty(),
        }),
    );
    report.figure = Some(Figure {
        title: format!(
            "latency CDF, {} clients at {} tx/s",
            args.clients, args.rate
        ),
        x_label: "ms from PostgreSQL commit to client SQLite commit".into(),
        y_label: "fraction of deliveries".into(),
        series: vec![Series {
            name: "deliveries".into(),
            points: cdf(&latencies),
        }],
    });
    drop(db);
    env.close().await?;
    Ok(report)
}

/// Commits `rate` single-row transactions per second for `duration`;
/// returns how many committed.
pub(crate) async fn write_at_rate(
    url: &str,
    rate: u64,
    duration: Duration,
    applied: impl Fn() -> u64,
) -> anyhow::Result<u64> {
    let mut senders = Vec::new();
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..WRITER_CONNECTIONS {
        let db = pgrelay_pg::connect(&pgrelay_pg::ConnInfo::parse(url)?).await?;
        let statement = db
            .prepare("INSERT INTO public.bench_events (payload) VALUES ($1)")
            .await?;
        let (tx, mut rx) = mpsc::channel::<u64>(1024);
        senders.push(tx);
        writers.spawn(async move {
            let mut done = 0u64;
            while let Some(i) = rx.recv().await {
                db.execute(&statement, &[&format!("event {i}")]).await?;
                done += 1;
            }
            Ok::<u64, tokio_postgres::Error>(done)
        });
    }
    let started = Instant::now();
    let total = super::report::whole(rate as f64 * duration.as_secs_f64());
    let period = 1.0 / rate as f64;
    let mut next_progress = started + Duration::from_secs(5);
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 * period);
        tokio::time::sleep_until(due.into()).await;
        let sender = &senders[usize::try_from(i % senders.len() as u64).unwrap_or(0)];
        if sender.send(i).await.is_err() {
            break;
        }
        if Instant::now() >= next_progress {
            eprintln!(
                "  {:>4.0}s: {} tx written, {} deliveries applied",
                started.elapsed().as_secs_f64(),
                i,
                applied()
            );
            next_progress += Duration::from_secs(5);
        }
    }
    drop(senders);
    let mut written = 0;
    while let Some(joined) = writers.join_next().await {
        written += joined??;
    }
    Ok(written)
}

/// Waits until the server's change log holds `expected` changes.
pub(crate) async fn wait_captured(server: &Server, expected: u64) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let changes = server.capture_stats().changes;
        if changes >= expected {
            return Ok(changes);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the server captured only {changes} of {expected} changes"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Up to 500 points of the empirical CDF, in milliseconds.
pub(crate) fn cdf(sorted: &[u32]) -> Vec<(f64, f64)> {
    if sorted.is_empty() {
        return Vec::new();
    }
    let steps = 500.min(sorted.len());
    (0..=steps)
        .map(|s| {
            let q = s as f64 / steps as f64;
            let idx = super::report::index((sorted.len() - 1) as f64 * q);
            (f64::from(sorted[idx]) / 1000.0, q)
        })
        .collect()
}
