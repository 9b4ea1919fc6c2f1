//! The first frame of a session: a `hello` with a protocol version this
//! server speaks, and the refusals for everything else a client can send.

use std::time::Duration;

use axum::extract::ws::Message;
use futures_util::StreamExt;
use pgrelay_protocol::{
    ClientMessage, ErrorCode, Lsn, UpgradeRequired, MAX_CLIENT_FRAME_BYTES, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};

use super::Refusal;
use crate::ServerConfig;

/// How long a client has to send its `hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Hello {
    pub(crate) client_id: String,
    pub(crate) last_lsn: Option<Lsn>,
    pub(crate) log_id: Option<String>,
    pub(crate) resync: Vec<String>,
    pub(crate) token: Option<String>,
    /// The tables the client syncs; `None` for all.
    pub(crate) tables: Option<Vec<String>>,
    /// The client repairs its replica where it would be told `gone`.
    pub(crate) repair: bool,
    /// The replica's client schema version, from clients that run client
    /// migrations.
    pub(crate) schema_version: Option<i64>,
}

pub(super) async fn receive(
    socket: &mut dyn super::Socket,
    _config: &ServerConfig,
) -> Result<Hello, Refusal> {
    // Absolute: pings and pongs before the hello do not extend it.
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    loop {
        let next = tokio::time::timeout_at(deadline, socket.next())
            .await
            .map_err(|_| {
                Refusal::new(ErrorCode::HandshakeRequired, "no hello within 10 seconds")
            })?;
        let bytes = match next {
            None | Some(Ok(Message::Close(_))) => {
                return Err(Refusal::new(
                    ErrorCode::HandshakeRequired,
                    "closed before hello",
                ))
            }
            Some(Err(e)) => return Err(read_error(e)),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Text(text))) => text.as_bytes().to_vec(),
            Some(Ok(Message::Binary(bytes))) => bytes.to_vec(),
        };
        return parse_hello(&bytes);
    }
}

fn parse_hello(bytes: &[u8]) -> Result<Hello, Refusal> {
    check_size(bytes)?;
    let message: ClientMessage = serde_json::from_slice(bytes).map_err(|e| classify(bytes, e))?;
    let ClientMessage::Hello {
        protocol_version,
        client_id,
        token,
        last_lsn,
        log_id,
        resync,
        tables,
        repair,
        schema_version,
    } = message
    else {
        return Err(Refusal::new(
            ErrorCode::HandshakeRequired,
            "the first frame must be hello",
        ));
    };
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&protocol_version) {
        return Err(Refusal::upgrade(UpgradeRequired {
            what: "protocol".to_owned(),
            client: i64::from(protocol_version),
            server_min: i64::from(MIN_PROTOCOL_VERSION),
            server_max: i64::from(PROTOCOL_VERSION),
        }));
    }
    let id_ok = !client_id.is_empty()
        && client_id.len() <= 128
        && client_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
    if !id_ok {
        return Err(Refusal::new(
            ErrorCode::MalformedFrame,
            "client_id must be 1-128 characters of letters, digits, '-', '_', '.', ':'",
        ));
    }
    if resync.len() > 1000 {
        return Err(Refusal::new(
            ErrorCode::MalformedFrame,
            "resync names more than 1000 tables",
        ));
    }
    Ok(Hello {
        client_id,
        last_lsn,
        log_id,
        resync,
        token,
        tables,
        repair,
        schema_version,
    })
}

fn check_size(bytes: &[u8]) -> Result<(), Refusal> {
    if bytes.len() > MAX_CLIENT_FRAME_BYTES {
        return Err(Refusal::new(
            ErrorCode::FrameTooLarge,
            format!(
                "frame of {} bytes is over the limit of {MAX_CLIENT_FRAME_BYTES}",
                bytes.len()
            ),
        ));
    }
    Ok(())
}

/// Tells a frame that is not a message at all from a message of a type
/// this server does not know.
pub(super) fn classify(bytes: &[u8], error: serde_json::Error) -> Refusal {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(serde_json::Value::Object(map)) => match map.get("type").and_then(|t| t.as_str()) {
            Some(kind)
                if !["hello", "write", "snapshot_done", "migration_result"].contains(&kind) =>
            {
                let kind: String = kind.chars().take(64).collect();
                Refusal::new(
                    ErrorCode::UnknownMessage,
                    format!("unknown message type {kind:?}"),
                )
            }
            _ => Refusal::new(
                ErrorCode::MalformedFrame,
                format!("invalid message: {error}"),
            ),
        },
        _ => Refusal::new(
            ErrorCode::MalformedFrame,
            format!("frame is not a JSON object: {error}"),
        ),
    }
}

/// A read error on the socket: an over-long frame is the client's fault
/// and gets a clear answer; anything else ends the session.
pub(super) fn read_error(error: axum::Error) -> Refusal {
    let text = error.to_string();
    if text.contains("too long") || text.contains("Space limit") || text.contains("size") {
        Refusal::new(
            ErrorCode::FrameTooLarge,
            format!("frame over the limit: {text}"),
        )
    } else {
        Refusal::new(
            ErrorCode::MalformedFrame,
            format!("bad WebSocket frame: {text}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(bytes: &[u8]) -> ErrorCode {
        match parse_hello(bytes) {
            Ok(_) => panic!("accepted {:?}", String::from_utf8_lossy(bytes)),
            Err(r) => r.code,
        }
    }

    #[test]
    fn refusals_are_classified() {
        assert_eq!(code(b"not json"), ErrorCode::MalformedFrame);
        assert_eq!(code(b"[1,2]"), ErrorCode::MalformedFrame);
        assert_eq!(code(br#"{"type":"subscribe"}"#), ErrorCode::UnknownMessage);
        assert_eq!(
            code(br#"{"type":"hello","protocol_version":99,"client_id":"a"}"#),
            ErrorCode::UpgradeRequired
        );
        assert_eq!(
            code(br#"{"type":"hello","protocol_version":1,"client_id":""}"#),
            ErrorCode::MalformedFrame
        );
        assert_eq!(
            code(br#"{"type":"hello","protocol_version":1,"client_id":"a","last_lsn":"zz"}"#),
            ErrorCode::MalformedFrame
        );
        let big = vec![b' '; MAX_CLIENT_FRAME_BYTES + 1];
        assert_eq!(code(&big), ErrorCode::FrameTooLarge);
    }

    #[test]
    fn accepts_a_good_hello() {
        let hello = parse_hello(
            br#"{"type":"hello","protocol_version":1,"client_id":"c-1","last_lsn":"0/10"}"#,
        )
        .unwrap();
        assert_eq!(hello.client_id, "c-1");
        assert_eq!(hello.last_lsn, Some(Lsn(16)));
    }

    /// The decoders a client reaches before and after login, over random
    /// bytes and over valid messages with bytes flipped: no panic, and a
    /// refusal for anything that is not a message. A fixed case budget
    /// keeps it in every test run.
    mod fuzz {
        use proptest::prelude::*;

        const SEEDS: [&str; 4] = [
            r#"{"type":"hello","protocol_version":1,"client_id":"c-1","last_lsn":"0/10","resync":["public.t"],"tables":["t"]}"#,
            r#"{"type":"write","batch_id":"b","transactions":[{"id":"t1","changes":[{"id":"c1","table":"public.t","op":"update","old":{"id":"1"},"new":{"v":"x"}}]}]}"#,
            r#"{"type":"write_part","tx_id":"t","part":0,"parts":2,"batch_id":"b","changes":[]}"#,
            r#"{"type":"snapshot_done","refetch":["public.t"]}"#,
        ];

        fn decode_all(bytes: &[u8]) {
            let _ = super::parse_hello(bytes);
            let _ = super::super::super::write::parse(bytes);
            let _ = serde_json::from_slice::<pgrelay_protocol::ClientMessage>(bytes);
            let _ = pgrelay_protocol::parse_chunk(bytes);
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                decode_all(&bytes);
            }

            #[test]
            fn mutated_messages_never_panic(
                seed in 0..SEEDS.len(),
                flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
                cut in any::<prop::sample::Index>(),
            ) {
                let mut bytes = SEEDS[seed].as_bytes().to_vec();
                for (at, byte) in flips {
                    let i = at.index(bytes.len());
                    bytes[i] = byte;
                }
                let keep = cut.index(bytes.len() + 1);
                decode_all(&bytes[..keep]);
                decode_all(&bytes);
            }
        }
    }
}
