//! Counters for `/metrics`, rendered in Prometheus' text format. Counters
//! are plain atomics bumped where things happen; gauges are read from their
//! owners when scraped.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::state::AppState;

/// Upper bounds of the per-session lag histogram, in bytes of WAL between
/// the newest transaction and the last one sent to the session.
const LAG_BUCKETS: [u64; 7] = [0, 1 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20, 1 << 30];

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
    pub(crate) registry_errors: AtomicU64,
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

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

struct Out(String);

impl Out {
    fn metric(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn value(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.0, "{name}{labels} {value}");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.metric(name, kind, help);
        self.value(name, "", value);
    }
}

pub(crate) fn render(state: &AppState) -> String {
    let m = &state.metrics;
    let lag = state.lag.report();
    let (changes, txs, confirmed) = state.replication.counters();
    let mut out = Out(String::with_capacity(4096));

    out.single(
        "pgrelay_replication_connected",
        "gauge",
        "1 while the replication stream is connected.",
        u8::from(state.replication.report().connected),
    );
    out.single(
        "pgrelay_replication_lag_bytes",
        "gauge",
        "WAL bytes between PostgreSQL's current position and the slot's confirmed position.",
        lag.lag_bytes,
    );
    out.single(
        "pgrelay_replication_lag_seconds",
        "gauge",
        "Age of the oldest WAL position the slot has not confirmed.",
        lag.lag_seconds,
    );
    out.single(
        "pgrelay_replication_stalled",
        "gauge",
        "1 while WAL moves on and the confirmed position does not.",
        u8::from(lag.stalled),
    );
    let (missing, invalidated) = state.replication.slot_losses();
    out.metric(
        "pgrelay_slot_lost_total",
        "counter",
        "Replication slots found lost since start, by how (missing: dropped; invalidated: by PostgreSQL); each starts a new change log that every replica hydrates again.",
    );
    out.value("pgrelay_slot_lost_total", "{reason=\"missing\"}", missing);
    out.value(
        "pgrelay_slot_lost_total",
        "{reason=\"invalidated\"}",
        invalidated,
    );
    out.single(
        "pgrelay_confirmed_lsn",
        "gauge",
        "The slot position pgrelay confirmed to PostgreSQL, as a number.",
        confirmed.0,
    );
    out.single(
        "pgrelay_captured_changes_total",
        "counter",
        "Changes committed to the change log since start.",
        changes,
    );
    out.single(
        "pgrelay_captured_transactions_total",
        "counter",
        "Transactions committed to the change log since start.",
        txs,
    );
    out.single(
        "pgrelay_change_log_rows",
        "gauge",
        "Rows in pgrelay.change_history (PostgreSQL's estimate).",
        lag.change_log_rows,
    );
    out.single(
        "pgrelay_change_log_bytes",
        "gauge",
        "Size of pgrelay.change_history with its indexes.",
        lag.change_log_bytes,
    );

    let sessions = state.sessions.all();
    out.single(
        "pgrelay_sessions",
        "gauge",
        "Sync sessions connected to this node.",
        sessions.len(),
    );
    out.single(
        "pgrelay_messages_sent_total",
        "counter",
        "Frames sent to clients.",
        get(&m.messages_sent),
    );
    out.single(
        "pgrelay_bytes_sent_total",
        "counter",
        "Bytes of frames sent to clients.",
        get(&m.bytes_sent),
    );
    out.single(
        "pgrelay_session_catch_ups_total",
        "counter",
        "Times a session fell behind the live buffer and read the change log instead.",
        get(&m.catch_ups),
    );
    out.single(
        "pgrelay_sessions_too_slow_total",
        "counter",
        "Sessions closed because the client did not read in time.",
        get(&m.too_slow),
    );
    out.single(
        "pgrelay_sessions_replaced_total",
        "counter",
        "Sessions closed because the same client connected again.",
        get(&m.replaced),
    );

    let head = state.hub.head();
    let mut counts = [0u64; LAG_BUCKETS.len()];
    let mut sum = 0u64;
    for session in &sessions {
        let lag = head.0.saturating_sub(session.sent().0);
        sum = sum.saturating_add(lag);
        for (bound, count) in LAG_BUCKETS.iter().zip(counts.iter_mut()) {
            if lag <= *bound {
                *count += 1;
            }
        }
    }
    out.metric(
        "pgrelay_session_lag_bytes",
        "histogram",
        "Per session: WAL bytes between the newest transaction and the last one sent.",
    );
    for (bound, count) in LAG_BUCKETS.iter().zip(counts) {
        out.value(
            "pgrelay_session_lag_bytes_bucket",
            &format!("{{le=\"{bound}\"}}"),
            count,
        );
    }
    out.value(
        "pgrelay_session_lag_bytes_bucket",
        "{le=\"+Inf\"}",
        sessions.len(),
    );
    out.value("pgrelay_session_lag_bytes_sum", "", sum);
    out.value("pgrelay_session_lag_bytes_count", "", sessions.len());

    out.metric(
        "pgrelay_write_batches_total",
        "counter",
        "Client write batches, by outcome (refused: turned down whole before applying).",
    );
    out.value(
        "pgrelay_write_batches_total",
        "{outcome=\"applied\"}",
        get(&m.batches_applied),
    );
    out.value(
        "pgrelay_write_batches_total",
        "{outcome=\"refused\"}",
        get(&m.batches_refused),
    );
    out.metric(
        "pgrelay_write_transactions_total",
        "counter",
        "Client transactions in applied batches, by status.",
    );
    out.value(
        "pgrelay_write_transactions_total",
        "{status=\"applied\"}",
        get(&m.txs_applied),
    );
    out.value(
        "pgrelay_write_transactions_total",
        "{status=\"rejected\"}",
        get(&m.txs_rejected),
    );
    out.value(
        "pgrelay_write_transactions_total",
        "{status=\"retry\"}",
        get(&m.txs_retry),
    );
    out.metric(
        "pgrelay_rate_limited_total",
        "counter",
        "Requests refused by a rate limit, by limit.",
    );
    out.value(
        "pgrelay_rate_limited_total",
        "{limit=\"connect\"}",
        get(&m.rate_limited_connects),
    );
    out.value(
        "pgrelay_rate_limited_total",
        "{limit=\"message\"}",
        get(&m.rate_limited_messages),
    );
    out.single(
        "pgrelay_connections_refused_total",
        "counter",
        "Connections refused at --max-connections.",
        get(&m.refused_connections),
    );
    out.single(
        "pgrelay_registry_errors_total",
        "counter",
        "Client registry operations that failed.",
        get(&m.registry_errors),
    );
    out.0
}
