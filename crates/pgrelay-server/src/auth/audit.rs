//! The audit trail: security-relevant actions (connects, refusals, expired
//! tokens, rejected writes, admin actions) with client id, subject and time,
//! to the `pgrelay::audit` tracing target at once and to the table
//! `pgrelay.audit_log` in batches, where entries older than
//! `--audit-retention` are deleted hourly. Tokens and secrets are never
//! recorded.

use std::time::{Duration, SystemTime};

use pgrelay_pg::Pool;
use tokio::sync::{mpsc, watch};

use super::AuthError;

/// Entries waiting for the table at most; past that they only go to the
/// log target (the table is best effort, the trace is not).
const QUEUE: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Connect,
    Refused,
    TokenExpired,
    WriteRejected,
    Admin,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Connect => "connect",
            Action::Refused => "refused",
            Action::TokenExpired => "token_expired",
            Action::WriteRejected => "write_rejected",
            Action::Admin => "admin",
        }
    }
}

#[derive(Debug)]
struct Entry {
    at: SystemTime,
    action: Action,
    client_id: Option<String>,
    subject: Option<String>,
    detail: String,
}

/// Where audit entries go. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Audit {
    queue: mpsc::Sender<Entry>,
}

impl Audit {
    /// Starts the writer; it ends, after writing what is queued, once every
    /// `Audit` is dropped or shutdown is set.
    pub(crate) fn start(
        pool: Pool,
        shutdown: watch::Receiver<bool>,
    ) -> (
        Audit,
        impl std::future::Future<Output = Result<(), AuthError>>,
    ) {
        let (queue, entries) = mpsc::channel(QUEUE);
        (Audit { queue }, write_loop(pool, entries, shutdown))
    }

    /// Records an action. Never blocks.
    pub fn record(
        &self,
        action: Action,
        client_id: Option<&str>,
        subject: Option<&str>,
        detail: impl Into<String>,
    ) {
        let detail = detail.into();
        tracing::info!(
            target: "pgrelay::audit",
            action = action.as_str(),
            client_id = client_id.unwrap_or(""),
            subject = subject.unwrap_or(""),
            %detail,
            "audit"
        );
        let entry = Entry {
            at: SystemTime::now(),
            action,
            client_id: client_id.map(str::to_owned),
            subject: subject.map(str::to_owned),
            detail,
        };
        if self.queue.try_send(entry).is_err() {
            tracing::warn!(target: "pgrelay::audit", "audit queue full; entry kept in the log only");
        }
    }
}

async fn write_loop(
    pool: Pool,
    mut entries: mpsc::Receiver<Entry>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), AuthError> {
    let mut stopping = false;
    loop {
        let mut batch = Vec::new();
        if stopping {
            // Write what is already queued, then stop.
            while let Ok(entry) = entries.try_recv() {
                batch.push(entry);
            }
            if batch.is_empty() {
                return Ok(());
            }
        } else {
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => {
                    stopping = true;
                    continue;
                }
                received = entries.recv_many(&mut batch, 256) => {
                    if received == 0 {
                        return Ok(());
                    }
                }
            }
        }
        if let Err(e) = write(&pool, &batch).await {
            // PostgreSQL may be restarting: the entries are in the trace.
            tracing::warn!(target: "pgrelay::audit", error = %e, entries = batch.len(), "writing to pgrelay.audit_log failed");
            if !stopping {
                tokio::select! {
                    biased;
                    _ = shutdown.wait_for(|stop| *stop) => stopping = true,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

async fn write(pool: &Pool, batch: &[Entry]) -> Result<(), AuthError> {
    let client = pool.get().await?;
    let at: Vec<SystemTime> = batch.iter().map(|e| e.at).collect();
    let action: Vec<&str> = batch.iter().map(|e| e.action.as_str()).collect();
    let client_id: Vec<Option<&str>> = batch.iter().map(|e| e.client_id.as_deref()).collect();
    let subject: Vec<Option<&str>> = batch.iter().map(|e| e.subject.as_deref()).collect();
    let detail: Vec<&str> = batch.iter().map(|e| e.detail.as_str()).collect();
    client
        .execute(
            "INSERT INTO pgrelay.audit_log (at, action, client_id, subject, detail) \
             SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[])",
            &[&at, &action, &client_id, &subject, &detail],
        )
        .await
        .map_err(AuthError::sql("writing pgrelay.audit_log"))?;
    Ok(())
}

/// Deletes audit entries older than `retention`, now and hourly, so refused
/// requests (each one a row) cannot grow the table without end.
pub(crate) async fn prune(
    pool: Pool,
    retention: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), AuthError> {
    let period = Duration::from_secs(3600).min(retention);
    loop {
        match prune_once(&pool, retention).await {
            Ok(0) => {}
            Ok(deleted) => {
                tracing::info!(target: "pgrelay::audit", deleted, "deleted audit entries past --audit-retention")
            }
            // PostgreSQL may be restarting; the next round will do it.
            Err(e) => {
                tracing::warn!(target: "pgrelay::audit", error = %e, "pruning pgrelay.audit_log failed")
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            _ = tokio::time::sleep(period) => {}
        }
    }
}

async fn prune_once(pool: &Pool, retention: Duration) -> Result<u64, AuthError> {
    let client = pool.get().await?;
    client
        .execute(
            "DELETE FROM pgrelay.audit_log WHERE at < now() - make_interval(secs => $1)",
            &[&retention.as_secs_f64()],
        )
        .await
        .map_err(AuthError::sql("pruning pgrelay.audit_log"))
}
