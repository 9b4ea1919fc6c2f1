//! Errors of the server: each part has its own enum ([`AuthError`], [`HistoryError`],
//! [`ReplicationError`], [`SnapshotError`], [`WriteError`]; a session's
//! refusal is [`crate::session::Refusal`]), and [`ServerError`], what the
//! binary sees, is built from them. Whether trying again can cure an error
//! is decided here, from its [`ErrorKind`], and nowhere else.

pub use crate::auth::AuthError;
pub use crate::history::HistoryError;
pub use crate::replication::ReplicationError;
pub use crate::snapshot::SnapshotError;
pub use crate::writes::WriteError;

/// Whether trying again (after a reconnect) can succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Connection loss, PostgreSQL restarting or busy, a stream cut short.
    Transient,
    /// A mistake or a state that will be the same next time.
    Definite,
}

impl ErrorKind {
    fn of_retryable(retryable: bool) -> ErrorKind {
        if retryable {
            ErrorKind::Transient
        } else {
            ErrorKind::Definite
        }
    }

    /// A failed statement: see [`pgrelay_pg::sql_error_is_retryable`].
    pub(crate) fn of_sql(error: &tokio_postgres::Error) -> ErrorKind {
        ErrorKind::of_retryable(pgrelay_pg::sql_error_is_retryable(error))
    }

    pub(crate) fn of_pg(error: &pgrelay_pg::PgError) -> ErrorKind {
        ErrorKind::of_retryable(error.is_retryable())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Pg(#[from] pgrelay_pg::PgError),
    #[error("PostgreSQL error while {context}: {source}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("a server task panicked: {0}")]
    TaskPanicked(String),
    #[error("migrating schema pgrelay: {0}")]
    Migration(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl ServerError {
    pub(crate) fn sql(
        context: impl Into<String>,
    ) -> impl FnOnce(tokio_postgres::Error) -> ServerError {
        let context = context.into();
        move |source| ServerError::Sql { context, source }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            ServerError::Pg(e) => ErrorKind::of_pg(e),
            ServerError::Sql { source, .. } => ErrorKind::of_sql(source),
            ServerError::Auth(e) => e.kind(),
            ServerError::History(e) => e.kind(),
            ServerError::Replication(e) => e.kind(),
            ServerError::Snapshot(e) => e.kind(),
            ServerError::Write(e) => e.kind(),
            ServerError::TaskPanicked(_)
            | ServerError::Migration(_)
            | ServerError::Config(_)
            | ServerError::Listen { .. } => ErrorKind::Definite,
        }
    }

    /// Whether reconnecting can cure it (connection loss, PostgreSQL
    /// restarting) as opposed to a mistake that will happen again.
    pub fn is_retryable(&self) -> bool {
        self.kind() == ErrorKind::Transient
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_decides_whether_replication_retries() {
        let stream_ended = ServerError::from(ReplicationError::StreamEnded);
        assert!(stream_ended.is_retryable());
        let corrupt = ServerError::from(HistoryError::CorruptLog("op".into()));
        assert_eq!(corrupt.kind(), ErrorKind::Definite);
        assert!(!ServerError::Config("x".into()).is_retryable());
        let decode = pgrelay_pg::PgError::Assemble(pgrelay_pg::AssembleError::Decode(
            pgrelay_pg::pgoutput::DecodeError::Empty,
        ));
        assert!(!ServerError::from(decode).is_retryable());
        let cut = pgrelay_pg::PgError::Assemble(pgrelay_pg::AssembleError::RowOutsideTransaction);
        assert!(ServerError::from(cut).is_retryable());
    }
}
