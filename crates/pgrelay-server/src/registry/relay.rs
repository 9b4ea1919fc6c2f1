//! Signals for sessions on other nodes: an operator's "notify" or
//! "disconnect" may reach any node, while the client's session lives on
//! one. Each run of a node subscribes to a Redis channel of its own,
//! `<prefix>node:<instance>`; a node asked about a client registered by
//! another publishes the signal there. `PUBLISH` answers how many
//! subscribers received it, so a node that is gone (nobody on its
//! channel) is known at once: its client is "gone".
//!
//! ```text
//! admin ──POST notify──▶ node A ──PUBLISH pgrelay:node:<B's instance>──▶ Redis
//!                                                                         │
//!                        node B ◀──────────── message ────────────────────┘
//!                          └─ the session named in the record: nudge / close
//! ```

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::redis::{failed, RedisRegistry, IO_TIMEOUT};
use super::{session_key, ClientRecord, Registry, RegistryError};
use crate::session::table::{SessionTable, Signal};

/// How often the subscription's connection is checked (a `PING`): a
/// Redis that went away is noticed, and shown, within this.
const PING_EVERY: Duration = Duration::from_secs(5);

/// What a node may ask of another's session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Relayed {
    /// Read the change log now.
    Nudge,
    /// Close with `disconnected`.
    Disconnect,
}

impl Relayed {
    fn signal(self) -> Signal {
        match self {
            Relayed::Nudge => Signal::Nudge,
            Relayed::Disconnect => Signal::Disconnect,
        }
    }
}

/// One message on a node's channel.
#[derive(Debug, Serialize, Deserialize)]
struct Message {
    client_id: String,
    /// The session the sender found in the registry: a newer session of
    /// the same client (it connected again) is left alone.
    session: String,
    signal: Relayed,
}

/// The channel of the node run that holds `record`'s session (its
/// session key is `<instance>/<n>`).
pub(super) fn channel_of(prefix: &str, record: &ClientRecord) -> Option<String> {
    record
        .session
        .rsplit_once('/')
        .map(|(instance, _)| channel(prefix, instance))
}

fn channel(prefix: &str, instance: &str) -> String {
    format!("{prefix}node:{instance}")
}

pub(super) fn message(record: &ClientRecord, signal: Relayed) -> Vec<u8> {
    serde_json::to_vec(&Message {
        client_id: record.client_id.clone(),
        session: record.session.clone(),
        signal,
    })
    .unwrap_or_default()
}

/// Receives the signals other nodes send to this node's sessions.
pub(crate) struct SignalListener {
    registry: Arc<RedisRegistry>,
    instance: String,
    sessions: Arc<SessionTable>,
}

impl SignalListener {
    pub(super) fn new(
        registry: Arc<RedisRegistry>,
        instance: &str,
        sessions: Arc<SessionTable>,
    ) -> SignalListener {
        SignalListener {
            registry,
            instance: instance.to_owned(),
            sessions,
        }
    }

    /// Listens until shutdown, subscribing again (with backoff) after
    /// Redis went away. Never fails the server: without Redis, sessions
    /// here go on and only signals from other nodes wait.
    pub(crate) async fn run(
        self,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), crate::ServerError> {
        let health = self.registry.health_handle();
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.listen(&mut shutdown).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    health.set_listening(false);
                    health.failed(&e);
                    tracing::warn!(error = %e, retry_in = ?backoff, "receiving signals from other nodes stopped (Redis); sessions here go on");
                }
            }
            tokio::select! {
                biased;
                () = stopped(&mut shutdown) => return Ok(()),
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One subscription, until its connection fails (`Err`) or shutdown.
    async fn listen(&self, shutdown: &mut watch::Receiver<bool>) -> Result<(), RegistryError> {
        let channel = channel(self.registry.prefix(), &self.instance);
        let mut pubsub =
            tokio::time::timeout(IO_TIMEOUT, self.registry.client().get_async_pubsub())
                .await
                .map_err(|_| {
                    RegistryError::Io(format!("connecting timed out after {IO_TIMEOUT:?}"))
                })?
                .map_err(failed)?;
        pubsub.subscribe(&channel).await.map_err(failed)?;
        let health = self.registry.health_handle();
        health.reached();
        health.set_listening(true);
        tracing::debug!(%channel, "receiving signals from other nodes");
        let (mut sink, mut messages) = pubsub.split();
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = stopped(shutdown) => return Ok(()),
                message = messages.next() => {
                    let Some(message) = message else {
                        return Err(RegistryError::Io("the subscription's connection closed".to_owned()));
                    };
                    self.deliver(message.get_payload_bytes()).await;
                }
                _ = ping.tick() => {
                    tokio::time::timeout(IO_TIMEOUT, sink.ping::<redis::Value>())
                        .await
                        .map_err(|_| RegistryError::Io(format!("no answer to PING within {IO_TIMEOUT:?}")))?
                        .map_err(failed)?;
                }
            }
        }
    }

    /// Hands a signal to the session it names. A session that is no
    /// longer here had its record left behind: it is removed, so the next
    /// notification is answered "gone".
    async fn deliver(&self, payload: &[u8]) {
        let message: Message = match serde_json::from_slice(payload) {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(error = %e, "a signal from another node is not valid JSON; ignored");
                return;
            }
        };
        let live = self
            .sessions
            .get(&message.client_id)
            .filter(|s| session_key(&self.instance, s) == message.session);
        match live {
            Some(session) => {
                tracing::info!(client_id = %message.client_id, signal = ?message.signal, "signal from another node");
                session.signal(message.signal.signal());
            }
            None => {
                tracing::info!(client_id = %message.client_id, "signal from another node for a session no longer here; removing its record");
                if let Err(e) = self
                    .registry
                    .unregister(&message.client_id, &message.session)
                    .await
                {
                    tracing::warn!(error = %e, "removing a stale registry record failed");
                }
            }
        }
    }
}

/// Resolves once shutdown is asked for (holding no guard of the watch).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
