//! Consistent table snapshots for hydrating replicas: a REPEATABLE READ
//! transaction on its own connection, what it sees (`pg_current_snapshot`),
//! and each table's rows as PostgreSQL's COPY text, read in order and
//! compressed into chunks. A bounded number run at once; others queue.

use futures_util::StreamExt;
use pgrelay_pg::ConnInfo;
use pgrelay_protocol::{Checksum, Lsn, TableDigest, TableSchema, Visibility};
use tokio_postgres::types::PgLsn;
use tokio_postgres::Client;

use crate::auth::{Scope, SNAPSHOT_SETTINGS_SQL};
use crate::writes::statement::{quote as quote_ident, quote_table as qualified};
mod error;
mod give_way;
mod unseen;
pub use error::SnapshotError;
pub(crate) use give_way::{GiveWay, Hydrating};

/// Uncompressed COPY bytes per chunk frame. Whole rows only, so a chunk
/// can be applied on its own.
pub(crate) const CHUNK_BYTES: usize = 256 * 1024;

/// A snapshot's transaction.
const BEGIN: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";

/// Synchronized scans are off in a snapshot's transaction: with
/// them on, PostgreSQL starts a sequential scan of a large table where a
/// concurrent one is (the digest keeper's, another client's hydration)
/// and wraps around, so rows that sit in key order on disk would reach
/// the replica in two runs, and every row of the second run would be
/// inserted in the middle of its B-tree instead of appended (measured:
/// 7 % of the client's CPU in SQLite's page splits).
const IN_ORDER: &str = "SET LOCAL synchronize_seqscans = off";

/// zstd level: fast enough to keep up with PostgreSQL's COPY on one core,
/// and shrinks typical rows three- to fivefold.
const ZSTD_LEVEL: i32 = 1;

/// An open snapshot: the transaction stays open until this is dropped, so
/// a table can be read again (a re-fetch) from the same snapshot.
pub(crate) struct Snapshot {
    client: Client,
    pub(crate) visibility: Visibility,
}

impl Snapshot {
    pub(crate) async fn open(info: &ConnInfo) -> Result<Snapshot, SnapshotError> {
        let client = pgrelay_pg::connect(info).await?;
        client
            .batch_execute(&format!("{BEGIN}; {IN_ORDER}"))
            .await
            .map_err(SnapshotError::sql("starting a snapshot"))?;
        // The first statement fixes the transaction's snapshot; the WAL
        // position is read after it, so every transaction it sees committed
        // below that position.
        let row = client
            .query_one(
                "SELECT pg_current_snapshot()::text, pg_current_wal_lsn()",
                &[],
            )
            .await
            .map_err(SnapshotError::sql("reading the snapshot's visibility"))?;
        let text: String = row.get(0);
        let until = Lsn(u64::from(row.get::<_, PgLsn>(1)));
        let visibility = Visibility::parse(&text, until)
            .ok_or_else(|| SnapshotError::Visibility(text.clone()))?;
        Ok(Snapshot { client, visibility })
    }

    /// Exports the snapshot, for [`Snapshot::join`].
    pub(crate) async fn export(&self) -> Result<String, SnapshotError> {
        let row = self
            .client
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .map_err(SnapshotError::sql("exporting a snapshot"))?;
        Ok(row.get(0))
    }

    /// Another connection into an exported snapshot: it reads exactly the
    /// rows the exporting one does, while that one's transaction is open.
    pub(crate) async fn join(
        info: &ConnInfo,
        exported: &str,
        visibility: Visibility,
    ) -> Result<Snapshot, SnapshotError> {
        let client = pgrelay_pg::connect(info).await?;
        client
            .batch_execute(&format!(
                "{BEGIN}; SET TRANSACTION SNAPSHOT '{}'; {IN_ORDER}",
                exported.replace('\'', "''")
            ))
            .await
            .map_err(SnapshotError::sql("joining a snapshot"))?;
        Ok(Snapshot { client, visibility })
    }

    /// The snapshot's connection, inside its transaction.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// PostgreSQL's estimate of a table's rows, for progress reports.
    pub(crate) async fn estimate(&self, table: &TableSchema) -> u64 {
        let row = self
            .client
            .query_opt(
                "SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = to_regclass($1)",
                &[&qualified(&table.name)],
            )
            .await;
        match row {
            Ok(Some(row)) => u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
            _ => 0,
        }
    }

    /// Starts reading a table's rows as COPY text; with a scope, only the
    /// rows its read rule allows.
    pub(crate) async fn read_table(
        &self,
        table: &TableSchema,
        scope: Option<&Scope>,
    ) -> Result<TableReader, SnapshotError> {
        let stream = self.copy_rows(table, scope, None).await?;
        Ok(TableReader {
            table: table.name.clone(),
            stream: Box::pin(stream),
            checksum: Checksum::new(),
            rows: 0,
            bytes: 0,
            buffer: Vec::with_capacity(CHUNK_BYTES + 64 * 1024),
            done: false,
        })
    }

    /// A table's rows (every column, in column order) as COPY text: with a
    /// scope only the rows its read rule allows, with `condition` (SQL over
    /// the table's columns) only those it holds for.
    pub(crate) async fn copy_rows(
        &self,
        table: &TableSchema,
        scope: Option<&Scope>,
        condition: Option<&str>,
    ) -> Result<tokio_postgres::CopyOutStream, SnapshotError> {
        let columns = table
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let mut sql = format!(
            "COPY (SELECT {columns} FROM ONLY {} WHERE true",
            qualified(&table.name)
        );
        if let Some((predicate, values)) = scope.and_then(|s| s.snapshot_filter(&table.name)) {
            // COPY takes no parameters: the rule's values are bound into
            // transaction-local settings, which the predicate reads.
            self.client
                .query_one(SNAPSHOT_SETTINGS_SQL, &[&values])
                .await
                .map_err(SnapshotError::sql(format!(
                    "binding the read rule of {}",
                    table.name
                )))?;
            sql.push_str(" AND (");
            sql.push_str(&predicate);
            sql.push(')');
        }
        if let Some(condition) = condition {
            sql.push_str(" AND (");
            sql.push_str(condition);
            sql.push(')');
        }
        sql.push_str(") TO STDOUT");
        self.client
            .copy_out(sql.as_str())
            .await
            .map_err(SnapshotError::sql(format!(
                "reading a snapshot of {}",
                table.name
            )))
    }
}

/// One table's COPY output, cut into compressed chunks of whole rows.
pub(crate) struct TableReader {
    table: String,
    stream: std::pin::Pin<Box<tokio_postgres::CopyOutStream>>,
    checksum: Checksum,
    rows: u64,
    bytes: u64,
    buffer: Vec<u8>,
    done: bool,
}

impl TableReader {
    /// The next compressed chunk; `None` once the table is done.
    pub(crate) async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, SnapshotError> {
        while !self.done && self.buffer.len() < CHUNK_BYTES {
            match self.stream.next().await {
                // PostgreSQL sends one row per CopyData message.
                Some(data) => self
                    .buffer
                    .extend_from_slice(&data.map_err(SnapshotError::sql(format!(
                        "reading a snapshot of {}",
                        self.table
                    )))?),
                None => self.done = true,
            }
        }
        if self.buffer.is_empty() {
            return Ok(None);
        }
        self.rows += count_rows(&self.buffer);
        self.bytes += self.buffer.len() as u64;
        self.checksum.update(&self.buffer);
        let chunk = compress(&self.buffer)?;
        self.buffer.clear();
        Ok(Some(chunk))
    }

    /// What the client must have received; call after the last chunk.
    pub(crate) fn digest(&self) -> TableDigest {
        TableDigest {
            table: self.table.clone(),
            rows: self.rows,
            bytes: self.bytes,
            checksum: self.checksum.hex(),
        }
    }
}

/// COPY text ends every row with a newline and escapes newlines in values.
fn count_rows(copy_text: &[u8]) -> u64 {
    copy_text.iter().filter(|b| **b == b'\n').count() as u64
}

fn compress(raw: &[u8]) -> Result<Vec<u8>, SnapshotError> {
    zstd::bulk::compress(raw, ZSTD_LEVEL).map_err(SnapshotError::Compress)
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_rows_by_newlines() {
        assert_eq!(super::count_rows(b"1\ta\\nb\n2\t\\N\n"), 2);
    }
}
