//! The server's current rows, read to explain a rejection (conflict,
//! not found) and to hand the replica the version to roll back to.

use std::collections::BTreeMap;

use pgrelay_protocol::{CurrentRow, Row, TableSchema};
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use super::statement::select_current;

pub(super) async fn read_row(
    client: &Client,
    table: &TableSchema,
    key: &Row,
) -> Result<Option<Row>, tokio_postgres::Error> {
    let (sql, params) = select_current(table, key);
    let params: Vec<&(dyn ToSql + Sync)> =
        params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    let row = client.query_opt(sql.as_str(), &params).await?;
    Ok(row.map(|row| {
        table
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), row.get::<_, Option<String>>(i)))
            .collect()
    }))
}

/// The server's current version of each row a rejected transaction touched.
pub(super) async fn current_rows(
    client: &Client,
    schemas: &BTreeMap<String, TableSchema>,
    keys: Vec<(String, Row)>,
) -> Result<Vec<CurrentRow>, tokio_postgres::Error> {
    let mut rows: Vec<CurrentRow> = Vec::new();
    for (table_name, key) in keys {
        if rows.iter().any(|r| r.table == table_name && r.key == key) {
            continue;
        }
        let Some(table) = schemas.get(&table_name) else {
            continue;
        };
        // A key value the table's type refuses names no row.
        let row = match read_row(client, table, &key).await {
            Ok(row) => row,
            Err(e) if e.as_db_error().is_some() => {
                client
                    .batch_execute("ROLLBACK TO SAVEPOINT client_tx")
                    .await?;
                None
            }
            Err(e) => return Err(e),
        };
        rows.push(CurrentRow {
            table: table_name,
            key,
            row,
        });
    }
    Ok(rows)
}

pub(super) fn show_key(key: &Row) -> String {
    key.iter()
        .map(|(k, v)| format!("{k}={}", show_value(v.as_deref())))
        .collect::<Vec<_>>()
        .join(",")
}

pub(super) fn show_value(v: Option<&str>) -> String {
    match v {
        Some(v) => v.chars().take(64).collect(),
        None => "NULL".to_owned(),
    }
}
