//! The server's configuration, validated before anything starts.

use std::net::SocketAddr;
use std::time::Duration;

use pgrelay_pg::TableFilter;
use secrecy::{ExposeSecret, SecretString};

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// PostgreSQL to capture from; `None` serves only `/health` (and the
    /// routes given to [`crate::Server::start_with`]).
    pub database_url: Option<SecretString>,
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
    /// How long `pgrelay.audit_log` keeps an entry.
    pub audit_retention: Duration,
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
    /// Open connections at most (a sync session, or an HTTP connection
    /// until it closes); more are answered 503 and closed.
    pub max_connections: usize,
    /// An HTTP connection that sends no complete request head for this
    /// long (a new one, or a kept-alive one between requests) is closed.
    pub http_idle_timeout: Duration,
    /// Sync connection attempts per second per IP address (token bucket;
    /// 0 turns the limit off); more are answered 429.
    pub connect_rate: f64,
    pub connect_burst: u32,
    /// Frames per second a connection may send (token bucket; 0 turns the
    /// limit off); a connection over it is closed with `rate_limited`.
    pub message_rate: f64,
    pub message_burst: u32,
    /// Where the client registry lives: `None` in this process, or a
    /// `redis://host:port[/db]` URL shared by several nodes.
    pub registry: Option<SecretString>,
    /// Prefix of every key the registry writes to Redis.
    pub registry_prefix: String,
    /// A registration not refreshed for this long expires.
    pub registry_ttl: Duration,
    /// How often live sessions' registrations are refreshed.
    pub registry_refresh: Duration,
    /// This node's name in the registry; the host name and port by default.
    pub node: Option<String>,
    /// The secret the admin API asks for (`Authorization: Bearer ...`);
    /// without one the admin API is off.
    pub admin_token: Option<SecretString>,
    /// `/ready` fails while replication lags more than this.
    pub ready_max_lag: Duration,
    /// Replication counts as stalled when PostgreSQL's WAL moved on and the
    /// slot's confirmed position did not, for this long.
    pub stall_after: Duration,
    /// How often WAL position, slot and change log are measured.
    pub monitor_interval: Duration,
    /// On shutdown, how long sessions get to close before the server stops
    /// waiting for them.
    pub shutdown_grace: Duration,
    /// `--tls-cert`/`--tls-key`: serve HTTPS and `wss://` directly;
    /// `None` serves plain HTTP (behind a TLS-terminating proxy, or local).
    pub tls: Option<crate::TlsFiles>,
    /// How often a node that does not capture tries for the capture lock
    /// (and a capturer renews its term).
    pub capture_retry: Duration,
    /// A capturer that has not renewed its term for this long is taken
    /// over (its lock session ended); a capturer that cannot renew within
    /// it stands down.
    pub capture_lease: Duration,
    /// How often a following node reads the change log even without a
    /// notification (a safety net; notifications wake it at once).
    pub follow_poll: Duration,
    /// Keep range digests of every table in memory (made in the
    /// background), so a repair reads only the ranges written since
    /// (`docs/repair.md`). Off: each repair's first round reads every row.
    pub kept_digests: bool,
}

impl ServerConfig {
    pub fn new(database_url: impl Into<SecretString>) -> ServerConfig {
        ServerConfig {
            database_url: Some(database_url.into()),
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
            audit_retention: Duration::from_secs(30 * 24 * 3600),
            auth: None,
            retain: Duration::from_secs(7 * 24 * 3600),
            max_hydrations: 4,
            table_poll_interval: Duration::from_secs(2),
            max_connections: 10_000,
            http_idle_timeout: Duration::from_secs(30),
            connect_rate: 20.0,
            connect_burst: 100,
            message_rate: 1_000.0,
            message_burst: 2_000,
            registry: None,
            registry_prefix: "pgrelay:".to_owned(),
            registry_ttl: Duration::from_secs(24 * 3600),
            registry_refresh: Duration::from_secs(10),
            node: None,
            admin_token: None,
            ready_max_lag: Duration::from_secs(60),
            stall_after: Duration::from_secs(60),
            monitor_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            tls: None,
            capture_retry: Duration::from_secs(1),
            capture_lease: Duration::from_secs(3),
            follow_poll: Duration::from_secs(5),
            kept_digests: true,
        }
    }

    /// A server without PostgreSQL: no row sync, only `/health` and the
    /// routes given to [`crate::Server::start_with`] (the LiveStore event logs).
    pub fn without_database() -> ServerConfig {
        ServerConfig {
            database_url: None,
            ..ServerConfig::new("")
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
        if self.capture_retry.is_zero() || self.capture_lease <= self.capture_retry {
            return Err(format!(
                "--capture-lease ({:?}) must be longer than --capture-retry ({:?}), which must not be zero",
                self.capture_lease, self.capture_retry
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
        if self.audit_retention < Duration::from_secs(1) {
            return Err("--audit-retention must be at least a second".to_owned());
        }
        if self.retain < Duration::from_secs(1) {
            return Err("--retain must be at least a second".to_owned());
        }
        if self.max_hydrations == 0 {
            return Err("--max-hydrations must be at least 1".to_owned());
        }
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".to_owned());
        }
        if self.http_idle_timeout.is_zero() {
            return Err("--http-idle-timeout must be positive".to_owned());
        }
        for (flag, rate, burst) in [
            ("--connect-rate", self.connect_rate, self.connect_burst),
            ("--message-rate", self.message_rate, self.message_burst),
        ] {
            if !rate.is_finite() || rate < 0.0 {
                return Err(format!("{flag} {rate}: give a rate per second, 0 for none"));
            }
            if rate > 0.0 && burst == 0 {
                return Err(format!("{flag}: its burst must be at least 1"));
            }
        }
        if let Some(url) = &self.registry {
            let url = url.expose_secret();
            if !url.starts_with("redis://") && !url.starts_with("rediss://") {
                // Not echoed: the URL may hold a password.
                return Err(
                    "--registry: give a redis://[user:password@]host:port[/db] URL, or leave it out for the embedded registry"
                        .to_owned(),
                );
            }
        }
        if self.registry_ttl < Duration::from_secs(1) || self.registry_refresh.is_zero() {
            return Err("the registry TTL and refresh interval must be positive".to_owned());
        }
        if self.registry_refresh * 2 > self.registry_ttl {
            return Err(format!(
                "--registry-refresh {:?} must be at most half of --registry-ttl {:?}, or live clients expire",
                self.registry_refresh, self.registry_ttl
            ));
        }
        if self
            .admin_token
            .as_ref()
            .is_some_and(|t| t.expose_secret().len() < 16)
        {
            return Err("--admin-token must be at least 16 characters".to_owned());
        }
        if self.monitor_interval.is_zero() {
            return Err("the monitor interval must be positive".to_owned());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_not_printed() {
        let mut config = ServerConfig::new("postgres://app:db-password-1@127.0.0.1/app");
        config.admin_token = Some("admin-token-secret-2".into());
        config.registry = Some("redis://:redis-password-3@127.0.0.1:6379".into());
        let printed = format!("{config:?}");
        for secret in ["db-password-1", "admin-token-secret-2", "redis-password-3"] {
            assert!(!printed.contains(secret), "{secret} printed in {printed}");
        }
        // The rest is still there to read.
        assert!(printed.contains("slot: \"pgrelay\""), "{printed}");
    }
}
