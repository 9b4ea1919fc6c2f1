//! Which kept sub-buckets the change log says were written since they
//! were made, for a repair whose snapshot opened after them: every change
//! of the table committed after the kept head, except those the kept
//! snapshot saw, marks the sub-buckets of its keys (old and new) dirty. Any
//! doubt (a truncate, a key that does not read, the log pruned or
//! replaced, too many changes, capture not caught up) gives up: the
//! repair then reads every row, as without kept digests.

use std::time::Duration;

use pgrelay_protocol::repair::{key_kinds, Key, KeyValue};
use pgrelay_protocol::{Lsn, Op};
use tokio::sync::watch;
use tokio_postgres::types::PgLsn;
use tokio_postgres::Client;

use super::kept::{sees_all_of, Dirty, Kept};
use crate::snapshot::Snapshot;

/// How long a repair waits for capture to reach its snapshot's position
/// before it reads every row instead.
const CAPTURE_WAIT: Duration = Duration::from_secs(5);

/// Kept digests are not used when more than one in this many of the
/// table's rows changed since (reading the ranges around them would cost
/// about what reading every row does); they are made again.
const CHANGED_SHARE: u64 = 20;

/// What the change log says about a table's kept digests.
#[derive(Debug)]
pub(crate) enum Since {
    /// Per kept sub-bucket, whether it was written.
    Dirty(Dirty),
    /// They cannot serve this repair, and will not serve another: made
    /// again.
    Stale(&'static str),
    /// They cannot serve this repair.
    Unusable(&'static str),
}

/// Whether `kept` can serve a repair whose snapshot is `snapshot`, and
/// which of its sub-buckets were written since. `captured` follows what
/// capture has put in the log; `log_id` is the log the server follows.
pub(crate) async fn written_since(
    log: &Client,
    snapshot: &Snapshot,
    kept: &Kept,
    log_id: &str,
    mut captured: watch::Receiver<Lsn>,
) -> Since {
    let now = &snapshot.visibility;
    if *kept.log_id != *log_id {
        return Since::Stale("the change log was replaced");
    }
    if !sees_all_of(now, &kept.visibility) {
        return Since::Unusable("the repair's snapshot is older than the kept one");
    }
    match filenode(snapshot, &kept.schema.name).await {
        Some(node) if node == kept.filenode => {}
        _ => return Since::Stale("the table's storage changed (rewritten or truncated)"),
    }
    // Everything the repair's snapshot sees is in the log once capture
    // has passed its position.
    let until = now.until;
    let caught_up = tokio::time::timeout(CAPTURE_WAIT, captured.wait_for(|c| *c >= until))
        .await
        .is_ok_and(|waited| waited.is_ok());
    if !caught_up {
        return Since::Unusable("capture did not reach the repair's snapshot in time");
    }
    match read_changes(log, kept, log_id).await {
        Ok(since) => since,
        Err(e) => {
            tracing::warn!(table = %kept.schema.name, error = %e, "reading the change log for kept digests failed");
            Since::Unusable("the change log could not be read")
        }
    }
}

/// The table's storage, as the repair's snapshot's connection finds it.
async fn filenode(snapshot: &Snapshot, table: &str) -> Option<u32> {
    let row = snapshot
        .client()
        .query_one(
            "SELECT pg_relation_filenode(to_regclass($1))",
            &[&crate::writes::quote_table(table)],
        )
        .await
        .ok()?;
    row.get::<_, Option<u32>>(0)
}

/// Reads the table's changes after the kept head (in the same statement
/// as the log's state, so a prune cannot slip a gap through).
async fn read_changes(
    log: &Client,
    kept: &Kept,
    log_id: &str,
) -> Result<Since, tokio_postgres::Error> {
    let table = &kept.schema;
    let Some(kinds) = key_kinds(table) else {
        return Ok(Since::Stale("the table has no comparable key"));
    };
    let limit = i64::try_from(kept.rows / CHANGED_SHARE + 64).unwrap_or(i64::MAX);
    let names: Vec<&str> = table.primary_key.iter().map(String::as_str).collect();
    let keys: Vec<String> = (0..names.len())
        .map(|i| format!("data ->> ${n}::text, old_data ->> ${n}::text", n = i + 4))
        .collect();
    let sql = format!(
        "WITH state AS (SELECT pruned_through, log_id FROM pgrelay.log_state WHERE id = 1)
         SELECT state.pruned_through, state.log_id, page.* FROM state LEFT JOIN LATERAL
           (SELECT lsn, operation, transaction_id, {} FROM pgrelay.change_history
            WHERE table_name = $1 AND lsn > $2 ORDER BY lsn, ordinal LIMIT $3) page ON true",
        keys.join(", ")
    );
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
    let from = PgLsn::from(kept.from.0);
    params.push(&table.name);
    params.push(&from);
    params.push(&limit);
    for name in &names {
        params.push(name);
    }
    let rows = log.query(&sql, &params).await?;
    let Some(first) = rows.first() else {
        return Ok(Since::Unusable("the change log has no state"));
    };
    let pruned = Lsn(u64::from(first.get::<_, PgLsn>(0)));
    if pruned > kept.from {
        return Ok(Since::Stale("the change log was pruned past the kept head"));
    }
    if first.get::<_, String>(1) != log_id {
        return Ok(Since::Stale("the change log was replaced"));
    }
    if i64::try_from(rows.len()).is_ok_and(|n| n >= limit) {
        return Ok(Since::Stale("too many changes since"));
    }
    let mut dirty = kept.clean();
    for row in &rows {
        let Some(lsn) = row.get::<_, Option<PgLsn>>(2) else {
            continue;
        };
        let lsn = Lsn(u64::from(lsn));
        let xid = u32::try_from(row.get::<_, i64>(4)).unwrap_or(0);
        if kept.saw(lsn, xid) {
            continue;
        }
        match Op::parse(row.get(3)) {
            Some(Op::Insert | Op::Update | Op::Delete) => {}
            _ => return Ok(Since::Stale("the table was truncated")),
        }
        // New key, then old key; either may be absent, not both.
        let mut any = false;
        for side in 0..2 {
            let values: Vec<Option<String>> = (0..names.len())
                .map(|i| row.get::<_, Option<String>>(5 + 2 * i + side))
                .collect();
            if values.iter().all(Option::is_none) {
                continue;
            }
            let key: Option<Key> = values
                .iter()
                .zip(&kinds)
                .map(|(v, &kind)| KeyValue::from_canonical(kind, v.as_deref()))
                .collect();
            let Some(key) = key else {
                return Ok(Since::Unusable("a change's key does not read"));
            };
            kept.mark(&mut dirty, &key);
            any = true;
        }
        if !any {
            return Ok(Since::Unusable("a change names no key"));
        }
    }
    Ok(Since::Dirty(dirty))
}
