//! How applying a client's writes fails for the server (a write PostgreSQL
//! rejects is an answer to the client, not an error).

use crate::error::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the writer is closed")]
    Closed,
    #[error("applying a write batch of {client_id}: {reason}")]
    Batch { client_id: String, reason: String },
}

impl WriteError {
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            WriteError::Closed => ErrorKind::Definite,
            WriteError::Batch { .. } => ErrorKind::Transient,
        }
    }
}
