//! `bench capture`: the same committed workload decoded twice from fresh
//! slots: by `pg_recvlogical` with pgoutput to /dev/null (what PostgreSQL
//! itself can decode and send: the limit), and by pgrelay into its change
//! log (decoded, committed, slot confirmed).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;

use super::report::{thousands, Figure, Report, Series};
use super::{current_wal_lsn, machine, BenchDb, CommonArgs};

pub(crate) const TABLE: &str = "public.bench_items";
const RECV_SLOT: &str = "bench_recvlogical";
const PGRELAY_SLOT: &str = "bench_pgrelay";

#[derive(Args, Debug, Clone)]
pub struct CaptureArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Rows in the workload.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Rows per transaction.
    #[arg(long, default_value_t = 1_000)]
    pub tx_size: u64,
}

/// A realistic row: key, int, text, exact numeric, array, document, time.
pub(crate) const TABLE_DDL: &str = "CREATE TABLE public.bench_items (
    id bigint PRIMARY KEY, n int NOT NULL, name text NOT NULL, price numeric(12,2),
    tags text[], doc jsonb, at timestamptz NOT NULL DEFAULT now())";

/// Inserts rows `first..first+count` in one statement.
pub(crate) fn insert_sql(first: u64, count: u64) -> String {
    format!(
        "INSERT INTO public.bench_items (id, n, name, price, tags, doc, at) \
         SELECT g, g % 1000, 'item number ' || g, (g % 100000) / 100.0, \
                ARRAY['tag' || (g % 7), 'tag' || (g % 11)], \
                jsonb_build_object('k', g, 'label', 'row ' || g, 'flag', g % 2 = 0), now() \
         FROM generate_series({first}, {}) g",
        first + count - 1
    )
}

/// Inserts rows `1..=rows` in transactions of `tx_size`, with progress.
pub(crate) async fn load(
    db: &tokio_postgres::Client,
    rows: u64,
    tx_size: u64,
) -> anyhow::Result<()> {
    let mut written = 0;
    let mut next_report = rows / 10;
    while written < rows {
        let count = tx_size.min(rows - written);
        db.batch_execute(&insert_sql(written + 1, count)).await?;
        written += count;
        if written >= next_report && written < rows {
            eprintln!("  loading: {written} / {rows} rows");
            next_report += rows / 10;
        }
    }
    Ok(())
}

pub(crate) async fn run(args: CaptureArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.rows > 0 && args.tx_size > 0,
        "--rows and --tx-size must be positive"
    );
    let (env, db) = BenchDb::with_tables(args.common.database_url.as_deref(), TABLE_DDL).await?;
    // Both slots exist before the workload, so both decode exactly it.
    for slot in [RECV_SLOT, PGRELAY_SLOT] {
        db.batch_execute(&format!("CREATE PUBLICATION {slot}_pub FOR TABLE {TABLE}"))
            .await?;
        db.batch_execute(&format!(
            "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"
        ))
        .await?;
    }

    let wal_before_load = current_wal_lsn(&db).await?;
    let started = Instant::now();
    load(&db, args.rows, args.tx_size).await?;
    let load_secs = started.elapsed().as_secs_f64();
    let end = current_wal_lsn(&db).await?;
    let workload_wal = end.0 - wal_before_load.0;
    eprintln!(
        "  loaded {} rows in {load_secs:.1}s; decoding with pg_recvlogical ...",
        args.rows
    );

    let recv_secs = run_recvlogical(env.url(), end).await?;
    eprintln!("  pg_recvlogical: {recv_secs:.2}s; now pgrelay ...");

    let wal_before_pgrelay = current_wal_lsn(&db).await?;
    let (pgrelay_secs, timeline, cpu) = run_pgrelay(env.url(), &db, args.rows).await?;
    let wal_after_pgrelay = current_wal_lsn(&db).await?;
    let log_wal = wal_after_pgrelay.0 - wal_before_pgrelay.0;

    let logged: i64 = db
        .query_one(
            "SELECT count(DISTINCT (data->>'id')::bigint) FROM pgrelay.change_history",
            &[],
        )
        .await?
        .get(0);
    let total: i64 = db
        .query_one("SELECT count(*) FROM pgrelay.change_history", &[])
        .await?
        .get(0);

    let rows = args.rows as f64;
    let recv_rate = rows / recv_secs;
    let pgrelay_rate = rows / pgrelay_secs;
    let ratio = pgrelay_rate / recv_rate;
    let mut report = Report::new(
        "capture",
        format!(
            "capture: {} rows in transactions of {} (bigint, int, text, numeric, text[], jsonb, timestamptz)",
            thousands(rows),
            args.tx_size
        ),
    );
    report.line(
        "pg_recvlogical → /dev/null (limit)",
        format!("{recv_secs:>8.2} s  {:>12} rows/s", thousands(recv_rate)),
    );
    report.line(
        "pgrelay → change log, slot confirmed",
        format!(
            "{pgrelay_secs:>8.2} s  {:>12} rows/s",
            thousands(pgrelay_rate)
        ),
    );
    report.line("ratio pgrelay / pg_recvlogical", format!("{ratio:.2}×"));
    report.line(
        "CPU during pgrelay's run",
        format!(
            "walsender {:.2} s, change-log backend {:.2} s, pgrelay {:.2} s",
            cpu.walsender, cpu.log_backend, cpu.pgrelay
        ),
    );
    report.line(
        "change log WAL per change",
        format!("{} bytes", thousands(log_wal as f64 / rows)),
    );
    report.line(
        "workload WAL per row",
        format!("{} bytes", thousands(workload_wal as f64 / rows)),
    );
    report.line(
        "load (INSERTs, for reference)",
        format!(
            "{load_secs:>8.2} s  {:>12} rows/s",
            thousands(rows / load_secs)
        ),
    );
    report.target("capture ≥ 0.8× pg_recvlogical", ratio >= 0.8);
    let want = i64::try_from(args.rows).unwrap_or(i64::MAX);
    if total != want || logged != want {
        report.failure = Some(format!(
            "the change log holds {total} changes ({logged} distinct) for {} rows written",
            args.rows
        ));
    }
    report.set("machine", machine(&db).await);
    report.set(
        "workload",
        json!({"rows": args.rows, "tx_size": args.tx_size, "table": TABLE_DDL}),
    );
    report.set(
        "results",
        json!({
            "recvlogical_seconds": recv_secs,
            "recvlogical_rows_per_sec": recv_rate,
            "pgrelay_seconds": pgrelay_secs,
            "pgrelay_rows_per_sec": pgrelay_rate,
            "ratio": ratio,
            "change_log_wal_bytes_per_change": log_wal as f64 / rows,
            "workload_wal_bytes_per_row": workload_wal as f64 / rows,
            "load_seconds": load_secs,
            "cpu_seconds": {"walsender": cpu.walsender, "change_log_backends": cpu.log_backend, "pgrelay": cpu.pgrelay},
        }),
    );
    report.figure = Some(Figure {
        title: format!("capture of {} rows", thousands(rows)),
        x_label: "seconds".into(),
        y_label: "changes captured".into(),
        series: vec![
            Series {
                name: "pgrelay (change log committed)".into(),
                points: timeline,
            },
            Series {
                name: "pg_recvlogical (average rate)".into(),
                points: vec![(0.0, 0.0), (recv_secs, rows)],
            },
        ],
    });
    drop(db);
    env.close().await?;
    Ok(report)
}

async fn run_recvlogical(url: &str, end: pgrelay_protocol::Lsn) -> anyhow::Result<f64> {
    let binary = pgrelay_testkit::pg_binary("pg_recvlogical")?;
    let started = Instant::now();
    let output = tokio::process::Command::new(&binary)
        .arg("--dbname")
        .arg(url)
        .args(["--slot", RECV_SLOT, "--start", "--no-loop"])
        .args(["--endpos", &end.to_string()])
        .args(["-o", "proto_version=1"])
        .args(["-o", &format!("publication_names={RECV_SLOT}_pub")])
        .args(["--file", "/dev/null", "--fsync-interval", "0"])
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", binary.display()))?;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        output.status.success(),
        "pg_recvlogical failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(secs)
}

/// CPU seconds spent by each side while pgrelay captured.
#[derive(Default)]
struct CpuSplit {
    walsender: f64,
    log_backend: f64,
    pgrelay: f64,
}

/// Starts an in-process server on the pre-made slot and times it until
/// every row is committed in the change log; returns the seconds, a
/// (seconds, changes) timeline and where the CPU went.
async fn run_pgrelay(
    url: &str,
    db: &tokio_postgres::Client,
    rows: u64,
) -> anyhow::Result<(f64, Vec<(f64, f64)>, CpuSplit)> {
    let own_cpu_before = cpu_seconds("self").unwrap_or(0.0);
    let started = Instant::now();
    let server = super::start_server(url, PGRELAY_SLOT, TABLE).await?;
    let mut timeline = vec![(0.0, 0.0)];
    let mut last_sample = Instant::now();
    let deadline = Duration::from_secs(3600);
    loop {
        let stats = server.capture_stats();
        let t = started.elapsed();
        if last_sample.elapsed() >= Duration::from_millis(100) || stats.changes >= rows {
            timeline.push((t.as_secs_f64(), stats.changes as f64));
            last_sample = Instant::now();
        }
        if stats.changes >= rows {
            break;
        }
        anyhow::ensure!(
            t < deadline,
            "pgrelay captured only {} of {rows} changes in {deadline:?}",
            stats.changes
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let mut cpu = CpuSplit {
        pgrelay: cpu_seconds("self").unwrap_or(0.0) - own_cpu_before,
        ..CpuSplit::default()
    };
    // pgrelay's backends live only for this run, so their totals are its.
    let backends = db
        .query(
            "SELECT pid, backend_type, application_name FROM pg_stat_activity
             WHERE datname = current_database() AND application_name LIKE 'pgrelay%'",
            &[],
        )
        .await?;
    for row in backends {
        let pid: i32 = row.get(0);
        let kind: String = row.get(1);
        let used = cpu_seconds(&pid.to_string()).unwrap_or(0.0);
        if kind == "walsender" {
            cpu.walsender += used;
        } else {
            cpu.log_backend += used;
        }
    }
    server.shutdown().await?;
    Ok((secs, timeline, cpu))
}

/// User + system CPU seconds of a process, from /proc (`self` or a pid).
pub(super) fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields, in clock ticks (USER_HZ, 100 on Linux).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}
