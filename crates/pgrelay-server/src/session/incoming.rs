//! What a client sends after the handshake: rate-limited, parsed, and
//! dispatched to writes, write parts, refusals of a batch and pings.

use axum::extract::ws::Message;
use pgrelay_protocol::{ErrorCode, Lsn, ServerMessage};

use super::{handshake, write, Refusal, Session};
use crate::auth::Action;
use crate::hub::Frame;
use crate::ops::metrics::add;

impl Session<'_> {
    /// Handles a frame from the client after the handshake; `false` when
    /// the client has gone.
    pub(super) async fn incoming(
        &mut self,
        incoming: Option<Result<Message, axum::Error>>,
    ) -> Result<bool, Refusal> {
        if matches!(incoming, Some(Ok(ref m)) if !matches!(m, Message::Close(_))) {
            let config = &self.state.config;
            if !self.bucket.take(
                config.message_rate,
                config.message_burst,
                std::time::Instant::now(),
            ) {
                add(&self.state.metrics.rate_limited_messages, 1);
                return Err(Refusal::new(
                    ErrorCode::RateLimited,
                    format!(
                        "more than {} messages a second (burst {}); reconnect later and send less",
                        config.message_rate, config.message_burst
                    ),
                ));
            }
        }
        let parsed = match incoming {
            None | Some(Ok(Message::Close(_))) => return Ok(false),
            Some(Err(e)) => return Err(handshake::read_error(e)),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Ok(true),
            Some(Ok(Message::Text(text))) => write::parse(text.as_bytes()),
            Some(Ok(Message::Binary(bytes))) => write::parse(&bytes),
        };
        self.live.touch();
        self.handle(parsed).await?;
        Ok(true)
    }

    pub(super) async fn handle(&mut self, parsed: write::Incoming) -> Result<(), Refusal> {
        match parsed {
            write::Incoming::Write(batch) => {
                self.interrupt_parts("a write").await?;
                self.write(batch).await?
            }
            write::Incoming::WritePart(part, bytes) => {
                Box::pin(self.write_part(part, bytes)).await?
            }
            write::Incoming::Refused {
                batch_id,
                code,
                message,
            } => {
                self.interrupt_parts("a refused write").await?;
                self.refuse_batch(batch_id, code, message).await?
            }
            write::Incoming::Ping => {
                self.send(Frame::encode(&ServerMessage::Pong, Lsn::ZERO))
                    .await?;
            }
            write::Incoming::MigrationResult {
                version,
                direction,
                error,
            } => {
                Box::pin(self.migration_result(version, direction, error)).await?;
            }
            // A late verdict on a snapshot already settled: nothing to do.
            write::Incoming::SnapshotDone(_) => {}
            write::Incoming::Fatal(refusal) => return Err(refusal),
        }
        Ok(())
    }

    /// Applies a client's batch and answers it. Nothing is forwarded while
    /// it runs, so every transaction sent before the answer committed
    /// before the rows a rejection reports were read.
    pub(super) async fn write(
        &mut self,
        batch: pgrelay_protocol::WriteBatch,
    ) -> Result<(), Refusal> {
        if let Some(other) = batch
            .client_id
            .as_ref()
            .filter(|c| **c != self.live.client_id)
        {
            let refused = ServerMessage::WriteRefused {
                batch_id: batch.batch_id.clone(),
                code: pgrelay_protocol::BatchRefusal::MalformedBatch,
                message: format!(
                    "client_id {:?} is not this connection's client",
                    other.chars().take(64).collect::<String>()
                ),
            };
            add(&self.state.metrics.batches_refused, 1);
            return self.send(Frame::encode(&refused, Lsn::ZERO)).await;
        }
        let schemas = self.state.hub.schemas();
        let results = match self.state.replication.lost_database() {
            Some(why) => crate::writes::Writer::unreachable(&batch, &why),
            None => {
                self.state
                    .writer
                    .apply(
                        crate::writes::Author {
                            client_id: &self.live.client_id,
                            subject: self.principal.as_ref().and_then(|p| p.owner.as_deref()),
                        },
                        &batch,
                        &schemas,
                        self.scope.as_deref(),
                    )
                    .await
            }
        };
        self.state.metrics.record_results(&results);
        let subject = self.principal.as_ref().and_then(|p| p.subject.as_deref());
        audit_rejections(&self.state.audit, &self.live.client_id, subject, &results);
        self.send(Frame::encode(
            &ServerMessage::WriteResult(results),
            Lsn::ZERO,
        ))
        .await
    }
}

/// Writes refused by the rules go to the audit trail.
pub(crate) fn audit_rejections(
    audit: &crate::auth::Audit,
    client_id: &str,
    subject: Option<&str>,
    results: &pgrelay_protocol::WriteResults,
) {
    for result in &results.results {
        if result.code == Some(pgrelay_protocol::RejectCode::Forbidden) {
            audit.record(
                Action::WriteRejected,
                Some(client_id),
                subject,
                format!(
                    "transaction {}: {}",
                    result.id,
                    result.reason.as_deref().unwrap_or("")
                ),
            );
        }
    }
}
