//! Client migrations as a connection runs them: the ones the server sent,
//! in order, each reported back (`migration_result`). A failed one stays
//! at the head of the queue and is tried again after a growing backoff;
//! the ones after it wait, since they may build on it.

use std::collections::VecDeque;
use std::time::Duration;

use pgrelay_protocol::{ClientMessage, ClientMigration};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::{ClientError, Event, Replica};

/// The first wait after a failure; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Default)]
pub(crate) struct Migrations {
    queue: VecDeque<ClientMigration>,
    /// Failed attempts of the migration at the head.
    attempts: u32,
    retry_at: Option<Instant>,
}

impl Migrations {
    /// Queues what the server sent (a migration already queued is not
    /// queued twice).
    pub(crate) fn receive(&mut self, migrations: Vec<ClientMigration>) {
        for m in migrations {
            let queued = self
                .queue
                .iter()
                .any(|q| q.version == m.version && q.direction == m.direction);
            if !queued {
                self.queue.push_back(m);
            }
        }
    }

    /// Resolves when a migration is due (never while none is queued).
    pub(crate) async fn due(&self) {
        if self.queue.is_empty() {
            return std::future::pending().await;
        }
        if let Some(at) = self.retry_at {
            tokio::time::sleep_until(at).await;
        }
    }

    /// Runs the queue until it is empty or a migration fails; returns the
    /// reports to send.
    pub(crate) async fn run(
        &mut self,
        replica: &Replica,
        events: &broadcast::Sender<Event>,
    ) -> Result<Vec<String>, ClientError> {
        self.retry_at = None;
        let mut reports = Vec::new();
        while let Some(m) = self.queue.front() {
            let outcome = replica.run_migration(m.clone()).await?;
            let report = ClientMessage::MigrationResult {
                version: m.version,
                direction: m.direction,
                error: outcome.as_ref().err().cloned(),
            };
            reports.push(
                serde_json::to_string(&report).map_err(|e| ClientError::Protocol(e.to_string()))?,
            );
            match outcome {
                Ok(()) => {
                    tracing::info!(version = m.version, name = %m.name, direction = ?m.direction, "client migration ran");
                    let _ = events.send(Event::MigrationApplied {
                        version: m.version,
                        direction: m.direction,
                    });
                    self.attempts = 0;
                    self.queue.pop_front();
                }
                Err(error) => {
                    self.attempts += 1;
                    let wait = FIRST_BACKOFF
                        .saturating_mul(1 << self.attempts.min(16).saturating_sub(1))
                        .min(MAX_BACKOFF);
                    tracing::warn!(version = m.version, name = %m.name, %error, attempt = self.attempts, ?wait, "client migration failed; retrying");
                    let _ = events.send(Event::MigrationFailed {
                        version: m.version,
                        error,
                        attempt: self.attempts,
                        retry_in: wait,
                    });
                    self.retry_at = Some(Instant::now() + wait);
                    break;
                }
            }
        }
        Ok(reports)
    }
}
