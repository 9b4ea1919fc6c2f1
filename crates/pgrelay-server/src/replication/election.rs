//! Which node captures a slot, decided by PostgreSQL itself: the node that
//! holds a session-level advisory lock (keyed by the slot's name) on a
//! dedicated connection captures; the others follow the change log.
//!
//! The lock alone cannot stop a capturer that lost it without knowing (a
//! network cut that later heals), so each new capturer also increments a
//! term in `pgrelay.capture`, and every append to the change log checks
//! its term in its own transaction ([`crate::history::append`]): a stale
//! capturer can never append, and stands down when refused.
//!
//! ```text
//! follower ──try lock (every --capture-retry)──▶ lock held by a silent node (no renewal
//!    ▲                                            for --capture-lease)? end its session
//!    │ stand down                                 │ got it
//!    │ (refused append, renewal failed)           ▼
//! capturer ◀── end the old capturer's sessions and walsender, term + 1 (row lock:
//!              waits for an append in flight), then stream from the slot; renew
//!              the term every --capture-retry
//! ```

use std::sync::Arc;
use std::time::Duration;

use pgrelay_pg::ConnInfo;
use pgrelay_protocol::Lsn;
use tokio_postgres::types::PgLsn;
use tokio_postgres::Client;

use crate::history::{Fence, NOTIFY_CHANNEL};
use crate::replication::status::ReplicationStatus;
use crate::{ServerConfig, ServerError};

/// First key of the two-part advisory lock: the bytes of "pgrc"; the
/// second is `hashtext(slot)`.
const LOCK_CLASS: i32 = 0x7067_7263;

/// The `application_name` of the capturer's own sessions (change-log
/// writer, slot preparation), so the next capturer can end them.
pub(crate) fn capture_application(slot: &str) -> String {
    let name = format!("pgrelay-capture {slot}");
    // PostgreSQL keeps 63 bytes of it.
    name.chars().take(60).collect()
}

/// A term this node holds: the lock's connection and the term's number.
pub(crate) struct Term {
    pub(crate) fence: Fence,
    lock: Client,
}

impl Term {
    /// Renews the term (and publishes how far the log is captured, waking
    /// followers when it moved). `Ok(false)`: the term is over.
    pub(crate) async fn renew(&self, captured: Lsn, moved: bool) -> Result<bool, ServerError> {
        let row = self
            .lock
            .query_opt(
                "WITH renewed AS (UPDATE pgrelay.capture
                     SET renewed_at = now(), captured = greatest(captured, $3)
                   WHERE slot = $1 AND term = $2 RETURNING captured)
                 SELECT 1, CASE WHEN $4 THEN pg_notify($5, captured::text)::text END FROM renewed",
                &[
                    &self.fence.slot,
                    &self.fence.term,
                    &PgLsn::from(captured.0),
                    &moved,
                    &NOTIFY_CHANNEL,
                ],
            )
            .await
            .map_err(ServerError::sql("renewing the capture term"))?;
        Ok(row.is_some())
    }
}

/// Tries for the capture and takes it over.
pub(crate) struct Election {
    info: ConnInfo,
    slot: String,
    holder: String,
    fingerprint: String,
    pub(crate) retry: Duration,
    pub(crate) lease: Duration,
    status: Arc<ReplicationStatus>,
    /// Kept between attempts.
    lock: Option<Client>,
}

impl Election {
    pub(crate) fn new(
        info: &ConnInfo,
        config: &ServerConfig,
        holder: String,
        status: Arc<ReplicationStatus>,
    ) -> Election {
        Election {
            info: info.with_application_name("pgrelay-election"),
            slot: config.slot.clone(),
            holder,
            fingerprint: fingerprint(config),
            retry: config.capture_retry,
            lease: config.capture_lease,
            status,
            lock: None,
        }
    }

    /// One attempt: `Some` when this node now captures. A holder that has
    /// not renewed its term for the lease has its session ended, so the
    /// next attempt can win.
    pub(crate) async fn attempt(&mut self) -> Result<Option<Term>, ServerError> {
        let lock = match self.lock.take() {
            Some(lock) if !lock.is_closed() => lock,
            _ => pgrelay_pg::connect(&self.info).await?,
        };
        let won: bool = lock
            .query_one(
                "SELECT pg_try_advisory_lock($1, hashtext($2))",
                &[&LOCK_CLASS, &self.slot],
            )
            .await
            .map_err(ServerError::sql("trying the capture lock"))?
            .get(0);
        if won {
            return self.take_over(lock).await.map(Some);
        }
        let holder = holder(&lock, &self.slot).await?;
        if let Some(h) = &holder {
            if h.silent_for > self.lease.as_secs_f64() {
                tracing::warn!(slot = %self.slot, holder = %h.name, silent_s = h.silent_for, "the capturing node stopped renewing its term; ending its lock session");
                lock.execute("SELECT pg_terminate_backend($1)", &[&h.pid])
                    .await
                    .map_err(ServerError::sql("ending a silent capturer's session"))?;
            }
        }
        self.status.set_holder(
            holder.map(|h| h.name),
            crate::replication::status::Role::Following,
        );
        self.lock = Some(lock);
        Ok(None)
    }

    /// Refuses to start next to a live capturer that syncs something else
    /// (other tables, rules or conflict columns) from the same slot.
    pub(crate) async fn check_agreement(&self, db: &Client) -> Result<(), ServerError> {
        let Some(h) = holder(db, &self.slot).await? else {
            return Ok(());
        };
        if h.fingerprint != self.fingerprint {
            return Err(ServerError::Config(format!(
                "node {:?} captures slot {:?} with other --tables, rules or --conflict settings \
                 than this node ({} there, {} here); every node on one slot must sync the same \
                 tables with the same rules",
                h.name, self.slot, h.fingerprint, self.fingerprint
            )));
        }
        Ok(())
    }

    /// Ends what is left of earlier capturers (their change-log sessions,
    /// the slot's walsender) and starts a new term. An append in flight
    /// holds the term's row: the increment waits for it, so whatever it
    /// commits is in the log the new term reads.
    async fn take_over(&mut self, lock: Client) -> Result<Term, ServerError> {
        let ended = end_capture_sessions(&lock, &self.slot).await?;
        lock.batch_execute("SET lock_timeout = '10s'")
            .await
            .map_err(ServerError::sql("setting the lock timeout"))?;
        let term: i64 = lock
            .query_one(
                "INSERT INTO pgrelay.capture AS c (slot, term, holder, fingerprint)
                 VALUES ($1, 1, $2, $3)
                 ON CONFLICT (slot) DO UPDATE SET term = c.term + 1, holder = $2,
                   fingerprint = $3, started_at = now(), renewed_at = now()
                 RETURNING term",
                &[&self.slot, &self.holder, &self.fingerprint],
            )
            .await
            .map_err(ServerError::sql("starting a capture term"))?
            .get(0);
        tracing::info!(slot = %self.slot, term, ended, holder = %self.holder, "capturing: this node holds the slot");
        self.status.set_holder(
            Some(self.holder.clone()),
            crate::replication::status::Role::Capturing,
        );
        self.status.set_term(term);
        Ok(Term {
            fence: Fence {
                slot: self.slot.clone(),
                term,
            },
            lock,
        })
    }
}

/// Ends the sessions of earlier capturers of `slot` in this database
/// (and the slot's walsender); waits until the slot is free. Returns how
/// many sessions it ended.
pub(crate) async fn end_capture_sessions(db: &Client, slot: &str) -> Result<u64, ServerError> {
    let sessions: i64 = db
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = $1
                AND pid <> pg_backend_pid()",
            &[&capture_application(slot)],
        )
        .await
        .map_err(ServerError::sql("ending earlier capturers' sessions"))?
        .get(0);
    let mut walsenders = 0;
    for _ in 0..100 {
        let active: Option<i32> = db
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(ServerError::sql("reading the slot's walsender"))?
            .and_then(|r| r.get(0));
        let Some(pid) = active else { break };
        if walsenders == 0 {
            tracing::info!(
                slot,
                pid,
                "the slot is still streamed by an earlier capturer; ending its walsender"
            );
        }
        walsenders += 1;
        db.execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .map_err(ServerError::sql("ending an earlier capturer's walsender"))?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(u64::try_from(sessions).unwrap_or(0) + u64::from(walsenders > 0))
}

/// The node holding the capture lock of a slot, as the term row names it.
struct Holder {
    pid: i32,
    name: String,
    fingerprint: String,
    silent_for: f64,
}

async fn holder(db: &Client, slot: &str) -> Result<Option<Holder>, ServerError> {
    let row = db
        .query_opt(
            "SELECT l.pid, c.holder, c.fingerprint,
                    extract(epoch FROM clock_timestamp() - c.renewed_at)::float8
               FROM pg_locks l JOIN pgrelay.capture c ON c.slot = $2
              WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND l.classid = ($1::int4)::oid AND l.objid = (hashtext($2))::oid",
            &[&LOCK_CLASS, &slot],
        )
        .await
        .map_err(ServerError::sql("reading who captures the slot"))?;
    Ok(row.map(|r| Holder {
        pid: r.get(0),
        name: r.get(1),
        fingerprint: r.get(2),
        silent_for: r.get(3),
    }))
}

/// What a node syncs from its slot, as a short hash: nodes capturing one
/// slot must agree on it.
fn fingerprint(config: &ServerConfig) -> String {
    let rules = config
        .auth
        .as_ref()
        .and_then(|a| a.rules.as_deref())
        .unwrap_or("");
    let text = format!(
        "tables={:?}\nconflicts={:?}\nrules={rules}",
        config.tables, config.conflicts
    );
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_with_other_tables_or_rules_have_other_fingerprints() {
        let a = ServerConfig::new("postgres://x@y/z");
        let mut b = a.clone();
        b.tables = pgrelay_pg::TableFilter::Only(vec!["public.todos".into()]);
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
        let mut c = a.clone();
        c.conflicts = vec![("todos".into(), "version".into())];
        assert_ne!(fingerprint(&a), fingerprint(&c));
    }

    #[test]
    fn the_capture_application_name_fits_postgres() {
        assert!(capture_application(&"s".repeat(200)).len() <= 63);
    }
}
