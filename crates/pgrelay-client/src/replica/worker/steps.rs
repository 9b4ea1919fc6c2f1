//! The replica thread's longer steps, apart from its command loop: a
//! snapshot load kept open across chunks, repair steps, and the digests
//! kept for repairs, made while the thread is idle.

use super::super::{digests, load, repair, snapshot, Command, RepairStep};
use super::Worker;
use crate::ClientError;
use pgrelay_protocol::copy_text::Rows;

impl Worker {
    /// Before `command`: a load in progress is committed so far (paused),
    /// or finished when the command changes what the load relies on.
    pub(super) fn settle_load(&mut self, command: &Command) {
        let Some(load) = self.load.as_mut() else {
            return;
        };
        let finish = match command {
            Command::LoadSnapshot(table, ..) | Command::EndLoad(table, _) => {
                if table == load.table() {
                    return;
                }
                true
            }
            Command::BeginSnapshot(..)
            | Command::ClearTable(..)
            | Command::FinishSnapshot(..)
            | Command::ApplySchema(..)
            | Command::RunMigration(..)
            | Command::Reset(..)
            | Command::Repair(..) => true,
            _ => false,
        };
        let table = load.table().to_owned();
        let result = if finish {
            self.load
                .take()
                .map_or(Ok(()), |load| load.finish(&self.conn, &self.tables))
        } else {
            load.pause(&self.conn)
        };
        if let Err(e) = result {
            tracing::warn!(%table, error = %e, "snapshot rows loaded so far were lost");
            self.lost = Some((table, e.to_string()));
        }
    }

    pub(super) fn load_rows(&mut self, table: String, rows: &Rows) -> Result<u64, ClientError> {
        let load = self.load.get_or_insert_with(|| load::Load::new(&table));
        load.rows(&self.conn, &self.tables, rows)
    }

    /// The table's rows are all in: commits them with its indexes made
    /// again. An error means rows were lost (the table is fetched again).
    pub(super) fn end_load(&mut self, table: &str) -> Result<(), ClientError> {
        let finished = match self.load.take() {
            Some(load) => load.finish(&self.conn, &self.tables),
            None => Ok(()),
        };
        if self.lost.as_ref().is_some_and(|(lost, _)| lost == table) {
            let why = self.lost.take().map(|(_, why)| why).unwrap_or_default();
            return Err(ClientError::Replica(format!(
                "rows of {table} loaded earlier were lost: {why}"
            )));
        }
        finished
    }

    pub(super) fn repair(&mut self, step: RepairStep) {
        match step {
            RepairStep::Digest(table, ranges, reply) => {
                let _ = reply
                    .send(self.in_tx(|conn, known| repair::digest(conn, known, &table, &ranges)));
            }
            RepairStep::Remove(table, ranges, reply) => {
                let _ = reply.send(self.in_tx(|conn, known| {
                    snapshot::quietly(conn, || repair::remove(conn, known, &table, &ranges))
                }));
            }
            RepairStep::Load(table, copy, reply) => {
                let _ = reply.send(self.in_tx(|conn, known| {
                    snapshot::quietly(conn, || repair::load(conn, known, &table, &copy))
                }));
            }
            RepairStep::Finish(done, refetch, reply) => {
                let result = self.in_tx(|conn, known| {
                    snapshot::quietly(conn, || {
                        repair::finish(
                            conn,
                            known,
                            done.resume,
                            &done.tables,
                            &done.visibility,
                            &refetch,
                        )
                    })
                });
                let _ = reply.send(result.and_then(|()| {
                    self.filters = snapshot::filters(&self.conn)?;
                    Ok(())
                }));
            }
        }
    }

    /// Digests kept for repairs: made in the background from now on, or
    /// (`all`) every one made before this returns.
    pub(super) fn start_digests(&mut self, all: bool) -> Result<(), ClientError> {
        if all {
            while self.in_tx(digests::build_step)? {}
        } else {
            self.digesting = true;
        }
        Ok(())
    }

    pub(super) fn digest_step(&mut self) {
        self.held.clear();
        match self.in_tx(digests::build_step) {
            Ok(more) => self.digesting = more,
            Err(e) => {
                tracing::warn!(error = %e, "could not digest the replica for repairs");
                self.digesting = false;
            }
        }
    }
}
