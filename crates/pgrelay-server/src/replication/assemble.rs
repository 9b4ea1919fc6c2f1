//! Turns the replication stream's events into whole transactions: Begin,
//! row messages (decoded from pgoutput), Commit.

use std::collections::HashMap;

use pgrelay_pg::pgoutput::{self, Relation, RowMessage};
use pgrelay_protocol::{Change, Lsn, Op, Transaction};

use crate::ServerError;

/// The logical-message prefix a pgrelay write uses to name the client it
/// came from (`pg_logical_emit_message(true, 'pgrelay.origin', client_id)`).
pub(crate) const ORIGIN_PREFIX: &str = "pgrelay.origin";

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_US: i64 = 946_684_800_000_000;

pub(crate) struct Assembler {
    relations: HashMap<u32, Relation>,
    open: Option<Transaction>,
}

/// What one stream event amounted to.
pub(crate) enum Assembled {
    Nothing,
    /// A relation (table) description arrived; its columns may have changed.
    Relation(u32),
    /// A transaction committed; `end_lsn` is where the stream resumes after it.
    Committed {
        tx: Transaction,
        end_lsn: Lsn,
    },
}

impl Assembler {
    pub(crate) fn new() -> Assembler {
        Assembler {
            relations: HashMap::new(),
            open: None,
        }
    }

    pub(crate) fn relation(&self, oid: u32) -> Option<&Relation> {
        self.relations.get(&oid)
    }

    /// Whether a transaction has begun and not yet committed.
    pub(crate) fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    pub(crate) fn begin(&mut self, final_lsn: Lsn, xid: u32, commit_time_pg_us: i64) {
        self.open = Some(Transaction {
            lsn: final_lsn,
            xid,
            commit_time_us: commit_time_pg_us + PG_EPOCH_US,
            origin: None,
            changes: Vec::new(),
        });
    }

    pub(crate) fn message(&mut self, prefix: &str, content: &[u8]) {
        if prefix == ORIGIN_PREFIX {
            if let Some(tx) = self.open.as_mut() {
                tx.origin = Some(String::from_utf8_lossy(content).into_owned());
            }
        }
    }

    pub(crate) fn commit(
        &mut self,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time_pg_us: i64,
    ) -> Result<Assembled, ServerError> {
        let mut tx = self.open.take().ok_or_else(|| {
            ServerError::Protocol(format!("commit at {commit_lsn} without a begin"))
        })?;
        tx.lsn = commit_lsn;
        tx.commit_time_us = commit_time_pg_us + PG_EPOCH_US;
        Ok(Assembled::Committed { tx, end_lsn })
    }

    /// Decodes one pgoutput message carried as XLogData.
    pub(crate) fn data(&mut self, bytes: &[u8]) -> Result<Assembled, ServerError> {
        let message = pgoutput::decode(bytes).map_err(pgrelay_pg::PgError::from)?;
        let change = match message {
            RowMessage::Relation(rel) => {
                let oid = rel.oid;
                self.relations.insert(oid, rel);
                return Ok(Assembled::Relation(oid));
            }
            RowMessage::Insert { relation_oid, new } => {
                let rel = self.known(relation_oid)?;
                let new = pgoutput::tuple_to_row(rel, new).map_err(pgrelay_pg::PgError::from)?;
                Change {
                    table: rel.qualified_name(),
                    op: Op::Insert,
                    new: Some(new),
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
                    .transpose()
                    .map_err(pgrelay_pg::PgError::from)?;
                let new = pgoutput::tuple_to_row(rel, new).map_err(pgrelay_pg::PgError::from)?;
                Change {
                    table: rel.qualified_name(),
                    op: Op::Update,
                    new: Some(new),
                    old,
                }
            }
            RowMessage::Delete { relation_oid, old } => {
                let rel = self.known(relation_oid)?;
                let old =
                    pgoutput::old_tuple_to_row(rel, old).map_err(pgrelay_pg::PgError::from)?;
                Change {
                    table: rel.qualified_name(),
                    op: Op::Delete,
                    new: None,
                    old: Some(old),
                }
            }
            RowMessage::Truncate { relation_oids, .. } => {
                let tables = relation_oids
                    .iter()
                    .map(|oid| self.known(*oid).map(Relation::qualified_name))
                    .collect::<Result<Vec<_>, _>>()?;
                let tx = self.open_tx()?;
                for table in tables {
                    tx.changes.push(Change {
                        table,
                        op: Op::Truncate,
                        new: None,
                        old: None,
                    });
                }
                return Ok(Assembled::Nothing);
            }
            RowMessage::Begin {
                final_lsn,
                commit_time_us_pg,
                xid,
            } => {
                self.begin(Lsn(final_lsn), xid, commit_time_us_pg);
                return Ok(Assembled::Nothing);
            }
            RowMessage::Commit {
                commit_lsn,
                end_lsn,
                commit_time_us_pg,
                ..
            } => {
                return self.commit(Lsn(commit_lsn), Lsn(end_lsn), commit_time_us_pg);
            }
            RowMessage::Message {
                prefix, content, ..
            } => {
                self.message(&prefix, &content);
                return Ok(Assembled::Nothing);
            }
            RowMessage::Type { .. } | RowMessage::Origin { .. } => return Ok(Assembled::Nothing),
        };
        self.open_tx()?.changes.push(change);
        Ok(Assembled::Nothing)
    }

    fn known(&self, oid: u32) -> Result<&Relation, ServerError> {
        self.relations.get(&oid).ok_or_else(|| {
            ServerError::Protocol(format!(
                "row for relation {oid} before its Relation message"
            ))
        })
    }

    fn open_tx(&mut self) -> Result<&mut Transaction, ServerError> {
        self.open
            .as_mut()
            .ok_or_else(|| ServerError::Protocol("row change outside a transaction".to_owned()))
    }
}
