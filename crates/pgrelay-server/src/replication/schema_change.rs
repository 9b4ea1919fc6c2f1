//! Notices when a Relation message describes a table differently from what
//! clients were told, and announces the new schema before the changes that
//! depend on it.

use pgrelay_pg::pgoutput::Relation;
use pgrelay_pg::TableFilter;
use pgrelay_protocol::{Column, Lsn, ValueKind};

use crate::history;
use crate::hub::{Frame, Hub};
use crate::ServerError;

/// Returns the frame announcing `relation`'s new schema, or `None` when its
/// columns are what the hub already has.
pub(crate) async fn apply(
    db: &tokio_postgres::Client,
    hub: &Hub,
    relation: &Relation,
    before: Lsn,
) -> Result<Option<Frame>, ServerError> {
    let name = relation.qualified_name();
    let schemas = hub.schemas();
    let current = schemas.get(&name);
    let unchanged = current.is_some_and(|t| {
        t.columns.len() == relation.columns.len()
            && t.columns
                .iter()
                .zip(&relation.columns)
                .all(|(a, b)| a.name == b.name && a.type_oid == b.type_oid)
    });
    if unchanged {
        return Ok(None);
    }
    // The catalog names the types and knows the key; the Relation message
    // is authoritative for which columns the following rows carry.
    let described = pgrelay_pg::discover_tables(db, &TableFilter::Only(vec![name.clone()])).await?;
    let Some(mut table) = described.into_iter().next().or_else(|| current.cloned()) else {
        return Ok(None);
    };
    let mut columns = Vec::with_capacity(relation.columns.len());
    for col in &relation.columns {
        let known = table
            .columns
            .iter()
            .find(|c| c.name == col.name && c.type_oid == col.type_oid)
            .cloned();
        let column = match known {
            Some(c) => c,
            None => Column {
                name: col.name.clone(),
                pg_type: pgrelay_pg::format_type(db, col.type_oid, col.type_modifier).await?,
                type_oid: col.type_oid,
                kind: ValueKind::from_type_oid(col.type_oid),
                attnum: None,
            },
        };
        columns.push(column);
    }
    table.columns = columns;
    table.backfilled = backfilled_columns(db, &name, current).await?;
    history::record_schema(db, &mut table).await?;
    tracing::info!(table = %name, version = table.version, "table schema changed");
    Ok(Some(hub.set_schema(table, before)))
}

/// Columns new since `before` that PostgreSQL filled in for existing rows:
/// those with a default (stored, or a rewrite) or NOT NULL, and any other
/// that already holds a value (a renamed column: its old name is dropped
/// in the replica and the table fetched again). A column added without
/// either is NULL in every existing row, as in the replica. The list
/// keeps those of earlier versions still there, so a replica that comes
/// back after several changes still sees every column it lacks whose
/// values PostgreSQL filled in without streaming them.
pub(crate) async fn backfilled_columns(
    db: &tokio_postgres::Client,
    table: &str,
    before: Option<&pgrelay_protocol::TableSchema>,
) -> Result<Vec<String>, ServerError> {
    let Some(before) = before else {
        return Ok(Vec::new());
    };
    let earlier = &before.backfilled;
    let before = &before.columns[..];
    let rows = db
        .query(
            "SELECT attname::text FROM pg_attribute
              WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped
                AND (atthasdef OR atthasmissing OR attnotnull)",
            &[&table],
        )
        .await
        .map_err(ServerError::sql(format!("reading the columns of {table}")))?;
    let mut filled: Vec<String> = rows
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|name| before.iter().all(|c| c.name != *name) || earlier.contains(name))
        .collect();
    let others = db
        .query(
            "SELECT attname::text FROM pg_attribute
              WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
            &[&table],
        )
        .await
        .map_err(ServerError::sql(format!("reading the columns of {table}")))?;
    for name in others.iter().map(|r| r.get::<_, String>(0)) {
        if filled.contains(&name) {
            continue;
        }
        if before.iter().any(|c| c.name == name) {
            if earlier.contains(&name) {
                filled.push(name);
            }
            continue;
        }
        // Stops at the first value: a column just added has none.
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE {} IS NOT NULL)",
            crate::writes::quote_table(table),
            pgrelay_protocol::quote_ident(&name)
        );
        let holds: bool = db
            .query_one(&sql, &[])
            .await
            .map_err(ServerError::sql(format!(
                "looking for values in {table}.{name}"
            )))?
            .get(0);
        if holds {
            filled.push(name);
        }
    }
    Ok(filled)
}
