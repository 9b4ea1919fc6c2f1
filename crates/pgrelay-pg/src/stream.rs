//! The streaming replication connection (START_REPLICATION with pgoutput),
//! spoken by the `pgwire-replication` crate; pgoutput row messages are
//! decoded by [`crate::pgoutput`] and assembled into transactions by
//! [`crate::assemble`].

use std::time::Duration;

use pgrelay_protocol::Lsn;
use pgwire_replication::{Lsn as WireLsn, ReplicationClient, ReplicationConfig};
use secrecy::ExposeSecret;

use crate::assemble::{Assembler, StreamEvent};
use crate::connect::{options_string, ConnInfo};
use crate::PgError;

#[derive(Clone, Debug)]
pub struct StreamOptions {
    pub slot: String,
    pub publication: String,
    /// The position made durable downstream; reported to PostgreSQL until
    /// the consumer confirms more.
    pub durable: Lsn,
    /// How often to send standby status updates.
    pub status_interval: Duration,
}

/// An open replication stream. Dropping it stops the walsender connection,
/// so the slot becomes free again.
pub struct ReplicationStream {
    client: ReplicationClient,
    assembler: Assembler,
}

/// Starts streaming from the slot's confirmed position.
pub async fn open_stream(
    info: &ConnInfo,
    opts: &StreamOptions,
) -> Result<ReplicationStream, PgError> {
    let config = ReplicationConfig::new(
        info.host.clone(),
        info.user.clone(),
        info.password.expose_secret().to_owned(),
        info.database.clone(),
        opts.slot.clone(),
        opts.publication.clone(),
    )
    .with_port(info.port)
    .with_tls(info.tls().replication(&info.host))
    .with_start_lsn(WireLsn::ZERO)
    .with_ack_lsn(WireLsn(opts.durable.0))
    .with_status_interval(opts.status_interval)
    .with_wakeup_interval(opts.status_interval)
    .with_options(options_string())
    .with_application_name("pgrelay-replication")
    .with_buffer_size(16_384);
    let client = ReplicationClient::connect(config).await?;
    Ok(ReplicationStream {
        client,
        assembler: Assembler::default(),
    })
}

impl ReplicationStream {
    /// The next event; `None` when the stream ended.
    pub async fn recv(&mut self) -> Result<Option<StreamEvent>, PgError> {
        match self.client.recv().await? {
            Some(event) => Ok(Some(self.assembler.feed(event)?)),
            None => Ok(None),
        }
    }

    /// Tells PostgreSQL everything up to `lsn` is durable downstream, so the
    /// slot may release WAL before it. Call only after the change log has
    /// committed every change before `lsn`.
    pub fn confirm(&self, lsn: Lsn) {
        self.client.update_applied_lsn(WireLsn(lsn.0));
    }

    /// Confirms `lsn`, waits (up to `wait`) until PostgreSQL has been told,
    /// then closes. The stream reports positions on its own schedule and
    /// not when it stops, so without this a clean shutdown would leave the
    /// slot behind what the change log holds (replayed, harmlessly, on the
    /// next start, but holding WAL meanwhile).
    pub async fn close_confirmed(self, lsn: Lsn, wait: std::time::Duration) {
        self.confirm(lsn);
        let metrics = self.client.metrics();
        let deadline = tokio::time::Instant::now() + wait;
        while metrics.last_applied_lsn().as_u64() < lsn.0 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(%lsn, "the final position was not reported before closing; the slot replays from its last one");
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        self.close().await;
    }

    /// Stops the stream and waits for the connection to close.
    pub async fn close(mut self) {
        if let Err(e) = self.client.shutdown().await {
            tracing::debug!(error = %e, "replication stream closed with an error");
        }
    }
}
