//! The application's schema migrations (`pgrelay migrate`): numbered
//! folders of SQL applied to PostgreSQL one transaction each and recorded
//! in `pgrelay.app_migrations`; their client parts stored in
//! `pgrelay.client_migrations` and handed by running servers to every
//! replica, which reports back how it went.
//!
//! ```text
//! migrations/2026..._x/up.sql ──migrate up──▶ PostgreSQL + app_migrations
//!                client_up.sql ─────────────▶ client_migrations ──NOTIFY──▶ servers
//!                                                                 └─▶ sessions ─▶ replicas
//! replicas ──migration_result──▶ client_migration_status (admin API)
//! ```

pub(crate) mod catalog;
mod folder;
mod runner;

use std::path::Path;

pub use folder::{create, read, LocalMigration};
pub use runner::{down, status, up, DownTo, MigrationStatus, State};

/// The channel `pgrelay migrate` notifies when client migrations change.
pub(crate) const NOTIFY_CHANNEL: &str = "pgrelay_client_migrations";

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Folder(String),
    #[error("migration {version} ({name}) was changed after it was applied: its files no longer match the recorded checksum; put them back as they were and write a new migration for the change")]
    Changed { version: i64, name: String },
    #[error("migration {version} ({name}) is applied but its folder is missing; restore it to roll it back")]
    Missing { version: i64, name: String },
    #[error("migration {version} ({name}) failed and was rolled back: {message}")]
    Failed {
        version: i64,
        name: String,
        message: String,
    },
    #[error("{context}: {message}")]
    Sql { context: String, message: String },
}

impl MigrateError {
    fn io(path: &Path, source: std::io::Error) -> MigrateError {
        MigrateError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    fn sql(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> MigrateError {
        move |e| MigrateError::Sql {
            context: context.to_owned(),
            message: describe(&e),
        }
    }
}

/// PostgreSQL's own message for a failed statement, not the driver's
/// "db error".
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => e.to_string(),
    }
}
