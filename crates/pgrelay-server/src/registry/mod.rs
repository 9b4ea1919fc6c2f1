//! The client registry: which clients are connected, to which node, since
//! when, at which position and when they were last active. Sessions
//! register on connect and unregister on close; a refresher keeps the
//! records of live sessions fresh, and records of a node that died expire
//! after the TTL. Embedded (one node) or Redis (several nodes share it).

mod embedded;
pub(crate) mod health;
mod redis;
pub(crate) mod relay;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use pgrelay_protocol::Lsn;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::session::table::{LiveSession, SessionTable, Signal};
use crate::ServerConfig;

pub(crate) use embedded::EmbeddedRegistry;
use health::HealthReport;
pub(crate) use redis::RedisRegistry;
use relay::{Relayed, SignalListener};

#[derive(Debug, thiserror::Error)]
pub(crate) enum RegistryError {
    /// Holds what is wrong with the URL, never the URL (it may hold a password).
    #[error("registry URL: {0}; expected redis://[user:password@]host:port[/db]")]
    Url(String),
    #[error("Redis I/O: {0}")]
    Io(String),
    #[error("Redis refused: {0}")]
    Redis(String),
    #[error("a registry record is not valid JSON: {0}")]
    Record(String),
}

/// One connected client, as the registry knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ClientRecord {
    pub(crate) client_id: String,
    /// The node whose session serves the client.
    pub(crate) node: String,
    /// That session, unique over nodes and restarts.
    pub(crate) session: String,
    pub(crate) connected_at_ms: u64,
    /// The client's position as the server last knew it.
    pub(crate) last_lsn: Lsn,
    pub(crate) last_activity_ms: u64,
}

impl ClientRecord {
    /// Whether the record names a session of another run than `instance`
    /// (a node restarted under the same name keeps its name, not its
    /// sessions).
    pub(crate) fn session_elsewhere(&self, instance: &str) -> bool {
        self.session
            .rsplit_once('/')
            .is_none_or(|(run, _)| run != instance)
    }
}

/// Where client records live. Every method is one round trip at most.
pub(crate) trait Registry: Send + Sync {
    fn register<'a>(&'a self, record: &'a ClientRecord)
        -> BoxFuture<'a, Result<(), RegistryError>>;

    /// Writes fresh records for live sessions (their TTL starts again).
    /// Returns the ids of clients whose record another session holds now:
    /// they connected again elsewhere.
    fn refresh<'a>(
        &'a self,
        records: &'a [ClientRecord],
    ) -> BoxFuture<'a, Result<Vec<String>, RegistryError>>;

    /// Removes the client's record if `session` still holds it.
    fn unregister<'a>(
        &'a self,
        client_id: &'a str,
        session: &'a str,
    ) -> BoxFuture<'a, Result<(), RegistryError>>;

    /// Removes the client's record whoever holds it; `true` if there was one.
    fn forget<'a>(&'a self, client_id: &'a str) -> BoxFuture<'a, Result<bool, RegistryError>>;

    fn get<'a>(
        &'a self,
        client_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ClientRecord>, RegistryError>>;

    fn list(&self) -> BoxFuture<'_, Result<Vec<ClientRecord>, RegistryError>>;

    /// Sends `signal` to the session `record` names, on the node that
    /// registered it. `Ok(false)`: no node receives it (that node is gone).
    fn relay<'a>(
        &'a self,
        record: &'a ClientRecord,
        signal: Relayed,
    ) -> BoxFuture<'a, Result<bool, RegistryError>>;

    fn health(&self) -> HealthReport;
}

/// The registry the configuration asks for, and for a shared one, what
/// receives the signals other nodes send to this node's sessions (a task
/// to run).
pub(crate) fn open(
    config: &ServerConfig,
    sessions: &Arc<SessionTable>,
    node: &str,
    instance: &str,
) -> Result<(Arc<dyn Registry>, Option<SignalListener>), RegistryError> {
    Ok(match &config.registry {
        None => (
            Arc::new(EmbeddedRegistry::new(
                config.registry_ttl,
                Arc::clone(sessions),
                node.to_owned(),
                instance.to_owned(),
            )),
            None,
        ),
        Some(url) => {
            let redis = Arc::new(RedisRegistry::new(
                url.expose_secret(),
                &config.registry_prefix,
                config.registry_ttl,
            )?);
            let listener = SignalListener::new(Arc::clone(&redis), instance, Arc::clone(sessions));
            (redis, Some(listener))
        }
    })
}

/// This node's record of a live session.
pub(crate) fn record(node: &str, instance: &str, session: &LiveSession) -> ClientRecord {
    ClientRecord {
        client_id: session.client_id.clone(),
        node: node.to_owned(),
        session: session_key(instance, session),
        connected_at_ms: session.connected_at_ms,
        last_lsn: session.sent(),
        last_activity_ms: session.last_activity_ms(),
    }
}

pub(crate) fn session_key(instance: &str, session: &LiveSession) -> String {
    format!("{instance}/{}", session.id)
}

/// Keeps the records of live sessions fresh: their TTL starts again and
/// their position and activity are brought up to date. A session whose
/// client registered again through another node is told it was replaced.
/// Every live session is written every interval (pipelined, 500 at a
/// time): 10,000 sessions at the default 10 s is 1,000 Redis writes a
/// second.
pub(crate) async fn refresh_live(
    registry: Arc<dyn Registry>,
    sessions: Arc<SessionTable>,
    node: String,
    instance: String,
    config: ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), crate::ServerError> {
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            _ = tokio::time::sleep(config.registry_refresh) => {}
        }
        let live = sessions.all();
        for chunk in live.chunks(500) {
            let records: Vec<ClientRecord> =
                chunk.iter().map(|s| record(&node, &instance, s)).collect();
            match registry.refresh(&records).await {
                Ok(replaced) => {
                    for session in chunk.iter().filter(|s| replaced.contains(&s.client_id)) {
                        tracing::info!(client_id = %session.client_id, "client connected through another node");
                        session.signal(Signal::Replaced);
                    }
                }
                Err(e) => {
                    // Counted and shown by the registry's health.
                    tracing::warn!(error = %e, "refreshing the client registry failed; sessions go on");
                    break;
                }
            }
        }
    }
}

/// The name of this node when none is configured: host name and port.
pub(crate) fn default_node(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "pgrelay".to_owned());
    format!("{host}:{port}")
}

pub(crate) fn ttl_secs(ttl: Duration) -> u64 {
    ttl.as_secs().max(1)
}
