//! How reading or writing the change log fails, beyond PostgreSQL's own
//! errors.

use pgrelay_protocol::Lsn;

use crate::error::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(transparent)]
    Pg(#[from] pgrelay_pg::PgError),
    #[error("PostgreSQL error while {context}: {source}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("the change log holds something pgrelay did not write: {0}")]
    CorruptLog(String),
    #[error("the change log no longer holds what follows {position}: retention pruned it through {pruned_through}")]
    Pruned { position: Lsn, pruned_through: Lsn },
    #[error("too large: {0}")]
    TooLarge(&'static str),
    /// Another node took over the capture of this slot (a newer term): this
    /// node's append was refused and it must stand down.
    #[error("capture term {term} of slot {slot:?} is over: another node captures it now")]
    Fenced { slot: String, term: i64 },
}

impl HistoryError {
    pub(crate) fn sql(
        context: impl Into<String>,
    ) -> impl FnOnce(tokio_postgres::Error) -> HistoryError {
        let context = context.into();
        move |source| HistoryError::Sql { context, source }
    }

    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            HistoryError::Pg(e) => ErrorKind::of_pg(e),
            HistoryError::Sql { source, .. } => ErrorKind::of_sql(source),
            HistoryError::CorruptLog(_)
            | HistoryError::Pruned { .. }
            | HistoryError::TooLarge(_)
            | HistoryError::Fenced { .. } => ErrorKind::Definite,
        }
    }
}
