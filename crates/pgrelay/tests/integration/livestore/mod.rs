//! The LiveStore sync backend, spoken to over real WebSockets as
//! `@livestore/sync-cf` clients speak: 0.4 Effect RPC at `/livestore`, 0.3
//! messages at `/websocket`; storage in SQLite and PostgreSQL.

mod client;
mod http;
mod rpc;
mod storage;
mod v03;
