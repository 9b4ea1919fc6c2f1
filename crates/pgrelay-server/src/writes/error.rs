//! How applying a client's writes fails for the server (a write PostgreSQL
//! rejects is an answer to the client, not an error).

use crate::error::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Pg(#[from] pgrelay_pg::PgError),
    #[error("PostgreSQL error while {context}: {source}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("the writer is closed")]
    Closed,
    #[error("applying a write batch of {client_id}: {reason}")]
    Batch { client_id: String, reason: String },
    /// Nothing came back in time: PostgreSQL may be unreachable from this
    /// node. Whether the batch committed is unknown; its change ids make
    /// the client's retry safe.
    #[error("PostgreSQL did not answer within {0:?}; this node may have lost it")]
    NoAnswer(std::time::Duration),
}

impl WriteError {
    pub(crate) fn sql(
        context: impl Into<String>,
    ) -> impl FnOnce(tokio_postgres::Error) -> WriteError {
        let context = context.into();
        move |source| WriteError::Sql { context, source }
    }

    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            WriteError::Pg(e) => ErrorKind::of_pg(e),
            WriteError::Sql { source, .. } => ErrorKind::of_sql(source),
            WriteError::Closed => ErrorKind::Definite,
            WriteError::Batch { .. } | WriteError::NoAnswer(_) => ErrorKind::Transient,
        }
    }
}

/// PostgreSQL's own words for an error (tokio-postgres prints "db error").
pub(super) fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}
