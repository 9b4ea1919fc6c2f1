//! How the auth part's own bookkeeping fails: recording who owns a client
//! id, and writing or pruning the audit trail. A refused token is an
//! answer to the client ([`super::TokenRefusal`]), not one of these.

use crate::error::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Pg(#[from] pgrelay_pg::PgError),
    #[error("PostgreSQL error while {context}: {source}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl AuthError {
    pub(crate) fn sql(
        context: impl Into<String>,
    ) -> impl FnOnce(tokio_postgres::Error) -> AuthError {
        let context = context.into();
        move |source| AuthError::Sql { context, source }
    }

    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            AuthError::Pg(e) => ErrorKind::of_pg(e),
            AuthError::Sql { source, .. } => ErrorKind::of_sql(source),
        }
    }
}
