//! The replica's side of a repair against a real SQLite table: random
//! tables (integer, text and composite keys, or none), random differences
//! from the server's rows; the descent with the replica's own digests,
//! removals and loads always ends with the replica equal to the server
//! and its running sum equal to the server's full digest. (The server's
//! side is the protocol's [`Tally`], fed the server's rows the way
//! `pgrelay-server`'s repair feeds it from COPY.)

use std::collections::{BTreeMap, HashMap};

use pgrelay_protocol::canonical::canonical_pg_text;
use pgrelay_protocol::repair::{key_kinds, row_hash, Key, KeyValue, RangeSum, Tally};
use pgrelay_protocol::{Column, TableSchema, ValueKind};
use proptest::prelude::*;
use rusqlite::Connection;

use super::{digest, load, remove, rows_in_range, Range};
use crate::replica::{capture, schema};

const NAME: &str = "public.prop";

/// Server rows: PostgreSQL text per column, in column order.
type Rows = Vec<Vec<Option<String>>>;

fn column(name: &str, kind: ValueKind, oid: u32) -> Column {
    Column {
        name: name.to_owned(),
        pg_type: match oid {
            20 => "bigint",
            701 => "double precision",
            _ => "text",
        }
        .to_owned(),
        type_oid: oid,
        kind,
        attnum: None,
    }
}

/// Key shapes: 0 integer, 1 text, 2 integer and text, 3 none (whole).
fn table(shape: u8) -> TableSchema {
    let mut columns = vec![
        column("a", ValueKind::Integer, 20),
        column("b", ValueKind::Text, 25),
        column("n", ValueKind::Integer, 20),
        column("f", ValueKind::Float, 701),
        column("s", ValueKind::Text, 25),
    ];
    let primary_key = match shape {
        0 => vec!["a"],
        1 => vec!["b"],
        2 => vec!["a", "b"],
        _ => vec![],
    };
    if shape == 1 {
        columns.swap(0, 1);
    }
    TableSchema {
        name: NAME.to_owned(),
        columns,
        primary_key: primary_key.into_iter().map(str::to_owned).collect(),
        version: 1,
        skipped: None,
        backfilled: Vec::new(),
        oid: None,
    }
}

fn copy_field(value: Option<&str>) -> String {
    let Some(value) = value else {
        return "\\N".to_owned();
    };
    value
        .chars()
        .map(|c| match c {
            '\\' => "\\\\".to_owned(),
            '\n' => "\\n".to_owned(),
            '\t' => "\\t".to_owned(),
            '\r' => "\\r".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

fn copy(rows: &[&Vec<Option<String>>]) -> String {
    rows.iter()
        .map(|row| {
            let fields: Vec<String> = row.iter().map(|v| copy_field(v.as_deref())).collect();
            format!("{}\n", fields.join("\t"))
        })
        .collect()
}

fn canonical(table: &TableSchema, row: &[Option<String>]) -> Vec<Option<String>> {
    table
        .columns
        .iter()
        .zip(row)
        .map(|(c, v)| canonical_pg_text(c.kind, v.as_deref()))
        .collect()
}

fn key_of(table: &TableSchema, row: &[Option<String>]) -> Key {
    let values = canonical(table, row);
    let kinds = key_kinds(table).unwrap_or_default();
    table
        .primary_key
        .iter()
        .zip(&kinds)
        .map(|(k, &kind)| {
            let at = table.columns.iter().position(|c| &c.name == k).unwrap();
            KeyValue::from_canonical(kind, values[at].as_deref()).unwrap()
        })
        .collect()
}

fn in_range(k: &Key, lo: &Option<Key>, hi: &Option<Key>) -> bool {
    lo.as_ref().is_none_or(|lo| k >= lo) && hi.as_ref().is_none_or(|hi| k < hi)
}

/// Runs the repair as `crate::repair` does over the socket, with the
/// server answering from `server`; returns whether the full digests agree.
fn repair(conn: &Connection, tables: &HashMap<String, TableSchema>, server: &Rows) -> bool {
    let table = &tables[NAME];
    let whole = key_kinds(table).is_none();
    let (mut spans, mut held) = digest(conn, tables, NAME, &[(None, None, None)])
        .unwrap()
        .unwrap();
    let mut expected = None;
    while !spans.is_empty() {
        let mut tally = Tally::new(&spans);
        for row in server {
            let hash = row_hash(&canonical(table, row));
            if whole {
                tally.add_whole(0, hash);
            } else {
                tally.add(&key_of(table, row), hash);
            }
        }
        if spans.len() == 1 && spans[0].lo.is_none() && spans[0].hi.is_none() {
            expected = Some(tally.total());
        }
        let mut next: Vec<Range> = Vec::new();
        let mut replace = Vec::new();
        for part in tally.diff() {
            let span = &spans[part.span as usize];
            let (lo, hi) = span.part_range(part.part as usize);
            if part.replace {
                replace.push((lo, hi));
            } else {
                next.push((lo, hi, Some(span.rows[part.part as usize])));
            }
        }
        if !replace.is_empty() {
            held.subtract(remove(conn, tables, NAME, &replace).unwrap());
            let sent: Vec<&Vec<Option<String>>> = server
                .iter()
                .filter(|row| {
                    whole || {
                        let k = key_of(table, row);
                        replace.iter().any(|(lo, hi)| in_range(&k, lo, hi))
                    }
                })
                .collect();
            held.merge(load(conn, tables, NAME, &copy(&sent)).unwrap());
        }
        spans = if next.is_empty() {
            Vec::new()
        } else {
            digest(conn, tables, NAME, &next).unwrap().unwrap().0
        };
    }
    expected == Some(held)
}

fn text_value() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just('a'),
            Just('B'),
            Just('z'),
            Just('ä'),
            Just('€'),
            Just(' '),
            Just('\t'),
            Just('\\'),
            Just('0')
        ],
        0..4,
    )
    .prop_map(|cs| cs.into_iter().collect())
}

/// A row's non-key values from a seed: integers, floats, text and NULLs.
fn values(seed: u32, text: &str) -> [Option<String>; 3] {
    let n = (!seed.is_multiple_of(7)).then(|| (i64::from(seed % 50) - 25).to_string());
    let f = (!seed.is_multiple_of(5)).then(|| format!("{}", f64::from(seed % 9) * 0.25 - 1.0));
    let s = (!seed.is_multiple_of(3)).then(|| format!("{text}{}", seed % 4));
    [n, f, s]
}

fn row(table: &TableSchema, a: i64, b: &str, seed: u32) -> Vec<Option<String>> {
    let [n, f, s] = values(seed, b);
    let mut row = vec![Some(a.to_string()), Some(b.to_owned()), n, f, s];
    if table.columns[0].name == "b" {
        row.swap(0, 1);
    }
    row
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn repair_of_a_sqlite_replica_always_ends_equal(
        shape in 0u8..4,
        keys in proptest::collection::vec((-300i64..300, text_value(), any::<u32>()), 0..1200),
        edits in proptest::collection::vec((0u8..3, -320i64..320, text_value(), any::<u32>(), 0usize..30), 0..40),
    ) {
        let table = table(shape);
        // The server's rows, one per key (a table without a key may hold
        // duplicates: its rows are kept as generated).
        let mut by_key: BTreeMap<Key, Vec<Option<String>>> = BTreeMap::new();
        let mut server: Rows = Vec::new();
        for (a, b, seed) in &keys {
            let r = row(&table, *a, b, *seed);
            if key_kinds(&table).is_some() {
                by_key.insert(key_of(&table, &r), r);
            } else {
                server.push(r);
            }
        }
        if key_kinds(&table).is_some() {
            server = by_key.values().cloned().collect();
        }
        // The replica: the server's rows with runs of rows deleted, values
        // changed and rows the server lacks.
        let mut replica = server.clone();
        for (op, a, b, seed, run) in &edits {
            match op {
                0 if !replica.is_empty() => {
                    let at = usize::try_from(a.unsigned_abs()).unwrap_or(0) % replica.len();
                    let end = (at + run).min(replica.len());
                    replica.drain(at..end);
                }
                1 if !replica.is_empty() => {
                    let at = usize::try_from(a.unsigned_abs()).unwrap_or(0) % replica.len();
                    let last = replica[at].len() - 1;
                    replica[at][last] = Some(format!("edited {seed}"));
                }
                _ => replica.push(row(&table, *a, b, *seed)),
            }
        }
        let conn = Connection::open_in_memory().unwrap();
        schema::ensure_meta(&conn).unwrap();
        capture::ensure_tables(&conn).unwrap();
        schema::apply_table(&conn, &table).unwrap();
        let tables: HashMap<String, TableSchema> = [(NAME.to_owned(), table.clone())].into();
        let replica: Vec<&Vec<Option<String>>> = replica.iter().collect();
        load(&conn, &tables, NAME, &copy(&replica)).unwrap();

        prop_assert!(repair(&conn, &tables, &server), "the full digests differ");
        let mut held: Vec<Vec<Option<String>>> = rows_in_range(&conn, &table, &None, &None)
            .unwrap()
            .into_iter()
            .map(|(_, values)| values)
            .collect();
        let mut want: Vec<Vec<Option<String>>> =
            server.iter().map(|r| canonical(&table, r)).collect();
        held.sort();
        want.sort();
        prop_assert_eq!(&held, &want);
        let sum = want.iter().fold(RangeSum::default(), |mut s, r| {
            s.add(row_hash(r));
            s
        });
        prop_assert_eq!(sum.rows, u64::try_from(server.len()).unwrap());
    }
}
