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

/// What PostgreSQL holds under pgrelay's slot name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    Missing,
    /// Usable: streaming resumes from its confirmed position.
    Valid {
        confirmed_flush: Lsn,
    },
    /// PostgreSQL invalidated it (`wal_status = 'lost'`, e.g. past
    /// `max_slot_wal_keep_size`): the WAL it held back is gone, and so are
    /// the changes after its confirmed position.
    Invalidated {
        confirmed_flush: Lsn,
    },
}

/// Looks up the slot. A slot of that name that pgrelay cannot use (not
/// logical, another plugin, another database) is an error: it is someone
/// else's, and is never dropped or reused.
pub async fn inspect_slot(client: &Client, slot: &str) -> Result<SlotState, PgError> {
    // `conflicting` exists from PostgreSQL 16 on (a logical slot on a
    // standby invalidated by recovery); read through jsonb so 15 works too.
    let row = client
        .query_opt(
            "SELECT plugin, slot_type, database, confirmed_flush_lsn, wal_status::text,
                    (to_jsonb(s) ->> 'conflicting')::bool, current_database()
             FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(PgError::sql("looking up the replication slot"))?;
    let Some(row) = row else {
        return Ok(SlotState::Missing);
    };
    let bad = |problem: String| PgError::BadSlot {
        slot: slot.to_owned(),
        problem,
    };
    let plugin: Option<String> = row.get(0);
    let slot_type: String = row.get(1);
    let database: Option<String> = row.get(2);
    let confirmed: Option<PgLsn> = row.get(3);
    let wal_status: Option<String> = row.get(4);
    let conflicting: Option<bool> = row.get(5);
    let current: String = row.get(6);
    let confirmed_flush = Lsn(confirmed.map(u64::from).unwrap_or(0));
    if slot_type != "logical" {
        return Err(bad(format!("is a {slot_type} slot, not a logical one")));
    }
    if plugin.as_deref() != Some("pgoutput") {
        let plugin = plugin.as_deref().unwrap_or("none");
        return Err(bad(format!("uses the plugin {plugin}, not pgoutput")));
    }
    match database {
        Some(database) if database != current => {
            return Err(PgError::SlotOfOtherDatabase {
                suggested: suggest_slot(slot, &current),
                slot: slot.to_owned(),
                database,
                current,
            })
        }
        _ => {}
    }
    if wal_status.as_deref() == Some("lost") || conflicting == Some(true) {
        return Ok(SlotState::Invalidated { confirmed_flush });
    }
    Ok(SlotState::Valid { confirmed_flush })
}

/// A slot name for this database that `--slot` accepts (1-58 characters
/// of lower-case letters, digits and '_').
fn suggest_slot(slot: &str, database: &str) -> String {
    let mut name: String = format!("{slot}_{database}")
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(58);
    name
}

/// Creates the logical slot with the pgoutput plugin; returns its
/// consistent point: every transaction committing after it is streamed,
/// every one before it is visible to any snapshot taken from now on.
/// Waits for transactions in progress to end (PostgreSQL needs that to
/// reach a consistent point).
pub async fn create_slot(client: &Client, slot: &str) -> Result<Lsn, PgError> {
    let row = client
        .query_one(
            "SELECT lsn FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .map_err(PgError::sql(format!("creating replication slot {slot}")))?;
    Ok(Lsn(u64::from(row.get::<_, PgLsn>(0))))
}

/// Drops the slot if it exists. Fails (retryably, `55006`) while a
/// walsender still holds it.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), PgError> {
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(PgError::sql(format!("dropping replication slot {slot}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_suggested_slot_name_is_one_that_slot_accepts() {
        assert_eq!(super::suggest_slot("pgrelay", "App-2"), "pgrelay_app_2");
        assert_eq!(super::suggest_slot("pgrelay", &"x".repeat(80)).len(), 58);
    }
}
