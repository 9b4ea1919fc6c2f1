//! `pgrelay doctor`'s replication checks: room for pgrelay's slot and WAL
//! sender, and the state of every slot that feeds the change log.

use tokio_postgres::Client;

use super::{human_bytes, number, setting, Finding, Report, Severity};
use crate::{ServerConfig, ServerError};

/// Free replication slots and WAL senders: pgrelay needs one of each for
/// its slot (unless the slot exists), plus one slot per hydrating client.
pub(super) async fn capacity(
    db: &Client,
    config: &ServerConfig,
    report: &mut Report,
) -> Result<(), ServerError> {
    let have_slot = db
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.slot],
        )
        .await
        .map_err(ServerError::sql("looking up the slot"))?
        .is_some();
    let checks = [
        (
            "slots",
            "max_replication_slots",
            "SELECT current_setting('max_replication_slots')::bigint - count(*) FROM pg_replication_slots",
        ),
        (
            "wal_senders",
            "max_wal_senders",
            "SELECT current_setting('max_wal_senders')::bigint - count(*) FROM pg_stat_replication",
        ),
    ];
    for (check, setting, sql) in checks {
        let free = number(db, sql, setting).await?;
        let needed = i64::from(!have_slot || check == "wal_senders");
        let finding = if free < needed {
            Finding::new(
                check,
                Severity::Error,
                format!("no free {setting} left ({free} free): pgrelay cannot start replicating"),
            )
            .fix(format!(
                "raise {setting} (ALTER SYSTEM SET {setting} = ...; restart) or drop unused slots"
            ))
        } else if free <= 2 {
            Finding::new(
                check,
                Severity::Warning,
                format!("only {free} free {setting}: hydrating clients each use one more while they copy"),
            )
            .fix(format!("raise {setting} (ALTER SYSTEM SET {setting} = ...; restart)"))
        } else {
            Finding::new(check, Severity::Ok, format!("{free} free {setting}"))
        };
        report.push(finding);
    }
    Ok(())
}

/// The slot pgrelay reads from, and every slot recorded as feeding the
/// change log: present, not invalidated, how much WAL it holds back.
pub(super) async fn slots(
    db: &Client,
    config: &ServerConfig,
    report: &mut Report,
) -> Result<(), ServerError> {
    let recorded = db
        .query_one("SELECT to_regclass('pgrelay.log_slots') IS NOT NULL", &[])
        .await
        .map_err(ServerError::sql("looking for pgrelay.log_slots"))?
        .get::<_, bool>(0);
    let mut names = vec![config.slot.clone()];
    if recorded {
        let rows = db
            .query("SELECT slot_name FROM pgrelay.log_slots", &[])
            .await
            .map_err(ServerError::sql("reading pgrelay.log_slots"))?;
        for row in rows {
            let name: String = row.get(0);
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    let keep = setting(db, "max_slot_wal_keep_size").await?;
    for name in names {
        let row = db
            .query_opt(
                "SELECT plugin, slot_type, database = current_database(), active, \
                        confirmed_flush_lsn::text, wal_status, \
                        pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await
            .map_err(ServerError::sql("reading the slot"))?;
        let was_recorded = recorded
            && db
                .query_opt(
                    "SELECT 1 FROM pgrelay.log_slots WHERE slot_name = $1",
                    &[&name],
                )
                .await
                .map_err(ServerError::sql("reading pgrelay.log_slots"))?
                .is_some();
        let Some(row) = row else {
            report.push(if was_recorded {
                Finding::new(
                    "slot",
                    Severity::Error,
                    format!("slot {name:?} fed the change log but no longer exists: changes since its last position are lost to pgrelay"),
                )
                .fix("start pgrelay serve: it reports the loss, starts a new change-log epoch and every replica re-hydrates once")
            } else {
                Finding::new(
                    "slot",
                    Severity::Info,
                    format!("slot {name:?} does not exist yet; pgrelay serve creates it"),
                )
            });
            continue;
        };
        let plugin: Option<String> = row.get(0);
        let kind: String = row.get(1);
        let this_db: Option<bool> = row.get(2);
        let active: bool = row.get(3);
        let confirmed: Option<String> = row.get(4);
        let status: Option<String> = row.get(5);
        let retained: Option<i64> = row.get(6);
        if kind != "logical" || plugin.as_deref() != Some("pgoutput") || this_db != Some(true) {
            report.push(
                Finding::new(
                    "slot",
                    Severity::Error,
                    format!("slot {name:?} is not a pgoutput logical slot of this database"),
                )
                .fix("pick another --slot name, or drop that slot if nothing uses it"),
            );
            continue;
        }
        let held = retained.map_or_else(|| "unknown".to_owned(), human_bytes);
        let summary = format!(
            "slot {name:?}: {}, confirmed up to {}, holds {held} of WAL (max_slot_wal_keep_size {keep})",
            if active { "in use" } else { "idle" },
            confirmed.as_deref().unwrap_or("-"),
        );
        report.push(match status.as_deref() {
            Some("lost") => Finding::new(
                "slot",
                Severity::Error,
                format!("{summary}: invalidated, PostgreSQL removed WAL it still needed"),
            )
            .fix("start pgrelay serve: it reports the loss and starts a new change-log epoch; raise max_slot_wal_keep_size so a stopped pgrelay survives longer"),
            Some("unreserved") => Finding::new(
                "slot",
                Severity::Warning,
                format!("{summary}: about to be invalidated (wal_status unreserved)"),
            )
            .fix("start pgrelay serve now, or raise max_slot_wal_keep_size"),
            _ if !active => Finding::new(
                "slot",
                Severity::Warning,
                format!("{summary}: nothing is reading it, so PostgreSQL keeps WAL for it"),
            )
            .fix("start pgrelay serve, or drop the slot if pgrelay is gone for good"),
            _ => Finding::new("slot", Severity::Ok, summary),
        });
    }
    Ok(())
}
