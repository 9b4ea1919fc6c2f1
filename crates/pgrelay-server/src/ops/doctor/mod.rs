//! `pgrelay doctor`: checks a PostgreSQL (and pgrelay's state in it) for
//! what will break syncing, before it breaks: each finding has a severity
//! and the exact fix. `pgrelay serve` runs the same checks at start and
//! logs what they find.

use std::time::Duration;

use pgrelay_pg::ConnInfo;
use secrecy::ExposeSecret;
use serde::Serialize;
use tokio_postgres::Client;

mod slots;

use slots::{capacity, slots};

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
    pub(super) fn new(
        check: &'static str,
        severity: Severity,
        message: impl Into<String>,
    ) -> Finding {
        Finding {
            check,
            severity,
            message: message.into(),
            fix: None,
        }
    }

    pub(super) fn fix(mut self, fix: impl Into<String>) -> Finding {
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

    pub(super) fn push(&mut self, finding: Finding) {
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

pub(super) async fn setting(db: &Client, name: &str) -> Result<String, ServerError> {
    let row = db
        .query_one("SELECT current_setting($1)", &[&name])
        .await
        .map_err(ServerError::sql(format!("reading {name}")))?;
    Ok(row.get(0))
}

pub(super) async fn number(db: &Client, sql: &str, what: &str) -> Result<i64, ServerError> {
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

#[allow(
    clippy::cast_precision_loss,
    reason = "shown rounded to one decimal: the lost precision is never seen"
)]
pub(super) fn human_bytes(bytes: i64) -> String {
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
