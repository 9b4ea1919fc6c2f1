//! Client writes (promises 4 and 5): local SQL writes reach PostgreSQL
//! exactly once, come back as the server's version of the row, survive a
//! server outage and a client crash, conflicts are resolved (last write
//! wins, or a version check that rolls the stale writer back), and a bad
//! batch is refused whole while the connection stays open.

mod conflicts;
mod exactly_once;
mod rebase;
mod refusals;
mod round_trip;

use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pgrelay_client::Replica;
use pgrelay_protocol::ServerMessage;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{wait_for, World};

pub(super) const WAIT: Duration = Duration::from_secs(60);

/// One value from the replica's SQLite file.
pub(super) fn local(path: &Path, sql: &str) -> Option<String> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.query_row(sql, [], |r| r.get::<_, Option<rusqlite::types::Value>>(0))
        .ok()
        .flatten()
        .map(|v| match v {
            rusqlite::types::Value::Integer(i) => i.to_string(),
            rusqlite::types::Value::Real(f) => f.to_string(),
            rusqlite::types::Value::Text(t) => t,
            other => format!("{other:?}"),
        })
}

pub(super) async fn wait_outbox_drained(replica: &Replica) {
    wait_for("the outbox to drain", WAIT, || async {
        let report = replica.outbox(None, 0).await.ok()?;
        (report.unsent() == 0).then_some(())
    })
    .await;
}

pub(super) async fn wait_count(world: &World, sql: &str, want: i64) {
    wait_for(&format!("{sql} = {want}"), WAIT, || async {
        (world.count(sql).await == want).then_some(())
    })
    .await;
}

/// Sends `frame` and returns the server's answer to it, skipping the stream.
pub(super) async fn answer<S>(socket: &mut S, frame: String) -> ServerMessage
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures_util::Sink<Message>
        + Unpin,
    <S as futures_util::Sink<Message>>::Error: std::fmt::Debug,
{
    socket.send(Message::Text(frame.into())).await.unwrap();
    next_answer(socket, WAIT).await
}

/// The server's next answer to a write (a result, a refusal or an error),
/// skipping the stream, within `wait`.
pub(crate) async fn next_answer<S>(socket: &mut S, wait: Duration) -> ServerMessage
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    tokio::time::timeout(wait, async {
        loop {
            let message = socket.next().await.expect("connection open").unwrap();
            if let Message::Text(text) = message {
                let m = serde_json::from_str::<ServerMessage>(&text).unwrap();
                if matches!(
                    m,
                    ServerMessage::WriteResult(_)
                        | ServerMessage::WriteRefused { .. }
                        | ServerMessage::Error { .. }
                ) {
                    return m;
                }
            }
        }
    })
    .await
    .expect("an answer")
}
