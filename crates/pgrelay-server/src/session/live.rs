//! The live phase of a session: the handshake's answer, hydration and
//! catch-up in order, then one loop that forwards the hub's transactions,
//! answers the client's frames, pings, and ends the session on shutdown,
//! token expiry, an operator's signal or a client that stops reading.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::ws::Message;
use futures_util::{SinkExt, StreamExt};
use pgrelay_protocol::{ErrorCode, Lsn, ServerMessage, TableSchema, PROTOCOL_VERSION};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::watch;
use tokio::time::{interval_at, Instant};
use tokio_postgres::types::PgLsn;

use super::handshake::Hello;
use super::subscription::Pass;
use super::table::Signal;
use super::{internal, Ending, Refusal, Session};
use crate::auth::Action;
use crate::hub::Frame;
use crate::ops::metrics::add;
use crate::state::AppState;

/// Frames written to a session's socket with one flush at most.
const MAX_CORKED: usize = 64;

/// Resolves when the client is owed its second `caught_up`.
pub(super) type Owed = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What woke the live loop. The loop waits, then handles what woke it
/// outside the wait, so the waits' state and the handlers' state share
/// the same bytes of the session's future instead of adding up.
enum Wake {
    Shutdown,
    Signal(Signal),
    Expired,
    Owed,
    Catalog,
    Incoming(Option<Result<Message, axum::Error>>),
    Frame(Result<Frame, RecvError>),
    Ping,
}

impl Session<'_> {
    /// The handshake's answer, hydration or repair, and catch-up from the
    /// change log; returns the hub subscription the live loop goes on with.
    pub(super) async fn prepare(
        &mut self,
        hello: Hello,
    ) -> Result<(broadcast::Receiver<Frame>, Option<Owed>), Refusal> {
        // Taken apart and dropped as soon as used: whatever stays alive here
        // stays in every idle session's state.
        let Hello {
            client_id,
            last_lsn,
            log_id,
            resync,
            token,
            tables: subscribed,
            repair,
            schema_version,
        } = hello;
        drop((token, subscribed));
        let head = self.state.hub.head();
        let ours = self.state.hub.log_id();
        // Where the answer would be `gone`, a client that can repair (and
        // has a replica to repair) is compared range by range instead.
        let can_mend = repair && last_lsn.is_some();
        let mut mend = false;
        if let Some(theirs) = log_id.as_ref().filter(|id| id.as_str() != &*ours) {
            if !can_mend {
                return Err(Refusal::new(
                    ErrorCode::Gone,
                    format!(
                        "your replica follows change log {:?}, this server keeps {:?}; re-hydrate",
                        theirs.chars().take(64).collect::<String>(),
                        ours
                    ),
                ));
            }
            mend = true;
        }
        let start = last_lsn.unwrap_or(Lsn::ZERO);
        if !mend && start > head {
            if !can_mend {
                return Err(Refusal::new(
                    ErrorCode::Gone,
                    format!("your position {start} is ahead of this server's change log ({head}); start a fresh replica"),
                ));
            }
            mend = true;
        }
        if !mend && can_mend {
            mend = Box::pin(self.pruned_past(start)).await?;
        }
        drop(log_id);
        // A replica whose client schema is newer than anything this server
        // stored is refused before it is welcomed.
        let owed = match schema_version {
            Some(version) => Some(self.owed(version)?),
            None => None,
        };
        // What "caught up" is measured against: what PostgreSQL has
        // committed now, not what the change log has captured so far.
        let wal = Box::pin(current_wal(self.state)).await?;
        // Only the tables this client may read (in the welcome, and so in
        // its replica and its snapshot), of those it subscribes to.
        let (told, schemas) = self.state.hub.schemas_at();
        self.told = told;
        let welcome = ServerMessage::Welcome {
            origin: Some(pgrelay_protocol::origin_tag(&client_id)),
            protocol_version: PROTOCOL_VERSION,
            client_id,
            head_lsn: head,
            tables: self.visible(schemas.values()),
            log_id: Some(ours.to_string()),
            wal_lsn: Some(wal),
        };
        drop((schemas, ours));
        self.send(Frame::encode(&welcome, head)).await?;
        drop(welcome);
        // Its tables exist in the replica now: indexes on them can be made.
        if let Some(owed) = owed {
            Box::pin(self.send_owed(owed)).await?;
        }
        // A new replica (no position) gets every table it syncs; a known
        // one only the tables it asks to resync. A client that asked for a
        // snapshot always gets one (perhaps of no table), so it knows when
        // it is complete. Boxed: its state would otherwise sit in every
        // idle session's future.
        let full = last_lsn.is_none();
        if mend {
            let resume = Box::pin(self.repair()).await?;
            self.live.restart_at(resume);
        } else if full || !resync.is_empty() {
            let resume = Box::pin(self.hydrate(full, &resync)).await?;
            if full {
                self.live.advance(resume);
            }
        }
        drop(resync);
        // Subscribe before reading the log: whatever is published from now on
        // is in `frames`, whatever was published before is in the log. And
        // whatever PostgreSQL committed before `captured` is in the log now.
        let frames = self.state.hub.subscribe();
        let captured = self.state.hub.captured();
        Box::pin(self.catch_up()).await?;
        self.caught_up(head, captured).await?;
        // Until the capture passes `wal`, the client is owed one more
        // `caught_up` (boxed: only sessions that wait hold it).
        let owed = (captured < wal)
            .then(|| Box::pin(captured_past(self.state.hub.watch_captured(), wal)) as Owed);
        Ok((frames, owed))
    }

    /// The live loop: forwards the hub's frames, answers the client's,
    /// pings, and ends the session on shutdown, token expiry, an
    /// operator's signal, a client that stops reading or answering pings.
    /// `owed` resolves when the client is owed its second `caught_up`.
    pub(super) async fn serve(
        &mut self,
        mut frames: broadcast::Receiver<Frame>,
        mut owed: Option<Owed>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Ending, Refusal> {
        let period = self.state.config.ping_interval;
        let mut ping = interval_at(Instant::now() + period, period);
        let mut last_heard = Instant::now();
        let live = Arc::clone(&self.live);
        // Only clients that run client migrations follow the catalog.
        let mut catalog = self
            .schema
            .is_some()
            .then(|| self.state.client_catalog.subscribe());
        // Only a session with a token has a deadline; boxed, so sessions
        // without one carry no timer.
        let mut expiry = self
            .principal
            .is_some()
            .then(|| Box::pin(tokio::time::sleep_until(self.expiry())));
        loop {
            let wake = tokio::select! {
                biased;
                _ = shutdown.changed() => Wake::Shutdown,
                signal = live.signalled() => Wake::Signal(signal),
                _ = async {
                    match expiry.as_mut() {
                        Some(deadline) => deadline.await,
                        None => std::future::pending().await,
                    }
                } => Wake::Expired,
                _ = async {
                    match owed.as_mut() {
                        Some(passed) => passed.await,
                        None => std::future::pending().await,
                    }
                } => Wake::Owed,
                _ = async {
                    match catalog.as_mut() {
                        Some(catalog) => {
                            if catalog.changed().await.is_err() {
                                std::future::pending::<()>().await;
                            }
                        }
                        None => std::future::pending().await,
                    }
                } => Wake::Catalog,
                incoming = self.socket.next() => Wake::Incoming(incoming),
                frame = frames.recv() => Wake::Frame(frame),
                _ = ping.tick() => Wake::Ping,
            };
            match wake {
                Wake::Shutdown => return Ok(Ending::Shutdown),
                Wake::Signal(signal) => match signal {
                    Signal::Nudge => Box::pin(self.catch_up()).await?,
                    Signal::Disconnect | Signal::Replaced => return Err(super::closed_by(signal)),
                    Signal::None => {}
                },
                Wake::Expired => return Err(self.expired()),
                Wake::Owed => {
                    owed = None;
                    Box::pin(self.caught_up_with_wal(&mut frames)).await?;
                }
                Wake::Catalog => Box::pin(self.catalog_changed()).await?,
                Wake::Incoming(incoming) => {
                    last_heard = Instant::now();
                    if !Box::pin(self.incoming(incoming)).await? {
                        return Ok(Ending::ClientClosed);
                    }
                }
                Wake::Frame(frame) => {
                    let lagged = match frame {
                        // Boxed (one allocation per wake-up with frames):
                        // inline, its state would be part of every idle
                        // session's future.
                        Ok(frame) => Box::pin(self.forward_waiting(frame, &mut frames)).await?,
                        Err(RecvError::Lagged(skipped)) => Some(skipped),
                        Err(RecvError::Closed) => return Ok(Ending::Shutdown),
                    };
                    if let Some(skipped) = lagged {
                        tracing::debug!(
                            skipped,
                            "session fell behind the live buffer; reading the change log"
                        );
                        add(&self.state.metrics.catch_ups, 1);
                        frames = frames.resubscribe();
                        Box::pin(self.catch_up()).await?;
                    }
                }
                Wake::Ping => {
                    if last_heard.elapsed() > self.state.config.idle_timeout {
                        return Err(Refusal::new(
                            ErrorCode::TooSlow,
                            "no pong within the idle timeout",
                        ));
                    }
                    Box::pin(self.send_message(Message::Ping(Default::default()))).await?;
                }
            }
        }
    }

    /// When the token stops being valid (far away without a token).
    pub(super) fn expiry(&self) -> Instant {
        let far_off = Duration::from_secs(100 * 365 * 24 * 3600);
        let far = Instant::now() + far_off;
        match &self.principal {
            Some(p) => match p.expires.duration_since(SystemTime::now()) {
                Ok(left) => Instant::now() + left.min(far_off),
                Err(_) => Instant::now(),
            },
            None => far,
        }
    }

    pub(super) fn expired(&self) -> Refusal {
        self.state.audit.record(
            Action::TokenExpired,
            Some(&self.live.client_id),
            self.principal.as_ref().and_then(|p| p.subject.as_deref()),
            "session closed at token expiry",
        );
        Refusal::new(
            ErrorCode::TokenExpired,
            "token expired; reconnect with a fresh token",
        )
    }

    /// The client's position: the commit LSN of the last transaction sent
    /// or skipped.
    pub(super) fn position(&self) -> Lsn {
        self.live.sent()
    }

    /// The tables of `schemas` this client is told about: those its token
    /// may read, of those it subscribes to.
    pub(super) fn visible<'s>(
        &self,
        schemas: impl Iterator<Item = &'s TableSchema>,
    ) -> Vec<TableSchema> {
        schemas
            .filter(|t| {
                self.scope
                    .as_ref()
                    .is_none_or(|s| s.can_read_table(&t.name))
            })
            .filter(|t| self.subscription.as_ref().is_none_or(|s| s.wants(&t.name)))
            .cloned()
            .collect()
    }

    pub(super) async fn forward(&mut self, frame: Frame) -> Result<(), Refusal> {
        if frame.ends_log {
            return Err(Refusal::new(
                ErrorCode::Gone,
                "the replication slot was lost and this server keeps a new change log; re-hydrate",
            ));
        }
        if frame.is_tx && frame.lsn <= self.position() {
            return Ok(());
        }
        let (lsn, is_tx) = (frame.lsn, frame.is_tx);
        let frame = match &self.scope {
            Some(scope) => match frame.for_scope(scope) {
                Some(visible) => visible,
                None => {
                    if is_tx {
                        self.skipped(lsn);
                    }
                    return Ok(());
                }
            },
            None => frame,
        };
        let frame = match &self.subscription {
            Some(subscription) => match subscription.pass(frame) {
                Pass::Send(frame) => frame,
                Pass::Skip => {
                    if is_tx {
                        self.skipped(lsn);
                    }
                    return Ok(());
                }
            },
            None => frame,
        };
        self.send(frame).await
    }

    /// Forwards `frame` and the frames already waiting behind it (up to
    /// [`MAX_CORKED`]) with one flush: one write to the socket for all of
    /// them when the session is behind, the same single write as before
    /// when it is not. Returns how many frames the session lagged by, if it
    /// fell out of the live buffer meanwhile (then it reads the change log).
    async fn forward_waiting(
        &mut self,
        frame: Frame,
        frames: &mut broadcast::Receiver<Frame>,
    ) -> Result<Option<u64>, Refusal> {
        self.corked = true;
        let mut result = self.forward(frame).await.map(|()| None);
        for _ in 1..MAX_CORKED {
            if !matches!(result, Ok(None)) {
                break;
            }
            result = match frames.try_recv() {
                Ok(next) => self.forward(next).await.map(|()| None),
                Err(TryRecvError::Lagged(skipped)) => Ok(Some(skipped)),
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            };
        }
        self.corked = false;
        let lagged = result?;
        self.flush().await?;
        Ok(lagged)
    }

    /// Writes out what the socket buffered.
    async fn flush(&mut self) -> Result<(), Refusal> {
        match tokio::time::timeout(self.state.config.send_timeout, self.socket.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Refusal::new(
                ErrorCode::Internal,
                format!("send failed: {e}"),
            )),
            Err(_) => Err(Refusal::new(
                ErrorCode::TooSlow,
                "the client did not read its messages in time",
            )),
        }
    }

    /// A transaction this client does not subscribe to: its position counts
    /// as passed.
    pub(super) fn skipped(&mut self, lsn: Lsn) {
        self.live.advance(lsn);
    }

    pub(super) async fn send(&mut self, frame: Frame) -> Result<(), Refusal> {
        if frame.is_tx {
            self.live.advance(frame.lsn);
        }
        let traced = match &frame.content {
            crate::hub::Content::Tx(tx) if crate::stages::on() => Some(tx.commit_time_us),
            _ => None,
        };
        self.send_message(Message::Text(frame.text)).await?;
        if let Some(commit_time_us) = traced {
            crate::stages::record(crate::stages::Stage::Sent, commit_time_us);
        }
        Ok(())
    }

    pub(super) async fn send_message(&mut self, message: Message) -> Result<(), Refusal> {
        let bytes = match &message {
            Message::Text(text) => text.len(),
            Message::Binary(bytes) => bytes.len(),
            _ => 0,
        };
        let sent = if self.corked {
            tokio::time::timeout(self.state.config.send_timeout, self.socket.feed(message)).await
        } else {
            tokio::time::timeout(self.state.config.send_timeout, self.socket.send(message)).await
        };
        match sent {
            Ok(Ok(())) => {
                add(&self.state.metrics.messages_sent, 1);
                add(&self.state.metrics.bytes_sent, bytes as u64);
                Ok(())
            }
            Ok(Err(e)) => Err(Refusal::new(
                ErrorCode::Internal,
                format!("send failed: {e}"),
            )),
            Err(_) => Err(Refusal::new(
                ErrorCode::TooSlow,
                "the client did not read its messages in time",
            )),
        }
    }
}

/// PostgreSQL's WAL position now.
async fn current_wal(state: &AppState) -> Result<Lsn, Refusal> {
    let client = state.log_reader.client().await.map_err(internal)?;
    let row = client
        .query_one("SELECT pg_current_wal_lsn()", &[])
        .await
        .map_err(|e| internal(crate::ServerError::sql("reading PostgreSQL's WAL position")(e)))?;
    Ok(Lsn(u64::from(row.get::<_, PgLsn>(0))))
}

/// Returns once the capture has reached `target` (never, if the server
/// stops first).
async fn captured_past(mut captured: watch::Receiver<Lsn>, target: Lsn) {
    if captured.wait_for(|lsn| *lsn >= target).await.is_err() {
        std::future::pending::<()>().await;
    }
}
