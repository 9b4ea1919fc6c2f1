//! What every request handler and session shares.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pgrelay_pg::ConnInfo;
use tokio::sync::Semaphore;

use crate::api::ratelimit::IpLimiter;
use crate::auth::{Audit, Auth};
use crate::history::reader::LogReader;
use crate::hub::Hub;
use crate::ops::metrics::Metrics;
use crate::registry::Registry;
use crate::replication::lag::LagMonitor;
use crate::replication::status::ReplicationStatus;
use crate::session::table::SessionTable;
use crate::writes::Writer;
use crate::ServerConfig;

pub(crate) struct AppState {
    /// The client migrations replicas are brought to (`pgrelay migrate`).
    pub(crate) client_catalog:
        tokio::sync::watch::Sender<Arc<crate::schema_migrations::catalog::Catalog>>,
    pub(crate) config: ServerConfig,
    pub(crate) hub: Arc<Hub>,
    pub(crate) log_reader: LogReader,
    pub(crate) replication: Arc<ReplicationStatus>,
    pub(crate) writer: Arc<Writer>,
    /// Set with `--auth`.
    pub(crate) auth: Option<Auth>,
    pub(crate) audit: Audit,
    /// Which token subject owns which client id (under `--auth`).
    pub(crate) owners: crate::auth::owners::Owners,
    /// Where snapshots for hydrating clients are read.
    pub(crate) database: ConnInfo,
    /// One permit per snapshot that may run at once.
    pub(crate) hydrations: Arc<Semaphore>,
    /// Sessions waiting for a permit.
    pub(crate) hydrations_queued: AtomicUsize,
    /// Hydrations sending snapshots now; background table reads give
    /// way to them.
    pub(crate) hydrating: Arc<crate::snapshot::Hydrating>,
    /// The sessions live on this node, by client id.
    pub(crate) sessions: Arc<SessionTable>,
    pub(crate) registry: Arc<dyn Registry>,
    /// This node's name in the registry.
    pub(crate) node: String,
    /// This run of this node: names its sessions in the registry.
    pub(crate) instance: String,
    pub(crate) metrics: Metrics,
    /// The repair digests kept of each table (`repair::kept`).
    pub(crate) kept: Arc<crate::repair::KeptDigests>,
    pub(crate) lag: Arc<LagMonitor>,
    pub(crate) connect_limiter: IpLimiter,
    /// `POST /api/changes` requests per address, at the connect rate.
    pub(crate) write_limiter: IpLimiter,
}

impl AppState {
    pub(crate) fn hydrations_waiting(&self) -> usize {
        self.hydrations_queued.load(Ordering::Relaxed)
    }
}
