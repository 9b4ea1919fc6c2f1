//! `pgrelay serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use pgrelay_eventlog::{
    AdminToken, EventLog, EventLogConfig, EventLogHost, EventLogStorage, OpenAccess, SharedToken,
    StoreAccess,
};
use pgrelay_pg::TableFilter;
use pgrelay_server::{parse_conflict, AuthConfig, JwtKey, Server, ServerConfig};
use secrecy::SecretString;
use tokio::sync::watch;

use super::eventlog_host::{EventLogArgs, EventLogAuth, JwtStoreAccess, ServerLimits};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// PostgreSQL to capture from (needs wal_level=logical). Without it,
    /// only the LiveStore event-log backend is served.
    #[arg(long, env = "PGRELAY_DATABASE_URL")]
    pub database_url: Option<SecretString>,
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
    /// How long pgrelay.audit_log keeps an entry; older ones are deleted hourly.
    #[arg(long, env = "PGRELAY_AUDIT_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub audit_retention: Duration,
    /// Require a token from every client: `jwt`.
    #[arg(long, env = "PGRELAY_AUTH", value_parser = ["jwt"])]
    pub auth: Option<String>,
    /// HS256: a file holding the shared secret (at least 32 bytes; a trailing newline is ignored).
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
    /// The token claim that owns client ids: an id first used with a token
    /// belongs to its value of this claim; other values are refused it.
    #[arg(long, env = "PGRELAY_CLIENT_ID_CLAIM", default_value = "sub")]
    pub client_id_claim: String,
    /// Row rules per table (`rules.toml`); needs --auth.
    #[arg(long, env = "PGRELAY_RULES")]
    pub rules: Option<PathBuf>,
    /// How long the change log keeps transactions (e.g. `7d`, `12h`). A
    /// replica further behind re-hydrates from a snapshot.
    #[arg(long, env = "PGRELAY_RETAIN", default_value = "7days", value_parser = humantime::parse_duration)]
    pub retain: Duration,
    /// Do not keep range digests of each table in memory: every repair
    /// then reads every row of its tables (docs/repair.md).
    #[arg(long, env = "PGRELAY_NO_KEPT_DIGESTS")]
    pub no_kept_digests: bool,
    /// Snapshots served at once to hydrating clients; others queue.
    #[arg(long, env = "PGRELAY_MAX_HYDRATIONS", default_value_t = 4)]
    pub max_hydrations: usize,
    /// Open connections at most (sync sessions and HTTP connections); more are answered 503 and closed.
    #[arg(long, env = "PGRELAY_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Close an HTTP connection that sends no request (head) for this long, new or kept alive.
    #[arg(long, env = "PGRELAY_HTTP_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub http_idle_timeout: Duration,
    /// Sync connection attempts per second per IP address (0: no limit); more are answered 429.
    #[arg(long, env = "PGRELAY_CONNECT_RATE", default_value_t = 20.0)]
    pub connect_rate: f64,
    /// Connection attempts an IP address may make at once before the rate applies.
    #[arg(long, env = "PGRELAY_CONNECT_BURST", default_value_t = 100)]
    pub connect_burst: u32,
    /// Frames per second one connection may send (0: no limit); over it the connection is closed with rate_limited (4429).
    #[arg(long, env = "PGRELAY_MESSAGE_RATE", default_value_t = 1_000.0)]
    pub message_rate: f64,
    /// Frames a connection may send at once before the rate applies.
    #[arg(long, env = "PGRELAY_MESSAGE_BURST", default_value_t = 2_000)]
    pub message_burst: u32,
    /// Client registry: `redis://host:port[/db]` to share it between nodes; embedded when left out.
    #[arg(long, env = "PGRELAY_REGISTRY")]
    pub registry: Option<SecretString>,
    /// Prefix of the registry's Redis keys.
    #[arg(long, env = "PGRELAY_REGISTRY_PREFIX", default_value = "pgrelay:")]
    pub registry_prefix: String,
    /// A client registration not refreshed for this long expires.
    #[arg(long, env = "PGRELAY_REGISTRY_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub registry_ttl: Duration,
    /// How often live clients' registrations are refreshed.
    #[arg(long, env = "PGRELAY_REGISTRY_REFRESH", default_value = "10s", value_parser = humantime::parse_duration)]
    pub registry_refresh: Duration,
    /// This node's name in the registry (default: host name and port).
    #[arg(long, env = "PGRELAY_NODE")]
    pub node: Option<String>,
    /// Turns the admin API on, guarded by this token (at least 16 characters).
    #[arg(long, env = "PGRELAY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<SecretString>,
    /// `/ready` fails while replication lags more than this.
    #[arg(long, env = "PGRELAY_READY_MAX_LAG", default_value = "60s", value_parser = humantime::parse_duration)]
    pub ready_max_lag: Duration,
    /// Not ready (and logged) when the WAL moves on and the slot's confirmed position does not for this long.
    #[arg(long, env = "PGRELAY_STALL_AFTER", default_value = "60s", value_parser = humantime::parse_duration)]
    pub stall_after: Duration,
    /// How often WAL position, slot and change log size are measured.
    #[arg(long, env = "PGRELAY_MONITOR_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub monitor_interval: Duration,
    /// On SIGTERM or Ctrl-C, how long open sessions get to close.
    #[arg(long, env = "PGRELAY_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    #[command(flatten)]
    pub tls: super::tls::TlsArgs,
    #[command(flatten)]
    pub capture: super::capture::CaptureArgs,
    #[command(flatten)]
    pub eventlog: EventLogArgs,
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
        config.owner_claim = self.client_id_claim.clone();
        if let Some(path) = &self.rules {
            config.rules = Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading --rules {}", path.display()))?,
            );
        }
        Ok(Some(config))
    }

    pub fn into_config(self) -> anyhow::Result<ServeConfig> {
        let auth = self.auth_config()?;
        let mut config = match self.database_url.clone() {
            Some(url) => ServerConfig::new(url),
            None => ServerConfig::without_database(),
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
        config.audit_retention = self.audit_retention;
        config.retain = self.retain;
        config.max_hydrations = self.max_hydrations;
        config.kept_digests = !self.no_kept_digests;
        config.max_connections = self.max_connections;
        config.http_idle_timeout = self.http_idle_timeout;
        config.connect_rate = self.connect_rate;
        config.connect_burst = self.connect_burst;
        config.message_rate = self.message_rate;
        config.message_burst = self.message_burst;
        config.registry = self.registry;
        config.registry_prefix = self.registry_prefix;
        config.registry_ttl = self.registry_ttl;
        config.registry_refresh = self.registry_refresh;
        config.node = self.node;
        config.admin_token = self.admin_token;
        config.ready_max_lag = self.ready_max_lag;
        config.stall_after = self.stall_after;
        config.monitor_interval = self.monitor_interval;
        config.shutdown_grace = self.shutdown_grace;
        self.capture.apply(&mut config);
        config.auth = auth;
        config.tls = self.tls.files();
        let mut eventlog = EventLogConfig {
            idle_timeout: config.idle_timeout,
            send_timeout: config.send_timeout,
            ..EventLogConfig::default()
        };
        let eventlog_auth = match self.eventlog.eventlog_auth.as_deref() {
            Some("jwt") => Some(EventLogAuth::Jwt {
                claim: self.eventlog.eventlog_store_claim,
            }),
            Some("token") => Some(EventLogAuth::Token),
            Some(_) => Some(EventLogAuth::None),
            None if config.auth.is_some() => Some(EventLogAuth::Jwt {
                claim: self.eventlog.eventlog_store_claim,
            }),
            None => None,
        };
        anyhow::ensure!(
            self.eventlog.eventlog_max_stores > 0,
            "configuration: --eventlog-max-stores must be at least 1"
        );
        eventlog.max_stores = self.eventlog.eventlog_max_stores;
        eventlog.allow_stores = self.eventlog.eventlog_allow_stores;
        eventlog.auth_token = self.eventlog.eventlog_auth_token;
        eventlog.sqlite_sync_full = self.eventlog.eventlog_sync == "full";
        eventlog.storage = match self.eventlog.eventlog_store.as_str() {
            "postgres" => match self.database_url {
                Some(url) => EventLogStorage::Postgres(url),
                None => {
                    anyhow::bail!("configuration: --eventlog-store postgres needs --database-url")
                }
            },
            _ => EventLogStorage::Sqlite(Some(self.eventlog.eventlog_db)),
        };
        Ok(ServeConfig {
            server: config,
            eventlog,
            eventlog_auth,
        })
    }
}

/// What `pgrelay serve` runs on one listener: the row sync (with a
/// database URL) and the LiveStore event-log backend.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub server: ServerConfig,
    pub eventlog: EventLogConfig,
    /// `None`: `jwt` under `--auth jwt`, `token` with a shared token, else `none`.
    pub eventlog_auth: Option<EventLogAuth>,
}

impl ServeConfig {
    /// Who may use which store, checked against the rest of the config.
    fn store_access(&self) -> anyhow::Result<std::sync::Arc<dyn StoreAccess>> {
        let auth = match &self.eventlog_auth {
            Some(auth) => auth.clone(),
            None if self.server.auth.is_some() => EventLogAuth::Jwt {
                claim: "livestore_stores".to_owned(),
            },
            None if self.eventlog.auth_token.is_some() => EventLogAuth::Token,
            None => EventLogAuth::None,
        };
        Ok(match auth {
            EventLogAuth::None => std::sync::Arc::new(OpenAccess),
            EventLogAuth::Token => match &self.eventlog.auth_token {
                Some(token) => std::sync::Arc::new(SharedToken(token.clone())),
                None => anyhow::bail!(
                    "configuration: --eventlog-auth token needs --eventlog-auth-token"
                ),
            },
            EventLogAuth::Jwt { claim } => match &self.server.auth {
                Some(auth) => std::sync::Arc::new(
                    JwtStoreAccess::new(auth, claim)
                        .map_err(|e| anyhow::anyhow!("configuration: {e}"))?,
                ),
                None => anyhow::bail!("configuration: --eventlog-auth jwt needs --auth jwt"),
            },
        })
    }
}

/// Starts the server with the LiveStore backend's routes mounted beside
/// the row sync's; both stop on the server's shutdown. The store admin API
/// answers to the server's `--admin-token`.
pub async fn start(config: ServeConfig) -> anyhow::Result<Server> {
    // Checked before the event logs' storage is opened or created.
    config
        .server
        .validate()
        .map_err(pgrelay_server::ServerError::Config)?;
    let access = config.store_access()?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let admin = AdminToken::new(config.server.admin_token.clone());
    let server = &config.server;
    let host = EventLogHost {
        admin: std::sync::Arc::new(admin),
        access,
        admission: std::sync::Arc::new(ServerLimits::new(
            server.connect_rate,
            server.connect_burst,
            server.message_rate,
            server.message_burst,
        )),
    };
    let eventlog = EventLog::open(config.eventlog, host, shutdown_rx).await?;
    Ok(Server::start_with(config.server, shutdown, eventlog.router()).await?)
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut server = start(args.into_config()?).await?;
    // Tests and scripts read this line to learn the bound port.
    println!("pgrelay listening on {}", server.local_addr());
    let stop = server.shutdown_handle();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: no new connections; finishing writes, closing sessions, confirming the slot");
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn eventlog_auth_follows_auth_jwt_unless_the_operator_says_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("jwt.key");
        std::fs::write(&key, "0123456789abcdef0123456789abcdef").unwrap();
        let key = key.to_str().unwrap();
        let parse = |extra: &[&str]| {
            let mut args = vec!["serve", "--auth", "jwt", "--jwt-secret-file", key];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
                .unwrap()
                .serve
                .into_config()
                .unwrap()
                .eventlog_auth
        };
        assert_eq!(
            parse(&[]),
            Some(EventLogAuth::Jwt {
                claim: "livestore_stores".into()
            })
        );
        assert_eq!(
            parse(&["--eventlog-store-claim", "stores"]),
            Some(EventLogAuth::Jwt {
                claim: "stores".into()
            })
        );
        assert_eq!(
            parse(&["--eventlog-auth", "none"]),
            Some(EventLogAuth::None)
        );
        let open = Cli::try_parse_from(["serve"])
            .unwrap()
            .serve
            .into_config()
            .unwrap();
        assert!(open.store_access().is_ok());
        assert_eq!(open.eventlog_auth, None);
        let bad = Cli::try_parse_from(["serve", "--eventlog-auth", "jwt"])
            .unwrap()
            .serve
            .into_config()
            .unwrap();
        assert!(
            bad.store_access().is_err(),
            "jwt without --auth jwt is refused"
        );
    }

    #[test]
    fn secrets_are_not_printed() {
        let cli = Cli::try_parse_from([
            "serve",
            "--database-url",
            "postgres://app:db-password-1@127.0.0.1/app",
            "--admin-token",
            "admin-token-secret-2",
            "--registry",
            "redis://:redis-password-3@127.0.0.1:6379",
            "--eventlog-store",
            "postgres",
            "--eventlog-auth-token",
            "payload-token-4",
        ])
        .unwrap();
        let secrets = [
            "db-password-1",
            "admin-token-secret-2",
            "redis-password-3",
            "payload-token-4",
        ];
        let args = format!("{:?}", cli.serve);
        let config = format!("{:?}", cli.serve.into_config().unwrap());
        for printed in [args, config] {
            for secret in secrets {
                assert!(!printed.contains(secret), "{secret} printed in {printed}");
            }
        }
    }
}
