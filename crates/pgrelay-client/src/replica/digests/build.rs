//! The background build of the replica's kept digests: a few thousand
//! rows per step, each step one short transaction, while the replica's
//! thread has nothing else to do.

use std::collections::HashMap;

use pgrelay_protocol::repair::{key_kinds, Key, RangeSum, SubSums};
use pgrelay_protocol::TableSchema;
use rusqlite::Connection;

use super::{add_to_last, install, open_bucket_at, range, store, stored, subs, Bucket};
use crate::replica::repair::scan;
use crate::ClientError;

/// Rows digested per background step (a few milliseconds).
const STEP_ROWS: usize = 8_192;

/// Rows read per step: one more, to know where the rest begins.
const STEP_READ: u64 = 8_193;

/// One background step: digests up to [`STEP_ROWS`] rows of the first
/// table whose digests are missing or incomplete. Returns whether any
/// work is left. Runs in the caller's transaction.
pub(crate) fn build_step(
    conn: &Connection,
    tables: &HashMap<String, TableSchema>,
) -> Result<bool, ClientError> {
    let mut names: Vec<&String> = tables.keys().collect();
    names.sort();
    for name in names {
        let table = &tables[name];
        let Some(kinds) = key_kinds(table).filter(|_| table.skipped.is_none()) else {
            continue;
        };
        let mut buckets = match stored(conn, table)? {
            Some(buckets) => buckets,
            None => install(conn, table)?,
        };
        let Some(i) = buckets.iter().position(|b| b.sum.is_none()) else {
            continue;
        };
        let (lo, hi) = range(&buckets, i);
        let mut rows: Vec<(Key, u128)> = Vec::new();
        scan(
            conn,
            table,
            Some(&kinds),
            &lo,
            &hi,
            Some(STEP_READ),
            |key, hash, _| rows.push((key, hash)),
        )?;
        let more = rows.len() > STEP_ROWS;
        let next = more
            .then(|| rows.split_off(STEP_ROWS))
            .and_then(|r| r.into_iter().next());
        let mut made = vec![Bucket {
            lo: lo.clone(),
            sum: Some(RangeSum::default()),
            subs: Some(SubSums::default()),
        }];
        for (key, hash) in rows {
            open_bucket_at(&mut made, &key);
            add_to_last(&mut made, &key, hash);
        }
        if let Some((next, _)) = next {
            if made.len() > 1 {
                // The last bucket may go on past the rows read: it is read
                // again, whole, by the next step.
                if let Some(last) = made.last_mut() {
                    last.sum = None;
                    last.subs = None;
                }
            } else {
                // Over STEP_ROWS rows and no key that starts a bucket
                // (about one chance in e^32): cut where the read ended.
                made.push(Bucket {
                    lo: Some(next),
                    sum: None,
                    subs: None,
                });
            }
        }
        subs::put(conn, table, &made)?;
        buckets.splice(i..=i, made);
        store(conn, table, &buckets)?;
        return Ok(true);
    }
    Ok(false)
}
