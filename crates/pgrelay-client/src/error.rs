//! Errors of the client library.

use pgrelay_protocol::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("replica: {0}")]
    Replica(String),
    #[error("the replica's thread has stopped")]
    ReplicaClosed,
    #[error("connecting to {url}: {message}")]
    Connect { url: String, message: String },
    /// `wss://` failed: the server's certificate is not trusted, or the
    /// CA file cannot be read.
    #[error("TLS to {url}: {message}")]
    Tls { url: String, message: String },
    #[error("WebSocket: {0}")]
    Socket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("server refused: {code:?}: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("no message from the server for {0:?}")]
    Silent(std::time::Duration),
    #[error("token: {0}")]
    Token(String),
    #[error("tables {0:?} need a snapshot; reconnecting for it")]
    Resync(Vec<String>),
    #[error("write {tx_id} rejected by the server: {reason}")]
    WriteRejected { tx_id: String, reason: String },
    #[error("write {tx_id}: {what} within {timeout:?}")]
    WriteTimeout {
        tx_id: String,
        what: &'static str,
        timeout: std::time::Duration,
    },
    /// A local transaction the protocol cannot carry; it was rolled back.
    #[error("transaction refused and rolled back: {0}")]
    TooLarge(#[from] pgrelay_protocol::TooLarge),
}

impl ClientError {
    /// The server refused the token (at the handshake or when it expired
    /// mid-session), or the token provider gave none.
    pub fn is_token_refusal(&self) -> bool {
        matches!(
            self,
            ClientError::Token(_)
                | ClientError::Refused {
                    code: ErrorCode::TokenExpired | ErrorCode::Unauthorized,
                    ..
                }
        )
    }

    /// Whether reconnecting can cure it. A replica error or a server that
    /// says our position is gone will not be cured by retrying.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::Socket(_)
            | ClientError::Silent(_)
            | ClientError::Protocol(_)
            | ClientError::Resync(_)
            // The provider may have a fresh token by the next attempt.
            | ClientError::Token(_) => true,
            // Gone: the client resets its position and hydrates again.
            ClientError::Refused { code, .. } => {
                matches!(
                    code,
                    ErrorCode::TooSlow
                        | ErrorCode::Internal
                        | ErrorCode::Gone
                        | ErrorCode::RateLimited
                        | ErrorCode::Disconnected
                        | ErrorCode::TokenExpired
                )
            }
            ClientError::Sqlite(_)
            | ClientError::Replica(_)
            | ClientError::ReplicaClosed
            | ClientError::Tls { .. }
            | ClientError::WriteRejected { .. }
            | ClientError::WriteTimeout { .. }
            | ClientError::TooLarge(_) => false,
        }
    }
}
