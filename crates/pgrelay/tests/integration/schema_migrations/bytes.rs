//! What each schema change costs a replica: the snapshot bytes a connected
//! and a late client receive for it, against a full hydration of the same
//! database. Each change is made on a fresh database of two tables (the
//! changed one, 1,000 rows, and an untouched one, 2,000 rows); only the
//! changed table may come again. Prints the table BENCHMARKS.md shows
//! (`cargo test --workspace --release -- --nocapture schema_change_bytes`).

use std::time::Duration;

use super::schema_changes::{refetched, start_watched, wait_columns, Loads};
use crate::support::{wait_for, World};

struct Change {
    what: &'static str,
    sql: &'static str,
    /// The table to look at afterwards and the columns it then has.
    table: &'static str,
    columns: &'static [(&'static str, i64)],
}

const CHANGES: &[Change] = &[
    Change {
        what: "DROP COLUMN",
        sql: "ALTER TABLE todos DROP COLUMN note",
        table: "todos",
        columns: &[("id", 1), ("title", 0)],
    },
    Change {
        what: "RENAME COLUMN",
        sql: "ALTER TABLE todos RENAME COLUMN title TO label",
        table: "todos",
        // The old name is dropped, the new one added last.
        columns: &[("id", 1), ("note", 0), ("label", 0)],
    },
    Change {
        what: "ADD COLUMN ... NOT NULL DEFAULT",
        sql: "ALTER TABLE todos ADD COLUMN prio int NOT NULL DEFAULT 5",
        table: "todos",
        columns: &[("id", 1), ("title", 0), ("note", 0), ("prio", 0)],
    },
    Change {
        what: "primary key changed",
        sql: "ALTER TABLE todos DROP CONSTRAINT todos_pkey, ADD PRIMARY KEY (title, id)",
        table: "todos",
        columns: &[("id", 2), ("title", 1), ("note", 0)],
    },
    Change {
        what: "RENAME TABLE",
        sql: "ALTER TABLE todos RENAME TO tasks",
        table: "tasks",
        columns: &[("id", 1), ("title", 0), ("note", 0)],
    },
    Change {
        what: "DROP TABLE",
        sql: "DROP TABLE todos",
        table: "todos",
        columns: &[],
    },
    Change {
        what: "ALTER PUBLICATION ... DROP TABLE",
        sql: "ALTER PUBLICATION {pub} DROP TABLE todos",
        table: "todos",
        columns: &[],
    },
];

/// Waits for the changed table's columns and for the replica to equal
/// PostgreSQL; the snapshot bytes loaded since `from` (none whole).
async fn settle(world: &World, name: &str, loads: &Loads, from: usize, change: &Change) -> u64 {
    let db = world.replica_path(name);
    wait_columns(&db, change.table, change.columns).await;
    world.wait_equal(&db, Duration::from_secs(60)).await;
    if !change.columns.is_empty() && change.what != "DROP COLUMN" {
        wait_for(
            &format!("{name}'s snapshot of {}", change.table),
            Duration::from_secs(30),
            || async { (!refetched(loads, from).0.is_empty()).then_some(()) },
        )
        .await;
    }
    let (tables, bytes) = refetched(loads, from);
    let want: Vec<String> = match bytes {
        0 => Vec::new(),
        _ => vec![format!("public.{}", change.table)],
    };
    let mut tables = tables;
    tables.dedup();
    assert_eq!(tables, want, "{}: {name} fetched other tables", change.what);
    bytes
}

async fn measure(change: &Change) -> (u64, u64, u64) {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE todos (id int PRIMARY KEY, title text NOT NULL, note text);
             INSERT INTO todos SELECT g, 'title ' || g, 'note ' || g FROM generate_series(1, 1000) g;
             CREATE TABLE big (id int PRIMARY KEY, body text);
             INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 2000) g;",
        )
        .await;
    let mut config = world.server_config();
    config.table_poll_interval = Duration::from_millis(300);
    let publication = config.publication();
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let (live, live_loads) = start_watched(&world, addr, "live").await;
    let (late, _) = start_watched(&world, addr, "late").await;
    world
        .wait_equal(&world.replica_path("live"), Duration::from_secs(60))
        .await;
    world
        .wait_equal(&world.replica_path("late"), Duration::from_secs(60))
        .await;
    let full: u64 = live_loads.lock().unwrap().iter().map(|l| l.2).sum();
    late.stop().await;
    let from = live_loads.lock().unwrap().len();
    world.exec(&change.sql.replace("{pub}", &publication)).await;
    let live_bytes = settle(&world, "live", &live_loads, from, change).await;
    let (late, late_loads) = start_watched(&world, addr, "late").await;
    let late_bytes = settle(&world, "late", &late_loads, 0, change).await;
    live.stop().await;
    late.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
    (live_bytes, late_bytes, full)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_change_bytes() {
    let mut lines = vec![
        "| change | connected client | late client | full hydration |".to_owned(),
        "|---|---:|---:|---:|".to_owned(),
    ];
    for change in CHANGES {
        let (live, late, full) = measure(change).await;
        assert!(
            live * 2 < full && late * 2 < full,
            "{}: {live}, {late} of {full}",
            change.what
        );
        lines.push(format!(
            "| `{}` | {live} B | {late} B | {full} B |",
            change.what
        ));
    }
    println!("{}", lines.join("\n"));
}
