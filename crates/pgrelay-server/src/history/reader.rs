//! A shared connection for reading the change log on behalf of sessions
//! that catch up. tokio-postgres pipelines concurrent queries on one
//! connection; it is reopened after PostgreSQL restarts.

use std::sync::Arc;

use pgrelay_pg::ConnInfo;
use tokio::sync::Mutex;

use crate::ServerError;

pub(crate) struct LogReader {
    info: ConnInfo,
    client: Mutex<Option<Arc<tokio_postgres::Client>>>,
}

impl LogReader {
    pub(crate) fn new(info: ConnInfo) -> LogReader {
        LogReader {
            info,
            client: Mutex::new(None),
        }
    }

    pub(crate) async fn client(&self) -> Result<Arc<tokio_postgres::Client>, ServerError> {
        let mut guard = self.client.lock().await;
        if let Some(client) = guard.as_ref().filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(client));
        }
        let client = Arc::new(pgrelay_pg::connect(&self.info).await?);
        *guard = Some(Arc::clone(&client));
        Ok(client)
    }
}
