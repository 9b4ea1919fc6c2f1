//! Repair: a replica that cannot resume from the change log (behind
//! retention, another change log, a lost slot) is compared with PostgreSQL
//! range by range and receives only the rows of the ranges that differ,
//! instead of its whole contents.
//!
//! Both sides digest a table in key order over the canonical encoding that
//! `pgrelay verify` uses: a row's hash is XXH3-128 of its canonical values,
//! a range's digest the wrapping sum of its rows' hashes (so rows can be
//! fed in any order, in constant memory). The client proposes ranges cut at
//! its own keys ([`CheckSpan`]); the server answers which differ
//! ([`DiffPart`]). A differing range the client holds few rows of (or the
//! server does) is replaced by the server's rows; any other is cut into
//! smaller ranges and compared again (see `cut`: at the keys that start
//! sub-buckets, else by count). The first round covers the
//! whole key space (from no lower bound to no upper bound), so rows the
//! replica lacks are found too; its answer carries the table's full 128-bit
//! digest, which the client checks once its ranges are replaced.
//!
//! Key order must agree on both sides: only keys of integer, `text`,
//! `varchar` and `uuid` columns are compared by range (integers by value,
//! text by UTF-8 bytes — SQLite's BINARY collation and PostgreSQL's `"C"` —
//! uuids by their lowercase text, which orders as their bytes). A table
//! with another key, or none, is compared whole: one range, replaced whole
//! when it differs.

mod bucket;
mod cut;
mod hasher;
mod key;
mod wire;

pub use bucket::{key_bytes, starts_bucket, starts_sub_bucket, BUCKET_MODULUS, SUB_BUCKET_MODULUS};
pub use cut::{cut_range, SubSums, MAX_COUNT_PARTS, MAX_SUB_PARTS};
pub use hasher::RowHasher;
pub use key::{display_key, key_kinds, pg_ranges_condition, split_points, Key, KeyKind, KeyValue};
pub use wire::{decode_repair, encode_repair, RepairError, REPAIR_TAG};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

/// Rows per range in the first round (the replica's count divided by this,
/// at most [`MAX_FIRST_PARTS`] ranges).
pub const FIRST_PART_ROWS: u64 = 256;

/// Ranges in the first round, at most.
pub const MAX_FIRST_PARTS: u64 = 16_384;

/// How many ranges a differing range is cut into for the next round. Four
/// rather than sixteen: each change costs about `FANOUT` digests per level,
/// and fewer, deeper levels move fewer bytes for sparse changes.
pub const FANOUT: usize = 4;

/// A differing range with at most this many rows on either side is
/// replaced by the server's rows rather than cut further.
pub const LEAF_ROWS: u64 = 4;

/// Ranges per `check` message, at most (a single span may exceed it).
pub const MAX_CHECK_PARTS: usize = 4_096;

/// The hash of one row given as canonical values in column order. Values
/// are length-prefixed, with a distinct marker for NULL, so no two
/// different rows encode alike.
pub fn row_hash(values: &[Option<String>]) -> u128 {
    let mut hasher = Xxh3::new();
    for value in values {
        match value {
            None => hasher.update(&[0u8]),
            Some(v) => {
                hasher.update(&[1u8]);
                hasher.update(&(v.len() as u64).to_be_bytes());
                hasher.update(v.as_bytes());
            }
        }
    }
    hasher.digest128()
}

/// Row count and the wrapping sum of row hashes of a set of rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeSum {
    pub rows: u64,
    pub sum: u128,
}

impl RangeSum {
    pub fn add(&mut self, hash: u128) {
        self.rows += 1;
        self.sum = self.sum.wrapping_add(hash);
    }

    pub fn remove(&mut self, hash: u128) {
        self.rows = self.rows.saturating_sub(1);
        self.sum = self.sum.wrapping_sub(hash);
    }

    /// Adds every row of `other`.
    pub fn merge(&mut self, other: RangeSum) {
        self.rows += other.rows;
        self.sum = self.sum.wrapping_add(other.sum);
    }

    /// Takes away every row of `other` (a subset of these rows).
    pub fn subtract(&mut self, other: RangeSum) {
        self.rows = self.rows.saturating_sub(other.rows);
        self.sum = self.sum.wrapping_sub(other.sum);
    }

    /// The 64 bits a range's digest travels as (a mismatch the short form
    /// misses is still caught by the table's full digest at the end).
    pub fn short(&self) -> u64 {
        let low: [u8; 8] = self.sum.to_le_bytes()[..8].try_into().unwrap_or_default();
        u64::from_le_bytes(low)
    }

    pub fn hex(&self) -> String {
        format!("{:032x}", self.sum)
    }
}

/// A range the client proposes, cut into parts: part `i` holds keys from
/// `bounds[i-1]` (or `lo`) up to, not including, `bounds[i]` (or `hi`).
/// `None` bounds are open: no lower, or no upper, limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpan {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lo: Option<Key>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hi: Option<Key>,
    /// The inner bounds, ascending; one fewer than the parts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bounds: Vec<Key>,
    /// The replica's row count per part.
    pub rows: Vec<u64>,
    /// The replica's short digest per part, 16 hex digits each.
    pub digests: String,
    /// Send the rows of every differing part (a table compared whole).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub whole: bool,
}

impl CheckSpan {
    pub fn parts(&self) -> usize {
        self.rows.len()
    }

    /// The short digest of part `i`, if the span is well formed.
    pub fn digest(&self, i: usize) -> Option<u64> {
        let hex = self.digests.get(i * 16..i * 16 + 16)?;
        u64::from_str_radix(hex, 16).ok()
    }

    /// Whether the span is well formed: as many rows, digests and bounds
    /// as parts, bounds ascending and inside `lo..hi`.
    pub fn is_valid(&self) -> bool {
        let n = self.rows.len();
        if n == 0 || self.digests.len() != n * 16 || self.bounds.len() + 1 != n {
            return false;
        }
        if !self.digests.bytes().all(|b| b.is_ascii_hexdigit()) {
            return false;
        }
        let mut previous = self.lo.as_ref();
        for bound in self.bounds.iter().chain(self.hi.as_ref()) {
            if previous.is_some_and(|p| p >= bound) {
                return false;
            }
            previous = Some(bound);
        }
        true
    }

    /// The part a key falls in, if it is inside the span.
    pub fn part_of(&self, key: &Key) -> Option<usize> {
        if self.lo.as_ref().is_some_and(|lo| key < lo)
            || self.hi.as_ref().is_some_and(|hi| key >= hi)
        {
            return None;
        }
        Some(self.bounds.partition_point(|b| b <= key))
    }

    /// The bounds of part `i`.
    pub fn part_range(&self, i: usize) -> (Option<Key>, Option<Key>) {
        let lo = if i == 0 {
            self.lo.clone()
        } else {
            self.bounds.get(i - 1).cloned()
        };
        let hi = self.bounds.get(i).cloned().or_else(|| self.hi.clone());
        (lo, hi)
    }
}

/// A part whose digest differs on the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffPart {
    pub span: u32,
    pub part: u32,
    /// The server's row count in the part.
    pub rows: u64,
    /// The server replaces the part: its rows follow in `rows` messages;
    /// the client removes every row it holds in the part's range.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replace: bool,
}

/// The frames of a repair, after the server's `repair_begin`; each travels
/// as a binary frame (see [`encode_repair`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RepairMessage {
    /// Client: compare these ranges of a table.
    Check {
        table: String,
        spans: Vec<CheckSpan>,
    },
    /// Server: the parts that differ. When the check was one span over the
    /// whole key space, `total` is the table's full digest (row count and
    /// 32 hex digits) as the server holds it.
    Diff {
        table: String,
        parts: Vec<DiffPart>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        total: Option<(u64, String)>,
    },
    /// Server: rows of the replaced parts, as COPY text, after a `diff`.
    Rows { table: String, copy: String },
    /// Server: every row of the replaced parts has been sent.
    RowsEnd { table: String },
    /// Client: every table is repaired; the stream may resume.
    Done {
        /// Tables whose full digest did not match after the repair; the
        /// client fetches them with a snapshot.
        refetch: Vec<String>,
    },
}

/// Whether a differing part is replaced rather than cut further.
pub fn replaced(whole: bool, client_rows: u64, server_rows: u64) -> bool {
    whole || client_rows <= LEAF_ROWS || server_rows <= LEAF_ROWS
}

#[cfg(test)]
mod tests;

/// The server's side of a `check`: each row it holds in the spans is
/// added, in any order; then [`Tally::diff`] names the differing parts.
pub struct Tally<'a> {
    spans: &'a [CheckSpan],
    sums: Vec<Vec<RangeSum>>,
    total: RangeSum,
}

impl<'a> Tally<'a> {
    /// `spans` must be valid ([`CheckSpan::is_valid`]), ascending and
    /// disjoint.
    pub fn new(spans: &'a [CheckSpan]) -> Tally<'a> {
        Tally {
            spans,
            sums: spans
                .iter()
                .map(|s| vec![RangeSum::default(); s.parts()])
                .collect(),
            total: RangeSum::default(),
        }
    }

    /// Adds a row; rows outside every span are ignored.
    pub fn add(&mut self, key: &Key, hash: u128) {
        let index = self
            .spans
            .partition_point(|s| s.lo.as_ref().is_none_or(|lo| lo <= key));
        let Some(span) = index.checked_sub(1) else {
            return;
        };
        if let Some(part) = self.spans[span].part_of(key) {
            self.sums[span][part].add(hash);
            self.total.add(hash);
        }
    }

    /// Adds the rows of part `part` of span `span` as one precomputed sum
    /// (digests the server kept); out-of-range indices are ignored.
    pub fn add_sum(&mut self, span: usize, part: usize, sum: RangeSum) {
        if let Some(at) = self.sums.get_mut(span).and_then(|s| s.get_mut(part)) {
            at.merge(sum);
            self.total.merge(sum);
        }
    }

    /// Adds a row of a span compared whole (no key).
    pub fn add_whole(&mut self, span: usize, hash: u128) {
        if let Some(sum) = self.sums.get_mut(span).and_then(|s| s.first_mut()) {
            sum.add(hash);
            self.total.add(hash);
        }
    }

    /// Adds the rows another tally of the same spans was given (rows read
    /// in parts, over several connections).
    pub fn merge(&mut self, other: &Tally<'_>) {
        for (mine, theirs) in self.sums.iter_mut().zip(&other.sums) {
            for (m, t) in mine.iter_mut().zip(theirs) {
                m.merge(*t);
            }
        }
        self.total.merge(other.total);
    }

    /// Every row added.
    pub fn total(&self) -> RangeSum {
        self.total
    }

    /// The parts whose count or digest differ from the client's.
    pub fn diff(&self) -> Vec<DiffPart> {
        let mut parts = Vec::new();
        for (s, span) in self.spans.iter().enumerate() {
            for (p, sum) in self.sums[s].iter().enumerate() {
                let client_rows = span.rows[p];
                if client_rows == sum.rows && span.digest(p) == Some(sum.short()) {
                    continue;
                }
                parts.push(DiffPart {
                    span: u32::try_from(s).unwrap_or(u32::MAX),
                    part: u32::try_from(p).unwrap_or(u32::MAX),
                    rows: sum.rows,
                    replace: replaced(span.whole, client_rows, sum.rows),
                });
            }
        }
        parts
    }
}

/// The client's side: cuts one range of its rows, fed in key order, into
/// parts of about equal size and digests each.
pub struct Cutter {
    span: CheckSpan,
    cuts: std::vec::IntoIter<u64>,
    next_cut: Option<u64>,
    seen: u64,
    current: RangeSum,
    total: RangeSum,
}

impl Cutter {
    /// A range `lo..hi` holding `count` rows, cut into `parts` parts.
    pub fn new(lo: Option<Key>, hi: Option<Key>, count: u64, parts: usize) -> Cutter {
        let mut cuts = split_points(count, parts).into_iter();
        let next_cut = cuts.next();
        Cutter {
            span: cut::empty_span(lo, hi),
            cuts,
            next_cut,
            seen: 0,
            current: RangeSum::default(),
            total: RangeSum::default(),
        }
    }

    /// The next row in key order. Rows past the count the cutter was made
    /// for (the replica changed meanwhile) go to the last part.
    pub fn add(&mut self, key: &Key, hash: u128) {
        if self.next_cut == Some(self.seen) {
            self.close_part();
            self.span.bounds.push(key.clone());
            self.next_cut = self.cuts.next();
        }
        self.current.add(hash);
        self.total.add(hash);
        self.seen += 1;
    }

    fn close_part(&mut self) {
        self.span.rows.push(self.current.rows);
        self.span
            .digests
            .push_str(&format!("{:016x}", self.current.short()));
        self.current = RangeSum::default();
    }

    /// The span, and the sum of every row in it.
    pub fn finish(mut self, whole: bool) -> (CheckSpan, RangeSum) {
        self.close_part();
        self.span.whole = whole;
        (self.span, self.total)
    }
}
