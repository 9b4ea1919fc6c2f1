//! The PostgreSQL side of pgrelay: connection settings, the publication and
//! the logical slot, the catalog of synced tables, the replication stream
//! the pgoutput decoder and the assembly of its messages into
//! transactions.

mod assemble;
mod catalog;
mod connect;
mod error;
pub mod pgoutput;
mod pool;
mod slot;
mod stream;
mod tls;

pub use assemble::{AssembleError, StreamEvent, ORIGIN_PREFIX};
pub use catalog::{discover_tables, format_type, has_full_identity, TableFilter};
pub use connect::{connect, connect_undriven, ConnInfo, PgConnection, PgStream, SESSION_SETTINGS};
pub use error::{sql_error_is_retryable, PgError};
pub use pool::{Pool, PooledClient};
pub use slot::{
    check_wal_level, create_slot, drop_slot, ensure_publication, inspect_slot, SlotState,
};
pub use stream::{open_stream, ReplicationStream, StreamOptions};
pub use tls::{Connector, SslMode};
