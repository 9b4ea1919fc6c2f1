//! `pgrelay bench reader` (hidden): the clients of `bench latency|fanout
//! --light` or `--processes N`, run as separate processes. A light reader
//! opens `--connections` WebSockets to the server, parses every frame it
//! receives and records PostgreSQL commit → frame received per transaction,
//! but applies nothing; with `--full` the connections are real clients
//! instead (see `replicas`).
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
    /// Full clients (pgrelay-client, each with its own SQLite replica)
    /// that apply every transaction, instead of light readers.
    #[arg(long)]
    pub full: bool,
    /// With --full: the table the bench writes, whose replica rows are
    /// counted (each change is a new row).
    #[arg(long, default_value = "public.bench_events")]
    pub table: String,
    /// With --full: where to write commit → frame read samples (the
    /// `--samples` are commit → SQLite commit).
    #[arg(long)]
    pub received: Option<std::path::PathBuf>,
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
    if args.full {
        return super::replicas::run(args).await;
    }
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
    let (txs, changes) = ready_then_expectation().await?;
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
    write_samples(&args.samples, &samples)?;
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

/// Prints `ready` to the bench and reads its `expect TXS CHANGES` line.
pub(crate) async fn ready_then_expectation() -> anyhow::Result<(u64, u64)> {
    println!("ready");
    std::io::stdout().flush()?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let line = lines.next_line().await?.context("no `expect` line")?;
    let mut words = line.split_whitespace().skip(1).map(str::parse::<u64>);
    match (words.next(), words.next()) {
        (Some(Ok(t)), Some(Ok(c))) => Ok((t, c)),
        _ => anyhow::bail!("bad line {line:?}"),
    }
}

/// Latency samples in µs, u32 little-endian, as the bench reads them.
pub(crate) fn write_samples(path: &std::path::Path, samples: &[u32]) -> anyhow::Result<()> {
    let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn read_samples(path: &std::path::Path) -> anyhow::Result<Vec<u32>> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// One light client: handshake from the start of the (empty) change log,
/// then every frame parsed until the expected transactions are in.
async fn read(
    url: String,
    client_id: String,
    mut expect: watch::Receiver<Option<(u64, u64)>>,
    ready: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<Received> {
    let config = super::client_socket_config();
    let (mut socket, _) =
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true)
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

/// What the reader processes run.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind<'a> {
    /// WebSocket readers that apply nothing.
    Light,
    /// Real clients with SQLite replicas, the bench writing to `table`.
    Full { table: &'a str },
}

/// What the readers received, summed.
#[derive(Debug, Default)]
pub(crate) struct Totals {
    pub(crate) txs: u64,
    /// Changes received (light) or rows in the replicas (full).
    pub(crate) changes: u64,
    pub(crate) frames: u64,
    pub(crate) bytes: u64,
    /// Connections short of what was expected.
    pub(crate) short: u64,
    pub(crate) out_of_order: u64,
    /// Applied events the full clients' watchers missed (their latency
    /// samples are lost, not their rows: those are counted in the replicas).
    pub(crate) missed_events: u64,
    /// Commit → frame received (light) or → SQLite commit (full), per
    /// transaction per connection, µs, sorted.
    pub(crate) samples: Vec<u32>,
    /// Full clients only: commit → frame read, µs, sorted.
    pub(crate) received: Vec<u32>,
    /// CPU-seconds the reader processes used from `ready` to the end.
    pub(crate) cpu_seconds: f64,
}

impl Readers {
    /// Starts `processes` readers with `connections` clients in all (on
    /// the CPUs `cpus`, a `taskset -c` list, when given), and waits until
    /// every one is caught up.
    pub(crate) async fn start(
        addr: &str,
        connections: usize,
        processes: usize,
        kind: Kind<'_>,
        cpus: Option<&str>,
    ) -> anyhow::Result<Readers> {
        let exe = std::env::current_exe()?;
        let dir = tempfile::tempdir()?;
        let processes = processes.clamp(1, connections.max(1));
        let mut children = Vec::new();
        for p in 0..processes {
            let share = connections / processes + usize::from(p < connections % processes);
            let mut command = super::pinned(&exe, cpus);
            command
                .args(["bench", "reader", "--url", &format!("ws://{addr}/api/sync")])
                .args(["--connections", &share.to_string()])
                .arg("--samples")
                .arg(dir.path().join(format!("samples-{p}")));
            match kind {
                Kind::Light => command.args(["--prefix", &format!("light{p}")]),
                Kind::Full { table } => command
                    .args(["--full", "--table", table, "--prefix", &format!("full{p}")])
                    .arg("--received")
                    .arg(dir.path().join(format!("received-{p}"))),
            };
            let mut child = command
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
            totals.missed_events += n("missed_events");
            totals.cpu_seconds += v["cpu_seconds"].as_f64().unwrap_or(0.0);
            let dir = self.dir.path();
            totals
                .samples
                .extend(read_samples(&dir.join(format!("samples-{p}")))?);
            let received = dir.join(format!("received-{p}"));
            if received.exists() {
                totals.received.extend(read_samples(&received)?);
            }
            let _ = child.wait().await;
        }
        totals.samples.sort_unstable();
        totals.received.sort_unstable();
        Ok(totals)
    }
}
