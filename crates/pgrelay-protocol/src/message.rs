//! The messages on the `/api/sync` WebSocket. Every frame is one JSON object
//! with a `type` field; `docs/protocol.md` describes them for other clients.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::migration::{ClientMigration, Direction, UpgradeRequired};
use crate::{
    BatchRefusal, Lsn, SnapshotTable, TableDigest, TableSchema, Visibility, WriteBatch, WritePart,
    WriteResults,
};

/// The protocol version this build speaks. A server answers a `hello` with
/// a version outside `MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION` with
/// [`ErrorCode::UpgradeRequired`].
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest frame a server accepts from a client. Larger frames are
/// refused with [`ErrorCode::FrameTooLarge`] and the connection is closed.
pub const MAX_CLIENT_FRAME_BYTES: usize = 1 << 20;

/// A row's values by column name. `None` is SQL NULL; every other value is
/// PostgreSQL's text output for it. In an `update`, a column that is absent
/// kept its value (an unchanged TOASTed column PostgreSQL did not resend).
pub type Row = BTreeMap<String, Option<String>>;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// First frame on a connection.
    Hello {
        protocol_version: u32,
        client_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// Commit LSN of the last transaction the client's replica holds;
        /// absent for a new replica.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_lsn: Option<Lsn>,
        /// The change log the replica follows (from `welcome`); a server
        /// with another log answers `gone`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        log_id: Option<String>,
        /// Tables to take a fresh snapshot of while keeping `last_lsn` for
        /// the rest (a table whose column types changed, a new table).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        resync: Vec<String>,
        /// The tables this client syncs (`public.todos` or `todos`); absent
        /// for every synced table. The server sends only their schemas and
        /// changes, and refuses a name it does not sync.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tables: Option<Vec<String>>,
        /// The client can repair its replica (`docs/repair.md`): where the
        /// server would answer `gone`, it compares the replica with
        /// PostgreSQL range by range instead.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        repair: bool,
        /// The newest client migration the replica has applied (0 for
        /// none). Present only from clients that apply client migrations:
        /// only they are sent `migrations`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        schema_version: Option<i64>,
    },
    /// A batch of client transactions to apply (after `hello`).
    Write(WriteBatch),
    /// One part of a client transaction too large for one frame.
    WritePart(WritePart),
    /// Answer to `snapshot_end`: the tables whose row count or checksum did
    /// not match and must be sent again (empty: the snapshot is complete).
    SnapshotDone { refetch: Vec<String> },
    /// A liveness check for clients that cannot send WebSocket pings
    /// (browsers); answered with `pong`.
    Ping,
    /// How running a client migration went: `error` is absent when it was
    /// applied (or undone, for `down`).
    MigrationResult {
        version: i64,
        direction: Direction,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Answer to `hello`: the synced tables and the server's head at the
    /// moment of the handshake. Transactions follow.
    Welcome {
        protocol_version: u32,
        client_id: String,
        /// Commit LSN of the newest transaction in the change log now.
        head_lsn: Lsn,
        tables: Vec<TableSchema>,
        /// Identifies this server's change log; the client sends it back in
        /// its next `hello`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        log_id: Option<String>,
        /// PostgreSQL's WAL position (`pg_current_wal_lsn()`) when the
        /// server welcomed the client: a `caught_up` whose `wal_lsn` reaches
        /// it means the client has everything committed before it connected.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wal_lsn: Option<Lsn>,
        /// This client's tag in the `origin` of transactions it wrote
        /// (see [`crate::origin_tag`]); others see the tag, never the id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<String>,
    },
    /// A snapshot follows: binary chunk frames per table, a
    /// `snapshot_table` after each table, then `snapshot_end`.
    SnapshotBegin {
        /// Transactions are sent from after this position once the
        /// snapshot is complete (for a full snapshot it becomes the
        /// replica's position).
        resume_lsn: Lsn,
        /// Every synced table (`full`) or only those asked to `resync`.
        full: bool,
        tables: Vec<SnapshotTable>,
        /// Which logged transactions the snapshot already holds.
        visibility: Visibility,
    },
    /// A table's last chunk has been sent.
    SnapshotTable(TableDigest),
    /// Every table has been sent; the client answers `snapshot_done`.
    SnapshotEnd {},
    /// The server is busy with other snapshots; this one starts later.
    SnapshotQueued { waiting: usize },
    /// Instead of `gone`: the replica is compared with a consistent
    /// snapshot range by range ([`crate::repair`]); binary repair frames
    /// follow until the client's `done`. Then, as after a full snapshot,
    /// transactions follow from `resume_lsn`, skipping those `visibility`
    /// holds, for `tables`.
    RepairBegin {
        resume_lsn: Lsn,
        tables: Vec<String>,
        visibility: Visibility,
    },
    /// A table's columns changed, or a table started syncing; sent before
    /// the first transaction that depends on it.
    Schema { tables: Vec<TableSchema> },
    /// One committed PostgreSQL transaction.
    Tx(Transaction),
    /// The client has received everything up to `lsn` (at least the head
    /// at the time of its handshake); live transactions follow. Sent at the
    /// hand-over, and once more when the server's capture passes the
    /// welcome's `wal_lsn` if it had not then.
    CaughtUp {
        lsn: Lsn,
        /// Every transaction PostgreSQL committed before this WAL position
        /// has been sent (or did not concern the client).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wal_lsn: Option<Lsn>,
    },
    /// Something went wrong; when the server closes afterwards, the close
    /// frame carries the matching [`CloseCode`].
    Error {
        code: ErrorCode,
        message: String,
        /// With `upgrade_required`: the client's version and the window the
        /// server serves.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        upgrade: Option<UpgradeRequired>,
    },
    /// Client migrations the replica lacks (or must undo), in the order to
    /// run them; sent after the welcome and whenever migrations change,
    /// only to clients whose `hello` carried a `schema_version`.
    Migrations {
        /// The schema version the replica reaches once all are run.
        schema_version: i64,
        migrations: Vec<ClientMigration>,
    },
    /// The outcome of each client transaction of a `write`.
    WriteResult(WriteResults),
    /// A `write` was refused whole, before anything was applied; the
    /// connection stays open.
    WriteRefused {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        batch_id: Option<String>,
        code: BatchRefusal,
        message: String,
    },
    /// The answer to a client's `ping`.
    Pong,
}

/// One committed PostgreSQL transaction, with the changes a client may see,
/// in the order PostgreSQL made them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transaction {
    /// The transaction's commit LSN: its position in commit order.
    pub lsn: Lsn,
    pub xid: u32,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_us: i64,
    /// The pgrelay client whose write this transaction applied, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    pub changes: Vec<Change>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }

    pub fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "insert" => Op::Insert,
            "update" => Op::Update,
            "delete" => Op::Delete,
            "truncate" => Op::Truncate,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Schema-qualified table name, e.g. `public.todos`.
    pub table: String,
    pub op: Op,
    /// The row after an insert or update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<Row>,
    /// For delete: the key of the row (all columns under REPLICA IDENTITY
    /// FULL). For update: the old key when the key changed, or the whole old
    /// row under REPLICA IDENTITY FULL; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<Row>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON or not a valid message.
    MalformedFrame,
    /// A well-formed JSON object whose `type` this server does not know.
    UnknownMessage,
    /// `hello` asked for a protocol version this server does not speak
    /// (servers now answer [`ErrorCode::UpgradeRequired`]).
    UnsupportedVersion,
    /// The client's protocol version, or its replica's schema version, is
    /// outside what this server serves; the `error` carries both. The
    /// client must be upgraded (or the server), not retried as it is.
    UpgradeRequired,
    /// The frame is larger than the server accepts.
    FrameTooLarge,
    /// The first frame was not `hello`, or a second `hello` came.
    HandshakeRequired,
    /// The token was missing or not valid.
    Unauthorized,
    /// The token expired (at connect, or during the session, which the
    /// server then closes): get a fresh token and reconnect.
    TokenExpired,
    /// The client's position is not in the change log (or a history the
    /// server does not have); the client must start a fresh replica.
    Gone,
    /// The client did not keep up; it may reconnect and resume.
    TooSlow,
    /// A fault on the server; the client may reconnect and resume.
    Internal,
    /// `hello` named a table this server does not sync.
    UnknownTable,
    /// Another connection with the same client id took over; this one is
    /// closed and must not reconnect (it would take the session back).
    Replaced,
    /// The client sent more messages than its rate allows; it may
    /// reconnect after a backoff.
    RateLimited,
    /// An operator disconnected the client (admin API); it may reconnect.
    Disconnected,
}

impl ErrorCode {
    /// The WebSocket close code that goes with this error when the server
    /// closes the connection because of it.
    pub fn close_code(self) -> CloseCode {
        match self {
            ErrorCode::MalformedFrame
            | ErrorCode::UnknownMessage
            | ErrorCode::UnsupportedVersion
            | ErrorCode::HandshakeRequired => CloseCode::PROTOCOL_ERROR,
            ErrorCode::FrameTooLarge => CloseCode::TOO_BIG,
            ErrorCode::Unauthorized => CloseCode::POLICY_VIOLATION,
            ErrorCode::TokenExpired => CloseCode::TOKEN_EXPIRED,
            ErrorCode::Gone => CloseCode::GONE,
            ErrorCode::TooSlow => CloseCode::TRY_AGAIN_LATER,
            ErrorCode::Internal => CloseCode::INTERNAL_ERROR,
            ErrorCode::UnknownTable => CloseCode::POLICY_VIOLATION,
            ErrorCode::Replaced => CloseCode::REPLACED,
            ErrorCode::RateLimited => CloseCode::RATE_LIMITED,
            ErrorCode::Disconnected => CloseCode::DISCONNECTED,
            ErrorCode::UpgradeRequired => CloseCode::UPGRADE_REQUIRED,
        }
    }
}

/// WebSocket close codes pgrelay uses (RFC 6455 section 7.4, plus codes in
/// the application range that echo HTTP statuses: 4401 token expired, 4409
/// replaced by another connection, 4410 gone, 4426 upgrade required, 4429
/// rate limited; 4000
/// disconnected by an operator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: CloseCode = CloseCode(1000);
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    pub const POLICY_VIOLATION: CloseCode = CloseCode(1008);
    pub const TOO_BIG: CloseCode = CloseCode(1009);
    pub const INTERNAL_ERROR: CloseCode = CloseCode(1011);
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);
    pub const DISCONNECTED: CloseCode = CloseCode(4000);
    pub const REPLACED: CloseCode = CloseCode(4409);
    pub const TOKEN_EXPIRED: CloseCode = CloseCode(4401);
    pub const GONE: CloseCode = CloseCode(4410);
    pub const UPGRADE_REQUIRED: CloseCode = CloseCode(4426);
    pub const RATE_LIMITED: CloseCode = CloseCode(4429);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_wire_form() {
        let m: ClientMessage = serde_json::from_str(
            r#"{"type":"hello","protocol_version":1,"client_id":"c1","last_lsn":"0/16B3748"}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ClientMessage::Hello {
                protocol_version: 1,
                client_id: "c1".into(),
                token: None,
                last_lsn: Some(Lsn(0x16B_3748)),
                log_id: None,
                resync: Vec::new(),
                tables: None,
                repair: false,
                schema_version: None,
            }
        );
    }

    #[test]
    fn unknown_type_and_fields_are_refused() {
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"bogus"}"#).is_err());
        assert!(serde_json::from_str::<ClientMessage>(
            r#"{"type":"hello","protocol_version":1,"client_id":"c","extra":1}"#
        )
        .is_err());
    }

    #[test]
    fn tx_round_trips() {
        let mut new = Row::new();
        new.insert("id".into(), Some("1".into()));
        new.insert("note".into(), None);
        let msg = ServerMessage::Tx(Transaction {
            lsn: Lsn(42),
            xid: 7,
            commit_time_us: 1_700_000_000_000_000,
            origin: None,
            changes: vec![Change {
                table: "public.t".into(),
                op: Op::Insert,
                new: Some(new),
                old: None,
            }],
        });
        let text = serde_json::to_string(&msg).unwrap();
        assert!(text.starts_with(r#"{"type":"tx","lsn":"0/2A""#), "{text}");
        assert_eq!(serde_json::from_str::<ServerMessage>(&text).unwrap(), msg);
    }
}
