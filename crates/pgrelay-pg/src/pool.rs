//! The pool of ordinary connections the server shares between its parts
//! (writes, change-log reads, audit, monitoring), built on deadpool and
//! opened the same way as [`crate::connect`].

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod, Runtime, Timeouts};

use crate::connect::{open, ConnInfo};
use crate::PgError;

/// A connection borrowed from the [`Pool`]; it goes back when dropped.
/// `Deref`s to [`tokio_postgres::Client`]; `prepare_cached` keeps a
/// statement per connection. [`PooledClient::take`] keeps it out of the
/// pool (for a connection that may be mid-transaction after a fault).
pub type PooledClient = deadpool_postgres::Object;

/// How long a borrower waits for a connection to open before the attempt
/// is reported as a failure (PostgreSQL restarting, unreachable).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Ordinary connections to one database, opened on demand up to a bound
/// and kept for the next borrower.
#[derive(Clone)]
pub struct Pool {
    pool: deadpool_postgres::Pool,
    info: ConnInfo,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("info", &self.info)
            .field("status", &self.pool.status())
            .finish()
    }
}

impl Pool {
    /// A pool of at most `max_size` connections to `info`'s database. No
    /// connection is opened until one is borrowed.
    pub fn new(info: &ConnInfo, max_size: usize) -> Result<Pool, PgError> {
        let manager = Manager::from_connect(
            info.config().clone(),
            Opener(info.tls().connector.clone()),
            ManagerConfig {
                // A borrowed connection is checked for being open, with no
                // round trip: the hot path (writes) borrows per batch.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(max_size)
            .runtime(Runtime::Tokio1)
            .timeouts(Timeouts {
                wait: None,
                create: Some(CONNECT_TIMEOUT),
                recycle: None,
            })
            .build()
            .map_err(|e| PgError::Pool(e.to_string()))?;
        Ok(Pool {
            pool,
            info: info.clone(),
        })
    }

    /// An idle connection, or a new one if none is idle; waits while
    /// `max_size` are borrowed.
    pub async fn get(&self) -> Result<PooledClient, PgError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(source) => self.info.connect_failed(source),
            other => PgError::Pool(format!(
                "connecting to {}:{}/{}: {other}",
                self.info.host, self.info.port, self.info.database
            )),
        })
    }

    /// Where the pool connects.
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }
}

/// What opening one of the pool's connections gives: the client and the
/// task driving its connection.
type Opening<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<
                    (tokio_postgres::Client, tokio::task::JoinHandle<()>),
                    tokio_postgres::Error,
                >,
            > + Send
            + 'a,
    >,
>;

/// Opens the pool's connections through [`open`], with the URL's TLS.
struct Opener(crate::tls::Connector);

impl deadpool_postgres::Connect for Opener {
    fn connect(&self, pg_config: &tokio_postgres::Config) -> Opening<'_> {
        let config = pg_config.clone();
        Box::pin(async move { open(&config, &self.0).await })
    }
}
