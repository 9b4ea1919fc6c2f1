//! How reading the replication stream into the change log fails, beyond
//! PostgreSQL's own errors.

use crate::error::ErrorKind;

#[derive(Clone, Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("replication stream ended")]
    StreamEnded,
    #[error("the change-log writer stopped")]
    WriterStopped,
    #[error("the change-log writer panicked: {0}")]
    WriterPanicked(String),
    #[error("the connection following the change log ended")]
    FollowEnded,
    /// The capture term could not be renewed within the lease: another
    /// node may take over, so this one stops capturing first.
    #[error("the capture term could not be renewed within {0:?}; standing down")]
    LeaseLost(std::time::Duration),
    #[error("another node took over the capture of the slot; standing down")]
    TermOver,
    /// PostgreSQL did not answer in time: unreachable from this node (a
    /// network cut), or overloaded.
    #[error("PostgreSQL did not answer {0} within {1:?}; unreachable from this node?")]
    NoAnswer(&'static str, std::time::Duration),
}

impl ReplicationError {
    /// Whether this node lost the capture (rather than a connection).
    pub(crate) fn stands_down(&self) -> bool {
        matches!(
            self,
            ReplicationError::LeaseLost(_) | ReplicationError::TermOver
        )
    }

    /// All of these end one connection's stream; the next one resumes from
    /// the slot.
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            ReplicationError::StreamEnded
            | ReplicationError::WriterStopped
            | ReplicationError::WriterPanicked(_)
            | ReplicationError::FollowEnded
            | ReplicationError::LeaseLost(_)
            | ReplicationError::TermOver
            | ReplicationError::NoAnswer(..) => ErrorKind::Transient,
        }
    }
}
