//! Frames a client sends after its `hello`: `write` batches and the
//! `write_part` frames of a transaction too large for one. A bad batch is
//! refused whole with a `write_refused` and the connection stays open; a
//! frame that is not a message at all still ends the session.

use pgrelay_protocol::{
    BatchRefusal, ClientMessage, ErrorCode, WriteBatch, WritePart, MAX_CLIENT_FRAME_BYTES,
};

use super::{handshake, Refusal};

pub(super) enum Incoming {
    Write(WriteBatch),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_writes_keep_the_connection() {
        let refused = |text: &str| match parse(text.as_bytes()) {
            Incoming::Refused { code, .. } => code,
            Incoming::Write(_) | Incoming::WritePart(..) | Incoming::SnapshotDone(_) => {
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
