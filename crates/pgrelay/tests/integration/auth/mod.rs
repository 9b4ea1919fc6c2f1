//! Promise 6 (isolation) and the token checks: helpers shared by the auth
//! tests — signing tokens, servers with rules, clients with a token
//! provider, raw sockets that record everything the server sends.

mod expiry;
mod isolation;
mod token_files;
mod tokens;
mod writes;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use pgrelay_client::{ClientConfig, SyncClient, TokenProvider};
use pgrelay_protocol::ServerMessage;
use pgrelay_server::{AuthConfig, JwtKey, Server};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{RunningClient, World};

pub(crate) const WAIT: Duration = Duration::from_secs(60);
pub(crate) const SECRET: &[u8] = b"pgrelay integration test secret, 41 bytes";

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token with `claims` and an `exp` an hour away unless given.
pub(crate) fn token(mut claims: serde_json::Value) -> String {
    if claims.get("exp").is_none() {
        claims["exp"] = (now() + 3600).into();
    }
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

pub(crate) async fn start_server(world: &World, rules: &str) -> Server {
    let mut config = world.server_config();
    let mut auth = AuthConfig::new(JwtKey::Secret(SECRET.to_vec()));
    auth.rules = Some(rules.to_owned());
    config.auth = Some(auth);
    Server::start(config).await.expect("starting the server")
}

pub(crate) async fn start_client(
    server: SocketAddr,
    db: &Path,
    id: &str,
    provider: TokenProvider,
) -> RunningClient {
    let mut config = ClientConfig::new(format!("ws://{server}"), db);
    config.client_id = Some(id.to_owned());
    config.backoff_base = Duration::from_millis(50);
    config.backoff_cap = Duration::from_millis(500);
    config.token_provider = Some(provider);
    let client = Arc::new(SyncClient::open(config).await.expect("opening the client"));
    let replica = client.replica().clone();
    let (stop, stopped) = watch::channel(false);
    let runner = Arc::clone(&client);
    let task = tokio::spawn(async move { runner.run(stopped).await });
    RunningClient {
        replica,
        stop,
        task,
        client,
    }
}

pub(crate) fn fixed(token: String) -> TokenProvider {
    TokenProvider::new(move || {
        let token = token.clone();
        async move { Ok(token) }
    })
}

/// A raw session that records every message the server sends it, and
/// every snapshot row (COPY text lines, by table), answering the snapshot.
pub(crate) struct Spy {
    pub(crate) seen: Arc<Mutex<Vec<ServerMessage>>>,
    pub(crate) snapshot_rows: Arc<Mutex<Vec<(String, String)>>>,
    task: JoinHandle<()>,
}

impl Spy {
    /// Without `last_lsn` the server hydrates the spy from a snapshot; with
    /// one it catches up from the change log.
    pub(crate) async fn connect(
        addr: SocketAddr,
        id: &str,
        token: &str,
        last_lsn: Option<&str>,
    ) -> Spy {
        let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/api/sync"))
            .await
            .unwrap();
        let mut hello = serde_json::json!({
            "type": "hello", "protocol_version": 1, "client_id": id, "token": token,
        });
        if let Some(lsn) = last_lsn {
            hello["last_lsn"] = lsn.into();
        }
        socket
            .send(Message::Text(hello.to_string().into()))
            .await
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let snapshot_rows = Arc::new(Mutex::new(Vec::new()));
        let (record, rows) = (Arc::clone(&seen), Arc::clone(&snapshot_rows));
        let task = tokio::spawn(async move {
            let mut tables: Vec<String> = Vec::new();
            while let Some(Ok(message)) = socket.next().await {
                match message {
                    Message::Text(text) => {
                        let parsed: ServerMessage = serde_json::from_str(&text).unwrap();
                        match &parsed {
                            ServerMessage::SnapshotBegin { tables: listed, .. } => {
                                tables = listed.iter().map(|t| t.table.clone()).collect();
                            }
                            ServerMessage::SnapshotEnd {} => {
                                let done = r#"{"type":"snapshot_done","refetch":[]}"#;
                                let _ = socket.send(Message::Text(done.into())).await;
                            }
                            _ => {}
                        }
                        record.lock().unwrap().push(parsed);
                    }
                    Message::Binary(frame) => {
                        let (index, _, compressed) =
                            pgrelay_protocol::parse_chunk(&frame).expect("a chunk frame");
                        let text = zstd::stream::decode_all(compressed).unwrap();
                        let table = tables[usize::from(index)].clone();
                        let mut rows = rows.lock().unwrap();
                        for line in String::from_utf8(text).unwrap().lines() {
                            rows.push((table.clone(), line.to_owned()));
                        }
                    }
                    _ => {}
                }
            }
        });
        Spy {
            seen,
            snapshot_rows,
            task,
        }
    }

    pub(crate) fn messages(&self) -> Vec<ServerMessage> {
        self.seen.lock().unwrap().clone()
    }

    pub(crate) fn snapshot(&self) -> Vec<(String, String)> {
        self.snapshot_rows.lock().unwrap().clone()
    }

    /// Waits for `caught_up`.
    pub(crate) async fn wait_caught_up(&self) {
        crate::support::wait_for("the spy to catch up", WAIT, || async {
            self.messages()
                .iter()
                .any(|m| matches!(m, ServerMessage::CaughtUp { .. }))
                .then_some(())
        })
        .await;
    }
}

impl Drop for Spy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether the replica has `table` (the welcome created it).
pub(crate) fn has_table(path: &Path, table: &str) -> bool {
    rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| {
            c.query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get::<_, i64>(0),
            )
        })
        .is_ok_and(|n| n == 1)
}

/// The rows of `table` in a replica, by id: `(column → value)`; empty when
/// the table does not exist there.
pub(crate) fn replica_rows(path: &Path, table: &str) -> BTreeMap<i64, BTreeMap<String, String>> {
    let Ok(conn) =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return BTreeMap::new();
    };
    let Ok(mut statement) = conn.prepare(&format!("SELECT * FROM \"{table}\"")) else {
        return BTreeMap::new();
    };
    let names: Vec<String> = statement.column_names().map(|s| s.to_string()).collect();
    let rows = statement
        .query_map([], |r| {
            let mut row = BTreeMap::new();
            for (i, name) in names.iter().enumerate() {
                let value = match r.get::<_, rusqlite::types::Value>(i)? {
                    rusqlite::types::Value::Integer(n) => n.to_string(),
                    rusqlite::types::Value::Text(t) => t,
                    rusqlite::types::Value::Null => "NULL".to_owned(),
                    other => format!("{other:?}"),
                };
                row.insert(name.clone(), value);
            }
            Ok(row)
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>());
    rows.unwrap_or_default()
        .into_iter()
        .filter_map(|row| Some((row.get("id")?.parse().ok()?, row)))
        .collect()
}
