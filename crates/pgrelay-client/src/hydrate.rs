//! Receiving a snapshot: chunks are decompressed, checked and split into
//! rows of values here while the replica's thread inserts the previous
//! ones (up to its command queue's depth in flight), so the two share
//! the work. After each table the row count and checksum
//! are compared with the server's; a table that does not match is emptied
//! and asked for again, never kept.
//!
//! Memory is bounded against a lying server or a man in the middle: a chunk
//! is decompressed into no more than the size its zstd frame announces
//! (itself capped), one that holds more is refused, and decompressed bytes
//! waiting for the replica's thread stay under a total.

use std::collections::VecDeque;
use std::time::Instant;

use pgrelay_protocol::copy_text::Rows;
use pgrelay_protocol::{
    parse_chunk, Checksum, ClientMessage, Lsn, SnapshotTable, TableDigest, Visibility,
};
use tokio::sync::{broadcast, oneshot};

use crate::replica::SnapshotDone;
use crate::{ClientError, Event, Replica};

/// Largest uncompressed chunk accepted (the server sends 256 KiB plus at
/// most one row; a row can be large).
const MAX_CHUNK_BYTES: usize = 256 << 20;

/// Bytes of split chunks handed to the replica's thread and not yet
/// inserted, at most (one chunk larger than this is let through alone).
const MAX_IN_FLIGHT_BYTES: usize = 32 << 20;

type Pending = oneshot::Receiver<Result<(u64, Rows), ClientError>>;

/// Emptied chunk buffers kept for the next chunks, at most (a fresh
/// 256 KiB buffer costs page faults, a kernel zeroing every page).
const SPARE_BUFFERS: usize = 4;

struct TableState {
    name: String,
    estimated_rows: u64,
    checksum: Checksum,
    bytes: u64,
    /// Rows inserted in this round of the table.
    rows: u64,
    next_seq: u32,
    /// Rows inserted, as the replica thread reports them, with the bytes
    /// each load holds until then.
    loads: VecDeque<(Pending, usize)>,
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
    /// Decompressed bytes in `loads` of every table.
    in_flight: usize,
    decompressor: zstd::bulk::Decompressor<'static>,
    /// Buffers the replica's thread has finished with.
    spare: Vec<Rows>,
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
            in_flight: 0,
            decompressor: zstd::bulk::Decompressor::new()
                .map_err(|e| ClientError::Replica(format!("starting zstd: {e}")))?,
            spare: Vec::new(),
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
        let announced = match announced_size(payload) {
            Ok(size) => size,
            Err(why) => {
                table.damaged = Some(format!("chunk {seq} {why}"));
                return Ok(());
            }
        };
        // Wait for the replica's thread before holding more than the bound.
        while self.in_flight > 0 && self.in_flight + announced > MAX_IN_FLIGHT_BYTES {
            let Some((load, bytes)) = table.loads.pop_front() else {
                break;
            };
            self.in_flight -= bytes;
            let done = load.await.map_err(|_| ClientError::ReplicaClosed)?;
            absorb(done, table, &mut self.rows_done, &mut self.spare);
        }
        // The capacity is a hard bound: a frame that holds more than it
        // announced fails here instead of growing the buffer (a reused
        // buffer may be larger, never larger than an earlier chunk).
        let mut rows = self.spare.pop().unwrap_or_default();
        let raw = rows.text_mut();
        raw.reserve_exact(announced);
        match self.decompressor.decompress_to_buffer(payload, raw) {
            Ok(size) if size == announced => {}
            Ok(size) => {
                table.damaged = Some(format!(
                    "chunk {seq} announced {announced} bytes and held {size}"
                ));
                return Ok(());
            }
            Err(e) => {
                table.damaged = Some(format!(
                    "chunk {seq} does not decompress to the {announced} bytes it announced: {e}"
                ));
                return Ok(());
            }
        };
        let raw = rows.text();
        table.checksum.update(raw);
        table.bytes += raw.len() as u64;
        self.bytes_done += raw.len() as u64;
        if let Err(why) = rows.split() {
            table.damaged = Some(format!("chunk {seq}: {why}"));
            return Ok(());
        }
        let bytes = rows.heap_bytes();
        let receiver = replica.send_load(table.name.clone(), rows).await?;
        table.loads.push_back((receiver, bytes));
        self.in_flight += bytes;
        // Collect what the replica has finished, for progress, without waiting.
        while let Some(Ok(done)) = table.loads.front_mut().map(|(r, _)| r.try_recv()) {
            if let Some((_, bytes)) = table.loads.pop_front() {
                self.in_flight -= bytes;
            }
            absorb(done, table, &mut self.rows_done, &mut self.spare);
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
        while let Some((load, bytes)) = table.loads.pop_front() {
            self.in_flight -= bytes;
            let done = load.await.map_err(|_| ClientError::ReplicaClosed)?;
            absorb(done, table, &mut self.rows_done, &mut self.spare);
        }
        // Its rows are committed now, or the table is fetched again.
        if let Err(e) = replica.end_load(table.name.clone()).await {
            table.damaged.get_or_insert(e.to_string());
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

/// A load the replica's thread finished: its rows counted (or the table
/// marked damaged), its buffer kept for a next chunk.
fn absorb(
    done: Result<(u64, Rows), ClientError>,
    table: &mut TableState,
    rows_done: &mut u64,
    spare: &mut Vec<Rows>,
) {
    match done {
        Ok((rows, buffer)) => {
            table.rows += rows;
            *rows_done += rows;
            if spare.len() < SPARE_BUFFERS {
                spare.push(buffer);
            }
        }
        Err(e) => table.damaged = Some(e.to_string()),
    }
}

/// The uncompressed size a chunk's zstd frame announces, when it is one
/// this client accepts.
fn announced_size(payload: &[u8]) -> Result<usize, String> {
    match zstd::zstd_safe::get_frame_content_size(payload) {
        Ok(Some(size)) if size <= MAX_CHUNK_BYTES as u64 => usize::try_from(size)
            .map_err(|_| format!("a chunk of {size} bytes does not fit in memory")),
        Ok(Some(size)) => Err(format!(
            "announces {size} bytes, over the {MAX_CHUNK_BYTES}-byte limit"
        )),
        Ok(None) => Err("does not announce its uncompressed size".to_owned()),
        Err(_) => Err("is not a zstd frame".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `frame` with its 4-byte Frame_Content_Size field set to `size`.
    fn lie(frame: &mut [u8], size: u32) {
        // Magic (4 bytes), then the frame header descriptor; the content
        // size follows the window descriptor (absent in a single-segment
        // frame) and the dictionary id (0, 1, 2 or 4 bytes).
        let descriptor = frame[4];
        assert_eq!(descriptor >> 6, 2, "a 4-byte content size field");
        let window = usize::from(descriptor & 0x20 == 0);
        let dictionary = [0, 1, 2, 4][usize::from(descriptor & 0x03)];
        let at = 5 + window + dictionary;
        frame[at..at + 4].copy_from_slice(&size.to_le_bytes());
    }

    #[test]
    fn a_chunk_is_held_to_the_size_it_announces() {
        let honest = zstd::bulk::compress(&vec![b'x'; 1 << 20], 3).unwrap();
        assert_eq!(announced_size(&honest), Ok(1 << 20));
        let mut lying = honest.clone();
        lie(&mut lying, 1000);
        assert_eq!(announced_size(&lying), Ok(1000));
        assert!(zstd::bulk::decompress(&lying, 1000).is_err());
        let mut huge = honest;
        lie(&mut huge, u32::MAX);
        assert!(announced_size(&huge).unwrap_err().contains("over the"));
        assert!(announced_size(b"not zstd at all").is_err());
    }
}
