//! Property test: a bound rule decides the same in memory (live changes,
//! catch-up) as the SQL it compiles to (snapshots, guarded writes), on a
//! real PostgreSQL, NULLs and claims of every shape included.

use pgrelay_protocol::Row;
use pgrelay_testkit::TestDatabase;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tokio_postgres::types::ToSql;

use super::expr::{Expr, Operand};

/// Text values of columns `a` and `b`: case, the empty string next to
/// NULL, a number written two ways.
const TEXTS: [Option<&str>; 6] = [None, Some("x"), Some("X"), Some(""), Some("1"), Some("1.0")];
/// Values of the integer column `n`, compared as PostgreSQL's text output.
const NUMBERS: [Option<i32>; 3] = [None, Some(1), Some(-1)];

/// A test row: its id and the values of columns `a`, `b` and `n`.
type TestRow = (i32, Option<&'static str>, Option<&'static str>, Option<i32>);

/// Every combination of the columns' values, with its id.
fn rows() -> Vec<TestRow> {
    let mut rows = Vec::new();
    for a in TEXTS {
        for b in TEXTS {
            for n in NUMBERS {
                let id = i32::try_from(rows.len()).unwrap_or(i32::MAX);
                rows.push((id, a, b, n));
            }
        }
    }
    rows
}

fn operand() -> impl Strategy<Value = Operand> {
    let column = prop::sample::select(vec!["a", "b", "n"]).prop_map(|c| Operand::Column(c.into()));
    let claim = prop::sample::select(vec![
        vec!["sub"],
        vec!["team"],
        vec!["groups"],
        vec!["org", "id"],
        vec!["missing"],
    ])
    .prop_map(|p| Operand::Claim(p.into_iter().map(String::from).collect()));
    let literal = prop::sample::select(vec!["x", "X", "", "1", "1.0", "-1", "true"])
        .prop_map(|v| Operand::Literal(v.into()));
    prop_oneof![column, claim, literal]
}

fn expr() -> impl Strategy<Value = Expr> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(Expr::Const),
        (operand(), operand(), any::<bool>()).prop_map(|(left, right, equal)| Expr::Compare {
            left,
            right,
            equal
        }),
        (operand(), prop::collection::vec(operand(), 1..4))
            .prop_map(|(left, list)| Expr::In { left, list }),
        (operand(), any::<bool>()).prop_map(|(operand, null)| Expr::IsNull { operand, null }),
    ];
    leaf.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
            prop::collection::vec(inner.clone(), 1..4).prop_map(Expr::And),
            prop::collection::vec(inner, 1..4).prop_map(Expr::Or),
        ]
    })
}

fn claims() -> impl Strategy<Value = Map<String, Value>> {
    let sub = prop::sample::select(vec![
        json!("x"),
        json!(1),
        json!(1.0),
        json!(true),
        json!(null),
    ]);
    let team = prop::sample::select(vec![json!("X"), json!(""), json!({"a": 1})]);
    let groups = prop::sample::select(vec![
        json!([]),
        json!(["x"]),
        json!(["x", "1", 1]),
        json!([null, "X"]),
    ]);
    let org = prop::sample::select(vec![json!({"id": "x"}), json!({"id": -1}), json!({})]);
    (
        prop::option::of(sub),
        prop::option::of(team),
        prop::option::of(groups),
        prop::option::of(org),
    )
        .prop_map(|(sub, team, groups, org)| {
            let mut claims = Map::new();
            for (name, value) in [
                ("sub", sub),
                ("team", team),
                ("groups", groups),
                ("org", org),
            ] {
                if let Some(value) = value {
                    claims.insert(name.to_owned(), value);
                }
            }
            claims
        })
}

#[test]
fn a_bound_rule_decides_the_same_in_memory_and_in_postgresql() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rows = rows();
    let (db, client) = runtime.block_on(async {
        let db = TestDatabase::create().await.unwrap();
        let client = db.connect().await.unwrap();
        client
            .batch_execute("CREATE TABLE t (id int PRIMARY KEY, a text, b text, n int)")
            .await
            .unwrap();
        for (id, a, b, n) in &rows {
            client
                .execute("INSERT INTO t VALUES ($1, $2, $3, $4)", &[id, a, b, n])
                .await
                .unwrap();
        }
        (db, client)
    });
    let in_memory: Vec<Row> = rows
        .iter()
        .map(|(_, a, b, n)| {
            Row::from_iter([
                ("a".to_owned(), a.map(str::to_owned)),
                ("b".to_owned(), b.map(str::to_owned)),
                ("n".to_owned(), n.map(|n| n.to_string())),
            ])
        })
        .collect();

    let config = ProptestConfig {
        cases: 400,
        ..ProptestConfig::default()
    };
    proptest!(config, |(rule in expr(), claims in claims())| {
        let bound = rule.bind(&claims);
        let mut params = Vec::new();
        let predicate = bound.to_sql(&mut params);
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let sql = format!("SELECT {predicate} FROM t ORDER BY id");
        let verdicts: Vec<Option<bool>> = runtime
            .block_on(client.query(sql.as_str(), &refs))
            .map_err(|e| TestCaseError::fail(format!("{sql}: {e}")))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for (row, in_sql) in in_memory.iter().zip(verdicts) {
            prop_assert_eq!(
                in_sql,
                Some(bound.eval(row)),
                "rule {:?} bound to {:?} as {} on {:?}",
                rule, claims, sql, row
            );
        }
    });
    drop(client);
    runtime.block_on(db.drop_database()).unwrap();
}
