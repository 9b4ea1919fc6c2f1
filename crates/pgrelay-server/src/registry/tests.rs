//! The same checks against both backends; the Redis ones use the real
//! Redis (`PGRELAY_TEST_REDIS_URL`, default 127.0.0.1:6379) with keys under
//! a prefix of their own, removed afterwards.

use std::time::{Duration, Instant};

use pgrelay_protocol::Lsn;

use super::*;
use std::sync::Arc;

fn redis_url() -> String {
    std::env::var("PGRELAY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn unique_prefix(test: &str) -> String {
    format!("pgrelay-test:{test}:{:016x}:", rand::random::<u64>())
}

fn record_of(id: &str, session: &str) -> ClientRecord {
    ClientRecord {
        client_id: id.to_owned(),
        node: "node-a".to_owned(),
        session: session.to_owned(),
        connected_at_ms: 1,
        last_lsn: Lsn(42),
        last_activity_ms: 2,
    }
}

async fn lifecycle(registry: &dyn Registry) {
    let a = record_of("a", "s1");
    registry.register(&a).await.unwrap();
    registry.register(&record_of("b", "s2")).await.unwrap();
    assert_eq!(registry.get("a").await.unwrap(), Some(a.clone()));
    let ids: Vec<String> = registry
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.client_id)
        .collect();
    assert_eq!(ids, ["a", "b"]);

    // A refresh writes new metadata for the session holding the record.
    let mut fresher = a.clone();
    fresher.last_lsn = Lsn(99);
    fresher.last_activity_ms = 3;
    assert!(registry
        .refresh(std::slice::from_ref(&fresher))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(registry.get("a").await.unwrap(), Some(fresher.clone()));

    // Client a connects again (session s3): the old session's refresh learns
    // it was replaced, and its unregister leaves the new record alone.
    let again = record_of("a", "s3");
    registry.register(&again).await.unwrap();
    assert_eq!(registry.refresh(&[fresher]).await.unwrap(), ["a"]);
    registry.unregister("a", "s1").await.unwrap();
    assert_eq!(registry.get("a").await.unwrap(), Some(again));
    registry.unregister("a", "s3").await.unwrap();
    assert_eq!(registry.get("a").await.unwrap(), None);

    assert!(registry.forget("b").await.unwrap());
    assert!(!registry.forget("b").await.unwrap());
    assert!(registry.list().await.unwrap().is_empty());
}

async fn expiry(registry: &dyn Registry) {
    registry.register(&record_of("short", "s")).await.unwrap();
    assert!(registry.get("short").await.unwrap().is_some());
    let deadline = Instant::now() + Duration::from_secs(10);
    while registry.get("short").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the record never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(registry.list().await.unwrap().is_empty());
}

fn embedded(ttl: Duration, sessions: &Arc<SessionTable>) -> EmbeddedRegistry {
    EmbeddedRegistry::new(
        ttl,
        Arc::clone(sessions),
        "node-a".into(),
        "node-a#1".into(),
    )
}

#[tokio::test]
async fn embedded_lifecycle() {
    let sessions = Arc::new(SessionTable::default());
    lifecycle(&embedded(Duration::from_secs(60), &sessions)).await;
    expiry(&embedded(Duration::from_millis(300), &sessions)).await;
}

#[tokio::test]
async fn embedded_reads_live_sessions_from_the_session_table() {
    let sessions = Arc::new(SessionTable::default());
    let registry = embedded(Duration::from_secs(60), &sessions);
    let live = sessions.open("here", Lsn(5));
    let mine = super::record("node-a", "node-a#1", &live);
    registry.register(&mine).await.unwrap();
    assert_eq!(registry.get("here").await.unwrap(), Some(mine.clone()));
    assert_eq!(registry.list().await.unwrap(), std::slice::from_ref(&mine));
    // Nothing is stored for it: closing the session is unregistering.
    assert!(registry.stored().is_empty());
    sessions.close(&live);
    registry.unregister("here", &mine.session).await.unwrap();
    assert_eq!(registry.get("here").await.unwrap(), None);
}

#[tokio::test]
async fn redis_lifecycle() {
    let prefix = unique_prefix("lifecycle");
    let registry = RedisRegistry::new(&redis_url(), &prefix, Duration::from_secs(60)).unwrap();
    lifecycle(&registry).await;
    let short = RedisRegistry::new(&redis_url(), &prefix, Duration::from_secs(1)).unwrap();
    expiry(&short).await;
}

#[tokio::test]
async fn redis_lists_many_and_survives_a_bad_url() {
    let prefix = unique_prefix("many");
    let registry = RedisRegistry::new(&redis_url(), &prefix, Duration::from_secs(60)).unwrap();
    let records: Vec<ClientRecord> = (0..1200)
        .map(|i| record_of(&format!("c{i:04}"), "s"))
        .collect();
    assert!(registry.refresh(&records).await.unwrap().is_empty());
    assert_eq!(registry.list().await.unwrap(), records);
    for r in &records {
        registry.unregister(&r.client_id, "s").await.unwrap();
    }
    assert!(registry.list().await.unwrap().is_empty());

    let nowhere =
        RedisRegistry::new("redis://127.0.0.1:1", &prefix, Duration::from_secs(60)).unwrap();
    assert!(matches!(nowhere.list().await, Err(RegistryError::Io(_))));
}

#[tokio::test]
async fn redis_credentials_come_from_the_url_and_are_never_printed() {
    let prefix = unique_prefix("auth");
    // Test Redis has no password: a password in the URL is sent (AUTH) and
    // refused, so the registry reports Redis's refusal, not a success.
    let url = redis_url().replacen("redis://", "redis://:registry-password-1@", 1);
    let with_password = RedisRegistry::new(&url, &prefix, Duration::from_secs(60)).unwrap();
    let refused = with_password.list().await.unwrap_err().to_string();
    assert!(!refused.contains("registry-password-1"), "{refused}");
    assert!(refused.to_ascii_uppercase().contains("AUTH"), "{refused}");

    let Err(bad) = RedisRegistry::new(
        "redis://:registry-password-2@127.0.0.1:6379/not-a-db",
        &prefix,
        Duration::from_secs(60),
    ) else {
        panic!("a URL with a bad database number was accepted");
    };
    assert!(matches!(bad, RegistryError::Url(_)));
    assert!(!bad.to_string().contains("registry-password-2"), "{bad}");
}
