//! `pgrelay migrate` and client migrations: PostgreSQL migrations up, down
//! and status; client parts reaching connected and offline replicas,
//! reported, retried and rolled back; `upgrade_required`.

mod bytes;
mod cli;
mod clients;
mod defaults;
mod publication;
mod schema_changes;
mod upgrade;
mod while_down;

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::support::BIN;

/// Writes `dir/<version>_<name>/` with the given files.
pub(super) fn write_migration(
    dir: &Path,
    version: i64,
    name: &str,
    files: &[(&str, &str)],
) -> PathBuf {
    let folder = dir.join(format!("{version}_{name}"));
    std::fs::create_dir_all(&folder).unwrap();
    for (file, text) in files {
        std::fs::write(folder.join(file), text).unwrap();
    }
    folder
}

/// Runs `pgrelay migrate <args> --database-url URL --dir DIR`.
pub(super) async fn migrate(url: &str, dir: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(BIN)
        .arg("migrate")
        .args(args)
        .args(["--database-url", url, "--dir"])
        .arg(dir)
        .output()
        .await
        .unwrap()
}

/// Like [`migrate`], and fails the test unless it succeeded; its stdout.
pub(super) async fn migrate_ok(url: &str, dir: &Path, args: &[&str]) -> String {
    let out = migrate(url, dir, args).await;
    assert!(
        out.status.success(),
        "pgrelay migrate {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
