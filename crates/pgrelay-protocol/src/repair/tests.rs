#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "small test sizes"
)]

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

type Table = BTreeMap<Key, Vec<Option<String>>>;

fn key(i: i64) -> Key {
    vec![KeyValue::Int(i)]
}

fn hash_of(row: &[Option<String>]) -> u128 {
    row_hash(row)
}

fn in_range(k: &Key, lo: &Option<Key>, hi: &Option<Key>) -> bool {
    lo.as_ref().is_none_or(|lo| k >= lo) && hi.as_ref().is_none_or(|hi| k < hi)
}

/// Runs the descent between two in-memory tables, as client and server do
/// over the socket; returns the rows moved and the check rounds.
fn repair(server: &Table, client: &mut Table) -> (u64, usize) {
    let mut pending: Vec<(Option<Key>, Option<Key>)> = vec![(None, None)];
    let mut first = true;
    let mut moved = 0;
    let mut rounds = 0;
    let mut expected = None;
    let mut held = RangeSum::default();
    while !pending.is_empty() {
        rounds += 1;
        let mut spans = Vec::new();
        for (lo, hi) in pending.drain(..) {
            let rows: Vec<_> = client
                .iter()
                .filter(|(k, _)| in_range(k, &lo, &hi))
                .collect();
            let (span, sum) = if first {
                let parts = (rows.len() as u64)
                    .div_ceil(FIRST_PART_ROWS)
                    .clamp(1, MAX_FIRST_PARTS) as usize;
                let mut cutter = Cutter::new(lo, hi, rows.len() as u64, parts);
                for (k, row) in rows {
                    cutter.add(k, hash_of(row));
                }
                cutter.finish(false)
            } else {
                let hashed: Vec<(Key, u128)> = rows
                    .into_iter()
                    .map(|(k, row)| (k.clone(), hash_of(row)))
                    .collect();
                cut_range(lo, hi, &hashed)
            };
            assert!(span.is_valid(), "{span:?}");
            if first {
                held = sum;
            }
            spans.push(span);
        }
        let mut tally = Tally::new(&spans);
        for (k, row) in server {
            tally.add(k, hash_of(row));
        }
        if first {
            expected = Some(tally.total());
        }
        first = false;
        for part in tally.diff() {
            let span = &spans[part.span as usize];
            let (lo, hi) = span.part_range(part.part as usize);
            if part.replace {
                let gone: Vec<Key> = client
                    .keys()
                    .filter(|k| in_range(k, &lo, &hi))
                    .cloned()
                    .collect();
                for k in gone {
                    let row = client.remove(&k).unwrap();
                    held.remove(hash_of(&row));
                }
                for (k, row) in server.iter().filter(|(k, _)| in_range(k, &lo, &hi)) {
                    client.insert(k.clone(), row.clone());
                    held.add(hash_of(row));
                    moved += 1;
                }
            } else {
                pending.push((lo, hi));
            }
        }
    }
    assert_eq!(
        Some(held),
        expected,
        "the full digest follows the replaced rows"
    );
    (moved, rounds)
}

fn table(keys: &[i64], tag: &str) -> Table {
    keys.iter()
        .map(|&i| (key(i), vec![Some(i.to_string()), Some(format!("{tag}{i}"))]))
        .collect()
}

#[test]
fn equal_tables_move_nothing() {
    let server = table(&(0..2000).collect::<Vec<_>>(), "v");
    let mut client = server.clone();
    let (moved, rounds) = repair(&server, &mut client);
    assert_eq!((moved, rounds), (0, 1));
}

#[test]
fn a_few_changes_move_few_rows() {
    let server = table(&(0..100_000).collect::<Vec<_>>(), "v");
    let mut client = server.clone();
    for i in (0..100_000).step_by(1000) {
        client.insert(key(i), vec![Some(i.to_string()), Some("old".into())]);
    }
    client.remove(&key(5));
    client.insert(key(200_000), vec![None, None]);
    let (moved, _) = repair(&server, &mut client);
    assert_eq!(client, server);
    assert!(moved <= 110 * LEAF_ROWS, "moved {moved} rows");
}

#[test]
fn empty_sides() {
    let server = table(&(0..600).collect::<Vec<_>>(), "v");
    let mut client = Table::new();
    repair(&server, &mut client);
    assert_eq!(client, server);
    let mut client = server.clone();
    repair(&Table::new(), &mut client);
    assert!(client.is_empty());
}

#[test]
fn text_keys_order_by_bytes() {
    let a = KeyValue::Text("Z".into());
    let b = KeyValue::Text("a".into());
    let c = KeyValue::Text("é".into());
    assert!(a < b && b < c);
    assert!(KeyValue::Int(-5) < KeyValue::Int(3));
}

#[test]
fn spans_refuse_bad_shapes() {
    let good = CheckSpan {
        lo: Some(key(1)),
        hi: Some(key(9)),
        bounds: vec![key(4)],
        rows: vec![1, 2],
        digests: "0".repeat(32),
        whole: false,
    };
    assert!(good.is_valid());
    assert_eq!(good.part_of(&key(4)), Some(1));
    assert_eq!(good.part_of(&key(9)), None);
    let mut bad = good.clone();
    bad.bounds = vec![key(10)];
    assert!(!bad.is_valid());
    let mut bad = good.clone();
    bad.digests.pop();
    assert!(!bad.is_valid());
}

#[test]
fn frames_round_trip() {
    let message = RepairMessage::Diff {
        table: "public.t".into(),
        parts: vec![DiffPart {
            span: 0,
            part: 3,
            rows: 7,
            replace: true,
        }],
        total: Some((7, "ab".into())),
    };
    let frame = encode_repair(&message).unwrap();
    assert_eq!(frame[0], REPAIR_TAG);
    assert_eq!(decode_repair(&frame, 1 << 20).unwrap(), message);
    assert!(decode_repair(&frame, 4).is_err());
    assert!(decode_repair(b"\x01abc", 100).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random tables and random differences (updates, inserts, deletes,
    /// whole ranges missing on either side): the repair always ends equal.
    #[test]
    fn repair_always_ends_equal(
        keys in proptest::collection::btree_set(-2000i64..2000, 0..1500),
        edits in proptest::collection::vec((0u8..4, -2100i64..2100, 0usize..40), 0..60),
    ) {
        let keys: Vec<i64> = keys.into_iter().collect();
        let server = table(&keys, "v");
        let mut client = server.clone();
        for (kind, at, len) in edits {
            for i in at..at + len as i64 {
                match kind {
                    0 => { client.remove(&key(i)); }
                    1 => { client.insert(key(i), vec![Some(i.to_string()), Some("local".into())]); }
                    2 => { if client.contains_key(&key(i)) { client.insert(key(i), vec![None, Some(String::new())]); } }
                    _ => { if i % 7 == 0 { client.remove(&key(i)); } }
                }
            }
        }
        repair(&server, &mut client);
        prop_assert_eq!(client, server);
    }
}

/// A part's sum added whole (digests the server kept) counts as its rows
/// would, in the part and in the total.
#[test]
fn a_precomputed_part_sum_counts_as_its_rows() {
    let server = table(&(0..1000).collect::<Vec<_>>(), "v");
    let mut cutter = Cutter::new(None, None, 1000, 4);
    for (k, row) in &server {
        cutter.add(k, hash_of(row));
    }
    let (span, _) = cutter.finish(false);
    let spans = [span];
    let mut by_rows = Tally::new(&spans);
    let mut mixed = Tally::new(&spans);
    let mut part_one = RangeSum::default();
    for (k, row) in &server {
        by_rows.add(k, hash_of(row));
        if spans[0].part_of(k) == Some(1) {
            part_one.add(hash_of(row));
        } else {
            mixed.add(k, hash_of(row));
        }
    }
    mixed.add_sum(0, 1, part_one);
    mixed.add_sum(0, 9, part_one);
    assert_eq!(mixed.total(), by_rows.total());
    assert!(mixed.diff().is_empty() && by_rows.diff().is_empty());
}
