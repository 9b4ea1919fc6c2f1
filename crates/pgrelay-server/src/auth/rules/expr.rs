//! The rule language of `rules.toml`: a small boolean expression over a
//! row's columns and the token's claims, parsed by hand so nothing but
//! comparisons, `IN`, `IS [NOT] NULL`, `AND`, `OR`, `NOT` and parentheses
//! exists. A rule is first bound to one token's claims (claims become
//! values); the bound rule then runs in memory over rows, or becomes a SQL
//! predicate whose every value is a parameter.

use std::collections::BTreeSet;

use pgrelay_protocol::quote_ident as quote;
use pgrelay_protocol::Row;

#[cfg(test)]
use super::parse::parse;

/// One side of a comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Operand {
    Column(String),
    /// `claims.a.b`: a path into the token's claims.
    Claim(Vec<String>),
    Literal(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Expr {
    Const(bool),
    Compare {
        left: Operand,
        right: Operand,
        equal: bool,
    },
    /// `x IN (a, b)`, or `x IN claims.list` (one operand, a claim array).
    In {
        left: Operand,
        list: Vec<Operand>,
    },
    IsNull {
        operand: Operand,
        null: bool,
    },
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
}

/// A rule bound to one token's claims: only columns and values are left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Bound {
    Const(bool),
    /// `column = value` (or `<>`); false when the column is NULL.
    Value {
        column: String,
        value: String,
        equal: bool,
    },
    Columns {
        left: String,
        right: String,
        equal: bool,
    },
    OneOf {
        column: String,
        values: Vec<String>,
    },
    IsNull {
        column: String,
        null: bool,
    },
    Not(Box<Bound>),
    And(Vec<Bound>),
    Or(Vec<Bound>),
}

impl Expr {
    /// Every column the rule reads.
    pub(crate) fn columns(&self, out: &mut BTreeSet<String>) {
        let mut add = |o: &Operand| {
            if let Operand::Column(c) = o {
                out.insert(c.clone());
            }
        };
        match self {
            Expr::Const(_) => {}
            Expr::Compare { left, right, .. } => {
                add(left);
                add(right);
            }
            Expr::In { left, list } => {
                add(left);
                list.iter().for_each(add);
            }
            Expr::IsNull { operand, .. } => add(operand),
            Expr::Not(e) => e.columns(out),
            Expr::And(items) | Expr::Or(items) => items.iter().for_each(|e| e.columns(out)),
        }
    }

    /// Every claim path the rule reads.
    pub(crate) fn claims(&self, out: &mut BTreeSet<Vec<String>>) {
        let mut add = |o: &Operand| {
            if let Operand::Claim(c) = o {
                out.insert(c.clone());
            }
        };
        match self {
            Expr::Const(_) => {}
            Expr::Compare { left, right, .. } => {
                add(left);
                add(right);
            }
            Expr::In { left, list } => {
                add(left);
                list.iter().for_each(add);
            }
            Expr::IsNull { operand, .. } => add(operand),
            Expr::Not(e) => e.claims(out),
            Expr::And(items) | Expr::Or(items) => items.iter().for_each(|e| e.claims(out)),
        }
    }

    /// Replaces claims by their values in `claims`. A missing claim, JSON
    /// null, or an object is no value: comparisons with it are false.
    pub(crate) fn bind(&self, claims: &serde_json::Map<String, serde_json::Value>) -> Bound {
        match self {
            Expr::Const(b) => Bound::Const(*b),
            Expr::Compare { left, right, equal } => {
                match (resolve(left, claims), resolve(right, claims)) {
                    (Side::Column(l), Side::Column(r)) => Bound::Columns {
                        left: l,
                        right: r,
                        equal: *equal,
                    },
                    (Side::Column(column), Side::Values(v))
                    | (Side::Values(v), Side::Column(column)) => match scalar(v) {
                        Some(value) => Bound::Value {
                            column,
                            value,
                            equal: *equal,
                        },
                        None => Bound::Const(false),
                    },
                    (Side::Values(l), Side::Values(r)) => match (scalar(l), scalar(r)) {
                        (Some(l), Some(r)) => Bound::Const((l == r) == *equal),
                        _ => Bound::Const(false),
                    },
                }
            }
            Expr::In { left, list } => {
                let mut values = Vec::new();
                for item in list {
                    match resolve(item, claims) {
                        Side::Values(v) => values.extend(v),
                        // A column in the list: `a IN (b, 'x')` is `a = b OR a = 'x'`.
                        Side::Column(c) => {
                            let rest: Vec<Operand> =
                                list.iter().filter(|o| *o != item).cloned().collect();
                            let first = Expr::Compare {
                                left: left.clone(),
                                right: Operand::Column(c),
                                equal: true,
                            };
                            let others = Expr::In {
                                left: left.clone(),
                                list: rest,
                            };
                            return Bound::Or(vec![first.bind(claims), others.bind(claims)]);
                        }
                    }
                }
                match resolve(left, claims) {
                    Side::Column(_) if values.is_empty() => Bound::Const(false),
                    Side::Column(column) => Bound::OneOf { column, values },
                    Side::Values(v) => match scalar(v) {
                        Some(value) => Bound::Const(values.contains(&value)),
                        None => Bound::Const(false),
                    },
                }
            }
            Expr::IsNull { operand, null } => match resolve(operand, claims) {
                Side::Column(column) => Bound::IsNull {
                    column,
                    null: *null,
                },
                Side::Values(v) => Bound::Const(v.is_empty() == *null),
            },
            Expr::Not(e) => match e.bind(claims) {
                Bound::Const(b) => Bound::Const(!b),
                other => Bound::Not(Box::new(other)),
            },
            Expr::And(items) => {
                let mut bound = Vec::new();
                for item in items {
                    match item.bind(claims) {
                        Bound::Const(false) => return Bound::Const(false),
                        Bound::Const(true) => {}
                        other => bound.push(other),
                    }
                }
                match bound.len() {
                    0 => Bound::Const(true),
                    1 => bound.remove(0),
                    _ => Bound::And(bound),
                }
            }
            Expr::Or(items) => {
                let mut bound = Vec::new();
                for item in items {
                    match item.bind(claims) {
                        Bound::Const(true) => return Bound::Const(true),
                        Bound::Const(false) => {}
                        other => bound.push(other),
                    }
                }
                match bound.len() {
                    0 => Bound::Const(false),
                    1 => bound.remove(0),
                    _ => Bound::Or(bound),
                }
            }
        }
    }
}

enum Side {
    Column(String),
    /// The operand's values: one for a scalar, several for a claim array,
    /// none for a missing claim.
    Values(Vec<String>),
}

fn scalar(mut values: Vec<String>) -> Option<String> {
    (values.len() == 1).then(|| values.remove(0))
}

fn resolve(operand: &Operand, claims: &serde_json::Map<String, serde_json::Value>) -> Side {
    match operand {
        Operand::Column(c) => Side::Column(c.clone()),
        Operand::Literal(v) => Side::Values(vec![v.clone()]),
        Operand::Claim(path) => {
            let mut value = claims.get(&path[0]);
            for part in &path[1..] {
                value = value.and_then(|v| v.get(part));
            }
            Side::Values(match value {
                Some(serde_json::Value::Array(items)) => {
                    items.iter().filter_map(claim_text).collect()
                }
                Some(v) => claim_text(v).into_iter().collect(),
                None => Vec::new(),
            })
        }
    }
}

/// A claim's value as text: strings as they are, numbers and booleans as
/// JSON writes them.
pub(crate) fn claim_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Bound {
    /// Whether `row` passes. Values compare as PostgreSQL's text output; a
    /// column the row lacks counts as NULL.
    pub(crate) fn eval(&self, row: &Row) -> bool {
        let get = |c: &str| row.get(c).and_then(|v| v.as_deref());
        match self {
            Bound::Const(b) => *b,
            Bound::Value {
                column,
                value,
                equal,
            } => get(column).is_some_and(|v| (v == value) == *equal),
            Bound::Columns { left, right, equal } => match (get(left), get(right)) {
                (Some(l), Some(r)) => (l == r) == *equal,
                _ => false,
            },
            Bound::OneOf { column, values } => {
                get(column).is_some_and(|v| values.iter().any(|x| x == v))
            }
            Bound::IsNull { column, null } => get(column).is_none() == *null,
            Bound::Not(e) => !e.eval(row),
            Bound::And(items) => items.iter().all(|e| e.eval(row)),
            Bound::Or(items) => items.iter().any(|e| e.eval(row)),
        }
    }

    /// The rule as a SQL predicate that is never NULL. Values are appended
    /// to `params` and referenced as `$n`; columns are quoted identifiers
    /// (checked against the table's schema when the rules were loaded).
    pub(crate) fn to_sql(&self, params: &mut Vec<Option<String>>) -> String {
        self.to_sql_as(params, &|n| format!("${n}::text"))
    }

    /// As [`Bound::to_sql`], value `n` (1-based) written as `placeholder(n)`:
    /// for statements that take no bind parameters (COPY), which read the
    /// values from settings the caller bound first.
    pub(crate) fn to_sql_as(
        &self,
        params: &mut Vec<Option<String>>,
        placeholder: &dyn Fn(usize) -> String,
    ) -> String {
        let bind = |v: &str, params: &mut Vec<Option<String>>| {
            params.push(Some(v.to_owned()));
            placeholder(params.len())
        };
        match self {
            Bound::Const(true) => "true".to_owned(),
            Bound::Const(false) => "false".to_owned(),
            Bound::Value {
                column,
                value,
                equal,
            } => {
                let op = if *equal { "=" } else { "<>" };
                format!(
                    "coalesce({}::text {op} {}, false)",
                    quote(column),
                    bind(value, params)
                )
            }
            Bound::Columns { left, right, equal } => {
                let op = if *equal { "=" } else { "<>" };
                format!(
                    "coalesce({}::text {op} {}::text, false)",
                    quote(left),
                    quote(right)
                )
            }
            Bound::OneOf { column, values } => {
                let list = values
                    .iter()
                    .map(|v| bind(v, params))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("coalesce({}::text IN ({list}), false)", quote(column))
            }
            Bound::IsNull { column, null } => {
                let not = if *null { "" } else { " NOT" };
                format!("({} IS{not} NULL)", quote(column))
            }
            Bound::Not(e) => format!("(NOT {})", e.to_sql_as(params, placeholder)),
            Bound::And(items) => {
                let parts: Vec<String> = items
                    .iter()
                    .map(|e| e.to_sql_as(params, placeholder))
                    .collect();
                format!("({})", parts.join(" AND "))
            }
            Bound::Or(items) => {
                let parts: Vec<String> = items
                    .iter()
                    .map(|e| e.to_sql_as(params, placeholder))
                    .collect();
                format!("({})", parts.join(" OR "))
            }
        }
    }

    pub(crate) fn is_false(&self) -> bool {
        *self == Bound::Const(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().cloned().unwrap()
    }

    fn row(pairs: &[(&str, Option<&str>)]) -> Row {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_owned)))
            .collect()
    }

    #[test]
    fn parses_the_documented_forms() {
        for text in [
            "tenant_id = claims.tenant_id",
            "owner = claims.sub OR claims.role = 'admin'",
            "NOT (status = 'hidden') AND team IN ('a', 'b', claims.team)",
            "group_id IN claims.groups",
            "deleted_at IS NULL and owner <> 'x'",
            "n != -1.5",
            "true",
        ] {
            parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
        for bad in [
            "",
            "tenant_id",
            "a = ",
            "a = 'x",
            "a = b; DROP TABLE t",
            "claims = 1",
            "a IN b",
            "(a = 1",
            "a = 1 b = 2",
            "a == 1",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn binds_and_evaluates() {
        let rule = parse("owner = claims.sub OR claims.role = 'admin'").unwrap();
        let admin = rule.bind(&claims(json!({"sub": "u1", "role": "admin"})));
        assert_eq!(admin, Bound::Const(true));
        let user = rule.bind(&claims(json!({"sub": "u1"})));
        assert!(user.eval(&row(&[("owner", Some("u1"))])));
        assert!(!user.eval(&row(&[("owner", Some("u2"))])));
        assert!(!user.eval(&row(&[("owner", None)])));
        let not = parse("NOT owner = claims.sub")
            .unwrap()
            .bind(&claims(json!({"sub": "u1"})));
        // NULL owner: neither equal nor, in SQL's sense, unequal; NOT of a
        // false comparison is true in memory and in SQL (coalesce).
        assert!(not.eval(&row(&[("owner", None)])));
        let missing = parse("tenant_id = claims.tenant_id")
            .unwrap()
            .bind(&claims(json!({})));
        assert_eq!(missing, Bound::Const(false));
        let groups = parse("g IN claims.groups")
            .unwrap()
            .bind(&claims(json!({"groups": ["a", 7]})));
        assert!(groups.eval(&row(&[("g", Some("7"))])));
        assert!(!groups.eval(&row(&[("g", Some("b"))])));
    }

    #[test]
    fn sql_binds_every_value() {
        let rule = parse("tenant_id = claims.t AND (kind IN ('a', 'b') OR note IS NULL)").unwrap();
        let bound = rule.bind(&claims(json!({"t": "x'); DROP TABLE t; --"})));
        let mut params = Vec::new();
        let sql = bound.to_sql(&mut params);
        assert_eq!(
            sql,
            r#"(coalesce("tenant_id"::text = $1::text, false) AND (coalesce("kind"::text IN ($2::text, $3::text), false) OR ("note" IS NULL)))"#
        );
        assert_eq!(params[0].as_deref(), Some("x'); DROP TABLE t; --"));
        assert!(!sql.contains('\''));
    }
}
