//! One connection to the server: handshake, then transactions applied to
//! the replica in batches, with a heartbeat to notice a dead connection;
//! and the outbox of local writes pushed in order, one batch in flight.

mod apply;
mod frames;
mod push;

use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use pgrelay_protocol::{ClientMessage, Lsn, ServerMessage, PROTOCOL_VERSION};
use tokio::sync::{broadcast, Notify};
use tokio::time::{interval_at, Instant};
use tokio_tungstenite::tungstenite::Message;

use crate::hydrate::Hydration;
use crate::{ClientConfig, ClientError, Event, Replica};
use apply::{advance, flush};
use frames::{decode, socket_config};
use push::Pusher;

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
    let connector = crate::tls::connector(config, &url)?;
    let (mut socket, _) = tokio_tungstenite::connect_async_tls_with_config(
        url.as_str(),
        Some(socket_config()),
        // TCP_NODELAY, so a small frame (a write batch, a ping) is not held
        // back waiting for the ACK of the previous one.
        true,
        connector,
    )
    .await
    .map_err(|e| crate::tls::connect_error(&url, e))?;
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
        repair: true,
        schema_version: Some(state.schema_version),
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
    // The welcome's change log, which a repair records once complete.
    let mut welcome_log: Option<String> = None;
    let mut migrations = crate::migrations::Migrations::default();
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
            _ = migrations.due() => {
                for report in migrations.run(replica, events).await? {
                    socket.send(Message::Text(report.into())).await?;
                }
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
        let mut batch = apply::Batch::default();
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
            let received_us = apply::now_us();
            match decode(message)? {
                Some(ServerMessage::Tx(tx)) => batch.push(tx, received_us),
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
                                welcome_log = Some(log_id.clone());
                                // A replica with a position in another log is
                                // repaired next, and takes the new log's id
                                // only once repaired: cut off before that, it
                                // must still be told apart from one that
                                // follows this log.
                                let other_log = state.lsn.is_some()
                                    && state.log_id.as_ref().is_some_and(|ours| *ours != log_id);
                                if !other_log {
                                    replica.set_meta("log_id", log_id).await?;
                                }
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
                        ServerMessage::RepairBegin {
                            resume_lsn,
                            tables,
                            visibility,
                        } => {
                            // The exchange holds the socket until the
                            // replica is repaired.
                            let deferred = crate::repair::run(
                                &mut socket,
                                replica,
                                events,
                                crate::repair::Begin {
                                    resume: resume_lsn,
                                    tables,
                                    visibility,
                                    log_id: welcome_log.clone(),
                                },
                            )
                            .await?;
                            applied = resume_lsn;
                            awaiting_snapshot = false;
                            // Answers to writes pushed before the repair began.
                            for message in deferred {
                                if side_message(
                                    message,
                                    &mut pusher,
                                    replica,
                                    events,
                                    &mut migrations,
                                )
                                .await?
                                .is_some()
                                {
                                    return Err(ClientError::Protocol(
                                        "a sync message arrived mid-repair".to_owned(),
                                    ));
                                }
                            }
                            pusher.wake();
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
                        ServerMessage::Error { code, message, .. } => {
                            return Err(ClientError::Refused { code, message })
                        }
                        side @ (ServerMessage::WriteResult(_)
                        | ServerMessage::WriteRefused { .. }
                        | ServerMessage::Migrations { .. }
                        | ServerMessage::Pong) => {
                            side_message(side, &mut pusher, replica, events, &mut migrations)
                                .await?;
                        }
                        ServerMessage::Tx(_) => {}
                    }
                }
                None => {}
            }
            if batch.changes() >= MAX_APPLY_CHANGES {
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
            // Idle from here on: the replica digests itself for a repair.
            replica.start_digests().await?;
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
/// Answers to pushed writes, client migrations and pongs: handled alike
/// whenever they arrive, also after a repair held them back. Any other
/// message is handed back unhandled.
async fn side_message(
    message: ServerMessage,
    pusher: &mut Pusher,
    replica: &Replica,
    events: &broadcast::Sender<Event>,
    migrations: &mut crate::migrations::Migrations,
) -> Result<Option<ServerMessage>, ClientError> {
    match message {
        ServerMessage::WriteResult(results) => pusher.answered(replica, events, results).await?,
        ServerMessage::WriteRefused {
            batch_id,
            code,
            message,
        } => {
            pusher
                .refused(replica, events, batch_id, code, message)
                .await?
        }
        ServerMessage::Migrations {
            migrations: list, ..
        } => migrations.receive(list),
        ServerMessage::Pong => {}
        other => return Ok(Some(other)),
    }
    Ok(None)
}

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

/// Exponential backoff with full jitter, capped.
pub(crate) fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
    let jitter = rand::random::<f64>();
    exp.mul_f64(0.5 + jitter / 2.0)
}
