//! `pgrelay bench reader` (hidden): light clients for `bench latency
//! --light` and `bench fanout --light`, run as separate processes. Each
//! opens `--connections` WebSockets to the server, parses every frame it
//! receives and records PostgreSQL commit → frame received per transaction,
//! but applies nothing.
//!
//! Its protocol with the bench, one line each way: once every connection
//! is caught up it prints `ready`; the bench then writes `expect TXS
//! CHANGES` on its stdin, and the reader waits until every connection has
//! received that many transactions and changes (each transaction once, in
//! order), writes its latency samples (µs, u32 little-endian) to
//! `--samples`, prints one JSON line of counts and exits.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use pgrelay_protocol::{ClientMessage, Lsn, ServerMessage, PROTOCOL_VERSION};
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

#[derive(Args, Debug, Clone)]
pub struct ReaderArgs {
    /// The server's sync URL (`ws://host:port/api/sync`).
    #[arg(long)]
    pub url: String,
    /// WebSockets this process opens.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Client ids are `PREFIX-i`.
    #[arg(long, default_value = "light")]
    pub prefix: String,
    /// Where to write the latency samples.
    #[arg(long)]
    pub samples: std::path::PathBuf,
}

/// What one connection received.
#[derive(Default)]
struct Received {
    txs: u64,
    changes: u64,
    frames: u64,
    bytes: u64,
    /// A transaction at or below one already received.
    out_of_order: u64,
    samples: Vec<u32>,
}

pub(crate) async fn run(args: ReaderArgs) -> anyhow::Result<()> {
    let (expect_tx, expect) = watch::channel(None::<(u64, u64)>);
    let (ready_tx, mut ready) = tokio::sync::mpsc::channel::<()>(args.connections.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.connections {
        let url = args.url.clone();
        let id = format!("{}-{i}", args.prefix);
        let (expect, ready) = (expect.clone(), ready_tx.clone());
        tasks.spawn(async move { read(url, id, expect, ready).await });
        // Do not flood the listener's backlog.
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    drop(ready_tx);
    for _ in 0..args.connections {
        if ready.recv().await.is_none() {
            // A connection failed: its error is the answer.
            while let Some(joined) = tasks.join_next().await {
                joined??;
            }
            anyhow::bail!("a connection ended before catching up");
        }
    }
    let cpu_ready = super::capture::cpu_seconds("self").unwrap_or(0.0);
    println!("ready");
    std::io::stdout().flush()?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let line = lines.next_line().await?.context("no `expect` line")?;
    let mut words = line.split_whitespace().skip(1).map(str::parse::<u64>);
    let (txs, changes) = match (words.next(), words.next()) {
        (Some(Ok(t)), Some(Ok(c))) => (t, c),
        _ => anyhow::bail!("bad line {line:?}"),
    };
    let _ = expect_tx.send(Some((txs, changes)));
    let mut total = Received::default();
    let mut short = 0u64;
    let mut samples = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let got = joined??;
        if got.txs != txs || got.changes != changes {
            short += 1;
        }
        total.txs += got.txs;
        total.changes += got.changes;
        total.frames += got.frames;
        total.bytes += got.bytes;
        total.out_of_order += got.out_of_order;
        samples.extend(got.samples);
    }
    let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    std::fs::write(&args.samples, bytes)?;
    println!(
        "{}",
        serde_json::json!({
            "connections": args.connections, "txs": total.txs, "changes": total.changes,
            "frames": total.frames, "bytes": total.bytes, "short": short,
            "out_of_order": total.out_of_order,
            "cpu_seconds": super::capture::cpu_seconds("self").unwrap_or(0.0) - cpu_ready,
        })
    );
    Ok(())
}

/// One light client: handshake from the start of the (empty) change log,
/// then every frame parsed until the expected transactions are in.
async fn read(
    url: String,
    client_id: String,
    mut expect: watch::Receiver<Option<(u64, u64)>>,
    ready: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<Received> {
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let hello = ClientMessage::Hello {
        protocol_version: PROTOCOL_VERSION,
        client_id,
        token: None,
        // A position (the empty log's start): no snapshot.
        last_lsn: Some(Lsn::ZERO),
        log_id: None,
        resync: Vec::new(),
        tables: None,
        repair: false,
        schema_version: None,
    };
    socket
        .send(Message::Text(serde_json::to_string(&hello)?.into()))
        .await?;
    let mut got = Received::default();
    let mut last = Lsn::ZERO;
    let mut ready = Some(ready);
    let done = |got: &Received, expect: Option<(u64, u64)>| {
        expect.is_some_and(|(txs, changes)| got.txs >= txs && got.changes >= changes)
    };
    loop {
        let message = tokio::select! {
            biased;
            _ = expect.changed() => {
                if done(&got, *expect.borrow()) {
                    return Ok(got);
                }
                continue;
            }
            message = socket.next() => message,
        };
        let Some(message) = message else {
            anyhow::bail!("the server closed the connection");
        };
        let Message::Text(text) = message? else {
            continue;
        };
        let at = now_us();
        got.frames += 1;
        got.bytes += text.len() as u64;
        match serde_json::from_str::<ServerMessage>(&text)? {
            ServerMessage::Tx(tx) => {
                if tx.lsn <= last {
                    got.out_of_order += 1;
                }
                last = last.max(tx.lsn);
                got.txs += 1;
                got.changes += tx.changes.len() as u64;
                got.samples
                    .push(u32::try_from((at - tx.commit_time_us).max(0)).unwrap_or(u32::MAX));
                if done(&got, *expect.borrow()) {
                    return Ok(got);
                }
            }
            ServerMessage::CaughtUp { .. } => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(()).await;
                }
            }
            ServerMessage::Error { code, message, .. } => {
                anyhow::bail!("refused: {code:?} {message}")
            }
            _ => {}
        }
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The bench's side: reader processes, started and told what to expect.
pub(crate) struct Readers {
    children: Vec<(
        tokio::process::Child,
        tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    )>,
    dir: tempfile::TempDir,
}

/// What the readers received, summed.
#[derive(Debug, Default)]
pub(crate) struct Totals {
    pub(crate) txs: u64,
    pub(crate) changes: u64,
    pub(crate) frames: u64,
    pub(crate) bytes: u64,
    /// Connections short of what was expected.
    pub(crate) short: u64,
    pub(crate) out_of_order: u64,
    /// Commit → frame received per transaction per connection, µs, sorted.
    pub(crate) samples: Vec<u32>,
    /// CPU-seconds the reader processes used from `ready` to the end.
    pub(crate) cpu_seconds: f64,
}

impl Readers {
    /// Starts `processes` readers with `connections` WebSockets in all,
    /// and waits until every one is caught up.
    pub(crate) async fn start(
        addr: &str,
        connections: usize,
        processes: usize,
    ) -> anyhow::Result<Readers> {
        let exe = std::env::current_exe()?;
        let dir = tempfile::tempdir()?;
        let processes = processes.clamp(1, connections.max(1));
        let mut children = Vec::new();
        for p in 0..processes {
            let share = connections / processes + usize::from(p < connections % processes);
            let mut child = tokio::process::Command::new(&exe)
                .args(["bench", "reader", "--url", &format!("ws://{addr}/api/sync")])
                .args([
                    "--connections",
                    &share.to_string(),
                    "--prefix",
                    &format!("light{p}"),
                ])
                .arg("--samples")
                .arg(dir.path().join(format!("samples-{p}")))
                .env("PGRELAY_LOG", "warn")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("starting a reader process")?;
            let stdout = child.stdout.take().context("no stdout")?;
            children.push((child, tokio::io::BufReader::new(stdout).lines()));
        }
        for (_, lines) in &mut children {
            let line = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
                .await
                .context("waiting for a reader to be ready")??;
            anyhow::ensure!(
                line.as_deref() == Some("ready"),
                "a reader failed to connect"
            );
        }
        Ok(Readers { children, dir })
    }

    /// Tells every reader what to expect and collects what they received.
    pub(crate) async fn finish(
        mut self,
        txs: u64,
        changes: u64,
        timeout: Duration,
    ) -> anyhow::Result<Totals> {
        use tokio::io::AsyncWriteExt;
        let mut totals = Totals::default();
        for (child, _) in &mut self.children {
            let stdin = child.stdin.as_mut().context("no stdin")?;
            stdin
                .write_all(format!("expect {txs} {changes}\n").as_bytes())
                .await?;
            stdin.flush().await?;
        }
        for (p, (child, lines)) in self.children.iter_mut().enumerate() {
            let line = tokio::time::timeout(timeout, lines.next_line())
                .await
                .context("waiting for a reader's counts: a client is short")??
                .context("a reader exited without its counts")?;
            let v: serde_json::Value = serde_json::from_str(&line)?;
            let n = |k: &str| v[k].as_u64().unwrap_or(0);
            totals.txs += n("txs");
            totals.changes += n("changes");
            totals.frames += n("frames");
            totals.bytes += n("bytes");
            totals.short += n("short");
            totals.out_of_order += n("out_of_order");
            totals.cpu_seconds += v["cpu_seconds"].as_f64().unwrap_or(0.0);
            let raw = std::fs::read(self.dir.path().join(format!("samples-{p}")))?;
            totals.samples.extend(
                raw.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
            let _ = child.wait().await;
        }
        totals.samples.sort_unstable();
        Ok(totals)
    }
}
