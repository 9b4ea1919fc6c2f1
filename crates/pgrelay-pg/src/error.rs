//! Errors of the PostgreSQL layer, each with what it was doing.

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("invalid database URL: {0}")]
    BadUrl(String),
    #[error("PostgreSQL error while {context}: {source}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "PostgreSQL has wal_level={current}, but pgrelay needs wal_level=logical for logical replication.\n\
         Fix: run `ALTER SYSTEM SET wal_level = logical;` as a superuser and restart PostgreSQL\n\
         (e.g. `sudo systemctl restart postgresql` or `pg_ctl restart -D <datadir>`), or set\n\
         `wal_level = logical` in postgresql.conf. Also make sure max_replication_slots and\n\
         max_wal_senders are at least 1 (the defaults, 10, are fine)."
    )]
    WalLevel { current: String },
    #[error("replication slot {slot:?} exists but {problem}; drop it (SELECT pg_drop_replication_slot('{slot}')) or pick another with --slot")]
    BadSlot { slot: String, problem: String },
    #[error(
        "replication slot {slot:?} belongs to database {database:?}, but this server syncs {current:?}: \
         another pgrelay serve (or another program) replicates {database:?} through it. \
         Give this server a slot of its own with --slot (e.g. --slot {suggested})"
    )]
    SlotOfOtherDatabase {
        slot: String,
        database: String,
        current: String,
        suggested: String,
    },
    /// The pool could not hand out a connection in time (PostgreSQL slow
    /// to accept one) or is closed.
    #[error("connection pool: {0}")]
    Pool(String),
    /// The URL's TLS settings cannot be used (a root certificate file
    /// missing or empty).
    #[error("TLS to PostgreSQL: {0}")]
    Tls(String),
    #[error("replication stream: {0}")]
    Stream(#[from] pgwire_replication::PgWireError),
    #[error("replication stream: {0}")]
    Assemble(#[from] crate::AssembleError),
}

impl PgError {
    pub(crate) fn sql(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> PgError {
        let context = context.into();
        move |source| PgError::Sql { context, source }
    }

    /// Whether trying again later (after a reconnect) can succeed: network
    /// and server restarts are; configuration mistakes are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            PgError::Sql { source, .. } => sql_error_is_retryable(source),
            PgError::Stream(_) | PgError::Pool(_) => true,
            PgError::BadUrl(_)
            | PgError::Tls(_)
            | PgError::WalLevel { .. }
            | PgError::BadSlot { .. }
            | PgError::SlotOfOtherDatabase { .. } => false,
            PgError::Assemble(e) => e.is_retryable(),
        }
    }
}

/// Whether a failed statement can succeed after a reconnect: no SQLSTATE
/// (the connection broke), or a class that means the server was busy,
/// restarting or the object in use (`55006`: a slot still held by a dying
/// walsender).
pub fn sql_error_is_retryable(error: &tokio_postgres::Error) -> bool {
    error.code().is_none_or(|c| {
        let class = &c.code()[..2];
        matches!(class, "08" | "57" | "53" | "55" | "40" | "58")
    })
}
