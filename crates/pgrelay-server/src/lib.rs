//! The pgrelay server: captures PostgreSQL's changes into the change log
//! and streams them to clients over WebSockets.

mod api;
mod auth;
mod config;
mod error;
mod history;
mod hub;
mod migrations;
mod ops;
mod registry;
mod repair;
mod replication;
pub mod schema_migrations;
mod session;
mod snapshot;
pub mod stages;
mod startup;
mod state;
mod writes;

use std::net::SocketAddr;
use std::sync::Arc;

use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use api::ratelimit::{IpLimiter, TokenBucket};
pub use api::tls::TlsFiles;
pub use auth::{Action as AuditAction, Audit, AuthConfig, ClaimsVerifier, JwtKey, Scope};
pub use config::{parse_conflict, ServerConfig};
pub use error::{
    AuthError, ErrorKind, HistoryError, ReplicationError, ServerError, SnapshotError, WriteError,
};
pub use migrations::migrate as migrate_own_schema;
pub use ops::doctor;

use api::serve;
use hub::Hub;
use replication::status::ReplicationStatus;
use state::AppState;

/// A started server. Dropping it does not stop it; call [`Server::shutdown`].
pub struct Server {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<Result<(), ServerError>>,
    status: Arc<ReplicationStatus>,
    hub: Arc<Hub>,
    sessions: Arc<session::table::SessionTable>,
    shutdown_grace: std::time::Duration,
    /// The row sync's shared state (none when serving event logs only).
    state: Option<Arc<AppState>>,
}

/// Counters of what the server has captured, for benchmarks and embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureStats {
    /// Changes committed to the change log since start.
    pub changes: u64,
    pub transactions: u64,
    /// The slot position confirmed to PostgreSQL.
    pub confirmed: pgrelay_protocol::Lsn,
    /// Commit LSN of the newest transaction published to sessions.
    pub head: pgrelay_protocol::Lsn,
    /// Connected sync sessions.
    pub sessions: usize,
}

/// Counters of repairs and the digests the server keeps for them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepairStats {
    /// Tables whose digests the server keeps now.
    pub kept_tables: usize,
    /// Check ranges (of any round) answered from kept digests since start.
    pub kept_parts: u64,
    /// Rows read from PostgreSQL to answer range checks since start.
    pub rows_read: u64,
}

impl Server {
    /// Checks PostgreSQL, sets up pgrelay's schema, publication and slot,
    /// binds the listener and starts replication and the HTTP server.
    /// Fails fast on anything a retry will not cure (wal_level, bad slot,
    /// unknown table, port in use). Without a database URL only `/health`
    /// is served.
    pub async fn start(config: ServerConfig) -> Result<Server, ServerError> {
        Server::start_with(config, watch::channel(false).0, axum::Router::new()).await
    }

    /// [`Server::start`], also serving `routes` (the LiveStore backend's)
    /// on the same listener. `shutdown` becomes the server's shutdown
    /// signal, so whatever serves `routes` can stop with it.
    pub async fn start_with(
        config: ServerConfig,
        shutdown: watch::Sender<bool>,
        routes: axum::Router,
    ) -> Result<Server, ServerError> {
        config.validate().map_err(ServerError::Config)?;
        // Read before anything starts, so a bad file fails the start.
        let tls = config
            .tls
            .as_ref()
            .map(api::tls::acceptor)
            .transpose()
            .map_err(ServerError::Config)?;
        let shutdown_rx = shutdown.subscribe();
        let mut tasks = JoinSet::new();
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServerError::Listen {
                addr: config.listen,
                source,
            })?;
        let sessions = Arc::new(session::table::SessionTable::default());
        let shutdown_grace = config.shutdown_grace;
        let (app, hub, status, state) = match config.database_url.clone() {
            Some(url) => {
                startup::start_row_sync(
                    config.clone(),
                    url.expose_secret(),
                    addr,
                    &sessions,
                    &mut tasks,
                    &shutdown_rx,
                )
                .await?
            }
            None => {
                tracing::info!("no database URL: serving LiveStore event logs only");
                let health =
                    axum::Router::new().route("/health", axum::routing::get(|| async { "ok" }));
                let hub = Arc::new(Hub::new(
                    config.live_buffer,
                    pgrelay_protocol::Lsn::ZERO,
                    Vec::new(),
                    false,
                    "",
                ));
                (health, hub, Arc::new(ReplicationStatus::new()), None)
            }
        };
        let app = app.merge(routes);
        let limits = serve::Limits {
            connections: Arc::new(tokio::sync::Semaphore::new(config.max_connections)),
            max_connections: config.max_connections,
            idle_timeout: config.http_idle_timeout,
            refused: state.as_ref().map_or_else(Default::default, |s| {
                Arc::clone(&s.metrics.refused_connections)
            }),
            prelogin: Default::default(),
            tls,
        };
        tasks.spawn(serve::run(listener, app, limits, shutdown_rx));
        Ok(Server {
            addr,
            shutdown,
            tasks,
            status,
            hub,
            sessions,
            shutdown_grace,
            state,
        })
    }

    pub fn capture_stats(&self) -> CaptureStats {
        let report = self.status.counters();
        CaptureStats {
            changes: report.0,
            transactions: report.1,
            confirmed: report.2,
            head: self.hub.head(),
            sessions: self.hub.sessions(),
        }
    }

    /// What repairs have taken from the digests the server keeps, for
    /// benchmarks and embedding.
    pub fn repair_stats(&self) -> RepairStats {
        use std::sync::atomic::Ordering::Relaxed;
        match &self.state {
            Some(state) => RepairStats {
                kept_tables: state.kept.len(),
                kept_parts: state.metrics.repair_kept_parts.load(Relaxed),
                rows_read: state.metrics.repair_read_rows.load(Relaxed),
            },
            None => RepairStats::default(),
        }
    }

    /// Whether this node captures the slot (rather than following the
    /// change log another node writes).
    pub fn capturing(&self) -> bool {
        self.state.is_some() && self.status.role().0 == replication::status::Role::Capturing
    }

    /// Times this node found its capture term over and stood down.
    pub fn stand_downs(&self) -> u64 {
        self.status.stand_downs()
    }

    /// Distinct scopes (sets of claim values the rules read) of connected
    /// tokens; 0 without `--auth`.
    pub fn scopes(&self) -> usize {
        self.state
            .as_ref()
            .and_then(|s| s.auth.as_ref())
            .map_or(0, |a| a.live_scopes())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Runs until a task fails for good or shutdown is asked for; then
    /// waits (up to the shutdown grace) for the sessions to close.
    pub async fn wait(&mut self) -> Result<(), ServerError> {
        let result = self.join_tasks().await;
        let closing = self.sessions.running();
        if closing > 0 {
            tracing::info!(sessions = closing, "waiting for sessions to close");
            if tokio::time::timeout(self.shutdown_grace, self.sessions.drained())
                .await
                .is_err()
            {
                tracing::warn!(
                    sessions = self.sessions.running(),
                    grace = ?self.shutdown_grace,
                    "sessions still open after the shutdown grace; leaving them"
                );
            }
        }
        if self.state.is_some() {
            let (_, _, confirmed) = self.status.counters();
            tracing::info!(lsn = %confirmed, "server stopped; slot confirmed up to here");
        } else {
            tracing::info!("server stopped");
        }
        result
    }

    async fn join_tasks(&mut self) -> Result<(), ServerError> {
        while let Some(joined) = self.tasks.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = self.shutdown.send(true);
                    return Err(e);
                }
                Err(e) => {
                    let _ = self.shutdown.send(true);
                    return Err(ServerError::TaskPanicked(e.to_string()));
                }
            }
        }
        Ok(())
    }

    /// Stops accepting, lets in-flight writes finish, closes sessions with
    /// "going away", stops replication after writing what it has and
    /// confirming it to the slot, and waits for all of it.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        let _ = self.shutdown.send(true);
        self.wait().await
    }

    /// A handle that asks the server to stop.
    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}
