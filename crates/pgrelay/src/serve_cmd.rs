//! `pgrelay serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use pgrelay_pg::TableFilter;
use pgrelay_server::{parse_conflict, EventLogStorage, Server, ServerConfig};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// PostgreSQL to capture from (needs wal_level=logical). Without it,
    /// only the LiveStore event-log backend is served.
    #[arg(long, env = "PGRELAY_DATABASE_URL")]
    pub database_url: Option<String>,
    #[arg(long, env = "PGRELAY_LISTEN", default_value = "127.0.0.1:7171")]
    pub listen: SocketAddr,
    /// Tables to sync, comma-separated (`public.a,b`); default: every table in schema public.
    #[arg(long, env = "PGRELAY_TABLES", value_delimiter = ',')]
    pub tables: Option<Vec<String>>,
    /// Logical replication slot (its publication is named `<slot>_pub`).
    #[arg(long, env = "PGRELAY_SLOT", default_value = "pgrelay")]
    pub slot: String,
    /// How often to ping each client.
    #[arg(long, env = "PGRELAY_PING_INTERVAL", default_value = "15s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,
    /// Disconnect a client silent for this long.
    #[arg(long, env = "PGRELAY_IDLE_TIMEOUT", default_value = "45s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// How often to confirm the durable position to PostgreSQL.
    #[arg(long, env = "PGRELAY_STATUS_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub status_interval: Duration,
    /// Check client writes to a table against a version column
    /// (`table=column`, repeatable): a write based on an older version is
    /// rejected with the current row. Other tables: last write wins.
    #[arg(long = "conflict", env = "PGRELAY_CONFLICT", value_delimiter = ',', value_parser = parse_conflict)]
    pub conflicts: Vec<(String, String)>,
    /// How long applied change ids are remembered to recognise resends.
    #[arg(long, env = "PGRELAY_APPLIED_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub applied_retention: Duration,
    /// How long the change log keeps transactions (e.g. `7d`, `12h`). A
    /// replica further behind re-hydrates from a snapshot.
    #[arg(long, env = "PGRELAY_RETAIN", default_value = "7days", value_parser = humantime::parse_duration)]
    pub retain: Duration,
    /// Snapshots served at once to hydrating clients; others queue.
    #[arg(long, env = "PGRELAY_MAX_HYDRATIONS", default_value_t = 4)]
    pub max_hydrations: usize,
    #[command(flatten)]
    pub eventlog: EventLogArgs,
}

/// The LiveStore event-log backend (`/livestore`, `/websocket`).
#[derive(Args, Debug)]
pub struct EventLogArgs {
    /// Where LiveStore event logs live: `sqlite` (the --eventlog-db file) or
    /// `postgres` (the --database-url database, schema pgrelay).
    #[arg(long, env = "PGRELAY_EVENTLOG_STORE", default_value = "sqlite", value_parser = ["sqlite", "postgres"])]
    pub eventlog_store: String,
    /// The SQLite file of the event logs.
    #[arg(
        long,
        env = "PGRELAY_EVENTLOG_DB",
        default_value = "./pgrelay-events.sqlite"
    )]
    pub eventlog_db: PathBuf,
    /// SQLite `synchronous` for event logs: `full` syncs each acknowledged
    /// push to disk (survives power loss); `normal` survives a crash of
    /// pgrelay but not of the machine, and is much faster on slow disks.
    #[arg(long, env = "PGRELAY_EVENTLOG_SYNC", default_value = "full", value_parser = ["full", "normal"])]
    pub eventlog_sync: String,
    /// Require LiveStore clients to send this token as `payload.authToken`
    /// (`makeWsSync` with `syncPayload: { authToken }`).
    #[arg(long, env = "PGRELAY_EVENTLOG_AUTH_TOKEN", hide_env_values = true)]
    pub eventlog_auth_token: Option<String>,
    /// Secret for the admin API (`pgrelay admin ...`); without it the admin API is off.
    #[arg(long, env = "PGRELAY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

impl ServeArgs {
    pub fn into_config(self) -> ServerConfig {
        let mut config = match self.database_url {
            Some(url) => ServerConfig::new(url),
            None => ServerConfig::eventlog_only(),
        };
        config.listen = self.listen;
        config.tables = match self.tables {
            Some(list) if !list.is_empty() => TableFilter::Only(list),
            _ => TableFilter::AllPublic,
        };
        config.slot = self.slot;
        config.ping_interval = self.ping_interval;
        config.idle_timeout = self.idle_timeout;
        config.status_interval = self.status_interval;
        config.conflicts = self.conflicts;
        config.applied_retention = self.applied_retention;
        config.retain = self.retain;
        config.max_hydrations = self.max_hydrations;
        config.admin_token = self.eventlog.admin_token;
        config.eventlog.auth_token = self.eventlog.eventlog_auth_token;
        config.eventlog.sqlite_sync_full = self.eventlog.eventlog_sync == "full";
        config.eventlog.storage = match self.eventlog.eventlog_store.as_str() {
            "postgres" => EventLogStorage::Postgres,
            _ => EventLogStorage::Sqlite(Some(self.eventlog.eventlog_db)),
        };
        config
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut server = Server::start(args.into_config()).await?;
    // Tests and scripts read this line to learn the bound port.
    println!("pgrelay listening on {}", server.local_addr());
    let stop = server.shutdown_handle();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = stop.send(true);
    });
    server.wait().await?;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
