//! Changes applied with their SQL text kept per shape and inserts run
//! many per statement end as the same rows as one statement per change
//! would (and as a model of the table says), whatever columns each change
//! names; a table reshaped between two applies is written with its new
//! columns.

use std::collections::{BTreeMap, HashMap};

use pgrelay_protocol::{Change, Column, Lsn, Op, Row, TableSchema, Transaction, ValueKind};
use proptest::prelude::*;
use rusqlite::types::Value;
use rusqlite::Connection;

use super::{apply_change, Applier, Shapes};
use crate::replica::test_columns::column;
use crate::replica::{capture, schema, Replica};

const TABLE: &str = "public.items";

fn table(columns: Vec<Column>, keyed: bool) -> TableSchema {
    TableSchema {
        name: TABLE.to_owned(),
        columns,
        primary_key: if keyed {
            vec!["id".to_owned()]
        } else {
            Vec::new()
        },
        version: 1,
        skipped: None,
        backfilled: Vec::new(),
        oid: None,
    }
}

/// Columns in an order unlike their names' (a row holds them by name).
fn items(keyed: bool) -> TableSchema {
    table(
        vec![
            column("id", ValueKind::Integer),
            column("name", ValueKind::Text),
            column("b", ValueKind::Integer),
            column("a", ValueKind::Text),
        ],
        keyed,
    )
}

fn replica_conn(table: &TableSchema) -> (Connection, HashMap<String, TableSchema>) {
    let conn = Connection::open_in_memory().unwrap();
    schema::ensure_meta(&conn).unwrap();
    capture::ensure_tables(&conn).unwrap();
    schema::apply_table(&conn, table).unwrap();
    capture::set_applying(&conn, true).unwrap();
    let tables = [(table.name.clone(), table.clone())].into();
    (conn, tables)
}

fn dump(conn: &Connection, table: &TableSchema) -> Vec<Vec<Value>> {
    let width = table.columns.len();
    let mut stmt = conn
        .prepare(&format!(
            "SELECT * FROM {} ORDER BY rowid",
            table.sqlite_name()
        ))
        .unwrap();
    let rows = stmt
        .query_map([], |r| (0..width).map(|i| r.get::<_, Value>(i)).collect())
        .unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

fn row(pairs: &[(&str, Option<String>)]) -> Row {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn change(op: Op, new: Option<Row>, old: Option<Row>) -> Change {
    Change {
        table: TABLE.to_owned(),
        op,
        new,
        old,
    }
}

/// A change of the model test: on row `id`, naming the columns of `mask`
/// (bits: name, b, a).
#[derive(Clone, Debug)]
enum Step {
    Insert { id: i64, mask: u8, n: i64 },
    Update { id: i64, mask: u8, n: i64 },
    Delete { id: i64 },
}

fn step() -> impl Strategy<Value = Step> {
    // Mostly inserts, so that runs form and break.
    prop_oneof![
        6 => (0..12i64, 0..8u8, 0..1000i64).prop_map(|(id, mask, n)| Step::Insert { id, mask, n }),
        2 => (0..12i64, 0..8u8, 0..1000i64).prop_map(|(id, mask, n)| Step::Update { id, mask, n }),
        1 => (0..12i64).prop_map(|id| Step::Delete { id }),
    ]
}

/// The named columns' values of a step (and an unknown column, left out).
fn named(id: i64, mask: u8, n: i64) -> Row {
    let mut pairs = vec![("id", Some(id.to_string())), ("ghost", Some("x".into()))];
    if mask & 1 != 0 {
        pairs.push(("name", (n % 3 != 0).then(|| format!("name {n}"))));
    }
    if mask & 2 != 0 {
        pairs.push(("b", Some(n.to_string())));
    }
    if mask & 4 != 0 {
        pairs.push(("a", Some(format!("a{n}"))));
    }
    row(&pairs)
}

fn to_change(step: &Step) -> Change {
    match *step {
        Step::Insert { id, mask, n } => change(Op::Insert, Some(named(id, mask, n)), None),
        Step::Update { id, mask, n } => change(Op::Update, Some(named(id, mask, n)), None),
        Step::Delete { id } => change(Op::Delete, None, Some(named(id, 0, 0))),
    }
}

/// The keyed table after `steps`, by id: name, b, a.
fn model(steps: &[Step]) -> BTreeMap<i64, [Value; 3]> {
    let mut rows: BTreeMap<i64, [Value; 3]> = BTreeMap::new();
    let values = |mask: u8, n: i64| -> [Option<Value>; 3] {
        [
            (mask & 1 != 0).then(|| match n % 3 {
                0 => Value::Null,
                _ => Value::Text(format!("name {n}")),
            }),
            (mask & 2 != 0).then_some(Value::Integer(n)),
            (mask & 4 != 0).then(|| Value::Text(format!("a{n}"))),
        ]
    };
    for step in steps {
        match *step {
            Step::Insert { id, mask, n } => {
                let [x, y, z] = values(mask, n).map(|v| v.unwrap_or(Value::Null));
                rows.insert(id, [x, y, z]);
            }
            // The key is always named: a row that is there changes
            // (whatever else is named), one that is not stays away, the
            // full row excepted.
            Step::Update { id, mask, n } => match rows.get_mut(&id) {
                Some(row) => {
                    for (slot, value) in row.iter_mut().zip(values(mask, n)) {
                        if let Some(value) = value {
                            *slot = value;
                        }
                    }
                }
                None if mask == 7 => {
                    rows.insert(id, values(mask, n).map(|v| v.unwrap_or(Value::Null)));
                }
                None => {}
            },
            Step::Delete { id } => {
                rows.remove(&id);
            }
        }
    }
    rows
}

/// The keyed table's rows by id: name, b, a.
fn by_id(conn: &Connection) -> BTreeMap<i64, [Value; 3]> {
    let mut stmt = conn.prepare("SELECT id, name, b, a FROM items").unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, [r.get(1)?, r.get(2)?, r.get(3)?])))
        .unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

proptest! {
    #[test]
    fn runs_of_inserts_end_as_one_statement_per_change(
        steps in proptest::collection::vec(step(), 0..120),
        keyed in any::<bool>(),
    ) {
        let schema = items(keyed);
        let changes: Vec<Change> = steps.iter().map(to_change).collect();
        let (batched, tables) = replica_conn(&schema);
        let mut shapes = Shapes::default();
        // Two applies sharing the kept SQL text, as the replica's thread does.
        let (first, second) = changes.split_at(changes.len() / 2);
        for part in [first, second] {
            let mut applier = Applier::new(&batched, &tables, &mut shapes);
            for change in part {
                applier.change(change).unwrap();
            }
            applier.flush().unwrap();
        }
        let (single, _) = replica_conn(&schema);
        for change in &changes {
            apply_change(&single, &tables, change).unwrap();
        }
        prop_assert_eq!(dump(&batched, &schema), dump(&single, &schema));
        if keyed {
            prop_assert_eq!(by_id(&batched), model(&steps));
        }
    }
}

#[test]
fn a_wide_table_takes_rows_naming_any_of_its_columns() {
    let mut columns = vec![column("id", ValueKind::Integer)];
    columns.extend((1..130).map(|i| column(&format!("c{i}"), ValueKind::Integer)));
    let schema = table(columns, true);
    let (conn, tables) = replica_conn(&schema);
    let mut shapes = Shapes::default();
    let full: Vec<(String, Option<String>)> = schema
        .columns
        .iter()
        .map(|c| (c.name.clone(), Some("1".to_owned())))
        .collect();
    let with = |pairs: &[(&str, &str)]| -> Row {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Some((*v).to_owned())))
            .collect()
    };
    let mut changes = Vec::new();
    for id in 0..300 {
        let mut row: Row = full.iter().cloned().collect();
        row.insert("id".to_owned(), Some(id.to_string()));
        changes.push(change(Op::Insert, Some(row), None));
    }
    changes.push(change(
        Op::Insert,
        Some(with(&[("id", "1"), ("c100", "7")])),
        None,
    ));
    changes.push(change(
        Op::Insert,
        Some(with(&[("id", "2"), ("c65", "8")])),
        None,
    ));
    changes.push(change(
        Op::Update,
        Some(with(&[("id", "3"), ("c64", "9"), ("c129", "10")])),
        None,
    ));
    let mut applier = Applier::new(&conn, &tables, &mut shapes);
    for change in &changes {
        applier.change(change).unwrap();
    }
    applier.flush().unwrap();
    let count: i64 = conn
        .query_row("SELECT count(*) FROM items", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count, 300);
    let probe = |sql: &str| -> Vec<Option<i64>> {
        conn.query_row(sql, [], |r| Ok(vec![r.get(0)?, r.get(1)?, r.get(2)?]))
            .unwrap()
    };
    assert_eq!(
        probe("SELECT c100, c1, c65 FROM items WHERE id = 1"),
        [Some(7), None, None]
    );
    assert_eq!(
        probe("SELECT c65, c100, c1 FROM items WHERE id = 2"),
        [Some(8), None, None]
    );
    assert_eq!(
        probe("SELECT c64, c129, c1 FROM items WHERE id = 3"),
        [Some(9), Some(10), Some(1)]
    );
}

#[test]
fn a_table_reshaped_between_applies_is_written_with_its_new_columns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replica.sqlite");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let insert = |lsn: u64, pairs: &[(&str, &str)]| Transaction {
        lsn: Lsn(lsn),
        xid: 1,
        commit_time_us: 0,
        origin: None,
        changes: vec![change(
            Op::Insert,
            Some(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), Some((*v).to_owned())))
                    .collect(),
            ),
            None,
        )],
    };
    runtime.block_on(async {
        let replica = Replica::open(&path).unwrap();
        let before = table(
            vec![
                column("id", ValueKind::Integer),
                column("name", ValueKind::Text),
            ],
            true,
        );
        replica.apply_schema(vec![before.clone()]).await.unwrap();
        replica
            .apply_transactions(vec![insert(10, &[("id", "1"), ("name", "one")])])
            .await
            .unwrap();
        // A column added (named before the others), one dropped.
        let after = table(
            vec![
                column("id", ValueKind::Integer),
                column("added", ValueKind::Integer),
            ],
            true,
        );
        replica.apply_schema(vec![after]).await.unwrap();
        replica
            .apply_transactions(vec![insert(20, &[("id", "2"), ("added", "5")])])
            .await
            .unwrap();
    });
    let conn = Connection::open(&path).unwrap();
    let rows: Vec<(i64, Option<i64>)> = conn
        .prepare("SELECT id, added FROM items ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows, [(1, None), (2, Some(5))]);
}
