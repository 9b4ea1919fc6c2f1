//! The invariant, sampled in every replica while faults happen: read
//! straight from the SQLite file (plain SQL, one read transaction), the
//! accounts of a replica that holds a position must sum to the constant;
//! any other sum is a transaction applied in part. States in the middle of
//! a snapshot or a repair (which the replica marks) are not judged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::workload::{ACCOUNTS, TOTAL};

#[derive(Debug, Default, Clone)]
pub(crate) struct Samples {
    /// Replica states judged.
    pub(crate) judged: u64,
    /// States mid-snapshot, mid-repair, or without a position yet.
    pub(crate) skipped: u64,
    /// States breaking the invariant (the first few, described).
    pub(crate) torn: Vec<String>,
    pub(crate) torn_count: u64,
}

enum State {
    Judged { rows: i64, sum: i64, lsn: String },
    Skipped,
}

/// Samples each replica every `every` until `stop`.
pub(crate) async fn sample(
    replicas: Vec<PathBuf>,
    every: Duration,
    samples: Arc<Mutex<Samples>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let paths = replicas.clone();
        let states = tokio::task::spawn_blocking(move || {
            paths
                .iter()
                .map(|p| (p.clone(), read_state(p)))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        {
            let mut s = samples.lock().unwrap_or_else(|e| e.into_inner());
            for (path, state) in states {
                match state {
                    Some(State::Judged { rows, sum, lsn }) => {
                        s.judged += 1;
                        if rows != ACCOUNTS || sum != TOTAL {
                            s.torn_count += 1;
                            if s.torn.len() < 10 {
                                s.torn.push(format!(
                                    "{}: {rows} accounts summing to {sum} (expected {ACCOUNTS} summing to {TOTAL}) at {lsn}",
                                    path.display()
                                ));
                            }
                        }
                    }
                    Some(State::Skipped) | None => s.skipped += 1,
                }
            }
        }
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// One consistent read of a replica (`None` when it cannot be read now,
/// e.g. the file is being created).
fn read_state(path: &Path) -> Option<State> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.busy_timeout(Duration::from_millis(500)).ok()?;
    conn.execute_batch("BEGIN").ok()?;
    let state = judge(&conn);
    let _ = conn.execute_batch("COMMIT");
    state
}

/// The replica's state, read inside the caller's read transaction.
fn judge(conn: &rusqlite::Connection) -> Option<State> {
    let meta = |key: &str| {
        conn.query_row(
            "SELECT value FROM _pgrelay_meta WHERE key = ?1",
            [key],
            |r| r.get::<_, String>(0),
        )
        .ok()
    };
    let lsn = meta("lsn");
    let hydrating = meta("hydrate").is_some();
    let repairing = meta("log_id").is_some_and(|l| l.contains("repair"));
    let (rows, sum): (i64, i64) = conn
        .query_row(
            "SELECT count(*), coalesce(sum(balance), 0) FROM chaos_accounts",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .ok()?;
    Some(match lsn {
        Some(lsn) if !hydrating && !repairing => State::Judged { rows, sum, lsn },
        _ => State::Skipped,
    })
}
