//! Repairing the replica over the sync socket, where the server would
//! otherwise answer `gone`: table by table, the replica digests key ranges
//! and the server says which differ; differing ranges are cut finer until
//! they are small, then replaced by the server's rows. Unsent local writes
//! stay in the outbox and are put back on top at the end.

use std::time::Instant;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use pgrelay_protocol::repair::{
    decode_repair, encode_repair, CheckSpan, Key, RangeSum, RepairMessage, MAX_CHECK_PARTS,
};
use pgrelay_protocol::{Lsn, Visibility};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::replica::SnapshotDone;
use crate::{ClientError, Event, Replica};

/// Largest repair message accepted from the server, decompressed.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// What a repair moved.
#[derive(Default)]
struct Moved {
    rows_removed: u64,
    rows_received: u64,
    bytes: u64,
    rounds: usize,
    /// Text frames that arrived during the exchange (answers to writes
    /// pushed before `repair_begin`, pongs): handled once it ends.
    deferred: Vec<pgrelay_protocol::ServerMessage>,
}

/// Recorded as the replica's change log while a repair runs: it follows
/// no log until the repair completes, so an interrupted repair is taken up
/// again on the next connection (no server keeps a log of this id).
const UNDER_REPAIR: &str = "(repair under way)";

/// What `repair_begin` and the welcome before it said.
pub(crate) struct Begin {
    pub(crate) resume: Lsn,
    pub(crate) tables: Vec<String>,
    pub(crate) visibility: Visibility,
    /// The change log the replica follows once repaired.
    pub(crate) log_id: Option<String>,
}

/// Runs a repair the server began with `repair_begin`; returns once the
/// replica's position is the snapshot's (`resume`), with the server's text
/// messages that arrived meanwhile, for the caller to handle in order.
pub(crate) async fn run<S>(
    socket: &mut S,
    replica: &Replica,
    events: &broadcast::Sender<Event>,
    begin: Begin,
) -> Result<Vec<pgrelay_protocol::ServerMessage>, ClientError>
where
    S: Sink<Message, Error = WsError> + Stream<Item = Result<Message, WsError>> + Unpin,
{
    let Begin {
        resume,
        tables,
        visibility,
        log_id,
    } = begin;
    let started = Instant::now();
    replica.set_meta("log_id", UNDER_REPAIR.to_owned()).await?;
    tracing::info!(tables = tables.len(), resume = %resume, "repairing the replica range by range");
    let mut moved = Moved::default();
    let mut refetch = Vec::new();
    for table in &tables {
        if !repair_table(socket, replica, table, &mut moved).await? {
            refetch.push(table.clone());
        }
    }
    send(
        socket,
        &RepairMessage::Done {
            refetch: refetch.clone(),
        },
        &mut moved,
    )
    .await?;
    let finishing = Instant::now();
    replica
        .repair_finish(
            SnapshotDone {
                resume,
                full: true,
                tables: tables.clone(),
                visibility,
            },
            refetch.clone(),
        )
        .await?;
    if let Some(log_id) = log_id {
        replica.set_meta("log_id", log_id).await?;
    }
    tracing::debug!(elapsed = ?finishing.elapsed(), "repair finished: position and outbox restored");
    if !refetch.is_empty() {
        tracing::warn!(
            ?refetch,
            "tables still differ after repair; fetching them again"
        );
    }
    tracing::info!(
        removed = moved.rows_removed,
        received = moved.rows_received,
        bytes = moved.bytes,
        rounds = moved.rounds,
        "replica repaired"
    );
    let _ = events.send(Event::Repaired {
        tables,
        rows_removed: moved.rows_removed,
        rows_received: moved.rows_received,
        bytes: moved.bytes,
        rounds: moved.rounds,
        elapsed: started.elapsed(),
        refetch,
    });
    Ok(moved.deferred)
}

/// Repairs one table; returns whether it ends equal to the server's
/// (its full digest matches).
async fn repair_table<S>(
    socket: &mut S,
    replica: &Replica,
    table: &str,
    moved: &mut Moved,
) -> Result<bool, ClientError>
where
    S: Sink<Message, Error = WsError> + Stream<Item = Result<Message, WsError>> + Unpin,
{
    let Some((mut spans, mut held)) = replica
        .repair_digest(table.to_owned(), vec![(None, None, None)])
        .await?
    else {
        // Not held here: it arrives with a snapshot of its own.
        return Ok(true);
    };
    let mut expected = None;
    while !spans.is_empty() {
        moved.rounds += 1;
        let round = Instant::now();
        let mut waited = std::time::Duration::ZERO;
        let mut applied = std::time::Duration::ZERO;
        let mut next: Vec<(Option<Key>, Option<Key>, Option<u64>)> = Vec::new();
        for batch in batches(spans) {
            send(
                socket,
                &RepairMessage::Check {
                    table: table.to_owned(),
                    spans: batch.clone(),
                },
                moved,
            )
            .await?;
            let asked = Instant::now();
            let answer = receive(socket, moved).await?;
            waited += asked.elapsed();
            let (parts, total) = match answer {
                RepairMessage::Diff {
                    table: t,
                    parts,
                    total,
                } if t == table => (parts, total),
                other => return Err(unexpected(&other)),
            };
            if total.is_some() {
                expected = total;
            }
            let mut replace = Vec::new();
            for part in parts {
                let span = batch.get(part.span as usize).ok_or_else(|| {
                    ClientError::Protocol("repair diff names a span not checked".to_owned())
                })?;
                let index = part.part as usize;
                let Some(&rows) = span.rows.get(index) else {
                    return Err(ClientError::Protocol(
                        "repair diff names a part not checked".to_owned(),
                    ));
                };
                let (lo, hi) = span.part_range(index);
                if part.replace {
                    replace.push((lo, hi));
                } else {
                    next.push((lo, hi, Some(rows)));
                }
            }
            let applying = Instant::now();
            if !replace.is_empty() {
                let removing = Instant::now();
                let removed = replica.repair_remove(table.to_owned(), replace).await?;
                tracing::debug!(elapsed = ?removing.elapsed(), rows = removed.rows, "repair: removed");
                moved.rows_removed += removed.rows;
                held.subtract(removed);
            }
            loop {
                match receive(socket, moved).await? {
                    RepairMessage::Rows { table: t, copy } if t == table => {
                        tracing::debug!(bytes = copy.len(), "repair: rows arrived");
                        let added = replica.repair_load(table.to_owned(), copy).await?;
                        moved.rows_received += added.rows;
                        held.merge(added);
                    }
                    RepairMessage::RowsEnd { table: t } if t == table => break,
                    other => return Err(unexpected(&other)),
                }
            }
            applied += applying.elapsed();
        }
        let digesting = Instant::now();
        spans = if next.is_empty() {
            Vec::new()
        } else {
            replica
                .repair_digest(table.to_owned(), next)
                .await?
                .map(|(spans, _)| spans)
                .unwrap_or_default()
        };
        tracing::debug!(
            table,
            round = moved.rounds,
            elapsed = ?round.elapsed(),
            waiting_for_the_server = ?waited,
            removing_and_loading = ?applied,
            digesting_the_next = ?digesting.elapsed(),
            "repair round done"
        );
    }
    Ok(expected == Some((held.rows, RangeSum::hex(&held))))
}

/// Spans grouped into messages of about [`MAX_CHECK_PARTS`] parts.
fn batches(spans: Vec<CheckSpan>) -> Vec<Vec<CheckSpan>> {
    let mut out: Vec<Vec<CheckSpan>> = Vec::new();
    let mut parts = 0;
    for span in spans {
        if parts > 0 && parts + span.parts() > MAX_CHECK_PARTS {
            parts = 0;
        }
        if parts == 0 {
            out.push(Vec::new());
        }
        parts += span.parts();
        if let Some(last) = out.last_mut() {
            last.push(span);
        }
    }
    out
}

fn unexpected(message: &RepairMessage) -> ClientError {
    let kind = match message {
        RepairMessage::Check { .. } => "check",
        RepairMessage::Diff { .. } => "diff",
        RepairMessage::Rows { .. } => "rows",
        RepairMessage::RowsEnd { .. } => "rows_end",
        RepairMessage::Done { .. } => "done",
    };
    ClientError::Protocol(format!("unexpected repair message {kind}"))
}

async fn send<S>(
    socket: &mut S,
    message: &RepairMessage,
    moved: &mut Moved,
) -> Result<(), ClientError>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    let frame = encode_repair(message).map_err(|e| ClientError::Protocol(e.to_string()))?;
    moved.bytes += frame.len() as u64;
    socket.send(Message::Binary(frame.into())).await?;
    Ok(())
}

async fn receive<S>(socket: &mut S, moved: &mut Moved) -> Result<RepairMessage, ClientError>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        let message = socket.next().await.ok_or_else(|| {
            ClientError::Protocol("the server closed the connection mid-repair".to_owned())
        })??;
        match message {
            Message::Binary(bytes) => {
                moved.bytes += bytes.len() as u64;
                return decode_repair(&bytes, MAX_MESSAGE_BYTES)
                    .map_err(|e| ClientError::Protocol(e.to_string()));
            }
            Message::Text(text) => {
                moved.bytes += text.len() as u64;
                match serde_json::from_str(&text) {
                    // An error frame ends the repair with the server's reason.
                    Ok(pgrelay_protocol::ServerMessage::Error { code, message, .. }) => {
                        return Err(ClientError::Refused { code, message });
                    }
                    // The server answers writes the client pushed before
                    // the repair began: kept for after it.
                    Ok(other) => moved.deferred.push(other),
                    Err(e) => {
                        return Err(ClientError::Protocol(format!(
                            "a malformed text frame arrived mid-repair: {e}"
                        )))
                    }
                }
            }
            Message::Close(_) => {
                return Err(ClientError::Protocol(
                    "the server closed the connection mid-repair".to_owned(),
                ))
            }
            _ => continue,
        }
    }
}
