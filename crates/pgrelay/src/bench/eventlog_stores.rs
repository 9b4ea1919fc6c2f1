//! `bench eventlog`'s store phase: what each LiveStore store costs the
//! server in memory. A fresh in-process server (SQLite file, no
//! PostgreSQL) is asked for `--stores` distinct store ids, one short socket
//! each (open, pull, close, as a client touching a store once), and the
//! process's RSS is sampled against stores touched. Up to
//! `--max-stores` every store stays in memory, so the slope there is the
//! cost of a held store; past it idle stores are evicted and RSS should
//! stay flat. The RSS before any store is the reference.

use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use pgrelay_eventlog::{EventLogConfig, EventLogStorage};
use pgrelay_server::ServerConfig;
use serde_json::json;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

/// Sockets touching stores at once.
const CONCURRENCY: usize = 16;
/// RSS samples taken over the run.
const SAMPLES: usize = 20;

pub(crate) struct StoreCost {
    /// (stores touched, RSS bytes), the first at 0.
    pub(crate) samples: Vec<(usize, u64)>,
    pub(crate) max_stores: usize,
}

impl StoreCost {
    /// RSS bytes per store while every store is held (up to the bound).
    pub(crate) fn bytes_per_held_store(&self) -> f64 {
        let base = self.samples[0].1 as f64;
        let held: Vec<&(usize, u64)> = self
            .samples
            .iter()
            .filter(|(n, _)| *n > 0 && *n <= self.max_stores)
            .collect();
        match held.last() {
            Some((n, rss)) => (*rss as f64 - base) / *n as f64,
            None => 0.0,
        }
    }

    /// RSS growth from the bound to the end, bytes (eviction at work).
    pub(crate) fn growth_past_bound(&self) -> Option<i64> {
        let at_bound = self.samples.iter().rfind(|(n, _)| *n <= self.max_stores)?;
        let last = self.samples.last()?;
        (last.0 > at_bound.0).then(|| {
            i64::try_from(last.1).unwrap_or(i64::MAX)
                - i64::try_from(at_bound.1).unwrap_or(i64::MAX)
        })
    }
}

pub(crate) async fn measure(
    stores: usize,
    max_stores: usize,
    sync_full: bool,
) -> anyhow::Result<StoreCost> {
    let dir = tempfile::tempdir()?;
    let mut server = ServerConfig::without_database();
    server.listen = "127.0.0.1:0".parse()?;
    server.connect_rate = 0.0;
    let eventlog = EventLogConfig {
        storage: EventLogStorage::Sqlite(Some(dir.path().join("stores.sqlite"))),
        sqlite_sync_full: sync_full,
        max_stores,
        ..EventLogConfig::default()
    };
    let server = crate::cmd::serve::start(crate::cmd::serve::ServeConfig {
        server,
        eventlog,
        eventlog_auth: None,
    })
    .await?;
    let url = format!("ws://{}/livestore", server.local_addr());
    let pid = std::process::id();
    let step = (stores / SAMPLES).max(1);
    let mut samples = vec![(0, super::proc_bytes(pid, "VmRSS")?)];
    let run = rand::random::<u32>();
    let mut touched = 0;
    while touched < stores {
        let upto = (touched + step).min(stores);
        let mut sockets = JoinSet::new();
        for i in touched..upto {
            if sockets.len() >= CONCURRENCY {
                if let Some(done) = sockets.join_next().await {
                    done??;
                }
            }
            let url = url.clone();
            sockets.spawn(async move { touch(&url, &format!("bench-{run}-{i}")).await });
        }
        while let Some(done) = sockets.join_next().await {
            done??;
        }
        touched = upto;
        samples.push((touched, super::proc_bytes(pid, "VmRSS")?));
        eprintln!(
            "  {touched} stores touched: RSS {} MiB",
            samples.last().map_or(0, |s| s.1) / 1_048_576
        );
    }
    server.shutdown().await?;
    Ok(StoreCost {
        samples,
        max_stores,
    })
}

/// One client touching a store once: open, pull its (empty) history, close.
async fn touch(url: &str, store: &str) -> anyhow::Result<()> {
    let mut ws = super::eventlog_wire::open(url, store).await?;
    let pull = json!({"_tag": "Request", "id": "0", "tag": "SyncWsRpc.Pull",
        "payload": {"storeId": store, "live": false, "cursor": {"_tag": "None"}},
        "traceId": "t", "spanId": "s", "sampled": false, "headers": []});
    ws.send(Message::Text(pull.to_string().into())).await?;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .context("waiting for the pull's answer")?;
        match frame {
            Some(Ok(Message::Text(text))) if text.contains("\"Exit\"") => break,
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("the server closed the socket"),
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}
