//! Keys the replica's thread writes while applying the server's
//! transactions, recorded one per digest bucket instead of one per row by
//! the triggers (which stay quiet meanwhile): a 1,000-row transaction of
//! neighbouring keys marks a handful of buckets.

use std::collections::{BTreeMap, HashMap, HashSet};

use pgrelay_protocol::repair::{key_kinds, Key, KeyKind, KeyValue};
use pgrelay_protocol::{Change, Op, TableSchema};
use rusqlite::types::Value;
use rusqlite::Connection;

use super::{forget, stored, touched_table, DIGESTS_SQL};
use crate::ClientError;

/// Makes the digests' own tables, once when the replica opens (not on
/// every apply: parsing the DDL was a few percent of a small
/// transaction's apply).
pub(crate) fn ensure_tables(conn: &Connection) -> Result<(), ClientError> {
    conn.execute_batch(DIGESTS_SQL)?;
    Ok(())
}

/// Turns the triggers off (`true`) or on, inside the caller's
/// transaction: the replica's thread applying the server's transactions
/// records what it writes with [`Written`] instead.
pub(crate) fn quiet(conn: &Connection, on: bool) -> Result<(), ClientError> {
    conn.prepare_cached("UPDATE _pgrelay_digest_quiet SET quiet = ?1 WHERE id = 1")?
        .execute([i64::from(on)])?;
    Ok(())
}

/// Bucket lower bounds of tables with kept digests, held by the replica's
/// thread between applies (only it changes the digests; it clears this
/// whenever it may have).
#[derive(Default)]
pub(crate) struct Held {
    lows: HashMap<String, Option<Vec<Option<Key>>>>,
}

impl Held {
    pub(crate) fn clear(&mut self) {
        self.lows.clear();
    }

    fn lows(
        &mut self,
        conn: &Connection,
        table: &TableSchema,
    ) -> Result<Option<&Vec<Option<Key>>>, ClientError> {
        if !self.lows.contains_key(&table.name) {
            let lows = stored(conn, table)?.map(|b| b.into_iter().map(|b| b.lo).collect());
            self.lows.insert(table.name.clone(), lows);
        }
        Ok(self.lows.get(&table.name).and_then(Option::as_ref))
    }
}

/// Keys of the rows written while the triggers were quiet, per table:
/// the first written in each digest bucket, marked as the changes are
/// applied (a 1,000-row transaction keeps a handful of keys, not 1,000).
#[derive(Default)]
pub(crate) struct Written {
    tables: HashMap<String, Marks>,
    /// Tables truncated, or a change of which named no key: their digests
    /// are dropped.
    lost: HashSet<String>,
}

/// A table's key kinds (none: no comparable key, nothing is kept) and
/// its marked buckets, each with the first key written in it.
struct Marks {
    kinds: Option<Vec<KeyKind>>,
    buckets: BTreeMap<usize, Key>,
}

impl Written {
    /// Marks the buckets of the keys `change` wrote (old and new), by the
    /// bucket bounds `held` keeps (read once per table).
    pub(crate) fn add(
        &mut self,
        conn: &Connection,
        held: &mut Held,
        table: &TableSchema,
        change: &Change,
    ) -> Result<(), ClientError> {
        if !self.tables.contains_key(&table.name) {
            let marks = Marks {
                kinds: key_kinds(table),
                buckets: BTreeMap::new(),
            };
            self.tables.insert(table.name.clone(), marks);
        }
        let Some(marks) = self.tables.get_mut(&table.name) else {
            return Ok(());
        };
        let Some(kinds) = &marks.kinds else {
            return Ok(());
        };
        if self.lost.contains(&table.name) {
            // Its digests go whole.
            return Ok(());
        }
        if change.op == Op::Truncate {
            // Every row went: digested again from scratch.
            self.lost.insert(table.name.clone());
            return Ok(());
        }
        for row in [change.old.as_ref(), change.new.as_ref()]
            .into_iter()
            .flatten()
        {
            let key: Option<Key> = table
                .primary_key
                .iter()
                .zip(kinds)
                .map(|(k, &kind)| KeyValue::from_canonical(kind, row.get(k)?.as_deref()))
                .collect();
            let Some(key) = key else {
                self.lost.insert(table.name.clone());
                return Ok(());
            };
            let Some(lows) = held.lows(conn, table)? else {
                // No digests kept: nothing to mark.
                return Ok(());
            };
            // One key per bucket: any key in a bucket marks it.
            let at = lows.partition_point(|lo| lo.as_ref().is_none_or(|lo| lo <= &key));
            marks.buckets.entry(at.saturating_sub(1)).or_insert(key);
        }
        Ok(())
    }

    /// Records the marked keys among the touched keys.
    pub(crate) fn record(
        self,
        conn: &Connection,
        tables: &HashMap<String, TableSchema>,
        held: &mut Held,
    ) -> Result<(), ClientError> {
        for (name, marks) in self.tables {
            let Some(table) = tables.get(&name) else {
                continue;
            };
            if marks.buckets.is_empty() || self.lost.contains(&name) {
                continue;
            }
            let places = vec!["?"; table.primary_key.len()].join(", ");
            let mut stmt = conn.prepare_cached(&format!(
                "INSERT OR IGNORE INTO {} VALUES ({places})",
                touched_table(table)
            ))?;
            for key in marks.buckets.values() {
                stmt.execute(rusqlite::params_from_iter(key.iter().map(|v| match v {
                    KeyValue::Int(i) => Value::Integer(*i),
                    KeyValue::Text(t) => Value::Text(t.clone()),
                })))?;
            }
        }
        for name in self.lost {
            if let Some(table) = tables.get(&name) {
                forget(conn, table)?;
                held.lows.remove(&name);
            }
        }
        Ok(())
    }
}
