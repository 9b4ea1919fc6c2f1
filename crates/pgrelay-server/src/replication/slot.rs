//! Which slot feeds the change log, and what happens when it is lost.
//!
//! A slot dropped, or invalidated by PostgreSQL (`max_slot_wal_keep_size`),
//! takes every change after its confirmed position with it: a slot created
//! in its place starts at the current WAL position, and streaming on from
//! it would leave every replica short of what was written meanwhile,
//! silently and for good. So `pgrelay.log_state` records which slot feeds
//! the log, and every (re)connect checks it. A slot that is missing
//! although the log had one, or invalidated, is a loss: logged as an
//! error, counted (`pgrelay_slot_lost_total`), failing `/ready` until
//! replication streams again, and answered with a new change-log epoch:
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

use crate::epoch::{self, Feed};
use crate::status::ReplicationStatus;
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
    /// The slot that feeds the log is there; `record` when the log did not
    /// name it yet.
    Stream { confirmed: Lsn, record: bool },
    /// No slot, and a log that never had a transaction: a first start.
    First,
    /// The log's feed was lost (`None`: a new epoch was interrupted).
    NewEpoch { loss: Option<SlotLoss> },
}

fn plan(state: SlotState, feed: &Feed, slot: &str) -> Result<Plan, String> {
    if feed.due.is_some() {
        return Ok(Plan::NewEpoch { loss: None });
    }
    Ok(match state {
        SlotState::Invalidated { .. } => Plan::NewEpoch {
            loss: Some(SlotLoss::Invalidated),
        },
        SlotState::Missing if feed.slot.is_none() && feed.head == Lsn::ZERO => Plan::First,
        SlotState::Missing => Plan::NewEpoch {
            loss: Some(SlotLoss::Missing),
        },
        SlotState::Valid { confirmed_flush } => match feed.slot.as_deref() {
            Some(fed_by) if fed_by == slot => Plan::Stream {
                confirmed: confirmed_flush,
                record: false,
            },
            None => Plan::Stream {
                confirmed: confirmed_flush,
                record: true,
            },
            Some(fed_by) => {
                return Err(format!(
                    "the change log was fed from replication slot {fed_by:?}, and slot {slot:?} already \
                     exists with a position of its own; run with --slot {fed_by}, or drop slot {slot:?} \
                     so a new one (and a new change log, which every replica hydrates again) is started"
                ))
            }
        },
    })
}

/// Makes sure the slot that feeds the log can be streamed from: creates it
/// on a first start, and starts a new epoch when it was lost.
pub(crate) async fn prepare(
    db: &mut Client,
    slot: &str,
    status: &ReplicationStatus,
) -> Result<Prepared, ServerError> {
    let feed = epoch::feed(db).await?;
    let state = pgrelay_pg::inspect_slot(db, slot).await?;
    match plan(state, &feed, slot).map_err(ServerError::Config)? {
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
        Plan::First => {
            let confirmed = pgrelay_pg::create_slot(db, slot).await?;
            epoch::record_slot(db, slot).await?;
            Ok(Prepared {
                confirmed,
                created: true,
                epoch: None,
            })
        }
        Plan::NewEpoch { loss } => new_epoch(db, slot, state, &feed, loss, status).await,
    }
}

async fn new_epoch(
    db: &mut Client,
    slot: &str,
    state: SlotState,
    feed: &Feed,
    loss: Option<SlotLoss>,
    status: &ReplicationStatus,
) -> Result<Prepared, ServerError> {
    let why = match (loss, state) {
        (Some(SlotLoss::Invalidated), SlotState::Invalidated { confirmed_flush }) => format!(
            "replication slot {slot:?} was invalidated by PostgreSQL (wal_status = lost, e.g. past \
             max_slot_wal_keep_size): the changes after {confirmed_flush} are not in the change log"
        ),
        (Some(_), _) => match feed.slot.as_deref() {
            Some(fed_by) if fed_by != slot => format!(
                "the change log was fed from replication slot {fed_by:?}, and slot {slot:?} does not \
                 exist: the changes in between are not in the change log"
            ),
            _ => format!(
                "replication slot {slot:?} was dropped: the changes written while it was gone are \
                 not in the change log"
            ),
        },
        (None, _) => "a new change-log epoch was left half-started (the server stopped)".to_owned(),
    };
    let why = format!(
        "{why}; starting a new change-log epoch from a new slot, every replica is told gone and hydrates again"
    );
    tracing::error!(
        slot,
        loss = loss.map_or("half-started epoch", SlotLoss::label),
        "{why}"
    );
    match loss {
        Some(loss) => status.slot_lost(loss, &why),
        None => status.new_epoch_under_way(&why),
    }
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

    fn feed(slot: Option<&str>, due: Option<u64>, head: u64) -> Feed {
        Feed {
            slot: slot.map(str::to_owned),
            due: due.map(Lsn),
            head: Lsn(head),
        }
    }

    const VALID: SlotState = SlotState::Valid {
        confirmed_flush: Lsn(500),
    };

    #[test]
    fn a_slot_is_lost_when_missing_after_the_log_had_one_or_invalidated() {
        let new_epoch = |loss| Ok(Plan::NewEpoch { loss: Some(loss) });
        // First start: nothing recorded, nothing logged.
        assert_eq!(
            plan(SlotState::Missing, &feed(None, None, 0), "s"),
            Ok(Plan::First)
        );
        // Dropped: recorded, or a log from before slots were recorded.
        assert_eq!(
            plan(SlotState::Missing, &feed(Some("s"), None, 0), "s"),
            new_epoch(SlotLoss::Missing)
        );
        assert_eq!(
            plan(SlotState::Missing, &feed(None, None, 7), "s"),
            new_epoch(SlotLoss::Missing)
        );
        // Another name configured, and no such slot.
        assert_eq!(
            plan(SlotState::Missing, &feed(Some("old"), None, 7), "s"),
            new_epoch(SlotLoss::Missing)
        );
        let lost = SlotState::Invalidated {
            confirmed_flush: Lsn(9),
        };
        assert_eq!(
            plan(lost, &feed(Some("s"), None, 7), "s"),
            new_epoch(SlotLoss::Invalidated)
        );
    }

    #[test]
    fn a_valid_slot_is_streamed_from_and_recorded_once() {
        assert_eq!(
            plan(VALID, &feed(Some("s"), None, 7), "s"),
            Ok(Plan::Stream {
                confirmed: Lsn(500),
                record: false
            })
        );
        assert_eq!(
            plan(VALID, &feed(None, None, 7), "s"),
            Ok(Plan::Stream {
                confirmed: Lsn(500),
                record: true
            })
        );
        // Another existing slot is refused, not silently switched to.
        assert!(plan(VALID, &feed(Some("old"), None, 7), "s").is_err());
    }

    #[test]
    fn a_half_started_epoch_is_finished_whatever_the_slot() {
        for state in [SlotState::Missing, VALID] {
            assert_eq!(
                plan(state, &feed(Some("s"), Some(3), 7), "s"),
                Ok(Plan::NewEpoch { loss: None })
            );
        }
    }
}
