//! What a client needs to know about a synced table to build its replica:
//! columns, their PostgreSQL types, how values are stored, and the key.

use serde::{Deserialize, Serialize};

/// How a column's values travel and are stored in a replica. Every value
/// travels as PostgreSQL's own text output (so nothing is rounded on the
/// way); the kind says how a replica stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueKind {
    /// int2, int4, int8, oid: SQLite INTEGER.
    Integer,
    /// float4, float8: SQLite REAL (NaN and infinities as TEXT, which SQLite
    /// cannot hold as REAL).
    Float,
    /// bool: SQLite INTEGER 0 or 1.
    Bool,
    /// bytea: SQLite BLOB with the raw bytes.
    Bytes,
    /// numeric: SQLite TEXT with the exact decimal digits.
    Numeric,
    /// json, jsonb: SQLite TEXT holding the JSON document.
    Json,
    /// Everything else (text, varchar, char, uuid, dates and times,
    /// interval, arrays, enums, ...): SQLite TEXT in PostgreSQL's output form.
    Text,
}

impl ValueKind {
    /// The kind for a PostgreSQL type, by its OID (built-in types only;
    /// user-defined types such as enums and domains over text are `Text`).
    pub fn from_type_oid(oid: u32) -> ValueKind {
        match oid {
            20 | 21 | 23 | 26 => ValueKind::Integer,
            700 | 701 => ValueKind::Float,
            16 => ValueKind::Bool,
            17 => ValueKind::Bytes,
            1700 => ValueKind::Numeric,
            114 | 3802 => ValueKind::Json,
            _ => ValueKind::Text,
        }
    }

    /// The SQLite column type a replica declares for this kind.
    pub fn sqlite_type(self) -> &'static str {
        match self {
            ValueKind::Integer | ValueKind::Bool => "INTEGER",
            ValueKind::Float => "REAL",
            ValueKind::Bytes => "BLOB",
            ValueKind::Numeric | ValueKind::Json | ValueKind::Text => "TEXT",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// PostgreSQL's name for the type, as `format_type` prints it
    /// (`integer`, `numeric(12,2)`, `text[]`, `mood`).
    pub pg_type: String,
    pub type_oid: u32,
    pub kind: ValueKind,
    /// PostgreSQL's number for the column in its table (`attnum`), which a
    /// RENAME COLUMN keeps: a replica tells a renamed column from a dropped
    /// one and a new one by it. `None` from older servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attnum: Option<i16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSchema {
    /// Schema-qualified PostgreSQL name, e.g. `public.todos`.
    pub name: String,
    pub columns: Vec<Column>,
    /// Primary-key column names, in key order. Empty for a table synced by
    /// REPLICA IDENTITY FULL.
    pub primary_key: Vec<String>,
    /// Bumped by the server whenever the table's columns change.
    pub version: u32,
    /// Why the table is not synced (e.g. no primary key and no REPLICA
    /// IDENTITY FULL); such a table carries no changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Columns just added that gave existing rows a value (a default, or
    /// NOT NULL): a replica that already had the table re-fetches it,
    /// since PostgreSQL does not stream those values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backfilled: Vec<String>,
    /// The table's OID in PostgreSQL, which a RENAME TABLE keeps: a replica
    /// finds a renamed table's old name by it. `None` from older servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oid: Option<u32>,
}

impl TableSchema {
    /// The table's name in a SQLite replica: the bare name for tables of
    /// schema `public`, `schema.table` (one identifier) otherwise.
    pub fn sqlite_name(&self) -> &str {
        sqlite_table_name(&self.name)
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// See [`TableSchema::sqlite_name`].
pub fn sqlite_table_name(qualified: &str) -> &str {
    qualified.strip_prefix("public.").unwrap_or(qualified)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_of_builtin_types() {
        assert_eq!(ValueKind::from_type_oid(20), ValueKind::Integer);
        assert_eq!(ValueKind::from_type_oid(1700), ValueKind::Numeric);
        assert_eq!(ValueKind::from_type_oid(3802), ValueKind::Json);
        assert_eq!(ValueKind::from_type_oid(2950), ValueKind::Text); // uuid
        assert_eq!(ValueKind::Bytes.sqlite_type(), "BLOB");
    }

    #[test]
    fn sqlite_names() {
        assert_eq!(sqlite_table_name("public.todos"), "todos");
        assert_eq!(sqlite_table_name("app.todos"), "app.todos");
    }
}
