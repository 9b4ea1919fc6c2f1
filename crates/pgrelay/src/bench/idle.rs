//! `bench idle`: the resident memory a `pgrelay serve` process spends per
//! idle, handshaken WebSocket connection. The server runs as its own
//! process so the clients' memory is not counted.
//!
//! Past ~28,000 connections one source address runs out of ephemeral ports
//! (`net.ipv4.ip_local_port_range`), so connections come from several
//! loopback addresses (127.0.0.2, 127.0.0.3, ...: Linux routes all of
//! 127/8 to `lo`), [`PER_SOURCE`] each. Both processes hold one descriptor
//! per connection, so both need an open-files limit above the count.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use pgrelay_protocol::{ClientMessage, ServerMessage, PROTOCOL_VERSION};
use serde_json::json;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use super::report::{thousands, Figure, Report, Series};
use super::{machine, BenchDb, CommonArgs};

const TABLE: &str = "public.bench_idle";
/// Handshakes in flight at once while connecting.
const CONNECTING: usize = 64;
/// Connections from one source address: under the 28,231 ephemeral ports
/// of Linux's default range.
const PER_SOURCE: usize = 20_000;
/// Descriptors each process needs besides its connections.
const SPARE_FILES: u64 = 256;

#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Idle connections to hold open.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
}

pub(crate) async fn run(args: IdleArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.connections >= 10, "--connections must be at least 10");
    // Each connection is a socket here and one in the server (which inherits
    // this limit).
    let limit = rlimit::increase_nofile_limit(u64::MAX).context("raising the open files limit")?;
    anyhow::ensure!(
        limit >= (args.connections as u64) + SPARE_FILES,
        "the open files limit is {limit} (the hard limit, `ulimit -Hn`, raised only with \
         CAP_SYS_RESOURCE); {} connections need {} in this process and in the server: \
         at most {} here",
        args.connections,
        args.connections as u64 + SPARE_FILES,
        limit.saturating_sub(SPARE_FILES)
    );
    let (env, db) = BenchDb::with_tables(
        args.common.database_url.as_deref(),
        "CREATE TABLE public.bench_idle (id bigint PRIMARY KEY, body text);
         INSERT INTO public.bench_idle SELECT g, 'row ' || g FROM generate_series(1, 100) g;",
    )
    .await?;
    let (mut child, addr) = super::spawn_server(
        env.url(),
        "bench_idle",
        TABLE,
        // Every connection comes from 127.0.0.1, as fast as it can.
        &["--connect-rate", "0", "--max-connections", "1000000"],
    )
    .await?;
    let pid = child.id().context("the server process has no pid")?;
    let server: SocketAddr = addr.parse().context("the server's address")?;

    let (stop, stopped) = watch::channel(false);
    let ready = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(CONNECTING));
    let mut sockets = JoinSet::new();
    // The first tenth warms the server up (runtime threads, allocator
    // arenas, buffers); the cost per connection is measured after it.
    let warmup = (args.connections / 10).max(1);
    let mut samples = vec![(0.0, super::proc_bytes(pid, "VmRSS")? as f64 / 1_048_576.0)];
    let mut baseline = None;
    let started = Instant::now();
    for i in 0..args.connections {
        let permit = Arc::clone(&gate).acquire_owned().await?;
        sockets.spawn(hold_connection(
            server,
            source_address(i),
            format!("idle-{i}"),
            Arc::clone(&ready),
            stopped.clone(),
            permit,
        ));
        let opened = i + 1;
        if opened == warmup || opened.is_multiple_of(1000) || opened == args.connections {
            wait_ready(&ready, opened, &mut sockets).await?;
            let rss = super::proc_bytes(pid, "VmRSS")?;
            samples.push((opened as f64, rss as f64 / 1_048_576.0));
            if opened == warmup {
                baseline = Some(rss);
            }
            if opened.is_multiple_of(1000) {
                eprintln!("  {opened} connections: server RSS {} MiB", rss / 1_048_576);
            }
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let total_rss = super::proc_bytes(pid, "VmRSS")?;
    let baseline = baseline.unwrap_or(total_rss);
    let measured = (args.connections - warmup).max(1);
    let per_connection = total_rss.saturating_sub(baseline) as f64 / measured as f64;
    let _ = stop.send(true);
    while sockets.join_next().await.is_some() {}
    let _ = child.kill().await;

    let mut report = Report::new(
        "idle",
        format!(
            "idle: {} handshaken WebSocket connections to one `pgrelay serve`",
            args.connections
        ),
    );
    report.line("connections open", thousands(args.connections as f64));
    report.line("connected in", format!("{connect_secs:.1} s"));
    report.line(
        "server RSS",
        format!(
            "{:.1} MiB (after {warmup} warm-up connections: {:.1} MiB)",
            total_rss as f64 / 1_048_576.0,
            baseline as f64 / 1_048_576.0
        ),
    );
    report.line(
        "RSS per idle connection",
        format!(
            "{} bytes ({:.2} KiB)",
            thousands(per_connection),
            per_connection / 1024.0
        ),
    );
    // Flat means the second half costs what the whole does.
    let half = samples
        .iter()
        .find(|(n, _)| *n >= (args.connections / 2) as f64)
        .copied();
    let second_half = half.map(|(n, mib)| {
        (total_rss as f64 - mib * 1_048_576.0) / (args.connections as f64 - n).max(1.0)
    });
    if let Some(bytes) = second_half {
        report.line(
            "RSS per idle connection, second half only",
            format!("{} bytes", thousands(bytes)),
        );
    }
    report.line(
        "source addresses",
        format!(
            "127.0.0.2 .. {} ({PER_SOURCE} connections each)",
            source_address(args.connections - 1)
        ),
    );
    report.target(
        "idle ≤ 4 KiB per connection",
        per_connection <= 4.0 * 1024.0,
    );
    report.set("machine", machine(&db).await);
    report.set(
        "results",
        json!({
            "connections": args.connections, "warmup_connections": warmup,
            "server_rss_bytes": total_rss, "baseline_rss_bytes": baseline,
            "bytes_per_connection": per_connection, "connect_seconds": connect_secs,
            "bytes_per_connection_second_half": second_half,
        }),
    );
    report.figure = Some(Figure {
        title: format!(
            "server memory with idle connections (up to {})",
            args.connections
        ),
        x_label: "idle connections".into(),
        y_label: "server RSS (MiB)".into(),
        series: vec![Series {
            name: "pgrelay serve RSS".into(),
            points: samples,
        }],
    });
    drop(db);
    env.close().await?;
    Ok(report)
}

/// The loopback address connection `i` comes from: 127.0.0.2 for the first
/// [`PER_SOURCE`], then 127.0.0.3, ... (127.0.1.0 after 127.0.0.255).
fn source_address(i: usize) -> IpAddr {
    let n = u32::try_from(2 + i / PER_SOURCE).unwrap_or(u32::MAX) & 0x00ff_ffff;
    IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | n))
}

/// Connects from `source`, handshakes, reads to `caught_up`, then stays
/// idle (answering the server's pings) until told to stop.
async fn hold_connection(
    server: SocketAddr,
    source: IpAddr,
    client_id: String,
    ready: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> anyhow::Result<()> {
    let tcp = tokio::net::TcpSocket::new_v4()?;
    tcp.bind(SocketAddr::new(source, 0))
        .with_context(|| format!("binding a client socket to {source}"))?;
    let tcp = tcp
        .connect(server)
        .await
        .with_context(|| format!("connecting from {source}"))?;
    // The clients' memory is not measured, but 128 KiB read buffers (the
    // default) for 50,000 of them would be 6 GiB in this process.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut socket, _) = tokio_tungstenite::client_async_with_config(
        format!("ws://{server}/api/sync"),
        tcp,
        Some(config),
    )
    .await?;
    let hello = ClientMessage::Hello {
        protocol_version: PROTOCOL_VERSION,
        client_id,
        token: None,
        // A position (the empty log's start) rather than none: a replica
        // without one would be sent a snapshot first.
        last_lsn: Some(pgrelay_protocol::Lsn::ZERO),
        log_id: None,
        resync: Vec::new(),
        tables: None,
        repair: false,
        schema_version: None,
    };
    socket
        .send(Message::Text(serde_json::to_string(&hello)?.into()))
        .await?;
    loop {
        let message = socket
            .next()
            .await
            .context("closed during the handshake")??;
        if let Message::Text(text) = message {
            match serde_json::from_str::<ServerMessage>(&text)? {
                ServerMessage::CaughtUp { .. } => break,
                ServerMessage::Error { code, message, .. } => {
                    anyhow::bail!("refused: {code:?} {message}")
                }
                _ => {}
            }
        }
    }
    drop(permit);
    ready.fetch_add(1, Ordering::Relaxed);
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return Ok(()),
            message = socket.next() => match message {
                Some(Ok(_)) => {}
                _ => anyhow::bail!("the server closed an idle connection"),
            },
        }
    }
}

/// Waits until `count` connections are handshaken; fails if one failed.
async fn wait_ready(
    ready: &AtomicUsize,
    count: usize,
    sockets: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while ready.load(Ordering::Relaxed) < count {
        if let Some(Some(joined)) = futures_util::FutureExt::now_or_never(sockets.join_next()) {
            joined??;
            anyhow::bail!("a connection ended early");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {count} connections handshaken",
            ready.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
