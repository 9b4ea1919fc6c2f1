//! The outbox pushed to the server: one batch in flight, in capture order,
//! a backoff after `retry`, and an event per answered transaction.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgrelay_protocol::Lsn;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::backoff;
use crate::replica::Outcome;
use crate::{ClientConfig, ClientError, Event, Replica};

/// Pushes the outbox: one batch in flight at a time, in capture order;
/// after a `retry` answer the next push waits out a backoff.
pub(super) struct Pusher {
    in_flight: Option<InFlight>,
    wanted: bool,
    not_before: Instant,
    attempt: u32,
    /// After a refused batch, send one transaction at a time until one is
    /// answered, so a single bad transaction is found and set aside.
    one_at_a_time: bool,
    backoff_base: Duration,
    backoff_cap: Duration,
}

impl Pusher {
    pub(super) fn new(config: &ClientConfig) -> Pusher {
        Pusher {
            in_flight: None,
            wanted: false,
            not_before: Instant::now(),
            attempt: 0,
            one_at_a_time: false,
            backoff_base: config.backoff_base,
            backoff_cap: config.backoff_cap,
        }
    }

    pub(super) fn wake(&mut self) {
        self.wanted = true;
    }

    pub(super) fn due(&self) -> bool {
        self.wanted && self.in_flight.is_none() && Instant::now() >= self.not_before
    }

    /// Nothing in flight and nothing left to send.
    pub(super) async fn idle(&self, replica: &Replica) -> Result<bool, ClientError> {
        Ok(self.in_flight.is_none() && !replica.has_unsent_writes().await?)
    }

    /// The next batch's frames, marked sent in the outbox (none when
    /// nothing waits). A set-aside write ends the connection with
    /// [`ClientError::Resync`]: the next one fetches its tables again.
    pub(super) async fn take(
        &mut self,
        replica: &Replica,
        events: &broadcast::Sender<Event>,
    ) -> Result<Vec<String>, ClientError> {
        self.wanted = false;
        let max_txs = if self.one_at_a_time {
            1
        } else {
            pgrelay_protocol::MAX_WRITE_TRANSACTIONS
        };
        let taken = replica.take_batch(max_txs).await?;
        if !taken.set_aside.is_empty() {
            report(events, taken.set_aside, (None, None));
            // What followed it may be sent now.
            self.wanted = true;
        }
        if !taken.resync.is_empty() {
            return Err(ClientError::Resync(taken.resync));
        }
        if taken.frames.is_empty() {
            return Ok(Vec::new());
        }
        tracing::debug!(
            transactions = taken.tx_ids.len(),
            frames = taken.frames.len(),
            "pushing local writes"
        );
        self.in_flight = Some(InFlight {
            batch_id: taken.batch_id,
            tx_ids: taken.tx_ids,
        });
        Ok(taken.frames)
    }

    pub(super) async fn answered(
        &mut self,
        replica: &Replica,
        events: &broadcast::Sender<Event>,
        results: pgrelay_protocol::WriteResults,
    ) -> Result<(), ClientError> {
        let bounds = (results.lsn_floor, results.lsn);
        let outcomes = replica.record_results(results).await?;
        let retry = outcomes
            .iter()
            .any(|o| o.status == pgrelay_protocol::WriteStatus::Retry);
        report(events, outcomes, bounds);
        self.in_flight = None;
        self.one_at_a_time = false;
        if retry {
            let delay = backoff(self.attempt, self.backoff_base, self.backoff_cap);
            self.attempt = self.attempt.saturating_add(1);
            self.not_before = Instant::now() + delay;
        } else {
            self.attempt = 0;
        }
        // More may be waiting (or due after the backoff, on the poll tick).
        self.wanted = true;
        Ok(())
    }

    pub(super) async fn refused(
        &mut self,
        replica: &Replica,
        events: &broadcast::Sender<Event>,
        batch_id: Option<String>,
        code: pgrelay_protocol::BatchRefusal,
        message: String,
    ) -> Result<(), ClientError> {
        tracing::warn!(?batch_id, ?code, %message, "the server refused a batch of local writes");
        let Some(sent) = self.in_flight.take() else {
            return Ok(());
        };
        if sent.batch_id != batch_id && batch_id.is_some() {
            self.in_flight = Some(sent);
            return Ok(());
        }
        self.wanted = true;
        match (self.one_at_a_time, sent.tx_ids.as_slice()) {
            (true, [tx_id]) => {
                // A single transaction the server will never take: set it
                // aside so it does not block every write after it, and get
                // the server's rows back for the tables it wrote.
                self.one_at_a_time = false;
                let (outcome, resync) = replica
                    .set_aside(tx_id.clone(), format!("{code:?}: {message}"))
                    .await?;
                report(events, vec![outcome], (None, None));
                if !resync.is_empty() {
                    return Err(ClientError::Resync(resync));
                }
            }
            _ => self.one_at_a_time = true,
        }
        Ok(())
    }
}

/// The batch awaiting its answer.
struct InFlight {
    batch_id: Option<String>,
    tx_ids: Vec<String>,
}

/// Sends an event per outcome; `bounds` are the batch's `(lsn_floor, lsn)`.
fn report(
    events: &broadcast::Sender<Event>,
    outcomes: Vec<Outcome>,
    bounds: (Option<Lsn>, Option<Lsn>),
) {
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    for outcome in outcomes {
        let event = match outcome.status {
            pgrelay_protocol::WriteStatus::Applied => Event::WriteApplied {
                tx_id: outcome.tx_id,
                changes: outcome.changes,
                latency: Duration::from_micros(
                    u64::try_from(now_us - outcome.created_us).unwrap_or(0),
                ),
                lsn_floor: bounds.0,
                lsn: bounds.1,
            },
            pgrelay_protocol::WriteStatus::Rejected => {
                let reason = outcome.reason.unwrap_or_default();
                tracing::warn!(tx_id = %outcome.tx_id, %reason, "local write rejected by the server; rolled back");
                Event::WriteRejected {
                    tx_id: outcome.tx_id,
                    reason,
                }
            }
            pgrelay_protocol::WriteStatus::Retry => Event::WriteRetry {
                tx_id: outcome.tx_id,
                reason: outcome.reason.unwrap_or_default(),
            },
        };
        let _ = events.send(event);
    }
}
