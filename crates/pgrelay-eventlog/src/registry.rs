//! The stores this node holds in memory: a task and a handle per store,
//! started on first use. Past `max_stores`, the least recently used stores
//! that nothing holds (no socket, pull or request) are evicted; their task
//! stops and the next use reloads them from storage, which keeps their log,
//! head and backend id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::error::EventLogError;
use super::store::StoreHandle;

struct Entry {
    handle: StoreHandle,
    /// When the store was last asked for, on the registry's own clock.
    used: u64,
}

pub(crate) struct Registry {
    entries: Mutex<Entries>,
    max: usize,
}

#[derive(Default)]
struct Entries {
    map: HashMap<Arc<str>, Entry>,
    clock: u64,
}

/// Every store held is in use and the registry is at its bound.
#[derive(Debug)]
pub(crate) struct Full(pub(crate) usize);

impl Registry {
    pub(crate) fn new(max: usize) -> Registry {
        Registry {
            entries: Mutex::new(Entries::default()),
            max: max.max(1),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Entries>, EventLogError> {
        self.entries
            .lock()
            .map_err(|_| EventLogError::Storage("store registry lock poisoned".to_owned()))
    }

    pub(crate) fn get(&self, id: &str) -> Result<Option<StoreHandle>, EventLogError> {
        let mut entries = self.lock()?;
        entries.clock += 1;
        let now = entries.clock;
        Ok(entries.map.get_mut(id).map(|entry| {
            entry.used = now;
            entry.handle.clone()
        }))
    }

    /// Adds a store, unless another request added it first (then that one
    /// is returned and `start` is not called). Evicts idle stores to stay
    /// under the bound.
    pub(crate) fn insert_with(
        &self,
        id: &str,
        start: impl FnOnce() -> StoreHandle,
    ) -> Result<Result<StoreHandle, Full>, EventLogError> {
        let mut entries = self.lock()?;
        entries.clock += 1;
        let now = entries.clock;
        if let Some(entry) = entries.map.get_mut(id) {
            entry.used = now;
            return Ok(Ok(entry.handle.clone()));
        }
        if entries.map.len() >= self.max {
            evict(&mut entries.map, self.max);
            if entries.map.len() >= self.max {
                return Ok(Err(Full(self.max)));
            }
        }
        let handle = start();
        entries.map.insert(
            Arc::clone(&handle.id),
            Entry {
                handle: handle.clone(),
                used: now,
            },
        );
        Ok(Ok(handle))
    }

    /// The stores held, for a notice that concerns them all.
    pub(crate) fn all(&self) -> Result<Vec<StoreHandle>, EventLogError> {
        Ok(self
            .lock()?
            .map
            .values()
            .map(|e| e.handle.clone())
            .collect())
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().map(|e| e.map.len()).unwrap_or(0)
    }
}

/// Drops the least recently used idle stores until a tenth of the bound
/// is free, so a registry at its bound does not scan on every new store.
fn evict(map: &mut HashMap<Arc<str>, Entry>, max: usize) {
    let target = max - (max / 10).max(1);
    let mut idle: Vec<(u64, Arc<str>)> = map
        .iter()
        .filter(|(_, e)| !e.handle.in_use())
        .map(|(id, e)| (e.used, Arc::clone(id)))
        .collect();
    idle.sort_unstable();
    let excess = map.len().saturating_sub(target);
    for (_, id) in idle.into_iter().take(excess) {
        map.remove(&id);
    }
    tracing::debug!(stores = map.len(), "idle stores evicted from memory");
}
