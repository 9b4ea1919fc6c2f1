//! Errors of the event-log backend, each saying which store and what it was doing.

#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("event-log SQLite {context}: {source}")]
    Sqlite {
        context: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("event-log PostgreSQL {context}: {source}")]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("event-log storage: {0}")]
    Storage(String),
    #[error("the event-log backend is shutting down")]
    ShuttingDown,
}

impl EventLogError {
    pub(crate) fn sqlite(
        context: impl Into<String>,
    ) -> impl FnOnce(rusqlite::Error) -> EventLogError {
        let context = context.into();
        move |source| EventLogError::Sqlite { context, source }
    }

    pub(crate) fn postgres(
        context: impl Into<String>,
    ) -> impl FnOnce(tokio_postgres::Error) -> EventLogError {
        let context = context.into();
        move |source| EventLogError::Postgres { context, source }
    }
}
