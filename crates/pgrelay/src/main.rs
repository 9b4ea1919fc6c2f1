//! The `pgrelay` command: server, client, verify, demo.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};

/// glibc's malloc serialises many threads on a few arenas (the client
/// fleet in `bench` runs one SQLite thread per replica); mimalloc keeps
/// per-thread heaps and returns memory to the OS more readily.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "bench")]
use pgrelay::bench;
use pgrelay::cmd::{admin, chaos, client, demo, doctor, migrate, serve, verify};

#[derive(Parser)]
#[command(
    name = "pgrelay",
    version,
    about = "Keep SQLite replicas in real time sync with PostgreSQL"
)]
struct Cli {
    /// Log lines as text (default) or as JSON objects, one a line.
    #[arg(
        long,
        global = true,
        env = "PGRELAY_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run
enum Command {
    /// Capture PostgreSQL's changes and stream them to clients.
    Serve(serve::ServeArgs),
    /// Work with a local replica.
    #[command(subcommand)]
    Client(ClientCommand),
    /// Compare a replica with PostgreSQL, table by table (row count and checksum).
    Verify(VerifyArgs),
    /// Run the whole pipeline on a private PostgreSQL: server, two clients, a writer, verify.
    Demo(demo::DemoArgs),
    /// Check PostgreSQL for what would break syncing (same flags as serve); exits 1 on errors.
    Doctor(doctor::DoctorArgs),
    /// The application's schema migrations (PostgreSQL and replicas): new, up, down, status.
    #[command(subcommand)]
    Migrate(migrate::MigrateCommand),
    /// Measure capture, delivery latency, fan-out and idle memory.
    #[cfg(feature = "bench")]
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Administer a running server: its clients, LiveStore stores (needs its --admin-token).
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Inject faults (nodes killed, paused, cut off; PostgreSQL restarted; clients
    /// killed) under load, then check nothing was lost, doubled or torn.
    Chaos(chaos::ChaosArgs),
    /// One client of `pgrelay chaos` (run by it).
    #[command(name = "chaos-client", hide = true)]
    ChaosClient(chaos::ChaosClientArgs),
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Sync a replica with a server (forever, or until caught up).
    Sync(client::SyncArgs),
    /// Print a replica's client id, LSN and tables as JSON.
    Status {
        #[arg(long, env = "PGRELAY_DB")]
        db: PathBuf,
    },
    /// Run SQL on a replica (works offline); writes to synced tables are
    /// queued in the outbox as one client transaction and pushed by `sync`.
    Exec {
        #[arg(long, env = "PGRELAY_DB")]
        db: PathBuf,
        /// One or more SQL statements.
        sql: String,
    },
    /// Show the outbox of local writes: pending, sent, applied, rejected (with reasons).
    Outbox(client::OutboxArgs),
    /// Forget the replica's position: the next sync loads a fresh snapshot
    /// (unsent local writes are kept).
    Reset {
        #[arg(long, env = "PGRELAY_DB")]
        db: PathBuf,
    },
}

#[derive(Args)]
struct VerifyArgs {
    #[arg(long, env = "PGRELAY_DATABASE_URL")]
    database_url: SecretString,
    #[arg(long, env = "PGRELAY_DB")]
    db: PathBuf,
    /// Only these tables (comma-separated); default: every table in the replica.
    #[arg(long, env = "PGRELAY_TABLES", value_delimiter = ',')]
    tables: Option<Vec<String>>,
    /// For a table that differs, also list the differing rows (by key)
    /// under each differing key range.
    #[arg(long)]
    rows: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Client(ClientCommand::Sync(args)) => client::sync(args).await,
            Command::Client(ClientCommand::Status { db }) => client::status(&db).await,
            Command::Client(ClientCommand::Exec { db, sql }) => client::exec(&db, &sql).await,
            Command::Client(ClientCommand::Outbox(args)) => client::outbox(args).await,
            Command::Client(ClientCommand::Reset { db }) => client::reset(&db).await,
            Command::Verify(args) => {
                let mut report = verify::verify(
                    args.database_url.expose_secret(),
                    &args.db,
                    args.tables.as_deref(),
                )
                .await?;
                if !report.all_match() {
                    verify::explain(
                        args.database_url.expose_secret(),
                        &args.db,
                        &mut report,
                        args.rows,
                    )
                    .await?;
                }
                print!("{}", report.render_table());
                if report.all_match() {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("the replica differs from PostgreSQL"))
                }
            }
            Command::Demo(args) => demo::run(args).await,
            Command::Doctor(args) => doctor::run(args).await,
            Command::Migrate(command) => migrate::run(command).await,
            #[cfg(feature = "bench")]
            Command::Bench(command) => bench::run(command).await,
            Command::Admin(command) => admin::run(command).await,
            Command::Chaos(args) => chaos::run(args).await,
            Command::ChaosClient(args) => chaos::run_client(args).await,
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGRELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        // Each line carries the fields of its spans (a session's client_id
        // and lsn) next to the event's own.
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .flatten_event(true)
            .init(),
    }
}
