//! The HTTP side: info without an upgrade, refusals before the upgrade,
//! the payload token, the admin API and `pgrelay admin store`.

use std::net::SocketAddr;

use serde_json::{json, Value};

use super::client::{config, events, start, store_id, sync_url, Sock};
use crate::support::BIN;

/// Status and body of a plain request.
async fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    pgrelay::cmd::admin::http(&format!("http://{addr}"), token, method, path)
        .await
        .expect("an HTTP answer")
}

/// `pgrelay admin ...` as an operator runs it (without blocking the
/// runtime the in-process server runs on).
async fn cli(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .output()
        .await
        .expect("running pgrelay admin")
}

async fn upgrade_status(url: &str) -> u16 {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("connecting to {url}: {e}"),
    }
}

#[tokio::test]
async fn info_without_upgrade_and_400_for_bad_store_or_payload() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let (status, body) = http(addr, "GET", "/livestore", None).await;
    assert_eq!(status, 200);
    assert!(body.contains("LiveStore"), "{body}");
    let (status, _) = http(addr, "GET", "/websocket", None).await;
    assert_eq!(status, 200);

    assert_eq!(
        upgrade_status(&format!("ws://{addr}/livestore?transport=ws")).await,
        400
    );
    assert_eq!(
        upgrade_status(&format!("ws://{addr}/livestore?storeId=&transport=ws")).await,
        400
    );
    assert_eq!(
        upgrade_status(&format!(
            "ws://{addr}/livestore?storeId=s&payload=%257Bnope&transport=ws"
        ))
        .await,
        400
    );
    assert_eq!(
        upgrade_status(&format!("ws://{addr}/livestore?storeId=s&transport=http")).await,
        400
    );
    assert_eq!(
        upgrade_status(&sync_url(addr, "/livestore", "s", None)).await,
        101
    );
    assert_eq!(
        upgrade_status(&sync_url(addr, "/websocket", "s", None)).await,
        101
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_payload_token_is_checked_before_the_upgrade() {
    let mut cfg = config();
    cfg.eventlog.auth_token = Some("t0ken".into());
    let server = start(cfg).await;
    let addr = server.local_addr();
    assert_eq!(
        upgrade_status(&sync_url(addr, "/livestore", "s", None)).await,
        401
    );
    let wrong = sync_url(addr, "/livestore", "s", Some(r#"{"authToken":"nope"}"#));
    assert_eq!(upgrade_status(&wrong).await, 403);
    let wrong_v03 = sync_url(addr, "/websocket", "s", Some(r#"{"authToken":"nope"}"#));
    assert_eq!(upgrade_status(&wrong_v03).await, 403);
    // The right token (the test client always sends it) is let in.
    let mut sock = Sock::open(addr, "/livestore", "s").await;
    sock.send(json!({"_tag": "Ping"})).await;
    assert_eq!(sock.recv().await["_tag"], "Pong");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn admin_info_and_reset_over_http_and_the_cli() {
    let mut cfg = config();
    cfg.server.admin_token = Some("admin-secret-for-tests".into());
    let server = start(cfg).await;
    let addr = server.local_addr();
    let store = store_id("admin");
    let mut a = Sock::open(addr, "/livestore", &store).await;
    a.pull("0", None, true).await;
    let backend = a.recv().await["values"][0]["backendId"]
        .as_str()
        .unwrap()
        .to_owned();
    a.push("1", &events(0, 4, "w"), Some(&backend)).await;
    a.until_exit("1", &mut Vec::new()).await;

    let path = format!("/admin/stores/{store}");
    assert_eq!(http(addr, "GET", &path, None).await.0, 401);
    assert_eq!(http(addr, "GET", &path, Some("wrong-secret")).await.0, 401);
    let (status, body) = http(addr, "GET", &path, Some("admin-secret-for-tests")).await;
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["head"], 4);
    assert_eq!(info["events"], 4);
    assert_eq!(info["sockets"], 1);
    assert_eq!(info["backend_id"], backend.as_str());

    // The CLI, as an operator runs it.
    let server_arg = format!("http://{addr}");
    let out = cli(&[
        "admin",
        "store",
        "info",
        &store,
        "--server",
        &server_arg,
        "--admin-token",
        "admin-secret-for-tests",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["head"], 4);
    let out = cli(&[
        "admin",
        "store",
        "reset",
        &store,
        "--server",
        &server_arg,
        "--admin-token",
        "wrong-secret",
    ])
    .await;
    assert!(!out.status.success(), "a wrong token is refused");
    let out = cli(&[
        "admin",
        "store",
        "reset",
        &store,
        "--server",
        &server_arg,
        "--admin-token",
        "admin-secret-for-tests",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reset: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reset["head"], 0);
    assert_ne!(
        reset["backend_id"],
        backend.as_str(),
        "a reset gives a new backend id"
    );

    // The live socket is closed so its client resyncs; coming back with the
    // old backend id is refused with BackendIdMismatchError.
    while a.next().await.is_some() {}
    let mut again = Sock::open(addr, "/livestore", &store).await;
    again.pull("0", Some((&backend, 4)), true).await;
    let exit = again.until_exit("0", &mut Vec::new()).await;
    assert_eq!(
        exit["exit"]["cause"]["error"]["_tag"],
        "BackendIdMismatchError"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_admin_api_is_off_without_a_token() {
    let server = start(config()).await;
    let (status, body) = http(
        server.local_addr(),
        "GET",
        "/admin/stores/x",
        Some("anything"),
    )
    .await;
    assert_eq!(status, 404);
    assert!(body.contains("--admin-token"), "{body}");
    server.shutdown().await.unwrap();
}
