//! pgrelay's own tables in schema `pgrelay`, as versioned migrations
//! (`migrations/V<n>__<name>.sql`) run by refinery and recorded in
//! `pgrelay.schema_migrations`. Servers starting at once on one database
//! take turns through an advisory lock, so each migration runs once.
//!
//! A migration, once released, never changes (refinery refuses a database
//! whose recorded checksum differs): a change to the schema is a new file.

use refinery::Migration;
use tokio_postgres::Client;

use crate::ServerError;

/// Where refinery records the migrations applied.
const TABLE: &str = "pgrelay.schema_migrations";

/// The advisory lock held while migrating: the bytes of "pgrelay1" as a
/// number, a key no other program is likely to use.
const LOCK: i64 = 0x7067_7265_6c61_7931;

/// The migrations, oldest first. V1 and V2 are the schema the server kept
/// as `IF NOT EXISTS` statements before, so they also bring a database
/// made by an older server up to date.
const MIGRATIONS: [(&str, &str); 6] = [
    (
        "V1__change_log",
        include_str!("../migrations/V1__change_log.sql"),
    ),
    (
        "V2__audit_log",
        include_str!("../migrations/V2__audit_log.sql"),
    ),
    (
        "V3__client_owners",
        include_str!("../migrations/V3__client_owners.sql"),
    ),
    (
        "V4__applied_changes_owner",
        include_str!("../migrations/V4__applied_changes_owner.sql"),
    ),
    (
        "V5__app_migrations",
        include_str!("../migrations/V5__app_migrations.sql"),
    ),
    (
        "V6__capture_term",
        include_str!("../migrations/V6__capture_term.sql"),
    ),
];

/// Brings schema `pgrelay` to the newest version; returns the versions it
/// applied (none when another server, or an earlier start, did).
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, ServerError> {
    client
        .query_one("SELECT pg_advisory_lock($1)", &[&LOCK])
        .await
        .map_err(ServerError::sql("waiting for pgrelay's migration lock"))?;
    let outcome = run(client).await;
    // The lock is the session's: it also goes when the connection does.
    let unlocked = client
        .query_one("SELECT pg_advisory_unlock($1)", &[&LOCK])
        .await
        .map_err(ServerError::sql("releasing pgrelay's migration lock"));
    let applied = outcome?;
    unlocked?;
    Ok(applied)
}

async fn run(client: &mut Client) -> Result<Vec<i32>, ServerError> {
    client
        .batch_execute("CREATE SCHEMA IF NOT EXISTS pgrelay")
        .await
        .map_err(ServerError::sql("creating schema pgrelay"))?;
    let migrations = MIGRATIONS
        .iter()
        .map(|(name, sql)| Migration::unapplied(name, sql))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServerError::Migration(e.to_string()))?;
    let mut runner = refinery::Runner::new(&migrations);
    runner.set_migration_table_name(TABLE);
    let report = runner
        .run_async(client)
        .await
        .map_err(|e| ServerError::Migration(e.to_string()))?;
    let applied: Vec<i32> = report
        .applied_migrations()
        .iter()
        .map(|m| m.version())
        .collect();
    for m in report.applied_migrations() {
        tracing::info!(
            version = m.version(),
            name = m.name(),
            "migrated schema pgrelay"
        );
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every version this build knows, in order.
    fn every_version() -> Vec<i32> {
        (1..=i32::try_from(MIGRATIONS.len()).unwrap()).collect()
    }
    use pgrelay_testkit::TestDatabase;

    /// What servers before versioned migrations ran at every start.
    fn schema_before_migrations() -> String {
        format!(
            "CREATE SCHEMA IF NOT EXISTS pgrelay;\n{}\n{}",
            MIGRATIONS[0].1, MIGRATIONS[1].1
        )
    }

    async fn versions(client: &Client) -> Vec<i32> {
        client
            .query(
                "SELECT version FROM pgrelay.schema_migrations ORDER BY version",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    #[tokio::test]
    async fn a_database_of_the_unversioned_schema_keeps_its_log_and_is_upgraded() {
        let db = TestDatabase::create().await.unwrap();
        let mut client = db.connect().await.unwrap();
        client
            .batch_execute(&schema_before_migrations())
            .await
            .unwrap();
        client
            .batch_execute(
                "INSERT INTO pgrelay.change_history VALUES
                   ('0/16B3748', 0, 'public.t', 'insert', '{\"id\":1}', NULL, 7, now(), NULL, 1);
                 INSERT INTO pgrelay.audit_log (at, action, detail) VALUES (now(), 'connect', 'kept');",
            )
            .await
            .unwrap();
        let log_id: String = client
            .query_one("SELECT log_id FROM pgrelay.log_state", &[])
            .await
            .unwrap()
            .get(0);

        assert_eq!(migrate(&mut client).await.unwrap(), every_version());
        assert_eq!(versions(&client).await, every_version());
        let row = client
            .query_one(
                "SELECT (SELECT log_id FROM pgrelay.log_state),
                        (SELECT count(*) FROM pgrelay.change_history),
                        (SELECT count(*) FROM pgrelay.audit_log)",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            row.get::<_, String>(0),
            log_id,
            "the change log keeps its identity"
        );
        assert_eq!(row.get::<_, i64>(1), 1);
        assert_eq!(row.get::<_, i64>(2), 1);
        assert!(
            migrate(&mut client).await.unwrap().is_empty(),
            "nothing twice"
        );
        drop(client);
        db.drop_database().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn servers_starting_at_once_apply_each_migration_once() {
        let db = TestDatabase::create().await.unwrap();
        let mut starts = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let mut client = db.connect().await.unwrap();
            starts.spawn(async move { migrate(&mut client).await });
        }
        let mut applied = Vec::new();
        while let Some(done) = starts.join_next().await {
            applied.extend(done.unwrap().unwrap());
        }
        applied.sort_unstable();
        assert_eq!(applied, every_version());
        let client = db.connect().await.unwrap();
        assert_eq!(versions(&client).await, every_version());
        let log_ids: i64 = client
            .query_one("SELECT count(*) FROM pgrelay.log_state", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(log_ids, 1);
        drop(client);
        db.drop_database().await.unwrap();
    }
}
