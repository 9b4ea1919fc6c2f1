//! Several nodes on one slot: one captures, the others follow the change
//! log; a stale capturer is fenced off; a dead one is taken over; signals
//! for a client reach the node that serves it; a node that loses Redis or
//! PostgreSQL says so and the others go on.

mod agreement;
mod failover;
mod faults;
mod fencing;
mod following;
mod signals;

use std::time::Duration;

use crate::support::tcp_proxy::TcpProxy;
use crate::support::{wait_for, World};

/// Inserts `rows` rows into `accounts`, one transaction each, from a
/// connection of its own (PostgreSQL directly, never through a node).
pub(crate) async fn write_accounts(url: String, rows: i64, pause: Duration) {
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    for id in 1..=rows {
        db.execute(
            "INSERT INTO accounts (id, balance) VALUES ($1, 100)",
            &[&id],
        )
        .await
        .unwrap();
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

/// The change log holds each of the `rows` inserts exactly once: no gap,
/// no duplicate.
pub(crate) async fn assert_log_exactly_once(world: &World, rows: i64) {
    let row = world
        .sql
        .query_one(
            "SELECT count(*), count(DISTINCT data->>'id'), min((data->>'id')::int8), max((data->>'id')::int8)
               FROM pgrelay.change_history WHERE table_name = 'public.accounts' AND operation = 'insert'",
            &[],
        )
        .await
        .unwrap();
    let got: (i64, i64, Option<i64>, Option<i64>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        got,
        (rows, rows, Some(1), Some(rows)),
        "the change log must hold each insert exactly once (count, distinct, min, max)"
    );
}

/// Waits until the change log holds at least `rows` rows.
pub(crate) async fn wait_for_logged(world: &World, rows: i64) {
    wait_for(
        "part of the rows in the log",
        Duration::from_secs(60),
        || async {
            (world
                .count("SELECT count(*) FROM pgrelay.change_history")
                .await
                >= rows)
                .then_some(())
        },
    )
    .await;
}

/// A proxy to the PostgreSQL of `url`, and `url` through it.
pub(crate) async fn proxy_to_postgres(url: &str) -> (TcpProxy, String) {
    let config: tokio_postgres::Config = url.parse().expect("the test database's URL");
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        other => panic!("the fencing test needs PostgreSQL over TCP, not {other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let upstream = tokio::net::lookup_host((host.as_str(), port))
        .await
        .expect("resolving PostgreSQL's host")
        .next()
        .expect("an address for PostgreSQL");
    let proxy = TcpProxy::start(upstream).await;
    let through = url.replacen(&format!("{host}:{port}"), &proxy.addr.to_string(), 1);
    assert_ne!(through, url, "the URL names {host}:{port}");
    (proxy, through)
}

/// A proxy to the test Redis, and the Redis URL through it.
pub(crate) async fn proxy_to_redis() -> (TcpProxy, String) {
    let url = crate::support::raw::redis_url();
    let host_port = url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .expect("the Redis URL's address")
        .to_owned();
    let upstream = tokio::net::lookup_host(host_port.as_str())
        .await
        .expect("resolving Redis's host")
        .next()
        .expect("an address for Redis");
    let proxy = TcpProxy::start(upstream).await;
    let through = url.replacen(&host_port, &proxy.addr.to_string(), 1);
    (proxy, through)
}
