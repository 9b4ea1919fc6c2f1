//! Notices tables created after the server started, and column changes
//! (DDL is not decoded; a Relation message only comes with the table's
//! next change). With the default
//! table filter (every table in schema `public`) a new table with a primary
//! key (or REPLICA IDENTITY FULL) is added to the publication and announced
//! to sessions; clients then fetch its existing rows with a snapshot of
//! that table alone. PostgreSQL does not decode DDL, so the catalog is
//! polled. A synced table that leaves the publication (under either
//! filter) is announced as no longer synced (see [`unpublished`]).

use std::sync::Arc;

use pgrelay_pg::{Pool, TableFilter};
use tokio::sync::watch;

use crate::hub::Hub;
use crate::replication::unpublished;
use crate::{history, ServerConfig, ServerError};

pub(crate) async fn run(
    pool: Pool,
    config: ServerConfig,
    hub: Arc<Hub>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            _ = tokio::time::sleep(config.table_poll_interval) => {}
        }
        let client = match pool.get().await {
            Ok(client) => client,
            Err(e) => {
                tracing::debug!(error = %e, "table watch cannot connect; trying later");
                continue;
            }
        };
        if let Err(e) = check(&client, &config, &hub).await {
            tracing::warn!(error = %e, "looking for new tables failed");
        }
    }
}

async fn check(
    db: &tokio_postgres::Client,
    config: &ServerConfig,
    hub: &Hub,
) -> Result<(), ServerError> {
    let known = hub.schemas();
    let publication = config.publication();
    let Some(members) = unpublished::members(db, &publication).await? else {
        return Ok(());
    };
    unpublished::announce_left(db, &known, &members, &publication, hub).await?;
    if !matches!(config.tables, TableFilter::AllPublic) {
        // An explicit list names every table up front: only a listed table
        // put back into the publication comes again.
        for mut table in unpublished::returned(db, &known, &members).await? {
            history::record_schema(db, &mut table).await?;
            tracing::info!(table = %table.name, "table back in the publication");
            let frame = hub.set_schema(table, hub.head());
            hub.publish(vec![frame]);
        }
        return Ok(());
    }
    let known = hub.schemas();
    let found = pgrelay_pg::discover_tables(db, &config.tables).await?;
    let found_names: std::collections::HashSet<String> =
        found.iter().map(|t| t.name.clone()).collect();
    let mut new = Vec::new();
    for mut table in found {
        match known.get(&table.name) {
            None => new.push(table),
            // Out of the publication by someone's choice: back only when
            // put back into it.
            Some(k) if unpublished::left(k) => {
                if members.contains(&table.name) && table.skipped.is_none() {
                    new.push(table);
                }
            }
            // A table that gained a key (or REPLICA IDENTITY FULL).
            Some(k) if k.skipped.is_some() && table.skipped.is_none() => new.push(table),
            Some(k)
                if table.skipped.is_none()
                    && (!same_columns(&k.columns, &table.columns)
                        || k.primary_key != table.primary_key) =>
            {
                table.backfilled =
                    crate::replication::backfilled_columns(db, &table.name, Some(k)).await?;
                history::record_schema(db, &mut table).await?;
                tracing::info!(table = %table.name, version = table.version, "table columns changed");
                let frame = hub.set_schema(table, hub.head());
                hub.publish(vec![frame]);
            }
            Some(_) => {}
        }
    }
    gone(db, &known, &found_names, hub).await?;
    if new.is_empty() {
        return Ok(());
    }
    let synced: Vec<String> = known
        .values()
        .chain(new.iter())
        .filter(|t| t.skipped.is_none())
        .map(|t| t.name.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    pgrelay_pg::ensure_publication(db, &config.publication(), &synced).await?;
    for mut table in new {
        history::record_schema(db, &mut table).await?;
        tracing::info!(table = %table.name, skipped = table.skipped.as_deref().unwrap_or(""), "new table");
        let frame = hub.set_schema(table, hub.head());
        hub.publish(vec![frame]);
    }
    Ok(())
}

fn same_columns(a: &[pgrelay_protocol::Column], b: &[pgrelay_protocol::Column]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.name == y.name && x.type_oid == y.type_oid && x.pg_type == y.pg_type)
}

/// Synced tables PostgreSQL no longer has (dropped, renamed, moved to
/// another schema) are announced as not synced: replicas drop them, in
/// order with the changes around. A renamed table is found again under
/// its new name, as a new table fetched alone.
async fn gone(
    db: &tokio_postgres::Client,
    known: &std::collections::BTreeMap<String, pgrelay_protocol::TableSchema>,
    found: &std::collections::HashSet<String>,
    hub: &Hub,
) -> Result<(), ServerError> {
    for table in known.values() {
        if table.skipped.is_some() || found.contains(&table.name) {
            continue;
        }
        let mut dropped = table.clone();
        dropped.skipped = Some(unpublished::DROPPED.to_owned());
        history::record_schema(db, &mut dropped).await?;
        tracing::info!(table = %dropped.name, "table dropped");
        let frame = hub.set_schema(dropped, hub.head());
        hub.publish(vec![frame]);
    }
    Ok(())
}
