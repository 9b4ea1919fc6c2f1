//! `pgrelay doctor`: checks a PostgreSQL (and pgrelay's state in it) for
//! what will break syncing, before it breaks: each finding has a severity
//! and the exact fix. `pgrelay serve` runs the same checks at start and
//! logs what they find.

use std::time::Duration;

use pgrelay_pg::ConnInfo;
use secrecy::ExposeSecret;
use serde::Serialize;
use tokio_postgres::Client;

use crate::auth::Rules;
use crate::{ServerConfig, ServerError};

/// The oldest PostgreSQL pgrelay supports (pgoutput protocol 2, streamed
/// transactions, `pg_replication_slots.wal_status`).
const MIN_VERSION: i32 = 140_000;
/// Fewer free connections than this is worth a warning: every node holds
/// a few, and a hydration takes one more per client.
const LOW_CONNECTION_HEADROOM: i64 = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    Info,
    Warning,
    Error,
}

/// One check's verdict.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// Which check (stable, for scripts): `version`, `wal_level`, `slots`,
    /// `wal_senders`, `slot`, `publication`, `identity`, `rule_identity`,
    /// `connections`, `change_log`.
    pub check: &'static str,
    pub severity: Severity,
    pub message: String,
    /// What to do about it, when something is to be done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn new(check: &'static str, severity: Severity, message: impl Into<String>) -> Finding {
        Finding {
            check,
            severity,
            message: message.into(),
            fix: None,
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Finding {
        self.fix = Some(fix.into());
        self
    }
}

/// Everything the checks found, in the order they ran.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    /// The worst severity found (`Ok` for none).
    pub fn worst(&self) -> Severity {
        self.findings
            .iter()
            .map(|f| f.severity)
            .max()
            .unwrap_or(Severity::Ok)
    }

    fn push(&mut self, finding: Finding) {
        self.findings.push(finding);
    }
}

/// Connects to the configured database and runs every check.
pub async fn diagnose(config: &ServerConfig) -> Result<Report, ServerError> {
    let url = config
        .database_url
        .as_ref()
        .ok_or_else(|| ServerError::Config("doctor needs --database-url".to_owned()))?;
    let info = ConnInfo::parse(url.expose_secret())?;
    let db = pgrelay_pg::connect(&info).await?;
    run_checks(&db, config).await
}

/// Runs every check on an open connection.
pub(crate) async fn run_checks(db: &Client, config: &ServerConfig) -> Result<Report, ServerError> {
    let mut report = Report::default();
    version(db, &mut report).await?;
    let logical = wal_level(db, &mut report).await?;
    capacity(db, config, &mut report).await?;
    if logical {
        slots(db, config, &mut report).await?;
    }
    let tables = pgrelay_pg::discover_tables(db, &config.tables).await?;
    identity(&tables, &mut report);
    publication(db, config, &tables, &mut report).await?;
    rule_identity(db, config, &tables, &mut report).await?;
    connections(db, &mut report).await?;
    change_log(db, config.retain, &mut report).await?;
    Ok(report)
}

/// Logs each finding at a level matching its severity.
pub(crate) fn log(report: &Report) {
    for f in &report.findings {
        let fix = f.fix.as_deref().unwrap_or("");
        match f.severity {
            Severity::Ok => tracing::debug!(check = f.check, "{}", f.message),
            Severity::Info => tracing::info!(check = f.check, "{}", f.message),
            Severity::Warning => tracing::warn!(check = f.check, fix, "{}", f.message),
            Severity::Error => tracing::error!(check = f.check, fix, "{}", f.message),
        }
    }
}

async fn setting(db: &Client, name: &str) -> Result<String, ServerError> {
    let row = db
        .query_one("SELECT current_setting($1)", &[&name])
        .await
        .map_err(ServerError::sql(format!("reading {name}")))?;
    Ok(row.get(0))
}

async fn number(db: &Client, sql: &str, what: &str) -> Result<i64, ServerError> {
    let row = db
        .query_one(sql, &[])
        .await
        .map_err(ServerError::sql(what.to_owned()))?;
    Ok(row.get(0))
}

async fn version(db: &Client, report: &mut Report) -> Result<(), ServerError> {
    let text = setting(db, "server_version").await?;
    let num: i32 = setting(db, "server_version_num")
        .await?
        .parse()
        .unwrap_or(0);
    report.push(if num >= MIN_VERSION {
        Finding::new("version", Severity::Ok, format!("PostgreSQL {text}"))
    } else {
        Finding::new(
            "version",
            Severity::Error,
            format!("PostgreSQL {text} is older than 14, the oldest pgrelay supports"),
        )
        .fix("upgrade PostgreSQL to 14 or later (15+ recommended)")
    });
    Ok(())
}

async fn wal_level(db: &Client, report: &mut Report) -> Result<bool, ServerError> {
    let level = setting(db, "wal_level").await?;
    let logical = level == "logical";
    report.push(if logical {
        Finding::new("wal_level", Severity::Ok, "wal_level=logical")
    } else {
        Finding::new(
            "wal_level",
            Severity::Error,
            format!(
                "wal_level={level}: logical replication is off, pgrelay cannot capture changes"
            ),
        )
        .fix("ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL")
    });
    Ok(logical)
}

/// Free replication slots and WAL senders: pgrelay needs one of each for
/// its slot (unless the slot exists), plus one slot per hydrating client.
async fn capacity(
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
async fn slots(db: &Client, config: &ServerConfig, report: &mut Report) -> Result<(), ServerError> {
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

/// Tables that cannot be synced (no primary key, no replica identity).
fn identity(tables: &[pgrelay_protocol::TableSchema], report: &mut Report) {
    let skipped: Vec<_> = tables.iter().filter(|t| t.skipped.is_some()).collect();
    if tables.is_empty() {
        report.push(Finding::new(
            "identity",
            Severity::Info,
            "no table to sync yet; tables created later are picked up",
        ));
    } else if skipped.is_empty() {
        report.push(Finding::new(
            "identity",
            Severity::Ok,
            format!("{} tables to sync, each with a key", tables.len()),
        ));
    }
    for table in skipped {
        report.push(
            Finding::new(
                "identity",
                Severity::Warning,
                format!(
                    "{} is not synced: {}",
                    table.name,
                    table.skipped.as_deref().unwrap_or("")
                ),
            )
            .fix(format!(
                "ALTER TABLE {} ADD PRIMARY KEY (...); or ALTER TABLE {} REPLICA IDENTITY FULL",
                pgrelay_protocol::quote_table(&table.name),
                pgrelay_protocol::quote_table(&table.name)
            )),
        );
    }
}

/// The publication against the tables to sync.
async fn publication(
    db: &Client,
    config: &ServerConfig,
    tables: &[pgrelay_protocol::TableSchema],
    report: &mut Report,
) -> Result<(), ServerError> {
    let name = config.publication();
    let exists = db
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await
        .map_err(ServerError::sql("looking up the publication"))?
        .is_some();
    if !exists {
        report.push(Finding::new(
            "publication",
            Severity::Info,
            format!("publication {name:?} does not exist yet; pgrelay serve creates it"),
        ));
        return Ok(());
    }
    let published: Vec<String> = db
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(ServerError::sql("listing the publication's tables"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let synced: Vec<&str> = tables
        .iter()
        .filter(|t| t.skipped.is_none())
        .map(|t| t.name.as_str())
        .collect();
    let missing: Vec<&str> = synced
        .iter()
        .copied()
        .filter(|t| !published.iter().any(|p| p == t))
        .collect();
    let extra: Vec<&str> = published
        .iter()
        .map(String::as_str)
        .filter(|p| !synced.contains(p))
        .collect();
    report.push(if missing.is_empty() && extra.is_empty() {
        Finding::new(
            "publication",
            Severity::Ok,
            format!("publication {name:?} lists exactly the {} synced tables", synced.len()),
        )
    } else {
        Finding::new(
            "publication",
            Severity::Warning,
            format!(
                "publication {name:?} differs from the tables to sync: missing {missing:?}, extra {extra:?}"
            ),
        )
        .fix("start pgrelay serve with these flags: it sets the publication's tables")
    });
    Ok(())
}

/// Tables whose read rule looks past the key need REPLICA IDENTITY FULL.
async fn rule_identity(
    db: &Client,
    config: &ServerConfig,
    tables: &[pgrelay_protocol::TableSchema],
    report: &mut Report,
) -> Result<(), ServerError> {
    let Some(text) = config.auth.as_ref().and_then(|a| a.rules.as_deref()) else {
        return Ok(());
    };
    let rules = match Rules::parse(text).and_then(|r| r.check(tables).map(|()| r)) {
        Ok(rules) => rules,
        Err(e) => {
            report.push(
                Finding::new("rule_identity", Severity::Error, format!("rules: {e}"))
                    .fix("correct the rules file"),
            );
            return Ok(());
        }
    };
    for table in rules.need_full_identity(tables) {
        let quoted = pgrelay_protocol::quote_table(&table);
        let full = pgrelay_pg::has_full_identity(db, &table).await?;
        report.push(if full {
            Finding::new(
                "rule_identity",
                Severity::Ok,
                format!("{table}: REPLICA IDENTITY FULL, as its read rule needs"),
            )
        } else {
            Finding::new(
                "rule_identity",
                Severity::Warning,
                format!(
                    "{table}: its read rule looks at columns outside the key, so updates must carry the old row; pgrelay serve sets REPLICA IDENTITY FULL if it owns the table"
                ),
            )
            .fix(format!("ALTER TABLE {quoted} REPLICA IDENTITY FULL (as the table's owner)"))
        });
    }
    Ok(())
}

async fn connections(db: &Client, report: &mut Report) -> Result<(), ServerError> {
    let free = number(
        db,
        "SELECT current_setting('max_connections')::bigint \
                - current_setting('superuser_reserved_connections')::bigint \
                - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')",
        "counting connections",
    )
    .await?;
    report.push(if free < LOW_CONNECTION_HEADROOM {
        Finding::new(
            "connections",
            Severity::Warning,
            format!("only {free} connections left before max_connections"),
        )
        .fix("raise max_connections, or put a pooler in front of other applications")
    } else {
        Finding::new(
            "connections",
            Severity::Ok,
            format!("{free} connections left before max_connections"),
        )
    });
    Ok(())
}

/// The change log's size and the age of its oldest entry.
async fn change_log(db: &Client, retain: Duration, report: &mut Report) -> Result<(), ServerError> {
    let exists: bool = db
        .query_one(
            "SELECT to_regclass('pgrelay.change_history') IS NOT NULL",
            &[],
        )
        .await
        .map_err(ServerError::sql("looking for the change log"))?
        .get(0);
    if !exists {
        report.push(Finding::new(
            "change_log",
            Severity::Info,
            "no change log yet; pgrelay serve creates pgrelay.change_history",
        ));
        return Ok(());
    }
    // The oldest entry by key (the index), not by a scan of commit times.
    let row = db
        .query_one(
            "SELECT pg_total_relation_size('pgrelay.change_history'), \
                    (SELECT extract(epoch FROM now() - commit_time)::bigint \
                     FROM pgrelay.change_history ORDER BY lsn, ordinal LIMIT 1)",
            &[],
        )
        .await
        .map_err(ServerError::sql("sizing the change log"))?;
    let (bytes, age): (i64, Option<i64>) = (row.get(0), row.get(1));
    let retain_s = i64::try_from(retain.as_secs()).unwrap_or(i64::MAX);
    let age_text = age.map_or_else(|| "empty".to_owned(), |s| format!("oldest entry {s} s old"));
    report.push(match age {
        // Retention prunes at least every minute: ten minutes past it
        // means nothing is pruning.
        Some(age) if age > retain_s.saturating_add(600) => Finding::new(
            "change_log",
            Severity::Warning,
            format!(
                "change log {} ({age_text}), older than the retention of {} s: nothing is pruning it",
                human_bytes(bytes),
                retain_s
            ),
        )
        .fix("run pgrelay serve (it prunes past --retain) with the same --retain"),
        _ => Finding::new(
            "change_log",
            Severity::Ok,
            format!("change log {} ({age_text}), retention {retain_s} s", human_bytes(bytes)),
        ),
    });
    Ok(())
}

fn human_bytes(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512.0 B");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn the_worst_finding_decides() {
        let mut report = Report::default();
        assert_eq!(report.worst(), Severity::Ok);
        report.push(Finding::new("a", Severity::Warning, ""));
        report.push(Finding::new("b", Severity::Info, ""));
        assert_eq!(report.worst(), Severity::Warning);
    }
}
