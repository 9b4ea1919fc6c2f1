//! Start-up of the row sync: checks PostgreSQL, sets up pgrelay's schema,
//! the publication and the slot, then starts the long-running tasks
//! (replication, table watch, retention, lag, registry refresh, audit) and
//! builds the routes over the shared state.

use std::net::SocketAddr;
use std::sync::Arc;

use pgrelay_pg::ConnInfo;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::api::ratelimit;
use crate::history::{reader, retention};
use crate::hub::Hub;
use crate::ops::metrics;
use crate::replication::election::Election;
use crate::replication::status::ReplicationStatus;
use crate::replication::{self, lag, table_watch, Replication};
use crate::state::AppState;
use crate::{api, auth, history, migrations, registry, session, writes, ServerConfig, ServerError};

/// Connections the pool opens at most: the writer's concurrent batches,
/// the change-log reader and the four background tasks (audit, lag, table
/// watch, retention), with room to spare so none of them waits on another.
const POOL_SIZE: usize = writes::MAX_CONCURRENT_BATCHES + 8;

/// What the row sync adds to the server: its routes, hub, replication
/// status and shared state.
type RowSync = (
    axum::Router,
    Arc<Hub>,
    Arc<ReplicationStatus>,
    Option<Arc<AppState>>,
);

/// The row sync: checks PostgreSQL, sets up schema, publication and slot,
/// and starts replication, client registry and monitoring; returns its
/// routes.
pub(crate) async fn start_row_sync(
    config: ServerConfig,
    database_url: &str,
    addr: SocketAddr,
    sessions: &Arc<session::table::SessionTable>,
    tasks: &mut JoinSet<Result<(), ServerError>>,
    shutdown_rx: &watch::Receiver<bool>,
) -> Result<RowSync, ServerError> {
    let info = ConnInfo::parse(database_url)?;
    let mut db = pgrelay_pg::connect(&info).await?;
    pgrelay_pg::check_wal_level(&db).await?;
    // What `pgrelay doctor` would say, in the log; nothing here stops the
    // start (what must stop it is checked where it matters).
    match crate::ops::doctor::run_checks(&db, &config).await {
        Ok(report) => crate::ops::doctor::log(&report),
        Err(e) => tracing::warn!(error = %e, "start-up checks could not run"),
    }
    migrations::migrate(&mut db).await?;
    let node = config
        .node
        .clone()
        .unwrap_or_else(|| registry::default_node(addr.port()));
    let instance = format!("{node}#{:08x}", rand::random::<u32>());
    let status = Arc::new(ReplicationStatus::new());
    // Several nodes may serve one slot: the one that wins the election
    // captures, the others follow the change log it writes.
    let mut election = Election::new(&info, &config, instance.clone(), Arc::clone(&status));
    let term = election.attempt().await?;
    if term.is_none() {
        election.check_agreement(&db).await?;
    }
    let mut tables = pgrelay_pg::discover_tables(&db, &config.tables).await?;
    if matches!(config.tables, pgrelay_pg::TableFilter::AllPublic) {
        replication::unpublished::keep_out(&db, &mut tables).await?;
    }
    replication::unpublished::gone_while_stopped(&db, &mut tables).await?;
    history::version_schemas(&db, &mut tables).await?;
    for table in tables.iter().filter(|t| t.skipped.is_some()) {
        tracing::warn!(table = %table.name, reason = table.skipped.as_deref().unwrap_or(""), "table skipped");
    }
    let synced: Vec<String> = tables
        .iter()
        .filter(|t| t.skipped.is_none())
        .map(|t| t.name.clone())
        .collect();
    pgrelay_pg::ensure_publication(&db, &config.publication(), &synced).await?;
    // The slot is ready before start returns, so every change committed
    // from here on is captured; a slot lost while pgrelay was stopped
    // starts a new change-log epoch here.
    let created = match &term {
        Some(_) => {
            replication::prepare_slot(&mut db, &config.slot, &status)
                .await?
                .created
        }
        None => {
            tracing::info!(slot = %config.slot, capturer = status.role().1.as_deref().unwrap_or("?"), "another node captures this slot; following its change log");
            false
        }
    };
    let head = history::head(&db).await?;
    let auth = match &config.auth {
        Some(auth_config) => {
            let auth = auth::Auth::new(auth_config, &tables).map_err(ServerError::Config)?;
            full_identity(&db, &auth.rules().need_full_identity(&tables)).await?;
            Some(auth)
        }
        None => None,
    };
    let (log_id, pruned_through) = history::log_state(&db).await?;
    let catalog = crate::schema_migrations::catalog::Catalog::load(&db).await?;
    drop(db);
    let versions = version_columns(&config.conflicts, &tables)?;
    tracing::info!(tables = synced.len(), slot = %config.slot, created, head = %head, pruned_through = %pruned_through, log_id = %log_id, "pgrelay ready");

    let (registry, signals) = registry::open(&config, sessions, &node, &instance)
        .map_err(|e| ServerError::Config(e.to_string()))?;
    if let Some(listener) = signals {
        tasks.spawn(listener.run(shutdown_rx.clone()));
    }
    let filtering = config.auth.as_ref().is_some_and(|a| a.rules.is_some());
    let hub = Arc::new(Hub::new(
        config.live_buffer,
        head,
        tables,
        filtering,
        &log_id,
    ));

    let replication = Replication {
        info: info.clone(),
        config: config.clone(),
        hub: Arc::clone(&hub),
        status: Arc::clone(&status),
        election,
        term,
    };
    tasks.spawn(replication.run(shutdown_rx.clone()));

    // Connections the parts borrow: the writer's batches, the change-log
    // reader, audit and the monitoring tasks (replication and snapshots
    // keep connections of their own).
    let pool = pgrelay_pg::Pool::new(&info, POOL_SIZE)?;
    let writer = Arc::new(writes::Writer::new(pool.clone(), versions));
    tasks.spawn(prune_applied(
        Arc::clone(&writer),
        config.applied_retention,
        shutdown_rx.clone(),
    ));
    tasks.spawn(table_watch::run(
        pool.clone(),
        config.clone(),
        Arc::clone(&hub),
        shutdown_rx.clone(),
    ));
    tasks.spawn(part(retention::prune_log(
        pool.clone(),
        config.retain,
        shutdown_rx.clone(),
    )));
    let lag = Arc::new(lag::LagMonitor::new(config.stall_after));
    tasks.spawn(Arc::clone(&lag).run(pool.clone(), config.clone(), shutdown_rx.clone()));
    tasks.spawn(registry::refresh_live(
        Arc::clone(&registry),
        Arc::clone(sessions),
        node.clone(),
        instance.clone(),
        config.clone(),
        shutdown_rx.clone(),
    ));
    let (audit, audit_writer) = auth::Audit::start(pool.clone(), shutdown_rx.clone());
    tasks.spawn(part(audit_writer));
    tasks.spawn(part(auth::audit::prune(
        pool.clone(),
        config.audit_retention,
        shutdown_rx.clone(),
    )));
    let kept = Arc::new(crate::repair::KeptDigests::default());
    let hydrating = Arc::new(crate::snapshot::Hydrating::default());
    if config.kept_digests {
        tasks.spawn(crate::repair::keep_digests(
            Arc::clone(&kept),
            Arc::clone(&hub),
            Arc::clone(&hydrating),
            info.clone(),
            pool.clone(),
            shutdown_rx.clone(),
        ));
    }
    let (client_catalog, _) = watch::channel(Arc::new(catalog));
    tasks.spawn(crate::schema_migrations::catalog::follow(
        info.clone(),
        client_catalog.clone(),
        shutdown_rx.clone(),
    ));
    let state = Arc::new(AppState {
        client_catalog,
        auth,
        audit,
        owners: auth::owners::Owners::new(info.clone()),
        hydrations: Arc::new(tokio::sync::Semaphore::new(config.max_hydrations)),
        hydrations_queued: Default::default(),
        hydrating,
        database: info.clone(),
        connect_limiter: ratelimit::IpLimiter::new(config.connect_rate, config.connect_burst),
        write_limiter: ratelimit::IpLimiter::new(config.connect_rate, config.connect_burst),
        config,
        hub: Arc::clone(&hub),
        log_reader: reader::LogReader::new(pool),
        replication: Arc::clone(&status),
        writer,
        sessions: Arc::clone(sessions),
        registry,
        node,
        instance,
        metrics: metrics::Metrics::default(),
        kept,
        lag,
    });
    let app = api::router(Arc::clone(&state), shutdown_rx.clone());
    Ok((app, hub, status, Some(state)))
}

/// Resolves `--conflict` entries against the synced tables: qualified table
/// name → version column.
fn version_columns(
    conflicts: &[(String, String)],
    tables: &[pgrelay_protocol::TableSchema],
) -> Result<std::collections::BTreeMap<String, String>, ServerError> {
    let mut versions = std::collections::BTreeMap::new();
    for (table, column) in conflicts {
        let qualified = if table.contains('.') {
            table.clone()
        } else {
            format!("public.{table}")
        };
        let schema = tables
            .iter()
            .find(|t| t.name == qualified && t.skipped.is_none())
            .ok_or_else(|| {
                ServerError::Config(format!(
                    "--conflict {table}={column}: {qualified} is not a synced table"
                ))
            })?;
        if schema.column(column).is_none() {
            return Err(ServerError::Config(format!(
                "--conflict {table}={column}: {qualified} has no column {column:?}"
            )));
        }
        versions.insert(qualified, column.clone());
    }
    Ok(versions)
}

/// Sets REPLICA IDENTITY FULL on tables whose read rule looks at columns
/// outside the key: only then do updates and deletes carry the old row, and
/// a row that leaves a client's scope can be sent to it as a delete.
async fn full_identity(db: &tokio_postgres::Client, tables: &[String]) -> Result<(), ServerError> {
    for table in tables {
        if pgrelay_pg::has_full_identity(db, table).await? {
            continue;
        }
        let quoted = writes::quote_table(table);
        db.batch_execute(&format!("ALTER TABLE {quoted} REPLICA IDENTITY FULL"))
            .await
            .map_err(|source| {
                ServerError::Config(format!(
                    "{table}: its read rule looks at columns outside the primary key, so updates must carry the old row; \
                     setting REPLICA IDENTITY FULL failed ({source}); run ALTER TABLE {quoted} REPLICA IDENTITY FULL as its owner"
                ))
            })?;
        tracing::info!(table = %table, "set REPLICA IDENTITY FULL: its read rule looks at columns outside the key");
    }
    Ok(())
}

/// Forgets applied change ids older than the retention, now and hourly.
/// A part's task, its error seen as the server's.
async fn part<E: Into<ServerError>>(
    task: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), ServerError> {
    task.await.map_err(Into::into)
}

async fn prune_applied(
    writer: Arc<writes::Writer>,
    retention: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    let period = std::time::Duration::from_secs(3600).min(retention);
    loop {
        match writer.prune(retention).await {
            Ok(0) => {}
            Ok(deleted) => {
                tracing::info!(deleted, "forgot applied change ids past their retention")
            }
            // PostgreSQL may be restarting; the next round will do it.
            Err(e) => tracing::warn!(error = %e, "pruning applied change ids failed"),
        }
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            _ = tokio::time::sleep(period) => {}
        }
    }
}
