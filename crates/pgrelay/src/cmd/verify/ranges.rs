//! Where a replica differs from PostgreSQL: the key ranges (and, asked
//! for, the rows) that differ, found by the same descent a repair uses
//! (`pgrelay_protocol::repair`): ranges cut at the replica's key
//! quantiles, digested on both sides, differing ones cut finer until they
//! hold a few rows.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use futures_util::{pin_mut, TryStreamExt};
use pgrelay_client::{digest_ranges, rows_in_range, KeyRange};
use pgrelay_protocol::canonical::canonical_pg_text;
use pgrelay_protocol::repair::{
    display_key, key_kinds, pg_ranges_condition, row_hash, Key, KeyKind, KeyValue, Tally,
};
use pgrelay_protocol::{quote_ident, quote_table, TableSchema};

/// Ranges reported per table, at most.
const MAX_RANGES: usize = 50;

/// Ranges per PostgreSQL query.
const RANGES_PER_QUERY: usize = 64;

/// A key range whose rows differ.
#[derive(Clone, Debug)]
pub struct DifferingRange {
    pub lo: Option<Key>,
    pub hi: Option<Key>,
    pub pg_rows: u64,
    pub replica_rows: u64,
    /// With `--rows`: each differing row, by key.
    pub rows: Vec<RowDifference>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RowDifference {
    MissingInReplica(Key),
    MissingInPostgres(Key),
    Differs(Key),
}

impl DifferingRange {
    pub fn describe(&self) -> String {
        let bound = |k: &Option<Key>, open: &str| {
            k.as_ref()
                .map(|k| format!("({})", display_key(k)))
                .unwrap_or_else(|| open.to_owned())
        };
        let mut out = format!(
            "  keys {} .. {}: {} rows in PostgreSQL, {} in the replica\n",
            bound(&self.lo, "start"),
            bound(&self.hi, "end"),
            self.pg_rows,
            self.replica_rows
        );
        for row in &self.rows {
            let (what, key) = match row {
                RowDifference::MissingInReplica(k) => ("missing in the replica", k),
                RowDifference::MissingInPostgres(k) => ("not in PostgreSQL", k),
                RowDifference::Differs(k) => ("differs", k),
            };
            out.push_str(&format!("    row ({}): {what}\n", display_key(key)));
        }
        out
    }
}

/// The differing ranges of one table (at most [`MAX_RANGES`]).
pub async fn locate(
    db: &tokio_postgres::Client,
    replica: &Path,
    schema: &TableSchema,
    with_rows: bool,
) -> anyhow::Result<Vec<DifferingRange>> {
    let kinds = key_kinds(schema);
    let mut pending: Vec<KeyRange> = vec![(None, None, None)];
    let mut found = Vec::new();
    while !pending.is_empty() && found.len() < MAX_RANGES {
        let ranges = std::mem::take(&mut pending);
        let (path, table) = (replica.to_owned(), schema.clone());
        let (spans, _) = tokio::task::spawn_blocking(move || {
            let conn = open(&path)?;
            anyhow::Ok(digest_ranges(&conn, &table, &ranges)?)
        })
        .await??;
        let mut tally = Tally::new(&spans);
        let bounds: Vec<_> = spans.iter().map(|s| (s.lo.clone(), s.hi.clone())).collect();
        for batch in bounds.chunks(RANGES_PER_QUERY) {
            for (key, values) in pg_rows(db, schema, kinds.as_deref(), batch).await? {
                let hash = row_hash(&values);
                match key {
                    Some(key) => tally.add(&key, hash),
                    None => tally.add_whole(0, hash),
                }
            }
        }
        for part in tally.diff() {
            let span = &spans[part.span as usize];
            let index = part.part as usize;
            let (lo, hi) = span.part_range(index);
            if part.replace {
                found.push(DifferingRange {
                    lo,
                    hi,
                    pg_rows: part.rows,
                    replica_rows: span.rows[index],
                    rows: Vec::new(),
                });
            } else {
                pending.push((lo, hi, Some(span.rows[index])));
            }
        }
    }
    found.truncate(MAX_RANGES);
    if with_rows && kinds.is_some() {
        for range in &mut found {
            range.rows = row_differences(db, replica, schema, kinds.as_deref(), range).await?;
        }
    }
    Ok(found)
}

async fn row_differences(
    db: &tokio_postgres::Client,
    replica: &Path,
    schema: &TableSchema,
    kinds: Option<&[KeyKind]>,
    range: &DifferingRange,
) -> anyhow::Result<Vec<RowDifference>> {
    let bounds = [(range.lo.clone(), range.hi.clone())];
    let pg: BTreeMap<Key, Vec<Option<String>>> = pg_rows(db, schema, kinds, &bounds)
        .await?
        .into_iter()
        .filter_map(|(k, v)| Some((k?, v)))
        .collect();
    let (path, table, lo, hi) = (
        replica.to_owned(),
        schema.clone(),
        range.lo.clone(),
        range.hi.clone(),
    );
    let local: BTreeMap<Key, Vec<Option<String>>> = tokio::task::spawn_blocking(move || {
        let conn = open(&path)?;
        anyhow::Ok(rows_in_range(&conn, &table, &lo, &hi)?)
    })
    .await??
    .into_iter()
    .collect();
    let mut out = Vec::new();
    for (key, values) in &pg {
        match local.get(key) {
            None => out.push(RowDifference::MissingInReplica(key.clone())),
            Some(v) if v != values => out.push(RowDifference::Differs(key.clone())),
            Some(_) => {}
        }
    }
    for key in local.keys().filter(|k| !pg.contains_key(*k)) {
        out.push(RowDifference::MissingInPostgres(key.clone()));
    }
    Ok(out)
}

fn open(path: &Path) -> anyhow::Result<rusqlite::Connection> {
    Ok(rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?)
}

/// PostgreSQL's rows in `ranges`, as canonical values with their keys
/// (`None` keys for a table compared whole).
async fn pg_rows(
    db: &tokio_postgres::Client,
    schema: &TableSchema,
    kinds: Option<&[KeyKind]>,
    ranges: &[(Option<Key>, Option<Key>)],
) -> anyhow::Result<Vec<(Option<Key>, Vec<Option<String>>)>> {
    // format('%s') applies the type's output function, as the stream does.
    let columns = schema
        .columns
        .iter()
        .map(|c| {
            let col = quote_ident(&c.name);
            format!("CASE WHEN {col} IS NULL THEN NULL ELSE format('%s', {col}) END")
        })
        .collect::<Vec<_>>()
        .join(", ");
    let condition = kinds
        .map(|kinds| pg_ranges_condition(schema, kinds, ranges))
        .unwrap_or_else(|| "true".to_owned());
    let sql = format!(
        "SELECT {columns} FROM {} WHERE {condition}",
        quote_table(&schema.name)
    );
    let key_at: Vec<usize> = schema
        .primary_key
        .iter()
        .filter_map(|k| schema.columns.iter().position(|c| &c.name == k))
        .collect();
    let rows = db
        .query_raw(&sql, std::iter::empty::<&str>())
        .await
        .with_context(|| format!("reading {}", schema.name))?;
    pin_mut!(rows);
    let mut out = Vec::new();
    while let Some(row) = rows.try_next().await? {
        let values: Vec<Option<String>> = schema
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| canonical_pg_text(c.kind, row.get::<_, Option<&str>>(i)))
            .collect();
        let key = kinds.and_then(|kinds| {
            key_at
                .iter()
                .zip(kinds)
                .map(|(&i, &kind)| KeyValue::from_canonical(kind, values[i].as_deref()))
                .collect::<Option<Key>>()
        });
        out.push((key, values));
    }
    Ok(out)
}
