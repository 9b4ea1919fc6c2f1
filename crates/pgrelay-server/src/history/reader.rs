//! A shared connection for reading the change log on behalf of sessions
//! that catch up. tokio-postgres pipelines concurrent queries on one
//! connection, borrowed from the server's pool and borrowed anew after
//! PostgreSQL restarts.

use std::sync::Arc;

use pgrelay_pg::{Pool, PooledClient};
use tokio::sync::Mutex;

use crate::ServerError;

pub(crate) struct LogReader {
    pool: Pool,
    client: Mutex<Option<Arc<PooledClient>>>,
}

impl LogReader {
    pub(crate) fn new(pool: Pool) -> LogReader {
        LogReader {
            pool,
            client: Mutex::new(None),
        }
    }

    pub(crate) async fn client(&self) -> Result<Arc<PooledClient>, ServerError> {
        let mut guard = self.client.lock().await;
        if let Some(client) = guard.as_ref().filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(client));
        }
        let client = Arc::new(self.pool.get().await?);
        *guard = Some(Arc::clone(&client));
        Ok(client)
    }
}
