//! A local write comes back as the server's version of the row, and
//! `execute_and_wait` returns once the replica holds it (read-your-writes).

use pgrelay_client::Event;

use super::{local, wait_count, wait_outbox_drained, WAIT};
use crate::support::{start_client, wait_for, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_write_ends_as_the_servers_version() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE todos (id bigint PRIMARY KEY, title text NOT NULL, done boolean NOT NULL DEFAULT false, \
               source text DEFAULT 'server-default', title_len int);
             CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN NEW.title := upper(NEW.title); NEW.title_len := length(NEW.title); RETURN NEW; END $$;
             CREATE TRIGGER stamp BEFORE INSERT OR UPDATE ON todos FOR EACH ROW EXECUTE FUNCTION stamp();",
        )
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("writer");
    let client = start_client(server.local_addr(), &path, "writer").await;
    let mut events = client.client.subscribe();
    world.wait_equal(&path, WAIT).await;

    let executed = client
        .client
        .execute("INSERT INTO todos (id, title) VALUES (1, 'buy milk'), (2, 'walk')")
        .await
        .unwrap();
    assert_eq!(executed.captured, 2);
    // Optimistic: the replica has the row at once, as written.
    assert_eq!(
        local(&path, "SELECT title FROM todos WHERE id = 1").as_deref(),
        Some("buy milk")
    );
    let applied = tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await.unwrap() {
                Event::WriteApplied { tx_id, changes, .. } => break (tx_id, changes),
                Event::WriteRejected { reason, .. } => panic!("rejected: {reason}"),
                _ => {}
            }
        }
    })
    .await
    .expect("the write's answer");
    assert_eq!(applied, (executed.tx_id.clone(), 2));
    // One client transaction, one PostgreSQL transaction, tagged with its origin.
    let tag = pgrelay_protocol::origin_tag("writer");
    let tagged = world
        .count(&format!(
            "SELECT count(DISTINCT lsn) FROM pgrelay.change_history WHERE origin_client = '{tag}'"
        ))
        .await;
    assert!(tagged <= 1);
    wait_count(
        &world,
        &format!("SELECT count(*) FROM pgrelay.change_history WHERE origin_client = '{tag}'"),
        2,
    )
    .await;

    // The echo replaces the optimistic row with PostgreSQL's: trigger and defaults.
    wait_for("the server's version locally", WAIT, || async {
        (local(&path, "SELECT title || '/' || done || '/' || source || '/' || title_len FROM todos WHERE id = 1").as_deref()
            == Some("BUY MILK/0/server-default/8"))
        .then_some(())
    })
    .await;
    client
        .client
        .execute("UPDATE todos SET title = 'oat milk', done = 1 WHERE id = 1; DELETE FROM todos WHERE id = 2")
        .await
        .unwrap();
    wait_count(
        &world,
        "SELECT count(*) FROM todos WHERE title = 'OAT MILK' AND done",
        1,
    )
    .await;
    wait_count(&world, "SELECT count(*) FROM todos", 1).await;
    world.wait_equal(&path, WAIT).await;
    wait_outbox_drained(&client.replica).await;
    let report = client.replica.outbox(None, 10).await.unwrap();
    assert_eq!((report.applied, report.rejected), (4, 0));

    // Writes made by another process on the same file (the CLI) are pushed too.
    let out = std::process::Command::new(crate::support::BIN)
        .args(["client", "exec", "--db"])
        .arg(&path)
        .arg("INSERT INTO todos (id, title) VALUES (3, 'from the cli')")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_count(
        &world,
        "SELECT count(*) FROM todos WHERE title = 'FROM THE CLI'",
        1,
    )
    .await;
    world.wait_equal(&path, WAIT).await;
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

/// Read-your-writes: `execute_and_wait` returns once the replica holds the
/// PostgreSQL transaction carrying the write (found by origin and the
/// `(lsn_floor, lsn]` bounds of `write_result`), so the very next local
/// read shows the row as PostgreSQL committed it; a refused write is an
/// error, already rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_and_wait_reads_the_servers_version_of_its_own_write() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE todos (id bigint PRIMARY KEY, title text NOT NULL CHECK (length(title) < 40), \
               source text DEFAULT 'server-default');
             CREATE FUNCTION shout() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN NEW.title := upper(NEW.title); RETURN NEW; END $$;
             CREATE TRIGGER shout BEFORE INSERT OR UPDATE ON todos FOR EACH ROW EXECUTE FUNCTION shout();",
        )
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("ryw");
    let client = start_client(server.local_addr(), &path, "ryw").await;
    world.wait_equal(&path, WAIT).await;

    for i in 1..=5 {
        let executed = client
            .client
            .execute_and_wait(
                format!("INSERT INTO todos (id, title) VALUES ({i}, 'write {i}')"),
                WAIT,
            )
            .await
            .expect("applied and back in the replica");
        assert_eq!(executed.captured, 1);
        // No waiting here: the replica already has PostgreSQL's version.
        assert_eq!(
            local(
                &path,
                &format!("SELECT title || '/' || source FROM todos WHERE id = {i}")
            )
            .as_deref(),
            Some(format!("WRITE {i}/server-default").as_str())
        );
    }

    let refused = client
        .client
        .execute_and_wait(
            format!(
                "INSERT INTO todos (id, title) VALUES (99, '{}')",
                "x".repeat(60)
            ),
            WAIT,
        )
        .await;
    match refused {
        Err(pgrelay_client::ClientError::WriteRejected { reason, .. }) => {
            assert!(reason.contains("check"), "{reason}")
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(
        local(&path, "SELECT count(*) FROM todos WHERE id = 99").as_deref(),
        Some("0")
    );
    client.stop().await;
}
