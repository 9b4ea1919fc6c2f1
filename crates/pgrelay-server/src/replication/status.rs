//! What the replication side is doing, for health checks and metrics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pgrelay_protocol::Lsn;
use serde::Serialize;

use crate::replication::SlotLoss;

pub(crate) struct ReplicationStatus {
    connected: AtomicBool,
    /// Connected at least once since start: a node that was and is no
    /// longer has lost PostgreSQL (see [`Self::lost_database`]).
    ever_connected: AtomicBool,
    confirmed: AtomicU64,
    captured_changes: AtomicU64,
    captured_txs: AtomicU64,
    last_event: Mutex<Instant>,
    last_error: Mutex<Option<String>>,
    /// Slots found lost since start: dropped under pgrelay, invalidated.
    slots_missing: AtomicU64,
    slots_invalidated: AtomicU64,
    last_slot_loss: Mutex<Option<String>>,
    /// Why a new change-log epoch is under way; cleared once replication
    /// streams from the new slot.
    new_epoch: Mutex<Option<String>>,
    /// Whether this node captures or follows, and who captures.
    role: Mutex<(Role, Option<String>)>,
    term: AtomicU64,
    /// Stale-capturer refusals and stand-downs since start.
    stand_downs: AtomicU64,
    /// Newest commit LSN in the change log, as last read by this node.
    log_head: AtomicU64,
    /// Transactions this node published while following, from the
    /// append's notice and read from the change log.
    followed_from_notice: AtomicU64,
    followed_from_log: AtomicU64,
}

/// What this node does with the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    /// Holds the slot and writes the change log.
    Capturing,
    /// Reads the change log another node writes.
    Following,
}

#[derive(Serialize)]
pub(crate) struct StatusReport {
    pub(crate) connected: bool,
    pub(crate) confirmed_lsn: String,
    pub(crate) captured_changes: u64,
    pub(crate) captured_transactions: u64,
    pub(crate) seconds_since_last_event: f64,
    pub(crate) last_error: Option<String>,
    /// Slots found lost (dropped or invalidated) since start.
    pub(crate) slot_losses: u64,
    pub(crate) last_slot_loss: Option<String>,
    /// `capturing` or `following`.
    pub(crate) role: Role,
    /// The node that holds the slot (this one when capturing).
    pub(crate) capturer: Option<String>,
    /// The capture term this node last held or saw.
    pub(crate) term: u64,
    /// Times this node stood down as a stale capturer.
    pub(crate) stand_downs: u64,
}

impl ReplicationStatus {
    pub(crate) fn new() -> ReplicationStatus {
        ReplicationStatus {
            connected: AtomicBool::new(false),
            ever_connected: AtomicBool::new(false),
            confirmed: AtomicU64::new(0),
            captured_changes: AtomicU64::new(0),
            captured_txs: AtomicU64::new(0),
            last_event: Mutex::new(Instant::now()),
            last_error: Mutex::new(None),
            slots_missing: AtomicU64::new(0),
            slots_invalidated: AtomicU64::new(0),
            last_slot_loss: Mutex::new(None),
            new_epoch: Mutex::new(None),
            role: Mutex::new((Role::Following, None)),
            term: AtomicU64::new(0),
            stand_downs: AtomicU64::new(0),
            log_head: AtomicU64::new(0),
            followed_from_notice: AtomicU64::new(0),
            followed_from_log: AtomicU64::new(0),
        }
    }

    /// Counts transactions published while following, by where they came
    /// from: the append's notice (`true`) or the change log.
    pub(crate) fn add_followed(&self, from_notice: bool, txs: u64) {
        let counter = if from_notice {
            &self.followed_from_notice
        } else {
            &self.followed_from_log
        };
        counter.fetch_add(txs, Ordering::Relaxed);
    }

    /// Transactions published while following: from notices, from the log.
    pub(crate) fn followed(&self) -> (u64, u64) {
        (
            self.followed_from_notice.load(Ordering::Relaxed),
            self.followed_from_log.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn set_holder(&self, holder: Option<String>, role: Role) {
        if let Ok(mut r) = self.role.lock() {
            *r = (role, holder);
        }
    }

    pub(crate) fn role(&self) -> (Role, Option<String>) {
        self.role
            .lock()
            .map(|r| r.clone())
            .unwrap_or((Role::Following, None))
    }

    pub(crate) fn set_term(&self, term: i64) {
        self.term
            .store(u64::try_from(term).unwrap_or(0), Ordering::Relaxed);
    }

    pub(crate) fn stood_down(&self) {
        self.stand_downs.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut r) = self.role.lock() {
            *r = (Role::Following, None);
        }
    }

    pub(crate) fn stand_downs(&self) -> u64 {
        self.stand_downs.load(Ordering::Relaxed)
    }

    pub(crate) fn set_log_head(&self, lsn: Lsn) {
        self.log_head.fetch_max(lsn.0, Ordering::Relaxed);
    }

    /// The change log's newest commit LSN, as this node last read it.
    pub(crate) fn log_head(&self) -> Lsn {
        Lsn(self.log_head.load(Ordering::Relaxed))
    }

    /// Streaming (again); a new epoch, if one was under way, is established.
    pub(crate) fn set_connected(&self, confirmed: Lsn) {
        self.connected.store(true, Ordering::Relaxed);
        self.ever_connected.store(true, Ordering::Relaxed);
        self.set_confirmed(confirmed);
        self.touch();
        if let Ok(mut e) = self.last_error.lock() {
            *e = None;
        }
        if let Ok(mut epoch) = self.new_epoch.lock() {
            *epoch = None;
        }
    }

    /// Counts a lost slot; until replication streams again, `why` is a
    /// reason for `/ready` to fail.
    pub(crate) fn slot_lost(&self, loss: SlotLoss, why: &str) {
        let counter = match loss {
            SlotLoss::Missing => &self.slots_missing,
            SlotLoss::Invalidated => &self.slots_invalidated,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_slot_loss.lock() {
            *last = Some(why.to_owned());
        }
        self.new_epoch_under_way(why);
    }

    pub(crate) fn new_epoch_under_way(&self, why: &str) {
        if let Ok(mut epoch) = self.new_epoch.lock() {
            *epoch = Some(why.to_owned());
        }
    }

    /// Why a new change-log epoch is under way, while it is.
    pub(crate) fn new_epoch(&self) -> Option<String> {
        self.new_epoch.lock().ok().and_then(|e| e.clone())
    }

    /// Slots found missing and invalidated since start.
    pub(crate) fn slot_losses(&self) -> (u64, u64) {
        (
            self.slots_missing.load(Ordering::Relaxed),
            self.slots_invalidated.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn set_disconnected(&self, error: String) {
        self.connected.store(false, Ordering::Relaxed);
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(error);
        }
    }

    /// Why this node has lost PostgreSQL, while it has: it was connected
    /// and its replication (capturing or following) now fails. Writes are
    /// refused meanwhile, with this reason, so that clients retry (through
    /// another node when they know one) instead of waiting on a connection
    /// that may never answer.
    pub(crate) fn lost_database(&self) -> Option<String> {
        if self.connected.load(Ordering::Relaxed) || !self.ever_connected.load(Ordering::Relaxed) {
            return None;
        }
        Some(
            self.last_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .unwrap_or_else(|| "replication is not connected".to_owned()),
        )
    }

    pub(crate) fn set_error(&self, error: String) {
        self.set_disconnected(error);
    }

    pub(crate) fn set_confirmed(&self, lsn: Lsn) {
        self.confirmed.fetch_max(lsn.0, Ordering::Relaxed);
    }

    pub(crate) fn add_captured(&self, changes: u64, txs: u64) {
        self.captured_changes.fetch_add(changes, Ordering::Relaxed);
        self.captured_txs.fetch_add(txs, Ordering::Relaxed);
    }

    pub(crate) fn touch(&self) {
        if let Ok(mut t) = self.last_event.lock() {
            *t = Instant::now();
        }
    }

    fn since_last_event(&self) -> Duration {
        self.last_event
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    /// Healthy while connected and hearing from PostgreSQL (keepalives come
    /// at least every wal_sender_timeout / 2 even when nothing changes).
    pub(crate) fn is_healthy(&self, stall_after: Duration) -> bool {
        self.connected.load(Ordering::Relaxed) && self.since_last_event() < stall_after
    }

    /// Captured changes, transactions and the confirmed position.
    pub(crate) fn counters(&self) -> (u64, u64, Lsn) {
        (
            self.captured_changes.load(Ordering::Relaxed),
            self.captured_txs.load(Ordering::Relaxed),
            Lsn(self.confirmed.load(Ordering::Relaxed)),
        )
    }

    pub(crate) fn report(&self) -> StatusReport {
        StatusReport {
            connected: self.connected.load(Ordering::Relaxed),
            confirmed_lsn: Lsn(self.confirmed.load(Ordering::Relaxed)).to_string(),
            captured_changes: self.captured_changes.load(Ordering::Relaxed),
            captured_transactions: self.captured_txs.load(Ordering::Relaxed),
            seconds_since_last_event: self.since_last_event().as_secs_f64(),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
            slot_losses: self.slots_missing.load(Ordering::Relaxed)
                + self.slots_invalidated.load(Ordering::Relaxed),
            last_slot_loss: self.last_slot_loss.lock().ok().and_then(|e| e.clone()),
            role: self.role().0,
            capturer: self.role().1,
            term: self.term.load(Ordering::Relaxed),
            stand_downs: self.stand_downs(),
        }
    }
}
