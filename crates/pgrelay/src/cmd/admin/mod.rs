//! `pgrelay admin clients|node|disconnect|forget|notify|store`: the server's admin API
//! from the command line, one HTTP request per command (`reqwest`, with
//! rustls for an `https://` proxy in front of the server).

pub mod store;

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// List registered clients: id, connected, node, LSN, lag, last seen,
    /// client schema version and failed client migrations.
    Clients {
        #[command(flatten)]
        server: AdminServer,
        /// Print the JSON the server answered instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// This node's role (capturing or following), who holds the slot, the
    /// capture term and its lag behind the change log (JSON).
    Node {
        #[command(flatten)]
        server: AdminServer,
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
    /// Client migrations: the versions handed out and each client's report (JSON).
    Migrations {
        #[command(flatten)]
        server: AdminServer,
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
    pub admin_token: SecretString,
}

#[derive(Deserialize)]
struct ClientRow {
    client_id: String,
    connected: bool,
    node: String,
    lsn: String,
    lag_bytes: u64,
    last_seen_seconds_ago: f64,
    /// Its client migrations (older servers send none).
    #[serde(default)]
    schema_version: i64,
    #[serde(default)]
    failed_migrations: Vec<FailedMigration>,
}

#[derive(Deserialize)]
struct FailedMigration {
    version: i64,
    attempts: i64,
    error: String,
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
        AdminCommand::Node { server } => answer(request(&server, "GET", "/api/admin/node").await?),
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
        AdminCommand::Migrations { server } => {
            let (status, body) = request(&server, "GET", "/api/admin/migrations").await?;
            if status != 200 {
                bail!("the server answered {status}: {body}");
            }
            println!("{body}");
            Ok(())
        }
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
        "{:<32}  {:<9}  {:<24}  {:<14}  {:>12}  {:>10}  {:>14}  {}\n",
        "client",
        "connected",
        "node",
        "lsn",
        "lag bytes",
        "last seen",
        "schema",
        "failed migrations"
    );
    for r in rows {
        let failed: Vec<String> = r
            .failed_migrations
            .iter()
            .map(|f| format!("{} ({} attempts: {})", f.version, f.attempts, f.error))
            .collect();
        out.push_str(&format!(
            "{:<32}  {:<9}  {:<24}  {:<14}  {:>12}  {:>10}  {:>14}  {}\n",
            r.client_id,
            if r.connected { "yes" } else { "no" },
            r.node,
            r.lsn,
            r.lag_bytes,
            format!("{:.0}s ago", r.last_seen_seconds_ago),
            r.schema_version,
            failed.join("; ")
        ));
    }
    out.push_str(&format!("{} clients\n", rows.len()));
    out
}

async fn request(server: &AdminServer, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    http(
        &server.server,
        Some(server.admin_token.expose_secret()),
        method,
        path,
    )
    .await
}

/// One request to `base` (`http://host:port` or `https://host:port`;
/// `ws://` and `wss://` are taken for their HTTP twins, and a path in
/// `base` is ignored); returns the status code and the body.
pub async fn http(
    base: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let base = base.trim_end_matches('/');
    let http_base = match base.split_once("://") {
        Some(("ws", rest)) => format!("http://{rest}"),
        Some(("wss", rest)) => format!("https://{rest}"),
        _ => base.to_owned(),
    };
    let origin = reqwest::Url::parse(&http_base)
        .ok()
        .filter(|url| matches!(url.scheme(), "http" | "https") && url.has_host())
        .with_context(|| {
            format!("--server {base:?}: give http://host:port or https://host:port")
        })?;
    let url = origin
        .join(path)
        .with_context(|| format!("the path {path:?}"))?;
    let method = reqwest::Method::from_bytes(method.as_bytes())
        .with_context(|| format!("the method {method:?}"))?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("setting up the HTTP client")?;
    let mut request = client.request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|e| {
        if e.is_timeout() {
            anyhow::anyhow!("the server did not answer within 30 s")
        } else {
            anyhow::Error::new(e).context(format!("connecting to {origin}"))
        }
    })?;
    let status = response.status().as_u16();
    let body = response
        .text()
        .await
        .context("reading the server's answer")?;
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        admin: AdminCommand,
    }

    #[test]
    fn the_admin_token_is_not_printed() {
        for args in [
            &["admin", "clients", "--admin-token", "admin-token-secret-6"][..],
            &[
                "admin",
                "store",
                "info",
                "s1",
                "--admin-token",
                "admin-token-secret-6",
            ][..],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            let printed = format!("{:?}", cli.admin);
            assert!(!printed.contains("admin-token-secret-6"), "{printed}");
        }
    }

    #[tokio::test]
    async fn servers_that_are_not_http_are_refused_before_connecting() {
        for base in ["redis://127.0.0.1:6379", "127.0.0.1:7171", "http://"] {
            let err = http(base, None, "GET", "/health").await.unwrap_err();
            assert!(err.to_string().contains("--server"), "{base}: {err}");
        }
    }
}
