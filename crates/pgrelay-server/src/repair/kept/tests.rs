use std::collections::BTreeMap;

use pgrelay_protocol::repair::{cut_range, starts_bucket, starts_sub_bucket, KeyValue};
use proptest::prelude::*;

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

fn kept_of(subs: Vec<SubBucket>, rows: u64) -> Kept {
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
        subs,
        rows,
        took: Duration::ZERO,
    }
}

/// Sub-buckets starting at none, 50, 100, ..., 350 (buckets at none,
/// 100, 200, 300); 5, 5, 10, 10, 15, 15, 20, 20 rows.
fn kept() -> Kept {
    let subs = [
        None,
        Some(50),
        Some(100),
        Some(150),
        Some(200),
        Some(250),
        Some(300),
        Some(350),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, lo)| SubBucket {
        opens_bucket: lo.is_none_or(|k| k % 100 == 0),
        lo: lo.map(key),
        sum: sum(5 * (i as u64 / 2 + 1)),
    })
    .collect();
    kept_of(subs, 100)
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

fn dirty(flags: &[usize]) -> Dirty {
    let mut dirty = kept().clean();
    for &i in flags {
        dirty.0[i] = true;
    }
    dirty
}

#[test]
fn a_key_is_in_the_sub_bucket_whose_range_holds_it() {
    let kept = kept();
    assert_eq!(kept.sub_of(&key(-5)), 0);
    assert_eq!(kept.sub_of(&key(49)), 0);
    assert_eq!(kept.sub_of(&key(50)), 1);
    assert_eq!(kept.sub_of(&key(299)), 5);
    assert_eq!(kept.sub_of(&key(i64::MAX)), 7);
}

#[test]
fn only_parts_on_sub_bucket_bounds_and_clean_are_known() {
    let kept = kept();
    let clean = kept.clean();
    // Bounds on bucket bounds: each part the sum of its sub-buckets.
    let known = kept.known_parts(&span(&[100, 300]), &clean);
    assert_eq!(known, vec![Some(sum(10)), Some(sum(50)), Some(sum(40))]);
    // On sub-bucket bounds inside buckets (a second round).
    let mut bucket = span(&[150]);
    bucket.lo = Some(key(100));
    bucket.hi = Some(key(200));
    bucket.rows = vec![0, 0];
    bucket.digests = "0".repeat(32);
    assert_eq!(
        kept.known_parts(&bucket, &clean),
        vec![Some(sum(10)), Some(sum(10))]
    );
    // A bound inside a sub-bucket: both parts around it are read.
    let known = kept.known_parts(&span(&[100, 275]), &clean);
    assert_eq!(known, vec![Some(sum(10)), None, None]);
    // A dirty sub-bucket: the part holding it is read, not its bucket's
    // other sub-bucket.
    let known = kept.known_parts(&span(&[150, 200]), &dirty(&[2]));
    assert_eq!(known, vec![None, Some(sum(10)), Some(sum(70))]);
    assert_eq!(
        kept.known_parts(&bucket, &dirty(&[2])),
        vec![None, Some(sum(10))]
    );
    // One part over everything.
    let known = kept.known_parts(&span(&[]), &clean);
    assert_eq!(known, vec![Some(sum(100))]);
}

#[test]
fn a_written_sub_bucket_counts_its_bucket_once() {
    let kept = kept();
    assert_eq!(kept.written_buckets(&kept.clean()), (4, 0));
    assert_eq!(kept.written_buckets(&dirty(&[2, 3])), (4, 1));
    assert_eq!(kept.written_buckets(&dirty(&[0, 3, 7])), (4, 3));
    let mut marked = kept.clean();
    kept.mark(&mut marked, &key(120));
    kept.mark(&mut marked, &key(-7));
    assert_eq!(marked, dirty(&[0, 2]));
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

type Rows = BTreeMap<i64, u128>;

/// Kept digests of `rows`, as the keeper makes them.
fn made_from(rows: &Rows) -> Kept {
    let starts: Vec<Key> = rows
        .keys()
        .map(|&k| key(k))
        .filter(starts_sub_bucket)
        .collect();
    let mut subs = empty_subs(starts);
    for (&k, &hash) in rows {
        add_row(&mut subs, &key(k), hash);
    }
    kept_of(subs, rows.len() as u64)
}

/// The true sum of `rows` in part `part` of `span`.
fn true_sum(rows: &Rows, span: &CheckSpan, part: usize) -> RangeSum {
    let mut sum = RangeSum::default();
    for (&k, &hash) in rows {
        if span.part_of(&key(k)) == Some(part) {
            sum.add(hash);
        }
    }
    sum
}

/// A replica's first round (its buckets) and second (each bucket cut
/// where `cut_range` says).
fn client_spans(rows: &Rows) -> Vec<CheckSpan> {
    let hashed: Vec<(Key, u128)> = rows.iter().map(|(&k, &h)| (key(k), h)).collect();
    let mut first = span(&[]);
    first.bounds = hashed
        .iter()
        .skip(1)
        .map(|(k, _)| k.clone())
        .filter(starts_bucket)
        .collect();
    first.rows = vec![0; first.bounds.len() + 1];
    first.digests = "0".repeat(16 * first.rows.len());
    let mut spans = vec![first.clone()];
    for part in 0..first.parts() {
        let (lo, hi) = first.part_range(part);
        let inside: Vec<(Key, u128)> = hashed
            .iter()
            .filter(|(k, _)| first.part_of(k) == Some(part))
            .cloned()
            .collect();
        spans.push(cut_range(lo, hi, &inside).0);
    }
    spans
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Rows written after the kept snapshot (updates, inserts, deletes,
    /// moves: old and new key marked, as `since` marks them) and a
    /// replica that differs anywhere: every part of its first or second
    /// round that the kept digests answer is answered with the sum the
    /// table holds now. A dirty sub-bucket answered from its stale sum
    /// fails here.
    #[test]
    fn parts_answered_from_kept_sums_are_true(
        keys in proptest::collection::btree_set(0i64..4_000, 0..1_500),
        since in proptest::collection::vec((0u8..4, 0i64..4_100, 0i64..4_100), 0..30),
        away in proptest::collection::vec((0u8..3, 0i64..4_100), 0..30),
    ) {
        let s0: Rows = keys.iter().map(|&k| (k, (u128::from(k.unsigned_abs()) << 64) | 1)).collect();
        let kept = made_from(&s0);
        let mut s1 = s0.clone();
        let mut dirty = kept.clean();
        for (n, (op, a, b)) in since.into_iter().enumerate() {
            let version = u128::try_from(n).unwrap() + 2;
            match op {
                0 => { s1.insert(a, (u128::from(a.unsigned_abs()) << 64) | version); }
                1 => { s1.remove(&a); }
                2 => if let Some(h) = s1.get_mut(&a) { *h ^= version << 8; },
                _ => if let Some(h) = s1.remove(&a) {
                    s1.insert(b, h);
                    kept.mark(&mut dirty, &key(b));
                },
            }
            kept.mark(&mut dirty, &key(a));
        }
        let mut replica = s0.clone();
        for (op, a) in away {
            match op {
                0 => { replica.insert(a, 7); }
                1 => { replica.remove(&a); }
                _ => if let Some(h) = replica.get_mut(&a) { *h += 1; },
            }
        }
        let mut answered = 0;
        for span in client_spans(&replica) {
            prop_assert!(span.is_valid());
            for (part, known) in kept.known_parts(&span, &dirty).into_iter().enumerate() {
                if let Some(known) = known {
                    prop_assert_eq!(known, true_sum(&s1, &span, part), "part {} of {:?}", part, span);
                    answered += 1;
                }
            }
        }
        // Not vacuous: with nothing written, every part is answered.
        if dirty.0.iter().all(|d| !d) && replica == s0 {
            prop_assert!(answered > 0);
        }
    }
}
