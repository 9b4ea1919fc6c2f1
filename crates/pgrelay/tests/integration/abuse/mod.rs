//! Issue 21: what an attacker with a socket, or with a valid token of
//! another tenant, could do before; each test fails without its fix.

mod exposure;
mod http_heads;
mod hydration_slots;
mod identity;
mod prelogin;
mod snapshot_bomb;
mod writes;

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `POST /api/changes` with `body` (and a bearer token); status and body.
pub(crate) async fn post_changes(
    addr: SocketAddr,
    bearer: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "POST /api/changes HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A write batch of one transaction with one change.
pub(crate) fn one_change(client_id: &str, id: &str, change: serde_json::Value) -> String {
    let mut change = change;
    change["id"] = format!("{id}-c1").into();
    serde_json::json!({
        "client_id": client_id,
        "transactions": [{"id": id, "changes": [change]}],
    })
    .to_string()
}
