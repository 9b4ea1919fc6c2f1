//! A token that expires mid-session ends the session at expiry, and the
//! client reconnects with a fresh token from its provider without losing
//! anything.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use pgrelay_client::{Event, TokenProvider};
use serde_json::json;

use super::tokens::RULES;
use super::{now, replica_rows, start_client, start_server, token, WAIT};
use crate::support::{wait_for, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_token_ends_the_session_and_a_fresh_one_resumes_it() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE todos (id int PRIMARY KEY, tenant text NOT NULL, title text)")
        .await;
    let server = start_server(&world, RULES).await;
    let lifetime = 4;
    let current = Arc::new(Mutex::new(token(
        json!({"tenant": "t1", "sub": "carol", "exp": now() + lifetime}),
    )));
    let provided = Arc::clone(&current);
    let provider = TokenProvider::new(move || {
        let token = provided.lock().unwrap().clone();
        async move { Ok(token) }
    });
    let path = world.replica_path("carol");
    let client = start_client(server.local_addr(), &path, "carol-1", provider).await;
    let mut events = client.client.subscribe();
    let connected_at = Instant::now();
    world
        .exec("INSERT INTO todos VALUES (1, 't1', 'one'), (2, 't2', 'hidden')")
        .await;
    wait_for("row 1 in the replica", WAIT, || async {
        replica_rows(&path, "todos").contains_key(&1).then_some(())
    })
    .await;
    // The provider has a fresh token from now on; the session still runs
    // on the old one, until it expires.
    *current.lock().unwrap() = token(json!({"tenant": "t1", "sub": "carol"}));
    let writer = {
        let url = world.url().to_owned();
        tokio::spawn(async move {
            let info = pgrelay_pg::ConnInfo::parse(&url).unwrap();
            let db = pgrelay_pg::connect(&info).await.unwrap();
            for id in 3..200 {
                db.execute(
                    "INSERT INTO todos VALUES ($1, CASE WHEN $1 % 3 = 0 THEN 't2' ELSE 't1' END, 'row')",
                    &[&id],
                )
                .await
                .unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            }
        })
    };
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Event::Disconnected { error, .. }) = events.recv().await {
                return error;
            }
        }
    })
    .await
    .expect("the session to end");
    let after = connected_at.elapsed().as_secs_f64();
    assert!(ended.contains("TokenExpired"), "{ended}");
    assert!(
        after > (lifetime - 2) as f64 && after < (lifetime + 3) as f64,
        "the session ended {after:.1} s after connecting; the token lived {lifetime} s"
    );
    writer.await.unwrap();
    let want = world
        .count("SELECT count(*) FROM todos WHERE tenant = 't1'")
        .await;
    wait_for(
        "every t1 row, and only those, in the replica",
        WAIT,
        || async {
            let rows = replica_rows(&path, "todos");
            let only_t1 = rows.values().all(|r| r["tenant"] == "t1");
            assert!(only_t1, "a t2 row reached the replica");
            (rows.len() as i64 == want).then_some(())
        },
    )
    .await;
    wait_for("the expiry in the audit log", WAIT, || async {
        (world
            .count("SELECT count(*) FROM pgrelay.audit_log WHERE action = 'token_expired' AND subject = 'carol'")
            .await
            == 1)
            .then_some(())
    })
    .await;
    client.stop().await;
    server.shutdown().await.unwrap();
}

/// The one more read of the token provider finds a good token: the sync
/// goes on and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_when_caught_up_asks_the_provider_once_more() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE todos (id int PRIMARY KEY, tenant text NOT NULL, title text)")
        .await;
    world.exec("INSERT INTO todos VALUES (1, 't1', 'a')").await;
    let server = start_server(&world, RULES).await;
    let asked = Arc::new(Mutex::new(0u32));
    let counter = Arc::clone(&asked);
    let provider = TokenProvider::new(move || {
        let counter = Arc::clone(&counter);
        async move {
            let mut n = counter.lock().unwrap();
            *n += 1;
            // A token signed with another key first: `unauthorized`.
            Ok(if *n == 1 {
                encode(
                    &Header::new(Algorithm::HS256),
                    &json!({"tenant": "t1", "exp": now() + 600}),
                    &EncodingKey::from_secret(b"not the server's secret, but long enough"),
                )
                .unwrap()
            } else {
                token(json!({"tenant": "t1", "sub": "frank"}))
            })
        }
    });
    let path = world.replica_path("frank");
    let mut config =
        pgrelay_client::ClientConfig::new(format!("ws://{}", server.local_addr()), &path);
    config.client_id = Some("frank-1".into());
    config.token_provider = Some(provider);
    config.exit_when_caught_up = true;
    let client = pgrelay_client::SyncClient::open(config).await.unwrap();
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::time::timeout(WAIT, client.run(stopped))
        .await
        .expect("the sync to finish")
        .expect("the sync to succeed with the second token");
    assert_eq!(*asked.lock().unwrap(), 2);
    assert_eq!(replica_rows(&path, "todos").len(), 1);
    server.shutdown().await.unwrap();
}
