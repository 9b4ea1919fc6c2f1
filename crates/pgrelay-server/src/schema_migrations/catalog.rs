//! The client migrations a running server hands out: loaded from
//! `pgrelay.client_migrations` at start and again on every NOTIFY a
//! `pgrelay migrate` run sends, published to sessions through a watch
//! channel; and what each client reported about them.

use std::sync::Arc;
use std::time::Duration;

use pgrelay_pg::ConnInfo;
use pgrelay_protocol::{ClientMigration, Direction, UpgradeRequired};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{Client, NoTls};

use super::NOTIFY_CHANNEL;
use crate::ServerError;

#[derive(Clone, Debug)]
struct Stored {
    version: i64,
    name: String,
    up: String,
    down: String,
    rolled_back: bool,
}

/// The client migrations stored, oldest first.
#[derive(Clone, Debug, Default)]
pub(crate) struct Catalog {
    migrations: Vec<Stored>,
}

impl Catalog {
    pub(crate) async fn load(client: &Client) -> Result<Catalog, ServerError> {
        let rows = client
            .query(
                "SELECT version, name, up_sql, down_sql, rolled_back_at IS NOT NULL
                   FROM pgrelay.client_migrations ORDER BY version",
                &[],
            )
            .await
            .map_err(ServerError::sql("reading pgrelay.client_migrations"))?;
        Ok(Catalog {
            migrations: rows
                .iter()
                .map(|r| Stored {
                    version: r.get(0),
                    name: r.get(1),
                    up: r.get(2),
                    down: r.get(3),
                    rolled_back: r.get(4),
                })
                .collect(),
        })
    }

    /// Every stored migration: version, name, whether it was rolled back.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (i64, &str, bool)> {
        self.migrations
            .iter()
            .map(|m| (m.version, m.name.as_str(), m.rolled_back))
    }

    /// The schema version replicas are brought to: the newest client
    /// migration not rolled back (0 for none).
    pub(crate) fn current(&self) -> i64 {
        self.migrations
            .iter()
            .filter(|m| !m.rolled_back)
            .map(|m| m.version)
            .max()
            .unwrap_or(0)
    }

    /// What a replica at `client` must run to reach [`Catalog::current`]:
    /// the newer migrations up, or (after a rollback) its rolled-back ones
    /// down, newest first. A version this server never stored is newer
    /// than anything it can serve: `upgrade_required`.
    pub(crate) fn owed(&self, client: i64) -> Result<Vec<ClientMigration>, UpgradeRequired> {
        let current = self.current();
        let known = client == 0 || self.migrations.iter().any(|m| m.version == client);
        if client > current && !known {
            return Err(UpgradeRequired {
                what: "schema".to_owned(),
                client,
                server_min: 0,
                server_max: current,
            });
        }
        let message = |m: &Stored, direction| ClientMigration {
            version: m.version,
            name: m.name.clone(),
            direction,
            sql: match direction {
                Direction::Up => m.up.clone(),
                Direction::Down => m.down.clone(),
            },
        };
        Ok(if client > current {
            self.migrations
                .iter()
                .rev()
                .filter(|m| m.version > current && m.version <= client)
                .map(|m| message(m, Direction::Down))
                .collect()
        } else {
            self.migrations
                .iter()
                .filter(|m| !m.rolled_back && m.version > client)
                .map(|m| message(m, Direction::Up))
                .collect()
        })
    }
}

/// Follows `pgrelay migrate` runs (`LISTEN`), reloading the catalog after
/// each and after every reconnect, when a notification may have been
/// missed. Ends on shutdown.
pub(crate) async fn follow(
    info: ConnInfo,
    catalog: watch::Sender<Arc<Catalog>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    loop {
        if let Err(e) = follow_once(&info, &catalog, &mut shutdown).await {
            tracing::warn!(error = %e, "following client migrations failed; retrying");
        }
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn follow_once(
    info: &ConnInfo,
    catalog: &watch::Sender<Arc<Catalog>>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), ServerError> {
    let (client, mut connection) = info
        .config()
        .connect(NoTls)
        .await
        .map_err(ServerError::sql("connecting to follow client migrations"))?;
    let (tx, mut notified) = mpsc::channel::<()>(1);
    // Drives the connection and turns notifications into wake-ups (one
    // pending is enough: a reload reads everything).
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = futures_util::StreamExt::next(&mut messages).await {
            if let tokio_postgres::AsyncMessage::Notification(_) = message {
                let _ = tx.try_send(());
            }
        }
    });
    let result = async {
        client
            .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
            .await
            .map_err(ServerError::sql("LISTEN for client migrations"))?;
        loop {
            let loaded = Catalog::load(&client).await?;
            tracing::debug!(version = loaded.current(), "client migrations loaded");
            catalog.send_replace(Arc::new(loaded));
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
                woken = notified.recv() => if woken.is_none() {
                    return Err(ServerError::Migration("the LISTEN connection closed".to_owned()));
                },
            }
        }
    }
    .await;
    drop(client);
    driver.abort();
    result
}

/// Records a client's report on a migration.
pub(crate) async fn record(
    client: &Client,
    client_id: &str,
    version: i64,
    direction: Direction,
    error: Option<&str>,
) -> Result<(), ServerError> {
    let direction_text = match direction {
        Direction::Up => "up",
        Direction::Down => "down",
    };
    let state = match (direction, error) {
        (_, Some(_)) => "failed",
        (Direction::Up, None) => "applied",
        (Direction::Down, None) => "rolled_back",
    };
    let error: Option<String> = error.map(|e| e.chars().take(2000).collect());
    client
        .execute(
            "INSERT INTO pgrelay.client_migration_status AS s
                 (client_id, version, direction, state, error)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (client_id, version) DO UPDATE
               SET direction = $3, state = $4, error = $5, updated_at = now(),
                   attempts = CASE WHEN s.direction = $3 THEN s.attempts + 1 ELSE 1 END",
            &[&client_id, &version, &direction_text, &state, &error],
        )
        .await
        .map_err(ServerError::sql("recording a client's migration report"))?;
    Ok(())
}

/// One client's last report on one migration.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ClientReport {
    pub(crate) client_id: String,
    pub(crate) version: i64,
    pub(crate) direction: String,
    /// `applied`, `rolled_back` or `failed`.
    pub(crate) state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    pub(crate) attempts: i32,
    pub(crate) updated_at: String,
}

pub(crate) async fn reports(client: &Client) -> Result<Vec<ClientReport>, ServerError> {
    let rows = client
        .query(
            "SELECT client_id, version, direction, state, error, attempts,
                    to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
               FROM pgrelay.client_migration_status ORDER BY client_id, version",
            &[],
        )
        .await
        .map_err(ServerError::sql("reading pgrelay.client_migration_status"))?;
    Ok(rows
        .iter()
        .map(|r| ClientReport {
            client_id: r.get(0),
            version: r.get(1),
            direction: r.get(2),
            state: r.get(3),
            error: r.get(4),
            attempts: r.get(5),
            updated_at: r.get(6),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(version: i64, rolled_back: bool) -> Stored {
        Stored {
            version,
            name: format!("m{version}"),
            up: format!("up {version}"),
            down: format!("down {version}"),
            rolled_back,
        }
    }

    #[test]
    fn a_replica_is_owed_newer_ups_rolled_back_downs_and_refused_when_too_new() {
        let catalog = Catalog {
            migrations: vec![stored(1, false), stored(2, false), stored(3, true)],
        };
        assert_eq!(catalog.current(), 2);
        let versions = |owed: Vec<ClientMigration>| {
            owed.iter()
                .map(|m| (m.version, m.direction))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            versions(catalog.owed(0).unwrap()),
            vec![(1, Direction::Up), (2, Direction::Up)]
        );
        assert!(catalog.owed(2).unwrap().is_empty());
        assert_eq!(
            versions(catalog.owed(3).unwrap()),
            vec![(3, Direction::Down)]
        );
        let refused = catalog.owed(9).unwrap_err();
        assert_eq!((refused.client, refused.server_max), (9, 2));
    }
}
