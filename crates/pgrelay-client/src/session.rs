//! One connection to the server: handshake, then transactions applied to
//! the replica in batches, with a heartbeat to notice a dead connection;
//! and the outbox of local writes pushed in order, one batch in flight.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{FutureExt, SinkExt, StreamExt};
use pgrelay_protocol::{
    ClientMessage, CloseCode, ErrorCode, Lsn, ServerMessage, Transaction, PROTOCOL_VERSION,
};
use tokio::sync::{broadcast, Notify};
use tokio::time::{interval_at, Instant};
use tokio_tungstenite::tungstenite::Message;

use crate::hydrate::Hydration;
use crate::replica::Outcome;
use crate::{ClientConfig, ClientError, Event, Replica};

/// Changes applied in one SQLite transaction at most, when many are waiting.
const MAX_APPLY_CHANGES: usize = 10_000;

/// How a connection ended without an error.
pub(crate) enum Ending {
    CaughtUp,
    Shutdown,
}

pub(crate) async fn connect_and_sync(
    config: &ClientConfig,
    turn: usize,
    replica: &Replica,
    events: &broadcast::Sender<Event>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    welcomed: &mut bool,
    writes: &Notify,
) -> Result<Ending, ClientError> {
    let url = config.sync_url(turn);
    let token = config.current_token().await?;
    let (mut socket, _) =
        // `true`: TCP_NODELAY, so a small frame (a write batch, a ping) is
        // not held back waiting for the ACK of the previous one.
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(socket_config()), true)
            .await
            .map_err(|e| ClientError::Connect {
                url: url.clone(),
                message: e.to_string(),
            })?;
    let state = replica.state().await?;
    let client_id = state.client_id.clone().unwrap_or_default();
    let hello = ClientMessage::Hello {
        protocol_version: PROTOCOL_VERSION,
        client_id,
        token,
        last_lsn: state.lsn,
        log_id: state.log_id.clone(),
        resync: state.resync.clone(),
        tables: config.tables.clone(),
    };
    let hello = serde_json::to_string(&hello).map_err(|e| ClientError::Protocol(e.to_string()))?;
    socket.send(Message::Text(hello.into())).await?;

    let mut applied = state.lsn.unwrap_or(Lsn::ZERO);
    let mut target: Option<Lsn> = None;
    // PostgreSQL's WAL position at the welcome, and how far the server
    // says its capture has sent us (`caught_up`): caught up means holding
    // everything PostgreSQL had committed when we connected.
    let mut wal_target: Option<Lsn> = None;
    let mut wal_sent: Option<Lsn> = None;
    let mut ping = interval_at(Instant::now() + config.ping_interval, config.ping_interval);
    let mut last_heard = Instant::now();
    let mut pusher = Pusher::new(config);
    let mut poll = interval_at(Instant::now() + config.outbox_poll, config.outbox_poll);
    let mut caught_up = false;
    let mut hydration: Option<Hydration> = None;
    // A replica without a position (or with tables to resync) is sent a
    // snapshot first; it is not caught up before that is in.
    let mut awaiting_snapshot = state.lsn.is_none() || !state.resync.is_empty();
    loop {
        // Local writes wait until a snapshot is in: the rows they touch are
        // being replaced.
        if pusher.due() && hydration.is_none() {
            // A large transaction goes as several `write_part` frames in a
            // row; the server answers once, after the last.
            for frame in pusher.take(replica, events).await? {
                socket.send(Message::Text(frame.into())).await?;
            }
        }
        if caught_up && config.exit_when_caught_up && pusher.idle(replica).await? {
            let _ = socket.close(None).await;
            return Ok(Ending::CaughtUp);
        }
        let message = tokio::select! {
            biased;
            _ = shutdown.changed() => {
                let _ = socket.close(None).await;
                return Ok(Ending::Shutdown);
            }
            _ = writes.notified() => {
                pusher.wake();
                continue;
            }
            _ = poll.tick() => {
                // Picks up writes made by other processes and retries due.
                pusher.wake();
                continue;
            }
            message = socket.next() => message,
            _ = ping.tick() => {
                if last_heard.elapsed() > config.idle_timeout {
                    return Err(ClientError::Silent(config.idle_timeout));
                }
                socket.send(Message::Ping(Default::default())).await?;
                continue;
            }
        };
        last_heard = Instant::now();
        let Some(message) = message else {
            return Err(ClientError::Protocol(
                "the server closed the connection".to_owned(),
            ));
        };
        let mut batch: Vec<Transaction> = Vec::new();
        let mut next = Some(message?);
        // Gather the transactions already received, to commit them together.
        while let Some(message) = next.take() {
            if let (Message::Binary(frame), Some(h)) = (&message, hydration.as_mut()) {
                h.chunk(replica, events, frame).await?;
                next = match socket.next().now_or_never() {
                    Some(Some(message)) => Some(message?),
                    _ => None,
                };
                continue;
            }
            match decode(message)? {
                Some(ServerMessage::Tx(tx)) => batch.push(tx),
                Some(other) => {
                    applied = flush(replica, events, &mut batch, applied).await?;
                    match other {
                        ServerMessage::Welcome {
                            head_lsn,
                            tables,
                            log_id,
                            wal_lsn,
                            ..
                        } => {
                            if let Some(log_id) = log_id {
                                replica.set_meta("log_id", log_id).await?;
                            }
                            resync_new_tables(replica, events, tables, &state.resync).await?;
                            target = Some(head_lsn);
                            wal_target = wal_lsn;
                            *welcomed = true;
                            let _ = events.send(Event::Connected { head: head_lsn });
                            // Whatever the outbox holds goes out now.
                            pusher.wake();
                        }
                        ServerMessage::Schema { tables } => {
                            // Before this connection's snapshot, the tables
                            // it was asked for are on their way.
                            let coming: &[String] = if awaiting_snapshot {
                                &state.resync
                            } else {
                                &[]
                            };
                            resync_new_tables(replica, events, tables, coming).await?
                        }
                        ServerMessage::SnapshotBegin {
                            resume_lsn,
                            full,
                            tables,
                            visibility,
                        } => {
                            hydration = Some(
                                Hydration::begin(replica, resume_lsn, full, tables, visibility)
                                    .await?,
                            );
                        }
                        ServerMessage::SnapshotTable(digest) => {
                            let h = hydration.as_mut().ok_or_else(|| {
                                ClientError::Protocol(
                                    "snapshot_table outside a snapshot".to_owned(),
                                )
                            })?;
                            h.table_done(replica, events, digest).await?;
                        }
                        ServerMessage::SnapshotEnd {} => {
                            let h = hydration.as_mut().ok_or_else(|| {
                                ClientError::Protocol("snapshot_end outside a snapshot".to_owned())
                            })?;
                            let (verdict, complete) = h.end(replica, events).await?;
                            let frame = serde_json::to_string(&verdict)
                                .map_err(|e| ClientError::Protocol(e.to_string()))?;
                            socket.send(Message::Text(frame.into())).await?;
                            if complete {
                                if h.is_full() {
                                    applied = h.resume();
                                }
                                hydration = None;
                                awaiting_snapshot = false;
                                pusher.wake();
                            }
                        }
                        ServerMessage::SnapshotQueued { waiting } => {
                            tracing::info!(
                                waiting,
                                "the server is busy with other snapshots; queued"
                            );
                        }
                        ServerMessage::CaughtUp { lsn, wal_lsn } => {
                            // Everything up to `lsn` that this client syncs
                            // has been sent and applied above; transactions
                            // of other tables were left out, so the position
                            // moves on without them.
                            applied = advance(replica, applied, lsn).await?;
                            target = Some(lsn);
                            wal_sent = wal_sent.max(wal_lsn);
                        }
                        ServerMessage::Error { code, message } => {
                            return Err(ClientError::Refused { code, message })
                        }
                        ServerMessage::WriteResult(results) => {
                            pusher.answered(replica, events, results).await?;
                        }
                        ServerMessage::WriteRefused {
                            batch_id,
                            code,
                            message,
                        } => {
                            pusher
                                .refused(replica, events, batch_id, code, message)
                                .await?
                        }
                        ServerMessage::Tx(_) | ServerMessage::Pong => {}
                    }
                }
                None => {}
            }
            if batch.iter().map(|t| t.changes.len()).sum::<usize>() >= MAX_APPLY_CHANGES {
                break;
            }
            next = match socket.next().now_or_never() {
                Some(Some(message)) => Some(message?),
                _ => None,
            };
        }
        applied = flush(replica, events, &mut batch, applied).await?;
        // Not while a snapshot is still arriving: the replica is incomplete.
        // A server that names no WAL position (an older one) means its
        // change log's head at the welcome.
        let reached = !awaiting_snapshot
            && target.is_some_and(|t| applied >= t)
            && wal_target.is_none_or(|w| wal_sent.is_some_and(|sent| sent >= w));
        if reached {
            let _ = events.send(Event::CaughtUp { lsn: applied });
            caught_up = true;
            // Once caught up, report it only once per connection.
            target = None;
        }
    }
}

/// Applies table schemas; a table this replica did not have before (or
/// whose column types changed) needs its rows from a snapshot, so the
/// connection ends and the next one asks for it, unless it is among the
/// tables this connection's snapshot brings (`coming`).
async fn resync_new_tables(
    replica: &Replica,
    events: &broadcast::Sender<Event>,
    tables: Vec<pgrelay_protocol::TableSchema>,
    coming: &[String],
) -> Result<(), ClientError> {
    let applied = replica.apply_schema(tables).await?;
    for (table, reason) in applied.refused {
        tracing::warn!(%table, %reason, "table is not synced");
        let _ = events.send(Event::SchemaUnsupported { table, reason });
    }
    let mut needed = applied.needed;
    needed.retain(|t| !coming.contains(t));
    if needed.is_empty() {
        return Ok(());
    }
    tracing::info!(tables = ?needed, "tables need a snapshot; reconnecting to fetch them");
    replica.request_resync(needed.clone()).await?;
    Err(ClientError::Resync(needed))
}

/// tungstenite zero-fills its whole read buffer before every read (128 KiB
/// by default); a smaller one costs less per frame, and grows for big frames.
fn socket_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
}

const READ_BUFFER_BYTES: usize = 16 * 1024;

/// How the server starts every transaction frame (the tag comes first).
const TX_PREFIX: &[u8] = br#"{"type":"tx","#;

fn decode(message: Message) -> Result<Option<ServerMessage>, ClientError> {
    let bytes = match &message {
        Message::Text(text) => text.as_bytes(),
        Message::Binary(bytes) => bytes,
        Message::Close(frame) => {
            if let Some(f) = frame
                .as_ref()
                .filter(|f| u16::from(f.code) == CloseCode::TOKEN_EXPIRED.0)
            {
                // The close code alone says the token was refused, should
                // the `error` frame before it have been lost.
                return Err(ClientError::Refused {
                    code: ErrorCode::TokenExpired,
                    message: f.reason.to_string(),
                });
            }
            let reason = frame
                .as_ref()
                .map(|f| format!("{} {}", f.code, f.reason))
                .unwrap_or_default();
            return Err(ClientError::Protocol(format!(
                "the server closed the connection: {reason}"
            )));
        }
        _ => return Ok(None),
    };
    let decoded = if bytes.starts_with(TX_PREFIX) {
        // Nearly every frame is a transaction: decode it directly instead of
        // through the tagged enum, which buffers the whole frame first.
        serde_json::from_slice::<Transaction>(bytes).map(ServerMessage::Tx)
    } else {
        serde_json::from_slice(bytes)
    };
    decoded
        .map(Some)
        .map_err(|e| ClientError::Protocol(format!("bad message from the server: {e}")))
}

async fn flush(
    replica: &Replica,
    events: &broadcast::Sender<Event>,
    batch: &mut Vec<Transaction>,
    applied: Lsn,
) -> Result<Lsn, ClientError> {
    if batch.is_empty() {
        return Ok(applied);
    }
    let txs = std::mem::take(batch);
    let changes = txs.iter().map(|t| t.changes.len()).sum();
    let count = txs.len();
    let commit_times_us: Vec<i64> = txs.iter().map(|t| t.commit_time_us).collect();
    let origins: Vec<(Lsn, String)> = txs
        .iter()
        .filter_map(|t| t.origin.clone().map(|o| (t.lsn, o)))
        .collect();
    let newest_commit = commit_times_us.last().copied().unwrap_or(0);
    let applied = replica.apply(txs).await?;
    let reached = applied.lsn;
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    let _ = events.send(Event::Applied {
        lsn: reached,
        transactions: count,
        changes,
        lag_ms: (now_us - newest_commit) / 1000,
        commit_times_us,
        applied_at_us: now_us,
        origins,
    });
    if !applied.unknown.is_empty() {
        // Committed, and recorded for a snapshot: the next connection
        // fetches those tables (a server that announced them would have
        // sent their schema first).
        tracing::warn!(tables = ?applied.unknown, "changes for tables this replica does not know; reconnecting to fetch them");
        return Err(ClientError::Resync(applied.unknown));
    }
    Ok(reached)
}

/// Stores `lsn` as the replica's position when it is ahead: an empty
/// transaction moves the position in the same SQLite transaction as any
/// other would.
async fn advance(replica: &Replica, applied: Lsn, lsn: Lsn) -> Result<Lsn, ClientError> {
    if lsn <= applied {
        return Ok(applied);
    }
    let marker = Transaction {
        lsn,
        xid: 0,
        commit_time_us: 0,
        origin: None,
        changes: Vec::new(),
    };
    replica.apply_transactions(vec![marker]).await
}

/// Exponential backoff with full jitter, capped.
pub(crate) fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
    let jitter = rand::random::<f64>();
    exp.mul_f64(0.5 + jitter / 2.0)
}

/// Pushes the outbox: one batch in flight at a time, in capture order;
/// after a `retry` answer the next push waits out a backoff.
struct Pusher {
    in_flight: Option<InFlight>,
    wanted: bool,
    not_before: Instant,
    attempt: u32,
    /// After a refused batch, send one transaction at a time until one is
    /// answered, so a single bad transaction is found and set aside.
    one_at_a_time: bool,
    backoff_base: Duration,
    backoff_cap: Duration,
}

impl Pusher {
    fn new(config: &ClientConfig) -> Pusher {
        Pusher {
            in_flight: None,
            wanted: false,
            not_before: Instant::now(),
            attempt: 0,
            one_at_a_time: false,
            backoff_base: config.backoff_base,
            backoff_cap: config.backoff_cap,
        }
    }

    fn wake(&mut self) {
        self.wanted = true;
    }

    fn due(&self) -> bool {
        self.wanted && self.in_flight.is_none() && Instant::now() >= self.not_before
    }

    /// Nothing in flight and nothing left to send.
    async fn idle(&self, replica: &Replica) -> Result<bool, ClientError> {
        Ok(self.in_flight.is_none() && !replica.has_unsent_writes().await?)
    }

    /// The next batch's frames, marked sent in the outbox (none when
    /// nothing waits). A set-aside write ends the connection with
    /// [`ClientError::Resync`]: the next one fetches its tables again.
    async fn take(
        &mut self,
        replica: &Replica,
        events: &broadcast::Sender<Event>,
    ) -> Result<Vec<String>, ClientError> {
        self.wanted = false;
        let max_txs = if self.one_at_a_time {
            1
        } else {
            pgrelay_protocol::MAX_WRITE_TRANSACTIONS
        };
        let taken = replica.take_batch(max_txs).await?;
        if !taken.set_aside.is_empty() {
            report(events, taken.set_aside, (None, None));
            // What followed it may be sent now.
            self.wanted = true;
        }
        if !taken.resync.is_empty() {
            return Err(ClientError::Resync(taken.resync));
        }
        if taken.frames.is_empty() {
            return Ok(Vec::new());
        }
        tracing::debug!(
            transactions = taken.tx_ids.len(),
            frames = taken.frames.len(),
            "pushing local writes"
        );
        self.in_flight = Some(InFlight {
            batch_id: taken.batch_id,
            tx_ids: taken.tx_ids,
        });
        Ok(taken.frames)
    }

    async fn answered(
        &mut self,
        replica: &Replica,
        events: &broadcast::Sender<Event>,
        results: pgrelay_protocol::WriteResults,
    ) -> Result<(), ClientError> {
        let bounds = (results.lsn_floor, results.lsn);
        let outcomes = replica.record_results(results).await?;
        let retry = outcomes
            .iter()
            .any(|o| o.status == pgrelay_protocol::WriteStatus::Retry);
        report(events, outcomes, bounds);
        self.in_flight = None;
        self.one_at_a_time = false;
        if retry {
            let delay = backoff(self.attempt, self.backoff_base, self.backoff_cap);
            self.attempt = self.attempt.saturating_add(1);
            self.not_before = Instant::now() + delay;
        } else {
            self.attempt = 0;
        }
        // More may be waiting (or due after the backoff, on the poll tick).
        self.wanted = true;
        Ok(())
    }

    async fn refused(
        &mut self,
        replica: &Replica,
        events: &broadcast::Sender<Event>,
        batch_id: Option<String>,
        code: pgrelay_protocol::BatchRefusal,
        message: String,
    ) -> Result<(), ClientError> {
        tracing::warn!(?batch_id, ?code, %message, "the server refused a batch of local writes");
        let Some(sent) = self.in_flight.take() else {
            return Ok(());
        };
        if sent.batch_id != batch_id && batch_id.is_some() {
            self.in_flight = Some(sent);
            return Ok(());
        }
        self.wanted = true;
        match (self.one_at_a_time, sent.tx_ids.as_slice()) {
            (true, [tx_id]) => {
                // A single transaction the server will never take: set it
                // aside so it does not block every write after it, and get
                // the server's rows back for the tables it wrote.
                self.one_at_a_time = false;
                let (outcome, resync) = replica
                    .set_aside(tx_id.clone(), format!("{code:?}: {message}"))
                    .await?;
                report(events, vec![outcome], (None, None));
                if !resync.is_empty() {
                    return Err(ClientError::Resync(resync));
                }
            }
            _ => self.one_at_a_time = true,
        }
        Ok(())
    }
}

/// The batch awaiting its answer.
struct InFlight {
    batch_id: Option<String>,
    tx_ids: Vec<String>,
}

/// Sends an event per outcome; `bounds` are the batch's `(lsn_floor, lsn)`.
fn report(
    events: &broadcast::Sender<Event>,
    outcomes: Vec<Outcome>,
    bounds: (Option<Lsn>, Option<Lsn>),
) {
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    for outcome in outcomes {
        let event = match outcome.status {
            pgrelay_protocol::WriteStatus::Applied => Event::WriteApplied {
                tx_id: outcome.tx_id,
                changes: outcome.changes,
                latency: Duration::from_micros((now_us - outcome.created_us).max(0) as u64),
                lsn_floor: bounds.0,
                lsn: bounds.1,
            },
            pgrelay_protocol::WriteStatus::Rejected => {
                let reason = outcome.reason.unwrap_or_default();
                tracing::warn!(tx_id = %outcome.tx_id, %reason, "local write rejected by the server; rolled back");
                Event::WriteRejected {
                    tx_id: outcome.tx_id,
                    reason,
                }
            }
            pgrelay_protocol::WriteStatus::Retry => Event::WriteRetry {
                tx_id: outcome.tx_id,
                reason: outcome.reason.unwrap_or_default(),
            },
        };
        let _ = events.send(event);
    }
}

#[cfg(test)]
mod tests {
    use pgrelay_protocol::{Change, Lsn, Op, ServerMessage, Transaction};
    use tokio_tungstenite::tungstenite::Message;

    #[test]
    fn transaction_fast_path_decodes_like_the_enum() {
        let tx = Transaction {
            lsn: Lsn(42),
            xid: 9,
            commit_time_us: 1,
            origin: None,
            changes: vec![Change {
                table: "public.t".to_owned(),
                op: Op::Delete,
                new: None,
                old: Some([("id".to_owned(), Some("1".to_owned()))].into()),
            }],
        };
        let text = serde_json::to_string(&ServerMessage::Tx(tx.clone())).unwrap();
        assert!(text.as_bytes().starts_with(super::TX_PREFIX));
        let decoded = super::decode(Message::Text(text.into())).unwrap();
        assert_eq!(decoded, Some(ServerMessage::Tx(tx)));
        let caught_up = ServerMessage::CaughtUp {
            lsn: Lsn(42),
            wal_lsn: Some(Lsn(43)),
        };
        let other = serde_json::to_string(&caught_up).unwrap();
        assert_eq!(
            super::decode(Message::Text(other.into())).unwrap(),
            Some(caught_up)
        );
        // An older server's `caught_up` has no WAL position.
        assert_eq!(
            super::decode(Message::Text(r#"{"type":"caught_up","lsn":"0/2A"}"#.into())).unwrap(),
            Some(ServerMessage::CaughtUp {
                lsn: Lsn(42),
                wal_lsn: None
            })
        );
    }
}
