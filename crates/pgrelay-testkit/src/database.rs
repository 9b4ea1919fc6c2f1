//! A fresh database per test, dropped with its replication slots afterwards.

use std::sync::OnceLock;

use tokio_postgres::NoTls;

use crate::cluster::rand_suffix;
use crate::{PrivateCluster, TestkitError};

static SHARED: OnceLock<Result<String, String>> = OnceLock::new();

/// The admin URL of the PostgreSQL tests use: `PGRELAY_TEST_DATABASE_URL`
/// when set (it must have wal_level=logical), otherwise one private cluster
/// for this whole process, stopped and removed when the process exits.
pub fn test_server_admin_url() -> Result<String, TestkitError> {
    if let Ok(url) = std::env::var("PGRELAY_TEST_DATABASE_URL") {
        return Ok(url);
    }
    let shared = SHARED.get_or_init(|| {
        let cluster = PrivateCluster::start().map_err(|e| e.to_string())?;
        let url = cluster.admin_url();
        cluster.stop_when_process_exits(std::process::id());
        Ok(url)
    });
    shared.clone().map_err(|message| TestkitError::Command {
        command: "starting a private cluster".to_owned(),
        message,
    })
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, TestkitError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|source| TestkitError::Sql {
            context: format!("connecting to {url}"),
            source,
        })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A database of its own for one test, named `pgrelay_test_<random>`.
pub struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
    dropped: bool,
}

impl TestDatabase {
    pub async fn create() -> Result<TestDatabase, TestkitError> {
        let admin = test_server_admin_url()?;
        TestDatabase::create_on(&admin).await
    }

    pub async fn create_on(admin_url: &str) -> Result<TestDatabase, TestkitError> {
        let name = format!("pgrelay_test_{:012x}", rand_suffix() & 0xffff_ffff_ffff);
        let admin = connect(admin_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(|source| TestkitError::Sql {
                context: format!("creating database {name}"),
                source,
            })?;
        let url = replace_database(admin_url, &name);
        Ok(TestDatabase {
            admin_url: admin_url.to_owned(),
            name,
            url,
            dropped: false,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub async fn connect(&self) -> Result<tokio_postgres::Client, TestkitError> {
        connect(&self.url).await
    }

    /// Ends the database's sessions and walsenders, drops its replication
    /// slots, then the database.
    pub async fn drop_database(mut self) -> Result<(), TestkitError> {
        self.dropped = true;
        drop_everything(&self.admin_url, &self.name).await
    }
}

async fn drop_everything(admin_url: &str, name: &str) -> Result<(), TestkitError> {
    let admin = connect(admin_url).await?;
    let sql = |context: &str| {
        let context = format!("{context} of {name}");
        move |source| TestkitError::Sql { context, source }
    };
    // A walsender may take a moment to exit after its client is gone.
    for _ in 0..100 {
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&name],
            )
            .await
            .map_err(sql("terminating sessions"))?;
        let active: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE database = $1 AND active",
                &[&name],
            )
            .await
            .map_err(sql("listing slots"))?
            .get(0);
        if active == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    admin
        .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1", &[&name])
        .await
        .map_err(sql("dropping slots"))?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .map_err(sql("dropping"))?;
    Ok(())
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // A failed test still cleans up, on a thread with its own runtime so
        // this works inside and outside an async test.
        let (admin, name) = (self.admin_url.clone(), self.name.clone());
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match runtime {
                Ok(rt) => {
                    if let Err(e) = rt.block_on(drop_everything(&admin, &name)) {
                        tracing::warn!(error = %e, database = %name, "cleaning up a test database failed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "no runtime to clean up a test database"),
            }
        });
        let _ = cleanup.join();
    }
}

fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let base = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_the_database_in_a_url() {
        assert_eq!(
            super::replace_database("postgres://u@h:1/postgres", "x"),
            "postgres://u@h:1/x"
        );
        assert_eq!(
            super::replace_database("postgres://u@h:1", "x"),
            "postgres://u@h:1/x"
        );
        assert_eq!(
            super::replace_database("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }
}
