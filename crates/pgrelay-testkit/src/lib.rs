//! Fixtures shared by pgrelay's tests, benchmarks and demo: a private
//! PostgreSQL cluster with logical replication, started from the installed
//! binaries, and a fresh database per test.

mod cluster;
mod database;

pub use cluster::{pg_binary, pg_bindir, PrivateCluster};
pub use database::{test_server_admin_url, TestDatabase};

#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error("PostgreSQL server binaries not found ({0}); install PostgreSQL 15+ or put pg_config on PATH")]
    NoBinaries(String),
    #[error("running {command}: {message}")]
    Command { command: String, message: String },
    #[error("I/O while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("PostgreSQL error while {context}: {source}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
}
