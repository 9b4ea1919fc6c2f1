//! Many real clients in this process, each with its own SQLite replica,
//! with counters a bench can watch and, optionally, every transaction's
//! PostgreSQL-commit → SQLite-commit latency.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrelay_client::{ClientConfig, Event, Replica, SyncClient};
use pgrelay_protocol::Lsn;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// One transaction applied by one client: its PostgreSQL commit time,
/// when the client read its frame and when its SQLite transaction
/// committed (µs since the Unix epoch).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Delivery {
    pub(crate) commit_us: i64,
    pub(crate) received_us: i64,
    pub(crate) applied_us: i64,
}

impl Delivery {
    /// Commit → applied, in µs.
    pub(crate) fn latency_us(&self) -> u32 {
        u32::try_from((self.applied_us - self.commit_us).max(0)).unwrap_or(u32::MAX)
    }
}

struct Member {
    replica: Replica,
    lsn: Arc<AtomicU64>,
    caught_up: Arc<AtomicBool>,
    /// Changes this client applied, as its events told (short when its
    /// watcher lagged: then its replica is counted instead).
    applied: Arc<AtomicU64>,
    lagged: Arc<AtomicBool>,
}

pub(crate) struct Fleet {
    members: Vec<Member>,
    stop: watch::Sender<bool>,
    runs: JoinSet<Result<(), pgrelay_client::ClientError>>,
    /// Each client's deliveries, with the index of the node it connects to.
    watchers: JoinSet<(usize, Vec<Delivery>)>,
    /// Changes applied to replicas, summed over clients.
    pub(crate) applied_changes: Arc<AtomicU64>,
    /// Transactions applied to replicas, summed over clients (as events
    /// told: short by what watchers missed).
    pub(crate) applied_transactions: Arc<AtomicU64>,
    /// Applied events a watcher missed because it fell behind (its latency
    /// samples are lost, not its data: completeness is checked on replicas).
    pub(crate) missed_events: Arc<AtomicU64>,
}

impl Fleet {
    /// Starts `count` clients, client `i` (id `PREFIX-i`) connecting to
    /// node `addrs[i % addrs.len()]` with token `tokens[i]` (none when
    /// `tokens` is shorter), replicas in `dir`.
    pub(crate) async fn start_spread(
        prefix: &str,
        addrs: &[std::net::SocketAddr],
        count: usize,
        dir: &Path,
        record_latency: bool,
        tokens: &[String],
    ) -> anyhow::Result<Fleet> {
        anyhow::ensure!(!addrs.is_empty(), "a fleet needs a server");
        let (stop, stopped) = watch::channel(false);
        let mut fleet = Fleet {
            members: Vec::with_capacity(count),
            stop,
            runs: JoinSet::new(),
            watchers: JoinSet::new(),
            applied_changes: Arc::new(AtomicU64::new(0)),
            applied_transactions: Arc::new(AtomicU64::new(0)),
            missed_events: Arc::new(AtomicU64::new(0)),
        };
        for i in 0..count {
            let node = i % addrs.len();
            let mut config = ClientConfig::new(
                format!("ws://{}", addrs[node]),
                dir.join(format!("replica-{i}.sqlite")),
            );
            config.client_id = Some(format!("{prefix}-{i}"));
            config.token = tokens.get(i).cloned().map(Into::into);
            config.backoff_base = Duration::from_millis(100);
            config.backoff_cap = Duration::from_secs(2);
            let client = Arc::new(SyncClient::open(config).await?);
            let member = Member {
                replica: client.replica().clone(),
                lsn: Arc::new(AtomicU64::new(0)),
                caught_up: Arc::new(AtomicBool::new(false)),
                applied: Arc::new(AtomicU64::new(0)),
                lagged: Arc::new(AtomicBool::new(false)),
            };
            let mut events = client.subscribe();
            let (lsn, caught_up) = (Arc::clone(&member.lsn), Arc::clone(&member.caught_up));
            let (own, lagged) = (Arc::clone(&member.applied), Arc::clone(&member.lagged));
            let (applied, transactions, missed) = (
                Arc::clone(&fleet.applied_changes),
                Arc::clone(&fleet.applied_transactions),
                Arc::clone(&fleet.missed_events),
            );
            fleet.watchers.spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    match events.recv().await {
                        Ok(Event::Applied {
                            lsn: reached,
                            transactions: txs,
                            changes,
                            commit_times_us,
                            received_at_us,
                            applied_at_us,
                            ..
                        }) => {
                            lsn.store(reached.0, Ordering::Relaxed);
                            applied.fetch_add(changes as u64, Ordering::Relaxed);
                            own.fetch_add(changes as u64, Ordering::Relaxed);
                            transactions.fetch_add(txs as u64, Ordering::Relaxed);
                            if record_latency {
                                latencies.extend(commit_times_us.iter().zip(&received_at_us).map(
                                    |(&commit_us, &received_us)| Delivery {
                                        commit_us,
                                        received_us,
                                        applied_us: applied_at_us,
                                    },
                                ));
                            }
                        }
                        Ok(Event::CaughtUp { lsn: reached }) => {
                            lsn.fetch_max(reached.0, Ordering::Relaxed);
                            caught_up.store(true, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(RecvError::Lagged(n)) => {
                            missed.fetch_add(n, Ordering::Relaxed);
                            lagged.store(true, Ordering::Relaxed);
                        }
                        Err(RecvError::Closed) => return (node, latencies),
                    }
                }
            });
            let stopped = stopped.clone();
            fleet.runs.spawn(async move { client.run(stopped).await });
            fleet.members.push(member);
        }
        Ok(fleet)
    }

    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }

    /// Waits until every client has caught up with the server once.
    pub(crate) async fn wait_connected(&self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_until(timeout, "every client to connect and catch up", |m| {
            m.caught_up.load(Ordering::Relaxed)
        })
        .await
    }

    /// Waits until every replica has applied everything up to `head`.
    pub(crate) async fn wait_at(&self, head: Lsn, timeout: Duration) -> anyhow::Result<()> {
        self.wait_until(timeout, &format!("every replica to reach {head}"), |m| {
            m.lsn.load(Ordering::Relaxed) >= head.0
        })
        .await
    }

    async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Member) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let behind = self.members.iter().filter(|m| !done(m)).count();
            if behind == 0 {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}: {behind} of {} still waiting",
                self.members.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every client has applied `changes` changes: by its
    /// events, or, for a client whose watcher lagged, by the rows of
    /// `table` in its replica (each change a new row).
    pub(crate) async fn wait_applied(
        &self,
        changes: u64,
        table: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut waiting: Vec<&Member> = self.members.iter().collect();
        let mut next_count = Instant::now();
        loop {
            let count_rows = Instant::now() >= next_count;
            let mut still = Vec::with_capacity(waiting.len());
            for m in waiting {
                let done = m.applied.load(Ordering::Relaxed) >= changes
                    || (count_rows
                        && m.lagged.load(Ordering::Relaxed)
                        && rows_of(&m.replica, table).await? >= changes);
                if !done {
                    still.push(m);
                }
            }
            waiting = still;
            if waiting.is_empty() {
                return Ok(());
            }
            if count_rows {
                next_count = Instant::now() + Duration::from_millis(500);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {changes} changes: {} of {} clients short",
                waiting.len(),
                self.members.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Rows of `table` in each replica.
    pub(crate) async fn row_counts(&self, table: &str) -> anyhow::Result<Vec<i64>> {
        let mut counts = Vec::with_capacity(self.members.len());
        for member in &self.members {
            counts.push(i64::try_from(rows_of(&member.replica, table).await?)?);
        }
        Ok(counts)
    }

    /// Each replica's stored LSN, for diagnosing a short replica.
    pub(crate) async fn positions(&self) -> anyhow::Result<Vec<Option<Lsn>>> {
        let mut out = Vec::with_capacity(self.members.len());
        for member in &self.members {
            out.push(member.replica.state().await?.lsn);
        }
        Ok(out)
    }

    /// Stops every client; returns every recorded delivery.
    pub(crate) async fn stop(self) -> anyhow::Result<Vec<Delivery>> {
        Ok(self.stop_per_node().await?.into_iter().flatten().collect())
    }

    /// Stops every client; returns the recorded deliveries of the clients
    /// of each node (by its index in the addresses the fleet started with).
    pub(crate) async fn stop_per_node(mut self) -> anyhow::Result<Vec<Vec<Delivery>>> {
        let _ = self.stop.send(true);
        while let Some(joined) = self.runs.join_next().await {
            joined??;
        }
        drop(self.members);
        let mut per_node: Vec<Vec<Delivery>> = Vec::new();
        while let Some(joined) = self.watchers.join_next().await {
            let (node, latencies) = joined?;
            if per_node.len() <= node {
                per_node.resize_with(node + 1, Vec::new);
            }
            per_node[node].extend(latencies);
        }
        Ok(per_node)
    }
}

/// Rows of `table` in `replica` (0 when it has none).
async fn rows_of(replica: &Replica, table: &str) -> anyhow::Result<u64> {
    let status = replica.status().await?;
    let rows = status
        .tables
        .iter()
        .find(|t| t.table == table)
        .and_then(|t| t.rows)
        .unwrap_or(0);
    Ok(u64::try_from(rows).unwrap_or(0))
}

/// Percentile `p` (0..=100) of sorted samples.
pub(crate) fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = super::report::index((p / 100.0) * (sorted.len() - 1) as f64);
    sorted[rank.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles_of_sorted_samples() {
        let samples: Vec<u32> = (1..=100).collect();
        assert_eq!(super::percentile(&samples, 0.0), 1);
        assert_eq!(super::percentile(&samples, 50.0), 51);
        assert_eq!(super::percentile(&samples, 100.0), 100);
        assert_eq!(super::percentile(&[], 99.0), 0);
    }
}
