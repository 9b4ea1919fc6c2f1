//! The `migrations` check (`pgrelay doctor --migrations DIR`): pending
//! migrations are a warning, applied ones whose files changed an error.

use std::path::Path;

use tokio_postgres::Client;

use super::{Finding, Report, Severity};
use crate::schema_migrations::{self, State};
use crate::ServerError;

pub(super) async fn check(db: &Client, dir: &Path, report: &mut Report) -> Result<(), ServerError> {
    let local = match schema_migrations::read(dir) {
        Ok(local) => local,
        Err(e) => {
            report.push(
                Finding::new(
                    "migrations",
                    Severity::Error,
                    format!("cannot read {}: {e}", dir.display()),
                )
                .fix("point --migrations at the folder of YYYYMMDDHHMMSS_name migration folders"),
            );
            return Ok(());
        }
    };
    let recorded = db
        .query_one(
            "SELECT to_regclass('pgrelay.app_migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(ServerError::sql("looking for pgrelay.app_migrations"))?
        .get::<_, bool>(0);
    let lines = if recorded {
        schema_migrations::status(db, &local)
            .await
            .map_err(|e| ServerError::Migration(e.to_string()))?
    } else {
        Vec::new()
    };
    let pending: Vec<String> = if recorded {
        named(&lines, State::Pending)
    } else {
        local
            .iter()
            .map(|m| format!("{} {}", m.version, m.name))
            .collect()
    };
    let changed = named(&lines, State::Changed);
    let missing = named(&lines, State::Missing);
    let dir_arg = dir.display();
    if !changed.is_empty() {
        report.push(
            Finding::new(
                "migrations",
                Severity::Error,
                format!("applied migrations changed since: {}", changed.join(", ")),
            )
            .fix("restore their files as applied and put the change in a new migration (`pgrelay migrate new`)"),
        );
    }
    if !pending.is_empty() {
        report.push(
            Finding::new(
                "migrations",
                Severity::Warning,
                format!("pending migrations: {}", pending.join(", ")),
            )
            .fix(format!("pgrelay migrate up --dir {dir_arg}")),
        );
    }
    if !missing.is_empty() {
        report.push(
            Finding::new(
                "migrations",
                Severity::Warning,
                format!(
                    "applied migrations with no folder in {dir_arg}: {}",
                    missing.join(", ")
                ),
            )
            .fix("restore their folders (needed to roll them back)"),
        );
    }
    if changed.is_empty() && pending.is_empty() && missing.is_empty() {
        report.push(Finding::new(
            "migrations",
            Severity::Ok,
            format!("all {} migrations in {dir_arg} are applied", local.len()),
        ));
    }
    Ok(())
}

fn named(lines: &[schema_migrations::MigrationStatus], state: State) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.state == state)
        .map(|l| format!("{} {}", l.version, l.name))
        .collect()
}
