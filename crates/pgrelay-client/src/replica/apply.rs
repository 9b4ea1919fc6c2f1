//! Applies the server's transactions to the replica's tables. Each
//! statement's SQL text is made once per table and shape (see [`shapes`]),
//! values are bound straight from the change's text, and consecutive
//! inserts into one table that name the same columns go many rows per
//! statement, in their order.

use std::collections::HashMap;

use pgrelay_protocol::{Change, Op, Row, TableSchema};
use rusqlite::types::ToSqlOutput;
use rusqlite::Connection;

use crate::value::to_sqlite_ref;
use crate::ClientError;

mod shapes;

pub(crate) use shapes::Shapes;
use shapes::{holds_all, Shape};

/// Rows inserted by one statement (fewer for wide tables), as a snapshot
/// load does.
const ROWS_PER_STATEMENT: usize = 32;

/// SQLite's default limit on a statement's parameters.
const MAX_PARAMETERS: usize = 32_766;

/// Applies one change on its own (local writes put back, rolled back or
/// re-applied). The caller holds the SQLite transaction.
pub(crate) fn apply_change(
    conn: &Connection,
    tables: &HashMap<String, TableSchema>,
    change: &Change,
) -> Result<(), ClientError> {
    let mut shapes = Shapes::default();
    let mut applier = Applier::new(conn, tables, &mut shapes);
    applier.change(change)?;
    applier.flush()
}

/// Applies changes in order. Inserts may wait in a run until the next
/// change that is not one of them, or [`Applier::flush`]; the caller
/// flushes before it reads or writes the tables itself, and holds the
/// SQLite transaction that also stores the LSN, so a transaction is
/// applied whole or not at all.
pub(crate) struct Applier<'a> {
    conn: &'a Connection,
    tables: &'a HashMap<String, TableSchema>,
    shapes: &'a mut Shapes,
    /// A row's values by column, while it is read.
    slots: Vec<Option<Option<&'a str>>>,
    /// The columns it names.
    set: Vec<u64>,
    run: Run<'a>,
}

/// Inserts waiting: consecutive ones into one table, naming the same
/// columns.
#[derive(Default)]
struct Run<'a> {
    table: Option<&'a TableSchema>,
    set: Vec<u64>,
    /// Each row's values for those columns, row after row, converted.
    values: Vec<ToSqlOutput<'a>>,
    rows: usize,
    /// Values per row.
    width: usize,
    /// Rows inserted by one statement.
    per_statement: usize,
}

impl<'a> Applier<'a> {
    pub(crate) fn new(
        conn: &'a Connection,
        tables: &'a HashMap<String, TableSchema>,
        shapes: &'a mut Shapes,
    ) -> Applier<'a> {
        Applier {
            conn,
            tables,
            shapes,
            slots: Vec::new(),
            set: Vec::new(),
            run: Run::default(),
        }
    }

    /// Applies `change` (an insert perhaps only at the next flush).
    pub(crate) fn change(&mut self, change: &'a Change) -> Result<(), ClientError> {
        let tables = self.tables;
        let Some(table) = tables.get(&change.table) else {
            // The caller leaves out changes of tables it does not know (they
            // are fetched by a snapshot); one that gets here cannot be placed.
            return Err(ClientError::Replica(format!(
                "change for unknown table {}",
                change.table
            )));
        };
        if table.skipped.is_some() {
            return Ok(());
        }
        match change.op {
            Op::Insert => {
                let new = required(change.new.as_ref(), table, "insert")?;
                self.insert(table, new)
            }
            Op::Update => {
                self.flush()?;
                let new = required(change.new.as_ref(), table, "update")?;
                self.update(table, new, change.old.as_ref().unwrap_or(new))
            }
            Op::Delete => {
                self.flush()?;
                let old = required(change.old.as_ref(), table, "delete")?;
                self.delete(table, old)
            }
            Op::Truncate => {
                self.flush()?;
                let text = self.shapes.layout(table).text(table, Shape::Truncate, &[]);
                self.conn.prepare_cached(text)?.raw_execute()?;
                Ok(())
            }
        }
    }

    /// Runs the inserts still waiting.
    pub(crate) fn flush(&mut self) -> Result<(), ClientError> {
        let Some(table) = self.run.table else {
            return Ok(());
        };
        if self.run.rows > 0 {
            let values = std::mem::take(&mut self.run.values);
            let width = self.run.width;
            let set = std::mem::take(&mut self.run.set);
            let done = (0..self.run.rows).try_for_each(|r| {
                let row = &values[r * width..(r + 1) * width];
                self.insert_rows(table, &set, row, 1).map(|_| ())
            });
            self.run.set = set;
            self.run.values = values;
            done?;
        }
        self.run.table = None;
        self.run.values.clear();
        self.run.rows = 0;
        Ok(())
    }

    fn insert(&mut self, table: &'a TableSchema, row: &'a Row) -> Result<(), ClientError> {
        self.shapes
            .layout(table)
            .gather(table, row, &mut self.slots, &mut self.set);
        let joins = self
            .run
            .table
            .is_some_and(|t| std::ptr::eq(t, table) && self.run.set == self.set);
        if !joins {
            self.flush()?;
            self.run.table = Some(table);
            std::mem::swap(&mut self.run.set, &mut self.set);
            let width = self.slots.iter().flatten().count();
            self.run.width = width;
            self.run.per_statement = ROWS_PER_STATEMENT.min(MAX_PARAMETERS / width.max(1)).max(1);
        }
        for (column, value) in table.columns.iter().zip(&self.slots) {
            if let Some(value) = value {
                self.run.values.push(convert(table, column, *value)?);
            }
        }
        self.run.rows += 1;
        if self.run.rows == self.run.per_statement {
            let values = std::mem::take(&mut self.run.values);
            let set = std::mem::take(&mut self.run.set);
            let done = self.insert_rows(table, &set, &values, self.run.rows);
            self.run.set = set;
            self.run.values = values;
            self.run.values.clear();
            self.run.rows = 0;
            done?;
        }
        Ok(())
    }

    /// Inserts `rows` rows of the columns of `set`, their `values` one
    /// row after the other.
    fn insert_rows(
        &mut self,
        table: &TableSchema,
        set: &[u64],
        values: &[ToSqlOutput<'_>],
        rows: usize,
    ) -> Result<usize, ClientError> {
        let text = self
            .shapes
            .layout(table)
            .text(table, Shape::Insert { rows }, &[set]);
        let mut statement = self.conn.prepare_cached(text)?;
        for (i, value) in values.iter().enumerate() {
            statement.raw_bind_parameter(i + 1, value)?;
        }
        Ok(statement.raw_execute()?)
    }

    fn update(
        &mut self,
        table: &'a TableSchema,
        new: &'a Row,
        target: &'a Row,
    ) -> Result<(), ClientError> {
        self.shapes
            .layout(table)
            .gather(table, new, &mut self.slots, &mut self.set);
        let mut values = Vec::with_capacity(table.columns.len() + table.primary_key.len());
        for (column, value) in table.columns.iter().zip(&self.slots) {
            if let Some(value) = value {
                values.push(convert(table, column, *value)?);
            }
        }
        if values.is_empty() {
            return Ok(());
        }
        let assigned = values.len();
        let set = self.set.clone();
        let found_by = self.locate(table, target, &mut values)?;
        let text = self
            .shapes
            .layout(table)
            .text(table, Shape::Update, &[&set, &found_by]);
        let mut statement = self.conn.prepare_cached(text)?;
        for (i, value) in values.iter().enumerate() {
            statement.raw_bind_parameter(i + 1, value)?;
        }
        let changed = statement.raw_execute()?;
        drop(statement);
        if changed == 0 && holds_all(&set, table.columns.len()) {
            // The replica lacked the row (it cannot, when every change
            // arrived, but a full row can still be placed).
            self.insert_rows(table, &set, &values[..assigned], 1)?;
        }
        Ok(())
    }

    fn delete(&mut self, table: &'a TableSchema, old: &'a Row) -> Result<(), ClientError> {
        let mut values = Vec::with_capacity(table.primary_key.len());
        let found_by = self.locate(table, old, &mut values)?;
        let text = self
            .shapes
            .layout(table)
            .text(table, Shape::Delete, &[&found_by]);
        let mut statement = self.conn.prepare_cached(text)?;
        for (i, value) in values.iter().enumerate() {
            statement.raw_bind_parameter(i + 1, value)?;
        }
        statement.raw_execute()?;
        Ok(())
    }

    /// The values that find `row` (its key, or without a key every column
    /// it names), added to `values`; returns the columns that find it
    /// without a key (none with one).
    fn locate(
        &mut self,
        table: &'a TableSchema,
        row: &'a Row,
        values: &mut Vec<ToSqlOutput<'a>>,
    ) -> Result<Vec<u64>, ClientError> {
        if !table.primary_key.is_empty() {
            for key in &table.primary_key {
                let column = table.column(key).ok_or_else(|| {
                    ClientError::Replica(format!("{}: key column {key} unknown", table.name))
                })?;
                let value = row.get(key).ok_or_else(|| {
                    ClientError::Replica(format!("{}: change without key column {key}", table.name))
                })?;
                values.push(convert(table, column, value.as_deref())?);
            }
            return Ok(Vec::new());
        }
        self.shapes
            .layout(table)
            .gather(table, row, &mut self.slots, &mut self.set);
        for (column, value) in table.columns.iter().zip(&self.slots) {
            if let Some(value) = value {
                values.push(convert(table, column, *value)?);
            }
        }
        Ok(self.set.clone())
    }
}

fn required<'r>(
    row: Option<&'r Row>,
    table: &TableSchema,
    op: &str,
) -> Result<&'r Row, ClientError> {
    row.ok_or_else(|| ClientError::Replica(format!("{op} on {} without its row", table.name)))
}

fn convert<'v>(
    table: &TableSchema,
    column: &pgrelay_protocol::Column,
    text: Option<&'v str>,
) -> Result<ToSqlOutput<'v>, ClientError> {
    to_sqlite_ref(column.kind, text)
        .map_err(|e| ClientError::Replica(format!("{}.{}: {e}", table.name, column.name)))
}

#[cfg(test)]
mod tests;
