//! What the replication loop reads and asks, as small traits: the stream
//! of assembled events with its confirmations back to the slot, and the
//! catalog that turns a Relation message into a schema change. PostgreSQL
//! implements them in production; the loop's unit tests drive it with
//! in-memory ones under paused time.

use std::future::Future;

use pgrelay_pg::pgoutput::Relation;
use pgrelay_pg::{PgError, ReplicationStream, StreamEvent};
use pgrelay_protocol::Lsn;

use super::schema_change;
use crate::hub::{Frame, Hub};
use crate::ServerError;

/// The replication stream as the loop sees it.
pub(crate) trait EventSource {
    /// The next assembled event; `None` when the stream ended.
    fn recv(&mut self) -> impl Future<Output = Result<Option<StreamEvent>, PgError>> + Send;

    /// Tells the slot everything before `lsn` is durable downstream. Only
    /// after the change log committed it.
    fn confirm(&self, lsn: Lsn);
}

impl EventSource for ReplicationStream {
    fn recv(&mut self) -> impl Future<Output = Result<Option<StreamEvent>, PgError>> + Send {
        ReplicationStream::recv(self)
    }

    fn confirm(&self, lsn: Lsn) {
        ReplicationStream::confirm(self, lsn);
    }
}

/// Where a Relation message is checked against the hub's schemas.
pub(crate) trait Catalog {
    /// The schema frame to publish before the transaction at `before`, when
    /// the table's description changed.
    fn relation(
        &self,
        hub: &Hub,
        relation: &Relation,
        before: Lsn,
    ) -> impl Future<Output = Result<Option<Frame>, ServerError>> + Send;
}

impl Catalog for tokio_postgres::Client {
    fn relation(
        &self,
        hub: &Hub,
        relation: &Relation,
        before: Lsn,
    ) -> impl Future<Output = Result<Option<Frame>, ServerError>> + Send {
        schema_change::apply(self, hub, relation, before)
    }
}
