//! `pgrelay client ...`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use pgrelay_client::{ClientConfig, Event, Replica, SyncClient, TokenProvider};
use secrecy::SecretString;

#[derive(Args, Debug)]
pub struct SyncArgs {
    /// Server address, e.g. ws://127.0.0.1:7171, or wss://sync.example.com
    /// for TLS; repeat it (or separate by commas) for several nodes, tried
    /// in turn when a connection fails.
    #[arg(
        long,
        env = "PGRELAY_SERVER",
        default_value = "ws://127.0.0.1:7171",
        value_delimiter = ','
    )]
    pub server: Vec<String>,
    /// For wss://: a PEM file of certificate authorities to trust besides
    /// the system's (the CA that signed a self-run server's certificate).
    #[arg(long, env = "PGRELAY_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// The replica's SQLite file (created when missing).
    #[arg(long, env = "PGRELAY_DB")]
    pub db: PathBuf,
    #[arg(long, env = "PGRELAY_CLIENT_ID")]
    pub client_id: Option<String>,
    #[arg(long, env = "PGRELAY_TOKEN", hide_env_values = true)]
    pub token: Option<SecretString>,
    /// Sync only these tables (comma-separated, `todos` or `public.todos`);
    /// default: every table the server syncs. Choose them for a new replica.
    #[arg(long, env = "PGRELAY_CLIENT_TABLES", value_delimiter = ',')]
    pub tables: Option<Vec<String>>,
    /// Read the token from this file before every connection, so a
    /// refreshed token is used after the old one expires.
    #[arg(long, env = "PGRELAY_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Sync until the replica holds everything PostgreSQL had committed when
    /// it connected (and push the outbox), then exit 0. A refused token
    /// exits non-zero with the server's reason (after reading --token-file
    /// once more).
    #[arg(long, env = "PGRELAY_EXIT_WHEN_CAUGHT_UP")]
    pub exit_when_caught_up: bool,
    #[arg(long, env = "PGRELAY_PING_INTERVAL", default_value = "15s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,
    #[arg(long, env = "PGRELAY_IDLE_TIMEOUT", default_value = "45s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
}

pub async fn sync(args: SyncArgs) -> anyhow::Result<()> {
    let mut config = ClientConfig::new(args.server.join(","), args.db);
    config.ca_file = args.ca_file;
    config.client_id = args.client_id;
    config.token = args.token;
    config.tables = args.tables.filter(|t| !t.is_empty());
    config.token_provider = args.token_file.map(TokenProvider::file);
    config.exit_when_caught_up = args.exit_when_caught_up;
    config.ping_interval = args.ping_interval;
    config.idle_timeout = args.idle_timeout;
    let client = SyncClient::open(config).await?;
    let mut events = client.subscribe();
    tokio::spawn(async move {
        let mut progress = HydrationProgress::default();
        loop {
            let event = match events.recv().await {
                Ok(event) => event,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            };
            match event {
                Event::Connected { head } => tracing::info!(%head, "connected"),
                Event::CaughtUp { lsn } => tracing::info!(%lsn, "caught up"),
                Event::Applied {
                    lsn,
                    transactions,
                    changes,
                    lag_ms,
                    ..
                } => {
                    tracing::debug!(%lsn, transactions, changes, lag_ms, "applied")
                }
                Event::SchemaUnsupported { table, reason } => {
                    tracing::warn!(%table, %reason, "table not synced")
                }
                Event::Disconnected { error, retry_in } => {
                    tracing::warn!(%error, ?retry_in, "disconnected")
                }
                Event::WriteApplied {
                    tx_id,
                    changes,
                    latency,
                    ..
                } => tracing::debug!(%tx_id, changes, ?latency, "local write applied"),
                Event::WriteRejected { tx_id, reason } => {
                    tracing::warn!(%tx_id, %reason, "local write rejected")
                }
                Event::MigrationApplied { version, direction } => {
                    tracing::info!(version, ?direction, "client migration ran")
                }
                Event::MigrationFailed {
                    version,
                    error,
                    attempt,
                    retry_in,
                } => {
                    tracing::warn!(version, %error, attempt, ?retry_in, "client migration failed; retrying")
                }
                Event::WriteRetry { tx_id, reason } => {
                    tracing::info!(%tx_id, %reason, "local write will be retried")
                }
                Event::Hydrating {
                    rows,
                    bytes,
                    estimated_rows,
                    tables,
                    tables_done,
                } => progress.update(rows, bytes, estimated_rows, tables, tables_done),
                Event::Hydrated {
                    full,
                    tables,
                    rows,
                    bytes,
                    elapsed,
                    refetched,
                } => {
                    progress.finish();
                    tracing::info!(
                        full,
                        ?tables,
                        rows,
                        mb = megabytes(bytes),
                        ?elapsed,
                        ?refetched,
                        "snapshot loaded"
                    );
                }
                Event::Repaired {
                    tables,
                    rows_removed,
                    rows_received,
                    bytes,
                    rounds,
                    elapsed,
                    refetch,
                } => tracing::info!(
                    ?tables,
                    rows_removed,
                    rows_received,
                    bytes,
                    rounds,
                    ?elapsed,
                    ?refetch,
                    "replica repaired range by range"
                ),
            }
        }
    });
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = stop.send(true);
    });
    client.run(stopped).await?;
    Ok(())
}

/// A progress bar on stderr while a snapshot loads: rows, MB, rate, ETA.
#[derive(Default)]
struct HydrationProgress {
    bar: Option<indicatif::ProgressBar>,
}

impl HydrationProgress {
    fn update(&mut self, rows: u64, bytes: u64, estimate: u64, tables: usize, done: usize) {
        let bar = self.bar.get_or_insert_with(|| {
            let bar = indicatif::ProgressBar::new(estimate.max(1));
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "hydrating {bar:30} {human_pos}/{human_len} rows  {msg}  {per_sec}  ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        if rows > bar.length().unwrap_or(0) {
            bar.set_length(rows);
        }
        bar.set_position(rows);
        bar.set_message(format!(
            "{:.1} MB  tables {done}/{tables}",
            megabytes(bytes)
        ));
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// `pgrelay client reset`: the next sync hydrates the replica from a fresh
/// snapshot. Unsent local writes are kept and pushed afterwards.
pub async fn reset(db: &Path) -> anyhow::Result<()> {
    if !db.exists() {
        anyhow::bail!("no replica at {}", db.display());
    }
    let replica = Replica::open(db)?;
    replica.reset().await?;
    println!("reset: the next `pgrelay client sync` loads a fresh snapshot");
    Ok(())
}

pub async fn status(db: &Path) -> anyhow::Result<()> {
    if !db.exists() {
        anyhow::bail!("no replica at {}", db.display());
    }
    let replica = Replica::open(db)?;
    let status = replica.status().await?;
    println!("{}", serde_json::to_string_pretty(&status)?);
    Ok(())
}

/// `pgrelay client exec`: runs SQL on the replica; its writes to synced
/// tables go to the outbox (pushed by `pgrelay client sync`).
pub async fn exec(db: &Path, sql: &str) -> anyhow::Result<()> {
    if !db.exists() {
        anyhow::bail!(
            "no replica at {}; run `pgrelay client sync` once first",
            db.display()
        );
    }
    let replica = Replica::open(db)?;
    let executed = replica.execute(sql).await?;
    println!("{}", serde_json::to_string(&executed)?);
    Ok(())
}

#[derive(Args, Debug)]
pub struct OutboxArgs {
    #[arg(long, env = "PGRELAY_DB")]
    pub db: PathBuf,
    /// Only entries with this status: pending, sent, applied, rejected.
    #[arg(long)]
    pub status: Option<String>,
    /// Entries to show at most (the newest).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `pgrelay client outbox`: the local writes and what became of them.
pub async fn outbox(args: OutboxArgs) -> anyhow::Result<()> {
    if !args.db.exists() {
        anyhow::bail!("no replica at {}", args.db.display());
    }
    if let Some(status) = &args.status {
        if !["pending", "sent", "applied", "rejected"].contains(&status.as_str()) {
            anyhow::bail!("--status {status:?}: one of pending, sent, applied, rejected");
        }
    }
    let replica = Replica::open(&args.db)?;
    let report = replica.outbox(args.status, args.limit).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "pending {}  sent {}  applied {}  rejected {}",
        report.pending, report.sent, report.applied, report.rejected
    );
    if report.entries.is_empty() {
        return Ok(());
    }
    println!(
        "{:>6}  {:<8}  {:<7}  {:<20}  {:>7}  {:<38}  error",
        "seq", "status", "op", "table", "retries", "transaction"
    );
    for e in &report.entries {
        println!(
            "{:>6}  {:<8}  {:<7}  {:<20}  {:>7}  {:<38}  {}",
            e.seq,
            e.status,
            e.op,
            e.table,
            e.retries,
            e.tx_id,
            e.error.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

/// Bytes as megabytes, for progress shown to one decimal.
#[allow(
    clippy::cast_precision_loss,
    reason = "shown to one decimal: the lost precision is never seen"
)]
fn megabytes(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}
