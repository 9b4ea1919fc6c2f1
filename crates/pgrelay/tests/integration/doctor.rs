//! `pgrelay doctor`: no error on a healthy database, and each
//! misconfiguration it names is detected with a fix.

use std::process::Command;

use pgrelay_testkit::PrivateCluster;
use serde_json::Value;

use std::time::Duration;

use crate::support::{wait_for, World, BIN};

/// Runs `pgrelay doctor --json` with `args`; the exit status and findings.
fn doctor(url: &str, args: &[&str]) -> (bool, Vec<Value>) {
    let out = Command::new(BIN)
        .args(["doctor", "--json", "--database-url", url])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "doctor printed no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let findings = report["findings"].as_array().unwrap().clone();
    (out.status.success(), findings)
}

/// The findings of `check` with `severity`.
fn found<'a>(findings: &'a [Value], check: &str, severity: &str) -> Vec<&'a Value> {
    findings
        .iter()
        .filter(|f| f["check"] == check && f["severity"] == severity)
        .collect()
}

fn worst(findings: &[Value]) -> Vec<&Value> {
    findings
        .iter()
        .filter(|f| f["severity"] == "error" || f["severity"] == "warning")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_database_has_no_error_and_each_misconfiguration_is_found() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE todos (id int PRIMARY KEY, owner text, title text)")
        .await;
    let slot = world.slot();
    let server = world.start_server().await;
    wait_for(
        "the server reading its slot",
        Duration::from_secs(30),
        || async {
            let row = world
                .sql
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                    &[&slot],
                )
                .await
                .unwrap();
            row.map(|_| ())
        },
    )
    .await;

    // Healthy: nothing to warn about while the server runs.
    let (ok, findings) = doctor(world.url(), &["--slot", &slot]);
    assert!(ok, "{findings:#?}");
    assert!(worst(&findings).is_empty(), "{findings:#?}");
    for check in [
        "version",
        "wal_level",
        "slots",
        "wal_senders",
        "slot",
        "publication",
    ] {
        assert_eq!(
            found(&findings, check, "ok").len(),
            1,
            "{check}: {findings:#?}"
        );
    }

    // A table without a key, a publication out of step with the tables,
    // a read rule on a non-key column without REPLICA IDENTITY FULL, and a
    // change log nothing prunes.
    world.exec("CREATE TABLE loose (x int)").await;
    world.exec("INSERT INTO todos VALUES (1, 'a', 'b')").await;
    wait_for(
        "the insert in the change log",
        Duration::from_secs(30),
        || async {
            (world
                .count("SELECT count(*) FROM pgrelay.change_history")
                .await
                > 0)
            .then_some(())
        },
    )
    .await;
    server.shutdown().await.unwrap();
    world
        .exec(&format!(
            "ALTER PUBLICATION {slot}_pub DROP TABLE todos; \
             UPDATE pgrelay.change_history SET commit_time = now() - interval '2 days'"
        ))
        .await;
    let secret = world.dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef").unwrap();
    let rules = world.dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "default = \"deny\"\n[tables.todos]\nread = \"owner = claims.sub\"\n",
    )
    .unwrap();
    let (ok, findings) = doctor(
        world.url(),
        &[
            "--slot",
            &slot,
            "--retain",
            "1h",
            "--auth",
            "jwt",
            "--jwt-secret-file",
            secret.to_str().unwrap(),
            "--rules",
            rules.to_str().unwrap(),
        ],
    );
    assert!(ok, "warnings only: {findings:#?}");
    let loose = found(&findings, "identity", "warning");
    assert!(
        loose.len() == 1
            && loose[0]["message"]
                .as_str()
                .unwrap()
                .contains("public.loose"),
        "{findings:#?}"
    );
    assert!(loose[0]["fix"]
        .as_str()
        .unwrap()
        .contains("REPLICA IDENTITY FULL"));
    assert_eq!(
        found(&findings, "publication", "warning").len(),
        1,
        "{findings:#?}"
    );
    let rule = found(&findings, "rule_identity", "warning");
    assert!(
        rule.len() == 1
            && rule[0]["message"]
                .as_str()
                .unwrap()
                .contains("public.todos"),
        "{findings:#?}"
    );
    assert_eq!(
        found(&findings, "change_log", "warning").len(),
        1,
        "{findings:#?}"
    );
    // Nothing reads the slot now.
    assert_eq!(
        found(&findings, "slot", "warning").len(),
        1,
        "{findings:#?}"
    );

    // The slot that fed the change log is gone: an error, exit 1.
    world
        .exec(&format!("SELECT pg_drop_replication_slot('{slot}')"))
        .await;
    let (ok, findings) = doctor(world.url(), &["--slot", &slot]);
    assert!(!ok, "{findings:#?}");
    let lost = found(&findings, "slot", "error");
    assert_eq!(lost.len(), 1, "{findings:#?}");
    assert!(lost[0]["message"]
        .as_str()
        .unwrap()
        .contains("no longer exists"));
    world.db.drop_database().await.unwrap();
}

#[test]
fn wal_level_replica_is_an_error_with_the_fix() {
    // The machine's stock PostgreSQL runs with wal_level=replica.
    let url = std::env::var("PGRELAY_REPLICA_LEVEL_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let (ok, findings) = doctor(&url, &["--slot", "doctor_never_created"]);
    assert!(!ok);
    let wal = found(&findings, "wal_level", "error");
    assert_eq!(wal.len(), 1, "{findings:#?}");
    assert!(wal[0]["fix"]
        .as_str()
        .unwrap()
        .contains("ALTER SYSTEM SET wal_level = logical"));
}

#[test]
fn no_free_slot_and_few_connections_are_found() {
    let cluster = PrivateCluster::start_with(
        "max_replication_slots = 1\nmax_wal_senders = 5\nmax_connections = 12\n",
    )
    .unwrap();
    let url = cluster.url_for("postgres");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute("SELECT pg_create_logical_replication_slot('someone_else', 'pgoutput')")
            .await
            .unwrap();
    });
    let (ok, findings) = doctor(&url, &["--slot", "pgrelay"]);
    assert!(!ok, "{findings:#?}");
    assert_eq!(found(&findings, "slots", "error").len(), 1, "{findings:#?}");
    assert_eq!(
        found(&findings, "connections", "warning").len(),
        1,
        "{findings:#?}"
    );
}
