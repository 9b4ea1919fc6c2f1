//! Schema changes without a full resync: a dropped column, a renamed
//! column, a new primary key, a renamed and a dropped table reach a
//! connected replica and one that comes back later, with at most the
//! changed table fetched again (its bytes measured against the whole
//! replica's).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgrelay_client::Event;

use crate::support::{open_client, run_client, wait_for, RunningClient, World};

/// The snapshots a client loaded: (full, tables, bytes).
pub(super) type Loads = Arc<Mutex<Vec<(bool, Vec<String>, u64)>>>;

pub(super) async fn start_watched(
    world: &World,
    addr: std::net::SocketAddr,
    name: &str,
) -> (RunningClient, Loads) {
    let client = open_client(addr, &world.replica_path(name), name).await;
    let loads: Loads = Arc::default();
    let mut events = client.subscribe();
    let sink = Arc::clone(&loads);
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            if let Event::Hydrated {
                full,
                tables,
                bytes,
                ..
            } = event
            {
                sink.lock().unwrap().push((full, tables, bytes));
            }
        }
    });
    (run_client(client), loads)
}

pub(super) fn columns(db: &Path, table: &str) -> Vec<(String, i64)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut stmt = conn
        .prepare("SELECT name, pk FROM pragma_table_info(?1) ORDER BY cid")
        .unwrap();
    let columns = stmt
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    columns
}

pub(super) async fn wait_columns(db: &Path, table: &str, want: &[(&str, i64)]) {
    let want: Vec<(String, i64)> = want.iter().map(|(n, k)| ((*n).to_owned(), *k)).collect();
    wait_for(
        &format!("{table} with columns {want:?} in {}", db.display()),
        Duration::from_secs(30),
        || async { (columns(db, table) == want).then_some(()) },
    )
    .await;
}

/// The partial snapshots loaded since `from`: their tables, and bytes.
pub(super) fn refetched(loads: &Loads, from: usize) -> (Vec<String>, u64) {
    let loads = loads.lock().unwrap();
    let mut tables = Vec::new();
    let mut bytes = 0;
    for (full, t, b) in loads.iter().skip(from) {
        assert!(!full, "a full re-hydration");
        tables.extend(t.iter().cloned());
        bytes += b;
    }
    (tables, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_and_renamed_columns_reach_live_and_late_replicas_refetching_only_that_table() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE todos (id int PRIMARY KEY, title text, note text);
             INSERT INTO todos SELECT g, 'title ' || g, 'note ' || g FROM generate_series(1, 200) g;
             CREATE TABLE big (id int PRIMARY KEY, body text);
             INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 2000) g;",
        )
        .await;
    let server = world.start_server().await;
    let addr = server.local_addr();
    let (live, live_loads) = start_watched(&world, addr, "live").await;
    let (late, late_loads) = start_watched(&world, addr, "late").await;
    let (live_db, late_db) = (world.replica_path("live"), world.replica_path("late"));
    world.wait_equal(&live_db, Duration::from_secs(60)).await;
    world.wait_equal(&late_db, Duration::from_secs(60)).await;
    let whole: u64 = live_loads.lock().unwrap().iter().map(|l| l.2).sum();
    late.stop().await;
    // Offline, the late replica edits a row through the column that will
    // be renamed, and another through the one that will be dropped: the
    // outbox holds both in the old shape.
    {
        let conn = rusqlite::Connection::open(&late_db).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.execute_batch("UPDATE todos SET title = 'offline edit' WHERE id = 2")
            .unwrap();
        conn.execute_batch("UPDATE todos SET note = 'offline note' WHERE id = 3")
            .unwrap();
    }

    // DROP COLUMN: dropped in place, nothing fetched.
    let before = live_loads.lock().unwrap().len();
    world.exec("ALTER TABLE todos DROP COLUMN note").await;
    wait_columns(&live_db, "todos", &[("id", 1), ("title", 0)]).await;
    world
        .exec("UPDATE todos SET title = 'changed' WHERE id = 1")
        .await;
    world.wait_equal(&live_db, Duration::from_secs(30)).await;
    assert_eq!(refetched(&live_loads, before).0, Vec::<String>::new());

    // RENAME COLUMN: the new name comes with its values, that table alone.
    world
        .exec("ALTER TABLE todos RENAME COLUMN title TO label")
        .await;
    wait_columns(&live_db, "todos", &[("id", 1), ("label", 0)]).await;
    world.wait_equal(&live_db, Duration::from_secs(30)).await;
    let (tables, bytes) = refetched(&live_loads, before);
    assert_eq!(tables, vec!["public.todos".to_owned()]);
    eprintln!(
        "rename column: re-fetched {bytes} bytes of public.todos; whole replica {whole} bytes"
    );
    assert!(bytes * 5 < whole, "{bytes} of {whole}");

    // The late replica catches up with both changes the same way.
    let (late, late_loads2) = start_watched(&world, addr, "late").await;
    wait_columns(&late_db, "todos", &[("id", 1), ("label", 0)]).await;
    world.wait_equal(&late_db, Duration::from_secs(30)).await;
    let (tables, _) = refetched(&late_loads2, 0);
    assert_eq!(tables, vec!["public.todos".to_owned()]);
    // Its write through the renamed column lands under the new name; the
    // one through the dropped column is refused with the reason, not lost.
    let report = wait_for(
        "the old-shape writes answered",
        Duration::from_secs(30),
        || async {
            let report = late.replica.outbox(None, 10).await.unwrap();
            (report.unsent() == 0).then_some(report)
        },
    )
    .await;
    assert_eq!((report.applied, report.rejected), (1, 1), "{report:?}");
    assert_eq!(
        world
            .count("SELECT count(*) FROM todos WHERE id = 2 AND label = 'offline edit'")
            .await,
        1
    );
    let rejected = report
        .entries
        .iter()
        .find(|e| e.status == "rejected")
        .unwrap();
    let reason = rejected.error.clone().unwrap_or_default();
    assert!(reason.contains("note"), "{reason}");
    world.wait_equal(&late_db, Duration::from_secs(30)).await;
    drop(late_loads);
    live.stop().await;
    late.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_key_and_renamed_and_dropped_tables_reach_live_and_late_replicas() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE keyed (id int PRIMARY KEY, org int NOT NULL DEFAULT 1, v text);
             INSERT INTO keyed SELECT g, 1, 'v' || g FROM generate_series(1, 50) g;
             CREATE TABLE old_name (id int PRIMARY KEY, v text);
             INSERT INTO old_name SELECT g, 'o' || g FROM generate_series(1, 20) g;
             CREATE TABLE doomed (id int PRIMARY KEY);
             INSERT INTO doomed VALUES (1);
             CREATE TABLE big (id int PRIMARY KEY, body text);
             INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 2000) g;",
        )
        .await;
    let server = world.start_server().await;
    let addr = server.local_addr();
    let (live, live_loads) = start_watched(&world, addr, "live").await;
    let (late, _) = start_watched(&world, addr, "late").await;
    let (live_db, late_db) = (world.replica_path("live"), world.replica_path("late"));
    world.wait_equal(&live_db, Duration::from_secs(60)).await;
    world.wait_equal(&late_db, Duration::from_secs(60)).await;
    late.stop().await;
    // Offline, the late replica writes to the table that will be renamed
    // and to the one that will be dropped.
    {
        let conn = rusqlite::Connection::open(&late_db).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.execute_batch("UPDATE old_name SET v = 'offline edit' WHERE id = 3")
            .unwrap();
        conn.execute_batch("INSERT INTO doomed VALUES (2)").unwrap();
    }
    let before = live_loads.lock().unwrap().len();

    // A new primary key: the table is rebuilt with it and fetched alone.
    world
        .exec("ALTER TABLE keyed DROP CONSTRAINT keyed_pkey, ADD PRIMARY KEY (org, id)")
        .await;
    wait_columns(&live_db, "keyed", &[("id", 2), ("org", 1), ("v", 0)]).await;
    world.wait_equal(&live_db, Duration::from_secs(30)).await;

    // A renamed table: the old one goes, the new one is fetched alone.
    world.exec("ALTER TABLE old_name RENAME TO new_name").await;
    wait_columns(&live_db, "new_name", &[("id", 1), ("v", 0)]).await;
    wait_columns(&live_db, "old_name", &[]).await;
    // A dropped table goes.
    world.exec("DROP TABLE doomed").await;
    wait_columns(&live_db, "doomed", &[]).await;
    world.wait_equal(&live_db, Duration::from_secs(30)).await;
    let (mut tables, bytes) = refetched(&live_loads, before);
    tables.sort();
    tables.dedup();
    assert_eq!(
        tables,
        vec!["public.keyed".to_owned(), "public.new_name".to_owned()]
    );
    eprintln!("new key + renamed table: re-fetched {bytes} bytes");

    // The late replica: the same, on connect.
    let (late, late_loads) = start_watched(&world, addr, "late").await;
    wait_columns(&late_db, "keyed", &[("id", 2), ("org", 1), ("v", 0)]).await;
    wait_columns(&late_db, "old_name", &[]).await;
    wait_columns(&late_db, "doomed", &[]).await;
    world.wait_equal(&late_db, Duration::from_secs(30)).await;
    let (tables, _) = refetched(&late_loads, 0);
    assert!(!tables.contains(&"public.big".to_owned()), "{tables:?}");
    offline_writes_follow_the_rename(&world, &late).await;
    world.wait_equal(&late_db, Duration::from_secs(30)).await;
    live.stop().await;
    late.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

/// The late replica's two offline writes: the one to `old_name` lands
/// under its new name `new_name`; the one to the dropped `doomed` is
/// refused with the reason.
pub(super) async fn offline_writes_follow_the_rename(world: &World, late: &RunningClient) {
    let report = wait_for(
        "the offline writes answered",
        Duration::from_secs(30),
        || async {
            let report = late.replica.outbox(None, 10).await.unwrap();
            (report.unsent() == 0).then_some(report)
        },
    )
    .await;
    assert_eq!((report.applied, report.rejected), (1, 1), "{report:?}");
    assert_eq!(
        world
            .count("SELECT count(*) FROM new_name WHERE id = 3 AND v = 'offline edit'")
            .await,
        1
    );
    let rejected = report
        .entries
        .iter()
        .find(|e| e.status == "rejected")
        .unwrap();
    assert_eq!(rejected.table, "public.doomed");
    let reason = rejected.error.clone().unwrap_or_default();
    assert!(reason.contains("no longer exists"), "{reason}");
}
