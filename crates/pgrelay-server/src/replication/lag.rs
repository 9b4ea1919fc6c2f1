//! Measures how far replication is behind PostgreSQL and notices a stall:
//! PostgreSQL's WAL moving on while the slot's confirmed position does not
//! is what a stuck pipeline looks like from outside, however healthy the
//! connection seems (peer lesson: a pod stayed "ready" for hours with
//! capture stopped). Also samples the change log's size for `/metrics`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgrelay_pg::Pool;
use pgrelay_protocol::Lsn;
use serde::Serialize;
use tokio::sync::watch;
use tokio_postgres::types::PgLsn;

use crate::ServerConfig;

/// WAL positions remembered to date the oldest unconfirmed one.
const MAX_SAMPLES: usize = 2048;

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct LagReport {
    /// PostgreSQL's current WAL position.
    pub(crate) wal_lsn: String,
    /// The slot's confirmed flush position, as PostgreSQL reports it.
    pub(crate) confirmed_lsn: String,
    pub(crate) lag_bytes: u64,
    /// Age of the oldest WAL position not yet confirmed.
    pub(crate) lag_seconds: f64,
    pub(crate) stalled: bool,
    pub(crate) change_log_rows: i64,
    pub(crate) change_log_bytes: i64,
    /// Seconds since the last successful measurement.
    pub(crate) measured_seconds_ago: Option<f64>,
    pub(crate) error: Option<String>,
}

/// What the samples say; kept apart from I/O so it can be tested.
pub(crate) struct LagState {
    stall_after: Duration,
    wal: Lsn,
    confirmed: Lsn,
    confirmed_moved: Instant,
    samples: VecDeque<(Instant, Lsn)>,
    stalled: bool,
    rows: i64,
    bytes: i64,
    measured: Option<Instant>,
    error: Option<String>,
}

impl LagState {
    pub(crate) fn new(stall_after: Duration, now: Instant) -> LagState {
        LagState {
            stall_after,
            wal: Lsn::ZERO,
            confirmed: Lsn::ZERO,
            confirmed_moved: now,
            samples: VecDeque::new(),
            stalled: false,
            rows: 0,
            bytes: 0,
            measured: None,
            error: None,
        }
    }

    /// Records one measurement; returns `Some(stalled)` when the stall
    /// state changed.
    pub(crate) fn observe(&mut self, now: Instant, wal: Lsn, confirmed: Lsn) -> Option<bool> {
        if confirmed != self.confirmed {
            self.confirmed = confirmed;
            self.confirmed_moved = now;
        }
        self.wal = wal;
        if self.samples.back().is_none_or(|(_, last)| *last < wal) {
            self.samples.push_back((now, wal));
        }
        while self.samples.len() > MAX_SAMPLES
            || self
                .samples
                .front()
                .is_some_and(|(_, lsn)| *lsn <= confirmed)
        {
            self.samples.pop_front();
        }
        self.measured = Some(now);
        self.error = None;
        let stalled =
            wal > confirmed && now.duration_since(self.confirmed_moved) >= self.stall_after;
        (stalled != self.stalled).then(|| {
            self.stalled = stalled;
            stalled
        })
    }

    pub(crate) fn lag_seconds(&self, now: Instant) -> f64 {
        match self.samples.front() {
            Some((at, lsn)) if *lsn > self.confirmed => now.duration_since(*at).as_secs_f64(),
            _ => 0.0,
        }
    }

    pub(crate) fn report(&self, now: Instant) -> LagReport {
        LagReport {
            wal_lsn: self.wal.to_string(),
            confirmed_lsn: self.confirmed.to_string(),
            lag_bytes: self.wal.0.saturating_sub(self.confirmed.0),
            lag_seconds: self.lag_seconds(now),
            stalled: self.stalled,
            change_log_rows: self.rows,
            change_log_bytes: self.bytes,
            measured_seconds_ago: self.measured.map(|m| now.duration_since(m).as_secs_f64()),
            error: self.error.clone(),
        }
    }
}

pub(crate) struct LagMonitor {
    state: Mutex<LagState>,
}

impl LagMonitor {
    pub(crate) fn new(stall_after: Duration) -> LagMonitor {
        LagMonitor {
            state: Mutex::new(LagState::new(stall_after, Instant::now())),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut LagState) -> T) -> T {
        match self.state.lock() {
            Ok(mut guard) => f(&mut guard),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    pub(crate) fn report(&self) -> LagReport {
        self.with(|s| s.report(Instant::now()))
    }

    /// Measures every `monitor_interval` until shutdown.
    pub(crate) async fn run(
        self: Arc<Self>,
        pool: Pool,
        config: ServerConfig,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), crate::ServerError> {
        loop {
            match pool.get().await.ok() {
                Some(client) => match measure(&client, &config.slot).await {
                    Ok(m) => self.record(m),
                    Err(e) => self.with(|s| s.error = Some(e.to_string())),
                },
                None => self.with(|s| s.error = Some("cannot connect to PostgreSQL".to_owned())),
            }
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
                _ = tokio::time::sleep(config.monitor_interval) => {}
            }
        }
    }

    fn record(&self, m: Measurement) {
        let changed = self.with(|s| {
            s.rows = m.rows;
            s.bytes = m.bytes;
            s.observe(Instant::now(), m.wal, m.confirmed)
        });
        match changed {
            Some(true) => tracing::error!(
                wal = %m.wal,
                lsn = %m.confirmed,
                "replication stalled: PostgreSQL's WAL moves on but the slot's confirmed position does not; not ready"
            ),
            Some(false) => tracing::info!(lsn = %m.confirmed, "replication moves again"),
            None => {}
        }
    }
}

struct Measurement {
    wal: Lsn,
    confirmed: Lsn,
    rows: i64,
    bytes: i64,
}

async fn measure(
    db: &tokio_postgres::Client,
    slot: &str,
) -> Result<Measurement, tokio_postgres::Error> {
    let row = db
        .query_one(
            "SELECT pg_current_wal_lsn(),
                    (SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1),
                    (SELECT n_live_tup FROM pg_stat_user_tables
                      WHERE schemaname = 'pgrelay' AND relname = 'change_history'),
                    pg_total_relation_size('pgrelay.change_history')",
            &[&slot],
        )
        .await?;
    let lsn = |v: Option<PgLsn>| Lsn(v.map_or(0, u64::from));
    Ok(Measurement {
        wal: lsn(row.get(0)),
        confirmed: lsn(row.get(1)),
        rows: row.get::<_, Option<i64>>(2).unwrap_or(0),
        bytes: row.get::<_, Option<i64>>(3).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stall_is_wal_moving_while_confirmed_does_not() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut state = LagState::new(s(60), t0);
        // Keeping up: confirmed follows the WAL.
        assert_eq!(state.observe(t0, Lsn(100), Lsn(100)), None);
        assert_eq!(state.observe(t0 + s(30), Lsn(200), Lsn(190)), None);
        assert_eq!(state.lag_seconds(t0 + s(30)), 0.0);
        // Nothing happens at all for a long time: idle, not stalled.
        assert_eq!(state.observe(t0 + s(200), Lsn(200), Lsn(200)), None);
        // The WAL moves and confirmed does not.
        assert_eq!(state.observe(t0 + s(210), Lsn(300), Lsn(200)), None);
        assert!((state.lag_seconds(t0 + s(240)) - 30.0).abs() < 1e-6);
        assert_eq!(state.observe(t0 + s(261), Lsn(400), Lsn(200)), Some(true));
        assert!(state.report(t0 + s(261)).stalled);
        assert_eq!(state.report(t0 + s(261)).lag_bytes, 200);
        // It moves again.
        assert_eq!(state.observe(t0 + s(262), Lsn(400), Lsn(350)), Some(false));
        // Dated by the oldest sample past the confirmed position (400 at 261 s).
        assert!((state.lag_seconds(t0 + s(262)) - 1.0).abs() < 1e-6);
    }
}
