//! Status events for library users.

use pgrelay_protocol::Lsn;

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The handshake succeeded; `head` is the server's newest transaction.
    Connected { head: Lsn },
    /// The replica holds everything PostgreSQL had committed when this
    /// connection was welcomed (with an older server that does not report
    /// its WAL position: everything its change log held then).
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
        /// When each transaction's frame was read from the socket (µs
        /// since the Unix epoch), in the same order.
        received_at_us: Vec<i64>,
        /// When the SQLite transaction holding them committed (µs since the
        /// Unix epoch).
        applied_at_us: i64,
        /// Commit LSN and origin of each applied transaction that came from
        /// a client's write (how a writer recognises its own).
        origins: Vec<(Lsn, String)>,
    },
    /// A local client transaction (from [`crate::SyncClient::execute`] or
    /// any write to a synced table) is committed in PostgreSQL. `latency`
    /// runs from the local write to the server's answer, which follows the
    /// PostgreSQL commit. The replica takes the server's version of the
    /// rows when the transaction comes back in the stream.
    WriteApplied {
        tx_id: String,
        changes: usize,
        latency: std::time::Duration,
        /// The PostgreSQL transaction carrying this write has its commit
        /// LSN in `(lsn_floor, lsn]` (from the server's `write_result`;
        /// absent from older servers).
        lsn_floor: Option<Lsn>,
        lsn: Option<Lsn>,
    },
    /// A local client transaction was refused for good (it is not retried)
    /// and its rows were put back to the server's version.
    WriteRejected { tx_id: String, reason: String },
    /// The server could not apply a local transaction now; it is sent
    /// again after a backoff.
    WriteRetry { tx_id: String, reason: String },
    /// A snapshot is arriving: rows and (uncompressed) bytes loaded so far.
    Hydrating {
        tables: usize,
        tables_done: usize,
        rows: u64,
        bytes: u64,
        /// PostgreSQL's estimate of the snapshot's rows (0 when unknown).
        estimated_rows: u64,
    },
    /// A snapshot was loaded, verified and committed; `refetched` lists the
    /// tables that failed their check and were sent again.
    Hydrated {
        /// Every table with a fresh position, or only `tables` (a resync).
        full: bool,
        tables: Vec<String>,
        rows: u64,
        bytes: u64,
        elapsed: std::time::Duration,
        refetched: Vec<String>,
    },
    /// The replica was repaired instead of re-hydrated (the server could
    /// not continue its position): only the ranges that differed were
    /// replaced. `bytes` counts repair frames both ways; `refetch` lists
    /// tables that still differed and are fetched with a snapshot.
    Repaired {
        tables: Vec<String>,
        /// Rows removed from, and rows received into, replaced ranges.
        rows_removed: u64,
        rows_received: u64,
        bytes: u64,
        rounds: usize,
        elapsed: std::time::Duration,
        refetch: Vec<String>,
    },
    /// A synced table the replica cannot hold (column names that differ
    /// only in case, or a SQLite name another synced table has) is kept out
    /// with the reason; the other tables go on syncing. The web client
    /// reports it as an `error` event with code `schema_unsupported`.
    SchemaUnsupported { table: String, reason: String },
    /// A client migration ran in the replica (`up`) or was undone (`down`).
    MigrationApplied {
        version: i64,
        direction: pgrelay_protocol::Direction,
    },
    /// A client migration failed and was rolled back; it is tried again
    /// after `retry_in` (the server sees each attempt).
    MigrationFailed {
        version: i64,
        error: String,
        attempt: u32,
        retry_in: std::time::Duration,
    },
    /// The connection ended; the client reconnects after `retry_in`.
    Disconnected {
        error: String,
        retry_in: std::time::Duration,
    },
}
