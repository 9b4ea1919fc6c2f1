//! The registry of a single node: records in memory, expired by TTL.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::future::{ready, BoxFuture, FutureExt};

use super::{ClientRecord, Registry, RegistryError};

pub(crate) struct EmbeddedRegistry {
    ttl: Duration,
    records: Mutex<HashMap<String, (ClientRecord, Instant)>>,
}

impl EmbeddedRegistry {
    pub(crate) fn new(ttl: Duration) -> EmbeddedRegistry {
        EmbeddedRegistry {
            ttl,
            records: Mutex::new(HashMap::new()),
        }
    }

    /// The records, with expired ones dropped.
    fn live(&self) -> MutexGuard<'_, HashMap<String, (ClientRecord, Instant)>> {
        let mut records = match self.records.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let now = Instant::now();
        records.retain(|_, (_, expires)| *expires > now);
        records
    }
}

impl Registry for EmbeddedRegistry {
    fn register<'a>(
        &'a self,
        record: &'a ClientRecord,
    ) -> BoxFuture<'a, Result<(), RegistryError>> {
        let expires = Instant::now() + self.ttl;
        self.live()
            .insert(record.client_id.clone(), (record.clone(), expires));
        ready(Ok(())).boxed()
    }

    fn refresh<'a>(
        &'a self,
        records: &'a [ClientRecord],
    ) -> BoxFuture<'a, Result<Vec<String>, RegistryError>> {
        let expires = Instant::now() + self.ttl;
        let mut held = self.live();
        let mut replaced = Vec::new();
        for record in records {
            match held.get(&record.client_id) {
                Some((current, _)) if current.session != record.session => {
                    replaced.push(record.client_id.clone())
                }
                _ => {
                    held.insert(record.client_id.clone(), (record.clone(), expires));
                }
            }
        }
        ready(Ok(replaced)).boxed()
    }

    fn unregister<'a>(
        &'a self,
        client_id: &'a str,
        session: &'a str,
    ) -> BoxFuture<'a, Result<(), RegistryError>> {
        let mut held = self.live();
        if held
            .get(client_id)
            .is_some_and(|(r, _)| r.session == session)
        {
            held.remove(client_id);
        }
        ready(Ok(())).boxed()
    }

    fn forget<'a>(&'a self, client_id: &'a str) -> BoxFuture<'a, Result<bool, RegistryError>> {
        let removed = self.live().remove(client_id).is_some();
        ready(Ok(removed)).boxed()
    }

    fn get<'a>(
        &'a self,
        client_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ClientRecord>, RegistryError>> {
        let record = self.live().get(client_id).map(|(r, _)| r.clone());
        ready(Ok(record)).boxed()
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<ClientRecord>, RegistryError>> {
        let mut records: Vec<ClientRecord> = self.live().values().map(|(r, _)| r.clone()).collect();
        records.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        ready(Ok(records)).boxed()
    }
}
