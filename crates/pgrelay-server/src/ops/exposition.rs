//! `/metrics`: a scrape builds a `prometheus-client` registry of constant
//! values, read from the counters (`metrics.rs`) and from the gauges'
//! owners, and encodes it in the OpenMetrics text format.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::metrics::LAG_BUCKETS;
use crate::state::AppState;

/// The `Content-Type` of what [`render`] returns.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// A label set of one label, as the labelled families here have.
type Label = [(&'static str, &'static str); 1];

/// A registry whose names all start with `pgrelay_`. `prometheus-client`
/// adds `_total` to a counter's name.
struct Out(Registry);

impl Out {
    fn gauge<N>(&mut self, name: &str, help: &str, value: N)
    where
        ConstGauge<N>: prometheus_client::registry::Metric,
    {
        self.0.register(name, help, ConstGauge::new(value));
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.0.register(name, help, ConstCounter::new(value));
    }

    /// A counter family with one label taking each of `values`.
    fn counters(
        &mut self,
        name: &str,
        help: &str,
        label: &'static str,
        values: &[(&'static str, u64)],
    ) {
        let family = Family::<Label, Counter>::default();
        for (value, count) in values {
            family.get_or_create(&[(label, *value)]).inc_by(*count);
        }
        self.0.register(name, help, family);
    }
}

/// A count or a lag in bytes as a Prometheus value (a float): exact below
/// 2^53, and a lag that large is off the scale anyway.
#[allow(clippy::cast_precision_loss, reason = "Prometheus values are f64")]
fn float(n: u64) -> f64 {
    n as f64
}

pub(crate) fn render(state: &AppState) -> String {
    let m = &state.metrics;
    let lag = state.lag.report();
    let (changes, txs, confirmed) = state.replication.counters();
    let mut out = Out(Registry::with_prefix("pgrelay"));

    out.gauge(
        "replication_connected",
        "1 while the replication stream is connected.",
        i64::from(state.replication.report().connected),
    );
    out.gauge(
        "replication_lag_bytes",
        "WAL bytes between PostgreSQL's current position and the slot's confirmed position.",
        lag.lag_bytes,
    );
    out.gauge(
        "replication_lag_seconds",
        "Age of the oldest WAL position the slot has not confirmed.",
        lag.lag_seconds,
    );
    out.gauge(
        "replication_stalled",
        "1 while WAL moves on and the confirmed position does not.",
        i64::from(lag.stalled),
    );
    let report = state.replication.report();
    out.gauge(
        "capturing",
        "1 while this node captures the slot (writes the change log); 0 while it follows.",
        i64::from(report.role == crate::replication::status::Role::Capturing),
    );
    out.gauge(
        "capture_term",
        "The capture term this node last held or saw.",
        report.term,
    );
    out.counter(
        "capture_stand_downs",
        "Times this node found its capture term over (another node took over) and stood down.",
        report.stand_downs,
    );
    out.gauge(
        "follow_lag_bytes",
        "WAL bytes between the change log's newest transaction and the newest this node published.",
        state
            .replication
            .log_head()
            .0
            .saturating_sub(state.hub.head().0),
    );
    let (from_notice, from_log) = state.replication.followed();
    out.counters(
        "followed_transactions",
        "Transactions this node published while following, by source (notice: carried in the append's NOTIFY; log: read from the change log).",
        "source",
        &[("notice", from_notice), ("log", from_log)],
    );
    let (missing, invalidated) = state.replication.slot_losses();
    out.counters(
        "slot_lost",
        "Replication slots found lost since start, by how (missing: dropped; invalidated: by PostgreSQL); each starts a new change log that every replica hydrates again.",
        "reason",
        &[("missing", missing), ("invalidated", invalidated)],
    );
    out.gauge(
        "confirmed_lsn",
        "The slot position pgrelay confirmed to PostgreSQL, as a number.",
        confirmed.0,
    );
    out.counter(
        "captured_changes",
        "Changes committed to the change log since start.",
        changes,
    );
    out.counter(
        "captured_transactions",
        "Transactions committed to the change log since start.",
        txs,
    );
    out.gauge(
        "change_log_rows",
        "Rows in pgrelay.change_history (PostgreSQL's estimate).",
        lag.change_log_rows,
    );
    out.gauge(
        "change_log_bytes",
        "Size of pgrelay.change_history with its indexes.",
        lag.change_log_bytes,
    );

    let sessions = state.sessions.all();
    out.gauge(
        "sessions",
        "Sync sessions connected to this node.",
        sessions.len(),
    );
    out.counter(
        "messages_sent",
        "Frames sent to clients.",
        get(&m.messages_sent),
    );
    out.counter(
        "bytes_sent",
        "Bytes of frames sent to clients.",
        get(&m.bytes_sent),
    );
    out.counter(
        "session_catch_ups",
        "Times a session fell behind the live buffer and read the change log instead.",
        get(&m.catch_ups),
    );
    out.counter(
        "sessions_too_slow",
        "Sessions closed because the client did not read in time.",
        get(&m.too_slow),
    );
    out.counter(
        "sessions_replaced",
        "Sessions closed because the same client connected again.",
        get(&m.replaced),
    );

    let head = state.hub.head();
    // Bounds below 2^53 are exact as floats.
    let lags = Histogram::new(LAG_BUCKETS.iter().map(|b| float(*b)));
    for session in &sessions {
        lags.observe(float(head.0.saturating_sub(session.sent().0)));
    }
    out.0.register(
        "session_lag_bytes",
        "Per session: WAL bytes between the newest transaction and the last one sent.",
        lags,
    );

    out.counters(
        "write_batches",
        "Client write batches, by outcome (refused: turned down whole before applying).",
        "outcome",
        &[
            ("applied", get(&m.batches_applied)),
            ("refused", get(&m.batches_refused)),
        ],
    );
    out.counters(
        "write_transactions",
        "Client transactions in applied batches, by status.",
        "status",
        &[
            ("applied", get(&m.txs_applied)),
            ("rejected", get(&m.txs_rejected)),
            ("retry", get(&m.txs_retry)),
        ],
    );
    out.counters(
        "rate_limited",
        "Requests refused by a rate limit, by limit.",
        "limit",
        &[
            ("connect", get(&m.rate_limited_connects)),
            ("message", get(&m.rate_limited_messages)),
        ],
    );
    out.counter(
        "connections_refused",
        "Connections refused at --max-connections.",
        get(&m.refused_connections),
    );
    let registry = state.registry.health();
    out.counter(
        "registry_errors",
        "Calls to the client registry (Redis) that failed; sessions go on without it.",
        registry.failures,
    );
    out.gauge(
        "registry_up",
        "1 when the last call to the client registry went through.",
        i64::from(registry.reachable),
    );
    out.counter(
        "hydrations",
        "Full snapshots sent to replicas (new ones, or returning ones that cannot repair).",
        get(&m.hydrations),
    );
    out.counter(
        "repairs",
        "Replicas repaired range by range instead of re-hydrated (docs/repair.md).",
        get(&m.repairs),
    );
    out.counter(
        "repair_rows",
        "Rows sent to replicas by repairs.",
        get(&m.repair_rows),
    );
    out.counter(
        "repair_bytes",
        "Bytes of repair frames, both ways.",
        get(&m.repair_bytes),
    );
    out.counter(
        "repair_kept_parts",
        "Ranges of repairs' checks answered from the digests the server keeps (first rounds and the sub-bucket parts of the next), without reading their rows.",
        get(&m.repair_kept_parts),
    );
    out.counter(
        "repair_read_rows",
        "Rows read from PostgreSQL to answer repairs' range checks.",
        get(&m.repair_read_rows),
    );
    out.counter(
        "repair_kept_builds",
        "Times the server made a table's kept repair digests.",
        get(&state.kept.builds),
    );
    out.gauge(
        "repair_kept_tables",
        "Tables whose repair digests the server keeps.",
        i64::try_from(state.kept.len()).unwrap_or(i64::MAX),
    );
    let mut text = String::with_capacity(4096);
    // Writing to a String cannot fail.
    let _ = encode(&mut text, &out.0);
    text
}
