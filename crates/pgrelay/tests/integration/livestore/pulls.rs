//! Pulls on one socket: several at once, each with its own request id,
//! cursor and paging; a pull's subscription goes when the pull does; and a
//! push numbers its events from the head.

use serde_json::{json, Value};

use super::client::{chunk_seqs, config, events, start, store_id, Sock};

const ADMIN: &str = "admin-secret-for-tests";

async fn info(addr: std::net::SocketAddr, store: &str) -> Value {
    let (status, body) = pgrelay::cmd::admin::http(
        &format!("http://{addr}"),
        Some(ADMIN),
        "GET",
        &format!("/admin/stores/{store}"),
    )
    .await
    .expect("admin info");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

/// Reads frames until `want` has seen sequence numbers up to `head` under
/// each request id in it, returning every id's sequence numbers and exits.
async fn read_until(
    sock: &mut Sock,
    want: &[(&str, i64)],
) -> std::collections::HashMap<String, (Vec<i64>, bool)> {
    let mut seen: std::collections::HashMap<String, (Vec<i64>, bool)> = Default::default();
    let done = |seen: &std::collections::HashMap<String, (Vec<i64>, bool)>| {
        want.iter().all(|(id, head)| {
            seen.get(*id)
                .is_some_and(|(s, _)| s.last().copied().unwrap_or(0) >= *head)
        })
    };
    while !done(&seen) {
        let frame = sock.recv().await;
        let id = frame["requestId"].as_str().unwrap_or_default().to_owned();
        let entry = seen.entry(id).or_default();
        match frame["_tag"].as_str() {
            Some("Chunk") => entry.0.extend(chunk_seqs(&frame)),
            Some("Exit") => entry.1 = true,
            _ => {}
        }
    }
    seen
}

#[tokio::test]
async fn two_live_pulls_and_a_one_off_pull_on_one_socket_each_get_their_events() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let store = store_id("pulls");
    let mut writer = Sock::open(addr, "/livestore", &store).await;
    writer.pull("0", None, true).await;
    let backend = writer.recv().await["values"][0]["backendId"]
        .as_str()
        .unwrap()
        .to_owned();
    writer.push("1", &events(0, 150, "w"), Some(&backend)).await;
    writer.until_exit("1", &mut Vec::new()).await;

    // The app's live pull from the start, devtools' live pull from 120,
    // and a one-off pull from 10: all on one socket.
    let mut app = Sock::open(addr, "/livestore", &store).await;
    app.pull("a", None, true).await;
    app.pull("d", Some((&backend, 120)), true).await;
    app.pull("o", Some((&backend, 10)), false).await;
    let seen = read_until(&mut app, &[("a", 150), ("d", 150), ("o", 150)]).await;
    assert_eq!(seen["a"].0, (1..=150).collect::<Vec<_>>());
    assert_eq!(seen["d"].0, (121..=150).collect::<Vec<_>>());
    assert_eq!(seen["o"].0, (11..=150).collect::<Vec<_>>());
    assert!(!seen["a"].1 && !seen["d"].1, "live pulls do not end");

    // Both live pulls receive the next push, each exactly once; the one-off
    // pull has ended (its Exit may come with the push's batch).
    writer.push("2", &events(150, 2, "w"), Some(&backend)).await;
    writer.until_exit("2", &mut Vec::new()).await;
    let live = read_until(&mut app, &[("a", 152), ("d", 152)]).await;
    assert_eq!(live["a"].0, vec![151, 152]);
    assert_eq!(live["d"].0, vec![151, 152]);
    assert!(
        seen["o"].1 || live.get("o").is_some_and(|(s, exit)| s.is_empty() && *exit),
        "the one-off pull ends with an Exit and nothing after its history"
    );

    // Interrupting one live pull leaves the other running.
    app.send(json!({"_tag": "Interrupt", "requestId": "d"}))
        .await;
    let exit = app.recv().await;
    assert_eq!(exit["requestId"], "d");
    assert_eq!(exit["exit"]["cause"]["_tag"], "Interrupt");
    writer.push("3", &events(152, 1, "w"), Some(&backend)).await;
    writer.until_exit("3", &mut Vec::new()).await;
    let frame = app.recv().await;
    assert_eq!(frame["requestId"], "a");
    assert_eq!(chunk_seqs(&frame), vec![153]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_pull_drops_its_subscription_when_it_ends_or_its_socket_closes() {
    let mut cfg = config();
    cfg.server.admin_token = Some(ADMIN.into());
    let server = start(cfg).await;
    let addr = server.local_addr();
    let store = store_id("leak");
    let mut sock = Sock::open(addr, "/livestore", &store).await;
    // Live pulls interrupted one after another on a quiet store.
    for i in 0..200 {
        let id = format!("p{i}");
        sock.pull(&id, None, true).await;
        assert_eq!(sock.recv().await["requestId"], id.as_str());
        sock.send(json!({"_tag": "Interrupt", "requestId": id}))
            .await;
        assert_eq!(sock.recv().await["_tag"], "Exit");
    }
    sock.pull("kept", None, true).await;
    sock.recv().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let subscriptions = info(addr, &store).await["subscriptions"].as_i64();
        if subscriptions == Some(1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ended pulls still subscribed: {subscriptions:?}"
        );
        tokio::task::yield_now().await;
    }
    // The socket closes: its last subscription goes too.
    drop(sock);
    loop {
        let now = info(addr, &store).await;
        if now["subscriptions"] == 0 && now["sockets"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a closed socket's pull still subscribed: {now}"
        );
        tokio::task::yield_now().await;
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_push_that_skips_sequence_numbers_is_refused_and_the_store_goes_on() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let store = store_id("seq");
    let mut sock = Sock::open(addr, "/livestore", &store).await;
    sock.pull("0", None, true).await;
    let backend = sock.recv().await["values"][0]["backendId"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut huge = events(0, 1, "evil");
    huge[0]["seqNum"] = json!(i64::MAX);
    sock.push("1", &huge, Some(&backend)).await;
    let exit = sock.until_exit("1", &mut Vec::new()).await;
    let error = &exit["exit"]["cause"]["error"];
    assert_eq!(error["_tag"], "UnknownError", "{exit}");
    assert!(error["cause"].as_str().unwrap().contains("+ 1"), "{exit}");
    // The next client's push, numbered from the head, is accepted.
    sock.push("2", &events(0, 2, "good"), Some(&backend)).await;
    let mut seqs = Vec::new();
    let exit = sock.until_exit("2", &mut seqs).await;
    assert_eq!(exit["exit"]["_tag"], "Success", "{exit}");
    assert_eq!(seqs, vec![1, 2]);
    server.shutdown().await.unwrap();
}
