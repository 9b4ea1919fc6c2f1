//! Errors of the server, each with what it was doing.

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
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error("the change log holds something pgrelay did not write: {0}")]
    CorruptLog(String),
    #[error("the change log no longer holds what follows {position}: retention pruned it through {pruned_through}")]
    Pruned {
        position: pgrelay_protocol::Lsn,
        pruned_through: pgrelay_protocol::Lsn,
    },
    #[error("migrating schema pgrelay: {0}")]
    Migration(String),
    #[error("too large: {0}")]
    TooLarge(&'static str),
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

    /// Whether reconnecting can cure it (connection loss, PostgreSQL
    /// restarting) as opposed to a mistake that will happen again.
    pub fn is_retryable(&self) -> bool {
        match self {
            ServerError::Pg(e) => e.is_retryable(),
            ServerError::Sql { source, .. } => pgrelay_pg::sql_error_is_retryable(source),
            ServerError::Protocol(_) => true,
            ServerError::CorruptLog(_)
            | ServerError::Pruned { .. }
            | ServerError::Migration(_)
            | ServerError::TooLarge(_)
            | ServerError::Config(_)
            | ServerError::Listen { .. } => false,
        }
    }
}
