//! `bench fanout`: rows written as fast as PostgreSQL takes them while many
//! real clients apply them; measures aggregate row deliveries per second
//! (rows × clients applied to replicas). With `--nodes N`, N servers in
//! this process serve one slot (one captures, the others follow its change
//! log) and the clients are spread over them.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use super::capture::{load, TABLE, TABLE_DDL};
use super::fleet::Fleet;
use super::latency::wait_captured;
use super::report::{thousands, Figure, Report, Series};
use super::spread::SpreadArgs;
use super::{machine, BenchDb, CommonArgs};

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Clients, each with its own SQLite replica.
    #[arg(long, default_value_t = 1_000)]
    pub clients: usize,
    /// Rows written (each delivered to every client).
    #[arg(long, default_value_t = 100_000)]
    pub rows: u64,
    /// Rows per transaction.
    #[arg(long, default_value_t = 1_000)]
    pub tx_size: u64,
    /// Split rows and clients across this many tenants: the server runs
    /// with `--auth jwt` and a rule `tenant = claims.tenant`, client `i` is
    /// in tenant `i % tenants` and row `id` in tenant `id % tenants`, so
    /// each client gets 1/tenants of the rows. 0: no auth, every client
    /// gets every row.
    #[arg(long, default_value_t = 0)]
    pub tenants: u64,
    /// Nodes serving the slot (in this process); clients spread over them.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    #[command(flatten)]
    pub spread: SpreadArgs,
}

/// The rule of a tenant bench: each client reads its tenant's rows.
const TENANT_RULES: &str = r#"
default = "deny"
[tables.bench_items]
read = "tenant = claims.tenant"
"#;

/// Adds the tenant column (set by a trigger, so the shared loader stays
/// as it is) and returns the server's auth and each client's token.
async fn tenant_setup(
    db: &tokio_postgres::Client,
    tenants: u64,
    clients: usize,
) -> anyhow::Result<(pgrelay_server::AuthConfig, Vec<String>)> {
    db.batch_execute(&format!(
        "ALTER TABLE {TABLE} ADD COLUMN tenant int;
         CREATE FUNCTION bench_tenant() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN NEW.tenant := NEW.id % {tenants}; RETURN NEW; END $$;
         CREATE TRIGGER bench_tenant BEFORE INSERT ON {TABLE} FOR EACH ROW EXECUTE FUNCTION bench_tenant();"
    ))
    .await?;
    let secret: Vec<u8> = (0..32).map(|_| rand::random::<u8>()).collect();
    let key = jsonwebtoken::EncodingKey::from_secret(&secret);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 24 * 3600;
    let tokens = (0..clients)
        .map(|i| {
            let claims =
                json!({"sub": format!("bench-{i}"), "tenant": i as u64 % tenants, "exp": exp});
            jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut auth = pgrelay_server::AuthConfig::new(pgrelay_server::JwtKey::Secret(secret));
    auth.rules = Some(TENANT_RULES.to_owned());
    Ok((auth, tokens))
}

/// Rows of tenant `t` among ids `1..=rows`.
fn tenant_rows(rows: u64, tenants: u64, t: u64) -> u64 {
    (1..=rows).filter(|id| id % tenants == t).count() as u64
}

/// Replicas holding a row of another tenant (must be none).
async fn leaks(dir: std::path::PathBuf, clients: usize, tenants: u64) -> anyhow::Result<usize> {
    tokio::task::spawn_blocking(move || {
        let mut leaking = 0;
        for i in 0..clients {
            let path = dir.join(format!("replica-{i}.sqlite"));
            let conn = rusqlite::Connection::open_with_flags(
                &path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )?;
            let other: i64 = conn.query_row(
                "SELECT count(*) FROM bench_items WHERE tenant IS NOT ?1",
                [i64::try_from(i as u64 % tenants).unwrap_or(0)],
                |r| r.get(0),
            )?;
            if other > 0 {
                leaking += 1;
            }
        }
        Ok(leaking)
    })
    .await?
}

pub(crate) async fn run(args: FanoutArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.clients > 0 && args.rows > 0 && args.tx_size > 0,
        "--clients, --rows and --tx-size must be positive"
    );
    anyhow::ensure!(
        args.tenants == 0 || args.tx_size >= args.tenants,
        "--tx-size must be at least --tenants, so every transaction reaches every tenant"
    );
    args.spread.check()?;
    if args.spread.apart() {
        return super::processes::fanout(args).await;
    }
    let (env, db) = BenchDb::with_tables(args.common.database_url.as_deref(), TABLE_DDL).await?;
    let (auth, tokens) = if args.tenants > 0 {
        let (auth, tokens) = tenant_setup(&db, args.tenants, args.clients).await?;
        (Some(auth), tokens)
    } else {
        (None, Vec::new())
    };
    let slot = match args.tenants {
        0 => "bench_fanout",
        _ => "bench_fanout_tenants",
    };
    anyhow::ensure!(args.nodes > 0, "--nodes must be positive");
    let mut servers = Vec::with_capacity(args.nodes);
    for _ in 0..args.nodes {
        servers.push(super::start_server_with_auth(env.url(), slot, TABLE, auth.clone()).await?);
    }
    anyhow::ensure!(servers[0].capturing(), "the first node does not capture");
    let server = &servers[0];
    let addrs: Vec<_> = servers
        .iter()
        .map(pgrelay_server::Server::local_addr)
        .collect();
    let dir = tempfile::tempdir()?;
    eprintln!(
        "  starting {} clients on {} node(s) ...",
        args.clients, args.nodes
    );
    let fleet =
        Fleet::start_spread("bench", &addrs, args.clients, dir.path(), false, &tokens).await?;
    fleet.wait_connected(Duration::from_secs(300)).await?;
    let scopes: usize = servers.iter().map(pgrelay_server::Server::scopes).sum();
    // What each client must end with.
    let wanted: Vec<u64> = (0..fleet.len() as u64)
        .map(|i| match args.tenants {
            0 => args.rows,
            t => tenant_rows(args.rows, t, i % t),
        })
        .collect();
    let expected: u64 = wanted.iter().sum();

    eprintln!("  writing {} rows ...", args.rows);
    let started = Instant::now();
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let applied = std::sync::Arc::clone(&fleet.applied_changes);
        let finished = std::sync::Arc::clone(&finished);
        tokio::spawn(async move {
            let mut points = vec![(0.0, 0.0)];
            let mut last = (0.0, 0u64);
            let mut next_progress = 5.0;
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let t = started.elapsed().as_secs_f64();
                let now = applied.load(Ordering::Relaxed);
                points.push((t, (now - last.1) as f64 / (t - last.0)));
                last = (t, now);
                if t >= next_progress {
                    eprintln!("  {t:>4.0}s: {now} of {expected} deliveries applied");
                    next_progress += 5.0;
                }
                if now >= expected || finished.load(Ordering::Relaxed) {
                    return points;
                }
            }
        })
    };
    load(&db, args.rows, args.tx_size).await?;
    let write_secs = started.elapsed().as_secs_f64();
    let captured = wait_captured(server, args.rows).await?;
    let head = server.capture_stats().head;
    fleet.wait_at(head, Duration::from_secs(3600)).await?;
    let secs = started.elapsed().as_secs_f64();
    let counts = fleet.row_counts(TABLE).await?;
    let positions = fleet.positions().await?;
    for (i, (count, lsn)) in counts.iter().zip(&positions).enumerate() {
        if u64::try_from(*count).ok() != Some(wanted[i]) {
            eprintln!("  client {i}: {count} rows, replica at {lsn:?}, head {head}");
        }
    }
    let clients = fleet.len();
    finished.store(true, Ordering::Relaxed);
    let timeline = sampler.await.unwrap_or_default();
    fleet.stop().await?;
    for server in servers {
        server.shutdown().await?;
    }

    let short = counts
        .iter()
        .zip(&wanted)
        .filter(|(&c, &w)| u64::try_from(c).ok() != Some(w))
        .count();
    let leaking = match args.tenants {
        0 => 0,
        t => leaks(dir.path().to_owned(), clients, t).await?,
    };
    let rate = expected as f64 / secs;
    let mut report = Report::new(
        "fanout",
        match args.tenants {
            0 => format!(
                "fanout: {} rows (transactions of {}) to {} clients on {} node(s)",
                thousands(args.rows as f64),
                args.tx_size,
                clients,
                args.nodes
            ),
            t => format!(
                "fanout: {} rows (transactions of {}) to {} clients in {t} tenants (--auth, row rules)",
                thousands(args.rows as f64),
                args.tx_size,
                clients
            ),
        },
    );
    if args.tenants > 0 {
        report.line(
            "distinct scopes (rules evaluated once per change per scope)",
            scopes.to_string(),
        );
    }
    report.line("row deliveries", thousands(expected as f64));
    report.line(
        "first write → every replica at head",
        format!("{secs:.2} s"),
    );
    report.line("of which writing", format!("{write_secs:.2} s"));
    report.line("row deliveries/s", thousands(rate));
    report.line(
        if args.tenants == 0 {
            "every client has every row"
        } else {
            "every client has every row of its tenant"
        },
        if short == 0 {
            "yes".to_owned()
        } else {
            format!("NO: {short} clients short")
        },
    );
    if args.tenants > 0 {
        report.line(
            "replicas holding another tenant's row",
            if leaking == 0 {
                "none".to_owned()
            } else {
                format!("LEAK: {leaking}")
            },
        );
    }
    report.target("fan-out ≥ 500,000 row deliveries/s", rate >= 500_000.0);
    if short > 0 || captured != args.rows || leaking > 0 {
        report.failure = Some(format!(
            "{short} of {clients} replicas do not hold all their rows, {leaking} hold another tenant's; change log captured {captured} of {}",
            args.rows
        ));
    }
    report.set("machine", machine(&db).await);
    report.set(
        "results",
        json!({
            "clients": clients, "nodes": args.nodes, "rows": args.rows, "tx_size": args.tx_size,
            "tenants": args.tenants, "scopes": scopes, "leaking_replicas": leaking,
            "seconds": secs, "write_seconds": write_secs,
            "deliveries": expected, "deliveries_per_sec": rate, "complete": short == 0,
        }),
    );
    report.figure = Some(Figure {
        title: format!("fan-out to {clients} clients"),
        x_label: "seconds".into(),
        y_label: "row deliveries/s".into(),
        series: vec![Series {
            name: "applied to replicas".into(),
            points: timeline,
        }],
    });
    drop(db);
    env.close().await?;
    Ok(report)
}
