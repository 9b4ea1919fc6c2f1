//! `pgrelay migrate up|down|status` against PostgreSQL.

use serde_json::Value;

use super::{migrate, migrate_ok, write_migration};
use crate::support::World;

const FIRST: i64 = 20261203120000;
const SECOND: i64 = 20261203120100;

fn states(status_json: &str) -> Vec<(i64, String)> {
    let lines: Vec<Value> = serde_json::from_str(status_json).unwrap();
    lines
        .iter()
        .map(|l| {
            (
                l["version"].as_i64().unwrap(),
                l["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_down_and_status_follow_the_folder_and_a_changed_migration_is_refused() {
    let world = World::new().await;
    let dir = world.dir.path().join("migrations");
    write_migration(
        &dir,
        FIRST,
        "todos",
        &[
            (
                "up.sql",
                "CREATE TABLE todos (id int PRIMARY KEY, title text);",
            ),
            ("down.sql", "DROP TABLE todos;"),
        ],
    );
    write_migration(
        &dir,
        SECOND,
        "due_date",
        &[
            ("up.sql", "ALTER TABLE todos ADD COLUMN due date;"),
            ("down.sql", "ALTER TABLE todos DROP COLUMN due;"),
        ],
    );
    let url = world.url().to_owned();
    let status = migrate_ok(&url, &dir, &["status", "--json"]).await;
    assert_eq!(
        states(&status),
        vec![(FIRST, "pending".into()), (SECOND, "pending".into())]
    );

    migrate_ok(&url, &dir, &["up", "--to", &FIRST.to_string()]).await;
    assert_eq!(
        world
            .count("SELECT count(*) FROM information_schema.tables WHERE table_name = 'todos'")
            .await,
        1
    );
    let status = migrate_ok(&url, &dir, &["status", "--json"]).await;
    assert_eq!(
        states(&status),
        vec![(FIRST, "applied".into()), (SECOND, "pending".into())]
    );

    let out = migrate_ok(&url, &dir, &["up"]).await;
    assert!(out.contains(&format!("applied {SECOND} due_date")), "{out}");
    assert_eq!(
        world
            .count("SELECT count(*) FROM information_schema.columns WHERE table_name = 'todos' AND column_name = 'due'")
            .await,
        1
    );
    let recorded = world
        .sql
        .query(
            "SELECT version, name, length(checksum) FROM pgrelay.app_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[1].get::<_, String>(1), "due_date");
    assert_eq!(recorded[1].get::<_, i32>(2), 64, "a sha-256 in hex");
    assert_eq!(
        migrate_ok(&url, &dir, &["up"]).await.trim(),
        "nothing to do"
    );

    // A failing migration leaves nothing behind, its record included.
    write_migration(
        &dir,
        20261203120200,
        "broken",
        &[
            (
                "up.sql",
                "CREATE TABLE half (x int); SELECT * FROM no_such_table;",
            ),
            ("down.sql", "DROP TABLE half;"),
        ],
    );
    let out = migrate(&url, &dir, &["up"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no_such_table"), "{stderr}");
    assert_eq!(
        world
            .count("SELECT count(*) FROM information_schema.tables WHERE table_name = 'half'")
            .await,
        0
    );
    std::fs::remove_dir_all(dir.join("20261203120200_broken")).unwrap();

    // An applied migration edited afterwards: status says so, up and down refuse.
    let first = dir.join(format!("{FIRST}_todos"));
    std::fs::write(
        first.join("up.sql"),
        "CREATE TABLE todos (id bigint PRIMARY KEY, title text);",
    )
    .unwrap();
    let out = migrate(&url, &dir, &["status", "--json"]).await;
    assert!(
        !out.status.success(),
        "status exits 1 on a changed migration"
    );
    assert_eq!(
        states(&String::from_utf8_lossy(&out.stdout))[0],
        (FIRST, "changed".into())
    );
    for args in [&["up"][..], &["down"][..]] {
        let out = migrate(&url, &dir, args).await;
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "migration {FIRST} (todos) was changed after it was applied"
            )),
            "{args:?}: {stderr}"
        );
    }
    std::fs::write(
        first.join("up.sql"),
        "CREATE TABLE todos (id int PRIMARY KEY, title text);",
    )
    .unwrap();

    let out = migrate_ok(&url, &dir, &["down"]).await;
    assert!(out.contains(&format!("rolled back {SECOND}")), "{out}");
    assert_eq!(
        world
            .count("SELECT count(*) FROM information_schema.columns WHERE table_name = 'todos' AND column_name = 'due'")
            .await,
        0
    );
    migrate_ok(&url, &dir, &["down", "--to", "0"]).await;
    let status = migrate_ok(&url, &dir, &["status", "--json"]).await;
    assert_eq!(
        states(&status),
        vec![(FIRST, "pending".into()), (SECOND, "pending".into())]
    );
    assert_eq!(
        world
            .count("SELECT count(*) FROM information_schema.tables WHERE table_name = 'todos'")
            .await,
        0
    );
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_at_once_apply_each_migration_once() {
    let world = World::new().await;
    let dir = world.dir.path().join("migrations");
    for i in 0..5 {
        write_migration(
            &dir,
            FIRST + i,
            &format!("step{i}"),
            &[
                // Not idempotent: a second run of one would fail.
                ("up.sql", &format!("CREATE TABLE step{i} (id int);")),
                ("down.sql", &format!("DROP TABLE step{i};")),
            ],
        );
    }
    let url = world.url().to_owned();
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let (url, dir) = (url.clone(), dir.clone());
            tokio::spawn(async move { migrate(&url, &dir, &["up"]).await })
        })
        .collect();
    for run in runs {
        let out = run.await.unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        world
            .count("SELECT count(*) FROM pgrelay.app_migrations")
            .await,
        5
    );
    assert_eq!(
        world
            .count("SELECT count(*) FROM information_schema.tables WHERE table_name LIKE 'step%'")
            .await,
        5
    );
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_pending_and_changed_migrations() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let dir = world.dir.path().join("migrations");
    let folder = write_migration(
        &dir,
        FIRST,
        "extra",
        &[
            ("up.sql", "CREATE TABLE extra (id int PRIMARY KEY);"),
            ("down.sql", "DROP TABLE extra;"),
        ],
    );
    let url = world.url().to_owned();
    let doctor = |dir: std::path::PathBuf| {
        let url = url.clone();
        async move {
            let out = tokio::process::Command::new(crate::support::BIN)
                .args(["doctor", "--json", "--database-url", &url, "--migrations"])
                .arg(dir)
                .output()
                .await
                .unwrap();
            let report: Value = serde_json::from_slice(&out.stdout).unwrap();
            report["findings"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|f| f["check"] == "migrations")
                .map(|f| f["severity"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(doctor(dir.clone()).await, vec!["warning"], "pending");
    migrate_ok(&url, &dir, &["up"]).await;
    assert_eq!(doctor(dir.clone()).await, vec!["ok"]);
    std::fs::write(folder.join("down.sql"), "DROP TABLE IF EXISTS extra;").unwrap();
    assert_eq!(doctor(dir.clone()).await, vec!["error"], "changed");
    world.db.drop_database().await.unwrap();
}
