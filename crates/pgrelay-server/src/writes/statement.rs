//! Turns one client change into parameterised SQL. Identifiers come from
//! the published table's schema (never from the client's text), values are
//! parameters cast from text with the column's own type.

use pgrelay_protocol::{ClientChange, Op, RejectCode, Row, TableSchema};

/// A change rejected before it reached PostgreSQL.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Invalid {
    pub(crate) code: RejectCode,
    pub(crate) reason: String,
}

fn invalid(code: RejectCode, reason: String) -> Invalid {
    Invalid { code, reason }
}

/// What to run for a change.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Planned {
    pub(crate) sql: String,
    pub(crate) params: Vec<Option<String>>,
    /// Update and delete must find their row; how many rows the statement
    /// touched tells whether it did.
    pub(crate) must_match: bool,
    /// The rows (by key) the change touches, to report their current state
    /// when the transaction is rejected.
    pub(crate) keys: Vec<Row>,
    /// The statement returns one boolean per row it wrote: whether the row
    /// as written passes the client's write rule.
    pub(crate) check_returned: bool,
}

pub(crate) use pgrelay_protocol::{quote_ident as quote, quote_table};

/// Plans `change` on `table`; `version` is the table's version column when
/// the table is under a version check. `None` means nothing to do (an
/// update that sets no column).
pub(crate) fn plan(
    table: &TableSchema,
    version: Option<&str>,
    change: &ClientChange,
) -> Result<Option<Planned>, Invalid> {
    if let Some(why) = &table.skipped {
        // A dropped or renamed table says so, rather than "no key".
        return Err(invalid(
            RejectCode::UnknownTable,
            format!("{} cannot be written through pgrelay: {why}", table.name),
        ));
    }
    if table.primary_key.is_empty() {
        return Err(invalid(
            RejectCode::UnknownTable,
            format!(
                "{} cannot be written through pgrelay: it has no primary key",
                table.name
            ),
        ));
    }
    for row in [change.new.as_ref(), change.old.as_ref()]
        .into_iter()
        .flatten()
    {
        if let Some(unknown) = row.keys().find(|c| table.column(c).is_none()) {
            return Err(invalid(
                RejectCode::UnknownColumn,
                format!("{} has no column {:?}", table.name, short(unknown)),
            ));
        }
    }
    let name = quote_table(&table.name);
    let mut params: Vec<Option<String>> = Vec::new();
    let mut bind = |value: &Option<String>, column: &str| -> String {
        params.push(value.clone());
        let pg_type = table.column(column).map_or("text", |c| c.pg_type.as_str());
        format!("${}::text::{pg_type}", params.len())
    };
    match change.op {
        Op::Insert => {
            let new = change.new.as_ref().ok_or_else(|| missing(change, "new"))?;
            // A NULL is left out so the server's default applies: a replica
            // has no defaults, so NULL is what it holds for an omitted column.
            let set: Vec<(&String, &Option<String>)> =
                new.iter().filter(|(_, v)| v.is_some()).collect();
            let sql = if set.is_empty() {
                format!("INSERT INTO {name} DEFAULT VALUES")
            } else {
                let cols = set.iter().map(|(c, _)| quote(c)).collect::<Vec<_>>();
                let vals = set.iter().map(|(c, v)| bind(v, c)).collect::<Vec<_>>();
                format!(
                    "INSERT INTO {name} ({}) VALUES ({})",
                    cols.join(", "),
                    vals.join(", ")
                )
            };
            let keys = key_of(table, new).into_iter().collect();
            Ok(Some(Planned {
                sql,
                params,
                must_match: false,
                keys,
                check_returned: false,
            }))
        }
        Op::Update | Op::Delete => {
            let old = change.old.as_ref().ok_or_else(|| missing(change, "old"))?;
            let key = key_of(table, old).ok_or_else(|| {
                invalid(
                    RejectCode::InvalidChange,
                    format!(
                        "change {}: `old` must hold the primary key ({}) of {}",
                        change.id,
                        table.primary_key.join(", "),
                        table.name
                    ),
                )
            })?;
            let base_version = match version {
                Some(column) => Some(old.get(column).ok_or_else(|| {
                    invalid(
                        RejectCode::InvalidChange,
                        format!(
                            "change {}: {} is under a version check; `old` must hold the {column:?} the change was based on",
                            change.id, table.name
                        ),
                    )
                })?),
                None => None,
            };
            let keys = touched_keys(table, change);
            let head = if change.op == Op::Update {
                let new = change.new.as_ref().ok_or_else(|| missing(change, "new"))?;
                if new.is_empty() {
                    return Ok(None);
                }
                let sets = new
                    .iter()
                    .map(|(c, v)| format!("{} = {}", quote(c), bind(v, c)))
                    .collect::<Vec<_>>();
                format!("UPDATE {name} SET {}", sets.join(", "))
            } else {
                format!("DELETE FROM {name}")
            };
            let mut conds = key
                .iter()
                .map(|(c, v)| match v {
                    Some(_) => format!("{} = {}", quote(c), bind(v, c)),
                    None => format!("{} IS NULL", quote(c)),
                })
                .collect::<Vec<_>>();
            if let (Some(column), Some(value)) = (version, base_version) {
                conds.push(format!(
                    "{} IS NOT DISTINCT FROM {}",
                    quote(column),
                    bind(value, column)
                ));
            }
            Ok(Some(Planned {
                sql: format!("{head} WHERE {}", conds.join(" AND ")),
                params,
                must_match: true,
                keys,
                check_returned: false,
            }))
        }
        Op::Truncate => Err(invalid(
            RejectCode::InvalidChange,
            "clients cannot truncate".to_owned(),
        )),
    }
}

/// Limits a planned change to rows the client's write rule allows: an
/// update or delete only touches a row that passes before the change, and
/// an insert or update returns whether each row passes after it (defaults
/// and triggers included). The rule's values are parameters.
pub(crate) fn guard(planned: &mut Planned, op: Op, rule: &crate::auth::Bound) {
    let predicate = rule.to_sql(&mut planned.params);
    match op {
        Op::Insert => {
            planned.sql = format!("{} RETURNING {predicate}", planned.sql);
            planned.check_returned = true;
        }
        Op::Update => {
            planned.sql = format!("{} AND {predicate} RETURNING {predicate}", planned.sql);
            planned.check_returned = true;
        }
        Op::Delete => planned.sql = format!("{} AND {predicate}", planned.sql),
        Op::Truncate => {}
    }
}

/// The SQL that reads a row's current values as text, by its key.
pub(crate) fn select_current(table: &TableSchema, key: &Row) -> (String, Vec<Option<String>>) {
    let cols = table
        .columns
        .iter()
        .map(|c| format!("{}::text", quote(&c.name)))
        .collect::<Vec<_>>();
    let mut params = Vec::new();
    let conds = key
        .iter()
        .map(|(c, v)| {
            params.push(v.clone());
            let pg_type = table.column(c).map_or("text", |c| c.pg_type.as_str());
            format!("{} = ${}::text::{pg_type}", quote(c), params.len())
        })
        .collect::<Vec<_>>();
    (
        format!(
            "SELECT {} FROM {} WHERE {}",
            cols.join(", "),
            quote_table(&table.name),
            conds.join(" AND ")
        ),
        params,
    )
}

/// The rows (by key) `change` touches, as far as it names them: an update
/// that changes part of the key touches the row under the old key and the
/// one under the old key with the new values. Also for a change that cannot
/// be planned, so a rejection reports every row the client wrote.
pub(crate) fn touched_keys(table: &TableSchema, change: &ClientChange) -> Vec<Row> {
    let mut keys: Vec<Row> = Vec::new();
    if table.primary_key.is_empty() {
        // Nothing names a row of a table without a key.
        return keys;
    }
    let old_key = change.old.as_ref().and_then(|old| key_of(table, old));
    let new_key = change
        .new
        .as_ref()
        .and_then(|new| match (&old_key, change.op) {
            (Some(old_key), Op::Update) => {
                let mut key = old_key.clone();
                for (column, value) in key.iter_mut() {
                    if let Some(v) = new.get(column) {
                        value.clone_from(v);
                    }
                }
                Some(key)
            }
            _ => key_of(table, new),
        });
    for key in [old_key, new_key].into_iter().flatten() {
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}

/// The primary key's values in `row`, when it holds all of them.
fn key_of(table: &TableSchema, row: &Row) -> Option<Row> {
    table
        .primary_key
        .iter()
        .map(|k| row.get(k).map(|v| (k.clone(), v.clone())))
        .collect()
}

fn missing(change: &ClientChange, field: &str) -> Invalid {
    invalid(
        RejectCode::InvalidChange,
        format!(
            "change {}: {} needs `{field}`",
            change.id,
            change.op.as_str()
        ),
    )
}

fn short(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgrelay_protocol::{Column, ValueKind};

    fn todos() -> TableSchema {
        let col = |name: &str, pg_type: &str| Column {
            name: name.into(),
            pg_type: pg_type.into(),
            type_oid: 0,
            kind: ValueKind::Text,
            attnum: None,
        };
        TableSchema {
            name: "public.todos".into(),
            columns: vec![
                col("id", "bigint"),
                col("title", "text"),
                col("version", "integer"),
            ],
            primary_key: vec!["id".into()],
            version: 1,
            skipped: None,
            backfilled: Vec::new(),
            oid: None,
        }
    }

    fn row(pairs: &[(&str, Option<&str>)]) -> Row {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_owned)))
            .collect()
    }

    fn change(op: Op, new: Option<Row>, old: Option<Row>) -> ClientChange {
        ClientChange {
            id: "c1".into(),
            table: "public.todos".into(),
            op,
            new,
            old,
        }
    }

    #[test]
    fn insert_leaves_nulls_to_defaults() {
        let c = change(
            Op::Insert,
            Some(row(&[("id", Some("7")), ("title", None)])),
            None,
        );
        let p = plan(&todos(), None, &c).unwrap().unwrap();
        assert_eq!(
            p.sql,
            r#"INSERT INTO "public"."todos" ("id") VALUES ($1::text::bigint)"#
        );
        assert_eq!(p.params, vec![Some("7".to_owned())]);
        assert_eq!(p.keys, vec![row(&[("id", Some("7"))])]);
    }

    #[test]
    fn update_under_a_version_check() {
        let c = change(
            Op::Update,
            Some(row(&[("title", Some("x"))])),
            Some(row(&[("id", Some("7")), ("version", Some("3"))])),
        );
        let p = plan(&todos(), Some("version"), &c).unwrap().unwrap();
        assert_eq!(
            p.sql,
            r#"UPDATE "public"."todos" SET "title" = $1::text::text WHERE "id" = $2::text::bigint AND "version" IS NOT DISTINCT FROM $3::text::integer"#
        );
        assert!(p.must_match);
        let no_version = change(Op::Delete, None, Some(row(&[("id", Some("7"))])));
        assert_eq!(
            plan(&todos(), Some("version"), &no_version)
                .unwrap_err()
                .code,
            RejectCode::InvalidChange
        );
        assert!(plan(&todos(), None, &no_version).is_ok());
    }

    #[test]
    fn identifiers_come_from_the_schema() {
        let c = change(
            Op::Insert,
            Some(row(&[("id\"; DROP TABLE x; --", Some("1"))])),
            None,
        );
        assert_eq!(
            plan(&todos(), None, &c).unwrap_err().code,
            RejectCode::UnknownColumn
        );
        let no_key = change(Op::Delete, None, Some(row(&[("title", Some("a"))])));
        assert_eq!(
            plan(&todos(), None, &no_key).unwrap_err().code,
            RejectCode::InvalidChange
        );
        let mut keyless = todos();
        keyless.primary_key.clear();
        let c = change(Op::Insert, Some(row(&[("id", Some("1"))])), None);
        assert_eq!(
            plan(&keyless, None, &c).unwrap_err().code,
            RejectCode::UnknownTable
        );
    }

    #[test]
    fn a_rejection_names_every_row_the_change_touched() {
        let mut pair = todos();
        pair.primary_key = vec!["id".into(), "version".into()];
        // Half of a two-column key changed: the new row is the old key with
        // the new value.
        let c = change(
            Op::Update,
            Some(row(&[("version", Some("9"))])),
            Some(row(&[("id", Some("7")), ("version", Some("3"))])),
        );
        let want = vec![
            row(&[("id", Some("7")), ("version", Some("3"))]),
            row(&[("id", Some("7")), ("version", Some("9"))]),
        ];
        assert_eq!(plan(&pair, None, &c).unwrap().unwrap().keys, want);
        // A change that cannot be planned still names its rows.
        let unknown = change(
            Op::Insert,
            Some(row(&[("id", Some("8")), ("nope", Some("1"))])),
            None,
        );
        assert!(plan(&todos(), None, &unknown).is_err());
        assert_eq!(
            touched_keys(&todos(), &unknown),
            vec![row(&[("id", Some("8"))])]
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_table("app.my\"t"), r#""app"."my""t""#);
        let (sql, params) = select_current(&todos(), &row(&[("id", Some("7"))]));
        assert_eq!(
            sql,
            r#"SELECT "id"::text, "title"::text, "version"::text FROM "public"."todos" WHERE "id" = $1::text::bigint"#
        );
        assert_eq!(params.len(), 1);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Column names: the schema's, plus hostile ones it does not have.
        fn column() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => Just("id".to_owned()),
                3 => Just("title".to_owned()),
                3 => Just("version".to_owned()),
                1 => "[a-z\"; -]{1,12}",
            ]
        }

        fn any_row() -> impl Strategy<Value = Row> {
            proptest::collection::btree_map(column(), proptest::option::of("[ -~]{0,8}"), 0..5)
        }

        fn any_op() -> impl Strategy<Value = Op> {
            prop_oneof![
                Just(Op::Insert),
                Just(Op::Update),
                Just(Op::Delete),
                Just(Op::Truncate)
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Whatever a client sends, planning never panics; an accepted
            /// change names only the schema's columns, binds every value as a
            /// parameter, and under a version check an update or delete can
            /// only touch the row at the version it was based on.
            #[test]
            fn planned_writes_are_bound_and_version_checked(
                op in any_op(),
                new in proptest::option::of(any_row()),
                old in proptest::option::of(any_row()),
                checked in any::<bool>(),
            ) {
                let table = todos();
                let version = checked.then_some("version");
                let c = change(op, new.clone(), old.clone());
                let Ok(Some(planned)) = plan(&table, version, &c) else {
                    return Ok(());
                };
                for row in [new.as_ref(), old.as_ref()].into_iter().flatten() {
                    for name in row.keys() {
                        prop_assert!(table.column(name).is_some(), "accepted unknown column {:?}", name);
                    }
                }
                let placeholders = (1..=planned.params.len())
                    .filter(|n| planned.sql.contains(&format!("${n}::text::")))
                    .count();
                prop_assert_eq!(placeholders, planned.params.len());
                let beyond = format!("${}::", planned.params.len() + 1);
                prop_assert!(!planned.sql.contains(&beyond), "unbound placeholder in {}", planned.sql);
                // Values travel only as parameters: the SQL has no literals.
                prop_assert!(!planned.sql.contains('\''), "literal in SQL: {}", planned.sql);
                if matches!(op, Op::Update | Op::Delete) {
                    prop_assert!(planned.must_match);
                    if checked {
                        prop_assert!(planned.sql.contains(r#""version" IS NOT DISTINCT FROM $"#),
                            "version check missing: {}", planned.sql);
                    }
                }
            }
        }
    }
}
