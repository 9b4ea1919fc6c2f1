//! `pgrelay admin store info|reset STORE_ID`: the LiveStore store admin API
//! of a running server, over plain HTTP/1.1.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use secrecy::{ExposeSecret, SecretString};

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
    pub admin_token: SecretString,
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
    let server = if args.server.contains("://") {
        args.server.clone()
    } else {
        format!("http://{}", args.server)
    };
    let (status, body) = super::http(
        &server,
        Some(args.admin_token.expose_secret()),
        method,
        &path,
    )
    .await?;
    if !(200..300).contains(&status) {
        bail!("the server answered {status}: {}", body.trim());
    }
    let value: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("reading the answer {body:?}"))?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}
