//! Repair instead of `gone`: a client that can repair and whose position
//! the change log cannot serve (behind retention, another log, a lost
//! slot) is compared with a consistent snapshot range by range and sent
//! only the rows that differ; then the stream resumes from the snapshot's
//! position with the same hand-over as hydration.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Message;
use futures_util::StreamExt;
use pgrelay_pg::ConnInfo;
use pgrelay_protocol::repair::{decode_repair, encode_repair, CheckSpan, RangeSum, RepairMessage};
use pgrelay_protocol::{ErrorCode, Lsn, ServerMessage, TableSchema};

use super::{write, Refusal, Session};
use crate::hub::Frame;
use crate::ops::metrics::add;
use crate::repair::{
    answer, replaced_batches, replaced_rows, twin_split, written_since, Dirty, Kept, RepairError,
    Since,
};
use crate::snapshot::Snapshot;

/// How long the client may take between two repair frames (it digests
/// its own ranges meanwhile).
const CLIENT_TURN: Duration = Duration::from_secs(120);

/// Largest repair message a client may send, decompressed.
const MAX_CHECK_BYTES: usize = 16 << 20;

/// COPY text per `rows` message, about.
const ROWS_BYTES: usize = 256 * 1024;

impl Session<'_> {
    /// Repairs every table the client syncs; returns the change-log
    /// position from which transactions follow.
    pub(super) async fn repair(&mut self) -> Result<Lsn, Refusal> {
        let _permit = self.wait_for_slot().await?;
        let schemas = self.announce_schemas().await?;
        let tables: Vec<TableSchema> = self
            .visible(schemas.values())
            .into_iter()
            .filter(|t| t.skipped.is_none())
            .collect();
        drop(schemas);
        // Taken before the snapshot opens: each was made from an earlier
        // snapshot, so the change log holds everything between the two.
        let kept = self.state.kept.all();
        // As for hydration: read before the snapshot, so the client's
        // visibility filter drops what the snapshot holds.
        let head = self.state.hub.head();
        let snapshot = Snapshot::open(&self.state.database)
            .await
            .map_err(super::internal)?;
        // Lower when a transaction logged by then was not yet visible.
        let resume = snapshot.resume_at(head).await.map_err(super::internal)?;
        snapshot
            .client()
            .batch_execute("SET LOCAL standard_conforming_strings = on")
            .await
            .map_err(|e| super::internal(crate::snapshot::SnapshotError::sql("repair")(e)))?;
        add(&self.state.metrics.repairs, 1);
        tracing::info!(tables = tables.len(), resume = %resume, "repairing a replica instead of re-hydrating it");
        let begin = ServerMessage::RepairBegin {
            resume_lsn: resume,
            tables: tables.iter().map(|t| t.name.clone()).collect(),
            visibility: snapshot.visibility.clone(),
        };
        self.send(Frame::encode(&begin, Lsn::ZERO)).await?;
        // A second connection into the snapshot, opened for the first
        // large check: first rounds read every row, in two halves at once.
        let mut twin: Option<Snapshot> = None;
        // Per table, which kept sub-buckets were written since (`None`:
        // the kept digests cannot serve this repair); read from the change
        // log at the table's first check, for every round after it.
        let mut written: HashMap<String, Option<Dirty>> = HashMap::new();
        loop {
            match self.next_repair_message().await? {
                RepairMessage::Check { table, spans } => {
                    let schema = tables.iter().find(|t| t.name == table).ok_or_else(|| {
                        Refusal::new(
                            ErrorCode::UnknownTable,
                            "repair check of a table not being repaired",
                        )
                    })?;
                    let kept = kept.get(&schema.name);
                    if !written.contains_key(&schema.name) {
                        let dirty = self.written(&snapshot, kept, schema).await;
                        written.insert(schema.name.clone(), dirty);
                    }
                    let known = match (kept, written.get(&schema.name)) {
                        (Some(kept), Some(Some(dirty))) => {
                            spans.iter().map(|s| kept.known_parts(s, dirty)).collect()
                        }
                        _ => Vec::new(),
                    };
                    let none_known = !known.iter().flatten().any(Option::is_some);
                    if twin.is_none() && none_known && twin_split(schema, &spans).is_some() {
                        twin = open_twin(&self.state.database, &snapshot).await?;
                    }
                    self.answer_check(&snapshot, twin.as_ref(), schema, &spans, &known)
                        .await?;
                }
                RepairMessage::Done { refetch } => {
                    if !refetch.is_empty() {
                        tracing::warn!(
                            ?refetch,
                            "tables did not match after repair; the client fetches them"
                        );
                    }
                    return Ok(resume);
                }
                _ => {
                    return Err(Refusal::new(
                        ErrorCode::MalformedFrame,
                        "only check and done are expected from a client during repair",
                    ))
                }
            }
        }
    }

    /// Which of a table's kept sub-buckets were written since they were
    /// made, for this repair's snapshot; `None` when its kept digests
    /// cannot serve it (every part is then read, as without them).
    async fn written(
        &mut self,
        snapshot: &Snapshot,
        kept: Option<&Arc<Kept>>,
        table: &TableSchema,
    ) -> Option<Dirty> {
        let kept = kept?;
        // With a read rule the replica holds some of the rows only.
        let filtered = self
            .scope
            .as_ref()
            .is_some_and(|s| s.snapshot_filter(&table.name).is_some());
        if filtered || kept.schema != *table {
            return None;
        }
        let log = match self.state.log_reader.client().await {
            Ok(log) => log,
            Err(e) => {
                tracing::warn!(error = %e, "no change-log connection; the repair reads every row");
                return None;
            }
        };
        let hub = &self.state.hub;
        let since = written_since(&log, snapshot, kept, &hub.log_id(), hub.watch_captured()).await;
        let dirty = match since {
            Since::Dirty(dirty) => dirty,
            Since::Stale(why) => {
                tracing::debug!(table = %table.name, why, "kept digests are stale; made again");
                self.state.kept.mark_stale(&table.name);
                return None;
            }
            Since::Unusable(why) => {
                tracing::debug!(table = %table.name, why, "kept digests not used for this repair");
                return None;
            }
        };
        let (buckets, written) = kept.written_buckets(&dirty);
        if written * 20 > buckets {
            // Over 5 % of the buckets written: made again for the next.
            self.state.kept.mark_stale(&table.name);
        }
        if written * 4 > buckets {
            // Reading a quarter of the ranges costs about what reading
            // every row does.
            return None;
        }
        tracing::debug!(
            table = %table.name,
            buckets,
            written,
            sub_buckets = dirty.0.len(),
            written_sub_buckets = dirty.0.iter().filter(|d| **d).count(),
            "checks answered from kept digests where they hold"
        );
        Some(dirty)
    }

    async fn answer_check(
        &mut self,
        snapshot: &Snapshot,
        twin: Option<&Snapshot>,
        table: &TableSchema,
        spans: &[CheckSpan],
        known: &[Vec<Option<RangeSum>>],
    ) -> Result<(), Refusal> {
        let scope = self.scope.clone();
        let started = std::time::Instant::now();
        let answered = answer(snapshot, twin, scope.as_deref(), table, spans, known)
            .await
            .map_err(refusal)?;
        let (parts, total) = (answered.parts, answered.total);
        let from_kept = known.iter().flatten().filter(|k| k.is_some()).count() as u64;
        add(&self.state.metrics.repair_kept_parts, from_kept);
        add(&self.state.metrics.repair_read_rows, answered.rows_read);
        tracing::debug!(
            table = %table.name,
            spans = spans.len(),
            differing = parts.len(),
            from_kept,
            rows_read = answered.rows_read,
            elapsed = ?started.elapsed(),
            "repair check digested"
        );
        let ranges: Vec<_> = parts
            .iter()
            .filter(|p| p.replace)
            .map(|p| spans[p.span as usize].part_range(p.part as usize))
            .collect();
        self.send_repair(&RepairMessage::Diff {
            table: table.name.clone(),
            parts,
            total: total.map(|t| (t.rows, t.hex())),
        })
        .await?;
        let mut copy: Vec<u8> = Vec::with_capacity(ROWS_BYTES + 4096);
        for batch in replaced_batches(&ranges) {
            // Read to its end before the next COPY opens (see
            // `replaced_rows`).
            let stream = replaced_rows(snapshot, scope.as_deref(), table, batch)
                .await
                .map_err(refusal)?;
            let mut stream = Box::pin(stream);
            while let Some(data) = stream.next().await {
                let data = data.map_err(|e| {
                    refusal(RepairError::Snapshot(crate::snapshot::SnapshotError::sql(
                        "reading rows to repair",
                    )(e)))
                })?;
                copy.extend_from_slice(&data);
                if copy.len() >= ROWS_BYTES {
                    self.send_rows(table, &mut copy).await?;
                }
            }
        }
        if !copy.is_empty() {
            self.send_rows(table, &mut copy).await?;
        }
        self.send_repair(&RepairMessage::RowsEnd {
            table: table.name.clone(),
        })
        .await
    }

    async fn send_rows(&mut self, table: &TableSchema, copy: &mut Vec<u8>) -> Result<(), Refusal> {
        add(&self.state.metrics.repair_rows, bytecount(copy));
        let text = String::from_utf8(std::mem::take(copy))
            .map_err(|_| Refusal::new(ErrorCode::Internal, "rows to repair are not UTF-8"))?;
        self.send_repair(&RepairMessage::Rows {
            table: table.name.clone(),
            copy: text,
        })
        .await
    }

    async fn send_repair(&mut self, message: &RepairMessage) -> Result<(), Refusal> {
        let frame =
            encode_repair(message).map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?;
        add(&self.state.metrics.repair_bytes, frame.len() as u64);
        self.send_message(Message::Binary(frame.into())).await
    }

    /// The client's next repair frame, answering writes that come first.
    async fn next_repair_message(&mut self) -> Result<RepairMessage, Refusal> {
        let deadline = tokio::time::Instant::now() + CLIENT_TURN;
        loop {
            let incoming = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .map_err(|_| Refusal::new(ErrorCode::TooSlow, "no repair frame in time"))?;
            let bytes = match incoming {
                None | Some(Ok(Message::Close(_))) => {
                    return Err(Refusal::new(ErrorCode::Internal, "client left mid-repair"))
                }
                Some(Err(e)) => return Err(super::handshake::read_error(e)),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Text(text))) => {
                    let parsed = write::parse(text.as_bytes());
                    self.handle(parsed).await?;
                    continue;
                }
                Some(Ok(Message::Binary(bytes))) => bytes,
            };
            add(&self.state.metrics.repair_bytes, bytes.len() as u64);
            return decode_repair(&bytes, MAX_CHECK_BYTES)
                .map_err(|e| Refusal::new(ErrorCode::MalformedFrame, e.to_string()));
        }
    }
}

/// A second connection into `snapshot`; `None` (one connection does
/// it all, more slowly) if it cannot be had. An export that fails is
/// an error: it leaves the snapshot's transaction aborted.
async fn open_twin(database: &ConnInfo, snapshot: &Snapshot) -> Result<Option<Snapshot>, Refusal> {
    let exported = snapshot.export().await.map_err(super::internal)?;
    let joined = async {
        let twin = Snapshot::join(database, &exported, snapshot.visibility.clone()).await?;
        twin.client()
            .batch_execute("SET LOCAL standard_conforming_strings = on")
            .await
            .map_err(crate::snapshot::SnapshotError::sql("repair"))?;
        Ok::<_, crate::snapshot::SnapshotError>(twin)
    };
    match joined.await {
        Ok(twin) => Ok(Some(twin)),
        Err(e) => {
            tracing::warn!(error = %e, "repair reads its first round over one connection");
            Ok(None)
        }
    }
}

/// Rows in COPY text (one per line).
fn bytecount(copy: &[u8]) -> u64 {
    copy.iter().filter(|b| **b == b'\n').count() as u64
}

fn refusal(e: RepairError) -> Refusal {
    match e {
        RepairError::BadCheck(message) => Refusal::new(ErrorCode::MalformedFrame, message),
        RepairError::Snapshot(e) => super::internal(e),
    }
}
