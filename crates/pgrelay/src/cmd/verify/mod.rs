//! `pgrelay verify`: per table, the row count and an order-independent
//! checksum of the rows in PostgreSQL and in a replica, over one canonical
//! encoding of values (`pgrelay_protocol::canonical`); for a table that
//! differs, the key ranges (and rows) that differ (`ranges.rs`).

mod ranges;

pub use ranges::{locate, DifferingRange, RowDifference};

use std::path::{Path, PathBuf};

use anyhow::Context;
use futures_util::{pin_mut, TryStreamExt};
use pgrelay_client::value::pg_text_from_sqlite;
use pgrelay_protocol::canonical::{canonical_pg_text, TableDigest};
use pgrelay_protocol::{quote_ident, quote_table, TableSchema};

#[derive(Clone, Debug)]
pub struct TableCheck {
    pub table: String,
    pub pg_rows: u64,
    pub pg_checksum: String,
    pub replica_rows: u64,
    pub replica_checksum: String,
    /// Filled by [`explain`] for a table that differs.
    pub ranges: Vec<DifferingRange>,
}

impl TableCheck {
    pub fn matches(&self) -> bool {
        self.pg_rows == self.replica_rows && self.pg_checksum == self.replica_checksum
    }
}

#[derive(Clone, Debug)]
pub struct VerifyReport {
    pub tables: Vec<TableCheck>,
}

impl VerifyReport {
    pub fn all_match(&self) -> bool {
        self.tables.iter().all(TableCheck::matches)
    }

    pub fn render_table(&self) -> String {
        let width = self
            .tables
            .iter()
            .map(|t| t.table.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let mut out = format!(
            "{:<width$}  {:>10}  {:>12}  {:<16}  {:<16}  status\n",
            "table", "pg rows", "replica rows", "pg checksum", "replica checksum"
        );
        for t in &self.tables {
            out.push_str(&format!(
                "{:<width$}  {:>10}  {:>12}  {:<16}  {:<16}  {}\n",
                t.table,
                t.pg_rows,
                t.replica_rows,
                &t.pg_checksum[..16.min(t.pg_checksum.len())],
                &t.replica_checksum[..16.min(t.replica_checksum.len())],
                if t.matches() { "OK" } else { "MISMATCH" }
            ));
            for range in &t.ranges {
                out.push_str(&range.describe());
            }
        }
        out
    }
}

fn qualified(name: &str) -> String {
    if name.contains('.') {
        name.to_owned()
    } else {
        format!("public.{name}")
    }
}

/// Compares the replica at `replica` with PostgreSQL. `tables`: `None` for
/// every synced table the replica records; a listed table the replica lacks
/// is reported as a mismatch.
pub async fn verify(
    database_url: &str,
    replica: &Path,
    tables: Option<&[String]>,
) -> anyhow::Result<VerifyReport> {
    if !replica.exists() {
        anyhow::bail!("no replica at {}", replica.display());
    }
    let path = replica.to_owned();
    let schemas = tokio::task::spawn_blocking(move || read_schemas(&path)).await??;
    let wanted: Vec<String> = match tables {
        Some(list) => list.iter().map(|t| qualified(t)).collect(),
        None => schemas
            .iter()
            .filter(|s| s.skipped.is_none())
            .map(|s| s.name.clone())
            .collect(),
    };
    let info = pgrelay_pg::ConnInfo::parse(database_url)?;
    let db = pgrelay_pg::connect(&info).await?;
    let mut checks = Vec::with_capacity(wanted.len());
    for name in wanted {
        let Some(schema) = schemas
            .iter()
            .find(|s| s.name == name && s.skipped.is_none())
            .cloned()
        else {
            let pg = pg_digest_unknown(&db, &name).await?;
            checks.push(TableCheck {
                table: name,
                pg_rows: pg.rows,
                pg_checksum: pg.checksum_hex(),
                replica_rows: 0,
                replica_checksum: "(not in replica)".to_owned(),
                ranges: Vec::new(),
            });
            continue;
        };
        let pg = pg_digest(&db, &schema).await?;
        let path: PathBuf = replica.to_owned();
        let for_replica = schema.clone();
        let local =
            tokio::task::spawn_blocking(move || replica_digest(&path, &for_replica)).await??;
        checks.push(TableCheck {
            table: name,
            pg_rows: pg.rows,
            pg_checksum: pg.checksum_hex(),
            replica_rows: local.rows,
            replica_checksum: local.checksum_hex(),
            ranges: Vec::new(),
        });
    }
    Ok(VerifyReport { tables: checks })
}

/// Names the differing key ranges (with `rows`, the differing rows) of
/// every table of `report` that does not match.
pub async fn explain(
    database_url: &str,
    replica: &Path,
    report: &mut VerifyReport,
    rows: bool,
) -> anyhow::Result<()> {
    let path = replica.to_owned();
    let schemas = tokio::task::spawn_blocking(move || read_schemas(&path)).await??;
    let info = pgrelay_pg::ConnInfo::parse(database_url)?;
    let db = pgrelay_pg::connect(&info).await?;
    for check in report.tables.iter_mut().filter(|t| !t.matches()) {
        let Some(schema) = schemas
            .iter()
            .find(|s| s.name == check.table && s.skipped.is_none())
        else {
            continue;
        };
        check.ranges = locate(&db, replica, schema, rows).await?;
    }
    Ok(())
}

fn read_schemas(path: &Path) -> anyhow::Result<Vec<TableSchema>> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut stmt = conn
        .prepare("SELECT schema FROM _pgrelay_tables ORDER BY name")
        .context("reading _pgrelay_tables")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for json in rows {
        out.push(serde_json::from_str(&json?)?);
    }
    Ok(out)
}

async fn pg_digest(
    db: &tokio_postgres::Client,
    schema: &TableSchema,
) -> anyhow::Result<TableDigest> {
    // format('%s') applies the type's output function, as the replication
    // stream does; a ::text cast would differ (char(n) loses its padding).
    let columns = schema
        .columns
        .iter()
        .map(|c| {
            let col = quote_ident(&c.name);
            format!("CASE WHEN {col} IS NULL THEN NULL ELSE format('%s', {col}) END")
        })
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!("SELECT {columns} FROM {}", quote_table(&schema.name));
    let rows = db
        .query_raw(&sql, std::iter::empty::<&str>())
        .await
        .with_context(|| format!("reading {}", schema.name))?;
    pin_mut!(rows);
    let mut digest = TableDigest::default();
    let mut values = Vec::with_capacity(schema.columns.len());
    while let Some(row) = rows.try_next().await? {
        values.clear();
        for (i, column) in schema.columns.iter().enumerate() {
            values.push(canonical_pg_text(
                column.kind,
                row.get::<_, Option<&str>>(i),
            ));
        }
        digest.add_row(&values);
    }
    Ok(digest)
}

/// For a table the replica does not have: still count PostgreSQL's rows.
async fn pg_digest_unknown(db: &tokio_postgres::Client, name: &str) -> anyhow::Result<TableDigest> {
    let count: i64 = db
        .query_one(&format!("SELECT count(*) FROM {}", quote_table(name)), &[])
        .await
        .with_context(|| format!("counting {name}"))?
        .get(0);
    let mut digest = TableDigest::default();
    for _ in 0..count {
        digest.add_row(&[]);
    }
    Ok(digest)
}

fn replica_digest(path: &Path, schema: &TableSchema) -> anyhow::Result<TableDigest> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let columns = schema
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {columns} FROM {}",
            quote_ident(schema.sqlite_name())
        ))
        .with_context(|| format!("reading {} from the replica", schema.name))?;
    let mut rows = stmt.query([])?;
    let mut digest = TableDigest::default();
    let mut values = Vec::with_capacity(schema.columns.len());
    while let Some(row) = rows.next()? {
        values.clear();
        for (i, column) in schema.columns.iter().enumerate() {
            let text = pg_text_from_sqlite(column.kind, row.get_ref(i)?);
            values.push(canonical_pg_text(column.kind, text.as_deref()));
        }
        digest.add_row(&values);
    }
    Ok(digest)
}
