//! Keys the replica's thread writes while applying the server's
//! transactions, recorded one per digest bucket instead of one per row by
//! the triggers (which stay quiet meanwhile): a 1,000-row transaction of
//! neighbouring keys marks a handful of buckets.

use std::collections::{BTreeMap, HashMap, HashSet};

use pgrelay_protocol::repair::{key_kinds, Key, KeyValue};
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

/// Keys of the rows written while the triggers were quiet, per table.
#[derive(Default)]
pub(crate) struct Written {
    keys: HashMap<String, Vec<Key>>,
    /// Tables truncated, or a change of which named no key: their digests
    /// are dropped.
    lost: HashSet<String>,
}

impl Written {
    /// The keys `change` wrote (old and new).
    pub(crate) fn add(&mut self, table: &TableSchema, change: &Change) {
        let Some(kinds) = key_kinds(table) else {
            return;
        };
        if change.op == Op::Truncate {
            // Every row went: digested again from scratch.
            self.lost.insert(table.name.clone());
            return;
        }
        for row in [change.old.as_ref(), change.new.as_ref()]
            .into_iter()
            .flatten()
        {
            let key: Option<Key> = table
                .primary_key
                .iter()
                .zip(&kinds)
                .map(|(k, &kind)| KeyValue::from_canonical(kind, row.get(k)?.as_deref()))
                .collect();
            match key {
                Some(key) => self.keys.entry(table.name.clone()).or_default().push(key),
                None => {
                    self.lost.insert(table.name.clone());
                }
            }
        }
    }

    /// Records one written key per bucket among the touched keys.
    pub(crate) fn record(
        self,
        conn: &Connection,
        tables: &HashMap<String, TableSchema>,
        held: &mut Held,
    ) -> Result<(), ClientError> {
        for (name, keys) in self.keys {
            let Some(table) = tables.get(&name) else {
                continue;
            };
            let Some(lows) = held.lows(conn, table)? else {
                // No digests kept: nothing to mark.
                continue;
            };
            // One key per bucket: any key in a bucket marks it.
            let mut marks: BTreeMap<usize, &Key> = BTreeMap::new();
            for key in &keys {
                let at = lows.partition_point(|lo| lo.as_ref().is_none_or(|lo| lo <= key));
                marks.entry(at.saturating_sub(1)).or_insert(key);
            }
            let places = vec!["?"; table.primary_key.len()].join(", ");
            let mut stmt = conn.prepare_cached(&format!(
                "INSERT OR IGNORE INTO {} VALUES ({places})",
                touched_table(table)
            ))?;
            for key in marks.values() {
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
