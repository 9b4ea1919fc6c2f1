//! The shared conformance suite, Rust runner: every scenario of
//! `conformance/scenarios.json` run against the Rust client (in this
//! process) and a real `pgrelay serve` (a child process, so it can be
//! killed with SIGKILL). The web client runs the same file in Chromium
//! (`clients/web/test/browser/conformance.test.mjs`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::support::proxy::{Meddle, Proxy};
use crate::support::raw::http;
use crate::support::{
    free_port, open_client, run_client, wait_for, RunningClient, ServerProcess, World,
};

const SCENARIOS: &str = include_str!("../../../../conformance/scenarios.json");
const WAIT: Duration = Duration::from_secs(60);
const CLIENT_ID: &str = "conformance";

#[derive(Deserialize)]
struct Suite {
    scenarios: Vec<Scenario>,
}

#[derive(Deserialize)]
struct Scenario {
    name: String,
    setup: String,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
#[serde(tag = "do", rename_all = "snake_case", deny_unknown_fields)]
enum Step {
    Connect {
        #[serde(default)]
        drop_schema: bool,
    },
    Disconnect,
    Pg {
        sql: String,
    },
    Local {
        sql: Vec<String>,
        #[serde(default)]
        repeat: Option<u32>,
    },
    Replica {
        sql: String,
    },
    KillServer,
    StartServer,
    WaitCaughtUp,
    WaitEqual {
        query: String,
    },
    WaitPg {
        query: String,
        equals: String,
    },
    WaitReplica {
        query: String,
        equals: String,
    },
    ExpectPg {
        query: String,
        equals: String,
    },
    ExpectReplica {
        query: String,
        equals: String,
    },
    WaitServerTable {
        table: String,
    },
    WaitError {
        code: String,
        table: String,
    },
    ExpectSchemaDropped,
    WaitRepaired {
        max_rows_received: u64,
    },
}

fn suite() -> Suite {
    serde_json::from_str(SCENARIOS).expect("conformance/scenarios.json")
}

/// Rows as text: PostgreSQL's text output, SQLite's values printed alike.
type Rows = Vec<Vec<Option<String>>>;

struct Run {
    world: World,
    port: u16,
    server: Option<ServerProcess>,
    proxy: Option<Proxy>,
    client: Option<RunningClient>,
    /// Every `SchemaUnsupported` event of the scenario's clients: (code, table).
    errors: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
    /// Full snapshots and repairs the scenario's clients reported.
    seen: std::sync::Arc<std::sync::Mutex<Seen>>,
}

#[derive(Default)]
struct Seen {
    full_hydrations: u32,
    /// Rows received and tables fetched again, per repair.
    repairs: Vec<(u64, Vec<String>)>,
}

impl Run {
    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn start_server(&mut self) {
        self.server = Some(ServerProcess::spawn(
            self.world.url(),
            &self.world.slot(),
            self.port,
        ));
    }

    fn replica(&self) -> std::path::PathBuf {
        self.world.replica_path(CLIENT_ID)
    }

    async fn pg_rows(&self, sql: &str) -> Result<Rows, String> {
        let messages = self
            .world
            .sql
            .simple_query(sql)
            .await
            .map_err(|e| format!("{sql}: {e}"))?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_owned))
                        .collect(),
                ),
                _ => None,
            })
            .collect())
    }

    async fn step(&mut self, scenario: &str, n: usize, step: &Step) {
        match step {
            Step::Connect { drop_schema } => {
                let target = if *drop_schema {
                    let proxy = Proxy::start(self.addr(), Meddle::DropSchema).await;
                    let addr = proxy.addr;
                    self.proxy = Some(proxy);
                    addr
                } else {
                    self.proxy.as_ref().map_or(self.addr(), |p| p.addr)
                };
                let client = open_client(target, &self.replica(), CLIENT_ID).await;
                // Subscribed before the first connection: no event is missed.
                let mut events = client.subscribe();
                let errors = self.errors.clone();
                let seen = self.seen.clone();
                tokio::spawn(async move {
                    use tokio::sync::broadcast::error::RecvError;
                    loop {
                        match events.recv().await {
                            Ok(pgrelay_client::Event::SchemaUnsupported { table, .. }) => errors
                                .lock()
                                .unwrap()
                                .push(("schema_unsupported".to_owned(), table)),
                            Ok(pgrelay_client::Event::Hydrated { full: true, .. }) => {
                                seen.lock().unwrap().full_hydrations += 1;
                            }
                            Ok(pgrelay_client::Event::Repaired {
                                rows_received,
                                refetch,
                                ..
                            }) => seen.lock().unwrap().repairs.push((rows_received, refetch)),
                            Ok(_) | Err(RecvError::Lagged(_)) => {}
                            Err(RecvError::Closed) => break,
                        }
                    }
                });
                self.client = Some(run_client(client));
            }
            Step::Disconnect => {
                if let Some(client) = self.client.take() {
                    client.stop().await;
                }
            }
            Step::Pg { sql } => self.world.exec(sql).await,
            Step::Local { sql, repeat } => {
                let replica = match &self.client {
                    Some(c) => c.replica.clone(),
                    None => offline_replica(&self.replica()),
                };
                for i in 1..=repeat.unwrap_or(1) {
                    let batch = sql
                        .iter()
                        .map(|s| s.replace("{i}", &i.to_string()))
                        .collect::<Vec<_>>()
                        .join(";\n");
                    replica
                        .execute(batch)
                        .await
                        .unwrap_or_else(|e| panic!("{scenario} step {n}: local write: {e}"));
                }
            }
            Step::Replica { sql } => {
                let conn = rusqlite::Connection::open(self.replica()).expect("replica");
                conn.busy_timeout(Duration::from_secs(5))
                    .expect("busy timeout");
                conn.execute_batch(sql).expect("replica SQL");
            }
            Step::KillServer => {
                if let Some(mut server) = self.server.take() {
                    server.kill9();
                }
            }
            Step::StartServer => self.start_server(),
            Step::WaitCaughtUp => {
                let path = self.replica();
                wait_for("the client to hold a position", WAIT, || async {
                    crate::support::replica_lsn(&path).map(|_| ())
                })
                .await;
            }
            Step::WaitEqual { query } => {
                let deadline = Instant::now() + WAIT;
                loop {
                    let pg = self.pg_rows(query).await;
                    let replica = replica_rows(&self.replica(), query);
                    match (&pg, &replica) {
                        (Ok(a), Ok(b)) if a == b => break,
                        _ => {}
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{scenario} step {n}: the replica never equalled PostgreSQL for {query}\n\
                         PostgreSQL: {}\nreplica: {}",
                        summary(&pg),
                        summary(&replica)
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Step::WaitPg { query, equals } | Step::ExpectPg { query, equals } => {
                let wait = matches!(step, Step::WaitPg { .. });
                let deadline = Instant::now() + if wait { WAIT } else { Duration::ZERO };
                loop {
                    let got = self.pg_rows(query).await.map(scalar);
                    if got
                        .as_ref()
                        .is_ok_and(|v| v.as_deref() == Some(equals.as_str()))
                    {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{scenario} step {n}: PostgreSQL {query} gave {got:?}, want {equals}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Step::WaitReplica { query, equals } | Step::ExpectReplica { query, equals } => {
                let wait = matches!(step, Step::WaitReplica { .. });
                let deadline = Instant::now() + if wait { WAIT } else { Duration::ZERO };
                loop {
                    let got = replica_rows(&self.replica(), query).map(scalar);
                    if got
                        .as_ref()
                        .is_ok_and(|v| v.as_deref() == Some(equals.as_str()))
                    {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{scenario} step {n}: replica {query} gave {got:?}, want {equals}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Step::WaitServerTable { table } => {
                let addr = self.addr();
                wait_for("the server to sync the table", WAIT, || async {
                    let (_, body) = http(addr, None, "GET", "/api/status").await;
                    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
                    status["tables"]
                        .as_array()?
                        .iter()
                        .any(|t| t["name"] == table.as_str() && t["skipped"].is_null())
                        .then_some(())
                })
                .await;
            }
            Step::WaitError { code, table } => {
                let errors = self.errors.clone();
                let want = (code.clone(), table.clone());
                wait_for("the client to report the error", WAIT, || {
                    let found = errors.lock().unwrap().contains(&want);
                    async move { found.then_some(()) }
                })
                .await;
            }
            Step::WaitRepaired { max_rows_received } => {
                let seen = self.seen.clone();
                wait_for("the client to report a repair", WAIT, || {
                    let repaired = !seen.lock().unwrap().repairs.is_empty();
                    async move { repaired.then_some(()) }
                })
                .await;
                let seen = self.seen.lock().unwrap();
                assert_eq!(
                    seen.full_hydrations, 1,
                    "{scenario} step {n}: the replica was downloaded whole again"
                );
                let (received, refetch) = &seen.repairs[0];
                assert!(
                    received <= max_rows_received && refetch.is_empty(),
                    "{scenario} step {n}: the repair received {received} rows, fetched {refetch:?} again"
                );
            }
            Step::ExpectSchemaDropped => {
                let dropped = self
                    .proxy
                    .as_ref()
                    .map_or(0, |p| p.dropped.load(std::sync::atomic::Ordering::SeqCst));
                assert!(
                    dropped > 0,
                    "{scenario} step {n}: no schema frame was dropped"
                );
            }
        }
    }
}

/// The replica opened without syncing, for writes made while offline.
fn offline_replica(path: &Path) -> pgrelay_client::Replica {
    pgrelay_client::Replica::open(path).expect("opening the replica")
}

fn replica_rows(path: &Path, sql: &str) -> Result<Rows, String> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| e.to_string())?;
    let mut stmt = conn.prepare(sql).map_err(|e| e.to_string())?;
    let columns = stmt.column_count();
    let rows = stmt
        .query_map([], |r| {
            (0..columns)
                .map(|i| {
                    Ok(match r.get_ref(i)? {
                        rusqlite::types::ValueRef::Null => None,
                        rusqlite::types::ValueRef::Integer(v) => Some(v.to_string()),
                        rusqlite::types::ValueRef::Real(v) => Some(v.to_string()),
                        rusqlite::types::ValueRef::Text(t) => {
                            Some(String::from_utf8_lossy(t).into_owned())
                        }
                        rusqlite::types::ValueRef::Blob(b) => Some(format!("{b:?}")),
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    Ok(rows)
}

fn scalar(rows: Rows) -> Option<String> {
    rows.into_iter().next()?.into_iter().next()?
}

fn summary(rows: &Result<Rows, String>) -> String {
    match rows {
        Ok(rows) => format!(
            "{} rows, first {:?}",
            rows.len(),
            rows.iter().take(3).collect::<Vec<_>>()
        ),
        Err(e) => e.clone(),
    }
}

async fn run(name: &str) {
    let suite = suite();
    let scenario = suite
        .scenarios
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no scenario {name} in conformance/scenarios.json"));
    let world = World::new().await;
    world.exec(&scenario.setup).await;
    let mut run = Run {
        world,
        port: free_port(),
        server: None,
        proxy: None,
        client: None,
        errors: Default::default(),
        seen: Default::default(),
    };
    run.start_server();
    for (n, step) in scenario.steps.iter().enumerate() {
        run.step(name, n, step).await;
    }
    if let Some(client) = run.client.take() {
        client.stop().await;
    }
    drop(run.server.take());
    run.world.db.drop_database().await.unwrap();
}

/// One test per scenario; this list and the file must name the same ones.
const NAMES: &[&str] = &[
    "hydrate",
    "live_changes",
    "local_write_round_trip",
    "offline_write_then_reconnect",
    "server_restart_resume",
    "idempotent_resend",
    "unknown_table_arriving",
    "transaction_atomicity",
    "table_the_replica_cannot_hold",
    "change_log_reset_repairs",
];

#[test]
fn every_scenario_has_a_test() {
    let names: Vec<String> = suite().scenarios.into_iter().map(|s| s.name).collect();
    assert_eq!(names, NAMES);
}

macro_rules! scenarios {
    ($($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                run(stringify!($name)).await;
            }
        )*
    };
}

scenarios!(
    hydrate,
    live_changes,
    local_write_round_trip,
    offline_write_then_reconnect,
    server_restart_resume,
    idempotent_resend,
    unknown_table_arriving,
    transaction_atomicity,
    table_the_replica_cannot_hold,
    change_log_reset_repairs
);
