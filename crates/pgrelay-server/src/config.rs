//! The server's configuration, validated before anything starts.

use std::net::SocketAddr;
use std::time::Duration;

use pgrelay_pg::TableFilter;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub database_url: String,
    pub listen: SocketAddr,
    pub tables: TableFilter,
    /// Name of the logical replication slot (also names the publication).
    pub slot: String,
    /// How often the server pings each client.
    pub ping_interval: Duration,
    /// A client that sends nothing (not even a pong) for this long is
    /// disconnected.
    pub idle_timeout: Duration,
    /// A send to a client that takes longer than this drops the client,
    /// so one stalled socket never holds memory or a task hostage.
    pub send_timeout: Duration,
    /// Transactions kept in memory for live sessions; a session further
    /// behind than this reads the change log instead.
    pub live_buffer: usize,
    /// How often the replication stream reports its durable position.
    pub status_interval: Duration,
    /// Tables whose client writes are checked against a version column
    /// (`(table, column)`); every other table is last-write-wins.
    pub conflicts: Vec<(String, String)>,
    /// How long applied change ids are remembered, so a resend within
    /// this time is recognised and not applied twice.
    pub applied_retention: Duration,
    /// `--auth jwt`: tokens required, row rules applied. `None`: every
    /// client reads and writes everything (no token needed).
    pub auth: Option<crate::auth::AuthConfig>,
    /// How long the change log keeps a transaction. A replica further
    /// behind is told it is gone and re-hydrates from a snapshot.
    pub retain: Duration,
    /// Snapshots served at once; further hydrating clients queue.
    pub max_hydrations: usize,
    /// How often the catalog is checked for new tables to sync (with the
    /// default filter, every table in schema `public`).
    pub table_poll_interval: Duration,
}

impl ServerConfig {
    pub fn new(database_url: impl Into<String>) -> ServerConfig {
        ServerConfig {
            database_url: database_url.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 7171)),
            tables: TableFilter::AllPublic,
            slot: "pgrelay".to_owned(),
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            send_timeout: Duration::from_secs(30),
            live_buffer: 4096,
            status_interval: Duration::from_secs(1),
            conflicts: Vec::new(),
            applied_retention: Duration::from_secs(7 * 24 * 3600),
            auth: None,
            retain: Duration::from_secs(7 * 24 * 3600),
            max_hydrations: 4,
            table_poll_interval: Duration::from_secs(2),
        }
    }

    /// The publication's name, derived from the slot so two servers with
    /// different slots never share one.
    pub fn publication(&self) -> String {
        format!("{}_pub", self.slot)
    }

    pub fn validate(&self) -> Result<(), String> {
        let slot_ok = !self.slot.is_empty()
            && self.slot.len() <= 58
            && self
                .slot
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !slot_ok {
            return Err(format!(
                "--slot {:?}: a slot name is 1-58 characters of lower-case letters, digits and '_'",
                self.slot
            ));
        }
        if self.ping_interval.is_zero() || self.idle_timeout <= self.ping_interval {
            return Err("the idle timeout must be longer than the ping interval".to_owned());
        }
        for (table, column) in &self.conflicts {
            if table.is_empty() || column.is_empty() {
                return Err(format!(
                    "--conflict {table}={column}: give it as table=version_column"
                ));
            }
        }
        if self.applied_retention < Duration::from_secs(60) {
            return Err("the applied-change retention must be at least a minute".to_owned());
        }
        if self.retain < Duration::from_secs(1) {
            return Err("--retain must be at least a second".to_owned());
        }
        if self.max_hydrations == 0 {
            return Err("--max-hydrations must be at least 1".to_owned());
        }
        if self.live_buffer == 0 {
            return Err("the live buffer must hold at least one transaction".to_owned());
        }
        Ok(())
    }
}

/// Parses `table=column` (the `--conflict` flag).
pub fn parse_conflict(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((table, column)) if !table.trim().is_empty() && !column.trim().is_empty() => {
            Ok((table.trim().to_owned(), column.trim().to_owned()))
        }
        _ => Err(format!(
            "{text:?}: expected table=version_column, e.g. todos=version"
        )),
    }
}
