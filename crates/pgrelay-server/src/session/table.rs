//! The sessions live on this node, by client id: one per client. A second
//! connection with the same id replaces the first; the admin API and
//! "gone" notifications reach a session through its entry. An entry is a
//! few atomics, so an idle session stays cheap.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::task::AtomicWaker;
use pgrelay_protocol::Lsn;
use tokio::sync::Notify;

/// What a session is asked to do by someone else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Signal {
    /// Nothing asked.
    None,
    /// Read the change log now (a notification).
    Nudge,
    /// Close: an operator disconnected or forgot the client.
    Disconnect,
    /// Close: another connection with the same client id took over.
    Replaced,
}

impl Signal {
    fn from_u8(value: u8) -> Signal {
        match value {
            1 => Signal::Nudge,
            2 => Signal::Disconnect,
            3 => Signal::Replaced,
            _ => Signal::None,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Signal::None => 0,
            Signal::Nudge => 1,
            Signal::Disconnect => 2,
            Signal::Replaced => 3,
        }
    }
}

pub(crate) struct LiveSession {
    pub(crate) client_id: String,
    /// Unique on this node; tells a session from its replacement.
    pub(crate) id: u64,
    pub(crate) connected_at_ms: u64,
    last_activity_ms: AtomicU64,
    /// Commit LSN of the last transaction sent (or the client's position).
    sent: AtomicU64,
    signal: AtomicU8,
    /// The session's task, woken by a signal (one waiter, so smaller than
    /// a `Notify` and its waiting future).
    wake: AtomicWaker,
}

impl LiveSession {
    pub(crate) fn last_activity_ms(&self) -> u64 {
        self.last_activity_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn sent(&self) -> Lsn {
        Lsn(self.sent.load(Ordering::Relaxed))
    }

    /// Moves the position forward to `lsn` (never back). The session keeps
    /// its position here alone, so the registry and the admin API read what
    /// the session acts on.
    pub(crate) fn advance(&self, lsn: Lsn) {
        self.sent.fetch_max(lsn.0, Ordering::Relaxed);
    }

    pub(crate) fn touch(&self) {
        self.last_activity_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Asks the session to act; a close outranks a nudge.
    pub(crate) fn signal(&self, signal: Signal) {
        let _ = self
            .signal
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                (signal.as_u8() > current).then_some(signal.as_u8())
            });
        self.wake.wake();
    }

    /// Waits for a signal and takes it (a nudge is cleared, a close stays).
    /// Only the session's own task may wait.
    pub(crate) fn signalled(&self) -> impl Future<Output = Signal> + '_ {
        std::future::poll_fn(move |cx| {
            // Registered before looking, so a signal in between wakes us.
            self.wake.register(cx.waker());
            let taken = self
                .signal
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                    (current == Signal::Nudge.as_u8()).then_some(Signal::None.as_u8())
                })
                .unwrap_or_else(|current| current);
            match Signal::from_u8(taken) {
                Signal::None => Poll::Pending,
                signal => Poll::Ready(signal),
            }
        })
    }
}

#[derive(Default)]
pub(crate) struct SessionTable {
    sessions: Mutex<HashMap<String, Arc<LiveSession>>>,
    next_id: AtomicU64,
    /// Sessions opened and not yet finished (closed and unregistered).
    running: AtomicUsize,
    drained: Notify,
}

impl SessionTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<LiveSession>>> {
        match self.sessions.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Adds a session for `client_id` at position `lsn`; a session already
    /// there for the same client is told it was replaced.
    pub(crate) fn open(&self, client_id: &str, lsn: Lsn) -> Arc<LiveSession> {
        let now = now_ms();
        let session = Arc::new(LiveSession {
            client_id: client_id.to_owned(),
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            connected_at_ms: now,
            last_activity_ms: AtomicU64::new(now),
            sent: AtomicU64::new(lsn.0),
            signal: AtomicU8::new(0),
            wake: AtomicWaker::new(),
        });
        self.running.fetch_add(1, Ordering::AcqRel);
        let old = self
            .lock()
            .insert(client_id.to_owned(), Arc::clone(&session));
        if let Some(old) = old {
            tracing::info!(client_id, "a new connection replaces this client's session");
            old.signal(Signal::Replaced);
        }
        session
    }

    /// Removes the session unless a replacement already took its place.
    pub(crate) fn close(&self, session: &LiveSession) {
        let mut sessions = self.lock();
        if sessions
            .get(&session.client_id)
            .is_some_and(|s| s.id == session.id)
        {
            sessions.remove(&session.client_id);
        }
    }

    /// The session is closed and unregistered: nothing of it is left to wait
    /// for on shutdown.
    pub(crate) fn finished(&self) {
        if self.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drained.notify_waiters();
        }
    }

    /// Sessions opened and not yet finished.
    pub(crate) fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    pub(crate) fn get(&self, client_id: &str) -> Option<Arc<LiveSession>> {
        self.lock().get(client_id).cloned()
    }

    pub(crate) fn all(&self) -> Vec<Arc<LiveSession>> {
        self.lock().values().cloned().collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Returns once every session has finished (or right away when none
    /// runs).
    pub(crate) async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            if self.running() == 0 {
                return;
            }
            notified.await;
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_connection_replaces_the_first() {
        let table = SessionTable::default();
        let first = table.open("c", Lsn(1));
        let second = table.open("c", Lsn(2));
        assert_eq!(first.signalled().await, Signal::Replaced);
        // The old session closing does not remove its replacement.
        table.close(&first);
        assert_eq!(table.get("c").map(|s| s.id), Some(second.id));
        table.close(&second);
        assert_eq!(table.len(), 0);
        table.finished();
        assert_eq!(table.running(), 1, "the first is still unregistering");
        table.finished();
        table.drained().await;
    }

    #[tokio::test]
    async fn a_nudge_is_taken_once_and_a_close_outranks_it() {
        let table = SessionTable::default();
        let s = table.open("c", Lsn::ZERO);
        s.signal(Signal::Nudge);
        assert_eq!(s.signalled().await, Signal::Nudge);
        s.signal(Signal::Disconnect);
        s.signal(Signal::Nudge);
        assert_eq!(s.signalled().await, Signal::Disconnect);
        assert_eq!(s.signalled().await, Signal::Disconnect);
    }
}
