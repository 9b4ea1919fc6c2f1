//! Client migrations in the replica: each runs in one SQLite transaction
//! together with recording (up) or forgetting (down) its version in
//! `_pgrelay_migrations`, so a replica never holds half a migration or a
//! migration it does not know it ran. Its writes are not captured for the
//! server: they are the replica's own.

use pgrelay_protocol::{ClientMigration, Direction};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::ClientError;

const TABLE_SQL: &str = "
CREATE TABLE IF NOT EXISTS _pgrelay_migrations (
  version    INTEGER PRIMARY KEY,
  name       TEXT NOT NULL,
  applied_us INTEGER NOT NULL
);";

pub(super) fn ensure_table(conn: &Connection) -> Result<(), ClientError> {
    conn.execute_batch(TABLE_SQL)?;
    Ok(())
}

/// The newest client migration the replica ran (0 for none).
pub(super) fn schema_version(conn: &Connection) -> Result<i64, ClientError> {
    Ok(conn
        .query_row("SELECT max(version) FROM _pgrelay_migrations", [], |r| {
            r.get::<_, Option<i64>>(0)
        })?
        .unwrap_or(0))
}

/// Runs one migration. `Ok(Err(message))` is the migration's own failure
/// (rolled back, reported to the server); `Err` a failure of the replica.
pub(super) fn run(
    conn: &mut Connection,
    migration: &ClientMigration,
) -> Result<Result<(), String>, ClientError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let ran: Option<i64> = tx
        .query_row(
            "SELECT version FROM _pgrelay_migrations WHERE version = ?1",
            [migration.version],
            |r| r.get(0),
        )
        .optional()?;
    // Sent twice (a reconnect while it ran): already done.
    let done = match migration.direction {
        Direction::Up => ran.is_some(),
        Direction::Down => ran.is_none(),
    };
    if done {
        return Ok(Ok(()));
    }
    super::capture::set_applying(&tx, true)?;
    let outcome = tx.execute_batch(&migration.sql);
    super::capture::set_applying(&tx, false)?;
    if let Err(e) = outcome {
        // Dropping the transaction rolls the migration back.
        return Ok(Err(e.to_string()));
    }
    match migration.direction {
        Direction::Up => tx.execute(
            "INSERT INTO _pgrelay_migrations (version, name, applied_us) VALUES (?1, ?2, ?3)",
            params![migration.version, migration.name, now_us()],
        )?,
        Direction::Down => tx.execute(
            "DELETE FROM _pgrelay_migrations WHERE version = ?1",
            [migration.version],
        )?,
    };
    tx.commit()?;
    Ok(Ok(()))
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(version: i64, direction: Direction, sql: &str) -> ClientMigration {
        ClientMigration {
            version,
            name: format!("m{version}"),
            direction,
            sql: sql.to_owned(),
        }
    }

    #[test]
    fn a_migration_and_its_version_commit_together_or_not_at_all() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::capture::ensure_tables(&conn).unwrap();
        ensure_table(&conn).unwrap();
        let up = migration(
            5,
            Direction::Up,
            "CREATE TABLE notes (id INTEGER PRIMARY KEY)",
        );
        assert_eq!(run(&mut conn, &up).unwrap(), Ok(()));
        assert_eq!(schema_version(&conn).unwrap(), 5);
        assert_eq!(run(&mut conn, &up).unwrap(), Ok(()), "twice is once");
        let broken = migration(
            6,
            Direction::Up,
            "CREATE TABLE half (x); CREATE INDEX i ON missing (x)",
        );
        let failed = run(&mut conn, &broken).unwrap().unwrap_err();
        assert!(failed.contains("missing"), "{failed}");
        assert_eq!(schema_version(&conn).unwrap(), 5);
        let half: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'half'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(half, 0, "the failed migration left nothing");
        let down = migration(5, Direction::Down, "DROP TABLE notes");
        assert_eq!(run(&mut conn, &down).unwrap(), Ok(()));
        assert_eq!(schema_version(&conn).unwrap(), 0);
    }
}
