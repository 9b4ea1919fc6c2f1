//! Receiving a snapshot: chunks are decompressed and checked here while
//! the replica's thread inserts the previous ones (up to its command
//! queue's depth in flight). After each table the row count and checksum
//! are compared with the server's; a table that does not match is emptied
//! and asked for again, never kept.

use std::collections::VecDeque;
use std::time::Instant;

use pgrelay_protocol::{
    parse_chunk, Checksum, ClientMessage, Lsn, SnapshotTable, TableDigest, Visibility,
};
use tokio::sync::{broadcast, oneshot};

use crate::replica::SnapshotDone;
use crate::{ClientError, Event, Replica};

/// Largest uncompressed chunk accepted (the server sends 256 KiB plus at
/// most one row; a row can be large).
const MAX_CHUNK_BYTES: usize = 256 << 20;

type Pending = oneshot::Receiver<Result<u64, ClientError>>;

struct TableState {
    name: String,
    estimated_rows: u64,
    checksum: Checksum,
    bytes: u64,
    /// Rows inserted in this round of the table.
    rows: u64,
    next_seq: u32,
    /// Rows inserted, as the replica thread reports them.
    loads: VecDeque<Pending>,
    /// Set when a chunk could not be used; the table is fetched again.
    damaged: Option<String>,
}

pub(crate) struct Hydration {
    resume: Lsn,
    full: bool,
    visibility: Visibility,
    tables: Vec<TableState>,
    refetch: Vec<String>,
    refetched: Vec<String>,
    started: Instant,
    rows_done: u64,
    bytes_done: u64,
    tables_done: usize,
}

impl Hydration {
    pub(crate) async fn begin(
        replica: &Replica,
        resume: Lsn,
        full: bool,
        tables: Vec<SnapshotTable>,
        visibility: Visibility,
    ) -> Result<Hydration, ClientError> {
        let names: Vec<String> = tables.iter().map(|t| t.table.clone()).collect();
        replica.begin_snapshot(names, full).await?;
        tracing::info!(tables = tables.len(), full, resume = %resume, "hydrating from a snapshot");
        Ok(Hydration {
            resume,
            full,
            visibility,
            tables: tables
                .into_iter()
                .map(|t| TableState {
                    name: t.table,
                    estimated_rows: t.estimated_rows,
                    checksum: Checksum::new(),
                    bytes: 0,
                    rows: 0,
                    next_seq: 0,
                    loads: VecDeque::new(),
                    damaged: None,
                })
                .collect(),
            refetch: Vec::new(),
            refetched: Vec::new(),
            started: Instant::now(),
            rows_done: 0,
            bytes_done: 0,
            tables_done: 0,
        })
    }

    /// A binary chunk frame.
    pub(crate) async fn chunk(
        &mut self,
        replica: &Replica,
        events: &broadcast::Sender<Event>,
        frame: &[u8],
    ) -> Result<(), ClientError> {
        let (index, seq, payload) = parse_chunk(frame).ok_or_else(|| {
            ClientError::Protocol("a binary frame that is not a snapshot chunk".to_owned())
        })?;
        let table = self.tables.get_mut(usize::from(index)).ok_or_else(|| {
            ClientError::Protocol(format!(
                "snapshot chunk for table #{index}, which the snapshot did not list"
            ))
        })?;
        if table.damaged.is_some() {
            return Ok(());
        }
        if seq != table.next_seq {
            table.damaged = Some(format!(
                "chunk {seq} arrived where {} was due",
                table.next_seq
            ));
            return Ok(());
        }
        table.next_seq += 1;
        let raw = match zstd::bulk::decompress(payload, MAX_CHUNK_BYTES) {
            Ok(raw) => raw,
            Err(e) => {
                table.damaged = Some(format!("chunk {seq} does not decompress: {e}"));
                return Ok(());
            }
        };
        table.checksum.update(&raw);
        table.bytes += raw.len() as u64;
        self.bytes_done += raw.len() as u64;
        let receiver = replica.send_load(table.name.clone(), raw).await?;
        table.loads.push_back(receiver);
        // Collect what the replica has finished, for progress, without waiting.
        while let Some(Ok(done)) = table.loads.front_mut().map(|r| r.try_recv()) {
            table.loads.pop_front();
            match done {
                Ok(rows) => {
                    table.rows += rows;
                    self.rows_done += rows;
                }
                Err(e) => table.damaged = Some(e.to_string()),
            }
        }
        self.progress(events);
        Ok(())
    }

    /// The server's digest of a table: check it against what arrived.
    pub(crate) async fn table_done(
        &mut self,
        replica: &Replica,
        events: &broadcast::Sender<Event>,
        digest: TableDigest,
    ) -> Result<(), ClientError> {
        let Some(table) = self.tables.iter_mut().find(|t| t.name == digest.table) else {
            return Err(ClientError::Protocol(format!(
                "digest for {}, which the snapshot did not list",
                digest.table
            )));
        };
        while let Some(load) = table.loads.pop_front() {
            match load.await.map_err(|_| ClientError::ReplicaClosed)? {
                Ok(n) => {
                    table.rows += n;
                    self.rows_done += n;
                }
                Err(e) => table.damaged = Some(e.to_string()),
            }
        }
        let checksum = table.checksum.hex();
        let problem = table.damaged.take().or_else(|| {
            if digest.checksum != checksum || digest.bytes != table.bytes {
                Some(format!(
                    "checksum {checksum} over {} bytes, the server sent {} over {} bytes",
                    table.bytes, digest.checksum, digest.bytes
                ))
            } else {
                None
            }
        });
        let problem = problem.or_else(|| {
            (table.rows != digest.rows).then(|| {
                format!(
                    "{} rows arrived, the server sent {}",
                    table.rows, digest.rows
                )
            })
        });
        let name = table.name.clone();
        if problem.is_some() {
            // Emptied below; they come again.
            self.rows_done -= table.rows;
        }
        table.checksum = Checksum::new();
        table.bytes = 0;
        table.rows = 0;
        table.next_seq = 0;
        match problem {
            Some(problem) => {
                tracing::warn!(table = %name, %problem, "snapshot table damaged; fetching it again");
                replica.clear_table(name.clone()).await?;
                self.refetched.push(name.clone());
                self.refetch.push(name);
            }
            None => {
                self.tables_done += 1;
                tracing::debug!(table = %name, rows = digest.rows, "snapshot table verified");
            }
        }
        self.progress(events);
        Ok(())
    }

    /// `snapshot_end`: the verdict to send, and whether the snapshot is
    /// complete (committed to the replica).
    pub(crate) async fn end(
        &mut self,
        replica: &Replica,
        events: &broadcast::Sender<Event>,
    ) -> Result<(ClientMessage, bool), ClientError> {
        let refetch = std::mem::take(&mut self.refetch);
        if !refetch.is_empty() {
            return Ok((ClientMessage::SnapshotDone { refetch }, false));
        }
        replica
            .finish_snapshot(SnapshotDone {
                resume: self.resume,
                full: self.full,
                tables: self.tables.iter().map(|t| t.name.clone()).collect(),
                visibility: self.visibility.clone(),
            })
            .await?;
        let elapsed = self.started.elapsed();
        tracing::info!(
            rows = self.rows_done,
            bytes = self.bytes_done,
            ?elapsed,
            "snapshot complete"
        );
        let _ = events.send(Event::Hydrated {
            full: self.full,
            tables: self.tables.iter().map(|t| t.name.clone()).collect(),
            rows: self.rows_done,
            bytes: self.bytes_done,
            elapsed,
            refetched: self.refetched.clone(),
        });
        Ok((
            ClientMessage::SnapshotDone {
                refetch: Vec::new(),
            },
            true,
        ))
    }

    pub(crate) fn resume(&self) -> Lsn {
        self.resume
    }

    pub(crate) fn is_full(&self) -> bool {
        self.full
    }

    fn progress(&self, events: &broadcast::Sender<Event>) {
        let _ = events.send(Event::Hydrating {
            tables: self.tables.len(),
            tables_done: self.tables_done,
            rows: self.rows_done,
            bytes: self.bytes_done,
            estimated_rows: self.tables.iter().map(|t| t.estimated_rows).sum(),
        });
    }
}
