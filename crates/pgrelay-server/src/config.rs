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
        if self.live_buffer == 0 {
            return Err("the live buffer must hold at least one transaction".to_owned());
        }
        Ok(())
    }
}
