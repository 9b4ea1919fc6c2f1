//! Kept digests must always equal a fresh read of the rows they cover:
//! after live applies, local writes, rollbacks, a crash mid-transaction,
//! a change of columns, lost triggers, and whatever order of writes.

use std::collections::HashMap;

use pgrelay_protocol::repair::{cut_range, key_kinds, starts_bucket, CheckSpan, Key, RangeSum};
use pgrelay_protocol::{Column, TableSchema, ValueKind};
use proptest::prelude::*;
use rusqlite::Connection;

use super::{build_step, first_round, forget, second_round, stored};
use crate::replica::repair::{scan, Range};
use crate::replica::{capture, schema};

fn column(name: &str, kind: ValueKind, oid: u32) -> Column {
    Column {
        name: name.to_owned(),
        pg_type: "text".to_owned(),
        type_oid: oid,
        kind,
        attnum: None,
    }
}

/// `public.t (a bigint, b text, v text, f float8)`, keyed by `a` or by
/// `(a, b)`.
fn table(composite: bool) -> TableSchema {
    TableSchema {
        name: "public.t".to_owned(),
        columns: vec![
            column("a", ValueKind::Integer, 20),
            column("b", ValueKind::Text, 25),
            column("v", ValueKind::Text, 25),
            column("f", ValueKind::Float, 701),
        ],
        primary_key: if composite {
            vec!["a".to_owned(), "b".to_owned()]
        } else {
            vec!["a".to_owned()]
        },
        version: 1,
        skipped: None,
        backfilled: Vec::new(),
        oid: None,
    }
}

fn open(conn: &Connection, table: &TableSchema) -> HashMap<String, TableSchema> {
    schema::ensure_meta(conn).unwrap();
    capture::ensure_tables(conn).unwrap();
    schema::apply_table(conn, table).unwrap();
    [(table.name.clone(), table.clone())].into()
}

fn fill(conn: &Connection, rows: i64) {
    conn.execute_batch(&format!(
        "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < {rows})
         INSERT INTO t (a, b, v, f) SELECT n * 10, 'k' || (n % 3), 'row ' || n, n * 0.5 FROM g"
    ))
    .unwrap();
}

fn build_all(conn: &Connection, tables: &HashMap<String, TableSchema>) {
    while build_step(conn, tables).unwrap() {}
}

/// Every part of the span, and the total, as a fresh read finds them.
fn assert_true(conn: &Connection, table: &TableSchema, span: &CheckSpan, total: RangeSum) {
    let kinds = key_kinds(table).unwrap();
    let mut all = RangeSum::default();
    for part in 0..span.parts() {
        let (lo, hi) = span.part_range(part);
        let mut sum = RangeSum::default();
        scan(conn, table, Some(&kinds), &lo, &hi, None, |_, hash, _| {
            sum.add(hash)
        })
        .unwrap();
        assert_eq!(
            span.rows[part], sum.rows,
            "rows of part {part} ({lo:?}..{hi:?})"
        );
        assert_eq!(
            span.digest(part),
            Some(sum.short()),
            "digest of part {part}"
        );
        all.merge(sum);
    }
    assert_eq!(total, all, "the total");
    let mut every = RangeSum::default();
    scan(
        conn,
        table,
        Some(&kinds),
        &None,
        &None,
        None,
        |_, hash, _| every.add(hash),
    )
    .unwrap();
    assert_eq!(total, every, "the parts cover every row");
}

/// The stored buckets start exactly at the keys the rows hold that start
/// a bucket: the bounds the server finds cutting the same rows afresh.
fn assert_cut_by_content(conn: &Connection, table: &TableSchema) {
    let kinds = key_kinds(table).unwrap();
    let mut starts: Vec<Option<Key>> = vec![None];
    scan(
        conn,
        table,
        Some(&kinds),
        &None,
        &None,
        None,
        |key, _, _| {
            if starts_bucket(&key) {
                starts.push(Some(key));
            }
        },
    )
    .unwrap();
    let stored: Vec<Option<Key>> = stored(conn, table)
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|b| b.lo)
        .collect();
    assert_eq!(stored, starts);
}

/// A second round over every part of `span`: each range cut from kept
/// sub-sums is cut as a fresh read of its rows cuts it. Returns how many
/// were.
fn assert_second_round_true(conn: &Connection, table: &TableSchema, span: &CheckSpan) -> usize {
    let kinds = key_kinds(table).unwrap();
    let ranges: Vec<Range> = (0..span.parts())
        .map(|p| {
            let (lo, hi) = span.part_range(p);
            (lo, hi, Some(span.rows[p]))
        })
        .collect();
    let kept = second_round(conn, table, &ranges).unwrap();
    assert_eq!(kept.len(), ranges.len());
    let mut from_kept = 0;
    for ((lo, hi, _), kept) in ranges.iter().zip(kept) {
        let Some(kept) = kept else { continue };
        let mut rows = Vec::new();
        scan(conn, table, Some(&kinds), lo, hi, None, |key, hash, _| {
            rows.push((key, hash))
        })
        .unwrap();
        assert_eq!(
            kept,
            cut_range(lo.clone(), hi.clone(), &rows),
            "{lo:?}..{hi:?}"
        );
        from_kept += 1;
    }
    from_kept
}

fn touched_count(conn: &Connection) -> i64 {
    conn.query_row("SELECT count(*) FROM _pgrelay_touched_t", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn kept_digests_follow_live_and_local_writes() {
    let conn = Connection::open_in_memory().unwrap();
    let table = table(false);
    let tables = open(&conn, &table);
    fill(&conn, 3000);
    build_all(&conn, &tables);
    assert_eq!(touched_count(&conn), 0);
    let buckets = stored(&conn, &table).unwrap().unwrap();
    assert!(buckets.len() >= 10 && buckets.iter().all(|b| b.sum.is_some()));

    // The server's transactions (capture off) and the application's own
    // writes (captured) both leave their keys behind.
    crate::replica::snapshot::quietly(&conn, || {
        conn.execute_batch(
            "UPDATE t SET v = 'live' WHERE a = 500;
             DELETE FROM t WHERE a BETWEEN 1000 AND 1100;
             INSERT INTO t VALUES (15, 'k0', 'between', 1.0);
             INSERT OR REPLACE INTO t VALUES (20, 'k9', 'replaced', 2.0);",
        )?;
        Ok(())
    })
    .unwrap();
    conn.execute_batch(
        "UPDATE t SET a = 999999 WHERE a = 29990;
         INSERT INTO t VALUES (-5, 'k1', 'before every bucket', NULL);
         INSERT INTO t VALUES (40000, 'k1', 'after every bucket', NULL);",
    )
    .unwrap();
    assert!(touched_count(&conn) > 10);
    let (span, total) = first_round(&conn, &table).unwrap();
    assert_true(&conn, &table, &span, total);
    assert_cut_by_content(&conn, &table);
    assert_eq!(touched_count(&conn), 0, "refreshed and cleared");
    // Taken again as stored: still true.
    let (again, again_total) = first_round(&conn, &table).unwrap();
    assert_eq!((&again, again_total), (&span, total));
}

#[test]
fn a_rollback_and_a_crash_mid_transaction_leave_them_true() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replica.sqlite");
    let table = table(true);
    {
        let conn = Connection::open(&path).unwrap();
        let tables = open(&conn, &table);
        fill(&conn, 2000);
        build_all(&conn, &tables);
        // A rejected write rolled back.
        conn.execute_batch("BEGIN; DELETE FROM t WHERE a < 5000; ROLLBACK;")
            .unwrap();
        assert_eq!(touched_count(&conn), 0);
        // A committed write, then a transaction cut short by a crash: the
        // files as they are with it open (a tiny page cache spills its
        // pages to the file, the journal holds the old ones) are opened
        // as after a power cut, and SQLite rolls it back, rows and touched
        // keys alike.
        conn.execute_batch("UPDATE t SET v = 'committed' WHERE a = 100")
            .unwrap();
        conn.execute_batch(
            "PRAGMA cache_size = 1; BEGIN; UPDATE t SET v = 'lost'; INSERT INTO t VALUES (7, 'x', 'lost', 0);",
        )
        .unwrap();
        for suffix in ["", "-journal", "-wal"] {
            let from = dir.path().join(format!("replica.sqlite{suffix}"));
            if from.exists() {
                std::fs::copy(&from, dir.path().join(format!("crashed.sqlite{suffix}"))).unwrap();
            }
        }
        drop(conn);
    }
    let conn = Connection::open(dir.path().join("crashed.sqlite")).unwrap();
    let lost: i64 = conn
        .query_row("SELECT count(*) FROM t WHERE v = 'lost'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(lost, 0);
    assert_eq!(touched_count(&conn), 1, "the committed write's key only");
    let (span, total) = first_round(&conn, &table).unwrap();
    assert_true(&conn, &table, &span, total);
}

#[test]
fn digests_that_cannot_be_trusted_are_made_again() {
    let conn = Connection::open_in_memory().unwrap();
    let table = table(false);
    let tables = open(&conn, &table);
    fill(&conn, 1000);
    build_all(&conn, &tables);
    // Writes with the triggers gone are not recorded: the digests are
    // found untrustworthy (a trigger missing) and made again.
    conn.execute_batch(
        "DROP TRIGGER \"_pgrelay_digest_t_update\"; UPDATE t SET v = 'unseen' WHERE a = 50;",
    )
    .unwrap();
    assert!(stored(&conn, &table).unwrap().is_none());
    let (span, total) = first_round(&conn, &table).unwrap();
    assert_true(&conn, &table, &span, total);
    // A new column changes every row's hash: the fingerprint differs.
    let mut wider = table.clone();
    wider.columns.push(column("w", ValueKind::Text, 25));
    let tables: HashMap<String, TableSchema> = [(wider.name.clone(), wider.clone())].into();
    schema::apply_table(&conn, &wider).unwrap();
    conn.execute_batch("UPDATE t SET w = 'x' WHERE a > 5000")
        .unwrap();
    assert!(stored(&conn, &wider).unwrap().is_none());
    build_all(&conn, &tables);
    let (span, total) = first_round(&conn, &wider).unwrap();
    assert_true(&conn, &wider, &span, total);
}

#[test]
fn a_table_emptied_for_a_snapshot_loses_them_and_records_nothing() {
    let conn = Connection::open_in_memory().unwrap();
    let table = table(false);
    let tables = open(&conn, &table);
    fill(&conn, 500);
    build_all(&conn, &tables);
    crate::replica::snapshot::clear(&conn, &tables, "public.t").unwrap();
    fill(&conn, 500);
    let touched: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = '_pgrelay_touched_t'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(touched, 0, "no triggers while a snapshot loads");
    assert!(stored(&conn, &table).unwrap().is_none());
    forget(&conn, &table).unwrap();
    let (span, total) = first_round(&conn, &table).unwrap();
    assert_true(&conn, &table, &span, total);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Random writes between a partial build, more build steps and a
    /// first round: the round is always true.
    #[test]
    fn first_rounds_are_always_true(
        rows in 0i64..3000,
        steps in 0usize..4,
        writes in proptest::collection::vec((0u8..4, -100i64..40_000, 0i64..200), 0..30),
        composite in any::<bool>(),
    ) {
        let conn = Connection::open_in_memory().unwrap();
        let table = table(composite);
        let tables = open(&conn, &table);
        fill(&conn, rows);
        for _ in 0..steps {
            build_step(&conn, &tables).unwrap();
        }
        for (n, (op, at, len)) in writes.iter().enumerate() {
            let sql = match op {
                0 => format!("INSERT OR REPLACE INTO t VALUES ({at}, 'k{}', 'w{n}', {n})", n % 3),
                1 => format!("UPDATE t SET v = 'u{n}' WHERE a BETWEEN {at} AND {}", at + len),
                2 => format!("DELETE FROM t WHERE a BETWEEN {at} AND {}", at + len),
                _ => format!("UPDATE t SET a = a + {len} + 1000000 WHERE a = {at}"),
            };
            conn.execute_batch(&sql).unwrap();
            if n % 7 == 3 {
                build_step(&conn, &tables).unwrap();
            }
        }
        let (span, total) = first_round(&conn, &table).unwrap();
        assert_true(&conn, &table, &span, total);
        assert_cut_by_content(&conn, &table);
        assert_second_round_true(&conn, &table, &span);
        // Written after the first round: still true.
        conn.execute_batch("UPDATE t SET v = 'after' WHERE a % 700 = 0").unwrap();
        assert_second_round_true(&conn, &table, &span);
    }
}

/// A second round cuts every bucket from its kept sub-sums, but a bucket
/// written since the first round is read again.
#[test]
fn second_rounds_come_from_kept_sub_sums_unless_written() {
    let conn = Connection::open_in_memory().unwrap();
    let table = table(false);
    let tables = open(&conn, &table);
    fill(&conn, 5_000);
    build_all(&conn, &tables);
    let (span, _) = first_round(&conn, &table).unwrap();
    assert!(span.parts() > 10);
    // A bucket of one sub-bucket is cut by count, from its rows (4 of
    // these 47).
    let all = assert_second_round_true(&conn, &table, &span);
    assert!(all * 4 >= span.parts() * 3, "{all} of {}", span.parts());
    let (lo, _) = span.part_range(3);
    let lo = lo.unwrap();
    let pgrelay_protocol::repair::KeyValue::Int(at) = lo[0] else {
        panic!("an integer key")
    };
    conn.execute_batch(&format!("UPDATE t SET v = 'local' WHERE a = {at}"))
        .unwrap();
    assert_eq!(assert_second_round_true(&conn, &table, &span), all - 1);
}

#[test]
fn server_rows_applied_quietly_are_recorded_one_per_bucket() {
    use pgrelay_protocol::{Change, Op, Row};

    use super::{quiet, Held, Written};

    let conn = Connection::open_in_memory().unwrap();
    let table = table(false);
    let tables = open(&conn, &table);
    fill(&conn, 3000);
    build_all(&conn, &tables);
    let mut held = Held::default();
    // As the replica's thread applies a server transaction: triggers
    // quiet, keys recorded from the changes.
    quiet(&conn, true).unwrap();
    let mut written = Written::default();
    let mut add = |op, new: Option<Row>, old: Option<Row>| {
        let change = Change {
            table: table.name.clone(),
            op,
            new,
            old,
        };
        written.add(&conn, &mut held, &table, &change).unwrap();
    };
    for a in (10..=10_000).step_by(10) {
        conn.execute("UPDATE t SET v = 'server' WHERE a = ?1", [a])
            .unwrap();
        let row: Row = [
            ("a".to_owned(), Some(a.to_string())),
            ("v".to_owned(), Some("server".to_owned())),
        ]
        .into();
        add(Op::Update, Some(row), None);
    }
    conn.execute("DELETE FROM t WHERE a = 20000", []).unwrap();
    add(
        Op::Delete,
        None,
        Some([("a".to_owned(), Some("20000".to_owned()))].into()),
    );
    assert_eq!(touched_count(&conn), 0, "the triggers were quiet");
    quiet(&conn, false).unwrap();
    written.record(&conn, &tables, &mut held).unwrap();
    // 1,000 rows in about 8 buckets of 128, one key each.
    assert!(touched_count(&conn) <= 16, "{}", touched_count(&conn));
    let (span, total) = first_round(&conn, &table).unwrap();
    assert_true(&conn, &table, &span, total);
    // Loud again: a local write is recorded by its trigger.
    conn.execute("UPDATE t SET v = 'local' WHERE a = 30", [])
        .unwrap();
    assert_eq!(touched_count(&conn), 1);
}

/// A key written again while it is already recorded, by an upsert (whose
/// conflict policy SQLite lets override a trigger's own): the
/// application's write goes through and the digests stay true.
#[test]
fn a_key_written_twice_by_upserts_is_recorded_once() {
    for composite in [false, true] {
        let conn = Connection::open_in_memory().unwrap();
        let table = table(composite);
        let tables = open(&conn, &table);
        fill(&conn, 3000);
        build_all(&conn, &tables);
        let target = if composite { "(a, b)" } else { "(a)" };
        for round in 0..3 {
            conn.execute_batch(&format!(
                "INSERT INTO t (a, b, v) VALUES (10, 'k1', 'upsert {round}')
                   ON CONFLICT {target} DO UPDATE SET v = excluded.v;
                 INSERT INTO t (a, b, v) VALUES (7, 'k1', 'new {round}')
                   ON CONFLICT {target} DO UPDATE SET v = excluded.v;
                 UPDATE t SET v = 'again {round}' WHERE a = 10;
                 INSERT OR REPLACE INTO t (a, b, v) VALUES (10, 'k1', 'replaced {round}');
                 INSERT OR IGNORE INTO t (a, b, v) VALUES (7, 'k1', 'ignored {round}');
                 UPDATE OR ROLLBACK t SET v = 'rolled {round}' WHERE a = 7;"
            ))
            .unwrap_or_else(|e| panic!("round {round}, composite {composite}: {e}"));
        }
        assert_eq!(touched_count(&conn), 2);
        let (span, total) = first_round(&conn, &table).unwrap();
        assert_true(&conn, &table, &span, total);
    }
}
