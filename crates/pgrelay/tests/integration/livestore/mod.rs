//! The LiveStore sync backend, spoken to over real WebSockets as
//! `@livestore/sync-cf` clients speak: 0.4 Effect RPC at `/livestore`, 0.3
//! messages at `/websocket`, the HTTP transport; storage in SQLite and
//! PostgreSQL; auth and limits.

mod auth;
mod client;
mod http;
mod limits;
mod pulls;
mod rpc;
mod storage;
mod transport_http;
mod v03;
