//! Primary keys as repair compares them: the column types whose order
//! PostgreSQL and SQLite agree on, and the key values in that order.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::{quote_ident, TableSchema, ValueKind};

/// How a key column is compared on both sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// int2, int4, int8, oid: by value.
    Integer,
    /// text, varchar: by UTF-8 bytes (`COLLATE "C"` in PostgreSQL).
    Text,
    /// uuid: by its lowercase text, which orders as its bytes.
    Uuid,
}

impl KeyKind {
    /// What follows the column in a PostgreSQL comparison or ORDER BY.
    pub fn pg_collation(self) -> &'static str {
        match self {
            KeyKind::Text => " COLLATE \"C\"",
            KeyKind::Integer | KeyKind::Uuid => "",
        }
    }
}

/// The key columns' kinds, or `None` when the table has no primary key or
/// one whose order the two sides might not agree on (it is compared whole).
pub fn key_kinds(table: &TableSchema) -> Option<Vec<KeyKind>> {
    if table.primary_key.is_empty() {
        return None;
    }
    table
        .primary_key
        .iter()
        .map(|name| {
            let column = table.column(name)?;
            match (column.kind, column.type_oid) {
                (ValueKind::Integer, _) => Some(KeyKind::Integer),
                (ValueKind::Text, 25 | 1043) => Some(KeyKind::Text),
                (ValueKind::Text, 2950) => Some(KeyKind::Uuid),
                _ => None,
            }
        })
        .collect()
}

/// One key column's value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum KeyValue {
    Int(i64),
    Text(String),
}

impl KeyValue {
    /// From a value's canonical text; `None` for NULL or an integer that
    /// does not parse (neither is a valid key).
    pub fn from_canonical(kind: KeyKind, text: Option<&str>) -> Option<KeyValue> {
        let text = text?;
        match kind {
            KeyKind::Integer => text.parse().ok().map(KeyValue::Int),
            KeyKind::Text => Some(KeyValue::Text(text.to_owned())),
            KeyKind::Uuid => Some(KeyValue::Text(text.to_ascii_lowercase())),
        }
    }

    /// The value as SQL text for PostgreSQL (a literal; text is quoted with
    /// doubled quotes, which `standard_conforming_strings` makes safe).
    pub fn pg_literal(&self) -> String {
        match self {
            KeyValue::Int(i) => i.to_string(),
            KeyValue::Text(s) => format!("'{}'", s.replace('\'', "''")),
        }
    }
}

impl PartialOrd for KeyValue {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for KeyValue {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (KeyValue::Int(a), KeyValue::Int(b)) => a.cmp(b),
            // Bytewise, as SQLite's BINARY collation and PostgreSQL's "C".
            (KeyValue::Text(a), KeyValue::Text(b)) => a.as_bytes().cmp(b.as_bytes()),
            // Never mixed within one column; SQLite puts integers first.
            (KeyValue::Int(_), KeyValue::Text(_)) => Ordering::Less,
            (KeyValue::Text(_), KeyValue::Int(_)) => Ordering::Greater,
        }
    }
}

/// A row's key: its key columns' values in key order, compared
/// lexicographically (as row values compare in both databases).
pub type Key = Vec<KeyValue>;

/// Where to cut `count` sorted rows into `parts` parts: the indices of the
/// rows that start a new part (at most `parts - 1`, ascending, distinct).
pub fn split_points(count: u64, parts: usize) -> Vec<u64> {
    let parts = (parts.max(1) as u64).min(count.max(1));
    let size = count.div_ceil(parts).max(1);
    (1..parts)
        .map(|i| i * size)
        .filter(|&i| i < count)
        .collect()
}

/// PostgreSQL SQL that holds for rows in any of `ranges` of `table`, whose
/// key has `kinds`. Bounds become literals: check them first (a key's
/// arity and kinds, uuids' shape).
pub fn pg_ranges_condition(
    table: &TableSchema,
    kinds: &[KeyKind],
    ranges: &[(Option<Key>, Option<Key>)],
) -> String {
    let columns = table
        .primary_key
        .iter()
        .zip(kinds)
        .map(|(name, kind)| format!("{}{}", quote_ident(name), kind.pg_collation()))
        .collect::<Vec<_>>()
        .join(", ");
    let literals = |key: &Key| {
        key.iter()
            .map(KeyValue::pg_literal)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let conditions: Vec<String> = ranges
        .iter()
        .map(|(lo, hi)| {
            let mut parts = Vec::new();
            if let Some(lo) = lo {
                parts.push(format!("({columns}) >= ({})", literals(lo)));
            }
            if let Some(hi) = hi {
                parts.push(format!("({columns}) < ({})", literals(hi)));
            }
            if parts.is_empty() {
                "true".to_owned()
            } else {
                parts.join(" AND ")
            }
        })
        .collect();
    conditions.join(" OR ")
}

/// A key for people: its values joined by commas.
pub fn display_key(key: &Key) -> String {
    key.iter()
        .map(|v| match v {
            KeyValue::Int(i) => i.to_string(),
            KeyValue::Text(t) => format!("{t:?}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}
