//! The registry of a single node. Its live sessions are in the session
//! table already, so their records are read from there and cost nothing
//! more per idle connection; only records that no live session backs (from
//! a caller outside, or left by a session that could not unregister) are
//! stored, and those expire by TTL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::future::{ready, BoxFuture, FutureExt};

use super::health::{HealthReport, RegistryHealth};
use super::relay::Relayed;
use super::{record, session_key, ClientRecord, Registry, RegistryError};
use crate::session::table::SessionTable;

pub(crate) struct EmbeddedRegistry {
    ttl: Duration,
    sessions: Arc<SessionTable>,
    node: String,
    instance: String,
    stored: Mutex<HashMap<String, (ClientRecord, Instant)>>,
}

impl EmbeddedRegistry {
    pub(crate) fn new(
        ttl: Duration,
        sessions: Arc<SessionTable>,
        node: String,
        instance: String,
    ) -> EmbeddedRegistry {
        EmbeddedRegistry {
            ttl,
            sessions,
            node,
            instance,
            stored: Mutex::new(HashMap::new()),
        }
    }

    /// The stored records, with expired ones dropped.
    pub(super) fn stored(&self) -> MutexGuard<'_, HashMap<String, (ClientRecord, Instant)>> {
        let mut stored = match self.stored.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let now = Instant::now();
        stored.retain(|_, (_, expires)| *expires > now);
        stored
    }

    /// The record of the client's live session here, if it has one.
    fn live(&self, client_id: &str) -> Option<ClientRecord> {
        self.sessions
            .get(client_id)
            .map(|s| record(&self.node, &self.instance, &s))
    }

    /// Whether `record` is that of a live session here.
    fn is_live(&self, record: &ClientRecord) -> bool {
        self.sessions
            .get(&record.client_id)
            .is_some_and(|s| session_key(&self.instance, &s) == record.session)
    }

    /// Stores `record` unless a live session here backs it.
    fn put(&self, stored: &mut HashMap<String, (ClientRecord, Instant)>, record: &ClientRecord) {
        if self.is_live(record) {
            stored.remove(&record.client_id);
        } else {
            let expires = Instant::now() + self.ttl;
            stored.insert(record.client_id.clone(), (record.clone(), expires));
        }
    }
}

impl Registry for EmbeddedRegistry {
    fn register<'a>(
        &'a self,
        record: &'a ClientRecord,
    ) -> BoxFuture<'a, Result<(), RegistryError>> {
        self.put(&mut self.stored(), record);
        ready(Ok(())).boxed()
    }

    fn refresh<'a>(
        &'a self,
        records: &'a [ClientRecord],
    ) -> BoxFuture<'a, Result<Vec<String>, RegistryError>> {
        let mut stored = self.stored();
        let mut replaced = Vec::new();
        for record in records {
            match stored.get(&record.client_id) {
                Some((current, _)) if current.session != record.session => {
                    replaced.push(record.client_id.clone())
                }
                _ => self.put(&mut stored, record),
            }
        }
        ready(Ok(replaced)).boxed()
    }

    fn unregister<'a>(
        &'a self,
        client_id: &'a str,
        session: &'a str,
    ) -> BoxFuture<'a, Result<(), RegistryError>> {
        let mut stored = self.stored();
        if stored
            .get(client_id)
            .is_some_and(|(r, _)| r.session == session)
        {
            stored.remove(client_id);
        }
        ready(Ok(())).boxed()
    }

    fn forget<'a>(&'a self, client_id: &'a str) -> BoxFuture<'a, Result<bool, RegistryError>> {
        let removed = self.stored().remove(client_id).is_some();
        ready(Ok(removed || self.sessions.get(client_id).is_some())).boxed()
    }

    fn get<'a>(
        &'a self,
        client_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ClientRecord>, RegistryError>> {
        let record = self
            .live(client_id)
            .or_else(|| self.stored().get(client_id).map(|(r, _)| r.clone()));
        ready(Ok(record)).boxed()
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<ClientRecord>, RegistryError>> {
        let mut records: HashMap<String, ClientRecord> = self
            .stored()
            .iter()
            .map(|(id, (r, _))| (id.clone(), r.clone()))
            .collect();
        for session in self.sessions.all() {
            let live = record(&self.node, &self.instance, &session);
            records.insert(live.client_id.clone(), live);
        }
        let mut records: Vec<ClientRecord> = records.into_values().collect();
        records.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        ready(Ok(records)).boxed()
    }

    /// One node: there is no other node to send to.
    fn relay<'a>(
        &'a self,
        _record: &'a ClientRecord,
        _signal: Relayed,
    ) -> BoxFuture<'a, Result<bool, RegistryError>> {
        ready(Ok(false)).boxed()
    }

    fn health(&self) -> HealthReport {
        RegistryHealth::new("embedded").report()
    }
}
