//! `bench eventlog`: the LiveStore backend. One writer pushes to one store
//! over the 0.4 protocol (each push waits for its answer, as a LiveStore
//! client does) while many live clients pull; reports events accepted per
//! second in batches of 1 and of 100, and push → receipt at every client.
//! The server runs in this process on a SQLite file, without PostgreSQL.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures_util::SinkExt;
use pgrelay_eventlog::{EventLogConfig, EventLogStorage};
use pgrelay_server::ServerConfig;
use serde_json::json;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use super::eventlog_wire::{next_text, open, push_frame, seq_range, Socket};
use super::fleet::percentile;
use super::latency::cdf;
use super::report::{thousands, Figure, Report, Series};
use super::CommonArgs;

/// How long the clients may take to receive everything after the last push.
const DRAIN: Duration = Duration::from_secs(120);

#[derive(Args, Debug, Clone)]
pub struct EventLogArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Live clients pulling the store.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Events pushed in batches of 100.
    #[arg(long, default_value_t = 100_000)]
    pub events: usize,
    /// Events pushed one per push.
    #[arg(long, default_value_t = 5_000)]
    pub single_events: usize,
    /// SQLite `synchronous` of the event log, as `serve --eventlog-sync`.
    #[arg(long, default_value = "full", value_parser = ["full", "normal"])]
    pub sync: String,
    /// Distinct stores touched once each to measure memory per store (0: skip).
    #[arg(long, default_value_t = 20_000)]
    pub stores: usize,
    /// Stores held in memory during that phase, as `serve --eventlog-max-stores`.
    #[arg(long, default_value_t = 10_000)]
    pub max_stores: usize,
    /// Run the clients on the server's runtime (as before 2026-12-04)
    /// instead of their own threads: the server's tasks then queue behind
    /// the clients' reads.
    #[arg(long)]
    pub same_runtime: bool,
}

struct Phase {
    batch: usize,
    events: usize,
    seconds: f64,
    /// Push → receipt per batch per client, µs, sorted.
    latencies: Vec<u32>,
    complete: bool,
    problem: Option<String>,
}

pub(crate) async fn run(args: EventLogArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.clients >= 1, "--clients must be at least 1");
    anyhow::ensure!(
        args.events >= 100 && args.single_events >= 1,
        "--events must be at least 100 and --single-events at least 1"
    );
    let dir = tempfile::tempdir()?;
    let mut server = ServerConfig::without_database();
    server.listen = "127.0.0.1:0".parse()?;
    server.idle_timeout = Duration::from_secs(3600);
    // Every client connects from 127.0.0.1 at once: over the default burst.
    server.connect_rate = 0.0;
    let eventlog = EventLogConfig {
        storage: EventLogStorage::Sqlite(Some(dir.path().join("events.sqlite"))),
        sqlite_sync_full: args.sync == "full",
        idle_timeout: server.idle_timeout,
        ..EventLogConfig::default()
    };
    let server = crate::cmd::serve::start(crate::cmd::serve::ServeConfig {
        server,
        eventlog,
        eventlog_auth: None,
    })
    .await?;
    let url = format!("ws://{}/livestore", server.local_addr());

    // The clients stand for other machines: on their own threads, their
    // reads compete with the server for the cores but do not queue in
    // front of the server's tasks.
    let clients = if args.same_runtime {
        None
    } else {
        Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("bench-eventlog-client")
                .enable_all()
                .build()
                .context("starting the clients' runtime")?,
        )
    };
    let on_clients = |name: &'static str, batch: usize, events: usize| {
        let phase = Box::pin(phase(url.clone(), name, args.clients, batch, events));
        let clients = clients.as_ref().map(tokio::runtime::Runtime::handle);
        async move {
            match clients {
                Some(runtime) => runtime.spawn(phase).await?,
                None => phase.await,
            }
        }
    };
    let single = on_clients("single", 1, args.single_events).await;
    let cpu_before = cpu_by_thread();
    let hundred = match &single {
        Ok(_) => on_clients("hundred", 100, args.events).await,
        Err(_) => Err(anyhow::anyhow!("the batches of 1 failed")),
    };
    let cpu: Vec<(&str, f64)> = cpu_by_thread()
        .into_iter()
        .map(|(group, seconds)| {
            (
                group,
                seconds - cpu_before.get(group).copied().unwrap_or(0.0),
            )
        })
        .collect();
    if let Some(runtime) = clients {
        runtime.shutdown_background();
    }
    let (single, hundred) = (single?, hundred?);
    server.shutdown().await?;
    let stores = if args.stores > 0 {
        eprintln!("stores: touching {} stores once each", args.stores);
        Some(
            super::eventlog_stores::measure(args.stores, args.max_stores, args.sync == "full")
                .await?,
        )
    } else {
        None
    };

    let mut report = Report::new(
        "eventlog",
        format!(
            "eventlog: one LiveStore store, {} live clients ({}), SQLite (synchronous={})",
            args.clients,
            if args.same_runtime {
                "on the server's runtime"
            } else {
                "on their own runtime"
            },
            args.sync.to_uppercase()
        ),
    );
    let ms = |us: u32| f64::from(us) / 1000.0;
    let mut results = serde_json::Map::new();
    for p in [&single, &hundred] {
        let rate = p.events as f64 / p.seconds;
        let (p50, p99) = (
            ms(percentile(&p.latencies, 50.0)),
            ms(percentile(&p.latencies, 99.0)),
        );
        let label = format!("batches of {}", p.batch);
        report.line(
            format!("{label}: accepted"),
            format!(
                "{} events/s ({} events in {:.2} s)",
                thousands(rate),
                thousands(p.events as f64),
                p.seconds
            ),
        );
        report.line(
            format!("{label}: push → receipt p50"),
            format!("{p50:.2} ms"),
        );
        report.line(
            format!("{label}: push → receipt p99"),
            format!("{p99:.2} ms"),
        );
        report.line(
            format!("{label}: every client has every event"),
            if p.complete {
                "yes".to_owned()
            } else {
                "NO".to_owned()
            },
        );
        results.insert(
            format!("batch_{}", p.batch),
            json!({"events": p.events, "seconds": p.seconds, "events_per_sec": rate,
                   "p50_ms": p50, "p99_ms": p99, "samples": p.latencies.len(), "complete": p.complete}),
        );
        if let Some(problem) = &p.problem {
            report.failure = Some(problem.clone());
        }
    }
    if let Some(cost) = &stores {
        let per_store = cost.bytes_per_held_store();
        report.line(
            format!(
                "memory per store held (RSS slope over the first {} stores)",
                cost.max_stores.min(args.stores)
            ),
            format!("{} bytes", thousands(per_store)),
        );
        let base = cost.samples[0].1;
        let end = cost.samples.last().map_or(base, |s| s.1);
        report.line(
            format!(
                "RSS: before any store → after {} stores (--eventlog-max-stores {})",
                args.stores, cost.max_stores
            ),
            format!("{} MiB → {} MiB", base / 1_048_576, end / 1_048_576),
        );
        if let Some(growth) = cost.growth_past_bound() {
            report.line(
                "RSS growth past the bound (idle stores evicted)",
                format!("{:+.1} MiB", growth as f64 / 1_048_576.0),
            );
        }
        results.insert(
            "stores".into(),
            json!({"touched": args.stores, "max_stores": cost.max_stores,
                   "bytes_per_held_store": per_store,
                   "growth_past_bound_bytes": cost.growth_past_bound(),
                   "rss_samples": cost.samples}),
        );
    }
    // Where the time of the batches of 100 went, per push.
    let pushes = (hundred.events / 100).max(1) as f64;
    let shares: Vec<String> = cpu
        .iter()
        .map(|(group, seconds)| format!("{group} {:.2}", seconds * 1000.0 / pushes))
        .collect();
    report.line(
        "batches of 100: CPU ms per push (threads of this process)",
        shares.join(", "),
    );
    let busy: f64 = cpu.iter().map(|(_, s)| s).sum::<f64>() / hundred.seconds;
    report.line(
        "batches of 100: cores busy in this process",
        format!("{busy:.2}"),
    );
    results.insert(
        "cpu_seconds_batch_100".into(),
        json!(cpu
            .iter()
            .map(|(g, s)| (g.to_string(), json!(s)))
            .collect::<serde_json::Map<_, _>>()),
    );
    results.insert("clients".into(), json!(args.clients));
    results.insert("same_runtime".into(), json!(args.same_runtime));
    results.insert("synchronous".into(), json!(args.sync));
    let hundred_rate = hundred.events as f64 / hundred.seconds;
    report.target(
        "≥ 50,000 events/s accepted in batches of 100",
        hundred_rate >= 50_000.0,
    );
    for p in [&single, &hundred] {
        report.target(
            format!(
                "p99 ≤ 10 ms to {} clients, batches of {}",
                args.clients, p.batch
            ),
            ms(percentile(&p.latencies, 99.0)) <= 10.0,
        );
    }
    report.set("machine", json!({"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "pgrelay": env!("CARGO_PKG_VERSION")}));
    report.set("results", serde_json::Value::Object(results));
    report.figure = Some(Figure {
        title: format!("push → receipt CDF, {} live clients", args.clients),
        x_label: "ms from push sent to batch received".into(),
        y_label: "fraction of receipts".into(),
        series: [&single, &hundred]
            .iter()
            .map(|p| Series {
                name: format!("batches of {}", p.batch),
                points: cdf(&p.latencies),
            })
            .collect(),
    });
    Ok(report)
}

/// One run on a fresh store: clients subscribe, the writer pushes, every
/// client must receive every event once, in order.
async fn phase(
    url: String,
    name: &'static str,
    clients: usize,
    batch: usize,
    events: usize,
) -> anyhow::Result<Phase> {
    let store = format!("bench-{name}-{}", rand::random::<u32>());
    let events = events - events % batch;
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..=events).map(|_| AtomicU64::new(0)).collect());
    let start = Instant::now();
    let mut readers = JoinSet::new();
    let mut backend = String::new();
    for _ in 0..clients {
        let mut ws = open(&url, &store).await?;
        let pull = json!({"_tag": "Request", "id": "0", "tag": "SyncWsRpc.Pull",
            "payload": {"storeId": store, "live": true, "cursor": {"_tag": "None"}},
            "traceId": "t", "spanId": "s", "sampled": false, "headers": []});
        ws.send(Message::Text(pull.to_string().into())).await?;
        let first = next_text(&mut ws).await?;
        let value: serde_json::Value = serde_json::from_str(first.as_str())?;
        backend = value["values"][0]["backendId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        readers.spawn(read_all(
            ws,
            i64::try_from(events).unwrap_or(i64::MAX),
            Arc::clone(&sent_at),
            start,
        ));
    }

    let mut writer = open(&url, &store).await?;
    let began = Instant::now();
    let mut head = 0usize;
    let mut request = 0u64;
    while head < events {
        request += 1;
        let frame = push_frame(&store, &backend, request, head, batch);
        let last = head + batch;
        sent_at[last].store(nanos_since(start), Ordering::Relaxed);
        writer.send(Message::Text(frame.into())).await?;
        let answer = next_text(&mut writer).await?;
        anyhow::ensure!(
            answer.as_str().contains(r#""exit":{"_tag":"Success""#),
            "push {request} refused: {answer}"
        );
        head = last;
    }
    let seconds = began.elapsed().as_secs_f64();

    let mut latencies = Vec::new();
    let mut problem = None;
    let deadline = tokio::time::Instant::now() + DRAIN;
    while let Some(joined) = tokio::time::timeout_at(deadline, readers.join_next())
        .await
        .unwrap_or(None)
    {
        match joined? {
            Ok(mut samples) => latencies.append(&mut samples),
            Err(e) => problem = Some(e.to_string()),
        }
    }
    let complete = problem.is_none() && readers.is_empty();
    if !readers.is_empty() {
        problem = Some(format!(
            "{} clients did not receive all {events} events within {DRAIN:?}",
            readers.len()
        ));
        readers.abort_all();
    }
    latencies.sort_unstable();
    Ok(Phase {
        batch,
        events,
        seconds,
        latencies,
        complete,
        problem,
    })
}

/// Reads chunks until `last`, checking order; returns push → receipt per chunk in µs.
async fn read_all(
    mut ws: Socket,
    last: i64,
    sent_at: Arc<Vec<AtomicU64>>,
    start: Instant,
) -> anyhow::Result<Vec<u32>> {
    let mut next = 1;
    let mut samples = Vec::new();
    while next <= last {
        let text = next_text(&mut ws).await?;
        let Some((first, end)) = seq_range(text.as_str()) else {
            continue;
        };
        anyhow::ensure!(
            first == next,
            "a client expected event {next} and received {first}..{end}"
        );
        let now = nanos_since(start);
        let Some(sent) = usize::try_from(end).ok().and_then(|i| sent_at.get(i)) else {
            continue;
        };
        let sent = sent.load(Ordering::Relaxed);
        samples.push(u32::try_from(now.saturating_sub(sent) / 1000).unwrap_or(u32::MAX));
        next = end + 1;
    }
    Ok(samples)
}

/// Nanoseconds since `start` (saturating: a bench does not run 584 years).
fn nanos_since(start: std::time::Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// CPU seconds used so far by this process's threads, by part (clients,
/// SQLite, the rest), from `/proc/self/task/*/stat` at 100 ticks a second.
fn cpu_by_thread() -> std::collections::BTreeMap<&'static str, f64> {
    let mut by = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return by;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // The name is in parentheses and may hold anything; the fields
        // after it start with the third (state): utime is the 14th.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = head.split_once('(').map_or("", |(_, n)| n);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let tick = |i: usize| {
            fields
                .get(i)
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let group = if name.starts_with("bench-eventlog") {
            "clients"
        } else if name.starts_with("pgrelay-eventlo") {
            "sqlite"
        } else {
            "server"
        };
        *by.entry(group).or_insert(0.0) += (tick(11) + tick(12)) as f64 / 100.0;
    }
    by
}
