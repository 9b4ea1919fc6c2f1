//! Which tables pgrelay syncs and what they look like, read from
//! PostgreSQL's catalog.

use pgrelay_protocol::{Column, TableSchema, ValueKind};
use tokio_postgres::Client;

use crate::PgError;

/// Which tables to sync: every ordinary table in schema `public`, or a list.
#[derive(Clone, Debug, Default)]
pub enum TableFilter {
    #[default]
    AllPublic,
    /// Schema-qualified names (`public.todos`); a bare name means `public`.
    Only(Vec<String>),
}

impl TableFilter {
    fn qualified(&self) -> Option<Vec<String>> {
        match self {
            TableFilter::AllPublic => None,
            TableFilter::Only(names) => Some(
                names
                    .iter()
                    .map(|n| {
                        if n.contains('.') {
                            n.clone()
                        } else {
                            format!("public.{n}")
                        }
                    })
                    .collect(),
            ),
        }
    }
}

const TABLES_SQL: &str = "
SELECT c.oid, n.nspname || '.' || c.relname, c.relreplident::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND CASE WHEN $1::text[] IS NULL THEN n.nspname = 'public'
           ELSE (n.nspname || '.' || c.relname) = ANY($1::text[]) END
ORDER BY 2";

const COLUMNS_SQL: &str = "
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid,
       CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END::oid, a.attnum
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
ORDER BY a.attnum";

/// Key columns: the primary key, or the replica-identity index when the
/// table uses REPLICA IDENTITY USING INDEX.
const KEY_SQL: &str = "
SELECT a.attname
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = $1 AND (CASE WHEN $2 THEN i.indisreplident ELSE i.indisprimary END)
ORDER BY k.ord";

/// Reads the schema of every table the filter selects. A table that cannot
/// be synced is returned with `skipped` saying why; a listed table that does
/// not exist is an error.
pub async fn discover_tables(
    client: &Client,
    filter: &TableFilter,
) -> Result<Vec<TableSchema>, PgError> {
    let wanted = filter.qualified();
    let rows = client
        .query(TABLES_SQL, &[&wanted])
        .await
        .map_err(PgError::sql("listing tables to sync"))?;
    if let Some(wanted) = &wanted {
        let found: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
        if let Some(missing) = wanted.iter().find(|w| !found.contains(w)) {
            return Err(PgError::BadUrl(format!(
                "table {missing} does not exist (from --tables)"
            )));
        }
    }
    let mut tables = Vec::with_capacity(rows.len());
    for row in rows {
        let oid: u32 = row.get(0);
        let name: String = row.get(1);
        let identity: String = row.get(2);
        tables.push(read_table(client, oid, name, &identity).await?);
    }
    Ok(tables)
}

async fn read_table(
    client: &Client,
    oid: u32,
    name: String,
    identity: &str,
) -> Result<TableSchema, PgError> {
    let columns = client
        .query(COLUMNS_SQL, &[&oid])
        .await
        .map_err(PgError::sql(format!("reading columns of {name}")))?
        .iter()
        .map(|r| {
            let base_oid: u32 = r.get(3);
            Column {
                name: r.get(0),
                pg_type: r.get(1),
                type_oid: r.get(2),
                kind: ValueKind::from_type_oid(base_oid),
                attnum: Some(r.get(4)),
            }
        })
        .collect();
    let by_index = identity == "i";
    let mut primary_key: Vec<String> = client
        .query(KEY_SQL, &[&oid, &by_index])
        .await
        .map_err(PgError::sql(format!("reading the key of {name}")))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let skipped = match (identity, primary_key.is_empty()) {
        ("f", _) => None,
        ("n", _) => Some(format!(
            "REPLICA IDENTITY NOTHING: updates and deletes would carry no key; run ALTER TABLE {name} REPLICA IDENTITY DEFAULT (with a primary key) or FULL"
        )),
        (_, true) => Some(format!(
            "no primary key: add one, or run ALTER TABLE {name} REPLICA IDENTITY FULL"
        )),
        _ => None,
    };
    if skipped.is_some() {
        primary_key.clear();
    }
    Ok(TableSchema {
        name,
        columns,
        primary_key,
        version: 1,
        skipped,
        backfilled: Vec::new(),
        oid: Some(oid),
    })
}

/// PostgreSQL's name for a type, as `format_type` prints it.
pub async fn format_type(client: &Client, oid: u32, modifier: i32) -> Result<String, PgError> {
    let row = client
        .query_one("SELECT format_type($1, $2)", &[&oid, &modifier])
        .await
        .map_err(PgError::sql(format!("naming type {oid}")))?;
    Ok(row
        .get::<_, Option<String>>(0)
        .unwrap_or_else(|| format!("oid {oid}")))
}

/// Whether `table` (schema-qualified) has REPLICA IDENTITY FULL, so its
/// updates and deletes carry the whole old row.
pub async fn has_full_identity(client: &Client, table: &str) -> Result<bool, PgError> {
    let row = client
        .query_one(
            "SELECT relreplident::text FROM pg_class WHERE oid = $1::text::regclass",
            &[&pgrelay_protocol::quote_table(table)],
        )
        .await
        .map_err(PgError::sql("reading a replica identity"))?;
    Ok(row.get::<_, String>(0) == "f")
}
