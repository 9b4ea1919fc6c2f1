//! How the registry's backend is doing, for `/ready`, `/metrics` and the
//! admin API. A registry that fails does not stop sessions (they sync
//! unregistered, and are registered again by the next refresh): it is
//! counted and shown, never a reason to refuse clients.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use super::RegistryError;

pub(crate) struct RegistryHealth {
    backend: &'static str,
    failures: AtomicU64,
    reachable: AtomicBool,
    /// The last failure and when it happened.
    last_error: Mutex<Option<(String, Instant)>>,
    /// Whether this node receives signals for its sessions from other
    /// nodes (Redis pub/sub); always true for the embedded registry.
    listening: AtomicBool,
}

#[derive(Serialize, Debug)]
pub(crate) struct HealthReport {
    /// `embedded` or `redis`.
    pub(crate) backend: &'static str,
    /// Whether the last call to the backend went through.
    pub(crate) reachable: bool,
    /// Calls to the backend that failed since start.
    pub(crate) failures: u64,
    pub(crate) last_error: Option<String>,
    pub(crate) last_error_seconds_ago: Option<f64>,
    /// Whether notifications and disconnects sent from other nodes reach
    /// this node's sessions.
    pub(crate) receiving_signals: bool,
}

impl RegistryHealth {
    pub(crate) fn new(backend: &'static str) -> RegistryHealth {
        RegistryHealth {
            backend,
            failures: AtomicU64::new(0),
            reachable: AtomicBool::new(true),
            last_error: Mutex::new(None),
            listening: AtomicBool::new(backend == "embedded"),
        }
    }

    /// Records the outcome of one call to the backend.
    pub(crate) fn record<T>(&self, result: Result<T, RegistryError>) -> Result<T, RegistryError> {
        match &result {
            Ok(_) => self.reached(),
            Err(e) => self.failed(e),
        }
        result
    }

    pub(crate) fn reached(&self) {
        self.reachable.store(true, Ordering::Relaxed);
    }

    pub(crate) fn failed(&self, e: &RegistryError) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if matches!(e, RegistryError::Io(_)) {
            self.reachable.store(false, Ordering::Relaxed);
        }
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some((e.to_string(), Instant::now()));
        }
    }

    pub(crate) fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::Relaxed);
    }

    pub(crate) fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub(crate) fn report(&self) -> HealthReport {
        let last = self.last_error.lock().ok().and_then(|l| l.clone());
        HealthReport {
            backend: self.backend,
            reachable: self.reachable.load(Ordering::Relaxed),
            failures: self.failures(),
            last_error_seconds_ago: last.as_ref().map(|(_, at)| at.elapsed().as_secs_f64()),
            last_error: last.map(|(e, _)| e),
            receiving_signals: self.listening.load(Ordering::Relaxed),
        }
    }
}
