//! One connection to the server: handshake, then transactions applied to
//! the replica in batches, with a heartbeat to notice a dead connection.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{FutureExt, SinkExt, StreamExt};
use pgrelay_protocol::{ClientMessage, Lsn, ServerMessage, Transaction, PROTOCOL_VERSION};
use tokio::sync::broadcast;
use tokio::time::{interval_at, Instant};
use tokio_tungstenite::tungstenite::Message;

use crate::{ClientConfig, ClientError, Event, Replica};

/// Changes applied in one SQLite transaction at most, when many are waiting.
const MAX_APPLY_CHANGES: usize = 10_000;

/// How a connection ended without an error.
pub(crate) enum Outcome {
    CaughtUp,
    Shutdown,
}

pub(crate) async fn connect_and_sync(
    config: &ClientConfig,
    replica: &Replica,
    events: &broadcast::Sender<Event>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    welcomed: &mut bool,
) -> Result<Outcome, ClientError> {
    let url = config.sync_url();
    let (mut socket, _) =
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(socket_config()), false)
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
        token: config.token.clone(),
        last_lsn: state.lsn,
    };
    let hello = serde_json::to_string(&hello).map_err(|e| ClientError::Protocol(e.to_string()))?;
    socket.send(Message::Text(hello.into())).await?;

    let mut applied = state.lsn.unwrap_or(Lsn::ZERO);
    let mut target: Option<Lsn> = None;
    let mut ping = interval_at(Instant::now() + config.ping_interval, config.ping_interval);
    let mut last_heard = Instant::now();
    loop {
        let message = tokio::select! {
            biased;
            _ = shutdown.changed() => {
                let _ = socket.close(None).await;
                return Ok(Outcome::Shutdown);
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
            match decode(message)? {
                Some(ServerMessage::Tx(tx)) => batch.push(tx),
                Some(other) => {
                    applied = flush(replica, events, &mut batch, applied).await?;
                    match other {
                        ServerMessage::Welcome {
                            head_lsn, tables, ..
                        } => {
                            replica.apply_schema(tables).await?;
                            target = Some(head_lsn);
                            *welcomed = true;
                            let _ = events.send(Event::Connected { head: head_lsn });
                        }
                        ServerMessage::Schema { tables } => replica.apply_schema(tables).await?,
                        ServerMessage::CaughtUp { lsn } => target = Some(lsn),
                        ServerMessage::Error { code, message } => {
                            return Err(ClientError::Refused { code, message })
                        }
                        ServerMessage::Tx(_) => {}
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
        if let Some(target) = target {
            if applied >= target {
                let _ = events.send(Event::CaughtUp { lsn: applied });
                if config.exit_when_caught_up {
                    let _ = socket.close(None).await;
                    return Ok(Outcome::CaughtUp);
                }
            }
        }
        // Once caught up, report it only once per connection.
        if target.is_some_and(|t| applied >= t) {
            target = None;
        }
    }
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
    let newest_commit = commit_times_us.last().copied().unwrap_or(0);
    let reached = replica.apply_transactions(txs).await?;
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
    });
    Ok(reached)
}

/// Exponential backoff with full jitter, capped.
pub(crate) fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
    let jitter = rand::random::<f64>();
    exp.mul_f64(0.5 + jitter / 2.0)
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
        let other = serde_json::to_string(&ServerMessage::CaughtUp { lsn: Lsn(42) }).unwrap();
        assert_eq!(
            super::decode(Message::Text(other.into())).unwrap(),
            Some(ServerMessage::CaughtUp { lsn: Lsn(42) })
        );
    }
}
