//! Turns the replication stream's events into whole transactions: Begin,
//! row messages (decoded from pgoutput), Commit. The server sees only the
//! [`StreamEvent`]s this yields, never the wire crate's events.
//!
//! pgrelay asks for pgoutput protocol version 1 without `streaming`, so
//! PostgreSQL sends a large transaction only once it has committed, in one
//! Begin … Commit run; a Relation message may arrive inside that run.

use std::collections::HashMap;

use pgrelay_protocol::{Change, Lsn, Op, Transaction};
use pgwire_replication::ReplicationEvent;

use crate::pgoutput::{self, DecodeError, Relation, RowMessage};

/// The logical-message prefix a pgrelay write uses to name the client it
/// came from (`pg_logical_emit_message(true, 'pgrelay.origin', client_id)`).
pub const ORIGIN_PREFIX: &str = "pgrelay.origin";

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// What one event of the replication stream amounted to.
#[derive(Debug, PartialEq)]
pub enum StreamEvent {
    /// A transaction committed; `end_lsn` is where the stream resumes after it.
    Committed { tx: Transaction, end_lsn: Lsn },
    /// A table's description arrived (its columns may have changed); the
    /// rows that follow are read with it.
    Relation(Relation),
    /// No transaction is open and PostgreSQL's WAL has reached `wal_end`:
    /// nothing decoded before it is still on its way.
    Idle { wal_end: Lsn },
    /// The stream is alive and an open transaction moved along (a begin, a
    /// row, a message, a keepalive while one is open).
    Progress,
}

/// Why the stream's events do not make a transaction.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssembleError {
    #[error("commit at {commit_lsn} without a begin")]
    CommitWithoutBegin { commit_lsn: Lsn },
    #[error("row for relation {oid} before its Relation message")]
    UnknownRelation { oid: u32 },
    #[error("row change outside a transaction")]
    RowOutsideTransaction,
    #[error("decoding pgoutput: {0}")]
    Decode(#[from] DecodeError),
}

impl AssembleError {
    /// Whether reading the stream again (from the slot) can cure it: an
    /// out-of-order event can be a connection cut mid-message; a message
    /// that does not decode will not decode again.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, AssembleError::Decode(_))
    }
}

/// The relations seen so far and the transaction being assembled.
#[derive(Default)]
pub(crate) struct Assembler {
    relations: HashMap<u32, Relation>,
    open: Option<Transaction>,
}

impl Assembler {
    pub(crate) fn feed(&mut self, event: ReplicationEvent) -> Result<StreamEvent, AssembleError> {
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                self.begin(Lsn(final_lsn.0), xid, commit_time_micros);
                Ok(StreamEvent::Progress)
            }
            ReplicationEvent::XLogData { data, .. } => self.data(&data),
            ReplicationEvent::Message {
                prefix, content, ..
            } => {
                self.message(&prefix, &content);
                Ok(StreamEvent::Progress)
            }
            ReplicationEvent::Commit {
                lsn,
                end_lsn,
                commit_time_micros,
            } => self.commit(Lsn(lsn.0), Lsn(end_lsn.0), commit_time_micros),
            ReplicationEvent::KeepAlive { wal_end, .. } if self.open.is_none() => {
                Ok(StreamEvent::Idle {
                    wal_end: Lsn(wal_end.0),
                })
            }
            ReplicationEvent::KeepAlive { .. } | ReplicationEvent::StoppedAt { .. } => {
                Ok(StreamEvent::Progress)
            }
        }
    }

    fn begin(&mut self, final_lsn: Lsn, xid: u32, commit_time_pg_us: i64) {
        self.open = Some(Transaction {
            lsn: final_lsn,
            xid,
            commit_time_us: commit_time_pg_us + PG_EPOCH_US,
            origin: None,
            changes: Vec::new(),
        });
    }

    fn message(&mut self, prefix: &str, content: &[u8]) {
        if prefix == ORIGIN_PREFIX {
            if let Some(tx) = self.open.as_mut() {
                tx.origin = Some(String::from_utf8_lossy(content).into_owned());
            }
        }
    }

    fn commit(
        &mut self,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time_pg_us: i64,
    ) -> Result<StreamEvent, AssembleError> {
        let mut tx = self
            .open
            .take()
            .ok_or(AssembleError::CommitWithoutBegin { commit_lsn })?;
        tx.lsn = commit_lsn;
        tx.commit_time_us = commit_time_pg_us + PG_EPOCH_US;
        Ok(StreamEvent::Committed { tx, end_lsn })
    }

    /// Decodes one pgoutput message carried as XLogData.
    fn data(&mut self, bytes: &[u8]) -> Result<StreamEvent, AssembleError> {
        let change = match pgoutput::decode(bytes)? {
            RowMessage::Relation(rel) => {
                self.relations.insert(rel.oid, rel.clone());
                return Ok(StreamEvent::Relation(rel));
            }
            RowMessage::Insert { relation_oid, new } => {
                let rel = self.known(relation_oid)?;
                Change {
                    table: rel.qualified_name(),
                    op: Op::Insert,
                    new: Some(pgoutput::tuple_to_row(rel, new)?),
                    old: None,
                }
            }
            RowMessage::Update {
                relation_oid,
                old,
                new,
            } => {
                let rel = self.known(relation_oid)?;
                let old = old
                    .map(|o| pgoutput::old_tuple_to_row(rel, o))
                    .transpose()?;
                Change {
                    table: rel.qualified_name(),
                    op: Op::Update,
                    new: Some(pgoutput::tuple_to_row(rel, new)?),
                    old,
                }
            }
            RowMessage::Delete { relation_oid, old } => {
                let rel = self.known(relation_oid)?;
                Change {
                    table: rel.qualified_name(),
                    op: Op::Delete,
                    new: None,
                    old: Some(pgoutput::old_tuple_to_row(rel, old)?),
                }
            }
            RowMessage::Truncate { relation_oids, .. } => {
                let tables = relation_oids
                    .iter()
                    .map(|oid| self.known(*oid).map(Relation::qualified_name))
                    .collect::<Result<Vec<_>, _>>()?;
                let tx = self.open_tx()?;
                tx.changes.extend(tables.into_iter().map(|table| Change {
                    table,
                    op: Op::Truncate,
                    new: None,
                    old: None,
                }));
                return Ok(StreamEvent::Progress);
            }
            RowMessage::Begin {
                final_lsn,
                commit_time_us_pg,
                xid,
            } => {
                self.begin(Lsn(final_lsn), xid, commit_time_us_pg);
                return Ok(StreamEvent::Progress);
            }
            RowMessage::Commit {
                commit_lsn,
                end_lsn,
                commit_time_us_pg,
                ..
            } => return self.commit(Lsn(commit_lsn), Lsn(end_lsn), commit_time_us_pg),
            RowMessage::Message {
                prefix, content, ..
            } => {
                self.message(&prefix, &content);
                return Ok(StreamEvent::Progress);
            }
            RowMessage::Type { .. } | RowMessage::Origin { .. } => {
                return Ok(StreamEvent::Progress)
            }
        };
        self.open_tx()?.changes.push(change);
        Ok(StreamEvent::Progress)
    }

    fn known(&self, oid: u32) -> Result<&Relation, AssembleError> {
        self.relations
            .get(&oid)
            .ok_or(AssembleError::UnknownRelation { oid })
    }

    fn open_tx(&mut self) -> Result<&mut Transaction, AssembleError> {
        self.open
            .as_mut()
            .ok_or(AssembleError::RowOutsideTransaction)
    }
}

#[cfg(test)]
mod tests;
