//! The faults: each is injected, held for a random time and healed; the
//! run then waits until the system has recovered (one capturing node, and
//! every replica holding a transfer committed after the heal).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::proxy::Link;
use super::rng::Rng;
use super::World;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    KillCapturer,
    KillFollower,
    PauseCapturer,
    PauseFollower,
    RestartPgFast,
    RestartPgImmediate,
    CutClientLinks,
    DelayClientLinks,
    CutDatabaseLink,
    FreezeDatabaseLink,
    DelayDatabaseLink,
    KillClient,
}

impl Kind {
    pub(crate) const ALL: [Kind; 12] = [
        Kind::KillCapturer,
        Kind::KillFollower,
        Kind::PauseCapturer,
        Kind::PauseFollower,
        Kind::RestartPgFast,
        Kind::RestartPgImmediate,
        Kind::CutClientLinks,
        Kind::DelayClientLinks,
        Kind::CutDatabaseLink,
        Kind::FreezeDatabaseLink,
        Kind::DelayDatabaseLink,
        Kind::KillClient,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::KillCapturer => "SIGKILL capturing node",
            Kind::KillFollower => "SIGKILL following node",
            Kind::PauseCapturer => "SIGSTOP capturing node",
            Kind::PauseFollower => "SIGSTOP following node",
            Kind::RestartPgFast => "PostgreSQL fast restart",
            Kind::RestartPgImmediate => "PostgreSQL immediate restart",
            Kind::CutClientLinks => "cut clients-node link",
            Kind::DelayClientLinks => "delay clients-node link",
            Kind::CutDatabaseLink => "cut node-PostgreSQL link",
            Kind::FreezeDatabaseLink => "freeze node-PostgreSQL link",
            Kind::DelayDatabaseLink => "delay node-PostgreSQL link",
            Kind::KillClient => "SIGKILL client mid-apply",
        }
    }

    /// How often each fault comes up, relative to the others: the
    /// capturing node is hit more often than the rest.
    fn weight(self, own_postgres: bool) -> u64 {
        match self {
            Kind::KillCapturer => 4,
            Kind::PauseCapturer | Kind::CutDatabaseLink | Kind::CutClientLinks => 2,
            Kind::KillClient => 3,
            Kind::RestartPgFast | Kind::RestartPgImmediate => u64::from(own_postgres),
            _ => 1,
        }
    }

    pub(crate) fn choose(rng: &mut Rng, own_postgres: bool) -> Kind {
        let weights: Vec<u64> = Kind::ALL.iter().map(|k| k.weight(own_postgres)).collect();
        Kind::ALL[rng.weighted(&weights)]
    }
}

/// One fault as it happened.
#[derive(Clone, Debug)]
pub(crate) struct Fault {
    pub(crate) kind: Kind,
    pub(crate) target: String,
    /// Since the run started.
    pub(crate) at: Duration,
    /// Injected until healed.
    pub(crate) held: Duration,
    /// Healed until recovered; `None`: not within the deadline.
    pub(crate) recovered: Option<Duration>,
}

/// The node that captures now (by `/ready`), if any answers so.
async fn capturer(world: &World) -> Option<usize> {
    for (i, node) in world.nodes.iter().enumerate() {
        if node.role().await.as_deref() == Some("capturing") {
            return Some(i);
        }
    }
    None
}

/// The capturing node for `capturing`, else another; `None` when no node
/// is capturing and a follower was asked for the capturer.
async fn target(world: &World, rng: &mut Rng, capturing: bool) -> usize {
    let current = capturer(world).await;
    let n = world.nodes.len();
    match (capturing, current) {
        (true, Some(i)) => i,
        (false, Some(i)) if n > 1 => (i + 1 + rng.index(n - 1)) % n,
        _ => rng.index(n),
    }
}

/// Injects `kind`, holds it, heals it; returns the target and how long it
/// was held.
pub(crate) async fn inject(
    world: &mut World,
    kind: Kind,
    rng: &mut Rng,
) -> anyhow::Result<(String, Duration)> {
    let started = Instant::now();
    let target = match kind {
        Kind::KillCapturer | Kind::KillFollower => {
            let i = target(world, rng, kind == Kind::KillCapturer).await;
            let down = rng.millis(0, 2000);
            world.nodes[i].kill().await;
            tokio::time::sleep(down).await;
            world.nodes[i].restart().await?;
            world.nodes[i].name.clone()
        }
        Kind::PauseCapturer | Kind::PauseFollower => {
            let i = target(world, rng, kind == Kind::PauseCapturer).await;
            let hold = rng.millis(500, 6000);
            world.nodes[i].pause(true)?;
            tokio::time::sleep(hold).await;
            world.nodes[i].pause(false)?;
            world.nodes[i].name.clone()
        }
        Kind::RestartPgFast | Kind::RestartPgImmediate => {
            let cluster = world
                .cluster
                .clone()
                .ok_or_else(|| anyhow::anyhow!("PostgreSQL restarts need chaos's own cluster"))?;
            let fast = kind == Kind::RestartPgFast;
            tokio::task::spawn_blocking(move || {
                if fast {
                    cluster.restart_fast()
                } else {
                    cluster.restart_immediate()
                }
            })
            .await??;
            "PostgreSQL".to_owned()
        }
        Kind::CutClientLinks | Kind::DelayClientLinks => {
            let i = rng.index(world.nodes.len());
            let (link, hold) = if kind == Kind::CutClientLinks {
                (Link::Cut, rng.millis(0, 3000))
            } else {
                (Link::Delayed(rng.millis(50, 400)), rng.millis(1000, 5000))
            };
            world.nodes[i].clients.set(link);
            tokio::time::sleep(hold).await;
            world.nodes[i].clients.set(Link::Open);
            format!("clients of {}", world.nodes[i].name)
        }
        Kind::CutDatabaseLink | Kind::FreezeDatabaseLink | Kind::DelayDatabaseLink => {
            // Half the time the capturing node's link, which is what counts.
            let capturing = rng.below(2) == 0;
            let i = target(world, rng, capturing).await;
            let (link, hold) = match kind {
                Kind::CutDatabaseLink => (Link::Cut, rng.millis(0, 3000)),
                Kind::FreezeDatabaseLink => (Link::Frozen, rng.millis(1000, 8000)),
                _ => (Link::Delayed(rng.millis(20, 300)), rng.millis(1000, 5000)),
            };
            world.nodes[i].database.set(link);
            tokio::time::sleep(hold).await;
            world.nodes[i].database.set(Link::Open);
            format!("{} to PostgreSQL", world.nodes[i].name)
        }
        Kind::KillClient => {
            let i = rng.index(world.clients.len());
            // Right after a transfer commits, while the replicas apply it.
            let seen = world.committed.load(Ordering::SeqCst);
            let wait_until = Instant::now() + Duration::from_secs(2);
            while world.committed.load(Ordering::SeqCst) == seen && Instant::now() < wait_until {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(rng.millis(0, 15)).await;
            world.clients[i].kill().await;
            tokio::time::sleep(rng.millis(0, 1500)).await;
            world.clients[i].restart()?;
            world.clients[i].name.clone()
        }
    };
    Ok((target, started.elapsed()))
}

/// Waits until exactly one node captures and every replica holds a
/// transfer committed after this call; returns how long that took.
pub(crate) async fn recover(world: &World, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    let deadline = started + timeout;
    let healed_at = world.committed.load(Ordering::SeqCst);
    // A transfer committed after the heal.
    let probe = loop {
        let now = world.committed.load(Ordering::SeqCst);
        if now > healed_at {
            break now;
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    loop {
        let mut capturing = 0;
        for node in &world.nodes {
            if node.role().await.as_deref() == Some("capturing") {
                capturing += 1;
            }
        }
        let paths: Vec<_> = world.clients.iter().map(|c| c.db.clone()).collect();
        let reached = tokio::task::spawn_blocking(move || {
            paths
                .iter()
                .all(|p| newest_transfer(p).is_some_and(|t| t >= probe))
        })
        .await
        .unwrap_or(false);
        if capturing == 1 && reached {
            return Some(started.elapsed());
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The newest transfer a replica holds, read from its file.
fn newest_transfer(path: &std::path::Path) -> Option<i64> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.query_row("SELECT max(last_transfer) FROM chaos_accounts", [], |r| {
        r.get(0)
    })
    .ok()
}
