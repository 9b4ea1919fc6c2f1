//! The checks after the run, made with plain SQL on PostgreSQL and on the
//! replicas' SQLite files, none through pgrelay's own code paths: replicas
//! equal PostgreSQL row by row, every client write applied exactly once,
//! the change log without gap or duplicate, the slot confirmed to the end.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio_postgres::types::PgLsn;

use super::clients::Client;

/// One check's verdict: `Ok(what was seen)` or `Err(the violation)`.
pub(crate) type Verdict = Result<String, String>;

const TABLES: [(&str, &str); 2] = [
    (
        "chaos_accounts",
        "SELECT id::text || '|' || balance::text || '|' || last_transfer::text FROM public.chaos_accounts",
    ),
    (
        "chaos_notes",
        "SELECT id || '|' || client || '|' || seq::text FROM public.chaos_notes",
    ),
];

async fn pg_rows(db: &tokio_postgres::Client, sql: &str) -> anyhow::Result<Vec<String>> {
    let mut rows: Vec<String> = db.query(sql, &[]).await?.iter().map(|r| r.get(0)).collect();
    rows.sort();
    Ok(rows)
}

fn sqlite_rows(path: &Path, sql: &str) -> anyhow::Result<Vec<String>> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(2))?;
    // SQLite's `||` and casts give the same text for these columns.
    let sql = sql.replace("::text", "").replace("public.", "");
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    rows.sort();
    Ok(rows)
}

/// Writes still in the replica's outbox (pending or sent) and rejected ones.
fn outbox_left(path: &Path) -> anyhow::Result<(i64, i64)> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(2))?;
    Ok(conn.query_row(
        "SELECT count(*) FILTER (WHERE status IN ('pending', 'sent')),
                count(*) FILTER (WHERE status = 'rejected') FROM _pgrelay_outbox",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?)
}

/// Every replica equals PostgreSQL, row by row, for both tables.
pub(crate) async fn replicas_equal(db: &tokio_postgres::Client, clients: &[Client]) -> Verdict {
    let mut compared = 0usize;
    for (table, sql) in TABLES {
        let expected = pg_rows(db, sql)
            .await
            .map_err(|e| format!("{table}: {e:#}"))?;
        for client in clients {
            let got = sqlite_rows(&client.db, sql)
                .map_err(|e| format!("{} {table}: {e:#}", client.name))?;
            if got != expected {
                let missing: Vec<&String> = expected
                    .iter()
                    .filter(|r| !got.contains(r))
                    .take(3)
                    .collect();
                let extra: Vec<&String> = got
                    .iter()
                    .filter(|r| !expected.contains(r))
                    .take(3)
                    .collect();
                return Err(format!(
                    "{} {table}: {} rows, PostgreSQL {}; missing {missing:?}, extra {extra:?}",
                    client.name,
                    got.len(),
                    expected.len()
                ));
            }
            compared += got.len();
        }
    }
    Ok(format!(
        "{} replicas, {compared} rows compared",
        clients.len()
    ))
}

/// Waits until every replica equals PostgreSQL and has pushed its outbox;
/// returns how long that took, or the last difference at the deadline.
pub(crate) async fn settle(
    db: &tokio_postgres::Client,
    clients: &[Client],
    timeout: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let mut last = replicas_equal(db, clients).await.map(|_| ());
        if last.is_ok() {
            for client in clients {
                match outbox_left(&client.db) {
                    Ok((0, _)) => {}
                    Ok((n, _)) => {
                        last = Err(format!("{}: {n} writes not yet applied", client.name))
                    }
                    Err(e) => last = Err(format!("{}: {e:#}", client.name)),
                }
            }
        }
        match last {
            Ok(()) => return Ok(started.elapsed()),
            Err(e) if started.elapsed() > timeout => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Every note a client wrote is in PostgreSQL once, applied once.
pub(crate) async fn exactly_once(db: &tokio_postgres::Client, clients: &[Client]) -> Verdict {
    let mut total = 0i64;
    for client in clients {
        let local = sqlite_rows(
            &client.db,
            &format!(
                "SELECT CAST(coalesce(max(seq), 0) AS TEXT) FROM chaos_notes WHERE client = '{}'",
                client.name
            ),
        )
        .map_err(|e| format!("{}: {e:#}", client.name))?;
        let local: i64 = local.first().and_then(|s| s.parse().ok()).unwrap_or(0);
        let said = client.written.load(std::sync::atomic::Ordering::SeqCst);
        if said > local {
            return Err(format!(
                "{}: wrote note {said}, its replica holds only up to {local}",
                client.name
            ));
        }
        let (_, rejected) =
            outbox_left(&client.db).map_err(|e| format!("{}: {e:#}", client.name))?;
        if rejected > 0 {
            return Err(format!("{}: {rejected} writes rejected", client.name));
        }
        let row = db
            .query_one(
                "SELECT count(*), count(DISTINCT n.seq), coalesce(min(n.seq), 0), coalesce(max(n.seq), 0),
                        count(*) FILTER (WHERE a.applied IS DISTINCT FROM 1)
                   FROM public.chaos_notes n LEFT JOIN public.chaos_applications a ON a.note_id = n.id
                  WHERE n.client = $1",
                &[&client.name],
            )
            .await
            .map_err(|e| e.to_string())?;
        let got: (i64, i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        let want = (local, local, i64::from(local > 0), local, 0);
        if got != want {
            return Err(format!(
                "{}: PostgreSQL has (notes, distinct, min, max, not applied once) = {got:?}, expected {want:?}",
                client.name
            ));
        }
        total += local;
    }
    let stray: i64 = db
        .query_one(
            "SELECT count(*) FROM public.chaos_applications a
              WHERE a.applied <> 1 OR NOT EXISTS (SELECT 1 FROM public.chaos_notes n WHERE n.id = a.note_id)",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    if stray > 0 {
        return Err(format!(
            "{stray} applications counted more than once or without their note"
        ));
    }
    Ok(format!("{total} client writes, each applied once"))
}

/// The change log holds every committed transfer's rows once, in one
/// transaction each, and every note's insert once; nothing else.
pub(crate) async fn change_log(db: &tokio_postgres::Client) -> Verdict {
    let row = db
        .query_one(
            "WITH logged AS (
                 SELECT (data->>'last_transfer')::int8 AS transfer, count(*) AS rows, count(DISTINCT lsn) AS txs
                   FROM pgrelay.change_history
                  WHERE table_name = 'public.chaos_accounts' AND operation = 'update'
                  GROUP BY 1)
             SELECT (SELECT count(*) FROM public.chaos_transfers),
                    (SELECT count(*) FROM public.chaos_transfers t WHERE NOT EXISTS (SELECT 1 FROM logged l WHERE l.transfer = t.id)),
                    (SELECT count(*) FROM public.chaos_transfers t JOIN logged l ON l.transfer = t.id WHERE l.rows <> t.rows OR l.txs <> 1),
                    (SELECT count(*) FROM logged l WHERE NOT EXISTS (SELECT 1 FROM public.chaos_transfers t WHERE t.id = l.transfer))",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    let (transfers, missing, doubled, unknown): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if missing + doubled + unknown > 0 {
        return Err(format!(
            "of {transfers} transfers: {missing} missing from the change log, {doubled} logged with other rows or twice, {unknown} logged but never committed"
        ));
    }
    let row = db
        .query_one(
            "SELECT (SELECT count(*) FROM public.chaos_notes),
                    count(*), count(DISTINCT data->>'id'),
                    (SELECT count(*) FROM public.chaos_notes n WHERE NOT EXISTS (
                        SELECT 1 FROM pgrelay.change_history h
                         WHERE h.table_name = 'public.chaos_notes' AND h.operation = 'insert' AND h.data->>'id' = n.id))
               FROM pgrelay.change_history WHERE table_name = 'public.chaos_notes' AND operation = 'insert'",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    let (notes, logged, distinct, absent): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if logged != notes || distinct != notes || absent != 0 {
        return Err(format!(
            "{notes} notes: {logged} inserts logged ({distinct} distinct), {absent} not logged"
        ));
    }
    Ok(format!(
        "{transfers} transfers and {notes} notes, each logged once"
    ))
}

/// The slot's confirmed position reaches the change log's last transaction.
pub(crate) async fn slot_confirmed(db: &tokio_postgres::Client, timeout: Duration) -> Verdict {
    let started = Instant::now();
    loop {
        let row = db
            .query_one(
                "SELECT (SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'chaos'),
                        (SELECT max(lsn) FROM pgrelay.change_history)",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        let (confirmed, last): (Option<PgLsn>, Option<PgLsn>) = (row.get(0), row.get(1));
        match (confirmed, last) {
            (Some(c), Some(l)) if c >= l => {
                return Ok(format!("confirmed {c}, last logged transaction {l}"))
            }
            _ if started.elapsed() > timeout => {
                return Err(format!(
                    "slot confirmed at {confirmed:?}, the change log's last transaction at {last:?}"
                ))
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}
