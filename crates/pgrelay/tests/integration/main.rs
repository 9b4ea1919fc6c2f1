//! Integration tests against a real PostgreSQL with logical replication
//! (PGRELAY_TEST_DATABASE_URL, or a private cluster the testkit starts),
//! real SQLite replicas and real WebSockets.

// Test sizes and counts are small and known; casting them keeps the
// tests readable.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss,
    reason = "test sizes and counts are small and known"
)]

mod support;

mod abuse;
mod auth;
mod bad_input;
#[cfg(feature = "bench")]
mod bench;
mod caught_up;
mod chaos;
mod conformance;
mod crash;
mod doctor;
mod handover;
mod hydrate;
mod large_writes;
mod livestore;
mod migrations;
mod nodes;
mod operations;
mod pipeline;
mod protection;
mod repair;
mod retention;
mod schema_migrations;
mod sessions;
mod shutdown;
mod slot;
mod slot_loss;
mod tls;
mod types;
mod writes;
