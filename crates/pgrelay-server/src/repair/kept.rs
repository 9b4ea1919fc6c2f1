//! Digests the server keeps of each synced table, so a repair's first
//! round reads from PostgreSQL only the ranges written since they were
//! made instead of every row.
//!
//! Per table with a comparable key: buckets cut where
//! [`starts_bucket`] says (as replicas cut theirs), each a lower bound and
//! the row count and 128-bit sum of its rows' hashes, digested from one
//! consistent snapshot `S0`. With them: the change log's head read before
//! `S0` opened (every transaction up to it is in `S0`), `S0`'s visibility,
//! the log's id, the table's schema and its storage (`relfilenode`).
//!
//! A repair's snapshot `S1` (opened after these were taken) differs from
//! `S0` by exactly the transactions `S1` sees and `S0` does not; all of
//! them are in the change log once capture has passed `S1`'s position,
//! after the head recorded here. A bucket none of those transactions
//! wrote a key of (old or new) holds in `S1` exactly the rows it held in
//! `S0`: its digest is taken as kept ("clean"). See `docs/repair.md`.
//!
//! ```text
//!  S0 head ──┬── lsn ≤ until₀, xid seen by S0 ── skipped (in S0 already)
//!            └── any other change of the table ─ its buckets are dirty
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use pgrelay_protocol::repair::{CheckSpan, Key, RangeSum};
use pgrelay_protocol::{Lsn, TableSchema, Visibility};
use tokio::sync::Notify;

/// One bucket: keys from `lo` (none: no lower limit) up to the next
/// bucket's `lo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KeptBucket {
    pub(crate) lo: Option<Key>,
    pub(crate) sum: RangeSum,
}

/// A table's kept digests and what they were made from.
#[derive(Debug)]
pub(crate) struct Kept {
    /// The schema the rows were read with; any change makes them stale.
    pub(crate) schema: TableSchema,
    /// The change log they follow.
    pub(crate) log_id: Arc<str>,
    /// The change log's head read before `S0` opened.
    pub(crate) from: Lsn,
    /// What `S0` saw.
    pub(crate) visibility: Visibility,
    /// The table's storage when `S0` read it: a rewrite (an `ALTER
    /// TABLE` that changes values without logging changes, a
    /// `TRUNCATE`) gives it a new one.
    pub(crate) filenode: u32,
    /// Ascending; the first has no lower bound.
    pub(crate) buckets: Vec<KeptBucket>,
    pub(crate) rows: u64,
    /// How long making them took (remakings are spaced by it).
    pub(crate) took: Duration,
}

impl Kept {
    /// The bucket holding `key`.
    pub(crate) fn bucket_of(&self, key: &Key) -> usize {
        self.buckets
            .partition_point(|b| b.lo.as_ref().is_none_or(|lo| lo <= key))
            .saturating_sub(1)
    }

    /// The index of the bucket that starts at `bound`: none is the start
    /// of the first (a lower bound) or the end of the last (an upper
    /// bound); `None` when no bucket starts there.
    fn boundary(&self, bound: Option<&Key>, upper: bool) -> Option<usize> {
        match bound {
            None if upper => Some(self.buckets.len()),
            None => Some(0),
            Some(key) => {
                let at = self
                    .buckets
                    .partition_point(|b| b.lo.as_ref().is_none_or(|lo| lo < key));
                (self.buckets.get(at)?.lo.as_ref() == Some(key)).then_some(at)
            }
        }
    }

    /// Whether a change committed at `lsn` by transaction `xid` is in
    /// `S0` already (the hand-over rule a hydrating replica follows).
    pub(crate) fn saw(&self, lsn: Lsn, xid: u32) -> bool {
        lsn <= self.visibility.until && self.visibility.sees(xid)
    }

    /// For each part of a first-round span, the kept sum of its rows when
    /// its bounds are bounds of kept buckets that are all clean; `None`
    /// for a part that must be read.
    pub(crate) fn known_parts(&self, span: &CheckSpan, dirty: &[bool]) -> Vec<Option<RangeSum>> {
        (0..span.parts())
            .map(|part| {
                let (lo, hi) = span.part_range(part);
                let from = self.boundary(lo.as_ref(), false)?;
                let to = self.boundary(hi.as_ref(), true)?;
                if from >= to || dirty.get(from..to)?.iter().any(|d| *d) {
                    return None;
                }
                let mut sum = RangeSum::default();
                for bucket in &self.buckets[from..to] {
                    sum.merge(bucket.sum);
                }
                Some(sum)
            })
            .collect()
    }
}

/// Whether snapshot `later` sees every transaction `earlier` saw: every
/// id `earlier` could see committed is below `later`'s horizon and not
/// in progress for `later` (an id in progress for `later` that `earlier`
/// saw committed means `later` was taken first).
pub(crate) fn sees_all_of(later: &Visibility, earlier: &Visibility) -> bool {
    earlier.xmax <= later.xmax
        && later
            .xip
            .iter()
            .all(|x| *x >= earlier.xmax || earlier.xip.contains(x))
}

/// Every table's kept digests, shared by the builder (which replaces
/// them) and repairs (which read them).
#[derive(Default)]
pub(crate) struct KeptDigests {
    tables: RwLock<HashMap<String, Arc<Kept>>>,
    /// Tables a repair found too changed: rebuilt first.
    stale: Mutex<HashSet<String>>,
    /// Wakes the builder (a table went stale).
    pub(crate) wake: Notify,
    /// Builds finished, for `/metrics`.
    pub(crate) builds: AtomicU64,
}

impl KeptDigests {
    /// Every table's, as they are now (a repair takes them before its
    /// snapshot opens, so each was made from an earlier snapshot).
    pub(crate) fn all(&self) -> HashMap<String, Arc<Kept>> {
        self.tables
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn put(&self, kept: Kept) {
        let name = kept.schema.name.clone();
        self.stale
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name);
        self.tables
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, Arc::new(kept));
        self.builds.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops a table's digests (it is no longer synced, or they cannot be
    /// made).
    pub(crate) fn remove(&self, table: &str) {
        self.tables
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(table);
    }

    /// Asks for a table's digests to be made again.
    pub(crate) fn mark_stale(&self, table: &str) {
        self.stale
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(table.to_owned());
        self.wake.notify_one();
    }

    pub(crate) fn is_stale(&self, table: &str) -> bool {
        self.stale
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(table)
    }

    /// Tables with digests.
    pub(crate) fn len(&self) -> usize {
        self.tables.read().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use pgrelay_protocol::repair::KeyValue;

    use super::*;

    fn key(i: i64) -> Key {
        vec![KeyValue::Int(i)]
    }

    fn sum(rows: u64) -> RangeSum {
        RangeSum {
            rows,
            sum: u128::from(rows) * 1_000,
        }
    }

    fn visibility(xmin: u64, xmax: u64, xip: &[u64], until: u64) -> Visibility {
        Visibility {
            xmin,
            xmax,
            xip: xip.to_vec(),
            until: Lsn(until),
        }
    }

    /// Buckets starting at none, 100, 200, 300; 10, 20, 30, 40 rows.
    fn kept() -> Kept {
        let schema: TableSchema = serde_json::from_value(serde_json::json!({
            "name": "public.t", "columns": [], "primary_key": ["id"], "version": 1
        }))
        .unwrap();
        Kept {
            schema,
            log_id: Arc::from("log"),
            from: Lsn(10),
            visibility: visibility(100, 105, &[102], 500),
            filenode: 1,
            buckets: [None, Some(100), Some(200), Some(300)]
                .into_iter()
                .enumerate()
                .map(|(i, lo)| KeptBucket {
                    lo: lo.map(key),
                    sum: sum(10 * (i as u64 + 1)),
                })
                .collect(),
            rows: 100,
            took: Duration::ZERO,
        }
    }

    fn span(bounds: &[i64]) -> CheckSpan {
        CheckSpan {
            lo: None,
            hi: None,
            bounds: bounds.iter().map(|&i| key(i)).collect(),
            rows: vec![0; bounds.len() + 1],
            digests: "0".repeat(16 * (bounds.len() + 1)),
            whole: false,
        }
    }

    #[test]
    fn a_key_is_in_the_bucket_whose_range_holds_it() {
        let kept = kept();
        assert_eq!(kept.bucket_of(&key(-5)), 0);
        assert_eq!(kept.bucket_of(&key(99)), 0);
        assert_eq!(kept.bucket_of(&key(100)), 1);
        assert_eq!(kept.bucket_of(&key(299)), 2);
        assert_eq!(kept.bucket_of(&key(i64::MAX)), 3);
    }

    #[test]
    fn only_parts_on_bucket_bounds_and_clean_are_known() {
        let kept = kept();
        let clean = [false; 4];
        // Bounds on bucket bounds: each part the sum of its buckets.
        let known = kept.known_parts(&span(&[100, 300]), &clean);
        assert_eq!(known, vec![Some(sum(10)), Some(sum(50)), Some(sum(40))]);
        // A bound inside a bucket: both parts around it are read.
        let known = kept.known_parts(&span(&[100, 250]), &clean);
        assert_eq!(known, vec![Some(sum(10)), None, None]);
        // A dirty bucket: the part holding it is read.
        let known = kept.known_parts(&span(&[200]), &[false, true, false, false]);
        assert_eq!(known, vec![None, Some(sum(70))]);
        // One part over everything.
        let known = kept.known_parts(&span(&[]), &clean);
        assert_eq!(known, vec![Some(sum(100))]);
    }

    #[test]
    fn a_change_the_kept_snapshot_saw_is_not_dirty_and_one_after_is() {
        let kept = kept();
        // Committed before the snapshot (below xmin, or below xmax and
        // not in progress), at or before its position: in S0 already.
        assert!(kept.saw(Lsn(400), 90));
        assert!(kept.saw(Lsn(500), 103));
        // In progress when S0 was taken, or begun after it, or after its
        // position: not in S0.
        assert!(!kept.saw(Lsn(400), 102));
        assert!(!kept.saw(Lsn(400), 105));
        assert!(!kept.saw(Lsn(501), 90));
    }

    #[test]
    fn a_later_snapshot_sees_all_an_earlier_one_saw() {
        let s0 = visibility(100, 105, &[102], 500);
        // Later: 102 and 104 finished, 106 and 107 began.
        assert!(sees_all_of(&visibility(103, 108, &[106], 600), &s0));
        assert!(sees_all_of(&visibility(102, 108, &[102, 106], 600), &s0));
        // Earlier: 103 (seen by S0) still running, or a lower horizon.
        assert!(!sees_all_of(&visibility(100, 105, &[102, 103], 400), &s0));
        assert!(!sees_all_of(&visibility(100, 104, &[], 400), &s0));
    }
}
