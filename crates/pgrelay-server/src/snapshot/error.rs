//! How reading a snapshot fails, beyond PostgreSQL's own errors.

use crate::error::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Pg(#[from] pgrelay_pg::PgError),
    #[error("PostgreSQL error while {context}: {source}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("unexpected pg_current_snapshot() {0:?}")]
    Visibility(String),
    #[error("compressing a snapshot chunk: {0}")]
    Compress(#[source] std::io::Error),
}

impl SnapshotError {
    pub(crate) fn sql(
        context: impl Into<String>,
    ) -> impl FnOnce(tokio_postgres::Error) -> SnapshotError {
        let context = context.into();
        move |source| SnapshotError::Sql { context, source }
    }

    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            SnapshotError::Pg(e) => ErrorKind::of_pg(e),
            SnapshotError::Sql { source, .. } => ErrorKind::of_sql(source),
            SnapshotError::Visibility(_) | SnapshotError::Compress(_) => ErrorKind::Definite,
        }
    }
}
