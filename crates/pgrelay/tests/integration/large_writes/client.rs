//! Large transactions through the client: the 1,000 rows of 400
//! characters through the CLI, a transaction over the limit refused at
//! `execute`, and a write too large to send set aside with its rows restored.

use std::process::Command;

use pgrelay_client::{ClientError, Replica};
use pgrelay_protocol::{
    TooLarge, MAX_CLIENT_FRAME_BYTES, MAX_TRANSACTION_BYTES, MAX_WRITE_CHANGES,
};

use super::{check_once_and_atomic, insert, local_count, wait_count, TABLE, WAIT};
use crate::support::{spawn_client, start_client, World, BIN};

/// The reproduction from the issue, through the CLI: one `client exec` of
/// 1,000 rows of 400 characters (about 504 KB on the wire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_rows_of_400_characters_reach_postgres() {
    let world = World::new().await;
    world.exec(TABLE).await;
    let server = world.start_server().await;
    let path = world.replica_path("cli");
    let mut first = spawn_client(server.local_addr(), &path, "cli", true);
    assert!(first.wait().unwrap().success());

    let out = Command::new(BIN)
        .args(["client", "exec", "--db"])
        .arg(&path)
        .arg(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000) \
             INSERT INTO big (id, tx, body) SELECT i, 1, hex(randomblob(200)) FROM n",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let executed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(executed["captured"], 1000, "{executed}");
    let bytes = executed["bytes"].as_u64().unwrap() as usize;
    assert!(
        bytes > 500_000 && bytes <= MAX_CLIENT_FRAME_BYTES,
        "{executed}"
    );

    let mut sync = spawn_client(server.local_addr(), &path, "cli", true);
    let status = tokio::task::spawn_blocking(move || sync.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    assert_eq!(world.count("SELECT count(*) FROM big").await, 1000);
    check_once_and_atomic(&world, 1, 1000, "cli").await;
    let verify = Command::new(BIN)
        .args(["verify", "--database-url", world.url(), "--db"])
        .arg(&path)
        .env("PGRELAY_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

/// A transaction the protocol cannot carry is refused by `execute`, naming
/// the limit, and leaves the replica and its outbox as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_over_the_limit_is_refused_at_execute() {
    let world = World::new().await;
    world.exec(TABLE).await;
    world.exec("INSERT INTO big VALUES (1, 0, 'kept')").await;
    let server = world.start_server().await;
    let path = world.replica_path("limits");
    let client = start_client(server.local_addr(), &path, "limits").await;
    world.wait_equal(&path, WAIT).await;

    let many = client
        .client
        .execute(insert(2, 100, MAX_WRITE_CHANGES + 1, 1, 1))
        .await
        .unwrap_err();
    assert!(
        matches!(many, ClientError::TooLarge(TooLarge::Changes { changes }) if changes == MAX_WRITE_CHANGES + 1),
        "{many}"
    );
    assert!(many.to_string().contains("10000"), "{many}");
    // Nine rows of a million characters: each fits a frame, together over
    // the byte limit.
    let heavy = client
        .client
        .execute(insert(3, 100, 9, 1_000_000, 1_000_000))
        .await
        .unwrap_err();
    assert!(
        matches!(heavy, ClientError::TooLarge(TooLarge::Bytes { bytes }) if bytes > MAX_TRANSACTION_BYTES),
        "{heavy}"
    );
    assert!(
        heavy
            .to_string()
            .contains(&MAX_TRANSACTION_BYTES.to_string()),
        "{heavy}"
    );
    let wide = client
        .client
        .execute("UPDATE big SET body = substr(replace(hex(zeroblob(600000)), '0', 'x'), 1, 1100000) WHERE id = 1")
        .await
        .unwrap_err();
    assert!(
        matches!(wide, ClientError::TooLarge(TooLarge::Change { .. })),
        "{wide}"
    );

    // The CLI says the same and exits non-zero.
    let out = Command::new(BIN)
        .args(["client", "exec", "--db"])
        .arg(&path)
        .arg(insert(4, 100, MAX_WRITE_CHANGES + 1, 1, 1))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("10000") && stderr.contains("rolled back"),
        "{stderr}"
    );

    // Nothing of them was kept: not in the replica, not in the outbox.
    assert_eq!(local_count(&path, "SELECT count(*) FROM big"), 1);
    assert_eq!(
        local_count(&path, "SELECT body = 'kept' FROM big WHERE id = 1"),
        1
    );
    let report = client.replica.outbox(None, 10).await.unwrap();
    assert_eq!(
        (report.unsent(), report.rejected, report.applied),
        (0, 0, 0)
    );
    // And the replica goes on as before.
    client
        .client
        .execute(insert(5, 200, 3, 10, 10))
        .await
        .unwrap();
    wait_count(&world, "SELECT count(*) FROM big", 4).await;
    world.wait_equal(&path, WAIT).await;
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

/// A write the client can never send (a row over a frame, written on the
/// application's own SQLite connection, which `execute` does not see) is
/// set aside, and its rows come back as the server has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_too_large_to_send_is_set_aside_and_its_rows_restored() {
    let world = World::new().await;
    world.exec(TABLE).await;
    world
        .exec("INSERT INTO big VALUES (1, 0, 'original')")
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("aside");
    let mut first = spawn_client(server.local_addr(), &path, "aside", true);
    assert!(first.wait().unwrap().success());
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "UPDATE big SET body = substr(replace(hex(zeroblob(600000)), '0', 'x'), 1, 1100000) WHERE id = 1;
             INSERT INTO big VALUES (2, 0, substr(replace(hex(zeroblob(600000)), '0', 'x'), 1, 1100000));
             INSERT INTO big VALUES (3, 0, 'small');",
        )
        .unwrap();
    }
    let mut sync = spawn_client(server.local_addr(), &path, "aside", true);
    let status = tokio::task::spawn_blocking(move || sync.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    // The small write went through; the two large ones did not, and the
    // replica holds what the server has.
    assert_eq!(world.count("SELECT count(*) FROM big").await, 2);
    world.wait_equal(&path, WAIT).await;
    assert_eq!(
        local_count(
            &path,
            "SELECT count(*) FROM big WHERE id = 1 AND body = 'original'"
        ),
        1
    );
    let replica = Replica::open(&path).unwrap();
    let report = replica.outbox(Some("rejected".into()), 10).await.unwrap();
    assert_eq!(report.rejected, 2);
    for entry in &report.entries {
        let error = entry.error.as_deref().unwrap_or("");
        assert!(
            error.contains(&MAX_CLIENT_FRAME_BYTES.to_string()),
            "{error}"
        );
    }
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
