//! `pgrelay bench`: measures capture against PostgreSQL's own decoder,
//! delivery latency, fan-out and the memory of idle connections, each in
//! one run on a fresh database, printing a table, and optionally writing
//! JSON and an SVG figure.

// Figures are floats for statistics and display: counts past 2^53 would
// lose units, which no run comes near.
#![allow(
    clippy::cast_precision_loss,
    reason = "statistics and display of measured figures"
)]

mod capture;
mod eventlog;
mod eventlog_stores;
mod eventlog_wire;
mod failover;
mod fanout;
mod fleet;
mod hydrate;
mod idle;
mod latency;
mod plot;
mod processes;
mod reader;
mod repair;
mod replicas;
mod report;
mod spread;
mod stages;
mod writes;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use pgrelay_testkit::{PrivateCluster, TestDatabase};

pub use report::Report;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Capture throughput: pgrelay into its change log vs pg_recvlogical to /dev/null.
    Capture(capture::CaptureArgs),
    /// PostgreSQL commit → client SQLite commit latency with many clients.
    Latency(latency::LatencyArgs),
    /// Aggregate row deliveries per second to many client replicas.
    Fanout(fanout::FanoutArgs),
    /// Server memory per idle, handshaken WebSocket connection.
    Idle(idle::IdleArgs),
    /// Client writes through the outbox: changes applied/s and write → commit time.
    Writes(writes::WritesArgs),
    /// A fresh replica hydrated from a snapshot: export and apply rows/s, memory peaks.
    Hydrate(hydrate::HydrateArgs),
    /// A replica away while 0.1 % of its rows changed: repaired range by range vs hydrated whole.
    Repair(repair::RepairArgs),
    /// LiveStore event logs: events/s accepted on one store, push → receipt at many live clients.
    Eventlog(eventlog::EventLogArgs),
    /// Several nodes on one slot: time to a new capturing node after SIGKILL of the capturer.
    Failover(failover::FailoverArgs),
    /// Client processes for `--light` and `--processes` runs (started by the bench itself).
    #[command(hide = true)]
    Reader(reader::ReaderArgs),
}

/// Options every bench takes.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// A PostgreSQL server with wal_level=logical; the bench creates and drops
    /// its own database there. Default: a private PostgreSQL, as the demo.
    #[arg(long, env = "PGRELAY_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also draw the bench's figure to this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    let (common, report) = match command {
        BenchCommand::Reader(args) => return reader::run(args).await,
        BenchCommand::Capture(args) => (args.common.clone(), capture::run(args).await?),
        BenchCommand::Latency(args) => (args.common.clone(), Box::pin(latency::run(args)).await?),
        BenchCommand::Fanout(args) => (args.common.clone(), fanout::run(args).await?),
        BenchCommand::Idle(args) => (args.common.clone(), idle::run(args).await?),
        BenchCommand::Writes(args) => (args.common.clone(), writes::run(args).await?),
        BenchCommand::Hydrate(args) => (args.common.clone(), hydrate::run(args).await?),
        BenchCommand::Repair(args) => (args.common.clone(), repair::run(args).await?),
        BenchCommand::Eventlog(args) => (args.common.clone(), eventlog::run(args).await?),
        BenchCommand::Failover(args) => (args.common.clone(), failover::run(args).await?),
    };
    print!("{}", report.render_table());
    if let Some(path) = &common.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report.to_json())?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("results written to {}", path.display());
    }
    if let Some(path) = &common.plot {
        plot::draw(&report, path).with_context(|| format!("drawing {}", path.display()))?;
        println!("figure written to {}", path.display());
    }
    report.verdict()
}

/// The database a bench runs in: fresh, on the given server or on a private
/// cluster started for the run; dropped (with its slots) at the end.
pub(crate) struct BenchDb {
    pub(crate) db: TestDatabase,
    /// Declared after `db` so the database is dropped before the cluster stops.
    _cluster: Option<PrivateCluster>,
}

impl BenchDb {
    pub(crate) async fn open(database_url: Option<&str>) -> anyhow::Result<BenchDb> {
        let (admin, cluster) = match database_url {
            Some(url) => (url.to_owned(), None),
            None => {
                eprintln!("starting a private PostgreSQL with wal_level=logical ...");
                let cluster = tokio::task::spawn_blocking(PrivateCluster::start).await??;
                (cluster.admin_url(), Some(cluster))
            }
        };
        let db = TestDatabase::create_on(&admin)
            .await
            .context("creating the bench database")?;
        Ok(BenchDb {
            db,
            _cluster: cluster,
        })
    }

    /// Opens the bench database and runs `ddl` (the bench's tables) in it.
    pub(crate) async fn with_tables(
        database_url: Option<&str>,
        ddl: &str,
    ) -> anyhow::Result<(BenchDb, tokio_postgres::Client)> {
        let env = BenchDb::open(database_url).await?;
        let db = env.connect().await?;
        db.batch_execute(ddl).await?;
        Ok((env, db))
    }

    pub(crate) async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        Ok(self.db.connect().await?)
    }

    pub(crate) fn url(&self) -> &str {
        self.db.url()
    }

    pub(crate) async fn close(self) -> anyhow::Result<()> {
        self.db.drop_database().await?;
        Ok(())
    }
}

/// An in-process server on `slot`, syncing only `table`, on a free port.
pub(crate) async fn start_server(
    url: &str,
    slot: &str,
    table: &str,
) -> anyhow::Result<pgrelay_server::Server> {
    start_server_with_auth(url, slot, table, None).await
}

/// As [`start_server`], with `--auth` when `auth` is given.
pub(crate) async fn start_server_with_auth(
    url: &str,
    slot: &str,
    table: &str,
    auth: Option<pgrelay_server::AuthConfig>,
) -> anyhow::Result<pgrelay_server::Server> {
    let mut config = pgrelay_server::ServerConfig::new(url);
    config.listen = "127.0.0.1:0".parse()?;
    config.slot = slot.to_owned();
    config.tables = pgrelay_pg::TableFilter::Only(vec![table.to_owned()]);
    // Fleets connect from one address all at once.
    config.connect_rate = 0.0;
    config.message_rate = 0.0;
    config.max_connections = 1_000_000;
    config.auth = auth;
    Ok(pgrelay_server::Server::start(config).await?)
}

/// `pgrelay serve` as a child process (so its memory can be read), syncing
/// only `table`; returns it and its `host:port`.
pub(crate) async fn spawn_server(
    url: &str,
    slot: &str,
    table: &str,
    extra_args: &[&str],
) -> anyhow::Result<(tokio::process::Child, String)> {
    spawn_server_on(url, slot, table, extra_args, None).await
}

/// As [`spawn_server`], pinned to the CPUs `cpus` when given.
pub(crate) async fn spawn_server_on(
    url: &str,
    slot: &str,
    table: &str,
    extra_args: &[&str],
    cpus: Option<&str>,
) -> anyhow::Result<(tokio::process::Child, String)> {
    use tokio::io::AsyncBufReadExt;
    let exe = std::env::current_exe().context("finding the pgrelay binary")?;
    let mut child = pinned(&exe, cpus)
        .args(["serve", "--database-url", url, "--listen", "127.0.0.1:0"])
        .args(["--slot", slot, "--tables", table])
        .args(extra_args)
        .env("PGRELAY_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting pgrelay serve")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.split("listening on ").nth(1) {
                return Ok::<_, anyhow::Error>(rest.trim().trim_start_matches("ws://").to_owned());
            }
        }
        anyhow::bail!("pgrelay serve exited before listening")
    })
    .await
    .context("waiting for pgrelay serve to listen")??;
    Ok((child, addr))
}

/// A command running `exe`, through `taskset -c CPUS` when `cpus` is
/// given: `taskset` sets the affinity and then executes `exe` in its own
/// process, so the child's pid is `exe`'s (its /proc figures are the
/// program's own).
pub(crate) fn pinned(exe: &std::path::Path, cpus: Option<&str>) -> tokio::process::Command {
    match cpus {
        Some(list) => {
            let mut command = tokio::process::Command::new("taskset");
            command.arg("-c").arg(list).arg(exe);
            command
        }
        None => tokio::process::Command::new(exe),
    }
}

/// A memory figure of a process from /proc (`VmRSS`, or `VmHWM` for its
/// peak), in bytes.
pub(crate) fn proc_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .with_context(|| format!("no {field} in /proc status"))?;
    Ok(kib * 1024)
}

/// PostgreSQL's `pg_current_wal_lsn()`.
pub(crate) async fn current_wal_lsn(
    db: &tokio_postgres::Client,
) -> anyhow::Result<pgrelay_protocol::Lsn> {
    let row = db.query_one("SELECT pg_current_wal_lsn()", &[]).await?;
    Ok(pgrelay_protocol::Lsn(u64::from(
        row.get::<_, tokio_postgres::types::PgLsn>(0),
    )))
}

/// What a bench reports about where it ran.
pub(crate) async fn machine(db: &tokio_postgres::Client) -> serde_json::Value {
    let pg = match db.query_one("SHOW server_version", &[]).await {
        Ok(row) => row.get::<_, String>(0),
        Err(_) => String::from("unknown"),
    };
    serde_json::json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "postgres": pg,
        "pgrelay": env!("CARGO_PKG_VERSION"),
    })
}

/// Read and write system calls a process made so far (`/proc/PID/io`).
pub(crate) fn syscalls(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    Some(field("syscr:")? + field("syscw:")?)
}

/// The benches' WebSocket clients read as pgrelay's own client does: a
/// 16 KiB buffer, since tungstenite zero-fills its whole read buffer
/// (128 KiB by default) before every read, 2-3 µs a frame.
pub(crate) fn client_socket_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(16 * 1024)
}
