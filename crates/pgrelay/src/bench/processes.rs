//! `bench latency|fanout --light` or `--processes N`: the server as its own
//! process (`pgrelay serve`) and the clients in other processes, so the
//! server's cost is measured apart from the clients'. Light clients parse
//! every frame and apply nothing (commit → frame received); full clients
//! are real replicas that apply every transaction (commit → SQLite commit).
//! Either way the run reports deliveries per second and, from /proc, the
//! server's and the clients' CPU per delivered transaction and row; with
//! `--server-cpus` and `--client-cpus` the two sides run on separate cores,
//! which shows what the same server does when its clients' CPU is not its
//! own.

use std::time::{Duration, Instant};

use serde_json::json;

use super::capture::{cpu_seconds, load, TABLE as FANOUT_TABLE, TABLE_DDL};
use super::fanout::FanoutArgs;
use super::fleet::percentile;
use super::latency::{cdf, write_at_rate, LatencyArgs, EVENTS_DDL, TABLE};
use super::reader::{Kind, Readers, Totals};
use super::report::{thousands, Figure, Report, Series};
use super::spread::SpreadArgs;
use super::{machine, BenchDb};

/// What a run measured.
struct Measured {
    /// Transactions and changes committed by the writer.
    written: (u64, u64),
    totals: Totals,
    /// Transactions and rows delivered to clients (for full clients: the
    /// written transactions times the replicas holding all of them).
    delivered: (u64, u64),
    /// First write → last client done.
    secs: f64,
    write_secs: f64,
    server_cpu: f64,
    server_syscalls: u64,
}

/// Starts the server and the client processes, runs `write` (which returns
/// the transactions and changes it committed), waits for every client to
/// have them all, and reads the server's CPU and system calls meanwhile.
async fn measure(
    env: &BenchDb,
    slot: &str,
    table: &str,
    clients: usize,
    spread: &SpreadArgs,
    write: impl std::future::Future<Output = anyhow::Result<(u64, u64)>>,
) -> anyhow::Result<Measured> {
    let (mut server, addr) = super::spawn_server_on(
        env.url(),
        slot,
        table,
        &[
            "--connect-rate",
            "0",
            "--message-rate",
            "0",
            "--max-connections",
            "1000000",
        ],
        spread.server_cpus.as_deref(),
    )
    .await?;
    let pid = server.id().unwrap_or(0);
    eprintln!(
        "  starting {} ({}) ...",
        spread.clients(clients),
        spread.placement()
    );
    let kind = spread.kind(table);
    let readers = Readers::start(
        &addr,
        clients,
        spread.processes(),
        kind,
        spread.client_cpus.as_deref(),
    )
    .await?;
    let (cpu0, sys0) = (
        cpu_seconds(&pid.to_string()).unwrap_or(0.0),
        super::syscalls(pid).unwrap_or(0),
    );
    let started = Instant::now();
    let (txs, changes) = write.await?;
    let write_secs = started.elapsed().as_secs_f64();
    let totals = readers
        .finish(txs, changes, Duration::from_secs(600))
        .await?;
    let secs = started.elapsed().as_secs_f64();
    let server_cpu = cpu_seconds(&pid.to_string()).unwrap_or(0.0) - cpu0;
    let server_syscalls = super::syscalls(pid).unwrap_or(0).saturating_sub(sys0);
    let _ = server.kill().await;
    let delivered = match kind {
        Kind::Light => (totals.txs, totals.changes),
        Kind::Full { .. } => (
            txs * (clients as u64).saturating_sub(totals.short),
            totals.changes,
        ),
    };
    Ok(Measured {
        written: (txs, changes),
        totals,
        delivered,
        secs,
        write_secs,
        server_cpu,
        server_syscalls,
    })
}

/// Cores of the machine (not of this process's affinity).
fn machine_cores() -> usize {
    std::fs::read_to_string("/proc/stat")
        .map(|stat| {
            stat.lines()
                .filter(|l| {
                    l.strip_prefix("cpu")
                        .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
                })
                .count()
        })
        .unwrap_or(0)
}

/// The server's and the clients' cost per delivery, and what the rate
/// asked for (`asked` row deliveries/s) would need in cores, as report
/// lines; returns them as JSON.
fn costs(report: &mut Report, m: &Measured, light: bool, asked: f64) -> serde_json::Value {
    let (txs, rows) = (m.delivered.0.max(1) as f64, m.delivered.1.max(1) as f64);
    let server = (m.server_cpu / txs * 1e6, m.server_cpu / rows * 1e6);
    let clients = (
        m.totals.cpu_seconds / txs * 1e6,
        m.totals.cpu_seconds / rows * 1e6,
    );
    report.line(
        "server CPU",
        format!(
            "{:.2} s = {:.1} µs per delivered transaction, {:.2} µs per delivered row ({:.0} % of one core)",
            m.server_cpu,
            server.0,
            server.1,
            m.server_cpu / m.secs * 100.0
        ),
    );
    let bytes = m.totals.bytes as f64 / m.totals.frames.max(1) as f64;
    if light {
        report.line(
            "server read/write system calls (/proc io; send/recv not counted)",
            format!("{:.2} per delivered frame", m.server_syscalls as f64 / txs),
        );
        report.line("bytes per frame", format!("{bytes:.0} (WebSocket payload)"));
    }
    report.line(
        if light {
            "light clients' CPU"
        } else {
            "full clients' CPU"
        },
        format!(
            "{:.2} s = {:.1} µs per transaction, {:.2} µs per row ({:.0} % of one core)",
            m.totals.cpu_seconds,
            clients.0,
            clients.1,
            m.totals.cpu_seconds / m.secs * 100.0
        ),
    );
    let cores = machine_cores();
    let (server_cores, client_cores) = (asked * server.1 / 1e6, asked * clients.1 / 1e6);
    report.line(
        "CPU the asked rate needs",
        format!(
            "{} row deliveries/s: server {server_cores:.2} + clients {client_cores:.2} cores, of {cores} (PostgreSQL and the writer not counted)",
            thousands(asked)
        ),
    );
    json!({
        "frames": m.delivered.0, "changes": m.delivered.1, "seconds": m.secs,
        "write_seconds": m.write_secs,
        "frame_deliveries_per_sec": m.delivered.0 as f64 / m.secs,
        "row_deliveries_per_sec": m.delivered.1 as f64 / m.secs,
        "server_cpu_seconds": m.server_cpu, "server_cpu_us_per_frame": server.0,
        "server_cpu_us_per_row": server.1,
        "server_syscalls_per_frame": m.server_syscalls as f64 / txs,
        "bytes_per_frame": bytes, "reader_cpu_seconds": m.totals.cpu_seconds,
        "reader_cpu_us_per_frame": clients.0, "reader_cpu_us_per_row": clients.1,
        "asked_row_deliveries_per_sec": asked, "cores_asked_server": server_cores,
        "cores_asked_clients": client_cores, "cores": cores,
    })
}

pub(crate) async fn latency(args: LatencyArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.nodes == 1, "--light and --processes take one node");
    let spread = &args.spread;
    let (env, db) = BenchDb::with_tables(args.common.database_url.as_deref(), EVENTS_DDL).await?;
    let (rate, duration) = (args.rate, args.duration);
    let url = env.url().to_owned();
    let m = Box::pin(measure(
        &env,
        "bench_apart",
        TABLE,
        args.clients,
        spread,
        async move {
            eprintln!("  writing {rate} tx/s for {duration:?} ...");
            let written = write_at_rate(&url, rate, duration, || 0).await?;
            Ok((written, written))
        },
    ))
    .await?;
    let (totals, secs, write_secs) = (&m.totals, m.secs, m.write_secs);
    let written = m.written.0;
    let expected = written * args.clients as u64;
    let complete = totals.short == 0
        && if spread.light {
            totals.out_of_order == 0 && totals.txs == expected
        } else {
            totals.changes == expected
        };
    let ms = |us: u32| f64::from(us) / 1000.0;
    let s = &totals.samples;
    let (p50, p95, p99, max) = (
        ms(percentile(s, 50.0)),
        ms(percentile(s, 95.0)),
        ms(percentile(s, 99.0)),
        ms(s.last().copied().unwrap_or(0)),
    );
    let until = if spread.light {
        "frame received"
    } else {
        "client SQLite commit"
    };
    let mut report = Report::new(
        "latency",
        format!(
            "latency: {}, server apart ({}), {} tx/s for {:?} (PostgreSQL commit → {until})",
            spread.clients(args.clients),
            spread.placement(),
            args.rate,
            args.duration
        ),
    );
    report.line("transactions written", thousands(written as f64));
    report.line(
        "achieved write rate",
        format!("{} tx/s", thousands(written as f64 / write_secs)),
    );
    report.line(
        "transactions delivered",
        format!(
            "{} of {} ({} deliveries/s from the first write to the last client done)",
            thousands(m.delivered.0 as f64),
            thousands(expected as f64),
            thousands(m.delivered.0 as f64 / secs)
        ),
    );
    report.line("p50", format!("{p50:.2} ms"));
    report.line("p95", format!("{p95:.2} ms"));
    report.line("p99", format!("{p99:.2} ms"));
    report.line("max", format!("{max:.2} ms"));
    let r = &totals.received;
    if !spread.light {
        report.line(
            "commit → frame read by the client",
            format!(
                "p50 {:.2} / p99 {:.2} ms ({} samples, {} events skipped by the clients' watchers)",
                ms(percentile(r, 50.0)),
                ms(percentile(r, 99.0)),
                thousands(r.len() as f64),
                totals.missed_events
            ),
        );
    }
    let asked = (args.rate * args.clients as u64) as f64;
    let cost = costs(&mut report, &m, spread.light, asked);
    report.line(
        "every client has every transaction",
        if complete {
            "yes".to_owned()
        } else {
            format!(
                "NO: {} clients short, {} out of order, {} of {expected} delivered",
                totals.short,
                totals.out_of_order,
                if spread.light {
                    totals.txs
                } else {
                    totals.changes
                }
            )
        },
    );
    let (p50_max, p99_max) = super::latency::targets(spread.light, args.clients);
    report.target(format!("p50 ≤ {p50_max} ms"), p50 <= p50_max);
    report.target(format!("p99 ≤ {p99_max} ms"), p99 <= p99_max);
    if !complete {
        report.failure = Some(format!(
            "clients received {} of {expected} transactions ({} short, {} out of order; full replicas hold {} rows)",
            m.delivered.0, totals.short, totals.out_of_order, totals.changes
        ));
    }
    report.set("machine", machine(&db).await);
    report.set(
        "results",
        spread.with(json!({
            "clients": args.clients, "rate": args.rate,
            "duration_seconds": args.duration.as_secs_f64(), "written": written,
            "samples": s.len(), "missed_events": totals.missed_events,
            "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": max,
            "received_p50_ms": (!spread.light).then(|| ms(percentile(r, 50.0))),
            "received_p99_ms": (!spread.light).then(|| ms(percentile(r, 99.0))),
            "complete": complete, "costs": cost,
        })),
    );
    report.figure = Some(Figure {
        title: format!(
            "commit → {until}, {} at {} tx/s",
            spread.clients(args.clients),
            args.rate
        ),
        x_label: format!("ms from PostgreSQL commit to {until}"),
        y_label: "fraction of deliveries".into(),
        series: vec![Series {
            name: "deliveries".into(),
            points: cdf(s),
        }],
    });
    drop(db);
    env.close().await?;
    Ok(report)
}

/// `bench fanout --light|--processes`: rows written as fast as PostgreSQL
/// takes them, delivered to the clients; row and frame deliveries per second.
pub(crate) async fn fanout(args: FanoutArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.tenants == 0 && args.nodes == 1,
        "--light and --processes take one node and no --tenants"
    );
    let spread = &args.spread;
    let (env, db) = BenchDb::with_tables(args.common.database_url.as_deref(), TABLE_DDL).await?;
    let (rows, tx_size) = (args.rows, args.tx_size);
    let writer = env.connect().await?;
    let m = measure(
        &env,
        "bench_apart_fanout",
        FANOUT_TABLE,
        args.clients,
        spread,
        async move {
            eprintln!("  writing {rows} rows ...");
            load(&writer, rows, tx_size).await?;
            Ok((rows.div_ceil(tx_size), rows))
        },
    )
    .await?;
    let clients = args.clients as u64;
    let expected = m.written.1 * clients;
    let t = &m.totals;
    let complete = t.short == 0
        && t.changes == expected
        && (!spread.light || (t.out_of_order == 0 && t.txs == m.written.0 * clients));
    let rate = t.changes as f64 / m.secs;
    let mut report = Report::new(
        "fanout",
        format!(
            "fanout: {} rows (transactions of {}) to {}, server apart ({})",
            thousands(rows as f64),
            tx_size,
            spread.clients(args.clients),
            spread.placement()
        ),
    );
    report.line("row deliveries", thousands(expected as f64));
    report.line("first write → last client done", format!("{:.2} s", m.secs));
    report.line("of which writing", format!("{:.2} s", m.write_secs));
    report.line("row deliveries/s", thousands(rate));
    report.line(
        "transaction deliveries/s",
        thousands(m.delivered.0 as f64 / m.secs),
    );
    let cost = costs(&mut report, &m, spread.light, 500_000.0);
    report.line(
        "every client has every row",
        if complete {
            "yes".to_owned()
        } else {
            format!(
                "NO: {} clients short, {} of {expected} rows",
                t.short, t.changes
            )
        },
    );
    report.target("fan-out ≥ 500,000 row deliveries/s", rate >= 500_000.0);
    if !complete {
        report.failure = Some(format!(
            "clients received {} of {expected} rows ({} clients short, {} out of order)",
            t.changes, t.short, t.out_of_order
        ));
    }
    report.set("machine", machine(&db).await);
    report.set(
        "results",
        spread.with(json!({
            "clients": args.clients, "rows": rows, "tx_size": tx_size,
            "deliveries": expected, "deliveries_per_sec": rate,
            "complete": complete, "costs": cost,
        })),
    );
    let until = if spread.light {
        "frame received"
    } else {
        "client SQLite commit"
    };
    report.figure = Some(Figure {
        title: format!("commit → {until}, {}", spread.clients(args.clients)),
        x_label: format!("ms from PostgreSQL commit to {until}"),
        y_label: "fraction of transaction deliveries".into(),
        series: vec![Series {
            name: "transactions".into(),
            points: cdf(&t.samples),
        }],
    });
    drop(db);
    env.close().await?;
    Ok(report)
}
