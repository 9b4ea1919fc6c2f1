//! `pgrelay admin store info|reset STORE_ID`: the LiveStore store admin API
//! of a running server, over plain HTTP/1.1.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// A LiveStore store's backend id, head, event count and connected sockets.
    Info(StoreArgs),
    /// Delete a store's events and give it a new backend id (clients resync).
    Reset(StoreArgs),
}

#[derive(Args, Debug)]
pub struct StoreArgs {
    pub store_id: String,
    /// The server (`http://HOST:PORT`, `ws://HOST:PORT` or `HOST:PORT`).
    #[arg(
        long,
        env = "PGRELAY_ADMIN_SERVER",
        default_value = "http://127.0.0.1:7171"
    )]
    pub server: String,
    /// The server's `--admin-token`.
    #[arg(long, env = "PGRELAY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,
}

pub async fn store(command: StoreCommand) -> anyhow::Result<()> {
    let (method, args, suffix) = match &command {
        StoreCommand::Info(args) => ("GET", args, ""),
        StoreCommand::Reset(args) => ("POST", args, "/reset"),
    };
    let path = format!(
        "/admin/stores/{}{suffix}",
        percent_encoding::utf8_percent_encode(&args.store_id, percent_encoding::NON_ALPHANUMERIC)
    );
    let (status, body) = request(&args.server, method, &path, &args.admin_token).await?;
    if !(200..300).contains(&status) {
        bail!("the server answered {status}: {}", body.trim());
    }
    let value: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("reading the answer {body:?}"))?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

/// One request on a fresh connection; returns the status and the body.
pub async fn request(
    server: &str,
    method: &str,
    path: &str,
    token: &str,
) -> anyhow::Result<(u16, String)> {
    let authority = server
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(server)
        .split('/')
        .next()
        .unwrap_or_default();
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the server's answer has no header end")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("the server's answer has no status")?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"));
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
