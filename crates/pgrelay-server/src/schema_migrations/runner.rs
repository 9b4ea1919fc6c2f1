//! `pgrelay migrate up|down|status` against PostgreSQL: each migration in
//! one transaction together with its record in `pgrelay.app_migrations`
//! and its client part in `pgrelay.client_migrations` (with a NOTIFY that
//! tells running servers to send it to their clients). Runs take turns
//! through an advisory lock, and a migration whose files changed after it
//! was applied stops every run until it is put back.

use std::collections::BTreeMap;

use serde::Serialize;
use tokio_postgres::Client;

use super::folder::LocalMigration;
use super::{MigrateError, NOTIFY_CHANNEL};

/// The advisory lock held while migrating: "pgrelay2" as a number (the
/// server's own schema uses "pgrelay1").
const LOCK: i64 = 0x7067_7265_6c61_7932;

/// Where a migration stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Applied,
    Pending,
    /// Applied, but its files differ from what was applied.
    Changed,
    /// Applied, but its folder is gone.
    Missing,
}

/// One line of `pgrelay migrate status`.
#[derive(Clone, Debug, Serialize)]
pub struct MigrationStatus {
    pub version: i64,
    pub name: String,
    pub state: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<String>,
}

struct Recorded {
    name: String,
    checksum: String,
    applied_at: String,
}

async fn recorded(client: &Client) -> Result<BTreeMap<i64, Recorded>, MigrateError> {
    let rows = client
        .query(
            "SELECT version, name, checksum, to_char(applied_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
               FROM pgrelay.app_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(MigrateError::sql("reading pgrelay.app_migrations"))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                Recorded {
                    name: r.get(1),
                    checksum: r.get(2),
                    applied_at: r.get(3),
                },
            )
        })
        .collect())
}

/// Every migration, local or recorded, with its state, oldest first.
pub async fn status(
    client: &Client,
    local: &[LocalMigration],
) -> Result<Vec<MigrationStatus>, MigrateError> {
    let mut recorded = recorded(client).await?;
    let mut lines = Vec::new();
    for m in local {
        let (state, applied_at) = match recorded.remove(&m.version) {
            None => (State::Pending, None),
            Some(r) if r.checksum == m.checksum => (State::Applied, Some(r.applied_at)),
            Some(r) => (State::Changed, Some(r.applied_at)),
        };
        lines.push(MigrationStatus {
            version: m.version,
            name: m.name.clone(),
            state,
            applied_at,
        });
    }
    for (version, r) in recorded {
        lines.push(MigrationStatus {
            version,
            name: r.name,
            state: State::Missing,
            applied_at: Some(r.applied_at),
        });
    }
    lines.sort_by_key(|l| l.version);
    Ok(lines)
}

/// Refuses to go on while an applied migration was changed.
fn refuse_changed(lines: &[MigrationStatus]) -> Result<(), MigrateError> {
    match lines.iter().find(|l| l.state == State::Changed) {
        Some(l) => Err(MigrateError::Changed {
            version: l.version,
            name: l.name.clone(),
        }),
        None => Ok(()),
    }
}

/// Applies the pending migrations up to `to` (all without), oldest first;
/// returns those applied.
pub async fn up(
    client: &mut Client,
    local: &[LocalMigration],
    to: Option<i64>,
) -> Result<Vec<MigrationStatus>, MigrateError> {
    lock(client).await?;
    let outcome = up_locked(client, local, to).await;
    unlock(client).await;
    outcome
}

async fn up_locked(
    client: &mut Client,
    local: &[LocalMigration],
    to: Option<i64>,
) -> Result<Vec<MigrationStatus>, MigrateError> {
    let lines = status(client, local).await?;
    refuse_changed(&lines)?;
    let mut done = Vec::new();
    for m in local {
        let pending = lines
            .iter()
            .any(|l| l.version == m.version && l.state == State::Pending);
        if !pending || to.is_some_and(|to| m.version > to) {
            continue;
        }
        apply(client, m).await?;
        tracing::info!(version = m.version, name = %m.name, "migration applied");
        done.push(MigrationStatus {
            version: m.version,
            name: m.name.clone(),
            state: State::Applied,
            applied_at: None,
        });
    }
    Ok(done)
}

/// Which applied migrations `down` undoes.
#[derive(Clone, Copy, Debug)]
pub enum DownTo {
    /// The newest `n`.
    Steps(usize),
    /// Every one newer than this version.
    Version(i64),
}

/// Undoes applied migrations, newest first; returns those undone.
pub async fn down(
    client: &mut Client,
    local: &[LocalMigration],
    target: DownTo,
) -> Result<Vec<MigrationStatus>, MigrateError> {
    lock(client).await?;
    let outcome = down_locked(client, local, target).await;
    unlock(client).await;
    outcome
}

async fn down_locked(
    client: &mut Client,
    local: &[LocalMigration],
    target: DownTo,
) -> Result<Vec<MigrationStatus>, MigrateError> {
    let lines = status(client, local).await?;
    refuse_changed(&lines)?;
    let applied = lines
        .iter()
        .rev()
        .filter(|l| matches!(l.state, State::Applied | State::Missing));
    let chosen: Vec<&MigrationStatus> = match target {
        DownTo::Steps(n) => applied.take(n).collect(),
        DownTo::Version(v) => applied.filter(|l| l.version > v).collect(),
    };
    let mut done = Vec::new();
    for line in chosen {
        let m = local
            .iter()
            .find(|m| m.version == line.version)
            .ok_or_else(|| MigrateError::Missing {
                version: line.version,
                name: line.name.clone(),
            })?;
        revert(client, m).await?;
        tracing::info!(version = m.version, name = %m.name, "migration rolled back");
        done.push(MigrationStatus {
            version: m.version,
            name: m.name.clone(),
            state: State::Pending,
            applied_at: None,
        });
    }
    Ok(done)
}

/// Waits for the migration lock: a second run waits for the first, then
/// sees what it applied.
async fn lock(client: &Client) -> Result<(), MigrateError> {
    client
        .query_one("SELECT pg_advisory_lock($1)", &[&LOCK])
        .await
        .map_err(MigrateError::sql("waiting for the migration lock"))?;
    Ok(())
}

/// The lock is the session's: it also goes when the connection does.
async fn unlock(client: &Client) {
    if let Err(e) = client
        .query_one("SELECT pg_advisory_unlock($1)", &[&LOCK])
        .await
    {
        tracing::warn!(error = %e, "releasing the migration lock failed; it goes with the connection");
    }
}

/// One migration, its record and its client part, in one transaction.
async fn apply(client: &mut Client, m: &LocalMigration) -> Result<(), MigrateError> {
    let failed = |e: tokio_postgres::Error| MigrateError::Failed {
        version: m.version,
        name: m.name.clone(),
        message: super::describe(&e),
    };
    let tx = client.transaction().await.map_err(failed)?;
    tx.batch_execute(&m.up).await.map_err(failed)?;
    tx.execute(
        "INSERT INTO pgrelay.app_migrations (version, name, checksum) VALUES ($1, $2, $3)",
        &[&m.version, &m.name, &m.checksum],
    )
    .await
    .map_err(failed)?;
    if m.has_client_part() {
        let up = m.client_up.clone().unwrap_or_default();
        let down = m.client_down.clone().unwrap_or_default();
        tx.execute(
            "INSERT INTO pgrelay.client_migrations (version, name, up_sql, down_sql)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (version) DO UPDATE
               SET name = $2, up_sql = $3, down_sql = $4, stored_at = now(), rolled_back_at = NULL",
            &[&m.version, &m.name, &up, &down],
        )
        .await
        .map_err(failed)?;
        tx.batch_execute(&format!("NOTIFY {NOTIFY_CHANNEL}"))
            .await
            .map_err(failed)?;
    }
    tx.commit().await.map_err(failed)
}

/// Undoes one migration and its record; its client part is marked rolled
/// back, so replicas that ran it run its down part.
async fn revert(client: &mut Client, m: &LocalMigration) -> Result<(), MigrateError> {
    let failed = |e: tokio_postgres::Error| MigrateError::Failed {
        version: m.version,
        name: m.name.clone(),
        message: super::describe(&e),
    };
    let tx = client.transaction().await.map_err(failed)?;
    tx.batch_execute(&m.down).await.map_err(failed)?;
    tx.execute(
        "DELETE FROM pgrelay.app_migrations WHERE version = $1",
        &[&m.version],
    )
    .await
    .map_err(failed)?;
    let marked = tx
        .execute(
            "UPDATE pgrelay.client_migrations SET rolled_back_at = now(), down_sql = $2
              WHERE version = $1 AND rolled_back_at IS NULL",
            &[&m.version, &m.client_down.clone().unwrap_or_default()],
        )
        .await
        .map_err(failed)?;
    if marked > 0 {
        tx.batch_execute(&format!("NOTIFY {NOTIFY_CHANNEL}"))
            .await
            .map_err(failed)?;
    }
    tx.commit().await.map_err(failed)
}
