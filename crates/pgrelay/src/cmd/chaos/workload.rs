//! What runs while faults are injected: the schema, and a writer
//! committing transfers in PostgreSQL. A transfer moves money between 2
//! to 5 accounts in one transaction, so the balances always sum to
//! [`TOTAL`]: any replica state that does not is a torn transaction. Each
//! transfer stamps its rows with its id and records itself in
//! `chaos_transfers` (not synced), the truth the change log is checked
//! against. Client writes (notes) are counted by a trigger on each
//! application, so a write applied twice shows.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::rng::Rng;

pub(crate) const ACCOUNTS: i64 = 16;
pub(crate) const START_BALANCE: i64 = 1000;
pub(crate) const TOTAL: i64 = ACCOUNTS * START_BALANCE;

pub(crate) const SCHEMA: &str = "
CREATE TABLE public.chaos_accounts (
    id bigint PRIMARY KEY,
    balance bigint NOT NULL,
    last_transfer bigint NOT NULL DEFAULT 0
);
INSERT INTO public.chaos_accounts (id, balance) SELECT g, 1000 FROM generate_series(1, 16) g;
CREATE TABLE public.chaos_transfers (id bigint PRIMARY KEY, rows integer NOT NULL);
CREATE TABLE public.chaos_notes (id text PRIMARY KEY, client text NOT NULL, seq bigint NOT NULL);
CREATE TABLE public.chaos_applications (note_id text PRIMARY KEY, applied integer NOT NULL);
CREATE FUNCTION public.chaos_count_application() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.chaos_applications (note_id, applied) VALUES (NEW.id, 1)
        ON CONFLICT (note_id) DO UPDATE SET applied = chaos_applications.applied + 1;
    RETURN NEW;
END $$;
CREATE TRIGGER chaos_count_application AFTER INSERT OR UPDATE ON public.chaos_notes
    FOR EACH ROW EXECUTE FUNCTION public.chaos_count_application();
";

/// Connects to PostgreSQL directly (never through a proxy).
pub(crate) async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let connecting = tokio_postgres::connect(url, tokio_postgres::NoTls);
    let (client, connection) = tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .map_err(|_| anyhow::anyhow!("connecting to PostgreSQL timed out"))??;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Commits a transfer every `every` until `stop`, reconnecting after any
/// error (PostgreSQL restarts under it). `committed` holds the newest
/// transfer known committed.
pub(crate) async fn write_transfers(
    url: String,
    every: Duration,
    seed: u64,
    committed: Arc<AtomicI64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut rng = Rng::new(seed ^ 0x7472_616e_7366_6572);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut db = match connect(&url).await {
            Ok(db) => db,
            Err(_) => {
                tokio::select! {
                    biased;
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                }
            }
        };
        // A commit whose answer was lost may have happened: go on after
        // whatever PostgreSQL holds.
        let Ok(row) = db
            .query_one(
                "SELECT coalesce(max(id), 0) FROM public.chaos_transfers",
                &[],
            )
            .await
        else {
            continue;
        };
        let mut next: i64 = row.get::<_, i64>(0) + 1;
        committed.fetch_max(next - 1, Ordering::SeqCst);
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => return,
                _ = tick.tick() => {}
            }
            if transfer(&mut db, next, &mut rng).await.is_err() {
                break;
            }
            committed.fetch_max(next, Ordering::SeqCst);
            next += 1;
        }
    }
}

async fn transfer(
    db: &mut tokio_postgres::Client,
    id: i64,
    rng: &mut Rng,
) -> Result<(), tokio_postgres::Error> {
    let rows = 2 + rng.index(4);
    let mut accounts: Vec<i64> = Vec::with_capacity(rows);
    while accounts.len() < rows {
        let account = 1 + i64::try_from(rng.below(16)).unwrap_or(0);
        if !accounts.contains(&account) {
            accounts.push(account);
        }
    }
    let mut deltas: Vec<i64> = accounts
        .iter()
        .skip(1)
        .map(|_| i64::try_from(rng.below(101)).unwrap_or(0) - 50)
        .collect();
    deltas.insert(0, -deltas.iter().sum::<i64>());
    let tx = db.transaction().await?;
    for (account, delta) in accounts.iter().zip(&deltas) {
        tx.execute(
            "UPDATE public.chaos_accounts SET balance = balance + $1, last_transfer = $2 WHERE id = $3",
            &[delta, &id, account],
        )
        .await?;
    }
    let rows = i32::try_from(rows).unwrap_or(i32::MAX);
    tx.execute(
        "INSERT INTO public.chaos_transfers (id, rows) VALUES ($1, $2)",
        &[&id, &rows],
    )
    .await?;
    tx.commit().await
}
