//! Frames a client sends after its `hello`: `write` batches and the
//! `write_part` frames of a transaction too large for one. A bad batch is
//! refused whole with a `write_refused` and the connection stays open; a
//! frame that is not a message at all still ends the session.

use pgrelay_protocol::{
    Assembly, BatchRefusal, ClientMessage, ErrorCode, Lsn, PartAnswer, ServerMessage, TxResult,
    WriteBatch, WritePart, WriteResults, MAX_CLIENT_FRAME_BYTES,
};
use tokio::sync::SemaphorePermit;

use super::{handshake, Refusal, Session};
use crate::hub::Frame;
use crate::ops::metrics::add;

pub(super) enum Incoming {
    Write(WriteBatch),
    /// A liveness check: answered with `pong`.
    Ping,
    /// A part of a large transaction, with its frame's length.
    WritePart(WritePart, usize),
    /// The client's verdict on a snapshot.
    SnapshotDone(Vec<String>),
    /// Refuse this batch, keep the connection.
    Refused {
        batch_id: Option<String>,
        code: BatchRefusal,
        message: String,
    },
    /// The client's report on a client migration.
    MigrationResult {
        version: i64,
        direction: pgrelay_protocol::Direction,
        error: Option<String>,
    },
    /// Refuse and close.
    Fatal(Refusal),
}

pub(super) fn parse(bytes: &[u8]) -> Incoming {
    if bytes.len() > MAX_CLIENT_FRAME_BYTES {
        return Incoming::Refused {
            batch_id: None,
            code: BatchRefusal::BatchTooLarge,
            message: format!(
                "frame of {} bytes is over the limit of {MAX_CLIENT_FRAME_BYTES}; send smaller batches",
                bytes.len()
            ),
        };
    }
    match serde_json::from_slice::<ClientMessage>(bytes) {
        Ok(ClientMessage::Write(batch)) => match batch.check() {
            Ok(()) => Incoming::Write(batch),
            Err((code, message)) => Incoming::Refused {
                batch_id: batch.batch_id,
                code,
                message,
            },
        },
        Ok(ClientMessage::WritePart(part)) => Incoming::WritePart(part, bytes.len()),
        Ok(ClientMessage::SnapshotDone { refetch }) => Incoming::SnapshotDone(refetch),
        Ok(ClientMessage::Ping) => Incoming::Ping,
        Ok(ClientMessage::MigrationResult {
            version,
            direction,
            error,
        }) => Incoming::MigrationResult {
            version,
            direction,
            error,
        },
        Ok(ClientMessage::Hello { .. }) => Incoming::Fatal(Refusal::new(
            ErrorCode::HandshakeRequired,
            "hello was already received",
        )),
        Err(error) => {
            // A `write` with a bad body is a refused batch, not a broken
            // connection.
            let value = serde_json::from_slice::<serde_json::Value>(bytes).ok();
            let is_write = matches!(
                value
                    .as_ref()
                    .and_then(|v| v.get("type"))
                    .and_then(|t| t.as_str()),
                Some("write" | "write_part")
            );
            if is_write {
                let batch_id = value
                    .as_ref()
                    .and_then(|v| v.get("batch_id"))
                    .and_then(|b| b.as_str())
                    .map(|b| b.chars().take(128).collect());
                Incoming::Refused {
                    batch_id,
                    code: BatchRefusal::MalformedBatch,
                    message: format!("invalid write: {error}"),
                }
            } else {
                Incoming::Fatal(handshake::classify(bytes, error))
            }
        }
    }
}

/// An unfinished transaction from parts and its place among the node's.
pub(super) struct Parts<'a> {
    assembly: Option<Assembly>,
    slot: Option<SemaphorePermit<'a>>,
}

impl Session<'_> {
    pub(super) async fn refuse_batch(
        &mut self,
        batch_id: Option<String>,
        code: BatchRefusal,
        message: String,
    ) -> Result<(), Refusal> {
        tracing::debug!(?code, %message, "write batch refused");
        add(&self.state.metrics.batches_refused, 1);
        let refused = ServerMessage::WriteRefused {
            batch_id,
            code,
            message,
        };
        self.send(Frame::encode(&refused, Lsn::ZERO)).await
    }

    /// Drops an unfinished transaction from parts (refusing it) when
    /// something else comes before its last part.
    pub(super) async fn interrupt_parts(&mut self, by: &str) -> Result<(), Refusal> {
        let Some(mut parts) = self.parts.take() else {
            return Ok(());
        };
        if let Some(PartAnswer::Refused {
            batch_id,
            code,
            message,
        }) = Assembly::interrupt(&mut parts.assembly, by)
        {
            self.refuse_batch(batch_id, code, message).await?;
        }
        Ok(())
    }

    /// Collects a large transaction's parts; applies it, like a `write`
    /// of it alone, when the last one comes. Everything collected is
    /// dropped with the session, and the client sends the whole again.
    pub(super) async fn write_part(
        &mut self,
        part: WritePart,
        bytes: usize,
    ) -> Result<(), Refusal> {
        let (mut assembly, mut slot) = match self.parts.take() {
            Some(parts) => (parts.assembly, parts.slot),
            None => (None, None),
        };
        if part.part == 0 && slot.is_none() {
            slot = self.state.writer.assembly_slot();
            if slot.is_none() {
                // The node holds as many as it allows: the client sends it
                // again after a backoff, as after any server-side fault.
                let results = WriteResults {
                    batch_id: part.batch_id.clone(),
                    lsn: None,
                    lsn_floor: None,
                    results: vec![TxResult::retry(
                        &part.transaction_id,
                        "the server is receiving as many large transactions as it allows; send it again later",
                    )],
                };
                self.state.metrics.record_results(&results);
                self.parts = Assembly::drop_rest(&part).map(|a| {
                    Box::new(Parts {
                        assembly: Some(a),
                        slot: None,
                    })
                });
                return self
                    .send(Frame::encode(
                        &ServerMessage::WriteResult(results),
                        Lsn::ZERO,
                    ))
                    .await;
            }
        }
        let answers = Assembly::receive(&mut assembly, part, bytes);
        if !assembly.as_ref().is_some_and(Assembly::is_collecting) {
            slot = None;
        }
        if assembly.is_some() {
            self.parts = Some(Box::new(Parts { assembly, slot }));
        }
        for answer in answers {
            match answer {
                PartAnswer::Complete(batch) => match batch.check() {
                    Ok(()) => self.write(batch).await?,
                    Err((code, message)) => {
                        self.refuse_batch(batch.batch_id, code, message).await?
                    }
                },
                PartAnswer::Refused {
                    batch_id,
                    code,
                    message,
                } => self.refuse_batch(batch_id, code, message).await?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_writes_keep_the_connection() {
        let refused = |text: &str| match parse(text.as_bytes()) {
            Incoming::Refused { code, .. } => code,
            Incoming::Write(_)
            | Incoming::WritePart(..)
            | Incoming::SnapshotDone(_)
            | Incoming::MigrationResult { .. }
            | Incoming::Ping => {
                panic!("accepted {text}")
            }
            Incoming::Fatal(r) => panic!("closed on {text}: {}", r.message),
        };
        assert_eq!(
            refused(r#"{"type":"write","batch_id":"b","transactions":"x"}"#),
            BatchRefusal::MalformedBatch
        );
        assert_eq!(
            refused(
                r#"{"type":"write","transactions":[{"id":"t","changes":[{"id":"c","table":"t","op":"explode"}]}]}"#
            ),
            BatchRefusal::MalformedBatch
        );
        let big = format!(
            r#"{{"type":"write","transactions":[],"pad":"{}"}}"#,
            "x".repeat(MAX_CLIENT_FRAME_BYTES)
        );
        assert_eq!(refused(&big), BatchRefusal::BatchTooLarge);
        assert_eq!(
            refused(r#"{"type":"write_part","transaction_id":"t","part":"one"}"#),
            BatchRefusal::MalformedBatch
        );
        assert!(matches!(
            parse(
                br#"{"type":"write_part","transaction_id":"t","part":0,"last":true,"changes":[]}"#
            ),
            Incoming::WritePart(_, 76)
        ));
        assert!(matches!(parse(b"{nope"), Incoming::Fatal(_)));
        assert!(matches!(
            parse(br#"{"type":"write","transactions":[]}"#),
            Incoming::Write(_)
        ));
    }
}
