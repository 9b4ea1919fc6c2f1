//! `pgrelay serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use pgrelay_pg::TableFilter;
use pgrelay_server::{parse_conflict, AuthConfig, JwtKey, Server, ServerConfig};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// PostgreSQL to capture from (needs wal_level=logical).
    #[arg(long, env = "PGRELAY_DATABASE_URL")]
    pub database_url: String,
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
    /// Require a token from every client: `jwt`.
    #[arg(long, env = "PGRELAY_AUTH", value_parser = ["jwt"])]
    pub auth: Option<String>,
    /// HS256: a file holding the shared secret (at least 32 bytes; a
    /// trailing newline is ignored).
    #[arg(long, env = "PGRELAY_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// RS256 or ES256: the PEM public key tokens are signed for.
    #[arg(long, env = "PGRELAY_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// Accept only tokens with this `iss`.
    #[arg(long, env = "PGRELAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Accept only tokens with this `aud`.
    #[arg(long, env = "PGRELAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Row rules per table (`rules.toml`); needs --auth.
    #[arg(long, env = "PGRELAY_RULES")]
    pub rules: Option<PathBuf>,
    /// How long the change log keeps transactions (e.g. `7d`, `12h`). A
    /// replica further behind re-hydrates from a snapshot.
    #[arg(long, env = "PGRELAY_RETAIN", default_value = "7days", value_parser = humantime::parse_duration)]
    pub retain: Duration,
    /// Snapshots served at once to hydrating clients; others queue.
    #[arg(long, env = "PGRELAY_MAX_HYDRATIONS", default_value_t = 4)]
    pub max_hydrations: usize,
}

impl ServeArgs {
    /// `--auth` and its key and rules files, read and checked.
    fn auth_config(&self) -> anyhow::Result<Option<AuthConfig>> {
        if self.auth.is_none() {
            anyhow::ensure!(
                self.rules.is_none()
                    && self.jwt_secret_file.is_none()
                    && self.jwt_public_key.is_none(),
                "--rules, --jwt-secret-file and --jwt-public-key need --auth jwt"
            );
            return Ok(None);
        }
        let key = match (&self.jwt_secret_file, &self.jwt_public_key) {
            (Some(path), None) => {
                let mut secret = std::fs::read(path)
                    .with_context(|| format!("reading --jwt-secret-file {}", path.display()))?;
                while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    secret.pop();
                }
                JwtKey::Secret(secret)
            }
            (None, Some(path)) => JwtKey::PublicKeyPem(
                std::fs::read(path)
                    .with_context(|| format!("reading --jwt-public-key {}", path.display()))?,
            ),
            _ => anyhow::bail!(
                "--auth jwt needs exactly one of --jwt-secret-file and --jwt-public-key"
            ),
        };
        let mut config = AuthConfig::new(key);
        config.issuer = self.jwt_issuer.clone();
        config.audience = self.jwt_audience.clone();
        if let Some(path) = &self.rules {
            config.rules = Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading --rules {}", path.display()))?,
            );
        }
        Ok(Some(config))
    }

    pub fn into_config(self) -> anyhow::Result<ServerConfig> {
        let auth = self.auth_config()?;
        let mut config = ServerConfig::new(self.database_url);
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
        config.auth = auth;
        Ok(config)
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut server = Server::start(args.into_config()?).await?;
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
