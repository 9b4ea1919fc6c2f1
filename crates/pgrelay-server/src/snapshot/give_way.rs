//! Background reads of whole tables (the keeper's repair digests) give
//! way to hydrations: while a client waits for its snapshot, the keeper
//! stops reading its COPY (PostgreSQL's backend then waits on its socket
//! and uses no CPU) and goes on when no snapshot is being sent, or when
//! it has waited its budget, so digests are still made under a stream of
//! hydrations.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Counts the hydrations sending snapshots now.
#[derive(Default)]
pub(crate) struct Hydrating {
    count: AtomicUsize,
    ended: Notify,
}

impl Hydrating {
    /// One more hydration, until the guard drops.
    pub(crate) fn enter(self: &Arc<Self>) -> HydratingGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        HydratingGuard(Arc::clone(self))
    }

    fn active(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }

    /// Returns once no hydration is under way.
    async fn idle(&self) {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            // Registered before the check, so an end between the two is
            // not missed.
            ended.as_mut().enable();
            if !self.active() {
                return;
            }
            ended.await;
        }
    }
}

pub(crate) struct HydratingGuard(Arc<Hydrating>);

impl Drop for HydratingGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.ended.notify_waiters();
        }
    }
}

/// A background reader's way of giving way: it waits for hydrations to
/// end, at most `budget` in all.
pub(crate) struct GiveWay {
    hydrating: Arc<Hydrating>,
    budget: Duration,
}

impl GiveWay {
    pub(crate) fn new(hydrating: Arc<Hydrating>, budget: Duration) -> GiveWay {
        GiveWay { hydrating, budget }
    }

    /// Waits while a hydration is under way and budget is left; cheap
    /// when none is (one atomic load), so it can be called per row.
    pub(crate) async fn pause(&mut self) {
        if self.budget.is_zero() || !self.hydrating.active() {
            return;
        }
        let started = Instant::now();
        let _ = tokio::time::timeout(self.budget, self.hydrating.idle()).await;
        self.budget = self.budget.saturating_sub(started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[tokio::test]
    async fn pause_returns_at_once_with_no_hydration() {
        let hydrating = Arc::new(Hydrating::default());
        let mut give_way = GiveWay::new(Arc::clone(&hydrating), Duration::from_secs(3600));
        // No timer is involved: with no hydration this completes on its
        // first poll.
        let paused = give_way.pause();
        tokio::pin!(paused);
        assert!(paused.as_mut().now_or_never().is_some());
    }

    #[tokio::test]
    async fn pause_waits_until_the_last_hydration_ends() {
        let hydrating = Arc::new(Hydrating::default());
        let first = hydrating.enter();
        let second = hydrating.enter();
        let mut give_way = GiveWay::new(Arc::clone(&hydrating), Duration::from_secs(3600));
        let paused = give_way.pause();
        tokio::pin!(paused);
        assert!(paused.as_mut().now_or_never().is_none());
        drop(first);
        assert!(paused.as_mut().now_or_never().is_none());
        drop(second);
        paused.await;
        assert!(!hydrating.active());
    }

    #[tokio::test(start_paused = true)]
    async fn pause_goes_on_when_its_budget_is_spent() {
        let hydrating = Arc::new(Hydrating::default());
        let _endless = hydrating.enter();
        let mut give_way = GiveWay::new(Arc::clone(&hydrating), Duration::from_secs(30));
        let started = Instant::now();
        give_way.pause().await;
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        // Spent: later pauses do not wait at all.
        let paused = give_way.pause();
        tokio::pin!(paused);
        assert!(paused.as_mut().now_or_never().is_some());
    }
}
