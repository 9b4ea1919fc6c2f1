//! The server's counters for `/metrics`: plain atomics bumped where
//! things happen (the exposition, in `exposition.rs`, reads them with the
//! gauges of the other parts when scraped).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Upper bounds of the per-session lag histogram, in bytes of WAL between
/// the newest transaction and the last one sent to the session.
pub(crate) const LAG_BUCKETS: [u64; 7] =
    [0, 1 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20, 1 << 30];

#[derive(Default)]
pub(crate) struct Metrics {
    pub(crate) messages_sent: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    /// Sessions that fell behind the live buffer and read the change log.
    pub(crate) catch_ups: AtomicU64,
    /// Sessions closed because their client did not read in time.
    pub(crate) too_slow: AtomicU64,
    pub(crate) replaced: AtomicU64,
    pub(crate) batches_applied: AtomicU64,
    pub(crate) batches_refused: AtomicU64,
    pub(crate) txs_applied: AtomicU64,
    pub(crate) txs_rejected: AtomicU64,
    pub(crate) txs_retry: AtomicU64,
    pub(crate) rate_limited_connects: AtomicU64,
    pub(crate) rate_limited_messages: AtomicU64,
    /// Shared with the accept loop, which refuses them.
    pub(crate) refused_connections: Arc<AtomicU64>,
    /// Full snapshots sent (hydrations), and repairs instead of them.
    pub(crate) hydrations: AtomicU64,
    pub(crate) repairs: AtomicU64,
    /// Rows sent by repairs, and bytes of repair frames both ways.
    pub(crate) repair_rows: AtomicU64,
    pub(crate) repair_bytes: AtomicU64,
    /// Check parts (of any round) answered from the server's kept digests, and
    /// rows read from PostgreSQL to answer checks.
    pub(crate) repair_kept_parts: AtomicU64,
    pub(crate) repair_read_rows: AtomicU64,
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    /// Counts a write batch's outcome.
    pub(crate) fn record_results(&self, results: &pgrelay_protocol::WriteResults) {
        use pgrelay_protocol::WriteStatus;
        add(&self.batches_applied, 1);
        for r in &results.results {
            let counter = match r.status {
                WriteStatus::Applied => &self.txs_applied,
                WriteStatus::Rejected => &self.txs_rejected,
                WriteStatus::Retry => &self.txs_retry,
            };
            add(counter, 1);
        }
    }
}
