//! Client migrations in a session: what the replica is owed at the
//! welcome and whenever `pgrelay migrate` changes the catalog, and the
//! client's reports, recorded for the admin API.

use pgrelay_protocol::{ClientMigration, Direction, Lsn, ServerMessage};

use super::{internal, Refusal, Session};
use crate::hub::Frame;

impl Session<'_> {
    /// What a replica at client schema `version` must run; refuses one
    /// newer than this server serves with `upgrade_required`.
    pub(super) fn owed(&mut self, version: i64) -> Result<Vec<ClientMigration>, Refusal> {
        let catalog = self.state.client_catalog.borrow().clone();
        let owed = catalog.owed(version).map_err(Refusal::upgrade)?;
        self.schema = Some(version);
        Ok(owed)
    }

    /// Sends the migrations owed (nothing when none are).
    pub(super) async fn send_owed(&mut self, owed: Vec<ClientMigration>) -> Result<(), Refusal> {
        if owed.is_empty() {
            return Ok(());
        }
        let target = self.state.client_catalog.borrow().current();
        tracing::info!(from = ?self.schema, to = target, count = owed.len(), "sending client migrations");
        self.schema = Some(target);
        let message = ServerMessage::Migrations {
            schema_version: target,
            migrations: owed,
        };
        self.send(Frame::encode(&message, Lsn::ZERO)).await
    }

    /// `pgrelay migrate` ran: sends what the replica is owed now, from
    /// where the migrations already sent take it.
    pub(super) async fn catalog_changed(&mut self) -> Result<(), Refusal> {
        let Some(version) = self.schema else {
            return Ok(());
        };
        let owed = self.owed(version)?;
        self.send_owed(owed).await
    }

    /// Records the client's report. A failure stays with the client, which
    /// retries with backoff; each attempt is counted.
    pub(super) async fn migration_result(
        &mut self,
        version: i64,
        direction: Direction,
        error: Option<String>,
    ) -> Result<(), Refusal> {
        match &error {
            Some(e) => tracing::warn!(version, ?direction, error = %e, "client migration failed"),
            None => tracing::info!(version, ?direction, "client migration applied"),
        }
        let client = self.state.log_reader.client().await.map_err(internal)?;
        crate::schema_migrations::catalog::record(
            &client,
            &self.live.client_id,
            version,
            direction,
            error.as_deref(),
        )
        .await
        .map_err(internal)
    }
}
