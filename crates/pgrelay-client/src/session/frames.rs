//! The socket's settings and the server's frames decoded, transactions
//! by a fast path.

use pgrelay_protocol::{CloseCode, ErrorCode, ServerMessage, Transaction};
use tokio_tungstenite::tungstenite::Message;

use crate::ClientError;

/// tungstenite zero-fills its whole read buffer before every read (128 KiB
/// by default); a smaller one costs less per frame, and grows for big frames.
pub(super) fn socket_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
}

const READ_BUFFER_BYTES: usize = 16 * 1024;

/// How the server starts every transaction frame (the tag comes first).
const TX_PREFIX: &[u8] = br#"{"type":"tx","#;

pub(super) fn decode(message: Message) -> Result<Option<ServerMessage>, ClientError> {
    let bytes = match &message {
        Message::Text(text) => text.as_bytes(),
        Message::Binary(bytes) => bytes,
        Message::Close(frame) => {
            if let Some(f) = frame
                .as_ref()
                .filter(|f| u16::from(f.code) == CloseCode::TOKEN_EXPIRED.0)
            {
                // The close code alone says the token was refused, should
                // the `error` frame before it have been lost.
                return Err(ClientError::Refused {
                    code: ErrorCode::TokenExpired,
                    message: f.reason.to_string(),
                });
            }
            let reason = frame
                .as_ref()
                .map(|f| format!("{} {}", f.code, f.reason))
                .unwrap_or_default();
            return Err(ClientError::Protocol(format!(
                "the server closed the connection: {reason}"
            )));
        }
        _ => return Ok(None),
    };
    let decoded = if bytes.starts_with(TX_PREFIX) {
        // Nearly every frame is a transaction: decode it directly instead of
        // through the tagged enum, which buffers the whole frame first.
        serde_json::from_slice::<Transaction>(bytes).map(ServerMessage::Tx)
    } else {
        serde_json::from_slice(bytes)
    };
    decoded
        .map(Some)
        .map_err(|e| ClientError::Protocol(format!("bad message from the server: {e}")))
}

#[cfg(test)]
mod tests {
    use pgrelay_protocol::{Change, Lsn, Op, ServerMessage, Transaction};
    use tokio_tungstenite::tungstenite::Message;

    #[test]
    fn transaction_fast_path_decodes_like_the_enum() {
        let tx = Transaction {
            lsn: Lsn(42),
            xid: 9,
            commit_time_us: 1,
            origin: None,
            changes: vec![Change {
                table: "public.t".to_owned(),
                op: Op::Delete,
                new: None,
                old: Some([("id".to_owned(), Some("1".to_owned()))].into()),
            }],
        };
        let text = serde_json::to_string(&ServerMessage::Tx(tx.clone())).unwrap();
        assert!(text.as_bytes().starts_with(super::TX_PREFIX));
        let decoded = super::decode(Message::Text(text.into())).unwrap();
        assert_eq!(decoded, Some(ServerMessage::Tx(tx)));
        let caught_up = ServerMessage::CaughtUp {
            lsn: Lsn(42),
            wal_lsn: Some(Lsn(43)),
        };
        let other = serde_json::to_string(&caught_up).unwrap();
        assert_eq!(
            super::decode(Message::Text(other.into())).unwrap(),
            Some(caught_up)
        );
        // An older server's `caught_up` has no WAL position.
        assert_eq!(
            super::decode(Message::Text(r#"{"type":"caught_up","lsn":"0/2A"}"#.into())).unwrap(),
            Some(ServerMessage::CaughtUp {
                lsn: Lsn(42),
                wal_lsn: None
            })
        );
    }
}
