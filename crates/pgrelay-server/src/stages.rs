//! Per-transaction stage timestamps, for tracing where delivery time goes
//! (`pgrelay bench latency` turns them on). Off by default: then recording
//! costs one relaxed atomic load. Each record is keyed by the transaction's
//! PostgreSQL commit time, which the client sees too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Where a transaction was on the server, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// Its commit arrived from the walsender and was decoded.
    Decoded,
    /// The change log's append holding it committed.
    Logged,
    /// Published to the live sessions.
    Published,
    /// A session's socket took its frame (once per session).
    Sent,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Decoded, Stage::Logged, Stage::Published, Stage::Sent];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Decoded => "decoded",
            Stage::Logged => "logged",
            Stage::Published => "published",
            Stage::Sent => "sent",
        }
    }
}

/// One stage reached: the transaction's commit time and when (both µs
/// since the Unix epoch).
#[derive(Clone, Copy, Debug)]
pub struct StageTime {
    pub commit_time_us: i64,
    pub stage: Stage,
    pub at_us: i64,
}

static ON: AtomicBool = AtomicBool::new(false);
static LOG: Mutex<Vec<StageTime>> = Mutex::new(Vec::new());

/// Starts recording (for the whole process).
pub fn enable() {
    ON.store(true, Ordering::Relaxed);
}

/// Takes what was recorded so far.
pub fn take() -> Vec<StageTime> {
    std::mem::take(&mut *LOG.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Whether stages are being recorded.
pub(crate) fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Records that the transaction committed at `commit_time_us` reached `stage`.
pub(crate) fn record(stage: Stage, commit_time_us: i64) {
    if on() {
        let at_us = crate::replication::now_us();
        LOG.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(StageTime {
                commit_time_us,
                stage,
                at_us,
            });
    }
}
