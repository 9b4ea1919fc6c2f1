//! Fixtures for the integration tests: a fresh database per test, an
//! in-process or child-process server, clients, and waiting on conditions.

#![allow(dead_code, unreachable_pub)]

pub mod proxy;
pub mod raw;
pub mod tcp_proxy;
pub mod tls;

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgrelay_client::{ClientConfig, ClientError, Replica, SyncClient};
use pgrelay_server::{Server, ServerConfig};
use pgrelay_testkit::TestDatabase;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const BIN: &str = env!("CARGO_BIN_EXE_pgrelay");

/// Sends the server's and client's logs to the test's captured output, so a
/// failing test shows what happened (level from `RUST_LOG`, default info).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `check` until it returns `Some`, failing the test with `what` at
/// the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One test's world: its own database (with slot and publication named
/// after it) and a scratch directory for replicas.
pub struct World {
    pub db: TestDatabase,
    pub sql: tokio_postgres::Client,
    pub dir: tempfile::TempDir,
}

impl World {
    pub async fn new() -> World {
        init_tracing();
        let db = TestDatabase::create()
            .await
            .expect("creating a test database");
        World::with(db).await
    }

    /// A world on another PostgreSQL (e.g. a private cluster with special
    /// settings), given its admin URL.
    pub async fn on(admin_url: &str) -> World {
        init_tracing();
        let db = TestDatabase::create_on(admin_url)
            .await
            .expect("creating a test database");
        World::with(db).await
    }

    async fn with(db: TestDatabase) -> World {
        let sql = db.connect().await.expect("connecting to the test database");
        let dir = tempfile::tempdir().expect("temp dir");
        World { db, sql, dir }
    }

    pub fn slot(&self) -> String {
        self.db.name().to_owned()
    }

    pub fn url(&self) -> &str {
        self.db.url()
    }

    pub fn server_config(&self) -> ServerConfig {
        let mut config = ServerConfig::new(self.db.url());
        config.listen = "127.0.0.1:0".parse().expect("address");
        config.slot = self.slot();
        config.status_interval = Duration::from_millis(200);
        config
    }

    pub async fn start_server(&self) -> Server {
        Server::start(self.server_config())
            .await
            .expect("starting the server")
    }

    pub fn replica_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sqlite"))
    }

    pub async fn exec(&self, sql: &str) {
        self.sql
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.sql
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// Waits until the replica equals PostgreSQL for every synced table.
    pub async fn wait_equal(&self, replica: &Path, timeout: Duration) {
        let url = self.db.url().to_owned();
        let mut last;
        let deadline = Instant::now() + timeout;
        loop {
            match pgrelay::cmd::verify::verify(&url, replica, None).await {
                Ok(report) if report.all_match() && !report.tables.is_empty() => return,
                Ok(report) => last = report.render_table(),
                Err(e) => last = format!("{e:#}"),
            }
            assert!(
                Instant::now() < deadline,
                "replica {} never equalled PostgreSQL:\n{last}",
                replica.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A client syncing in this process.
pub struct RunningClient {
    pub replica: Replica,
    pub stop: watch::Sender<bool>,
    pub task: JoinHandle<Result<(), ClientError>>,
    pub client: std::sync::Arc<SyncClient>,
}

pub async fn start_client(server: SocketAddr, db: &Path, id: &str) -> RunningClient {
    run_client(open_client(server, db, id).await)
}

pub async fn open_client(server: SocketAddr, db: &Path, id: &str) -> std::sync::Arc<SyncClient> {
    let mut config = ClientConfig::new(format!("ws://{server}"), db);
    config.client_id = Some(id.to_owned());
    config.backoff_base = Duration::from_millis(50);
    config.backoff_cap = Duration::from_millis(500);
    std::sync::Arc::new(SyncClient::open(config).await.expect("opening the client"))
}

/// What a client went through, counted from its events.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Full snapshots loaded (a new or reset replica).
    pub hydrations: usize,
    /// Times the server answered `gone`.
    pub gone: usize,
    pub caught_up: usize,
    /// Repairs instead of full snapshots (`docs/repair.md`).
    pub repairs: usize,
}

/// A client whose events are counted from before its first connection.
pub async fn start_counted_client(
    server: SocketAddr,
    db: &Path,
    id: &str,
) -> (RunningClient, std::sync::Arc<std::sync::Mutex<Tally>>) {
    let client = open_client(server, db, id).await;
    let tally = std::sync::Arc::new(std::sync::Mutex::new(Tally::default()));
    let mut events = client.subscribe();
    let sink = std::sync::Arc::clone(&tally);
    tokio::spawn(async move {
        use pgrelay_client::Event;
        while let Ok(event) = events.recv().await {
            let mut tally = sink.lock().unwrap();
            match event {
                Event::Hydrated { full: true, .. } => tally.hydrations += 1,
                Event::CaughtUp { .. } => tally.caught_up += 1,
                Event::Repaired { .. } => tally.repairs += 1,
                // Counted however the client took it (reset, or a retry).
                Event::Disconnected { error, .. }
                    if error.starts_with("gone") || error.starts_with("server refused: Gone") =>
                {
                    tally.gone += 1
                }
                _ => {}
            }
        }
    });
    (run_client(client), tally)
}

pub fn run_client(client: std::sync::Arc<SyncClient>) -> RunningClient {
    let replica = client.replica().clone();
    let (stop, stopped) = watch::channel(false);
    let runner = std::sync::Arc::clone(&client);
    let task = tokio::spawn(async move { runner.run(stopped).await });
    RunningClient {
        replica,
        stop,
        task,
        client,
    }
}

impl RunningClient {
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let result = self.task.await.expect("client task");
        result.expect("client ended with an error");
    }
}

/// A free TCP port on 127.0.0.1 (so a restarted server can reuse it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `pgrelay serve` as a child process, so it can be killed with SIGKILL.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl ServerProcess {
    pub fn spawn(url: &str, slot: &str, port: u16) -> ServerProcess {
        ServerProcess::spawn_with(url, slot, port, &[])
    }

    /// `pgrelay serve` with more flags.
    pub fn spawn_with(url: &str, slot: &str, port: u16, flags: &[&str]) -> ServerProcess {
        let mut child = Command::new(BIN)
            .args([
                "serve",
                "--database-url",
                url,
                "--slot",
                slot,
                "--status-interval",
                "200ms",
            ])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(flags)
            .env("PGRELAY_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning pgrelay serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading the server's first line");
        let addr = line
            .trim()
            .strip_prefix("pgrelay listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from the server: {line:?}"))
            .parse()
            .expect("address");
        ServerProcess { child, addr }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL on Unix
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `pgrelay client sync` as a child process.
pub fn spawn_client(server: SocketAddr, db: &Path, id: &str, exit_when_caught_up: bool) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "client",
        "sync",
        "--server",
        &format!("ws://{server}"),
        "--client-id",
        id,
    ])
    .arg("--db")
    .arg(db)
    .env("PGRELAY_LOG", "warn")
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    if exit_when_caught_up {
        cmd.arg("--exit-when-caught-up");
    }
    cmd.spawn().expect("spawning pgrelay client sync")
}

/// The replica's LSN read straight from its SQLite file (works while
/// another process writes it).
pub fn replica_lsn(db: &Path) -> Option<pgrelay_protocol::Lsn> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    let text: String = conn
        .query_row(
            "SELECT value FROM _pgrelay_meta WHERE key = 'lsn'",
            [],
            |r| r.get(0),
        )
        .ok()?;
    text.parse().ok()
}

/// A count read straight from a replica's SQLite file (works while another
/// process writes it); `None` while the file or the table is not there.
pub fn replica_count(db: &Path, sql: &str) -> Option<i64> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.query_row(sql, [], |r| r.get::<_, i64>(0)).ok()
}

/// Waits until the replica's `table` holds `rows` rows.
pub async fn wait_replica_rows(db: &Path, table: &str, rows: i64, timeout: Duration) {
    let sql = format!("SELECT count(*) FROM {table}");
    wait_for(
        &format!("{rows} rows in the replica's {table}"),
        timeout,
        || async { (replica_count(db, &sql) == Some(rows)).then_some(()) },
    )
    .await;
}
