//! Under `--auth`, a client id belongs to the first token subject (the
//! `--client-id-claim`, `sub` by default) that uses it: recorded in
//! `pgrelay.client_owners` so every node and every restart agrees, and a
//! session or write under an id owned by another subject is refused.
//! Tokens without the claim own nothing and may use only unowned ids.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pgrelay_pg::ConnInfo;

use super::AuthError;

/// Ids known to this node, by owner; claims never move, so a cached one
/// stays true.
pub(crate) struct Owners {
    info: ConnInfo,
    known: Mutex<HashMap<String, String>>,
    db: tokio::sync::Mutex<Option<Arc<tokio_postgres::Client>>>,
}

/// Whether `subject` may use a client id.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    Allowed,
    /// Owned by another subject.
    Taken,
}

impl Owners {
    pub(crate) fn new(info: ConnInfo) -> Owners {
        Owners {
            info,
            known: Mutex::new(HashMap::new()),
            db: tokio::sync::Mutex::new(None),
        }
    }

    /// Claims `client_id` for `subject` when no one owns it; `Taken` when
    /// another subject does. Without a subject nothing is claimed.
    pub(crate) async fn claim(
        &self,
        client_id: &str,
        subject: Option<&str>,
    ) -> Result<Claim, AuthError> {
        let cached = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(client_id)
            .cloned();
        let owner = match cached {
            Some(owner) => Some(owner),
            None => self.record(client_id, subject).await?,
        };
        Ok(match (owner, subject) {
            (None, _) => Claim::Allowed,
            (Some(owner), Some(subject)) if owner == subject => Claim::Allowed,
            (Some(_), _) => Claim::Taken,
        })
    }

    /// Inserts the claim (when there is a subject) and reads the owner.
    async fn record(
        &self,
        client_id: &str,
        subject: Option<&str>,
    ) -> Result<Option<String>, AuthError> {
        let db = self.connection().await?;
        let row = db
            .query_opt(
                "WITH claimed AS (
                     INSERT INTO pgrelay.client_owners (client_id, subject)
                     SELECT $1::text, $2::text WHERE $2::text IS NOT NULL
                     ON CONFLICT (client_id) DO NOTHING
                     RETURNING subject)
                 SELECT subject FROM claimed
                 UNION ALL
                 SELECT subject FROM pgrelay.client_owners WHERE client_id = $1::text
                 LIMIT 1",
                &[&client_id, &subject],
            )
            .await;
        let row = match row {
            Ok(row) => row,
            Err(e) => {
                // A lost connection is made again next time.
                *self.db.lock().await = None;
                return Err(AuthError::sql("recording a client id's owner")(e));
            }
        };
        let owner: Option<String> = row.map(|r| r.get(0));
        if let Some(owner) = &owner {
            self.known
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(client_id.to_owned(), owner.clone());
        }
        Ok(owner)
    }

    async fn connection(&self) -> Result<Arc<tokio_postgres::Client>, AuthError> {
        let mut db = self.db.lock().await;
        if let Some(client) = db.as_ref().filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(client));
        }
        let client = Arc::new(pgrelay_pg::connect(&self.info).await?);
        *db = Some(Arc::clone(&client));
        Ok(client)
    }
}
