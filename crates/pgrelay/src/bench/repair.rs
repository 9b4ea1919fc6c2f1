//! `bench repair`: a replica that was away while 0.1 % of its rows changed
//! (updates, inserts and deletes spread over the key range) and whose
//! change log was replaced, so it cannot resume: repaired range by range,
//! against a fresh replica hydrated whole from the same server, in the same
//! run. Bytes: the repair's frames both ways vs the snapshot's frames on
//! the wire; time: client start to caught up, both in this process; the
//! repaired replica is then compared with PostgreSQL (`verify`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use pgrelay_client::{ClientConfig, Event, SyncClient};
use serde_json::json;

use super::capture::{load, TABLE, TABLE_DDL};
use super::report::{spread, thousands, Report};
use super::{machine, start_server, BenchDb, CommonArgs};

#[derive(Args, Debug, Clone)]
pub struct RepairArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Rows in the table.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Repairs (and full hydrations) measured; min/median/max reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

/// Every this many keys, one row is inserted, one updated, one deleted:
/// 0.1 % of the rows changed.
const EVERY: u64 = 3_000;

const SLOT: &str = "bench_repair";

/// What one client run did.
struct Synced {
    secs: f64,
    /// Repair frames both ways (0 for a hydration).
    repair_bytes: u64,
    rows_received: u64,
    rounds: usize,
    /// Rows the server read from PostgreSQL for the repair's checks, and
    /// first-round ranges it answered from its kept digests.
    server_rows_read: u64,
    kept_parts: u64,
}

pub(crate) async fn run(args: RepairArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.rows >= EVERY, "--rows must be at least {EVERY}");
    anyhow::ensure!(args.runs > 0, "--runs must be positive");
    let (env, db) = BenchDb::with_tables(args.common.database_url.as_deref(), TABLE_DDL).await?;
    eprintln!("loading {} rows ...", args.rows);
    load(&db, args.rows, 10_000).await?;
    // Gaps, filled while the replica is away: inserts spread over the keys.
    db.batch_execute(&format!("DELETE FROM {TABLE} WHERE id % {EVERY} = 0"))
        .await?;
    db.batch_execute(&format!("VACUUM ANALYZE {TABLE}")).await?;
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("base.sqlite");

    let server = start_server(env.url(), SLOT, TABLE).await?;
    let addr = format!("ws://{}", server.local_addr());
    eprintln!("the replica that goes away: hydrating it ...");
    sync(&addr, &base, "bench-away").await?;
    server.shutdown().await?;
    // A replica that has run a while has its range digests, made while
    // it was idle after catching up; this one exits at once, so they are
    // made here, to the end (timed, counted in neither figure).
    let started = Instant::now();
    let replica = pgrelay_client::Replica::open(&base)?;
    replica.build_digests().await?;
    drop(replica);
    let digests_secs = started.elapsed().as_secs_f64();
    eprintln!("its range digests made in {digests_secs:.2} s");

    eprintln!("away: 0.1 % of the rows change and the change log is replaced ...");
    db.batch_execute(&format!(
        "INSERT INTO {TABLE} (id, n, name, price, tags, doc)
           SELECT id - 1, n, name || ' (new)', price, tags, doc FROM {TABLE} WHERE id % {EVERY} = 1;
         UPDATE {TABLE} SET n = n + 1, name = name || ' (edited)' WHERE id % {EVERY} = 2;
         DELETE FROM {TABLE} WHERE id % {EVERY} = 3;
         UPDATE pgrelay.log_state SET log_id = 'bench-repair-' || md5(random()::text);"
    ))
    .await?;
    let changed = 3 * (args.rows / EVERY);

    let server = start_server(env.url(), SLOT, TABLE).await?;
    // The server keeps digests of the table, made in the background
    // after it starts: waited for here (timed, counted in neither figure),
    // as a server that has run a while has them.
    let started = Instant::now();
    while server.repair_stats().kept_tables == 0 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the server did not make its kept digests"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kept_secs = started.elapsed().as_secs_f64();
    eprintln!("the server's kept digests made in {kept_secs:.2} s");
    let addr = format!("ws://{}", server.local_addr());
    let wire = super::hydrate::receive_only(&server.local_addr().to_string()).await?;
    let mut repairs = Vec::new();
    let mut hydrations = Vec::new();
    let mut failures = Vec::new();
    for run in 0..args.runs {
        eprintln!("run {}: full hydration of a fresh replica ...", run + 1);
        let fresh = dir.path().join(format!("fresh-{run}.sqlite"));
        hydrations.push(sync(&addr, &fresh, &format!("bench-fresh-{run}")).await?);
        eprintln!("run {}: repair of the replica that was away ...", run + 1);
        let away = dir.path().join(format!("away-{run}.sqlite"));
        for suffix in ["", "-wal"] {
            let from = base.with_file_name(format!("base.sqlite{suffix}"));
            if from.exists() {
                let to = away.with_file_name(format!("away-{run}.sqlite{suffix}"));
                std::fs::copy(&from, &to).context("copying the replica")?;
            }
        }
        let before = server.repair_stats();
        let mut repaired = sync(&addr, &away, "bench-away").await?;
        let after = server.repair_stats();
        repaired.server_rows_read = after.rows_read - before.rows_read;
        repaired.kept_parts = after.kept_parts - before.kept_parts;
        repairs.push(repaired);
        let report = crate::cmd::verify::verify(env.url(), &away, None).await?;
        if !report.all_match() {
            failures.push(format!(
                "run {}: the repaired replica differs:\n{}",
                run + 1,
                report.render_table()
            ));
        }
        let _ = std::fs::remove_file(&fresh);
    }
    server.shutdown().await?;

    let (h_min, h_med, h_max) = spread(hydrations.iter().map(|s| s.secs).collect());
    let (r_min, r_med, r_max) = spread(repairs.iter().map(|s| s.secs).collect());
    let (b_min, b_med, b_max) = spread(repairs.iter().map(|s| s.repair_bytes as f64).collect());
    let byte_ratio = b_med / wire.wire_bytes.max(1) as f64;
    let time_ratio = r_med / h_med;
    let mut report = Report::new(
        "repair",
        format!(
            "Repair a {}-row replica after {} rows changed",
            thousands(args.rows as f64),
            thousands(changed as f64)
        ),
    );
    report.line("runs", args.runs.to_string());
    report.line(
        "full hydration: bytes on the wire",
        format!("{:.2} MB", wire.wire_bytes as f64 / 1e6),
    );
    report.line(
        "full hydration: start → caught up (min/median/max)",
        format!("{h_min:.2} / {h_med:.2} / {h_max:.2} s"),
    );
    report.line(
        "repair: bytes both ways (min/median/max)",
        format!(
            "{:.1} / {:.1} / {:.1} KB = {:.2} % of the hydration",
            b_min / 1e3,
            b_med / 1e3,
            b_max / 1e3,
            byte_ratio * 100.0
        ),
    );
    report.line(
        "repair: start → caught up (min/median/max)",
        format!(
            "{r_min:.2} / {r_med:.2} / {r_max:.2} s = {:.1} % of the hydration",
            time_ratio * 100.0
        ),
    );
    report.line(
        "range digests kept by the replica: made after its hydration in",
        format!("{digests_secs:.2} s (not counted)"),
    );
    report.line(
        "range digests kept by the server: made after it started in",
        format!("{kept_secs:.2} s (not counted)"),
    );
    if let Some(r) = repairs.first() {
        report.line(
            "repair: rows received, check rounds",
            format!("{}, {}", thousands(r.rows_received as f64), r.rounds),
        );
        report.line(
            "repair: rows the server read, first-round ranges from its kept digests",
            format!(
                "{}, {}",
                thousands(r.server_rows_read as f64),
                thousands(r.kept_parts as f64)
            ),
        );
    }
    report.set("rows", json!(args.rows));
    report.set("digests_secs", json!(digests_secs));
    report.set("kept_secs", json!(kept_secs));
    report.set(
        "server_rows_read",
        json!(repairs
            .iter()
            .map(|s| s.server_rows_read)
            .collect::<Vec<_>>()),
    );
    report.set(
        "kept_parts",
        json!(repairs.iter().map(|s| s.kept_parts).collect::<Vec<_>>()),
    );
    report.set("hydration_wire_bytes", json!(wire.wire_bytes));
    report.set(
        "hydration_secs",
        json!(hydrations.iter().map(|s| s.secs).collect::<Vec<_>>()),
    );
    report.set(
        "repair_secs",
        json!(repairs.iter().map(|s| s.secs).collect::<Vec<_>>()),
    );
    report.set(
        "repair_bytes",
        json!(repairs.iter().map(|s| s.repair_bytes).collect::<Vec<_>>()),
    );
    report.set(
        "repair_rows_received",
        json!(repairs.iter().map(|s| s.rows_received).collect::<Vec<_>>()),
    );
    report.set("machine", machine(&db).await);
    report.target(
        "repair bytes ≤ 3 % of a full hydration's",
        byte_ratio <= 0.03,
    );
    report.target(
        "repair time ≤ 20 % of a full hydration's",
        time_ratio <= 0.20,
    );
    if repairs.iter().any(|r| r.repair_bytes == 0) {
        failures.push("a replica was not repaired (hydrated whole instead)".to_owned());
    }
    if !failures.is_empty() {
        report.failure = Some(failures.join("; "));
    }
    drop(db);
    env.close().await?;
    Ok(report)
}

/// Syncs the replica at `db` until caught up, in this process.
async fn sync(server: &str, db: &Path, id: &str) -> anyhow::Result<Synced> {
    let mut config = ClientConfig::new(server.to_owned(), db);
    config.client_id = Some(id.to_owned());
    config.exit_when_caught_up = true;
    let started = Instant::now();
    let client = Arc::new(SyncClient::open(config).await?);
    let mut events = client.subscribe();
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let runner = Arc::clone(&client);
    let task = tokio::spawn(async move { runner.run(stopped).await });
    let mut synced = Synced {
        secs: 0.0,
        repair_bytes: 0,
        rows_received: 0,
        rounds: 0,
        server_rows_read: 0,
        kept_parts: 0,
    };
    let caught_up = tokio::time::timeout(Duration::from_secs(1800), async {
        while let Ok(event) = events.recv().await {
            match event {
                Event::Repaired {
                    bytes,
                    rows_received,
                    rounds,
                    ..
                } => {
                    synced.repair_bytes = bytes;
                    synced.rows_received = rows_received;
                    synced.rounds = rounds;
                }
                Event::CaughtUp { .. } => return true,
                _ => {}
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    synced.secs = started.elapsed().as_secs_f64();
    task.await??;
    anyhow::ensure!(caught_up, "the client did not catch up");
    Ok(synced)
}
