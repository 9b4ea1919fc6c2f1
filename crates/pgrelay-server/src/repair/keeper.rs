//! Makes the server's kept digests (see `kept`) in the background and
//! makes them again when they went stale: one table at a time, each from
//! its own consistent snapshot, never while the server shuts down.
//!
//! A table's digests are made when it has none, and again when its
//! schema changed, the change log was replaced (a new epoch, a reset) or
//! pruned past their head, or a repair found them too changed to serve.
//! Remaking a table waits at least ten times as long as its last making
//! took, so keeping them costs at most about a tenth of a connection's
//! time even when every check finds them stale.
//!
//! A table is read twice in the snapshot: its keys first, for the keys
//! that start sub-buckets, then every row, hashed into its sub-bucket,
//! in whatever order PostgreSQL reads it (no sort, and memory of about a
//! hundred bytes per sub-bucket, not per row).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrelay_pg::{ConnInfo, Pool};
use pgrelay_protocol::repair::{key_kinds, starts_sub_bucket, Key};
use pgrelay_protocol::{Lsn, TableSchema};
use tokio::sync::watch;
use tokio_postgres::types::PgLsn;

use super::check::{for_each_row_hash, RepairError};
use super::kept::{add_row, empty_subs, Kept, KeptDigests};
use crate::hub::Hub;
use crate::snapshot::{GiveWay, Hydrating, Snapshot, SnapshotError};
use crate::ServerError;

/// How often staleness is checked when nothing asks sooner.
const CHECK_EVERY: Duration = Duration::from_secs(10);

/// Remaking a table waits at least this many times its last making.
const SPACING: u32 = 10;

/// The shortest wait between two makings of a table.
const MIN_GAP: Duration = Duration::from_secs(1);

/// After a making failed (PostgreSQL away), or found the table cannot
/// have kept digests (no storage of its own), it is tried again after
/// this long.
const RETRY_FAILED: Duration = Duration::from_secs(30);
const RETRY_UNUSABLE: Duration = Duration::from_secs(600);

/// How long one making may wait in all for hydrations to end before it
/// reads on regardless.
const GIVE_WAY_AT_MOST: Duration = Duration::from_secs(60);

/// The builder's task: runs until shutdown.
pub(crate) async fn keep_digests(
    kept: Arc<KeptDigests>,
    hub: Arc<Hub>,
    hydrating: Arc<Hydrating>,
    info: ConnInfo,
    pool: Pool,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    let mut not_before: HashMap<String, Instant> = HashMap::new();
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let Some(table) = due(&kept, &hub, &pool, &not_before).await else {
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
                () = kept.wake.notified() => {}
                () = tokio::time::sleep(CHECK_EVERY) => {}
            }
            continue;
        };
        let built = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            built = build(&info, &pool, &hub, &table, GiveWay::new(Arc::clone(&hydrating), GIVE_WAY_AT_MOST)) => built,
        };
        let now = Instant::now();
        match built {
            Ok(Some(made)) => {
                tracing::info!(
                    table = %table.name,
                    rows = made.rows,
                    sub_buckets = made.subs.len(),
                    head = %made.from,
                    took = ?made.took,
                    "kept repair digests made"
                );
                not_before.insert(table.name.clone(), now + (made.took * SPACING).max(MIN_GAP));
                kept.put(made);
            }
            Ok(None) => {
                tracing::debug!(table = %table.name, "no kept repair digests for this table: its storage changed while it was read, or it has none");
                kept.remove(&table.name);
                not_before.insert(table.name.clone(), now + RETRY_UNUSABLE);
            }
            Err(e) => {
                tracing::warn!(table = %table.name, error = %e, "making kept repair digests failed; tried again later");
                not_before.insert(table.name.clone(), now + RETRY_FAILED);
            }
        }
    }
}

/// The next table whose digests are missing or stale, if its turn came.
async fn due(
    kept: &KeptDigests,
    hub: &Hub,
    pool: &Pool,
    not_before: &HashMap<String, Instant>,
) -> Option<TableSchema> {
    let schemas = hub.schemas();
    let held = kept.all();
    for name in held.keys() {
        if schemas
            .get(name)
            .is_none_or(|t| t.skipped.is_some() || key_kinds(t).is_none())
        {
            kept.remove(name);
        }
    }
    let pruned = if held.is_empty() {
        Lsn::ZERO
    } else {
        pruned_through(pool).await.unwrap_or(Lsn::ZERO)
    };
    let log_id = hub.log_id();
    let now = Instant::now();
    schemas
        .values()
        .filter(|t| t.skipped.is_none() && key_kinds(t).is_some())
        .filter(|t| not_before.get(&t.name).is_none_or(|at| *at <= now))
        .find(|t| match held.get(&t.name) {
            None => true,
            Some(k) => {
                k.schema != **t || *k.log_id != *log_id || k.from < pruned || kept.is_stale(&t.name)
            }
        })
        .cloned()
}

async fn pruned_through(pool: &Pool) -> Option<Lsn> {
    let client = pool.get().await.ok()?;
    let row = client
        .query_one(
            "SELECT pruned_through FROM pgrelay.log_state WHERE id = 1",
            &[],
        )
        .await
        .ok()?;
    Some(Lsn(u64::from(row.get::<_, PgLsn>(0))))
}

/// The table's storage (`None`: it has none of its own, or is gone).
async fn filenode(
    client: &tokio_postgres::Client,
    table: &str,
) -> Result<Option<u32>, SnapshotError> {
    let row = client
        .query_one(
            "SELECT pg_relation_filenode(to_regclass($1))",
            &[&crate::writes::quote_table(table)],
        )
        .await
        .map_err(SnapshotError::sql("reading a table's storage"))?;
    Ok(row.get(0))
}

/// Makes a table's digests from a new snapshot; `None` when it cannot
/// have any (its storage changed while it was read, or it has none).
async fn build(
    info: &ConnInfo,
    pool: &Pool,
    hub: &Hub,
    table: &TableSchema,
    mut give_way: GiveWay,
) -> Result<Option<Kept>, RepairError> {
    give_way.pause().await;
    let started = Instant::now();
    let Some(kinds) = key_kinds(table) else {
        return Ok(None);
    };
    // Read before the snapshot opens: every transaction up to this head
    // is in it, and a table rewritten from here on shows a new storage.
    let log_id = hub.log_id();
    let from = hub.head();
    let before = {
        let client = pool.get().await.map_err(SnapshotError::from)?;
        filenode(&client, &table.name).await?
    };
    let Some(before) = before else {
        return Ok(None);
    };
    let snapshot = Snapshot::open(info).await?;
    // Below a transaction logged by then that the snapshot does not see
    // yet: the change log's part after `from` then holds it.
    let from = snapshot.resume_at(from).await?;
    // First the keys, for the bucket bounds.
    let mut keys_only = table.clone();
    keys_only
        .columns
        .retain(|c| table.primary_key.contains(&c.name));
    keys_only.columns.sort_by_key(|c| {
        table
            .primary_key
            .iter()
            .position(|k| *k == c.name)
            .unwrap_or(usize::MAX)
    });
    let mut starts: Vec<Key> = Vec::new();
    let pausing = Some(&mut give_way);
    for_each_row_hash(
        &snapshot,
        None,
        &keys_only,
        Some(&kinds),
        None,
        pausing,
        |key, _| {
            if let Some(key) = key.filter(starts_sub_bucket) {
                starts.push(key);
            }
        },
    )
    .await?;
    starts.sort_unstable();
    starts.dedup();
    let mut subs = empty_subs(starts);
    // Then every row, into its sub-bucket.
    let mut rows = 0;
    let pausing = Some(&mut give_way);
    for_each_row_hash(
        &snapshot,
        None,
        table,
        Some(&kinds),
        None,
        pausing,
        |key, hash| {
            if let Some(key) = key {
                add_row(&mut subs, &key, hash);
                rows += 1;
            }
        },
    )
    .await?;
    // The COPYs hold a lock that keeps the table from being rewritten
    // until the snapshot ends: the storage now is the one they read.
    if filenode(snapshot.client(), &table.name).await? != Some(before) {
        return Ok(None);
    }
    Ok(Some(Kept {
        schema: table.clone(),
        log_id,
        from,
        visibility: snapshot.visibility.clone(),
        filenode: before,
        subs,
        rows,
        took: started.elapsed(),
    }))
}
