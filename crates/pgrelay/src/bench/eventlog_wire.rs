//! The bench's LiveStore clients on the wire: their socket, the push
//! frame the writer sends, and frames read back without parsing them.

use anyhow::Context;
use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub(super) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A LiveStore socket on `store`, over WebSocket.
pub(super) async fn open(url: &str, store: &str) -> anyhow::Result<Socket> {
    let (ws, _) = tokio_tungstenite::connect_async_with_config(
        format!("{url}?storeId={store}&transport=ws"),
        Some(super::client_socket_config()),
        false,
    )
    .await
    .context("connecting to the LiveStore endpoint")?;
    Ok(ws)
}

/// A 0.4 `SyncWsRpc.Push` of `batch` events after `head`.
pub(super) fn push_frame(
    store: &str,
    backend: &str,
    request: u64,
    head: usize,
    batch: usize,
) -> String {
    let mut events = String::with_capacity(batch * 160);
    for i in 0..batch {
        let seq = head + i + 1;
        if i > 0 {
            events.push(',');
        }
        events.push_str(&format!(
            r#"{{"name":"v1.TodoCreated","args":{{"id":"bench-{seq}","text":"todo number {seq}"}},"seqNum":{seq},"parentSeqNum":{},"clientId":"bench-writer","sessionId":"bench-session"}}"#,
            seq - 1
        ));
    }
    format!(
        r#"{{"_tag":"Request","id":"{request}","tag":"SyncWsRpc.Push","payload":{{"storeId":"{store}","batch":[{events}],"backendId":{{"_tag":"Some","value":"{backend}"}}}},"traceId":"t","spanId":"s","sampled":false,"headers":[]}}"#
    )
}

/// The next text frame, as received (not copied: the clients read ~1.7 MB
/// per push of 100 events to 100 clients, on the server's cores).
pub(super) async fn next_text(ws: &mut Socket) -> anyhow::Result<Utf8Bytes> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text),
            Some(Ok(Message::Close(_))) | None => anyhow::bail!("the server closed the socket"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// The first and last `seqNum` of a chunk, found without parsing the frame.
pub(super) fn seq_range(text: &str) -> Option<(i64, i64)> {
    const KEY: &str = "\"seqNum\":";
    let number = |at: usize| -> Option<i64> {
        let digits: String = text[at + KEY.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    Some((number(text.find(KEY)?)?, number(text.rfind(KEY)?)?))
}
