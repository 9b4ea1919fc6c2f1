//! The clients under test: `pgrelay chaos-client` child processes, each a
//! replica syncing through the nodes' proxies (every node's URL, its own
//! first) and writing notes through its outbox, so SIGKILL can land in
//! the middle of applying a transaction or of pushing a write.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use pgrelay_client::{ClientConfig, SyncClient};
use tokio::io::AsyncBufReadExt;

/// `pgrelay chaos-client` (hidden): what `pgrelay chaos` runs as each client.
#[derive(Args, Debug)]
pub struct ChaosClientArgs {
    /// The nodes' URLs, comma-separated.
    #[arg(long)]
    pub server: String,
    #[arg(long)]
    pub db: PathBuf,
    #[arg(long)]
    pub client_id: String,
    /// Pause between two writes.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    pub write_every: Duration,
    /// Writing stops once this file exists (syncing goes on).
    #[arg(long)]
    pub quiesce_file: PathBuf,
}

/// The client process: syncs, and writes note `<id>-<seq>` after note
/// `<id>-<seq - 1>`, printing `wrote <seq>` once each is in the outbox.
pub async fn run_client(args: ChaosClientArgs) -> anyhow::Result<()> {
    let mut config = ClientConfig::new(args.server.clone(), &args.db);
    config.client_id = Some(args.client_id.clone());
    config.backoff_base = Duration::from_millis(50);
    config.backoff_cap = Duration::from_millis(1000);
    config.outbox_poll = Duration::from_millis(500);
    config.idle_timeout = Duration::from_secs(20);
    config.ping_interval = Duration::from_secs(3);
    let client = Arc::new(SyncClient::open(config).await?);
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let runner = Arc::clone(&client);
    let running = tokio::spawn(async move { runner.run(stopped).await });
    // The notes table exists once the first snapshot is in.
    let mut seq = loop {
        if let Some(last) = last_seq(&args.db, &args.client_id) {
            break last;
        }
        anyhow::ensure!(!running.is_finished(), "the client stopped before syncing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    loop {
        if args.quiesce_file.exists() || running.is_finished() {
            break;
        }
        seq += 1;
        let sql = format!(
            "INSERT INTO chaos_notes (id, client, seq) VALUES ('{0}-{seq}', '{0}', {seq})",
            args.client_id
        );
        client.execute(sql).await?;
        println!("wrote {seq}");
        tokio::time::sleep(args.write_every).await;
    }
    running.await??;
    Ok(())
}

/// The newest note this client wrote, read from its replica (`None` until
/// the replica holds the notes table).
fn last_seq(db: &Path, client: &str) -> Option<i64> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.query_row(
        "SELECT coalesce(max(seq), 0) FROM chaos_notes WHERE client = ?1",
        [client],
        |r| r.get(0),
    )
    .ok()
}

/// The parent's handle on one client process.
pub(crate) struct Client {
    pub(crate) name: String,
    pub(crate) db: PathBuf,
    servers: String,
    quiesce: PathBuf,
    log: PathBuf,
    child: Option<tokio::process::Child>,
    /// The newest note the process said it wrote (across restarts).
    pub(crate) written: Arc<AtomicI64>,
}

impl Client {
    pub(crate) fn start(
        index: usize,
        servers: Vec<String>,
        run_dir: &Path,
    ) -> anyhow::Result<Client> {
        let mut order = servers;
        let turn = index % order.len().max(1);
        order.rotate_left(turn);
        let name = format!("c{}", index + 1);
        let mut client = Client {
            db: run_dir.join(format!("{name}.sqlite")),
            log: run_dir.join(format!("{name}.log")),
            quiesce: run_dir.join("quiesce"),
            servers: order.join(","),
            name,
            child: None,
            written: Arc::new(AtomicI64::new(0)),
        };
        client.restart()?;
        Ok(client)
    }

    /// SIGKILL, wherever the process is.
    pub(crate) async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    pub(crate) fn is_up(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the process (again) on the same replica.
    pub(crate) fn restart(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("finding the pgrelay binary")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut child = tokio::process::Command::new(exe)
            .args(["chaos-client", "--server", &self.servers])
            .args(["--client-id", &self.name])
            .arg("--db")
            .arg(&self.db)
            .arg("--quiesce-file")
            .arg(&self.quiesce)
            .env("PGRELAY_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting pgrelay chaos-client")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let written = Arc::clone(&self.written);
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(seq) = line.strip_prefix("wrote ").and_then(|s| s.parse().ok()) {
                    written.fetch_max(seq, Ordering::SeqCst);
                }
            }
        });
        self.child = Some(child);
        Ok(())
    }
}
