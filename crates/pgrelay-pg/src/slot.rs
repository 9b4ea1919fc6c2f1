//! The publication and the logical replication slot pgrelay reads from.

use pgrelay_protocol::{quote_ident, quote_table, Lsn};
use tokio_postgres::types::PgLsn;
use tokio_postgres::Client;

use crate::PgError;

/// Refuses to go on unless PostgreSQL can do logical decoding.
pub async fn check_wal_level(client: &Client) -> Result<(), PgError> {
    let row = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(PgError::sql("reading wal_level"))?;
    let current: String = row.get(0);
    if current == "logical" {
        Ok(())
    } else {
        Err(PgError::WalLevel { current })
    }
}

/// Creates the publication, or makes an existing one publish exactly
/// `tables` (schema-qualified). Tables are listed one by one rather than
/// `FOR ALL TABLES`, so pgrelay's own change log is never published and a
/// table without a replica identity is never added (PostgreSQL would then
/// refuse UPDATE and DELETE on it).
pub async fn ensure_publication(
    client: &Client,
    name: &str,
    tables: &[String],
) -> Result<(), PgError> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await
        .map_err(PgError::sql("looking up the publication"))?
        .is_some();
    let list = tables
        .iter()
        .map(|t| quote_table(t))
        .collect::<Vec<_>>()
        .join(", ");
    let pub_name = quote_ident(name);
    let sql = match (exists, tables.is_empty()) {
        (false, true) => format!("CREATE PUBLICATION {pub_name}"),
        (false, false) => format!("CREATE PUBLICATION {pub_name} FOR TABLE {list}"),
        (true, true) => {
            // SET TABLE needs at least one table; drop the members instead.
            let members = client
                .query(
                    "SELECT format('%I.%I', schemaname, tablename) FROM pg_publication_tables WHERE pubname = $1",
                    &[&name],
                )
                .await
                .map_err(PgError::sql("listing the publication's tables"))?;
            if members.is_empty() {
                return Ok(());
            }
            let names = members
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join(", ");
            format!("ALTER PUBLICATION {pub_name} DROP TABLE {names}")
        }
        (true, false) => format!("ALTER PUBLICATION {pub_name} SET TABLE {list}"),
    };
    client
        .batch_execute(&sql)
        .await
        .map_err(PgError::sql(format!("setting up publication {name}")))
}

/// The state of pgrelay's slot at start.
#[derive(Clone, Debug)]
pub struct SlotInfo {
    pub created: bool,
    pub confirmed_flush: Lsn,
}

/// Creates the logical slot with the pgoutput plugin, or checks that an
/// existing one is usable.
pub async fn ensure_slot(client: &Client, slot: &str) -> Result<SlotInfo, PgError> {
    let row = client
        .query_opt(
            "SELECT plugin, slot_type, database, confirmed_flush_lsn, wal_status::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(PgError::sql("looking up the replication slot"))?;
    let bad = |problem: String| PgError::BadSlot {
        slot: slot.to_owned(),
        problem,
    };
    if let Some(row) = row {
        let plugin: Option<String> = row.get(0);
        let slot_type: String = row.get(1);
        let database: Option<String> = row.get(2);
        let confirmed: Option<PgLsn> = row.get(3);
        let wal_status: Option<String> = row.get(4);
        let confirmed = Lsn(confirmed.map(u64::from).unwrap_or(0));
        if slot_type != "logical" {
            return Err(bad(format!("is a {slot_type} slot, not a logical one")));
        }
        if plugin.as_deref() != Some("pgoutput") {
            return Err(bad(format!("uses plugin {plugin:?}, not pgoutput")));
        }
        let current_db: String = client
            .query_one("SELECT current_database()", &[])
            .await
            .map_err(PgError::sql("reading the current database"))?
            .get(0);
        if database.as_deref() != Some(current_db.as_str()) {
            return Err(bad(format!(
                "belongs to database {database:?}, not {current_db:?}"
            )));
        }
        if wal_status.as_deref() == Some("lost") {
            return Err(PgError::SlotLost {
                slot: slot.to_owned(),
                confirmed,
            });
        }
        return Ok(SlotInfo {
            created: false,
            confirmed_flush: confirmed,
        });
    }
    let row = client
        .query_one(
            "SELECT lsn FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .map_err(PgError::sql(format!("creating replication slot {slot}")))?;
    let lsn: PgLsn = row.get(0);
    Ok(SlotInfo {
        created: true,
        confirmed_flush: Lsn(u64::from(lsn)),
    })
}
