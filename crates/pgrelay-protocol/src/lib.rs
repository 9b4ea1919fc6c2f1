//! pgrelay's wire protocol between the server and its clients: the messages on
//! the `/api/sync` WebSocket, their versions and error codes. No I/O here, so
//! clients in any language can be checked against these definitions.

pub mod canonical;
pub mod copy_text;
mod frames;
mod ident;
mod lsn;
mod message;
mod migration;
mod origin;
pub mod repair;
mod schema;
mod snapshot;
mod write;

pub use frames::{
    encode_alone, layout, Assembly, BatchFrame, EncodedTransaction, Layout, PartAnswer, TooLarge,
    WritePart, MAX_TRANSACTION_BYTES,
};
pub use ident::{quote_ident, quote_table};
pub use lsn::{Lsn, ParseLsnError};
pub use message::{
    Change, ClientMessage, CloseCode, ErrorCode, Op, Row, ServerMessage, Transaction,
    MAX_CLIENT_FRAME_BYTES, PROTOCOL_VERSION,
};
pub use migration::{ClientMigration, Direction, UpgradeRequired, MIN_PROTOCOL_VERSION};
pub use origin::origin_tag;
pub use schema::{sqlite_table_name, Column, TableSchema, ValueKind};
pub use snapshot::{
    chunk_header, parse_chunk, Checksum, SnapshotTable, TableDigest, Visibility,
    CHUNK_HEADER_BYTES, CHUNK_TAG,
};
pub use write::{
    valid_id, BatchRefusal, ClientChange, ClientTransaction, CurrentRow, RejectCode, TxResult,
    WriteBatch, WriteResults, WriteStatus, MAX_WRITE_CHANGES, MAX_WRITE_TRANSACTIONS,
};
