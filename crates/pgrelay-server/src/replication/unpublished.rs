//! Notices a synced table leaving pgrelay's publication (`ALTER
//! PUBLICATION ... DROP TABLE`, or a DROP TABLE under an explicit
//! `--tables` list): PostgreSQL stops streaming its changes, so replicas
//! are told it is no longer synced and drop it, rather than keep rows that
//! silently go stale. Adding it back to the publication syncs it again
//! (replicas fetch that table alone).

use std::collections::{BTreeMap, HashSet};

use pgrelay_pg::TableFilter;
use pgrelay_protocol::TableSchema;

use crate::hub::Hub;
use crate::{history, ServerError};

/// How the reason of a table announced as left starts; the table watch
/// does not add such a table back to the publication by itself.
pub(crate) const LEFT: &str = "left the publication";

/// Why a synced table PostgreSQL no longer has is not synced.
pub(crate) const DROPPED: &str = "the table no longer exists in PostgreSQL (dropped or renamed)";

/// Whether PostgreSQL has a table of that name.
async fn exists(db: &tokio_postgres::Client, name: &str) -> Result<bool, ServerError> {
    Ok(db
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&crate::writes::quote_table(name)],
        )
        .await
        .map_err(ServerError::sql(format!("looking up {name}")))?
        .get(0))
}

/// Whether `table` is not synced because it left the publication.
pub(crate) fn left(table: &TableSchema) -> bool {
    table
        .skipped
        .as_deref()
        .is_some_and(|why| why.starts_with(LEFT))
}

/// The tables the publication holds, as `schema.table`; `None` while it
/// does not exist (being made again), when nothing is to be concluded.
pub(crate) async fn members(
    db: &tokio_postgres::Client,
    publication: &str,
) -> Result<Option<HashSet<String>>, ServerError> {
    let exists = db
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(ServerError::sql("looking up the publication"))?
        .is_some();
    if !exists {
        return Ok(None);
    }
    let rows = db
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(ServerError::sql("listing the publication's tables"))?;
    Ok(Some(rows.iter().map(|r| r.get::<_, String>(0)).collect()))
}

/// Announces each synced table missing from the publication as not synced
/// (dropped from replicas). A table that no longer exists says so.
pub(crate) async fn announce_left(
    db: &tokio_postgres::Client,
    known: &BTreeMap<String, TableSchema>,
    members: &HashSet<String>,
    publication: &str,
    hub: &Hub,
) -> Result<(), ServerError> {
    for table in known.values() {
        if table.skipped.is_some() || members.contains(&table.name) {
            continue;
        }
        let mut gone = table.clone();
        gone.skipped = Some(if exists(db, &table.name).await? {
            format!(
                "{LEFT} {publication} (ALTER PUBLICATION ... DROP TABLE); \
                 ALTER PUBLICATION {publication} ADD TABLE {} syncs it again",
                table.name
            )
        } else {
            DROPPED.to_owned()
        });
        history::record_schema(db, &mut gone).await?;
        tracing::info!(table = %gone.name, reason = gone.skipped.as_deref().unwrap_or(""), "table no longer synced");
        let frame = hub.set_schema(gone, hub.head());
        hub.publish(vec![frame]);
    }
    Ok(())
}

/// Tables that left the publication and are in it again, described afresh
/// (to be announced as new: replicas fetch each alone).
pub(crate) async fn returned(
    db: &tokio_postgres::Client,
    known: &BTreeMap<String, TableSchema>,
    members: &HashSet<String>,
) -> Result<Vec<TableSchema>, ServerError> {
    let back: Vec<String> = known
        .values()
        .filter(|t| left(t) && members.contains(&t.name))
        .map(|t| t.name.clone())
        .collect();
    if back.is_empty() {
        return Ok(Vec::new());
    }
    Ok(pgrelay_pg::discover_tables(db, &TableFilter::Only(back)).await?)
}

/// At start, with every table of `public` synced: a table that left the
/// publication while an earlier server ran stays out (its stored schema
/// says so) instead of being published again.
pub(crate) async fn keep_out(
    db: &tokio_postgres::Client,
    tables: &mut [TableSchema],
) -> Result<(), ServerError> {
    let rows = db
        .query(
            "SELECT name, schema->>'skipped' FROM pgrelay.table_schemas WHERE schema->>'skipped' LIKE $1",
            &[&format!("{LEFT}%")],
        )
        .await
        .map_err(ServerError::sql("reading tables kept out of the publication"))?;
    for row in rows {
        let name: String = row.get(0);
        if let Some(table) = tables
            .iter_mut()
            .find(|t| t.name == name && t.skipped.is_none())
        {
            tracing::info!(table = %name, "table left the publication before; not synced");
            table.skipped = row.get(1);
        }
    }
    Ok(())
}

/// At start: tables an earlier server synced (their schemas are stored)
/// that this one does not find, dropped or renamed while no server ran,
/// or no longer listed. They are announced as not synced, so a replica
/// that comes back drops them instead of keeping rows that went stale; a
/// table announced so before keeps its reason.
pub(crate) async fn gone_while_stopped(
    db: &tokio_postgres::Client,
    tables: &mut Vec<TableSchema>,
) -> Result<(), ServerError> {
    let rows = db
        .query(
            "SELECT schema FROM pgrelay.table_schemas ORDER BY name",
            &[],
        )
        .await
        .map_err(ServerError::sql("reading stored table schemas"))?;
    for row in rows {
        let tokio_postgres::types::Json(mut stored): tokio_postgres::types::Json<TableSchema> =
            row.get(0);
        if tables.iter().any(|t| t.name == stored.name) {
            continue;
        }
        if stored.skipped.is_none() {
            stored.skipped = Some(if exists(db, &stored.name).await? {
                "not among the tables this server syncs (--tables)".to_owned()
            } else {
                DROPPED.to_owned()
            });
            tracing::warn!(table = %stored.name, reason = stored.skipped.as_deref().unwrap_or(""), "a table synced before is no longer synced");
        }
        tables.push(stored);
    }
    Ok(())
}
