//! Status events for library users.

use pgrelay_protocol::Lsn;

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The handshake succeeded; `head` is the server's newest transaction.
    Connected { head: Lsn },
    /// The replica holds everything the server had at connect time.
    CaughtUp { lsn: Lsn },
    /// Transactions were committed to the replica, up to `lsn`.
    Applied {
        lsn: Lsn,
        transactions: usize,
        changes: usize,
        lag_ms: i64,
        /// PostgreSQL commit time of each applied transaction (µs since
        /// the Unix epoch), in order.
        commit_times_us: Vec<i64>,
        /// When the SQLite transaction holding them committed (µs since the
        /// Unix epoch).
        applied_at_us: i64,
    },
    /// The connection ended; the client reconnects after `retry_in`.
    Disconnected {
        error: String,
        retry_in: std::time::Duration,
    },
}
