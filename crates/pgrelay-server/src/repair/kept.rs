//! Digests the server keeps of each synced table, so a repair reads from
//! PostgreSQL only the ranges written since they were made instead of
//! every row, in its first round and in the next.
//!
//! Per table with a comparable key: sub-buckets cut where
//! `pgrelay_protocol::repair::starts_sub_bucket` says (as replicas cut their second round), each
//! a lower bound and the row count and 128-bit sum of its rows' hashes,
//! digested from one consistent snapshot `S0`; the keys that start
//! buckets (`starts_bucket`, as replicas cut their first round) start
//! sub-buckets too, so a bucket's sum is the sum of its sub-buckets'.
//! With them: the change log's head read before `S0` opened (every
//! transaction up to it is in `S0`), `S0`'s visibility, the log's id, the
//! table's schema and its storage (`relfilenode`).
//!
//! A repair's snapshot `S1` (opened after these were taken) differs from
//! `S0` by exactly the transactions `S1` sees and `S0` does not; all of
//! them are in the change log once capture has passed `S1`'s position,
//! after the head recorded here. A sub-bucket none of those transactions
//! wrote a key of (old or new) holds in `S1` exactly the rows it held in
//! `S0`: its digest is taken as kept ("clean"). A part whose bounds are
//! bounds of sub-buckets that are all clean is answered with their sum,
//! whatever round it is in. See `docs/repair.md`.
//!
//! ```text
//!  S0 head ──┬── lsn ≤ until₀, xid seen by S0 ── skipped (in S0 already)
//!            └── any other change of the table ─ its sub-buckets are dirty
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use pgrelay_protocol::repair::{starts_bucket, CheckSpan, Key, RangeSum};
use pgrelay_protocol::{Lsn, TableSchema, Visibility};
use tokio::sync::Notify;

/// One sub-bucket: keys from `lo` (none: no lower limit) up to the next
/// sub-bucket's `lo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SubBucket {
    pub(crate) lo: Option<Key>,
    pub(crate) sum: RangeSum,
    /// Whether `lo` starts a bucket too (the first sub-bucket does).
    pub(crate) opens_bucket: bool,
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
    pub(crate) subs: Vec<SubBucket>,
    pub(crate) rows: u64,
    /// How long making them took (remakings are spaced by it).
    pub(crate) took: Duration,
}

/// Which sub-buckets were written since the kept snapshot (see `since`),
/// one flag per sub-bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Dirty(pub(crate) Vec<bool>);

impl Kept {
    /// The sub-bucket holding `key`.
    pub(crate) fn sub_of(&self, key: &Key) -> usize {
        self.subs
            .partition_point(|b| b.lo.as_ref().is_none_or(|lo| lo <= key))
            .saturating_sub(1)
    }

    /// Every sub-bucket clean.
    pub(crate) fn clean(&self) -> Dirty {
        Dirty(vec![false; self.subs.len()])
    }

    /// Marks the sub-bucket of a key a change wrote (its old or new key).
    pub(crate) fn mark(&self, dirty: &mut Dirty, key: &Key) {
        if let Some(flag) = dirty.0.get_mut(self.sub_of(key)) {
            *flag = true;
        }
    }

    /// Buckets in all, and buckets holding a written sub-bucket.
    pub(crate) fn written_buckets(&self, dirty: &Dirty) -> (usize, usize) {
        let mut buckets = 0;
        let mut written = 0;
        let mut this_one = false;
        for (sub, flag) in self.subs.iter().zip(&dirty.0) {
            if sub.opens_bucket {
                buckets += 1;
                this_one = false;
            }
            if *flag && !this_one {
                written += 1;
                this_one = true;
            }
        }
        (buckets, written)
    }

    /// The index of the sub-bucket that starts at `bound`: none is the
    /// start of the first (a lower bound) or the end of the last (an
    /// upper bound); `None` when no sub-bucket starts there.
    fn boundary(&self, bound: Option<&Key>, upper: bool) -> Option<usize> {
        match bound {
            None if upper => Some(self.subs.len()),
            None => Some(0),
            Some(key) => {
                let at = self
                    .subs
                    .partition_point(|b| b.lo.as_ref().is_none_or(|lo| lo < key));
                (self.subs.get(at)?.lo.as_ref() == Some(key)).then_some(at)
            }
        }
    }

    /// Whether a change committed at `lsn` by transaction `xid` is in
    /// `S0` already (the hand-over rule a hydrating replica follows).
    pub(crate) fn saw(&self, lsn: Lsn, xid: u32) -> bool {
        lsn <= self.visibility.until && self.visibility.sees(xid)
    }

    /// For each part of a span (of any round), the kept sum of its rows
    /// when its bounds are bounds of kept sub-buckets that are all clean;
    /// `None` for a part that must be read.
    pub(crate) fn known_parts(&self, span: &CheckSpan, dirty: &Dirty) -> Vec<Option<RangeSum>> {
        (0..span.parts())
            .map(|part| {
                let (lo, hi) = span.part_range(part);
                let from = self.boundary(lo.as_ref(), false)?;
                let to = self.boundary(hi.as_ref(), true)?;
                if from >= to || dirty.0.get(from..to)?.iter().any(|d| *d) {
                    return None;
                }
                let mut sum = RangeSum::default();
                for sub in &self.subs[from..to] {
                    sum.merge(sub.sum);
                }
                Some(sum)
            })
            .collect()
    }
}

/// Empty sub-buckets: one from no lower bound, one at each of `starts`
/// (ascending, distinct keys that start sub-buckets).
pub(crate) fn empty_subs(starts: Vec<Key>) -> Vec<SubBucket> {
    std::iter::once(None)
        .chain(starts.into_iter().map(Some))
        .map(|lo| SubBucket {
            opens_bucket: lo.as_ref().is_none_or(starts_bucket),
            lo,
            sum: RangeSum::default(),
        })
        .collect()
}

/// Adds a row to the sub-bucket holding its key.
pub(crate) fn add_row(subs: &mut [SubBucket], key: &Key, hash: u128) {
    let at = subs
        .partition_point(|b| b.lo.as_ref().is_none_or(|lo| lo <= key))
        .saturating_sub(1);
    if let Some(sub) = subs.get_mut(at) {
        sub.sum.add(hash);
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
mod tests;
