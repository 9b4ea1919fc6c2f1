//! `pgrelay chaos`: injects faults into a running system (nodes killed,
//! paused, cut off; PostgreSQL restarted; clients killed mid-apply) while
//! a writer and the clients write, then proves with plain SQL on
//! PostgreSQL and on the replicas' files that nothing was lost, doubled or
//! torn. See docs/chaos.md.
//!
//! ```text
//!  writer ──────────────────────────────────────────────▶ PostgreSQL
//!  client 1..M ─▶ proxy ─▶ node 1..N ─▶ proxy ───────────▶ (own cluster,
//!  (child processes)   (cut, delay)   (cut, freeze, delay)  restarted)
//! ```

mod checks;
mod clients;
mod faults;
mod nodes;
mod proxy;
mod report;
mod rng;
mod samples;
mod workload;

use std::path::PathBuf;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use pgrelay_testkit::{PrivateCluster, TestDatabase};

use clients::Client;
pub use clients::{run_client, ChaosClientArgs};
use faults::{Fault, Kind};
use nodes::Node;
use report::Report;
use rng::Rng;
use samples::Samples;

/// The tables the nodes sync.
pub(crate) const TABLES: [&str; 2] = ["public.chaos_accounts", "public.chaos_notes"];

/// How long the system gets to recover after a fault, and to settle at the end.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(90);

#[derive(Args, Debug)]
pub struct ChaosArgs {
    /// A PostgreSQL server with wal_level=logical (its admin URL); chaos
    /// creates and drops a database of its own there, and does not
    /// restart it. Default: a private PostgreSQL, which it also restarts.
    #[arg(long, env = "PGRELAY_DATABASE_URL")]
    pub database_url: Option<String>,
    /// How long faults are injected.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// `pgrelay serve` nodes on the one slot.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Client processes, each with its replica.
    #[arg(long, default_value_t = 3)]
    pub clients: usize,
    /// The seed of every random choice; printed, to replay a run.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Transfers committed per second by the writer.
    #[arg(long, default_value_t = 20)]
    pub rate: u32,
    /// Pause between the recovery from one fault and the next fault, at
    /// most (a random time up to it).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub max_gap: Duration,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Keep the run's directory (replicas, node and client logs) even when
    /// every check passes (it is always kept on a failure).
    #[arg(long)]
    pub keep: bool,
}

/// Everything under test.
pub(crate) struct World {
    pub(crate) nodes: Vec<Node>,
    pub(crate) clients: Vec<Client>,
    /// Chaos's own PostgreSQL, which it may restart.
    pub(crate) cluster: Option<Arc<PrivateCluster>>,
    /// The newest transfer known committed.
    pub(crate) committed: Arc<AtomicI64>,
}

pub async fn run(args: ChaosArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.nodes >= 1 && args.clients >= 1,
        "--nodes and --clients must be at least 1"
    );
    anyhow::ensure!(args.rate >= 1, "--rate must be at least 1");
    let seed = args.seed.unwrap_or_else(rng::fresh_seed);
    println!("pgrelay chaos: seed {seed} (replay with --seed {seed})");
    let mut rng = Rng::new(seed);

    let (admin, cluster) = match &args.database_url {
        Some(url) => (url.clone(), None),
        None => {
            println!("starting a private PostgreSQL with wal_level=logical ...");
            let cluster = tokio::task::spawn_blocking(PrivateCluster::start).await??;
            (cluster.admin_url(), Some(Arc::new(cluster)))
        }
    };
    let db = TestDatabase::create_on(&admin)
        .await
        .context("creating the chaos database")?;
    let url = db.url().to_owned();
    let sql = workload::connect(&url).await?;
    sql.batch_execute(workload::SCHEMA)
        .await
        .context("creating the chaos tables")?;
    let dir = tempfile::Builder::new()
        .prefix("pgrelay-chaos-")
        .tempdir()?;
    let pg = nodes::address(&url).await?;

    let mut world = World {
        nodes: Vec::new(),
        clients: Vec::new(),
        cluster,
        committed: Arc::new(AtomicI64::new(0)),
    };
    for i in 0..args.nodes {
        world
            .nodes
            .push(Node::start(i, &url, pg, dir.path()).await?);
    }
    let servers: Vec<String> = world
        .nodes
        .iter()
        .map(|n| format!("ws://{}", n.clients.addr))
        .collect();
    for i in 0..args.clients {
        world
            .clients
            .push(Client::start(i, servers.clone(), dir.path())?);
    }
    println!(
        "{} nodes, {} clients, run directory {}",
        args.nodes,
        args.clients,
        dir.path().display()
    );

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let every = Duration::from_secs(1) / args.rate;
    let writer = tokio::spawn(workload::write_transfers(
        url.clone(),
        every,
        seed,
        Arc::clone(&world.committed),
        stopped.clone(),
    ));
    // Faults start once the system works: one capturer, every replica live.
    let ready = faults::recover(&world, Duration::from_secs(120)).await;
    let samples = Arc::new(Mutex::new(Samples::default()));
    let sampler = tokio::spawn(samples::sample(
        world.clients.iter().map(|c| c.db.clone()).collect(),
        Duration::from_millis(100),
        Arc::clone(&samples),
        stopped.clone(),
    ));

    let started = Instant::now();
    let mut injected: Vec<Fault> = Vec::new();
    let mut failure: Option<String> = None;
    if ready.is_none() {
        failure = Some(
            "the system never came up (no capturing node, or a replica never synced)".to_owned(),
        );
    }
    // Ctrl-C ends the faults early; the checks still run.
    let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&interrupted);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    while failure.is_none()
        && started.elapsed() < args.duration
        && !interrupted.load(std::sync::atomic::Ordering::SeqCst)
    {
        let kind = Kind::choose(&mut rng, world.cluster.is_some());
        let at = started.elapsed();
        let (target, held) = match faults::inject(&mut world, kind, &mut rng).await {
            Ok(done) => done,
            Err(e) => {
                failure = Some(format!("injecting {}: {e:#}", kind.name()));
                break;
            }
        };
        let recovered = faults::recover(&world, RECOVERY_DEADLINE).await;
        println!(
            "{:>7.1} s  {:<30} {:<24} held {:>5} ms, recovered after {}",
            at.as_secs_f64(),
            kind.name(),
            target,
            held.as_millis(),
            recovered.map_or("never".to_owned(), |d| format!("{} ms", d.as_millis()))
        );
        injected.push(Fault {
            kind,
            target,
            at,
            held,
            recovered,
        });
        // A system that does not recover would only pile faults on the
        // one that broke it: stop here and check what holds.
        if recovered.is_none() {
            break;
        }
        let gap = args.max_gap.as_millis();
        tokio::time::sleep(rng.millis(0, u64::try_from(gap).unwrap_or(u64::MAX))).await;
    }
    let ran = started.elapsed();

    // Quiesce: no new writes; everything up; wait for the replicas.
    println!("quiescing ...");
    std::fs::write(dir.path().join("quiesce"), b"")?;
    let _ = stop.send(true);
    let _ = writer.await;
    let _ = sampler.await;
    for node in &mut world.nodes {
        node.clients.set(proxy::Link::Open);
        node.database.set(proxy::Link::Open);
        if node.stopped {
            node.pause(false)?;
        }
    }
    for client in &mut world.clients {
        if !client.is_up() {
            client.restart()?;
        }
    }
    let sql = workload::connect(&url).await?;
    let settled = checks::settle(&sql, &world.clients, RECOVERY_DEADLINE).await;
    let samples = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let unrecovered: Vec<String> = injected
        .iter()
        .filter(|f| f.recovered.is_none())
        .map(|f| format!("{} at {:.1} s", f.kind.name(), f.at.as_secs_f64()))
        .collect();
    let mut report = Report {
        seed,
        nodes: args.nodes,
        clients: args.clients,
        ran,
        faults: injected,
        checks: Vec::new(),
    };
    report.checks.push((
        "the run",
        failure.map_or(Ok("every fault injected".to_owned()), Err),
    ));
    report.checks.push((
        "every fault recovered from",
        if unrecovered.is_empty() {
            Ok(format!("within {} s each", RECOVERY_DEADLINE.as_secs()))
        } else {
            Err(format!(
                "not within {} s: {}",
                RECOVERY_DEADLINE.as_secs(),
                unrecovered.join(", ")
            ))
        },
    ));
    report.checks.push((
        "no torn transaction in any sampled replica state",
        if samples.torn_count == 0 {
            Ok(format!(
                "{} states summed to {} ({} mid-snapshot or not yet synced, not judged)",
                samples.judged,
                workload::TOTAL,
                samples.skipped
            ))
        } else {
            Err(format!(
                "{} of {} states: {}",
                samples.torn_count,
                samples.judged,
                samples.torn.join("; ")
            ))
        },
    ));
    report.checks.push((
        "the replicas settled",
        settled.map(|d| format!("in {} ms", d.as_millis())),
    ));
    report.checks.push((
        "every replica equals PostgreSQL row by row",
        checks::replicas_equal(&sql, &world.clients).await,
    ));
    report.checks.push((
        "every client write applied exactly once",
        checks::exactly_once(&sql, &world.clients).await,
    ));
    report.checks.push((
        "the change log has no gap and no duplicate",
        checks::change_log(&sql).await,
    ));
    report.checks.push((
        "the slot is confirmed to the end",
        checks::slot_confirmed(&sql, Duration::from_secs(30)).await,
    ));

    print!("{}", report.render());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report.to_json())?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    for client in &mut world.clients {
        client.kill().await;
    }
    for node in &mut world.nodes {
        node.kill().await;
    }
    drop(sql);
    let passed = report.passed();
    if passed && !args.keep {
        drop(dir);
    } else {
        println!("run directory kept: {}", dir.keep().display());
    }
    if let Err(e) = db.drop_database().await {
        eprintln!("warning: dropping the chaos database: {e}");
    }
    drop(world);
    anyhow::ensure!(passed, "chaos found a violation (seed {seed})");
    Ok(())
}
