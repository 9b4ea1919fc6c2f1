//! Hydration: sends a replica a consistent snapshot of its tables before
//! the change stream, and re-sends any table the client found damaged.
//! Chunks go out as fast as the socket takes them (backpressure reaches
//! PostgreSQL's COPY through the connection), so memory stays at about one
//! chunk per hydrating session.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::Message;
use futures_util::StreamExt;
use pgrelay_protocol::{chunk_header, ErrorCode, Lsn, ServerMessage, SnapshotTable, TableSchema};
use tokio::sync::OwnedSemaphorePermit;

use super::{write, Refusal, Session};
use crate::hub::Frame;
use crate::snapshot::Snapshot;

/// Re-fetch rounds before the server gives up on a client's snapshot.
const MAX_ROUNDS: usize = 3;

/// How long the client may take to check a snapshot after its last chunk:
/// this much, plus [`VERDICT_PER_MIB`] for each MiB of the round (the
/// client inserts the last chunks it queued), at most [`VERDICT_MAX`]. A
/// client that never answers holds its hydration slot (and PostgreSQL's
/// snapshot) no longer than its snapshot's size warrants.
const VERDICT_BASE: Duration = Duration::from_secs(10);
const VERDICT_PER_MIB: Duration = Duration::from_millis(100);
const VERDICT_MAX: Duration = Duration::from_secs(120);

/// How often a queued client hears that it is still queued.
const QUEUED_NOTICE: Duration = Duration::from_secs(10);

impl Session<'_> {
    /// Sends a snapshot of every table the client syncs (`full`) or of
    /// those it asks to `resync`; returns the change-log position from
    /// which transactions follow it. A client holds one hydration slot at
    /// most: its new connection replaces this session, which then gives up
    /// its slot (or its place in the queue) at once rather than when its
    /// snapshot's deadline passes.
    pub(super) async fn hydrate(&mut self, full: bool, resync: &[String]) -> Result<Lsn, Refusal> {
        let live = std::sync::Arc::clone(&self.live);
        tokio::select! {
            biased;
            signal = live.closing() => Err(super::closed_by(signal)),
            done = self.hydrate_in_slot(full, resync) => done,
        }
    }

    async fn hydrate_in_slot(&mut self, full: bool, resync: &[String]) -> Result<Lsn, Refusal> {
        let _permit = self.wait_for_slot().await?;
        // The keeper's background reads pause until this ends.
        let _hydrating = self.state.hydrating.enter();
        // Tables and columns as they are now, not at the welcome: the
        // client hears of what changed while it waited before the
        // snapshot, which holds those tables and columns.
        let schemas = self.announce_schemas().await?;
        let tables: Vec<TableSchema> = self
            .visible(schemas.values())
            .into_iter()
            .filter(|t| t.skipped.is_none() && (full || resync.contains(&t.name)))
            .collect();
        drop(schemas);
        // Read before the snapshot is taken: everything at or below it
        // committed before, so the snapshot sees it (but for a commit not
        // yet visible: see `Snapshot::resume_at`), and the client's
        // visibility filter drops it from the stream.
        let head = self.state.hub.head();
        let snapshot = Snapshot::open(&self.state.database)
            .await
            .map_err(super::internal)?;
        // Lower when a transaction logged by then was not yet visible.
        let resume = snapshot.resume_at(head).await.map_err(super::internal)?;
        let mut listed = Vec::with_capacity(tables.len());
        for table in &tables {
            listed.push(SnapshotTable {
                table: table.name.clone(),
                estimated_rows: snapshot.estimate(table).await,
            });
        }
        tracing::info!(tables = tables.len(), full, resume = %resume, "hydrating");
        if full {
            crate::ops::metrics::add(&self.state.metrics.hydrations, 1);
        }
        let begin = ServerMessage::SnapshotBegin {
            resume_lsn: resume,
            full,
            tables: listed,
            visibility: snapshot.visibility.clone(),
        };
        self.send(Frame::encode(&begin, Lsn::ZERO)).await?;
        let mut pending: Vec<usize> = (0..tables.len()).collect();
        for _ in 0..MAX_ROUNDS {
            let mut sent = 0u64;
            for &index in &pending {
                sent += self.send_table(&snapshot, index, &tables[index]).await?;
            }
            self.send(Frame::encode(&ServerMessage::SnapshotEnd {}, Lsn::ZERO))
                .await?;
            let mib = u32::try_from(sent >> 20).unwrap_or(u32::MAX);
            let allowed = (VERDICT_BASE + VERDICT_PER_MIB.saturating_mul(mib)).min(VERDICT_MAX);
            let refetch = self.verdict(allowed).await?;
            if refetch.is_empty() {
                return Ok(resume);
            }
            tracing::warn!(
                ?refetch,
                "client found damaged snapshot tables; sending them again"
            );
            pending = tables
                .iter()
                .enumerate()
                .filter(|(_, t)| refetch.contains(&t.name))
                .map(|(i, _)| i)
                .collect();
        }
        Err(Refusal::new(
            ErrorCode::Internal,
            format!("the snapshot did not arrive intact in {MAX_ROUNDS} attempts"),
        ))
    }

    /// Waits for one of the server's hydration slots, telling the client
    /// it is queued meanwhile.
    pub(super) async fn wait_for_slot(&mut self) -> Result<OwnedSemaphorePermit, Refusal> {
        let slots = std::sync::Arc::clone(&self.state.hydrations);
        if let Ok(permit) = std::sync::Arc::clone(&slots).try_acquire_owned() {
            return Ok(permit);
        }
        let queued = &self.state.hydrations_queued;
        queued.fetch_add(1, Ordering::Relaxed);
        let result = self.queue_for(slots).await;
        self.state.hydrations_queued.fetch_sub(1, Ordering::Relaxed);
        result
    }

    async fn queue_for(
        &mut self,
        slots: std::sync::Arc<tokio::sync::Semaphore>,
    ) -> Result<OwnedSemaphorePermit, Refusal> {
        let acquire = slots.acquire_owned();
        tokio::pin!(acquire);
        loop {
            match tokio::time::timeout(QUEUED_NOTICE, &mut acquire).await {
                Ok(Ok(permit)) => return Ok(permit),
                Ok(Err(_)) => {
                    return Err(Refusal::new(ErrorCode::Internal, "the server is stopping"))
                }
                Err(_) => {
                    let queued = ServerMessage::SnapshotQueued {
                        waiting: self.state.hydrations_waiting(),
                    };
                    self.send(Frame::encode(&queued, Lsn::ZERO)).await?;
                }
            }
        }
    }

    async fn send_table(
        &mut self,
        snapshot: &Snapshot,
        index: usize,
        table: &TableSchema,
    ) -> Result<u64, Refusal> {
        let table_index = u16::try_from(index)
            .map_err(|_| Refusal::new(ErrorCode::Internal, "over 65535 tables in a snapshot"))?;
        let mut reader = snapshot
            .read_table(table, self.scope.as_deref())
            .await
            .map_err(super::internal)?;
        let mut seq = 0u32;
        while let Some(compressed) = reader.next_chunk().await.map_err(super::internal)? {
            let mut frame = Vec::with_capacity(compressed.len() + 8);
            frame.extend_from_slice(&chunk_header(table_index, seq));
            frame.extend_from_slice(&compressed);
            seq = seq.wrapping_add(1);
            self.send_message(Message::Binary(frame.into())).await?;
        }
        let digest = reader.digest();
        // Uncompressed: what the client has to insert.
        let sent = digest.bytes;
        tracing::debug!(table = %table.name, rows = digest.rows, bytes = digest.bytes, "snapshot table sent");
        self.send(Frame::encode(
            &ServerMessage::SnapshotTable(digest),
            Lsn::ZERO,
        ))
        .await?;
        Ok(sent)
    }

    /// Reads the client's `snapshot_done`, answering writes that come first.
    async fn verdict(&mut self, allowed: Duration) -> Result<Vec<String>, Refusal> {
        // Absolute: frames the client sends meanwhile do not extend it.
        let deadline = tokio::time::Instant::now() + allowed;
        loop {
            let incoming = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .map_err(|_| Refusal::new(ErrorCode::TooSlow, "no snapshot_done in time"))?;
            let bytes = match incoming {
                None | Some(Ok(Message::Close(_))) => {
                    return Err(Refusal::new(
                        ErrorCode::Internal,
                        "client left mid-snapshot",
                    ))
                }
                Some(Err(e)) => return Err(super::handshake::read_error(e)),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Text(text))) => text.as_bytes().to_vec(),
                Some(Ok(Message::Binary(bytes))) => bytes.to_vec(),
            };
            match write::parse(&bytes) {
                write::Incoming::SnapshotDone(refetch) => return Ok(refetch),
                other => self.handle(other).await?,
            }
        }
    }
}
