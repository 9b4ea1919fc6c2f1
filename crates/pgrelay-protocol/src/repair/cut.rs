//! How a client cuts a differing range for the next round, once the first
//! round found it: at the keys inside it that start sub-buckets
//! ([`starts_sub_bucket`]) when it holds any, so the server can answer
//! the parts from the sub-bucket sums it keeps instead of reading their
//! rows; otherwise (a sub-bucket already, or a range a client cut by
//! count) into parts of about [`LEAF_ROWS`] rows, so that a differing
//! part is small enough to be replaced in the next answer.
//!
//! ```text
//!  round 1: buckets (~128 rows)        cut at keys ≡ 0 mod 128
//!  round 2: its sub-buckets (~16 rows) cut at keys ≡ 0 mod 16 → server: kept sums
//!  round 3: parts of ≤ 4 rows          cut by count          → replaced
//! ```

use super::{starts_sub_bucket, CheckSpan, Key, RangeSum, FANOUT, LEAF_ROWS};

/// Parts a range is cut into at its sub-bucket starts, at most (its
/// sub-buckets are merged, evenly, past this: the parts' bounds stay
/// sub-bucket bounds). A bucket holds 8 sub-buckets on average, and a
/// differing bucket about 16 (a large bucket catches more changes).
pub const MAX_SUB_PARTS: usize = 16;

/// Parts a range without sub-bucket starts inside is cut into by count,
/// at most: enough for parts of [`LEAF_ROWS`] in a sub-bucket of twice
/// the mean size.
pub const MAX_COUNT_PARTS: usize = 2 * FANOUT;

/// Cuts `rows` (the range `lo..hi`'s, in key order, with their hashes)
/// for a round after the first; returns the span and the sum of its rows.
pub fn cut_range(lo: Option<Key>, hi: Option<Key>, rows: &[(Key, u128)]) -> (CheckSpan, RangeSum) {
    // Bounds at the keys that start sub-buckets, but never at the first
    // row: the range's own lower bound starts its first part.
    let starts = (1..rows.len()).any(|i| starts_sub_bucket(&rows[i].0));
    if starts {
        let mut subs = SubSums::default();
        for (key, hash) in rows {
            subs.add(key, *hash);
        }
        return subs.span(lo, hi);
    }
    let leaf = usize::try_from(LEAF_ROWS).unwrap_or(usize::MAX);
    let parts = rows.len().div_ceil(leaf);
    let parts = parts.clamp(FANOUT, MAX_COUNT_PARTS).min(rows.len().max(1));
    let size = rows.len().div_ceil(parts).max(1);
    let mut span = empty_span(lo, hi);
    let mut total = RangeSum::default();
    for (n, chunk) in rows.chunks(size).enumerate() {
        let mut sum = RangeSum::default();
        for (_, hash) in chunk {
            sum.add(*hash);
        }
        if n > 0 {
            span.bounds.push(chunk[0].0.clone());
        }
        push_part(&mut span, sum);
        total.merge(sum);
    }
    if span.rows.is_empty() {
        push_part(&mut span, RangeSum::default());
    }
    (span, total)
}

/// A range's rows summed per sub-bucket, fed in key order: a new
/// sub-bucket at each key that starts one, except the first (the
/// range's lower bound starts the first sub-bucket). A replica keeps
/// these beside its buckets, so that its second round need not read a
/// bucket's rows again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubSums {
    /// The keys that start the second and later sub-buckets.
    pub bounds: Vec<Key>,
    /// One per sub-bucket (none before the first row).
    pub sums: Vec<RangeSum>,
}

impl SubSums {
    /// The next row in key order.
    pub fn add(&mut self, key: &Key, hash: u128) {
        if self.sums.is_empty() {
            self.sums.push(RangeSum::default());
        } else if starts_sub_bucket(key) {
            self.bounds.push(key.clone());
            self.sums.push(RangeSum::default());
        }
        if let Some(sum) = self.sums.last_mut() {
            sum.add(hash);
        }
    }

    /// Every row added.
    pub fn total(&self) -> RangeSum {
        let mut total = RangeSum::default();
        for sum in &self.sums {
            total.merge(*sum);
        }
        total
    }

    /// The span over `lo..hi` these rows are in, cut at the sub-buckets
    /// (neighbours merged evenly past [`MAX_SUB_PARTS`]), and the sum of
    /// its rows: what [`cut_range`] makes of the same rows.
    pub fn span(&self, lo: Option<Key>, hi: Option<Key>) -> (CheckSpan, RangeSum) {
        let every = self.sums.len().div_ceil(MAX_SUB_PARTS).max(1);
        let mut span = empty_span(lo, hi);
        for (n, group) in self.sums.chunks(every).enumerate() {
            let mut sum = RangeSum::default();
            for s in group {
                sum.merge(*s);
            }
            if n > 0 {
                if let Some(bound) = self.bounds.get(n * every - 1) {
                    span.bounds.push(bound.clone());
                }
            }
            push_part(&mut span, sum);
        }
        if span.rows.is_empty() {
            push_part(&mut span, RangeSum::default());
        }
        (span, self.total())
    }
}

/// A span from `lo` to `hi` with no parts yet.
pub(super) fn empty_span(lo: Option<Key>, hi: Option<Key>) -> CheckSpan {
    CheckSpan {
        lo,
        hi,
        bounds: Vec::new(),
        rows: Vec::new(),
        digests: String::new(),
        whole: false,
    }
}

fn push_part(span: &mut CheckSpan, sum: RangeSum) {
    span.rows.push(sum.rows);
    span.digests.push_str(&format!("{:016x}", sum.short()));
}

#[cfg(test)]
mod tests {
    use super::super::{starts_bucket, KeyValue};
    use super::*;

    fn rows(keys: impl IntoIterator<Item = i64>) -> Vec<(Key, u128)> {
        keys.into_iter()
            .map(|i| (vec![KeyValue::Int(i)], u128::from(i.unsigned_abs()) * 7 + 1))
            .collect()
    }

    fn sum_of(rows: &[(Key, u128)]) -> RangeSum {
        let mut sum = RangeSum::default();
        for (_, hash) in rows {
            sum.add(*hash);
        }
        sum
    }

    #[test]
    fn a_bucket_is_cut_at_its_sub_bucket_starts() {
        // A bucket: from one key that starts a bucket to the next.
        let all: Vec<i64> = (0..20_000).collect();
        let starts: Vec<i64> = all
            .iter()
            .copied()
            .filter(|&i| starts_bucket(&vec![KeyValue::Int(i)]))
            .collect();
        let inner_of = |bucket: &[(Key, u128)]| -> Vec<Key> {
            bucket[1..]
                .iter()
                .filter(|(k, _)| starts_sub_bucket(k))
                .map(|(k, _)| k.clone())
                .collect()
        };
        // One of fewer than MAX_SUB_PARTS sub-buckets, more than one.
        let (lo, hi) = starts
            .windows(2)
            .map(|w| (w[0], w[1]))
            .find(|&(lo, hi)| (1..MAX_SUB_PARTS).contains(&inner_of(&rows(lo..hi)).len()))
            .unwrap();
        let bucket = rows(lo..hi);
        let inner = inner_of(&bucket);
        let (span, sum) = cut_range(
            Some(vec![KeyValue::Int(lo)]),
            Some(vec![KeyValue::Int(hi)]),
            &bucket,
        );
        assert!(span.is_valid());
        assert_eq!(span.bounds, inner);
        assert_eq!(sum, sum_of(&bucket));
        assert_eq!(span.rows.iter().sum::<u64>(), bucket.len() as u64);
    }

    #[test]
    fn many_sub_buckets_are_merged_and_bounds_stay_sub_bucket_starts() {
        let range = rows(0..5_000);
        let (span, sum) = cut_range(None, None, &range);
        assert!(span.is_valid());
        assert!(span.parts() <= MAX_SUB_PARTS && span.parts() > MAX_SUB_PARTS / 2);
        assert!(span.bounds.iter().all(starts_sub_bucket));
        assert_eq!(sum, sum_of(&range));
    }

    #[test]
    fn a_range_without_sub_bucket_starts_is_cut_by_count_into_small_parts() {
        // Keys that start no sub-bucket (after the first).
        let keys: Vec<i64> = (1..10_000)
            .filter(|&i| !starts_sub_bucket(&vec![KeyValue::Int(i)]))
            .take(30)
            .collect();
        let range = rows(keys);
        let (span, sum) = cut_range(None, None, &range);
        assert!(span.is_valid());
        assert_eq!(span.parts(), MAX_COUNT_PARTS);
        assert!(span.rows.iter().all(|&r| r <= LEAF_ROWS));
        assert_eq!(sum, sum_of(&range));
        // Few rows: never an empty part.
        let (span, _) = cut_range(None, None, &range[..6]);
        assert!(span.is_valid());
        assert!(span.rows.iter().all(|&r| r > 0));
        let (span, _) = cut_range(None, None, &[]);
        assert!(span.is_valid() && span.parts() == 1 && span.rows[0] == 0);
    }
}
