//! Repair instead of re-download (promise 8): a replica the change log
//! cannot continue (behind retention, another change log) is compared
//! with PostgreSQL range by range and receives only what differs; its
//! unsent local writes survive. (A lost slot: `slot_loss::`.)

mod cut_short;
mod kept_digests;
mod log_reset;
mod many_ranges;
mod retention;
mod server_digests;
mod verify;

use std::sync::{Arc, Mutex};

use pgrelay_client::Event;

use crate::support::RunningClient;

/// What a client's `Repaired` and full `Hydrated` events reported.
#[derive(Clone, Debug, Default)]
pub(crate) struct Seen {
    /// (bytes both ways, rows received, rows removed, tables to fetch again)
    pub(crate) repairs: Vec<(u64, u64, u64, Vec<String>)>,
    /// Uncompressed bytes of each full snapshot.
    pub(crate) hydrations: Vec<u64>,
}

pub(crate) fn watch(client: &RunningClient) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut events = client.client.subscribe();
    let sink = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            let mut seen = sink.lock().unwrap();
            match event {
                Event::Repaired {
                    bytes,
                    rows_received,
                    rows_removed,
                    refetch,
                    ..
                } => seen
                    .repairs
                    .push((bytes, rows_received, rows_removed, refetch)),
                Event::Hydrated {
                    full: true, bytes, ..
                } => seen.hydrations.push(bytes),
                _ => {}
            }
        }
    });
    seen
}
