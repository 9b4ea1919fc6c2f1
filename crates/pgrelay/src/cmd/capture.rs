//! `pgrelay serve`'s flags for running several nodes on one slot: how
//! quickly a node takes over the capture, and how often followers look.

use std::time::Duration;

use clap::Args;
use pgrelay_server::ServerConfig;

#[derive(Args, Debug)]
pub struct CaptureArgs {
    /// How often a node that does not capture tries for the slot (and the capturer renews its term).
    #[arg(long, env = "PGRELAY_CAPTURE_RETRY", default_value = "1s", value_parser = humantime::parse_duration)]
    pub capture_retry: Duration,
    /// A capturer silent this long is taken over; one that cannot renew its term within it stands down.
    #[arg(long, env = "PGRELAY_CAPTURE_LEASE", default_value = "3s", value_parser = humantime::parse_duration)]
    pub capture_lease: Duration,
    /// How often a following node reads the change log without a notification (a safety net).
    #[arg(long, env = "PGRELAY_FOLLOW_POLL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub follow_poll: Duration,
}

impl CaptureArgs {
    pub fn apply(&self, config: &mut ServerConfig) {
        config.capture_retry = self.capture_retry;
        config.capture_lease = self.capture_lease;
        config.follow_poll = self.follow_poll;
    }
}
