//! `pgrelay demo`: the main job end to end on a private PostgreSQL (or a
//! given one): a server, two clients with their own SQLite replicas, a
//! writer inserting, updating and deleting, then `verify` on both replicas.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use pgrelay_client::{ClientConfig, SyncClient};
use pgrelay_pg::TableFilter;
use pgrelay_server::{Server, ServerConfig};
use pgrelay_testkit::PrivateCluster;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;

use crate::cmd::{verify, web_demo};

const TABLE: &str = "public.pgrelay_demo_todos";
const SLOT: &str = "pgrelay_demo";

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Use this PostgreSQL (needs wal_level=logical) instead of starting a private one.
    /// The demo creates and then drops its own table, slot and publication.
    #[arg(long, env = "PGRELAY_DATABASE_URL")]
    pub database_url: Option<SecretString>,
    /// Rows the writer inserts.
    #[arg(long, default_value_t = 20_000)]
    pub rows: u64,
    /// Serve a todo page that uses the browser client instead, with a
    /// writer adding a todo now and then; runs until Ctrl-C.
    #[arg(long)]
    pub web: bool,
    /// Where the page and its sync endpoint listen (with --web).
    #[arg(long, default_value = "127.0.0.1:7171")]
    pub listen: std::net::SocketAddr,
    /// The browser client's built files (with --web; `npm run build` in clients/web).
    #[arg(long, default_value = "clients/web/dist")]
    pub web_dist: std::path::PathBuf,
    /// How often the writer adds a todo in PostgreSQL (with --web).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub write_every: Duration,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let (url, _cluster) = match args.database_url {
        Some(url) => (url.expose_secret().to_owned(), None),
        None => {
            println!("starting a private PostgreSQL with wal_level=logical ...");
            let cluster = tokio::task::spawn_blocking(PrivateCluster::start).await??;
            println!("  PostgreSQL on 127.0.0.1:{}", cluster.port());
            (cluster.admin_url(), Some(cluster))
        }
    };
    if args.web {
        return web_demo::run(web_demo::WebDemo {
            url,
            listen: args.listen,
            dist: args.web_dist,
            write_every: args.write_every,
        })
        .await;
    }
    let db = pgrelay_pg::connect(&pgrelay_pg::ConnInfo::parse(&url)?)
        .await
        .context("connecting to PostgreSQL")?;
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {TABLE};
         CREATE TABLE {TABLE} (
             id bigint PRIMARY KEY, title text NOT NULL, done boolean NOT NULL DEFAULT false,
             tags text[], meta jsonb, amount numeric(12,2), due timestamptz, payload bytea);"
    ))
    .await?;

    let mut config = ServerConfig::new(url.clone());
    config.listen = "127.0.0.1:0".parse()?;
    config.slot = SLOT.to_owned();
    config.tables = TableFilter::Only(vec![TABLE.to_owned()]);
    let server = Server::start(config).await?;
    let ws = format!("ws://{}", server.local_addr());
    println!("pgrelay server listening on {ws}");

    let dir = tempfile::tempdir()?;
    let (stop, stopped) = watch::channel(false);
    let mut clients = Vec::new();
    for name in ["a", "b"] {
        let path = dir.path().join(format!("replica-{name}.sqlite"));
        let mut cfg = ClientConfig::new(ws.clone(), path.clone());
        cfg.client_id = Some(format!("demo-{name}"));
        let client = SyncClient::open(cfg).await?;
        let replica = client.replica().clone();
        let stopped = stopped.clone();
        let task = tokio::spawn(async move { client.run(stopped).await });
        println!("client {name}: replica {}", path.display());
        clients.push((name, path, replica, task));
    }

    let started = Instant::now();
    write(&db, args.rows, &clients).await?;
    println!(
        "writer done in {:.1?}; waiting for both replicas ...",
        started.elapsed()
    );

    let deadline = Instant::now() + Duration::from_secs(120);
    let mut all_ok = true;
    for (name, path, _, _) in &clients {
        let report = wait_for_match(&url, path, deadline).await?;
        println!("\nverify client {name}:\n{}", report.render_table());
        all_ok &= report.all_match();
    }
    let _ = stop.send(true);
    for (_, _, _, task) in clients {
        task.await??;
    }
    server.shutdown().await?;
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {TABLE}; DROP PUBLICATION IF EXISTS {SLOT}_pub;
         SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{SLOT}';"
    ))
    .await
    .context("cleaning up the demo's table, publication and slot")?;
    if all_ok {
        println!(
            "\nboth replicas equal PostgreSQL after {:.1?}",
            started.elapsed()
        );
        Ok(())
    } else {
        anyhow::bail!("a replica differs from PostgreSQL")
    }
}

type DemoClient = (
    &'static str,
    std::path::PathBuf,
    pgrelay_client::Replica,
    tokio::task::JoinHandle<Result<(), pgrelay_client::ClientError>>,
);

/// Inserts `rows` rows in transactions of 200, updating and deleting some
/// as it goes, and prints what each replica holds once a second.
async fn write(
    db: &tokio_postgres::Client,
    rows: u64,
    clients: &[DemoClient],
) -> anyhow::Result<()> {
    let mut last_print = Instant::now();
    let mut id = 0u64;
    while id < rows {
        let end = (id + 200).min(rows);
        let sql = format!(
            "BEGIN;
             INSERT INTO {TABLE} (id, title, tags, meta, amount, due, payload)
               SELECT g, 'todo #' || g, ARRAY['demo', 'n' || (g % 7)], jsonb_build_object('n', g, 'even', g % 2 = 0),
                      (g * 1.25)::numeric(12,2), now() + g * interval '1 minute', decode(lpad(to_hex(g), 8, '0'), 'hex')
               FROM generate_series({start}, {last}) g;
             UPDATE {TABLE} SET done = true, title = title || ' (done)' WHERE id BETWEEN {start} AND {last} AND id % 3 = 0;
             DELETE FROM {TABLE} WHERE id BETWEEN {start} AND {last} AND id % 10 = 0;
             COMMIT;",
            start = id + 1,
            last = end
        );
        db.batch_execute(&sql).await?;
        id = end;
        if last_print.elapsed() >= Duration::from_secs(1) || id == rows {
            last_print = Instant::now();
            let mut line = format!("written {id:>7} rows");
            for (name, _, replica, _) in clients {
                let status = replica.status().await?;
                let count = status
                    .tables
                    .iter()
                    .find(|t| t.table == TABLE)
                    .and_then(|t| t.rows)
                    .unwrap_or(0);
                line.push_str(&format!(
                    " | client {name}: {count:>7} rows at {}",
                    status.lsn.unwrap_or_else(|| "-".into())
                ));
            }
            println!("{line}");
        }
    }
    Ok(())
}

async fn wait_for_match(
    url: &str,
    replica: &Path,
    deadline: Instant,
) -> anyhow::Result<verify::VerifyReport> {
    loop {
        let report = verify::verify(url, replica, Some(&[TABLE.to_owned()])).await?;
        if report.all_match() || Instant::now() > deadline {
            return Ok(report);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
