//! The nodes under test: `pgrelay serve` child processes on one slot, each
//! reaching PostgreSQL through a proxy of its own and reached by clients
//! through another, so links can be cut without touching the process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::AsyncBufReadExt;

use super::proxy::Proxy;
use super::TABLES;

pub(crate) struct Node {
    pub(crate) name: String,
    /// The node's own address (for `/ready`), which changes on restart.
    pub(crate) addr: SocketAddr,
    child: Option<tokio::process::Child>,
    /// Clients connect here.
    pub(crate) clients: Proxy,
    /// The node's connections to PostgreSQL go through here.
    pub(crate) database: Proxy,
    pub(crate) stopped: bool,
    dir: PathBuf,
    url: String,
}

impl Node {
    /// Starts node `index` serving the database at `url`, which listens
    /// at `pg`.
    pub(crate) async fn start(
        index: usize,
        url: &str,
        pg: SocketAddr,
        run_dir: &Path,
    ) -> anyhow::Result<Node> {
        let database = Proxy::start(pg).await?;
        let url = via(url, database.addr)?;
        let dir = run_dir.join(format!("node-{}", index + 1));
        std::fs::create_dir_all(&dir)?;
        let name = format!("n{}", index + 1);
        let (child, addr) = spawn(&name, &url, &dir).await?;
        let clients = Proxy::start(addr).await?;
        Ok(Node {
            name,
            addr,
            child: Some(child),
            clients,
            database,
            stopped: false,
            dir,
            url,
        })
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(tokio::process::Child::id)
    }

    /// SIGKILL; the node stays down until [`Node::restart`].
    pub(crate) async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        self.stopped = false;
    }

    /// Starts the node again (retrying while PostgreSQL is unreachable) and
    /// points its clients' proxy at it.
    pub(crate) async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        let (child, addr) = spawn(&self.name, &self.url, &self.dir).await?;
        self.child = Some(child);
        self.addr = addr;
        self.clients.point_at(addr);
        Ok(())
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`).
    pub(crate) fn pause(&mut self, stop: bool) -> anyhow::Result<()> {
        if let Some(pid) = self.pid() {
            signal(pid, if stop { "STOP" } else { "CONT" })?;
            self.stopped = stop;
        }
        Ok(())
    }

    /// The node's role from `/ready` (`None` when down, stopped or silent).
    pub(crate) async fn role(&self) -> Option<String> {
        if self.child.is_none() || self.stopped {
            return None;
        }
        let base = format!("http://{}", self.addr);
        let ask = crate::cmd::admin::http(&base, None, "GET", "/ready");
        let (_, body) = tokio::time::timeout(Duration::from_millis(1500), ask)
            .await
            .ok()?
            .ok()?;
        let ready: serde_json::Value = serde_json::from_str(&body).ok()?;
        ready["replication"]["role"].as_str().map(str::to_owned)
    }
}

/// `url` (`postgres://[user[:password]@]host:port/db[?...]`) with its
/// host and port replaced by `addr`.
pub(crate) fn via(url: &str, addr: SocketAddr) -> anyhow::Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .context("--database-url: give a postgres://user@host:port/db URL")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let user = authority
        .rsplit_once('@')
        .map(|(user, _)| format!("{user}@"));
    Ok(format!(
        "{scheme}://{}{addr}{path}",
        user.unwrap_or_default()
    ))
}

/// Where `url`'s PostgreSQL listens.
pub(crate) async fn address(url: &str) -> anyhow::Result<SocketAddr> {
    let config: tokio_postgres::Config = url.parse().context("parsing --database-url")?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => anyhow::bail!("--database-url: chaos needs a TCP host (it proxies the connections)"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let found = tokio::net::lookup_host((host.as_str(), port)).await?.next();
    found.with_context(|| format!("resolving {host}"))
}

/// Sends a signal with kill(1) (the crate forbids `unsafe`, so no libc).
pub(crate) fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    anyhow::ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
}

/// `pgrelay serve` in `dir` (its own event-log file, its log in
/// `dir/serve.log`); retried for up to a minute, since a node cannot start
/// while PostgreSQL is restarting or its link is cut.
async fn spawn(
    name: &str,
    url: &str,
    dir: &Path,
) -> anyhow::Result<(tokio::process::Child, SocketAddr)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match spawn_once(name, url, dir).await {
            Ok(started) => return Ok(started),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(node = name, error = %e, "node did not start; retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => return Err(e.context(format!("starting node {name}"))),
        }
    }
}

async fn spawn_once(
    name: &str,
    url: &str,
    dir: &Path,
) -> anyhow::Result<(tokio::process::Child, SocketAddr)> {
    let exe = std::env::current_exe().context("finding the pgrelay binary")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("serve.log"))?;
    let mut child = tokio::process::Command::new(exe)
        .args(["serve", "--database-url", url, "--listen", "127.0.0.1:0"])
        .args(["--slot", "chaos", "--tables", &TABLES.join(",")])
        .args([
            "--node",
            name,
            "--connect-rate",
            "0",
            "--status-interval",
            "200ms",
        ])
        .current_dir(dir)
        .env("PGRELAY_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting pgrelay serve")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let listening = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest.trim().trim_start_matches("ws://").parse()?;
                return Ok::<SocketAddr, anyhow::Error>(addr);
            }
        }
        anyhow::bail!("pgrelay serve exited before listening")
    })
    .await;
    match listening {
        Ok(Ok(addr)) => {
            // Keep reading, so the node never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            Ok((child, addr))
        }
        Ok(Err(e)) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            Err(e)
        }
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            anyhow::bail!("pgrelay serve did not listen within 30 s")
        }
    }
}
