//! Writing back a long load's pages while it runs. SQLite writes the pages
//! its cache cannot hold to the replica's file as the load goes, and the
//! kernel keeps them in memory (far below its own write-back thresholds)
//! until the commit's fsync, which then waits for all of them at once:
//! 0.3 s of a 2.7 s `bench hydrate` of 1M rows with both cores idle. A
//! thread of its own syncs the file every [`EVERY_BYTES`] of rows loaded
//! (SQLite's page cache written out first), so the disk works while the
//! rows are inserted and the commit finds little left to write.

use std::fs::File;
use std::thread::JoinHandle;

use rusqlite::Connection;

/// COPY text loaded between two syncs.
const EVERY_BYTES: usize = 16 << 20;

/// The replica's file, synced in the background as a load grows.
#[derive(Default)]
pub(super) struct WriteBack {
    /// Bytes of rows loaded since the last sync began.
    since: usize,
    /// The file, when no sync is running.
    file: Option<File>,
    /// The sync running, which hands the file back.
    running: Option<JoinHandle<Option<File>>>,
}

impl WriteBack {
    /// `bytes` more of rows were loaded into `conn`'s replica: starts a
    /// sync when enough were and none is running. Best effort: a file that
    /// cannot be opened or synced is left to the commit.
    pub(super) fn loaded(&mut self, conn: &Connection, bytes: usize) {
        self.since += bytes;
        if self.since < EVERY_BYTES {
            return;
        }
        if let Some(running) = self.running.take_if(|r| r.is_finished()) {
            self.file = running.join().ok().flatten();
        }
        if self.running.is_some() {
            return;
        }
        let file = match self.file.take() {
            Some(file) => file,
            None => match conn.path().filter(|p| !p.is_empty()).map(File::open) {
                Some(Ok(file)) => file,
                _ => return,
            },
        };
        self.since = 0;
        // SQLite's own dirty pages first (up to the load's page cache, 32
        // MiB), which the commit would otherwise write and sync itself.
        if let Err(e) = conn.cache_flush() {
            tracing::debug!(error = %e, "writing the replica's page cache during a load");
        }
        let spawned = std::thread::Builder::new()
            .name("pgrelay-write-back".to_owned())
            .spawn(move || match file.sync_data() {
                Ok(()) => Some(file),
                Err(e) => {
                    tracing::debug!(error = %e, "syncing the replica during a load");
                    None
                }
            });
        self.running = spawned.ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_starts_once_enough_rows_are_loaded_and_hands_the_file_back() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("replica.sqlite")).unwrap();
        conn.execute_batch("CREATE TABLE t (x)").unwrap();
        let mut write_back = WriteBack::default();
        write_back.loaded(&conn, EVERY_BYTES - 1);
        assert!(write_back.running.is_none() && write_back.file.is_none());
        write_back.loaded(&conn, 1);
        let running = write_back.running.take().expect("a sync started");
        assert!(running.join().unwrap().is_some(), "the file comes back");
        assert_eq!(write_back.since, 0);
    }

    #[test]
    fn an_in_memory_replica_is_never_synced() {
        let conn = Connection::open_in_memory().unwrap();
        let mut write_back = WriteBack::default();
        write_back.loaded(&conn, EVERY_BYTES * 2);
        assert!(write_back.running.is_none());
    }
}
