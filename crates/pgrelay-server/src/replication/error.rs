//! How reading the replication stream into the change log fails, beyond
//! PostgreSQL's own errors.

use crate::error::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("replication stream ended")]
    StreamEnded,
    #[error("the change-log writer stopped")]
    WriterStopped,
    #[error("the change-log writer panicked: {0}")]
    WriterPanicked(String),
}

impl ReplicationError {
    /// All of these end one connection's stream; the next one resumes from
    /// the slot.
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            ReplicationError::StreamEnded
            | ReplicationError::WriterStopped
            | ReplicationError::WriterPanicked(_) => ErrorKind::Transient,
        }
    }
}
