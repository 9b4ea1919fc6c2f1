//! One session per connected client: the handshake, catch-up from the
//! change log, then live transactions from the hub, with no gap and no
//! duplicate between the two (the hub is subscribed to before the log is
//! read, and nothing at or below the last LSN sent goes out twice).
//!
//! Schema changes are ordered with the data: the hub numbers them, and
//! before a snapshot and after every page read from the change log the
//! session announces what changed since its client was last told, so a
//! change published while the session was not listening (hydrating,
//! behind) still comes before the first transaction that needs it.
//!
//! "Caught up" is measured against PostgreSQL: the welcome carries its WAL
//! position at the handshake, and a `caught_up` says how far the capture
//! had got; when that is short of the welcome's position, a second one
//! follows once the capture passes it.
//!
//! Backpressure: a session sends one frame at a time and waits for the
//! socket. While it waits, the hub's bounded ring keeps filling; a session
//! that falls further behind than the ring is told it lagged and reads the
//! change log instead, so a slow client costs no memory of its own. A
//! client that does not read at all is closed with `too_slow` after the
//! send timeout.

mod handshake;
mod hydrate;
pub(crate) mod subscription;
pub(crate) mod table;
mod write;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use pgrelay_protocol::{ErrorCode, Lsn, ServerMessage, TableSchema, PROTOCOL_VERSION};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, watch};
use tokio::time::{interval_at, Instant};
use tokio_postgres::types::PgLsn;
use tracing::Instrument;

use crate::auth::{Action, Principal, Scope};
use crate::history;
use crate::hub::Frame;
use crate::metrics::add;
use crate::ratelimit::TokenBucket;
use crate::registry;
use crate::state::AppState;
use handshake::Hello;
use subscription::{Pass, Subscription};
use table::{LiveSession, Signal};

/// Changes read from the change log per query while catching up.
const CATCH_UP_PAGE: i64 = 5_000;

/// Why a session ended early; sent to the client before closing.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

impl Refusal {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// Runs a session on an upgraded socket. `_place` is its connection's
/// place under `--max-connections`, given back when the session ends.
pub(crate) async fn run(
    mut socket: WebSocket,
    state: Arc<AppState>,
    mut shutdown: watch::Receiver<bool>,
    _place: crate::serve::ConnectionPlace,
) {
    // Rare or one-off steps are boxed: their state would otherwise be part
    // of every idle session's future.
    let hello = match Box::pin(handshake::receive(&mut socket, &state.config)).await {
        Ok(hello) => hello,
        Err(refusal) => return Box::pin(refuse(&mut socket, refusal)).await,
    };
    let principal = match authenticate(&state, &hello) {
        Ok(principal) => principal,
        Err(refusal) => return Box::pin(refuse(&mut socket, refusal)).await,
    };
    let subscription = match Subscription::resolve(hello.tables.clone(), &state.hub.schemas()) {
        Ok(subscription) => subscription,
        Err(refusal) => return Box::pin(refuse(&mut socket, refusal)).await,
    };
    let start = hello.last_lsn.unwrap_or(Lsn::ZERO);
    let span = tracing::info_span!("session", client_id = %hello.client_id, lsn = %start);
    async {
        let live = state.sessions.open(&hello.client_id, start);
        Box::pin(register(&state, &live)).await;
        tracing::debug!(tables = ?hello.tables, "session started");
        // Rows are filtered only when rules are configured; a token alone
        // (no rules) sees everything.
        let scope = principal
            .as_ref()
            .filter(|_| state.hub.filtering())
            .map(|p| Arc::clone(&p.scope));
        let session = Session {
            socket: &mut socket,
            state: &state,
            told: 0,
            client_id: hello.client_id.clone(),
            live: Arc::clone(&live),
            subscription,
            bucket: TokenBucket::full(state.config.message_burst, std::time::Instant::now()),
            scope,
            principal,
            parts: None,
        };
        match session.stream(hello, &mut shutdown).await {
            Ok(Ending::ClientClosed) => tracing::debug!("client closed the connection"),
            Ok(Ending::Shutdown) => {
                let close = CloseFrame {
                    code: 1001,
                    reason: "server shutting down".into(),
                };
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    socket.send(Message::Close(Some(close))),
                )
                .await;
            }
            Err(refusal) => {
                match refusal.code {
                    ErrorCode::TooSlow => add(&state.metrics.too_slow, 1),
                    ErrorCode::Replaced => add(&state.metrics.replaced, 1),
                    _ => {}
                }
                Box::pin(refuse(&mut socket, refusal)).await
            }
        }
        state.sessions.close(&live);
        let key = registry::session_key(&state.instance, &live);
        if let Err(e) = state.registry.unregister(&live.client_id, &key).await {
            add(&state.metrics.registry_errors, 1);
            tracing::warn!(error = %e, "unregistering the client failed; its record expires with the TTL");
        }
        state.sessions.finished();
        tracing::debug!(lsn = %live.sent(), "session ended");
    }
    .instrument(span)
    .await
}

/// Registers the session. Its own future, so the record is not kept in
/// every idle session's state.
async fn register(state: &AppState, live: &LiveSession) {
    let record = registry::record(&state.node, &state.instance, live);
    if let Err(e) = state.registry.register(&record).await {
        add(&state.metrics.registry_errors, 1);
        tracing::warn!(error = %e, "registering the client failed; it syncs unregistered");
    }
}

/// Checks the hello's token when `--auth` is set; `None` without auth.
fn authenticate(state: &AppState, hello: &Hello) -> Result<Option<Principal>, Refusal> {
    let Some(auth) = &state.auth else {
        return Ok(None);
    };
    match auth.authenticate(hello.token.as_deref()) {
        Ok(principal) => {
            state.audit.record(
                Action::Connect,
                Some(&hello.client_id),
                principal.subject.as_deref(),
                format!("scope {}", principal.scope.id),
            );
            Ok(Some(principal))
        }
        Err(refused) => {
            state.audit.record(
                Action::Refused,
                Some(&hello.client_id),
                None,
                refused.reason.clone(),
            );
            let code = if refused.expired {
                ErrorCode::TokenExpired
            } else {
                ErrorCode::Unauthorized
            };
            Err(Refusal::new(
                code,
                format!("token refused: {}", refused.reason),
            ))
        }
    }
}

/// Sends an error frame and closes with the matching close code.
pub(crate) async fn refuse(socket: &mut WebSocket, refusal: Refusal) {
    tracing::debug!(code = ?refusal.code, message = %refusal.message, "closing session");
    let frame = Frame::encode(
        &ServerMessage::Error {
            code: refusal.code,
            message: refusal.message.clone(),
        },
        Lsn::ZERO,
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        socket.send(Message::Text(frame.text)),
    )
    .await;
    let reason: String = refusal.message.chars().take(100).collect();
    let close = CloseFrame {
        code: refusal.code.close_code().0,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        socket.send(Message::Close(Some(close))),
    )
    .await;
}

enum Ending {
    ClientClosed,
    Shutdown,
}

struct Session<'a> {
    socket: &'a mut WebSocket,
    state: &'a AppState,
    /// The schema generation (see `Hub::changed_since`) the client has been
    /// told about.
    told: u64,
    client_id: String,
    /// Its entry in the session table, which holds its position: the commit
    /// LSN of the last transaction sent or skipped (or the client's own).
    live: Arc<LiveSession>,
    subscription: Option<Subscription>,
    /// Frames the client may still send now (`--message-rate`).
    bucket: TokenBucket,
    /// What this client may see, when row rules are configured.
    scope: Option<Arc<Scope>>,
    principal: Option<Principal>,
    /// A transaction arriving in `write_part` frames; boxed, as most
    /// sessions never have one.
    parts: Option<Box<write::Parts<'a>>>,
}

impl Session<'_> {
    async fn stream(
        mut self,
        hello: Hello,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Ending, Refusal> {
        // Taken apart and dropped as soon as used: whatever stays alive here
        // stays in every idle session's state.
        let Hello {
            client_id,
            last_lsn,
            log_id,
            resync,
            token,
            tables: subscribed,
        } = hello;
        drop((token, subscribed));
        let head = self.state.hub.head();
        let ours = self.state.hub.log_id();
        if let Some(theirs) = log_id.as_ref().filter(|id| id.as_str() != &*ours) {
            return Err(Refusal::new(
                ErrorCode::Gone,
                format!(
                    "your replica follows change log {:?}, this server keeps {:?}; re-hydrate",
                    theirs.chars().take(64).collect::<String>(),
                    ours
                ),
            ));
        }
        let start = last_lsn.unwrap_or(Lsn::ZERO);
        if start > head {
            return Err(Refusal::new(
                ErrorCode::Gone,
                format!("your position {start} is ahead of this server's change log ({head}); start a fresh replica"),
            ));
        }
        drop(log_id);
        // What "caught up" is measured against: what PostgreSQL has
        // committed now, not what the change log has captured so far.
        let wal = Box::pin(current_wal(self.state)).await?;
        // Only the tables this client may read (in the welcome, and so in
        // its replica and its snapshot), of those it subscribes to.
        let (told, schemas) = self.state.hub.schemas_at();
        self.told = told;
        let welcome = ServerMessage::Welcome {
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
        // A new replica (no position) gets every table it syncs; a known
        // one only the tables it asks to resync. A client that asked for a
        // snapshot always gets one (perhaps of no table), so it knows when
        // it is complete. Boxed: its state would otherwise sit in every
        // idle session's future.
        let full = last_lsn.is_none();
        if full || !resync.is_empty() {
            let resume = Box::pin(self.hydrate(full, &resync)).await?;
            if full {
                self.live.advance(resume);
            }
        }
        drop(resync);
        // Subscribe before reading the log: whatever is published from now on
        // is in `frames`, whatever was published before is in the log. And
        // whatever PostgreSQL committed before `captured` is in the log now.
        let mut frames = self.state.hub.subscribe();
        let captured = self.state.hub.captured();
        Box::pin(self.catch_up()).await?;
        self.caught_up(head, captured).await?;
        // Until the capture passes `wal`, the client is owed one more
        // `caught_up` (boxed: only sessions that wait hold it).
        let mut owed =
            (captured < wal).then(|| Box::pin(captured_past(self.state.hub.watch_captured(), wal)));

        let period = self.state.config.ping_interval;
        let mut ping = interval_at(Instant::now() + period, period);
        let mut last_heard = Instant::now();
        let live = Arc::clone(&self.live);
        // Only a session with a token has a deadline; boxed, so sessions
        // without one carry no timer.
        let mut expiry = self
            .principal
            .is_some()
            .then(|| Box::pin(tokio::time::sleep_until(self.expiry())));
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(Ending::Shutdown),
                signal = live.signalled() => match signal {
                    Signal::Nudge => Box::pin(self.catch_up()).await?,
                    Signal::Disconnect => return Err(Refusal::new(
                        ErrorCode::Disconnected,
                        "disconnected by an operator",
                    )),
                    Signal::Replaced => return Err(Refusal::new(
                        ErrorCode::Replaced,
                        "another connection with this client id took over; this one will not be served again",
                    )),
                    Signal::None => {}
                },
                _ = async {
                    match expiry.as_mut() {
                        Some(deadline) => deadline.await,
                        None => std::future::pending().await,
                    }
                } => return Err(self.expired()),
                _ = async {
                    match owed.as_mut() {
                        Some(passed) => passed.await,
                        None => std::future::pending().await,
                    }
                } => {
                    owed = None;
                    Box::pin(self.caught_up_with_wal(&mut frames)).await?;
                }
                incoming = self.socket.recv() => {
                    last_heard = Instant::now();
                    if !Box::pin(self.incoming(incoming)).await? {
                        return Ok(Ending::ClientClosed);
                    }
                }
                frame = frames.recv() => match frame {
                    Ok(frame) => self.forward(frame).await?,
                    Err(RecvError::Lagged(skipped)) => {
                        tracing::debug!(skipped, "session fell behind the live buffer; reading the change log");
                        add(&self.state.metrics.catch_ups, 1);
                        frames = frames.resubscribe();
                        Box::pin(self.catch_up()).await?;
                    }
                    Err(RecvError::Closed) => return Ok(Ending::Shutdown),
                },
                _ = ping.tick() => {
                    if last_heard.elapsed() > self.state.config.idle_timeout {
                        return Err(Refusal::new(ErrorCode::TooSlow, "no pong within the idle timeout"));
                    }
                    self.send_message(Message::Ping(Default::default())).await?;
                }
            }
        }
    }

    /// When the token stops being valid (far away without a token).
    fn expiry(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        match &self.principal {
            Some(p) => match p.expires.duration_since(SystemTime::now()) {
                Ok(left) => Instant::now() + left,
                Err(_) => Instant::now(),
            },
            None => far,
        }
    }

    fn expired(&self) -> Refusal {
        self.state.audit.record(
            Action::TokenExpired,
            Some(&self.client_id),
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
    fn position(&self) -> Lsn {
        self.live.sent()
    }

    /// The tables of `schemas` this client is told about: those its token
    /// may read, of those it subscribes to.
    fn visible<'s>(&self, schemas: impl Iterator<Item = &'s TableSchema>) -> Vec<TableSchema> {
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

    /// Tells the client the schema of every table that changed since it was
    /// last told, whether or not this session was listening when the change
    /// was published (it may have been hydrating, or reading the change
    /// log), so nothing reaches the client for a table or column it does
    /// not know. Returns the schemas it is now in step with.
    async fn announce_schemas(&mut self) -> Result<Arc<BTreeMap<String, TableSchema>>, Refusal> {
        let changes = self.state.hub.changed_since(self.told);
        self.told = changes.generation;
        let tables = self.visible(changes.changed.iter().filter_map(|n| changes.tables.get(n)));
        if !tables.is_empty() {
            tracing::debug!(
                tables = tables.len(),
                "announcing schema changes the client missed"
            );
            self.send(Frame::encode(&ServerMessage::Schema { tables }, Lsn::ZERO))
                .await?;
        }
        Ok(changes.tables)
    }

    /// Says the client has everything up to the change log's `head` at its
    /// handshake (and whatever came since), and everything PostgreSQL
    /// committed before `captured`.
    async fn caught_up(&mut self, head: Lsn, captured: Lsn) -> Result<(), Refusal> {
        let lsn = self.position().max(head);
        // The client stores `lsn` as its position; so does the session.
        self.live.advance(lsn);
        self.send(Frame::encode(
            &ServerMessage::CaughtUp {
                lsn,
                wal_lsn: Some(captured),
            },
            Lsn::ZERO,
        ))
        .await
    }

    /// The capture passed the WAL position of the welcome: every frame
    /// published before it is in `frames`; once those are sent, the client
    /// has everything PostgreSQL had committed when it connected.
    async fn caught_up_with_wal(
        &mut self,
        frames: &mut broadcast::Receiver<Frame>,
    ) -> Result<(), Refusal> {
        let captured = self.state.hub.captured();
        let head = self.state.hub.head();
        loop {
            match frames.try_recv() {
                Ok(frame) => self.forward(frame).await?,
                Err(TryRecvError::Lagged(_)) => {
                    add(&self.state.metrics.catch_ups, 1);
                    *frames = frames.resubscribe();
                    Box::pin(self.catch_up()).await?;
                }
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        self.caught_up(head, captured).await
    }

    /// Sends every logged transaction after the client's position.
    async fn catch_up(&mut self) -> Result<(), Refusal> {
        loop {
            if self.expiry() <= Instant::now() {
                return Err(self.expired());
            }
            let client = self.state.log_reader.client().await.map_err(internal)?;
            let txs = match history::read_after(&client, self.position(), CATCH_UP_PAGE).await {
                Ok(txs) => txs,
                Err(e @ crate::ServerError::Pruned { .. }) => {
                    return Err(Refusal::new(ErrorCode::Gone, format!("{e}; re-hydrate")))
                }
                Err(e) => return Err(internal(e)),
            };
            // Read after the page: a schema a transaction of it needs was
            // set before the transaction reached the log.
            self.announce_schemas().await?;
            if txs.is_empty() {
                return Ok(());
            }
            let short = txs.iter().map(|t| t.changes.len() as i64).sum::<i64>() < CATCH_UP_PAGE;
            for tx in txs {
                let lsn = tx.lsn;
                // What the client's token may see, then what it subscribes to.
                let tx = match &self.scope {
                    Some(scope) => scope.filter_tx(&tx),
                    None => Some(tx),
                };
                let tx = tx.and_then(|tx| match &self.subscription {
                    Some(subscription) => subscription.trim(tx),
                    None => Some(tx),
                });
                match tx {
                    Some(tx) => self.send(Frame::transaction(&tx)).await?,
                    None => self.skipped(lsn),
                }
            }
            if short {
                return Ok(());
            }
        }
    }

    async fn forward(&mut self, frame: Frame) -> Result<(), Refusal> {
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

    /// A transaction this client does not subscribe to: its position counts
    /// as passed.
    fn skipped(&mut self, lsn: Lsn) {
        self.live.advance(lsn);
    }

    async fn send(&mut self, frame: Frame) -> Result<(), Refusal> {
        if frame.is_tx {
            self.live.advance(frame.lsn);
        }
        self.send_message(Message::Text(frame.text)).await
    }

    async fn send_message(&mut self, message: Message) -> Result<(), Refusal> {
        let bytes = match &message {
            Message::Text(text) => text.len(),
            Message::Binary(bytes) => bytes.len(),
            _ => 0,
        };
        match tokio::time::timeout(self.state.config.send_timeout, self.socket.send(message)).await
        {
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

    /// Handles a frame from the client after the handshake; `false` when
    /// the client has gone.
    async fn incoming(
        &mut self,
        incoming: Option<Result<Message, axum::Error>>,
    ) -> Result<bool, Refusal> {
        if matches!(incoming, Some(Ok(ref m)) if !matches!(m, Message::Close(_))) {
            let config = &self.state.config;
            if !self.bucket.take(
                config.message_rate,
                config.message_burst,
                std::time::Instant::now(),
            ) {
                add(&self.state.metrics.rate_limited_messages, 1);
                return Err(Refusal::new(
                    ErrorCode::RateLimited,
                    format!(
                        "more than {} messages a second (burst {}); reconnect later and send less",
                        config.message_rate, config.message_burst
                    ),
                ));
            }
        }
        let parsed = match incoming {
            None | Some(Ok(Message::Close(_))) => return Ok(false),
            Some(Err(e)) => return Err(handshake::read_error(e)),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Ok(true),
            Some(Ok(Message::Text(text))) => write::parse(text.as_bytes()),
            Some(Ok(Message::Binary(bytes))) => write::parse(&bytes),
        };
        self.live.touch();
        self.handle(parsed).await?;
        Ok(true)
    }

    async fn handle(&mut self, parsed: write::Incoming) -> Result<(), Refusal> {
        match parsed {
            write::Incoming::Write(batch) => {
                self.interrupt_parts("a write").await?;
                self.write(batch).await?
            }
            write::Incoming::WritePart(part, bytes) => {
                Box::pin(self.write_part(part, bytes)).await?
            }
            write::Incoming::Refused {
                batch_id,
                code,
                message,
            } => {
                self.interrupt_parts("a refused write").await?;
                self.refuse_batch(batch_id, code, message).await?
            }
            write::Incoming::Ping => {
                self.send(Frame::encode(&ServerMessage::Pong, Lsn::ZERO))
                    .await?;
            }
            // A late verdict on a snapshot already settled: nothing to do.
            write::Incoming::SnapshotDone(_) => {}
            write::Incoming::Fatal(refusal) => return Err(refusal),
        }
        Ok(())
    }

    /// Applies a client's batch and answers it. Nothing is forwarded while
    /// it runs, so every transaction sent before the answer committed
    /// before the rows a rejection reports were read.
    async fn write(&mut self, batch: pgrelay_protocol::WriteBatch) -> Result<(), Refusal> {
        if let Some(other) = batch.client_id.as_ref().filter(|c| **c != self.client_id) {
            let refused = ServerMessage::WriteRefused {
                batch_id: batch.batch_id.clone(),
                code: pgrelay_protocol::BatchRefusal::MalformedBatch,
                message: format!(
                    "client_id {:?} is not this connection's client",
                    other.chars().take(64).collect::<String>()
                ),
            };
            add(&self.state.metrics.batches_refused, 1);
            return self.send(Frame::encode(&refused, Lsn::ZERO)).await;
        }
        let schemas = self.state.hub.schemas();
        let results = self
            .state
            .writer
            .apply(&self.client_id, &batch, &schemas, self.scope.as_deref())
            .await;
        self.state.metrics.record_results(&results);
        let subject = self.principal.as_ref().and_then(|p| p.subject.as_deref());
        audit_rejections(&self.state.audit, &self.client_id, subject, &results);
        self.send(Frame::encode(
            &ServerMessage::WriteResult(results),
            Lsn::ZERO,
        ))
        .await
    }
}

/// Writes refused by the rules go to the audit trail.
pub(crate) fn audit_rejections(
    audit: &crate::auth::Audit,
    client_id: &str,
    subject: Option<&str>,
    results: &pgrelay_protocol::WriteResults,
) {
    for result in &results.results {
        if result.code == Some(pgrelay_protocol::RejectCode::Forbidden) {
            audit.record(
                Action::WriteRejected,
                Some(client_id),
                subject,
                format!(
                    "transaction {}: {}",
                    result.id,
                    result.reason.as_deref().unwrap_or("")
                ),
            );
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

fn internal(e: crate::ServerError) -> Refusal {
    tracing::warn!(error = %e, "session failed");
    Refusal::new(
        ErrorCode::Internal,
        "the server could not read its change log; reconnect to resume",
    )
}
