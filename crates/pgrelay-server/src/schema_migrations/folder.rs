//! A migrations folder on disk: one folder per migration,
//! `YYYYMMDDHHMMSS_name/`, with `up.sql`, `down.sql` and optionally
//! `client_up.sql` / `client_down.sql`; each read with its checksum.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::MigrateError;

/// One migration as its files say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalMigration {
    /// The folder's timestamp, e.g. 20261203120000.
    pub version: i64,
    pub name: String,
    pub up: String,
    pub down: String,
    /// SQLite the replicas run (`client_up.sql`), if any.
    pub client_up: Option<String>,
    pub client_down: Option<String>,
    /// SHA-256 (hex) over every file of the migration.
    pub checksum: String,
}

impl LocalMigration {
    /// Whether replicas have something to run.
    pub fn has_client_part(&self) -> bool {
        self.client_up.is_some() || self.client_down.is_some()
    }
}

/// Reads every migration of `dir`, oldest first. A folder whose name is
/// not `<14 digits>_<name>`, or without `up.sql` and `down.sql`, is an
/// error: a typo would otherwise be skipped in silence.
pub fn read(dir: &Path) -> Result<Vec<LocalMigration>, MigrateError> {
    let entries = std::fs::read_dir(dir).map_err(|e| MigrateError::io(dir, e))?;
    let mut migrations = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| MigrateError::io(dir, e))?;
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let folder = entry.file_name().to_string_lossy().into_owned();
        let (version, name) = parse_folder(&folder).ok_or_else(|| {
            MigrateError::Folder(format!(
                "{}: a migration folder is named YYYYMMDDHHMMSS_name",
                path.display()
            ))
        })?;
        migrations.push(read_one(&path, version, name)?);
    }
    migrations.sort_by_key(|m| m.version);
    if let Some(pair) = migrations.windows(2).find(|w| w[0].version == w[1].version) {
        return Err(MigrateError::Folder(format!(
            "two migrations have version {}: {} and {}",
            pair[0].version, pair[0].name, pair[1].name
        )));
    }
    Ok(migrations)
}

fn parse_folder(folder: &str) -> Option<(i64, String)> {
    let (digits, name) = folder.split_once('_')?;
    if digits.len() != 14 || !digits.bytes().all(|b| b.is_ascii_digit()) || name.is_empty() {
        return None;
    }
    Some((digits.parse().ok()?, name.to_owned()))
}

fn read_one(path: &Path, version: i64, name: String) -> Result<LocalMigration, MigrateError> {
    let required = |file: &str| {
        let at = path.join(file);
        std::fs::read_to_string(&at).map_err(|e| MigrateError::io(&at, e))
    };
    let optional = |file: &str| {
        let at = path.join(file);
        match std::fs::read_to_string(&at) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(MigrateError::io(&at, e)),
        }
    };
    let up = required("up.sql")?;
    let down = required("down.sql")?;
    let client_up = optional("client_up.sql")?;
    let client_down = optional("client_down.sql")?;
    let mut hash = Sha256::new();
    for (file, text) in [
        ("up.sql", Some(&up)),
        ("down.sql", Some(&down)),
        ("client_up.sql", client_up.as_ref()),
        ("client_down.sql", client_down.as_ref()),
    ] {
        if let Some(text) = text {
            hash.update(file.as_bytes());
            hash.update([0]);
            hash.update(text.as_bytes());
            hash.update([0]);
        }
    }
    Ok(LocalMigration {
        version,
        name,
        up,
        down,
        client_up,
        client_down,
        checksum: hex::encode(hash.finalize()),
    })
}

/// Creates `dir/<timestamp>_<name>/` with empty `up.sql` and `down.sql`
/// (and the client parts when `client`); returns the folder.
pub fn create(
    dir: &Path,
    name: &str,
    timestamp: &str,
    client: bool,
) -> Result<PathBuf, MigrateError> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        return Err(MigrateError::Folder(format!(
            "{name:?}: a migration name is letters, digits, '_' and '-'"
        )));
    }
    let folder = dir.join(format!("{timestamp}_{name}"));
    std::fs::create_dir_all(&folder).map_err(|e| MigrateError::io(&folder, e))?;
    let mut files = vec![
        (
            "up.sql",
            "-- PostgreSQL: runs in one transaction with its record.\n",
        ),
        ("down.sql", "-- PostgreSQL: undoes up.sql.\n"),
    ];
    if client {
        files.push((
            "client_up.sql",
            "-- SQLite: runs in every replica (indexes, views, local-only tables).\n",
        ));
        files.push(("client_down.sql", "-- SQLite: undoes client_up.sql.\n"));
    }
    for (file, text) in files {
        let at = folder.join(file);
        std::fs::write(&at, text).map_err(|e| MigrateError::io(&at, e))?;
    }
    Ok(folder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_read_in_order_and_a_change_changes_the_checksum() {
        let dir = std::env::temp_dir().join(format!("pgrelay-folder-{}", rand::random::<u32>()));
        let b = create(&dir, "second", "20261203120001", false).unwrap();
        let a = create(&dir, "first", "20261203120000", true).unwrap();
        let read_all = || read(&dir).unwrap();
        let before = read_all();
        assert_eq!(
            before.iter().map(|m| m.version).collect::<Vec<_>>(),
            vec![20261203120000, 20261203120001]
        );
        assert!(before[0].has_client_part() && !before[1].has_client_part());
        std::fs::write(a.join("client_up.sql"), "CREATE INDEX i ON t (x);").unwrap();
        let after = read_all();
        assert_ne!(before[0].checksum, after[0].checksum);
        assert_eq!(before[1].checksum, after[1].checksum);
        std::fs::create_dir(dir.join("oops")).unwrap();
        assert!(matches!(read(&dir), Err(MigrateError::Folder(_))));
        std::fs::remove_dir_all(&dir).unwrap();
        let _ = b;
    }
}
