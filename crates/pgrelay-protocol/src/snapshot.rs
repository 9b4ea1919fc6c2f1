//! Snapshot hydration: how a new (or reset) replica receives a consistent
//! copy of its tables, and how the change stream takes over from it without
//! losing or repeating a transaction.
//!
//! The server opens a REPEATABLE READ transaction and reads its snapshot
//! (`pg_current_snapshot()`): which transactions it sees. Rows travel as
//! PostgreSQL `COPY ... TO STDOUT` text, in zstd-compressed binary chunks,
//! each table followed by its row count and checksum. The stream then
//! resumes at `resume_lsn`, a change-log position older than the snapshot;
//! the client skips, for the snapshot's tables, every logged transaction the
//! snapshot already saw ([`Visibility::sees`]). Past `until` the snapshot saw
//! nothing, so the filter ends there.

use serde::{Deserialize, Serialize};

use crate::Lsn;

/// First byte of a binary snapshot chunk frame.
pub const CHUNK_TAG: u8 = 1;

/// Bytes before a chunk's compressed payload: tag, table index (u16, big
/// endian), chunk sequence number within the table (u32, big endian).
pub const CHUNK_HEADER_BYTES: usize = 7;

/// Which transactions a snapshot saw, in PostgreSQL's 64-bit transaction ids
/// (`pg_snapshot`: `xmin:xmax:xip_list`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Visibility {
    pub xmin: u64,
    pub xmax: u64,
    /// Transactions in progress when the snapshot was taken.
    pub xip: Vec<u64>,
    /// PostgreSQL's WAL position read after the snapshot was taken: every
    /// transaction the snapshot saw committed before it.
    pub until: Lsn,
}

impl Visibility {
    /// Parses PostgreSQL's text form of a `pg_snapshot`, e.g. `10:20:10,14,15`.
    pub fn parse(text: &str, until: Lsn) -> Option<Visibility> {
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next() {
            Some("") | None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        (xmin <= xmax).then_some(Visibility {
            xmin,
            xmax,
            xip,
            until,
        })
    }

    /// Whether the committed transaction with this 32-bit id (as logical
    /// decoding reports it) is part of the snapshot.
    pub fn sees(&self, xid: u32) -> bool {
        let full = self.widen(xid);
        full < self.xmin || (full < self.xmax && !self.xip.contains(&full))
    }

    /// The 64-bit id of a 32-bit one near `xmax`: transaction ids in play
    /// around a snapshot are within 2^31 of each other.
    fn widen(&self, xid: u32) -> u64 {
        let candidate = (self.xmax & !0xFFFF_FFFF) | u64::from(xid);
        if candidate > self.xmax.saturating_add(1 << 31) {
            candidate.saturating_sub(1 << 32)
        } else {
            candidate
        }
    }
}

/// A table in a snapshot, with PostgreSQL's estimate of its size for
/// progress reporting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotTable {
    pub table: String,
    pub estimated_rows: u64,
}

/// Sent after a table's last chunk: what the client must have received.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDigest {
    pub table: String,
    pub rows: u64,
    /// Uncompressed COPY bytes.
    pub bytes: u64,
    /// [`Checksum`] of the uncompressed COPY bytes, in order.
    pub checksum: String,
}

/// A running checksum (XXH3-128) over a table's COPY text.
#[derive(Clone, Default)]
pub struct Checksum(xxhash_rust::xxh3::Xxh3);

impl Checksum {
    pub fn new() -> Checksum {
        Checksum::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn hex(&self) -> String {
        format!("{:032x}", self.0.digest128())
    }
}

/// Builds a chunk frame's header.
pub fn chunk_header(table_index: u16, seq: u32) -> [u8; CHUNK_HEADER_BYTES] {
    let t = table_index.to_be_bytes();
    let s = seq.to_be_bytes();
    [CHUNK_TAG, t[0], t[1], s[0], s[1], s[2], s[3]]
}

/// Splits a binary chunk frame into table index, sequence number and the
/// compressed payload; `None` when it is not a chunk frame.
pub fn parse_chunk(frame: &[u8]) -> Option<(u16, u32, &[u8])> {
    if frame.len() < CHUNK_HEADER_BYTES || frame[0] != CHUNK_TAG {
        return None;
    }
    let table = u16::from_be_bytes([frame[1], frame[2]]);
    let seq = u32::from_be_bytes([frame[3], frame[4], frame[5], frame[6]]);
    Some((table, seq, &frame[CHUNK_HEADER_BYTES..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vis(xmin: u64, xmax: u64, xip: &[u64]) -> Visibility {
        Visibility {
            xmin,
            xmax,
            xip: xip.to_vec(),
            until: Lsn(0),
        }
    }

    #[test]
    fn parses_postgres_snapshots() {
        assert_eq!(
            Visibility::parse("10:20:10,14", Lsn(5)),
            Some(Visibility {
                xmin: 10,
                xmax: 20,
                xip: vec![10, 14],
                until: Lsn(5)
            })
        );
        assert_eq!(
            Visibility::parse("7:7:", Lsn(0)).unwrap().xip,
            Vec::<u64>::new()
        );
        assert!(Visibility::parse("9:7:", Lsn(0)).is_none());
        assert!(Visibility::parse("x:7:", Lsn(0)).is_none());
    }

    #[test]
    fn sees_committed_before_and_not_in_progress() {
        let v = vis(10, 20, &[10, 14]);
        assert!(v.sees(9));
        assert!(!v.sees(10));
        assert!(v.sees(11));
        assert!(!v.sees(14));
        assert!(v.sees(19));
        assert!(!v.sees(20));
        assert!(!v.sees(25));
    }

    #[test]
    fn sees_across_an_epoch_boundary() {
        // xmax just past a wraparound: epoch 1, low bits 5.
        let base = 1u64 << 32;
        let v = vis(base - 10, base + 5, &[base - 3]);
        assert!(v.sees(u32::MAX - 20)); // before xmin, previous epoch
        assert!(!v.sees(u32::MAX - 2)); // in progress
        assert!(v.sees(u32::MAX - 1)); // committed, previous epoch
        assert!(v.sees(3)); // committed, this epoch
        assert!(!v.sees(6)); // after xmax
    }

    #[test]
    fn chunk_header_round_trips() {
        let mut frame = chunk_header(3, 70_000).to_vec();
        frame.extend_from_slice(b"payload");
        assert_eq!(parse_chunk(&frame), Some((3, 70_000, &b"payload"[..])));
        assert_eq!(parse_chunk(b"{\"type\"}"), None);
    }

    #[test]
    fn checksum_depends_on_every_byte() {
        let mut a = Checksum::new();
        a.update(b"1\tx\n");
        let mut b = Checksum::new();
        b.update(b"1\ty\n");
        assert_ne!(a.hex(), b.hex());
        let mut c = Checksum::new();
        c.update(b"1\t");
        c.update(b"x\n");
        assert_eq!(a.hex(), c.hex());
    }
}
