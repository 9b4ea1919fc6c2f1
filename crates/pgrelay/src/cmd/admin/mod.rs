//! `pgrelay admin clients|disconnect|forget|notify|store`: the server's admin API
//! from the command line. One HTTP/1.1 request per command, over plain TCP
//! (the admin API is meant for a private network or a local TLS proxy).

pub mod store;

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// List registered clients: id, connected, node, LSN, lag, last seen.
    Clients {
        #[command(flatten)]
        server: AdminServer,
        /// Print the JSON the server answered instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Close a client's session (it may reconnect).
    Disconnect {
        #[command(flatten)]
        server: AdminServer,
        client_id: String,
    },
    /// Remove a client's registration and close its session.
    Forget {
        #[command(flatten)]
        server: AdminServer,
        client_id: String,
    },
    /// Tell a client's session to read the change log; "gone" (and removed
    /// from the registry) when it has no live session.
    Notify {
        #[command(flatten)]
        server: AdminServer,
        client_id: String,
    },
    /// LiveStore stores: info, reset.
    #[command(subcommand)]
    Store(store::StoreCommand),
}

#[derive(Args, Debug)]
pub struct AdminServer {
    /// The server's HTTP address, e.g. http://127.0.0.1:7171
    #[arg(long, env = "PGRELAY_SERVER", default_value = "http://127.0.0.1:7171")]
    pub server: String,
    #[arg(long, env = "PGRELAY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,
}

#[derive(Deserialize)]
struct ClientRow {
    client_id: String,
    connected: bool,
    node: String,
    lsn: String,
    lag_bytes: u64,
    last_seen_seconds_ago: f64,
}

pub async fn run(command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::Clients { server, json } => {
            let (status, body) = request(&server, "GET", "/api/admin/clients").await?;
            if status != 200 {
                bail!("the server answered {status}: {body}");
            }
            if json {
                println!("{body}");
                return Ok(());
            }
            let rows: Vec<ClientRow> =
                serde_json::from_str(&body).context("reading the client list")?;
            print!("{}", render_table(&rows));
            Ok(())
        }
        AdminCommand::Disconnect { server, client_id } => {
            let path = format!(
                "/api/admin/clients/{}/disconnect",
                path_segment(&client_id)?
            );
            answer(request(&server, "POST", &path).await?)
        }
        AdminCommand::Forget { server, client_id } => {
            let path = format!("/api/admin/clients/{}", path_segment(&client_id)?);
            answer(request(&server, "DELETE", &path).await?)
        }
        AdminCommand::Store(command) => store::store(command).await,
        AdminCommand::Notify { server, client_id } => {
            let path = format!("/api/admin/clients/{}/notify", path_segment(&client_id)?);
            answer(request(&server, "POST", &path).await?)
        }
    }
}

fn answer((status, body): (u16, String)) -> anyhow::Result<()> {
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or(body);
    if (200..300).contains(&status) {
        println!("{message}");
        Ok(())
    } else {
        bail!("{status}: {message}")
    }
}

/// Client ids are letters, digits and `-_.:`, all safe in a URL path.
fn path_segment(id: &str) -> anyhow::Result<&str> {
    if pgrelay_protocol::valid_id(id) {
        Ok(id)
    } else {
        bail!("{id:?} is not a client id (1-128 letters, digits, '-', '_', '.', ':')")
    }
}

fn render_table(rows: &[ClientRow]) -> String {
    let mut out = format!(
        "{:<32}  {:<9}  {:<24}  {:<14}  {:>12}  {:>10}\n",
        "client", "connected", "node", "lsn", "lag bytes", "last seen"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<32}  {:<9}  {:<24}  {:<14}  {:>12}  {:>10}\n",
            r.client_id,
            if r.connected { "yes" } else { "no" },
            r.node,
            r.lsn,
            r.lag_bytes,
            format!("{:.0}s ago", r.last_seen_seconds_ago)
        ));
    }
    out.push_str(&format!("{} clients\n", rows.len()));
    out
}

async fn request(server: &AdminServer, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    http(&server.server, Some(&server.admin_token), method, path).await
}

/// One HTTP/1.1 request to `base` (`http://host:port`); returns the status
/// code and the body.
pub async fn http(
    base: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let base = base.trim_end_matches('/');
    let authority = base
        .strip_prefix("http://")
        .or_else(|| base.strip_prefix("ws://"))
        .with_context(|| format!("--server {base:?}: give http://host:port (https is not supported; use a local proxy)"))?;
    let authority = authority.split('/').next().unwrap_or(authority);
    let exchange = async {
        let mut stream = TcpStream::connect(authority)
            .await
            .with_context(|| format!("connecting to {authority}"))?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {authority}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        parse_response(&response)
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .context("the server did not answer within 30 s")?
}

fn parse_response(response: &[u8]) -> anyhow::Result<(u16, String)> {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the server's answer is not HTTP")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("the server's answer has no status")?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_plain_and_chunked() {
        let plain = b"HTTP/1.1 410 Gone\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), (410, "{}".to_owned()));
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (200, "[1,2]".to_owned()));
    }
}
