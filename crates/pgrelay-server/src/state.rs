//! What every request handler and session shares.

use std::sync::Arc;

use crate::auth::{Audit, Auth};
use crate::hub::Hub;
use crate::reader::LogReader;
use crate::status::ReplicationStatus;
use crate::writes::Writer;
use crate::ServerConfig;

pub(crate) struct AppState {
    pub(crate) config: ServerConfig,
    pub(crate) hub: Arc<Hub>,
    pub(crate) log_reader: LogReader,
    pub(crate) replication: Arc<ReplicationStatus>,
    pub(crate) writer: Arc<Writer>,
    /// Set with `--auth`.
    pub(crate) auth: Option<Auth>,
    pub(crate) audit: Audit,
}
