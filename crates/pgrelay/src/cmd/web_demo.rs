//! `pgrelay demo --web`: a todo page that uses the browser client
//! (`@pgrelay/client`), served by the demo's pgrelay server next to its
//! sync endpoint, and a writer in this process that adds and ticks off a
//! todo now and then, so browser windows show each other's edits and
//! PostgreSQL's, live. Runs until Ctrl-C, then drops what it created.
//!
//! The package's built files (`clients/web/dist`) are read from disk: they
//! come from `npm run build`, not from cargo. The few lines that serve
//! them are written here because a static-file crate would be a new
//! dependency for three files.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use pgrelay_pg::TableFilter;
use pgrelay_server::{Server, ServerConfig};
use tokio::sync::watch;

const TABLE: &str = "public.pgrelay_web_todos";
const SLOT: &str = "pgrelay_web_demo";
const PAGE: &str = include_str!("../../../../clients/web/demo/index.html");
/// What the page loads from the package's `dist/`.
const DIST_FILES: &[&str] = &["index.js", "worker.js", "sqlite3.wasm"];

/// Where and how the web demo runs.
pub struct WebDemo {
    pub url: String,
    pub listen: SocketAddr,
    pub dist: PathBuf,
    pub write_every: Duration,
}

pub async fn run(demo: WebDemo) -> anyhow::Result<()> {
    for file in DIST_FILES {
        if !demo.dist.join(file).is_file() {
            anyhow::bail!(
                "{} has no {file}: build the web client first (cd clients/web && npm ci && npm run build), or pass --web-dist",
                demo.dist.display()
            );
        }
    }
    let db = pgrelay_pg::connect(&pgrelay_pg::ConnInfo::parse(&demo.url)?)
        .await
        .context("connecting to PostgreSQL")?;
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {TABLE};
         CREATE TABLE {TABLE} (id bigint PRIMARY KEY, title text NOT NULL,
                               done boolean NOT NULL DEFAULT false, author text NOT NULL DEFAULT 'PostgreSQL');
         INSERT INTO {TABLE} (id, title) VALUES (1, 'Open this page in a second window'),
                                                (2, 'Tick a todo in one, watch the other'),
                                                (3, 'Switch a window offline, edit, switch back');"
    ))
    .await?;

    let mut config = ServerConfig::new(demo.url.clone());
    config.listen = demo.listen;
    config.slot = SLOT.to_owned();
    config.tables = TableFilter::Only(vec![TABLE.to_owned()]);
    let routes = axum::Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/dist/{file}", get(dist_file))
        .with_state(demo.dist.clone());
    let (shutdown, _) = watch::channel(false);
    let server = Server::start_with(config, shutdown, routes).await?;
    let addr = server.local_addr();
    println!("pgrelay demo --web: open http://{addr}/ in two browser windows");
    println!("  (http://{addr}/?replica=b gives a window a replica of its own)");
    println!(
        "  a writer adds a todo in PostgreSQL every {:?}; Ctrl-C stops",
        demo.write_every
    );

    let ended = write_until_stopped(&db, demo.write_every).await;
    server.shutdown().await?;
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {TABLE}; DROP PUBLICATION IF EXISTS {SLOT}_pub;
         SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{SLOT}';"
    ))
    .await
    .context("cleaning up the demo's table, publication and slot")?;
    ended
}

/// Adds a todo every `every` (and now and then ticks off an older one), until a signal.
async fn write_until_stopped(db: &tokio_postgres::Client, every: Duration) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let mut n = 0u64;
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tick.tick() => {
                n += 1;
                // Every third time, the oldest of its own open todos is ticked off.
                let tick_off = if n.is_multiple_of(3) {
                    format!(
                        "UPDATE {TABLE} SET done = true WHERE id = (
                             SELECT min(id) FROM {TABLE} WHERE author = 'PostgreSQL' AND NOT done AND id > 3);"
                    )
                } else {
                    String::new()
                };
                db.batch_execute(&format!(
                    "INSERT INTO {TABLE} (id, title) VALUES ({id}, 'Written in PostgreSQL (#{n})'); {tick_off}",
                    id = 1_000_000 + n
                ))
                .await
                .context("the demo's writer")?;
            }
        }
    }
}

async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// One of the package's built files; nothing else under `dist`.
async fn dist_file(State(dist): State<PathBuf>, UrlPath(file): UrlPath<String>) -> Response {
    let kind = match Path::new(&file).extension().and_then(|e| e.to_str()) {
        Some("js") => "text/javascript",
        Some("wasm") => "application/wasm",
        Some("map") => "application/json",
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let plain = file
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !plain || file.starts_with('.') {
        return StatusCode::NOT_FOUND.into_response();
    }
    match tokio::fs::read(dist.join(&file)).await {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, kind),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}
