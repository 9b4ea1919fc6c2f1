//! Range digests the replica keeps between repairs, so a repair's first
//! round reads only the rows written since they were computed instead of
//! every row.
//!
//! Per synced table with a comparable key: buckets in key order, cut at
//! the keys [`starts_bucket`] picks (about one in 128, by the key's
//! content, as the server cuts its own kept digests: a part whose bounds
//! are bounds of the server's buckets can be answered without reading
//! its rows there either), each a lower bound and the row
//! count and 128-bit sum of its rows' hashes (`_pgrelay_digests`, one JSON
//! document per table), and a list of keys written since
//! (`_pgrelay_touched_<table>`), which triggers on the table fill in the
//! same SQLite transaction as the write, whoever writes (the stream, local
//! writes, rebases, rollbacks, migrations): a crash or a rollback loses
//! both or neither. A bucket holding a touched key, or not digested yet,
//! is read again at the next repair; the others are taken as stored
//! (digests add up, so merging or cutting buckets needs no rows). Beside
//! each bucket its sub-bucket sums are kept too (`subs`), for a repair's
//! second round.
//!
//! The digests are made after the replica has caught up, a few thousand
//! rows per step while the replica's thread is idle, never during a
//! hydration: a table being hydrated loses its digests and triggers first
//! ([`forget`]), so loading it costs nothing extra. A repair's first round
//! brings them up to date and stores them. The stored columns and key
//! (a fingerprint) and the triggers' presence are checked before use; a
//! table whose columns changed, or that was dropped and made again, is
//! digested anew.

use std::collections::BTreeSet;

use pgrelay_protocol::repair::{
    key_kinds, starts_bucket, CheckSpan, Key, KeyKind, KeyValue, RangeSum, SubSums, BUCKET_MODULUS,
    MAX_FIRST_PARTS,
};
use pgrelay_protocol::{quote_ident as quote, TableSchema};
use rusqlite::{Connection, OptionalExtension};

use super::repair::scan;
use crate::ClientError;

const DIGESTS_SQL: &str = "CREATE TABLE IF NOT EXISTS _pgrelay_digests (
    name        TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    buckets     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS _pgrelay_digest_quiet (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    quiet INTEGER NOT NULL
);
INSERT OR IGNORE INTO _pgrelay_digest_quiet (id, quiet) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS _pgrelay_sub_digests (
    name TEXT NOT NULL,
    lo   TEXT NOT NULL,
    subs TEXT NOT NULL,
    PRIMARY KEY (name, lo)
) WITHOUT ROWID;";

/// The triggers' condition: not while the replica's thread applies the
/// server's transactions (it records their keys itself, one per bucket,
/// see [`Written`]).
const LOUD: &str = "WHEN (SELECT quiet FROM _pgrelay_digest_quiet WHERE id = 1) = 0";

/// Version of the stored buckets and the triggers: digests stored with
/// buckets cut another way (every 256 rows, before content-defined cuts)
/// or kept by older triggers, or without sub-bucket sums (format 4), are
/// made again, not read as if they were made this way.
const FORMAT: &str = "5";

/// A bucket: keys from `lo` (none: no lower limit) up to the next
/// bucket's `lo`; `sum` is `None` until its rows are digested. `subs`:
/// its rows summed per sub-bucket, when they were just read (stored
/// apart, see `subs`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Bucket {
    lo: Option<Key>,
    sum: Option<RangeSum>,
    subs: Option<SubSums>,
}

type Stored = Vec<(Option<Key>, Option<(u64, String)>)>;

fn encode(buckets: &[Bucket]) -> Result<String, ClientError> {
    let stored: Stored = buckets
        .iter()
        .map(|b| (b.lo.clone(), b.sum.map(|s| (s.rows, s.hex()))))
        .collect();
    serde_json::to_string(&stored).map_err(|e| ClientError::Replica(e.to_string()))
}

fn decode(text: &str) -> Option<Vec<Bucket>> {
    let stored: Stored = serde_json::from_str(text).ok()?;
    stored
        .into_iter()
        .map(|(lo, sum)| {
            let sum = match sum {
                None => None,
                Some((rows, hex)) => Some(RangeSum {
                    rows,
                    sum: u128::from_str_radix(&hex, 16).ok()?,
                }),
            };
            Some(Bucket {
                lo,
                sum,
                subs: None,
            })
        })
        .collect()
}

fn touched_table(table: &TableSchema) -> String {
    quote(&format!("_pgrelay_touched_{}", table.sqlite_name()))
}

fn trigger_name(table: &TableSchema, op: &str) -> String {
    format!("_pgrelay_digest_{}_{op}", table.sqlite_name())
}

/// What the digests depend on: the columns (names, kinds) and the key,
/// and [`FORMAT`].
fn fingerprint(table: &TableSchema) -> String {
    let columns: Vec<String> = table
        .columns
        .iter()
        .map(|c| format!("{}:{:?}:{}", c.name, c.kind, c.type_oid))
        .collect();
    format!(
        "{FORMAT}/{BUCKET_MODULUS}|{}|{}",
        columns.join(","),
        table.primary_key.join(",")
    )
}

/// Drops a table's digests, touched keys and triggers (before it is
/// emptied for a snapshot, or when its digests cannot be trusted).
pub(crate) fn forget(conn: &Connection, table: &TableSchema) -> Result<(), ClientError> {
    conn.execute_batch(DIGESTS_SQL)?;
    for op in ["insert", "update", "delete"] {
        conn.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS {}",
            quote(&trigger_name(table, op))
        ))?;
    }
    conn.execute_batch(&format!("DROP TABLE IF EXISTS {}", touched_table(table)))?;
    conn.prepare_cached("DELETE FROM _pgrelay_digests WHERE name = ?1")?
        .execute([&table.name])?;
    subs::forget(conn, table)
}

/// Starts keeping digests of a table: the touched-keys table, the
/// triggers that fill it, and one bucket not digested yet.
fn install(conn: &Connection, table: &TableSchema) -> Result<Vec<Bucket>, ClientError> {
    forget(conn, table)?;
    let keys: Vec<String> = table.primary_key.iter().map(|k| quote(k)).collect();
    let keys = keys.join(", ");
    let touched = touched_table(table);
    let name = quote(table.sqlite_name());
    let of = |row: &str| {
        table
            .primary_key
            .iter()
            .map(|k| format!("{row}.{}", quote(k)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (new, old) = (of("NEW"), of("OLD"));
    // Not `INSERT OR IGNORE`: inside a trigger, SQLite lets the statement
    // that fired it override the trigger's conflict policy (an upsert's
    // makes a key written twice fail the application's write). An upsert
    // clause is the trigger's own. Nor `INSERT ... SELECT ... WHERE NOT
    // EXISTS`: it read the touched keys whole for every row (a repair's
    // 2,336 rows took 0.3 s to delete and load back; now 0.01 s).
    let record = |row: &str| format!("INSERT INTO {touched} VALUES ({row}) ON CONFLICT DO NOTHING");
    conn.execute_batch(&format!(
        "CREATE TABLE {touched} ({keys}, PRIMARY KEY ({keys})) WITHOUT ROWID;
CREATE TRIGGER {insert} AFTER INSERT ON {name} {LOUD} BEGIN
  {record_new};
END;
CREATE TRIGGER {update} AFTER UPDATE ON {name} {LOUD} BEGIN
  {record_old};
  {record_new};
END;
CREATE TRIGGER {delete} AFTER DELETE ON {name} {LOUD} BEGIN
  {record_old};
END;",
        record_new = record(&new),
        record_old = record(&old),
        insert = quote(&trigger_name(table, "insert")),
        update = quote(&trigger_name(table, "update")),
        delete = quote(&trigger_name(table, "delete")),
    ))?;
    let buckets = vec![Bucket {
        lo: None,
        sum: None,
        subs: None,
    }];
    store(conn, table, &buckets)?;
    Ok(buckets)
}

fn store(conn: &Connection, table: &TableSchema, buckets: &[Bucket]) -> Result<(), ClientError> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO _pgrelay_digests (name, fingerprint, buckets) VALUES (?1, ?2, ?3)",
    )?
    .execute([&table.name, &fingerprint(table), &encode(buckets)?])?;
    Ok(())
}

/// The table's stored buckets, if they can be trusted: same columns and
/// key as when made, and the three triggers still in place.
fn stored(conn: &Connection, table: &TableSchema) -> Result<Option<Vec<Bucket>>, ClientError> {
    conn.execute_batch(DIGESTS_SQL)?;
    let row: Option<(String, String)> = conn
        .prepare_cached("SELECT fingerprint, buckets FROM _pgrelay_digests WHERE name = ?1")?
        .query_row([&table.name], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((print, buckets)) = row else {
        return Ok(None);
    };
    if print != fingerprint(table) {
        return Ok(None);
    }
    let triggers: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?1 \
             AND name IN (?2, ?3, ?4)",
        )?
        .query_row(
            [
                table.sqlite_name().to_owned(),
                trigger_name(table, "insert"),
                trigger_name(table, "update"),
                trigger_name(table, "delete"),
            ],
            |r| r.get(0),
        )?;
    if triggers != 3 {
        return Ok(None);
    }
    Ok(decode(&buckets).filter(|b| well_formed(b)))
}

/// The first bucket has no lower bound, every other one has one, in
/// ascending order.
fn well_formed(buckets: &[Bucket]) -> bool {
    let Some((first, rest)) = buckets.split_first() else {
        return false;
    };
    first.lo.is_none()
        && rest.iter().all(|b| b.lo.is_some())
        && rest.windows(2).all(|w| w[0].lo < w[1].lo)
}

/// Keys written since the digests were made; `None` if one does not read
/// as a key (every bucket is then read again).
fn touched(
    conn: &Connection,
    table: &TableSchema,
    kinds: &[KeyKind],
) -> Result<Option<Vec<Key>>, ClientError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT * FROM {}", touched_table(table)))?;
    let mut rows = stmt.query([])?;
    let mut keys = Vec::new();
    while let Some(row) = rows.next()? {
        let mut key = Key::with_capacity(kinds.len());
        for (i, &kind) in kinds.iter().enumerate() {
            let value = match (kind, row.get_ref(i)?) {
                (KeyKind::Integer, rusqlite::types::ValueRef::Integer(n)) => Some(KeyValue::Int(n)),
                (KeyKind::Text | KeyKind::Uuid, rusqlite::types::ValueRef::Text(t)) => {
                    std::str::from_utf8(t)
                        .ok()
                        .and_then(|t| KeyValue::from_canonical(kind, Some(t)))
                }
                _ => None,
            };
            let Some(value) = value else {
                return Ok(None);
            };
            key.push(value);
        }
        keys.push(key);
    }
    Ok(Some(keys))
}

/// Digests the rows of `lo..hi` into buckets, a new one at each key that
/// starts a bucket, the first at `lo`. Also says whether `lo` still
/// starts a bucket here: no lower bound, or a key the rows hold and that
/// [`starts_bucket`] picks (when not, the first bucket belongs with the
/// one before, as a fresh cut of the rows would have it).
fn cut(
    conn: &Connection,
    table: &TableSchema,
    kinds: &[KeyKind],
    lo: &Option<Key>,
    hi: &Option<Key>,
) -> Result<(Vec<Bucket>, bool), ClientError> {
    let mut buckets = vec![Bucket {
        lo: lo.clone(),
        sum: Some(RangeSum::default()),
        subs: Some(SubSums::default()),
    }];
    let mut lo_holds = lo.is_none();
    let mut first = true;
    scan(conn, table, Some(kinds), lo, hi, None, |key, hash, _| {
        if first {
            first = false;
            lo_holds |= lo.as_ref() == Some(&key) && starts_bucket(&key);
        }
        open_bucket_at(&mut buckets, &key);
        add_to_last(&mut buckets, &key, hash);
    })?;
    Ok((buckets, lo_holds))
}

/// Opens a new bucket at `key` (the next row in key order) if it starts
/// one and the last bucket does not already start at it.
fn open_bucket_at(buckets: &mut Vec<Bucket>, key: &Key) {
    if starts_bucket(key) && buckets.last().and_then(|b| b.lo.as_ref()) != Some(key) {
        buckets.push(Bucket {
            lo: Some(key.clone()),
            sum: Some(RangeSum::default()),
            subs: Some(SubSums::default()),
        });
    }
}

/// Adds the next row in key order to the last bucket and its sub-sums.
fn add_to_last(buckets: &mut [Bucket], key: &Key, hash: u128) {
    if let Some(last) = buckets.last_mut() {
        if let Some(sum) = last.sum.as_mut() {
            sum.add(hash);
        }
        if let Some(subs) = last.subs.as_mut() {
            subs.add(key, hash);
        }
    }
}

/// The bounds of bucket `i`.
fn range(buckets: &[Bucket], i: usize) -> (Option<Key>, Option<Key>) {
    (
        buckets[i].lo.clone(),
        buckets.get(i + 1).and_then(|b| b.lo.clone()),
    )
}

/// A repair's first round over a table with a comparable key: one span
/// over the whole key space, its parts the stored buckets, with those
/// touched since (or never digested) read again; the refreshed buckets
/// are stored and the touched keys cleared. Runs in the caller's
/// transaction.
pub(crate) fn first_round(
    conn: &Connection,
    table: &TableSchema,
) -> Result<(CheckSpan, RangeSum), ClientError> {
    let kinds = key_kinds(table)
        .ok_or_else(|| ClientError::Replica(format!("{} has no comparable key", table.name)))?;
    let mut buckets = match stored(conn, table)? {
        Some(buckets) => buckets,
        None => install(conn, table)?,
    };
    let mut dirty: BTreeSet<usize> = buckets
        .iter()
        .enumerate()
        .filter(|(_, b)| b.sum.is_none())
        .map(|(i, _)| i)
        .collect();
    match touched(conn, table, &kinds)? {
        Some(keys) => {
            for key in keys {
                let at = buckets.partition_point(|b| b.lo.as_ref().is_none_or(|lo| lo <= &key));
                dirty.insert(at.saturating_sub(1));
            }
        }
        None => dirty.extend(0..buckets.len()),
    }
    // Runs of neighbouring dirty buckets are read and cut again as one.
    let mut fresh: Vec<Bucket> = Vec::with_capacity(buckets.len());
    let mut i = 0;
    while i < buckets.len() {
        if !dirty.contains(&i) {
            fresh.push(buckets[i].clone());
            i += 1;
            continue;
        }
        let mut j = i;
        while dirty.contains(&(j + 1)) {
            j += 1;
        }
        let (lo, _) = range(&buckets, i);
        let (_, hi) = range(&buckets, j);
        let (mut made, lo_holds) = cut(conn, table, &kinds, &lo, &hi)?;
        if let (false, Some(previous)) = (lo_holds, fresh.last_mut()) {
            // `lo` no longer starts a bucket (its row went): the server,
            // cutting its rows afresh, has no bound there either.
            let first = made.remove(0);
            if let (Some(sum), Some(more)) = (previous.sum.as_mut(), first.sum) {
                sum.merge(more);
            }
            // Its kept sub-sums no longer add up: not used.
            previous.subs = None;
        }
        fresh.extend(made);
        i = j + 1;
    }
    buckets = fresh;
    store(conn, table, &buckets)?;
    subs::put(conn, table, &buckets)?;
    conn.execute_batch(&format!("DELETE FROM {}", touched_table(table)))?;
    Ok(span(&buckets))
}

/// The check span of digested buckets, neighbours merged so that there
/// are at most [`MAX_FIRST_PARTS`] parts; and the sum of every row.
fn span(buckets: &[Bucket]) -> (CheckSpan, RangeSum) {
    let max_parts = usize::try_from(MAX_FIRST_PARTS).unwrap_or(usize::MAX);
    let per_part = buckets.len().div_ceil(max_parts).max(1);
    let mut span = CheckSpan {
        lo: None,
        hi: None,
        bounds: Vec::new(),
        rows: Vec::new(),
        digests: String::new(),
        whole: false,
    };
    let mut total = RangeSum::default();
    for (n, group) in buckets.chunks(per_part).enumerate() {
        let mut sum = RangeSum::default();
        for bucket in group {
            sum.merge(bucket.sum.unwrap_or_default());
        }
        if n > 0 {
            if let Some(lo) = group[0].lo.clone() {
                span.bounds.push(lo);
            }
        }
        span.rows.push(sum.rows);
        span.digests.push_str(&format!("{:016x}", sum.short()));
        total.merge(sum);
    }
    (span, total)
}

mod build;
mod subs;
mod written;

pub(crate) use build::build_step;
pub(crate) use subs::second_round;
pub(crate) use written::{ensure_tables, quiet, Held, Written};

#[cfg(test)]
mod tests;
