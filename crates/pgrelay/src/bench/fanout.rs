//! `bench fanout`: rows written as fast as PostgreSQL takes them while many
//! real clients apply them; measures aggregate row deliveries per second
//! (rows × clients applied to replicas).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use super::capture::{load, TABLE, TABLE_DDL};
use super::fleet::Fleet;
use super::latency::wait_captured;
use super::report::{thousands, Figure, Report, Series};
use super::{machine, BenchDb, CommonArgs};

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Clients, each with its own SQLite replica.
    #[arg(long, default_value_t = 1_000)]
    pub clients: usize,
    /// Rows written (each delivered to every client).
    #[arg(long, default_value_t = 100_000)]
    pub rows: u64,
    /// Rows per transaction.
    #[arg(long, default_value_t = 1_000)]
    pub tx_size: u64,
}

pub(crate) async fn run(args: FanoutArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.clients > 0 && args.rows > 0 && args.tx_size > 0,
        "--clients, --rows and --tx-size must be positive"
    );
    let (env, db) = BenchDb::with_tables(args.common.database_url.as_deref(), TABLE_DDL).await?;
    let server = super::start_server(env.url(), "bench_fanout", TABLE).await?;
    let dir = tempfile::tempdir()?;
    eprintln!("  starting {} clients ...", args.clients);
    let fleet = Fleet::start(server.local_addr(), args.clients, dir.path(), false).await?;
    fleet.wait_connected(Duration::from_secs(300)).await?;
    let expected = args.rows * fleet.len() as u64;

    eprintln!("  writing {} rows ...", args.rows);
    let started = Instant::now();
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let applied = std::sync::Arc::clone(&fleet.applied_changes);
        let finished = std::sync::Arc::clone(&finished);
        tokio::spawn(async move {
            let mut points = vec![(0.0, 0.0)];
            let mut last = (0.0, 0u64);
            let mut next_progress = 5.0;
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let t = started.elapsed().as_secs_f64();
                let now = applied.load(Ordering::Relaxed);
                points.push((t, (now - last.1) as f64 / (t - last.0)));
                last = (t, now);
                if t >= next_progress {
                    eprintln!("  {t:>4.0}s: {now} of {expected} deliveries applied");
                    next_progress += 5.0;
                }
                if now >= expected || finished.load(Ordering::Relaxed) {
                    return points;
                }
            }
        })
    };
    load(&db, args.rows, args.tx_size).await?;
    let write_secs = started.elapsed().as_secs_f64();
    let captured = wait_captured(&server, args.rows).await?;
    let head = server.capture_stats().head;
    fleet.wait_at(head, Duration::from_secs(3600)).await?;
    let secs = started.elapsed().as_secs_f64();
    let counts = fleet.row_counts(TABLE).await?;
    let positions = fleet.positions().await?;
    for (i, (count, lsn)) in counts.iter().zip(&positions).enumerate() {
        if *count != args.rows as i64 {
            eprintln!("  client {i}: {count} rows, replica at {lsn:?}, head {head}");
        }
    }
    let clients = fleet.len();
    finished.store(true, Ordering::Relaxed);
    let timeline = sampler.await.unwrap_or_default();
    fleet.stop().await?;
    server.shutdown().await?;

    let short = counts.iter().filter(|&&c| c != args.rows as i64).count();
    let rate = expected as f64 / secs;
    let mut report = Report::new(
        "fanout",
        format!(
            "fanout: {} rows (transactions of {}) to {} clients",
            thousands(args.rows as f64),
            args.tx_size,
            clients
        ),
    );
    report.line("row deliveries", thousands(expected as f64));
    report.line(
        "first write → every replica at head",
        format!("{secs:.2} s"),
    );
    report.line("of which writing", format!("{write_secs:.2} s"));
    report.line("row deliveries/s", thousands(rate));
    report.line(
        "every client has every row",
        if short == 0 {
            "yes".to_owned()
        } else {
            format!("NO: {short} clients short")
        },
    );
    report.target("fan-out ≥ 500,000 row deliveries/s", rate >= 500_000.0);
    if short > 0 || captured != args.rows {
        report.failure = Some(format!(
            "{short} of {clients} replicas do not hold all {} rows; change log captured {captured}",
            args.rows
        ));
    }
    report.set("machine", machine(&db).await);
    report.set(
        "results",
        json!({
            "clients": clients, "rows": args.rows, "tx_size": args.tx_size,
            "seconds": secs, "write_seconds": write_secs,
            "deliveries": expected, "deliveries_per_sec": rate, "complete": short == 0,
        }),
    );
    report.figure = Some(Figure {
        title: format!("fan-out to {clients} clients"),
        x_label: "seconds".into(),
        y_label: "row deliveries/s".into(),
        series: vec![Series {
            name: "applied to replicas".into(),
            points: timeline,
        }],
    });
    drop(db);
    env.close().await?;
    Ok(report)
}
