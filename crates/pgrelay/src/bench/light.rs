//! `bench latency --light`: the server as its own process, light clients
//! (WebSocket readers that parse every frame and apply nothing) in other
//! processes, so the server's cost is measured apart from the clients':
//! PostgreSQL commit → frame received, frame deliveries per second, and the
//! server's CPU, system calls and bytes per delivered frame (from /proc).

use std::time::{Duration, Instant};

use serde_json::json;

use super::capture::{cpu_seconds, load, TABLE as FANOUT_TABLE, TABLE_DDL};
use super::fanout::FanoutArgs;
use super::fleet::percentile;
use super::latency::{cdf, write_at_rate, LatencyArgs, EVENTS_DDL, TABLE};
use super::reader::{Readers, Totals};
use super::report::{thousands, Figure, Report, Series};
use super::{machine, BenchDb};

/// What a light run measured.
struct Measured {
    /// Transactions and changes committed by the writer.
    written: (u64, u64),
    totals: Totals,
    /// First write → last frame received.
    secs: f64,
    write_secs: f64,
    server_cpu: f64,
    server_syscalls: u64,
}

/// Starts the server and the readers, runs `write` (which returns the
/// transactions and changes it committed), waits for every reader to have
/// them all, and reads the server's CPU and system calls meanwhile.
async fn measure(
    env: &BenchDb,
    slot: &str,
    table: &str,
    clients: usize,
    processes: usize,
    write: impl std::future::Future<Output = anyhow::Result<(u64, u64)>>,
) -> anyhow::Result<Measured> {
    let (mut server, addr) = super::spawn_server(
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
    )
    .await?;
    let pid = server.id().unwrap_or(0);
    eprintln!("  starting {clients} light clients in {processes} processes ...");
    let readers = Readers::start(&addr, clients, processes).await?;
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
    Ok(Measured {
        written: (txs, changes),
        totals,
        secs,
        write_secs,
        server_cpu,
        server_syscalls,
    })
}

/// The server's and the readers' cost per delivered frame, as report lines.
fn costs(report: &mut Report, m: &Measured) -> serde_json::Value {
    let frames = m.totals.txs.max(1) as f64;
    let per_frame_us = m.server_cpu / frames * 1e6;
    report.line(
        "server CPU",
        format!(
            "{:.2} s = {per_frame_us:.1} µs per delivered frame ({:.0} % of one core)",
            m.server_cpu,
            m.server_cpu / m.secs * 100.0
        ),
    );
    report.line(
        "server read/write system calls (/proc io; send/recv not counted)",
        format!(
            "{:.2} per delivered frame",
            m.server_syscalls as f64 / frames
        ),
    );
    let bytes = m.totals.bytes as f64 / m.totals.frames.max(1) as f64;
    report.line("bytes per frame", format!("{bytes:.0} (WebSocket payload)"));
    report.line(
        "light clients' CPU",
        format!(
            "{:.2} s = {:.1} µs per frame",
            m.totals.cpu_seconds,
            m.totals.cpu_seconds / frames * 1e6
        ),
    );
    json!({
        "frames": m.totals.txs, "changes": m.totals.changes, "seconds": m.secs,
        "write_seconds": m.write_secs,
        "frame_deliveries_per_sec": m.totals.txs as f64 / m.secs,
        "row_deliveries_per_sec": m.totals.changes as f64 / m.secs,
        "server_cpu_seconds": m.server_cpu, "server_cpu_us_per_frame": per_frame_us,
        "server_syscalls_per_frame": m.server_syscalls as f64 / frames,
        "bytes_per_frame": bytes, "reader_cpu_seconds": m.totals.cpu_seconds,
    })
}

pub(crate) async fn latency(args: LatencyArgs) -> anyhow::Result<Report> {
    let (env, db) = BenchDb::with_tables(args.common.database_url.as_deref(), EVENTS_DDL).await?;
    let (rate, duration) = (args.rate, args.duration);
    let url = env.url().to_owned();
    let m = Box::pin(measure(
        &env,
        "bench_light",
        TABLE,
        args.clients,
        args.processes,
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
    let complete = totals.short == 0 && totals.out_of_order == 0 && totals.txs == expected;
    let ms = |us: u32| f64::from(us) / 1000.0;
    let s = &totals.samples;
    let (p50, p95, p99, max) = (
        ms(percentile(s, 50.0)),
        ms(percentile(s, 95.0)),
        ms(percentile(s, 99.0)),
        ms(s.last().copied().unwrap_or(0)),
    );
    let mut report = Report::new(
        "latency",
        format!(
            "latency --light: {} light clients in {} processes, {} tx/s for {:?} (PostgreSQL commit → frame received)",
            args.clients, args.processes, args.rate, args.duration
        ),
    );
    report.line("transactions written", thousands(written as f64));
    report.line(
        "achieved write rate",
        format!("{} tx/s", thousands(written as f64 / write_secs)),
    );
    report.line(
        "frames delivered",
        format!(
            "{} of {} ({} frame deliveries/s from the first write to the last frame)",
            thousands(totals.txs as f64),
            thousands(expected as f64),
            thousands(totals.txs as f64 / secs)
        ),
    );
    report.line("p50", format!("{p50:.2} ms"));
    report.line("p95", format!("{p95:.2} ms"));
    report.line("p99", format!("{p99:.2} ms"));
    report.line("max", format!("{max:.2} ms"));
    let cost = costs(&mut report, &m);
    report.line(
        "every client has every transaction",
        if complete {
            "yes".to_owned()
        } else {
            format!(
                "NO: {} connections short, {} out of order, {} of {expected} frames",
                totals.short, totals.out_of_order, totals.txs
            )
        },
    );
    report.target("p50 ≤ 10 ms", p50 <= 10.0);
    report.target("p99 ≤ 50 ms", p99 <= 50.0);
    if !complete {
        report.failure = Some(format!(
            "light clients received {} of {expected} transaction frames ({} connections short, {} out of order)",
            totals.txs, totals.short, totals.out_of_order
        ));
    }
    report.set("machine", machine(&db).await);
    report.set(
        "results",
        json!({
            "light": true, "clients": args.clients, "processes": args.processes, "rate": args.rate,
            "duration_seconds": args.duration.as_secs_f64(), "written": written,
            "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": max,
            "complete": complete, "costs": cost,
        }),
    );
    report.figure = Some(Figure {
        title: format!(
            "commit → frame received, {} light clients at {} tx/s",
            args.clients, args.rate
        ),
        x_label: "ms from PostgreSQL commit to frame received".into(),
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

/// `bench fanout --light`: rows written as fast as PostgreSQL takes them,
/// delivered to light clients; row and frame deliveries per second.
pub(crate) async fn fanout(args: FanoutArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.tenants == 0, "--light does not take --tenants");
    let (env, db) = BenchDb::with_tables(args.common.database_url.as_deref(), TABLE_DDL).await?;
    let (rows, tx_size) = (args.rows, args.tx_size);
    let writer = env.connect().await?;
    let m = measure(
        &env,
        "bench_light_fanout",
        FANOUT_TABLE,
        args.clients,
        args.processes,
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
        && t.out_of_order == 0
        && t.changes == expected
        && t.txs == m.written.0 * clients;
    let rate = t.changes as f64 / m.secs;
    let mut report = Report::new(
        "fanout",
        format!(
            "fanout --light: {} rows (transactions of {}) to {} light clients in {} processes",
            thousands(rows as f64),
            tx_size,
            args.clients,
            args.processes
        ),
    );
    report.line("row deliveries", thousands(expected as f64));
    report.line(
        "first write → last frame received",
        format!("{:.2} s", m.secs),
    );
    report.line("of which writing", format!("{:.2} s", m.write_secs));
    report.line("row deliveries/s", thousands(rate));
    report.line("frame deliveries/s", thousands(t.txs as f64 / m.secs));
    let cost = costs(&mut report, &m);
    report.line(
        "every client has every row",
        if complete {
            "yes".to_owned()
        } else {
            format!(
                "NO: {} connections short, {} of {expected} rows",
                t.short, t.changes
            )
        },
    );
    report.target("fan-out ≥ 500,000 row deliveries/s", rate >= 500_000.0);
    if !complete {
        report.failure = Some(format!(
            "light clients received {} of {expected} rows ({} connections short, {} out of order)",
            t.changes, t.short, t.out_of_order
        ));
    }
    report.set("machine", machine(&db).await);
    report.set(
        "results",
        json!({
            "light": true, "clients": args.clients, "processes": args.processes, "rows": rows,
            "tx_size": tx_size, "deliveries": expected, "deliveries_per_sec": rate,
            "complete": complete, "costs": cost,
        }),
    );
    report.figure = Some(Figure {
        title: format!("commit → frame received, {} light clients", args.clients),
        x_label: "ms from PostgreSQL commit to frame received".into(),
        y_label: "fraction of frame deliveries".into(),
        series: vec![Series {
            name: "frames".into(),
            points: cdf(&t.samples),
        }],
    });
    drop(db);
    env.close().await?;
    Ok(report)
}
