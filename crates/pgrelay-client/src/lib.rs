//! pgrelay's client: keeps a local SQLite replica in sync with a pgrelay
//! server. Use [`SyncClient`] to run it, [`Replica`] to read its state.

mod error;
mod events;
mod hydrate;
mod migrations;
mod repair;
mod replica;
mod session;
mod tls;
pub mod value;

use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use pgrelay_protocol::Lsn;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{broadcast, watch, Notify};

pub use error::ClientError;
pub use events::Event;
pub use replica::{
    digest_ranges, rows_in_range, Executed, KeyRange, KeyedRow, OutboxEntry, OutboxReport, Replica,
    ReplicaState, ReplicaStatus, SchemaApplied, TableStatus,
};

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `ws://host:port` or `wss://host:port` (the path `/api/sync` is
    /// added when missing); or several such URLs separated by commas,
    /// nodes of one deployment, tried in turn whenever a connection fails
    /// or ends.
    pub server: String,
    /// For `wss://`: a PEM file of certificate authorities trusted besides
    /// the platform's roots (a server whose certificate a private CA signed).
    pub ca_file: Option<PathBuf>,
    pub db: PathBuf,
    /// Stored in the replica on first use; generated when not given.
    pub client_id: Option<String>,
    /// A fixed token for the server's `--auth`.
    pub token: Option<SecretString>,
    /// The tables to sync (`todos` or `public.todos`); `None` for every
    /// table the server syncs. Choose them when the replica is new: a table
    /// added later starts from the replica's position, not from its history.
    pub tables: Option<Vec<String>>,
    /// Asked for a token before every connection (after an expired token
    /// too); wins over `token`. See [`TokenProvider::file`].
    pub token_provider: Option<TokenProvider>,
    /// Return once the replica holds everything PostgreSQL had committed
    /// when the client connected (see [`Event::CaughtUp`]); a token refused
    /// twice (once more after asking the provider again) ends the run with
    /// an error instead of retrying.
    pub exit_when_caught_up: bool,
    pub ping_interval: Duration,
    /// Reconnect when nothing was heard from the server for this long.
    pub idle_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// How often the outbox is checked for writes made by other processes
    /// and for retries that are due.
    pub outbox_poll: Duration,
}

impl ClientConfig {
    pub fn new(server: impl Into<String>, db: impl Into<PathBuf>) -> ClientConfig {
        ClientConfig {
            server: server.into(),
            ca_file: None,
            db: db.into(),
            client_id: None,
            token: None,
            tables: None,
            token_provider: None,
            exit_when_caught_up: false,
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(30),
            outbox_poll: Duration::from_secs(1),
        }
    }

    /// The token for the next connection.
    pub(crate) async fn current_token(&self) -> Result<Option<String>, ClientError> {
        match &self.token_provider {
            Some(provider) => provider.token().await.map(Some),
            None => Ok(self.token.as_ref().map(|t| t.expose_secret().to_owned())),
        }
    }

    /// The servers to try, in turn.
    pub fn servers(&self) -> Vec<&str> {
        self.server
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// The sync URL of the server for connection attempt `turn`.
    pub(crate) fn sync_url(&self, turn: usize) -> String {
        let servers = self.servers();
        let server = servers
            .get(turn % servers.len().max(1))
            .copied()
            .unwrap_or_default();
        let trimmed = server.trim_end_matches('/');
        let after_scheme = trimmed.split_once("://").map_or(trimmed, |(_, rest)| rest);
        if after_scheme.contains('/') {
            trimmed.to_owned()
        } else {
            format!("{trimmed}/api/sync")
        }
    }
}

type TokenFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + 'static>>;

/// Where a client gets its token: asked again before each connection, so a
/// refreshed token is picked up when the old one expires.
#[derive(Clone)]
pub struct TokenProvider(Arc<dyn Fn() -> TokenFuture + Send + Sync>);

impl TokenProvider {
    pub fn new<F, Fut>(provide: F) -> TokenProvider
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<String, String>> + Send + 'static,
    {
        TokenProvider(Arc::new(move || Box::pin(provide())))
    }

    /// Reads the token from `path` (trimmed) before every connection.
    pub fn file(path: impl Into<PathBuf>) -> TokenProvider {
        let path = path.into();
        TokenProvider::new(move || {
            let path = path.clone();
            async move {
                tokio::fs::read_to_string(&path)
                    .await
                    .map(|t| t.trim().to_owned())
                    .map_err(|e| format!("reading the token file {}: {e}", path.display()))
            }
        })
    }

    async fn token(&self) -> Result<String, ClientError> {
        (self.0)().await.map_err(ClientError::Token)
    }
}

impl std::fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenProvider(..)")
    }
}

/// Runs a replica's sync: connects, catches up, follows live changes and
/// reconnects with backoff after any failure that a retry can cure.
pub struct SyncClient {
    config: ClientConfig,
    replica: Replica,
    events: broadcast::Sender<Event>,
    writes: Arc<Notify>,
    client_id: String,
}

impl SyncClient {
    pub async fn open(config: ClientConfig) -> Result<SyncClient, ClientError> {
        let replica = Replica::open(&config.db)?;
        let state = replica.state().await?;
        let id = match (&config.client_id, state.client_id) {
            (Some(given), _) => given.clone(),
            (None, Some(stored)) => stored,
            (None, None) => format!("client-{:016x}", rand::random::<u64>()),
        };
        replica.set_client_id(id.clone()).await?;
        let (events, _) = broadcast::channel(1024);
        Ok(SyncClient {
            config,
            replica,
            events,
            writes: Arc::new(Notify::new()),
            client_id: id,
        })
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Runs the application's SQL on the replica (see [`Replica::execute`])
    /// and pushes its writes to the server when connected. Subscribe to
    /// [`Event::WriteApplied`] and [`Event::WriteRejected`] to learn their
    /// fate.
    pub async fn execute(&self, sql: impl Into<String>) -> Result<Executed, ClientError> {
        let executed = self.replica.execute(sql).await?;
        if executed.captured > 0 {
            self.writes.notify_one();
        }
        Ok(executed)
    }

    /// Read-your-writes: runs `sql` like [`SyncClient::execute`], then
    /// waits until the server has applied its writes and the replica holds
    /// the PostgreSQL transaction carrying them, so a query right after
    /// sees the rows as PostgreSQL committed them (defaults, triggers).
    /// The transaction is recognised by its origin (this client) and its
    /// commit LSN, which the server's answer bounds to `(lsn_floor, lsn]`.
    /// [`SyncClient::run`] must be running (in another task). Fails with
    /// [`ClientError::WriteRejected`] when the server refuses the write
    /// (the replica is already rolled back), and with
    /// [`ClientError::WriteTimeout`] after `timeout`; the write stays in
    /// the outbox either way unless rejected.
    pub async fn execute_and_wait(
        &self,
        sql: impl Into<String>,
        timeout: Duration,
    ) -> Result<Executed, ClientError> {
        // Subscribed before the write, so no answer or echo can be missed.
        let mut events = self.events.subscribe();
        let executed = self.execute(sql).await?;
        if executed.captured == 0 {
            return Ok(executed);
        }
        let tx_id = executed.tx_id.clone();
        // The server tags this client's transactions with a one-way tag of
        // its id, not the id.
        let own_origin = pgrelay_protocol::origin_tag(&self.client_id);
        let mut answered = false;
        let wait = async {
            let mut bounds: Option<(Option<Lsn>, Option<Lsn>)> = None;
            let mut position: Option<Lsn> = None;
            let mut echoes: Vec<Lsn> = Vec::new();
            loop {
                match events.recv().await {
                    Ok(Event::WriteApplied {
                        tx_id: id,
                        lsn_floor,
                        lsn,
                        ..
                    }) if id == tx_id => {
                        answered = true;
                        bounds = Some((lsn_floor, lsn));
                    }
                    Ok(Event::WriteRejected { tx_id: id, reason }) if id == tx_id => {
                        return Err(ClientError::WriteRejected { tx_id: id, reason });
                    }
                    Ok(Event::Applied { lsn, origins, .. }) => {
                        position = Some(lsn);
                        echoes.extend(
                            origins
                                .into_iter()
                                .filter(|(_, origin)| *origin == own_origin)
                                .map(|(l, _)| l),
                        );
                    }
                    Ok(_) => {}
                    // Events were dropped: the position may have moved
                    // past the write; the replica knows.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        position = self.replica.state().await?.lsn;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(ClientError::ReplicaClosed);
                    }
                }
                if let Some((floor, ceiling)) = bounds {
                    let held = match ceiling {
                        // A server without the bounds: the answer is all we get.
                        None => true,
                        Some(ceiling) => {
                            position.is_some_and(|p| p >= ceiling)
                                || echoes
                                    .iter()
                                    .any(|&e| floor.is_none_or(|f| e > f) && e <= ceiling)
                        }
                    };
                    if held {
                        return Ok(());
                    }
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result.map(|()| executed),
            Err(_) => Err(ClientError::WriteTimeout {
                tx_id,
                what: if answered {
                    "applied, but its transaction has not reached the replica"
                } else {
                    "no answer from the server"
                },
                timeout,
            }),
        }
    }

    /// The outbox's counts and its newest `limit` entries.
    pub async fn outbox(&self, limit: usize) -> Result<OutboxReport, ClientError> {
        self.replica.outbox(None, limit).await
    }

    /// Syncs until `shutdown` is set, until caught up when the config asks
    /// for that, or until an error no retry can cure.
    ///
    /// With [`ClientConfig::exit_when_caught_up`] a refused token
    /// (`token_expired` or `unauthorized`, or a provider that fails) is
    /// asked of the token provider once more; refused again, or without a
    /// provider, it ends the run with the reason rather than retrying
    /// forever.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), ClientError> {
        let mut attempt = 0u32;
        let mut tokens_refused = 0u32;
        // Set when the server said `gone` mid-session (a lost slot, or
        // retention passing the position while reading the change log):
        // the next connection keeps the position, so the server repairs the
        // replica instead of sending it whole. Told `gone` again, it resets.
        let mut repairing = false;
        // Which of the servers the next connection goes to: the next one
        // after each failure, so a dead node is left for a live one.
        let mut turn = 0usize;
        loop {
            let mut welcomed = false;
            let result = session::connect_and_sync(
                &self.config,
                turn,
                &self.replica,
                &self.events,
                &mut shutdown,
                &mut welcomed,
                &self.writes,
            )
            .await;
            if welcomed {
                // The server took us: the next failure starts a fresh backoff.
                attempt = 0;
                tokens_refused = 0;
            }
            let gone = matches!(
                &result,
                Err(ClientError::Refused {
                    code: pgrelay_protocol::ErrorCode::Gone,
                    ..
                })
            );
            if gone && welcomed && !std::mem::replace(&mut repairing, true) {
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "the server no longer continues this replica's position; reconnecting to repair it");
                    let _ = self.events.send(Event::Disconnected {
                        error: format!("gone: {e}"),
                        retry_in: Duration::ZERO,
                    });
                }
                continue;
            }
            if welcomed && !gone {
                repairing = false;
            }
            match result {
                Ok(_) => return Ok(()),
                Err(e) if self.config.exit_when_caught_up && e.is_token_refusal() => {
                    tokens_refused += 1;
                    if tokens_refused > 1 || self.config.token_provider.is_none() {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, "token refused; asking the token provider once more");
                    let _ = self.events.send(Event::Disconnected {
                        error: e.to_string(),
                        retry_in: Duration::ZERO,
                    });
                }
                Err(e) if !e.is_retryable() => return Err(e),
                // Tables to fetch: reconnect for them at once.
                Err(ClientError::Resync(_)) => continue,
                Err(ClientError::Refused {
                    code: pgrelay_protocol::ErrorCode::Gone,
                    message,
                }) if welcomed || attempt == 0 => {
                    tracing::warn!(%message, "the server no longer has this replica's history; re-hydrating (unsent local writes are kept)");
                    self.replica.reset().await?;
                    let _ = self.events.send(Event::Disconnected {
                        error: format!("gone: {message}"),
                        retry_in: Duration::ZERO,
                    });
                    attempt = 1;
                }
                Err(e) => {
                    turn = turn.wrapping_add(1);
                    let delay = session::backoff(
                        attempt,
                        self.config.backoff_base,
                        self.config.backoff_cap,
                    );
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(error = %e, retry_in = ?delay, "sync connection ended; reconnecting");
                    let _ = self.events.send(Event::Disconnected {
                        error: e.to_string(),
                        retry_in: delay,
                    });
                    tokio::select! {
                        biased;
                        _ = shutdown.changed() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_not_printed() {
        let mut config = ClientConfig::new("ws://127.0.0.1:7171", "replica.sqlite");
        config.token = Some("client-token-secret-5".into());
        let printed = format!("{config:?}");
        assert!(!printed.contains("client-token-secret-5"), "{printed}");
        assert!(printed.contains("ws://127.0.0.1:7171"), "{printed}");
    }

    #[test]
    fn several_servers_are_tried_in_turn() {
        let config = ClientConfig::new("ws://a:1, ws://b:2/api/sync,", "replica.sqlite");
        assert_eq!(config.servers(), vec!["ws://a:1", "ws://b:2/api/sync"]);
        assert_eq!(config.sync_url(0), "ws://a:1/api/sync");
        assert_eq!(config.sync_url(1), "ws://b:2/api/sync");
        assert_eq!(config.sync_url(2), "ws://a:1/api/sync");
    }
}
