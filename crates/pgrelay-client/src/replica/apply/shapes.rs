//! The SQL text of the statements that apply the server's changes, made
//! once per table and shape (the statement's kind and the columns a change
//! names) instead of on every row. The replica's thread keeps it between
//! applies and drops it whenever it reloads its tables.

use std::collections::HashMap;

use pgrelay_protocol::{quote_ident as quote, Row, TableSchema};

/// Statement texts per table.
#[derive(Default)]
pub(crate) struct Shapes {
    tables: HashMap<String, Layout>,
}

impl Shapes {
    /// The table's layout, made on first use.
    pub(super) fn layout(&mut self, table: &TableSchema) -> &mut Layout {
        if !self.tables.contains_key(&table.name) {
            self.tables.insert(table.name.clone(), Layout::new(table));
        }
        self.tables
            .get_mut(&table.name)
            .unwrap_or_else(|| unreachable!("inserted above"))
    }
}

/// What the statements of one table are made from, and their texts.
pub(super) struct Layout {
    /// The quoted SQLite name.
    name: String,
    /// Indexes of the table's columns in name order: the order a row
    /// (a map by column name) holds them in.
    by_name: Vec<usize>,
    /// Statement texts by shape tag and column sets, one after the other.
    texts: HashMap<Vec<u64>, String>,
    /// The key being looked up (kept to spare an allocation per lookup).
    key: Vec<u64>,
}

/// A statement's kind; its columns are given apart, as bit sets over the
/// table's columns.
#[derive(Clone, Copy)]
pub(super) enum Shape {
    /// `rows` rows at once.
    Insert {
        rows: usize,
    },
    Update,
    Delete,
    Truncate,
}

impl Shape {
    fn tag(self) -> u64 {
        match self {
            Shape::Insert { rows } => (rows as u64) << 2,
            Shape::Update => 1,
            Shape::Delete => 2,
            Shape::Truncate => 3,
        }
    }
}

/// Words of a bit set over `columns` columns.
pub(super) fn words(columns: usize) -> usize {
    columns.div_ceil(64).max(1)
}

pub(super) fn has(set: &[u64], column: usize) -> bool {
    set[column / 64] & (1 << (column % 64)) != 0
}

/// Whether `set` holds each of the table's `columns` columns.
pub(super) fn holds_all(set: &[u64], columns: usize) -> bool {
    (0..columns).all(|c| has(set, c))
}

impl Layout {
    fn new(table: &TableSchema) -> Layout {
        let mut by_name: Vec<usize> = (0..table.columns.len()).collect();
        by_name.sort_by(|&a, &b| table.columns[a].name.cmp(&table.columns[b].name));
        Layout {
            name: quote(table.sqlite_name()),
            by_name,
            texts: HashMap::new(),
            key: Vec::new(),
        }
    }

    /// Reads `row` in one pass: `slots[i]` is the value of the table's
    /// column `i` if the row names it, and `set` the bit set of those
    /// columns. Names the table does not have are left out.
    pub(super) fn gather<'r>(
        &self,
        table: &TableSchema,
        row: &'r Row,
        slots: &mut Vec<Option<Option<&'r str>>>,
        set: &mut Vec<u64>,
    ) {
        slots.clear();
        slots.resize(table.columns.len(), None);
        set.clear();
        set.resize(words(table.columns.len()), 0);
        let mut columns = self.by_name.iter().copied().peekable();
        for (name, value) in row {
            while columns
                .next_if(|&c| table.columns[c].name.as_str() < name.as_str())
                .is_some()
            {}
            if let Some(c) = columns.next_if(|&c| table.columns[c].name == *name) {
                slots[c] = Some(value.as_deref());
                set[c / 64] |= 1 << (c % 64);
            }
        }
    }

    /// The text of the statement of `shape` over the column sets `sets`
    /// (inserted or set columns, then for a table without a key the
    /// columns that find the row).
    pub(super) fn text(&mut self, table: &TableSchema, shape: Shape, sets: &[&[u64]]) -> &str {
        self.key.clear();
        self.key.push(shape.tag());
        for set in sets {
            self.key.extend_from_slice(set);
        }
        if !self.texts.contains_key(self.key.as_slice()) {
            let text = self.make(table, shape, sets);
            self.texts.insert(self.key.clone(), text);
        }
        self.texts
            .get(self.key.as_slice())
            .map_or_else(|| unreachable!("inserted above"), String::as_str)
    }

    fn make(&self, table: &TableSchema, shape: Shape, sets: &[&[u64]]) -> String {
        let name = &self.name;
        let named = |set: &[u64]| -> Vec<String> {
            table
                .columns
                .iter()
                .enumerate()
                .filter(|(c, _)| has(set, *c))
                .map(|(_, column)| quote(&column.name))
                .collect()
        };
        let first = sets.first().copied().unwrap_or(&[]);
        match shape {
            Shape::Insert { rows } => {
                let columns = named(first);
                let marks = format!("({})", vec!["?"; columns.len()].join(", "));
                let verb = if table.primary_key.is_empty() {
                    "INSERT"
                } else {
                    "INSERT OR REPLACE"
                };
                format!(
                    "{verb} INTO {name} ({}) VALUES {}",
                    columns.join(", "),
                    vec![marks; rows].join(", ")
                )
            }
            Shape::Update => {
                let assignments = named(first)
                    .iter()
                    .map(|c| format!("{c} = ?"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let locate = self.locate(table, sets.get(1).copied().unwrap_or(&[]), named);
                format!("UPDATE {name} SET {assignments} WHERE {locate}")
            }
            Shape::Delete => {
                let locate = self.locate(table, first, named);
                format!("DELETE FROM {name} WHERE {locate}")
            }
            Shape::Truncate => format!("DELETE FROM {name}"),
        }
    }

    /// A WHERE clause that finds the row: by primary key, or (REPLICA
    /// IDENTITY FULL without a key) the first row equal in every column
    /// of `set`.
    fn locate(
        &self,
        table: &TableSchema,
        set: &[u64],
        named: impl Fn(&[u64]) -> Vec<String>,
    ) -> String {
        if !table.primary_key.is_empty() {
            return table
                .primary_key
                .iter()
                .map(|k| format!("{} = ?", quote(k)))
                .collect::<Vec<_>>()
                .join(" AND ");
        }
        let clauses = named(set)
            .iter()
            .map(|c| format!("{c} IS ?"))
            .collect::<Vec<_>>()
            .join(" AND ");
        format!(
            "rowid = (SELECT rowid FROM {} WHERE {clauses} LIMIT 1)",
            self.name
        )
    }
}
