//! `bench hydrate`: rows written long before pgrelay started, loaded into a
//! fresh client replica from a snapshot. Three runs on the same table:
//! PostgreSQL's own `COPY TO STDOUT` (the reference), the server's export
//! to a client that only receives (export rows/s), the same recorded frames
//! replayed to a real client (apply rows/s), and a real client against the
//! real server end to end, with both processes' memory peaks. The end to
//! end run is repeated in rounds, each right after a `COPY` of its own, so
//! each ratio compares two runs seconds apart (the machine's speed drifts
//! over a run: the same loop took 1.9 to 3.5 s here within minutes).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use pgrelay_protocol::{ClientMessage, ServerMessage, PROTOCOL_VERSION};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::capture::{load, TABLE, TABLE_DDL};
use super::report::{spread, thousands, Figure, Report, Series};
use super::{machine, proc_bytes, spawn_server, BenchDb, CommonArgs};

#[derive(Args, Debug, Clone)]
pub struct HydrateArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Rows in the table.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// The `pgrelay` binary that runs the client (default: this one), to
    /// compare clients against the same server.
    #[arg(long)]
    pub client_bin: Option<std::path::PathBuf>,
    /// End to end runs, each paired with a `COPY` just before it; the
    /// median ratio is reported and checked.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// End to end for 1M rows in 10 s: 100k rows/s.
const TARGET_ROWS_PER_SEC: f64 = 100_000.0;

/// End to end against PostgreSQL's own `COPY TO STDOUT` of the table.
const TARGET_VS_COPY: f64 = 0.8;

pub(crate) async fn run(args: HydrateArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.rows > 0, "--rows must be positive");
    anyhow::ensure!(args.rounds > 0, "--rounds must be positive");
    let (env, db) = BenchDb::with_tables(args.common.database_url.as_deref(), TABLE_DDL).await?;
    eprintln!("loading {} rows ...", args.rows);
    load(&db, args.rows, 10_000).await?;
    db.batch_execute("VACUUM ANALYZE public.bench_items")
        .await?;

    eprintln!("reference: COPY TO STDOUT ...");
    let (copy_secs, copy_bytes) = raw_copy(&db).await?;

    let (mut server, addr) = spawn_server(env.url(), "bench_hydrate", TABLE, &[]).await?;
    let server_pid = server.id().context("the server has no pid")?;
    eprintln!("export: a client that only receives ...");
    let export = receive_only(&addr).await?;
    anyhow::ensure!(
        export.rows == args.rows,
        "the snapshot held {} rows, the table {}",
        export.rows,
        args.rows
    );

    eprintln!("apply: the recorded snapshot replayed to a real client ...");
    let dir = tempfile::tempdir()?;
    let replay_db = dir.path().join("replay.sqlite");
    let client_bin = match &args.client_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe().context("finding the pgrelay binary")?,
    };
    let apply = replay_to_client(export.frames, &replay_db, &client_bin).await?;
    let replay_rows = replica_rows(&replay_db)?;

    let mut rounds = Vec::new();
    let mut e2e_rows = Vec::new();
    let mut client_peak = 0;
    for round in 1..=args.rounds {
        eprintln!(
            "end to end {round}/{}: COPY, then a real client against the real server ...",
            args.rounds
        );
        let (round_copy_secs, _) = raw_copy(&db).await?;
        let e2e_db = dir.path().join(format!("e2e-{round}.sqlite"));
        let e2e = sync_client(&format!("ws://{addr}"), &e2e_db, &client_bin).await?;
        e2e_rows.push(replica_rows(&e2e_db)?);
        client_peak = client_peak.max(e2e.peak);
        rounds.push((round_copy_secs, e2e.secs));
    }
    let server_peak = proc_bytes(server_pid, "VmHWM")?;
    let _ = server.kill().await;
    // Each round's ratio is its COPY's seconds over its end to end's.
    let (_, e2e_vs_copy, _) = spread(rounds.iter().map(|(copy, e2e)| copy / e2e).collect());
    let (_, e2e_median_secs, _) = spread(rounds.iter().map(|(_, e2e)| *e2e).collect());

    let rows = args.rows as f64;
    let ref_rate = rows / copy_secs;
    let export_rate = rows / export.secs;
    let apply_rate = rows / apply.secs;
    let e2e_rate = rows / e2e_median_secs;
    let mut report = Report::new(
        "hydrate",
        format!("Hydrate {} rows into a fresh replica", thousands(rows)),
    );
    report.line("rows", thousands(rows));
    report.line(
        "PostgreSQL COPY TO STDOUT (reference for export and apply)",
        format!(
            "{:.2} s, {} rows/s, {:.0} MB",
            copy_secs,
            thousands(ref_rate),
            copy_bytes as f64 / 1e6
        ),
    );
    report.line(
        "server export (snapshot → socket)",
        format!(
            "{:.2} s, {} rows/s = {:.2}× COPY; {:.0} MB on the wire ({:.1}× compression)",
            export.secs,
            thousands(export_rate),
            export_rate / ref_rate,
            export.wire_bytes as f64 / 1e6,
            export.raw_bytes as f64 / export.wire_bytes.max(1) as f64
        ),
    );
    report.line(
        "client apply (recorded frames → SQLite)",
        format!(
            "{:.2} s, {} rows/s = {:.2}× COPY",
            apply.secs,
            thousands(apply_rate),
            apply_rate / ref_rate
        ),
    );
    report.line(
        "end to end (server + client), median of rounds",
        format!(
            "{:.2} s, {} rows/s; {:.2}× the COPY just before it (median)",
            e2e_median_secs,
            thousands(e2e_rate),
            e2e_vs_copy
        ),
    );
    report.line(
        "rounds (COPY s / end to end s = ratio)",
        rounds
            .iter()
            .map(|(copy, e2e)| format!("{copy:.2} / {e2e:.2} = {:.2}×", copy / e2e))
            .collect::<Vec<_>>()
            .join(", "),
    );
    report.line(
        "load average (1 min, at the end of the run)",
        load_average().map_or("unknown".to_owned(), |l| format!("{l:.2}")),
    );
    report.line(
        "server memory peak (VmHWM)",
        format!("{:.1} MiB", server_peak as f64 / 1_048_576.0),
    );
    report.line(
        "client memory peak (VmHWM)",
        format!("{:.1} MiB", client_peak as f64 / 1_048_576.0),
    );
    report.set("rows", json!(args.rows));
    report.set("reference_copy_secs", json!(copy_secs));
    report.set("export_secs", json!(export.secs));
    report.set("export_rows_per_sec", json!(export_rate));
    report.set("export_vs_copy", json!(export_rate / ref_rate));
    report.set("wire_bytes", json!(export.wire_bytes));
    report.set("raw_bytes", json!(export.raw_bytes));
    report.set("apply_secs", json!(apply.secs));
    report.set("apply_rows_per_sec", json!(apply_rate));
    report.set("end_to_end_secs", json!(e2e_median_secs));
    report.set(
        "rounds",
        json!(rounds
            .iter()
            .map(|(copy, e2e)| json!({"copy_secs": copy, "end_to_end_secs": e2e}))
            .collect::<Vec<_>>()),
    );
    report.set("end_to_end_rows_per_sec", json!(e2e_rate));
    report.set("apply_vs_copy", json!(apply_rate / ref_rate));
    report.set("end_to_end_vs_copy", json!(e2e_vs_copy));
    report.set("load_average", json!(load_average()));
    report.set("server_peak_bytes", json!(server_peak));
    report.set("client_peak_bytes", json!(client_peak));
    report.set("machine", machine(&db).await);
    report.figure = Some(Figure {
        title: "rows/s per stage: 1 COPY (reference), 2 export, 3 apply, 4 end to end".into(),
        x_label: "stage".into(),
        y_label: "rows/s".into(),
        series: vec![Series {
            name: "rows/s".into(),
            points: vec![
                (1.0, ref_rate),
                (2.0, export_rate),
                (3.0, apply_rate),
                (4.0, e2e_rate),
            ],
        }],
    });
    report.target(
        format!(
            "end to end ≥ {} rows/s (1M rows in ≤ 10 s)",
            thousands(TARGET_ROWS_PER_SEC)
        ),
        e2e_rate >= TARGET_ROWS_PER_SEC,
    );
    report.target(
        format!(
            "end to end ≥ {TARGET_VS_COPY}× PostgreSQL's COPY TO STDOUT run just before it (median of {} rounds)",
            args.rounds
        ),
        e2e_vs_copy >= TARGET_VS_COPY,
    );
    let short: Vec<String> = std::iter::once(("replayed", replay_rows))
        .chain(e2e_rows.into_iter().map(|got| ("end-to-end", got)))
        .filter(|(_, got)| *got != args.rows)
        .map(|(what, got)| format!("the {what} replica holds {got} rows of {}", args.rows))
        .collect();
    if !short.is_empty() {
        report.failure = Some(short.join("; "));
    }
    drop(db);
    env.close().await?;
    Ok(report)
}

async fn raw_copy(db: &tokio_postgres::Client) -> anyhow::Result<(f64, u64)> {
    let started = Instant::now();
    let stream = db
        .copy_out("COPY (SELECT id, n, name, price, tags, doc, at FROM ONLY public.bench_items) TO STDOUT")
        .await?;
    futures_util::pin_mut!(stream);
    let mut bytes = 0u64;
    while let Some(data) = stream.next().await {
        bytes += data?.len() as u64;
    }
    Ok((started.elapsed().as_secs_f64(), bytes))
}

pub(crate) struct Export {
    pub(crate) secs: f64,
    pub(crate) rows: u64,
    pub(crate) wire_bytes: u64,
    pub(crate) raw_bytes: u64,
    /// Every frame from `welcome` to `snapshot_end`, for the replay.
    frames: Vec<Message>,
}

pub(crate) async fn receive_only(addr: &str) -> anyhow::Result<Export> {
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/api/sync")).await?;
    let hello = ClientMessage::Hello {
        protocol_version: PROTOCOL_VERSION,
        client_id: "bench-export".to_owned(),
        token: None,
        last_lsn: None,
        log_id: None,
        resync: Vec::new(),
        tables: None,
        repair: false,
        schema_version: None,
    };
    let started = Instant::now();
    socket
        .send(Message::Text(serde_json::to_string(&hello)?.into()))
        .await?;
    let mut export = Export {
        secs: 0.0,
        rows: 0,
        wire_bytes: 0,
        raw_bytes: 0,
        frames: Vec::new(),
    };
    while let Some(message) = socket.next().await {
        let message = message?;
        match &message {
            Message::Binary(bytes) => export.wire_bytes += bytes.len() as u64,
            Message::Text(text) => match serde_json::from_str::<ServerMessage>(text)? {
                ServerMessage::SnapshotTable(digest) => {
                    export.rows += digest.rows;
                    export.raw_bytes += digest.bytes;
                }
                ServerMessage::SnapshotEnd {} => {
                    export.secs = started.elapsed().as_secs_f64();
                    export.frames.push(message);
                    let done = ClientMessage::SnapshotDone {
                        refetch: Vec::new(),
                    };
                    socket
                        .send(Message::Text(serde_json::to_string(&done)?.into()))
                        .await?;
                    let _ = socket.close(None).await;
                    return Ok(export);
                }
                ServerMessage::Error { code, message, .. } => {
                    anyhow::bail!("the server refused: {code:?}: {message}")
                }
                _ => {}
            },
            _ => continue,
        }
        export.frames.push(message);
    }
    anyhow::bail!("the server closed before the snapshot ended")
}

/// Serves the recorded frames to one real client, then `caught_up`.
async fn replay_to_client(
    frames: Vec<Message>,
    db: &std::path::Path,
    exe: &std::path::Path,
) -> anyhow::Result<Synced> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let resume = frames.iter().find_map(|m| match m {
        Message::Text(t) => match serde_json::from_str::<ServerMessage>(t).ok()? {
            ServerMessage::SnapshotBegin { resume_lsn, .. } => Some(resume_lsn),
            _ => None,
        },
        _ => None,
    });
    // The recorded welcome's WAL position: the client is caught up once a
    // `caught_up` reaches it.
    let wal_lsn = frames.iter().find_map(|m| match m {
        Message::Text(t) => match serde_json::from_str::<ServerMessage>(t).ok()? {
            ServerMessage::Welcome { wal_lsn, .. } => wal_lsn,
            _ => None,
        },
        _ => None,
    });
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut socket = tokio_tungstenite::accept_async(tcp).await?;
        let _hello = socket.next().await;
        for frame in frames {
            socket.send(frame).await?;
        }
        // Wait for snapshot_done, then release the client.
        while let Some(message) = socket.next().await {
            if let Message::Text(text) = message? {
                if text.contains("snapshot_done") {
                    break;
                }
            }
        }
        let caught_up = ServerMessage::CaughtUp {
            lsn: resume.unwrap_or_default(),
            wal_lsn,
        };
        socket
            .send(Message::Text(serde_json::to_string(&caught_up)?.into()))
            .await?;
        while socket.next().await.is_some() {}
        Ok::<_, anyhow::Error>(())
    });
    let synced = sync_client(&format!("ws://{addr}"), db, exe).await?;
    server.abort();
    Ok(synced)
}

struct Synced {
    secs: f64,
    peak: u64,
}

/// `pgrelay client sync --exit-when-caught-up` on a fresh replica, timed,
/// with its memory peak sampled while it runs.
async fn sync_client(
    server: &str,
    db: &std::path::Path,
    exe: &std::path::Path,
) -> anyhow::Result<Synced> {
    let started = Instant::now();
    let mut child = tokio::process::Command::new(exe)
        .args([
            "client",
            "sync",
            "--exit-when-caught-up",
            "--server",
            server,
        ])
        .arg("--db")
        .arg(db)
        .env("PGRELAY_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting pgrelay client sync")?;
    let pid = child.id().context("the client has no pid")?;
    let mut peak = 0;
    let status = loop {
        if let Ok(bytes) = proc_bytes(pid, "VmHWM") {
            peak = peak.max(bytes);
        }
        tokio::select! {
            status = child.wait() => break status?,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    };
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(status.success(), "pgrelay client sync failed: {status}");
    Ok(Synced { secs, peak })
}

/// The 1-minute load average when the run ends (the machine is shared).
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn replica_rows(db: &std::path::Path) -> anyhow::Result<u64> {
    let conn = rusqlite::Connection::open(db)?;
    let n: i64 = conn.query_row("SELECT count(*) FROM bench_items", [], |r| r.get(0))?;
    Ok(u64::try_from(n)?)
}
