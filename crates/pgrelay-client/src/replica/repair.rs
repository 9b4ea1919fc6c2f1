//! Repair on the replica's side: digests of key ranges of a table, cut at
//! the replica's own keys; removal of the ranges the server
//! replaces and insertion of its rows; and, at the end, the position and
//! visibility hand-over of a full snapshot, with unsent local writes put
//! back on top (see `pgrelay_protocol::repair`).

use std::collections::HashMap;

use pgrelay_protocol::canonical::canonical_pg_text;
use pgrelay_protocol::copy_text::Rows;
use pgrelay_protocol::repair::{
    cut_range, key_kinds, row_hash, CheckSpan, Cutter, Key, KeyKind, KeyValue, RangeSum, RowHasher,
    FIRST_PART_ROWS, MAX_FIRST_PARTS,
};
use pgrelay_protocol::{quote_ident as quote, Lsn, TableSchema, Visibility};
use rusqlite::types::Value;
use rusqlite::Connection;

use super::snapshot;
use crate::value::pg_text_from_sqlite;
use crate::ClientError;

/// A row's key and canonical values.
pub type KeyedRow = (Key, Vec<Option<String>>);

/// A range of keys to digest: bounds, and the replica's row count in it
/// when known (from the previous round).
pub type Range = (Option<Key>, Option<Key>, Option<u64>);

fn table<'a>(
    tables: &'a HashMap<String, TableSchema>,
    name: &str,
) -> Result<&'a TableSchema, ClientError> {
    tables
        .get(name)
        .filter(|t| t.skipped.is_none())
        .ok_or_else(|| {
            ClientError::Replica(format!(
                "repair of a table the replica does not hold: {name}"
            ))
        })
}

/// `WHERE` SQL and its parameters for the rows of `lo..hi`.
pub(super) fn condition(
    table: &TableSchema,
    lo: &Option<Key>,
    hi: &Option<Key>,
) -> (String, Vec<Value>) {
    let columns = table
        .primary_key
        .iter()
        .map(|c| quote(c))
        .collect::<Vec<_>>()
        .join(", ");
    let mut sql = vec!["1".to_owned()];
    let mut params = Vec::new();
    for (key, op) in [(lo, ">="), (hi, "<")] {
        if let Some(key) = key {
            let marks = vec!["?"; key.len()].join(", ");
            sql.push(format!("({columns}) {op} ({marks})"));
            params.extend(key.iter().map(|v| match v {
                KeyValue::Int(i) => Value::Integer(*i),
                KeyValue::Text(t) => Value::Text(t.clone()),
            }));
        }
    }
    (sql.join(" AND "), params)
}

/// The replica's row count in `lo..hi`.
pub(super) fn count(
    conn: &Connection,
    table: &TableSchema,
    lo: &Option<Key>,
    hi: &Option<Key>,
) -> Result<u64, ClientError> {
    let (condition, params) = condition(table, lo, hi);
    let count: i64 = conn
        .prepare_cached(&format!(
            "SELECT count(*) FROM {} WHERE {condition}",
            quote(table.sqlite_name())
        ))?
        .query_row(rusqlite::params_from_iter(params), |r| r.get(0))?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// Reads the rows of `lo..hi` in key order (at most `limit`), calling
/// `row` with each key and hash.
pub(super) fn scan(
    conn: &Connection,
    table: &TableSchema,
    kinds: Option<&[KeyKind]>,
    lo: &Option<Key>,
    hi: &Option<Key>,
    limit: Option<u64>,
    mut row: impl FnMut(Key, u128, &[Option<String>]),
) -> Result<(), ClientError> {
    let columns = table
        .columns
        .iter()
        .map(|c| quote(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let (condition, params) = condition(table, lo, hi);
    let order = match kinds {
        Some(_) => format!(
            " ORDER BY {}",
            table
                .primary_key
                .iter()
                .map(|c| quote(c))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => String::new(),
    };
    let key_at: Vec<usize> = table
        .primary_key
        .iter()
        .filter_map(|k| table.columns.iter().position(|c| &c.name == k))
        .collect();
    let limit = limit.map_or(String::new(), |n| format!(" LIMIT {n}"));
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {columns} FROM {} WHERE {condition}{order}{limit}",
        quote(table.sqlite_name())
    ))?;
    let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
    let mut values = Vec::with_capacity(table.columns.len());
    while let Some(r) = rows.next()? {
        values.clear();
        for (i, column) in table.columns.iter().enumerate() {
            let text = pg_text_from_sqlite(column.kind, r.get_ref(i)?);
            values.push(canonical_pg_text(column.kind, text.as_deref()));
        }
        let key = match kinds {
            Some(kinds) => key_at
                .iter()
                .zip(kinds)
                .map(|(&i, &kind)| KeyValue::from_canonical(kind, values[i].as_deref()))
                .collect::<Option<Key>>()
                .ok_or_else(|| {
                    ClientError::Replica(format!("a row of {} has no valid key", table.name))
                })?,
            None => Key::new(),
        };
        row(key, row_hash(&values), &values);
    }
    Ok(())
}

/// Digests `ranges` of a table: each cut into parts (the first round,
/// over the whole key space, from the kept digests (see `digests`);
/// later ones where [`cut_range`] says: at their sub-bucket starts, else
/// by count). Runs in the caller's transaction (the
/// first round stores the digests it refreshes). Returns the spans and the sum of every
/// row in them; `None` for a table the replica does not hold (it cannot
/// hold it, or it is new and comes with the next snapshot).
pub(crate) fn digest(
    conn: &Connection,
    tables: &HashMap<String, TableSchema>,
    name: &str,
    ranges: &[Range],
) -> Result<Option<(Vec<CheckSpan>, RangeSum)>, ClientError> {
    let Some(table) = tables.get(name).filter(|t| t.skipped.is_none()) else {
        return Ok(None);
    };
    if key_kinds(table).is_none() {
        return digest_ranges(conn, table, ranges).map(Some);
    }
    if let [(None, None, None)] = ranges {
        let (span, total) = super::digests::first_round(conn, table)?;
        return Ok(Some((vec![span], total)));
    }
    // A second round: whole buckets are cut from their kept sub-sums
    // where those hold; the other ranges are read.
    let kept = super::digests::second_round(conn, table, ranges)?;
    let unread: Vec<Range> = ranges
        .iter()
        .zip(&kept)
        .filter(|(_, k)| k.is_none())
        .map(|(r, _)| r.clone())
        .collect();
    let (mut read, mut total) = digest_ranges(conn, table, &unread)?;
    read.reverse();
    let mut spans = Vec::with_capacity(ranges.len());
    for kept in kept {
        let span = match kept {
            Some((span, sum)) => {
                total.merge(sum);
                span
            }
            None => read.pop().ok_or_else(|| {
                ClientError::Replica("a repair range was not digested".to_owned())
            })?,
        };
        spans.push(span);
    }
    Ok(Some((spans, total)))
}

/// [`digest`] of a table given by its schema (`pgrelay verify` uses it on
/// a replica it opens itself).
pub fn digest_ranges(
    conn: &Connection,
    table: &TableSchema,
    ranges: &[Range],
) -> Result<(Vec<CheckSpan>, RangeSum), ClientError> {
    let kinds = key_kinds(table);
    let mut spans = Vec::with_capacity(ranges.len());
    let mut total = RangeSum::default();
    for (lo, hi, known) in ranges {
        if let (Some(_), Some(kinds)) = (known, &kinds) {
            // A later round: the range's rows are few (a bucket or less),
            // cut where `cut_range` says.
            let mut rows: Vec<(Key, u128)> = Vec::new();
            scan(conn, table, Some(kinds), lo, hi, None, |key, hash, _| {
                rows.push((key, hash));
            })?;
            let (span, sum) = cut_range(lo.clone(), hi.clone(), &rows);
            total.merge(sum);
            spans.push(span);
            continue;
        }
        let (parts, count) = match &kinds {
            None => (1, 0),
            Some(_) => {
                let count = count(conn, table, lo, hi)?;
                let parts = count.div_ceil(FIRST_PART_ROWS).clamp(1, MAX_FIRST_PARTS);
                (usize::try_from(parts).unwrap_or(1), count)
            }
        };
        let mut cutter = Cutter::new(lo.clone(), hi.clone(), count, parts);
        scan(
            conn,
            table,
            kinds.as_deref(),
            lo,
            hi,
            None,
            |key, hash, _| cutter.add(&key, hash),
        )?;
        let (span, sum) = cutter.finish(kinds.is_none());
        total.merge(sum);
        spans.push(span);
    }
    Ok((spans, total))
}

/// The rows of `lo..hi` in key order, as canonical values with their keys.
pub fn rows_in_range(
    conn: &Connection,
    table: &TableSchema,
    lo: &Option<Key>,
    hi: &Option<Key>,
) -> Result<Vec<KeyedRow>, ClientError> {
    let kinds = key_kinds(table);
    let mut out = Vec::new();
    scan(
        conn,
        table,
        kinds.as_deref(),
        lo,
        hi,
        None,
        |key, _, values| out.push((key, values.to_vec())),
    )?;
    Ok(out)
}

/// Removes the rows of `ranges`; returns what they summed to.
pub(crate) fn remove(
    conn: &Connection,
    tables: &HashMap<String, TableSchema>,
    name: &str,
    ranges: &[(Option<Key>, Option<Key>)],
) -> Result<RangeSum, ClientError> {
    let table = table(tables, name)?;
    let kinds = key_kinds(table);
    let mut removed = RangeSum::default();
    for (lo, hi) in ranges {
        scan(conn, table, kinds.as_deref(), lo, hi, None, |_, hash, _| {
            removed.add(hash)
        })?;
        let (condition, params) = condition(table, lo, hi);
        conn.prepare_cached(&format!(
            "DELETE FROM {} WHERE {condition}",
            quote(table.sqlite_name())
        ))?
        .execute(rusqlite::params_from_iter(params))?;
    }
    Ok(removed)
}

/// Inserts the server's rows (COPY text); returns what they sum to.
pub(crate) fn load(
    conn: &Connection,
    tables: &HashMap<String, TableSchema>,
    name: &str,
    copy: &str,
) -> Result<RangeSum, ClientError> {
    let table = table(tables, name)?;
    let mut rows = Rows::default();
    rows.text_mut().extend_from_slice(copy.as_bytes());
    rows.split()
        .map_err(|message| ClientError::Replica(format!("repair rows of {name}: {message}")))?;
    snapshot::load(conn, tables, name, &rows)?;
    let mut added = RangeSum::default();
    let kinds: Vec<_> = table.columns.iter().map(|c| c.kind).collect();
    let mut hasher = RowHasher::default();
    for row in 0..rows.len() {
        added.add(hasher.hash(&kinds, rows.row(row)));
    }
    Ok(added)
}

/// The repair is complete: the replica's position becomes the snapshot's,
/// transactions the snapshot holds are skipped, unsent local writes are
/// put back, and tables whose full digest did not match are fetched again.
pub(crate) fn finish(
    conn: &Connection,
    tables: &HashMap<String, TableSchema>,
    resume: Lsn,
    names: &[String],
    visibility: &Visibility,
    refetch: &[String],
) -> Result<(), ClientError> {
    snapshot::forget_filters(conn)?;
    snapshot::finish(conn, tables, resume, true, names, visibility)?;
    if !refetch.is_empty() {
        snapshot::request_resync(conn, refetch)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
