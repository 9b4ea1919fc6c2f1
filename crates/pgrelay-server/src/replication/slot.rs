//! Which slot feeds the change log, and what happens when it is lost.
//!
//! A slot dropped, or invalidated by PostgreSQL (`max_slot_wal_keep_size`),
//! takes every change after its confirmed position with it: a slot created
//! in its place starts at the current WAL position, and streaming on from
//! it would leave every replica short of what was written meanwhile,
//! silently and for good. So `pgrelay.log_slots` records which slots feed
//! the log, and every (re)connect checks this server's. A slot that is
//! missing although it fed the log (or the log was fed and no other
//! recorded slot is left), or invalidated, is a loss: logged as an error,
//! counted (`pgrelay_slot_lost_total`), failing `/ready` until replication
//! streams again, and answered with a new change-log epoch:
//!
//! ```text
//! loss ─▶ epoch due from F = current WAL (durable) ─▶ drop the invalidated slot
//!      ─▶ create a slot, consistent at C > F (waits for open transactions)
//!      ─▶ one transaction: log emptied, new log id, pruned through F, slot recorded
//!      ─▶ hub: head F, live sessions told `gone`
//! ```
//!
//! Every replica is then answered `gone` and hydrates again: its snapshot
//! is taken after C, so it holds every transaction committed before C
//! (those the lost slot never delivered included), and the stream resumes
//! at F, from which the new slot delivers every transaction committed
//! after C, those the snapshot already holds being skipped by the usual
//! hand-over.

use pgrelay_pg::SlotState;
use pgrelay_protocol::Lsn;
use tokio_postgres::Client;

use crate::history::epoch::{self, Feed};
use crate::replication::status::ReplicationStatus;
use crate::ServerError;

/// How a slot was lost, for the log and the metric's label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlotLoss {
    /// Dropped (or never created) although the log had been fed by it.
    Missing,
    /// Invalidated by PostgreSQL (`wal_status = 'lost'`).
    Invalidated,
}

impl SlotLoss {
    pub(crate) fn label(self) -> &'static str {
        match self {
            SlotLoss::Missing => "missing",
            SlotLoss::Invalidated => "invalidated",
        }
    }
}

/// The slot, ready to stream from.
pub(crate) struct Prepared {
    /// Where streaming resumes.
    pub(crate) confirmed: Lsn,
    pub(crate) created: bool,
    /// Set when a new change-log epoch was started.
    pub(crate) epoch: Option<Epoch>,
}

/// A new change log: its id, and the position it counts as pruned through.
pub(crate) struct Epoch {
    pub(crate) log_id: String,
    pub(crate) floor: Lsn,
}

#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// The slot is there and usable; `record` when the log does not name
    /// it yet (a log from before slots were recorded).
    Stream { confirmed: Lsn, record: bool },
    /// No slot, and nothing lost: a first start, or a further node's slot
    /// while another node's recorded slot feeds the log.
    Create,
    /// The log's feed was lost; `resumed`: an earlier attempt to start
    /// the new epoch did not finish (`loss` is `None` when it got as far
    /// as creating the new slot).
    NewEpoch {
        loss: Option<SlotLoss>,
        resumed: bool,
    },
}

fn plan(state: SlotState, feed: &Feed) -> Plan {
    let resumed = feed.due.is_some();
    let first = !feed.any_recorded && feed.head == Lsn::ZERO;
    match state {
        SlotState::Invalidated { .. } => Plan::NewEpoch {
            loss: Some(SlotLoss::Invalidated),
            resumed,
        },
        SlotState::Missing if !resumed && !feed.recorded && (first || feed.other_feeds) => {
            Plan::Create
        }
        SlotState::Missing => Plan::NewEpoch {
            loss: Some(SlotLoss::Missing),
            resumed,
        },
        SlotState::Valid { .. } if resumed => Plan::NewEpoch {
            loss: None,
            resumed,
        },
        SlotState::Valid { confirmed_flush } => Plan::Stream {
            confirmed: confirmed_flush,
            record: !feed.recorded,
        },
    }
}

/// Makes sure the slot that feeds the log can be streamed from: creates it
/// on a first start, and starts a new epoch when it was lost.
pub(crate) async fn prepare(
    db: &mut Client,
    slot: &str,
    status: &ReplicationStatus,
) -> Result<Prepared, ServerError> {
    let feed = epoch::feed(db, slot).await?;
    let state = pgrelay_pg::inspect_slot(db, slot).await?;
    match plan(state, &feed) {
        Plan::Stream { confirmed, record } => {
            if record {
                epoch::record_slot(db, slot).await?;
                tracing::info!(slot, "recorded the slot that feeds the change log");
            }
            Ok(Prepared {
                confirmed,
                created: false,
                epoch: None,
            })
        }
        Plan::Create => {
            let confirmed = pgrelay_pg::create_slot(db, slot).await?;
            epoch::record_slot(db, slot).await?;
            Ok(Prepared {
                confirmed,
                created: true,
                epoch: None,
            })
        }
        Plan::NewEpoch { loss, resumed } => {
            let why = loss_reason(slot, state, &feed, loss);
            tracing::error!(
                slot,
                loss = loss.map_or("half-started epoch", SlotLoss::label),
                "{why}"
            );
            match loss {
                // Counted once, when found; a retry keeps the first reason.
                Some(loss) if !resumed => status.slot_lost(loss, &why),
                _ if status.new_epoch().is_none() => status.new_epoch_under_way(&why),
                _ => {}
            }
            new_epoch(db, slot, state).await
        }
    }
}

/// What was lost, for the error log and `/ready`.
fn loss_reason(slot: &str, state: SlotState, feed: &Feed, loss: Option<SlotLoss>) -> String {
    let why = match (loss, state) {
        (Some(SlotLoss::Invalidated), SlotState::Invalidated { confirmed_flush }) => format!(
            "replication slot {slot:?} was invalidated by PostgreSQL (wal_status = lost, e.g. past \
             max_slot_wal_keep_size): the changes after {confirmed_flush} are not in the change log"
        ),
        (Some(_), _) if !feed.recorded && feed.any_recorded => format!(
            "the change log was fed from other replication slots, none of which is left, and slot \
             {slot:?} does not exist: the changes since are not in the change log"
        ),
        (Some(_), _) => format!(
            "replication slot {slot:?} was dropped: the changes written while it was gone are not \
             in the change log"
        ),
        (None, _) => format!(
            "a new change-log epoch after a lost replication slot {slot:?} was left half-started"
        ),
    };
    format!(
        "{why}; starting a new change-log epoch from a new slot, every replica is told gone and hydrates again"
    )
}

/// Starts the new epoch (see the module's diagram); resumes one left
/// half-started.
async fn new_epoch(db: &mut Client, slot: &str, state: SlotState) -> Result<Prepared, ServerError> {
    let floor = epoch::mark_due(db).await?;
    let (confirmed, created) = match state {
        // Created by the interrupted attempt, after the floor was recorded.
        SlotState::Valid { confirmed_flush } => (confirmed_flush, false),
        SlotState::Invalidated { .. } => {
            pgrelay_pg::drop_slot(db, slot).await?;
            (pgrelay_pg::create_slot(db, slot).await?, true)
        }
        SlotState::Missing => (pgrelay_pg::create_slot(db, slot).await?, true),
    };
    let log_id = epoch::start(db, slot, floor).await?;
    tracing::warn!(slot, %log_id, from = %floor, consistent = %confirmed, "new change-log epoch started");
    Ok(Prepared {
        confirmed,
        created,
        epoch: Some(Epoch { log_id, floor }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log whose feed is recorded as `slot` (this server's), with `head`.
    fn fed(head: u64) -> Feed {
        Feed {
            recorded: true,
            any_recorded: true,
            head: Lsn(head),
            ..Feed::default()
        }
    }

    const VALID: SlotState = SlotState::Valid {
        confirmed_flush: Lsn(500),
    };

    fn lost(loss: SlotLoss) -> Plan {
        Plan::NewEpoch {
            loss: Some(loss),
            resumed: false,
        }
    }

    #[test]
    fn a_slot_is_lost_when_missing_after_it_fed_the_log_or_invalidated() {
        // First start: nothing recorded, nothing logged.
        assert_eq!(plan(SlotState::Missing, &Feed::default()), Plan::Create);
        // Dropped: recorded (even before the first transaction), or a log
        // from before slots were recorded.
        assert_eq!(plan(SlotState::Missing, &fed(0)), lost(SlotLoss::Missing));
        let unrecorded = Feed {
            head: Lsn(7),
            ..Feed::default()
        };
        assert_eq!(
            plan(SlotState::Missing, &unrecorded),
            lost(SlotLoss::Missing)
        );
        let invalidated = SlotState::Invalidated {
            confirmed_flush: Lsn(9),
        };
        assert_eq!(plan(invalidated, &fed(7)), lost(SlotLoss::Invalidated));
    }

    #[test]
    fn a_further_node_adds_its_slot_only_while_another_feeds_the_log() {
        let other = Feed {
            any_recorded: true,
            other_feeds: true,
            head: Lsn(7),
            ..Feed::default()
        };
        assert_eq!(plan(SlotState::Missing, &other), Plan::Create);
        // Other slots fed it and none is left (e.g. dropped on a --slot
        // rename): the changes in between are lost.
        let renamed = Feed {
            other_feeds: false,
            ..other
        };
        assert_eq!(plan(SlotState::Missing, &renamed), lost(SlotLoss::Missing));
    }

    #[test]
    fn a_valid_slot_is_streamed_from_and_recorded_once() {
        assert_eq!(
            plan(VALID, &fed(7)),
            Plan::Stream {
                confirmed: Lsn(500),
                record: false
            }
        );
        assert_eq!(
            plan(VALID, &Feed::default()),
            Plan::Stream {
                confirmed: Lsn(500),
                record: true
            }
        );
    }

    #[test]
    fn a_half_started_epoch_is_finished_whatever_the_slot() {
        let due = Feed {
            due: Some(Lsn(3)),
            ..fed(7)
        };
        assert_eq!(
            plan(SlotState::Missing, &due),
            Plan::NewEpoch {
                loss: Some(SlotLoss::Missing),
                resumed: true
            }
        );
        // The new slot was created before the server stopped.
        assert_eq!(
            plan(VALID, &due),
            Plan::NewEpoch {
                loss: None,
                resumed: true
            }
        );
        // Even for a log that never held a transaction.
        let due_empty = Feed {
            due: Some(Lsn(3)),
            ..Feed::default()
        };
        assert_eq!(
            plan(SlotState::Missing, &due_empty),
            Plan::NewEpoch {
                loss: Some(SlotLoss::Missing),
                resumed: true
            }
        );
    }
}
