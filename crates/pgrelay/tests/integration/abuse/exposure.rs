//! What a token holder (or anyone) could learn or break: a token whose
//! `exp` no clock holds, `/api/status` naming every table, refusals that
//! told a hidden row from a missing one or quoted another tenant's values.

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::{one_change, post_changes};
use crate::auth::{start_server, token, SECRET, WAIT};
use crate::support::raw::http;
use crate::support::World;

const RULES: &str = r#"
default = "deny"
[tables.rooms]
read  = "tenant = claims.tenant"
write = "tenant = claims.tenant"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_an_exp_past_2_63_is_refused_and_the_server_goes_on() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE rooms (id int PRIMARY KEY, tenant text NOT NULL)")
        .await;
    let server = start_server(&world, RULES).await;
    let addr = server.local_addr();
    for exp in [json!(1u64 << 63), json!(u64::MAX)] {
        let forged = token(json!({"tenant": "t1", "sub": "x", "exp": exp}));
        let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/api/sync"))
            .await
            .unwrap();
        let hello =
            json!({"type": "hello", "protocol_version": 1, "client_id": "far", "token": forged});
        socket
            .send(Message::Text(hello.to_string().into()))
            .await
            .unwrap();
        let mut texts = Vec::new();
        let code = tokio::time::timeout(WAIT, async {
            while let Some(Ok(message)) = socket.next().await {
                match message {
                    Message::Text(text) => texts.push(text.to_string()),
                    Message::Close(frame) => return frame.map(|f| u16::from(f.code)),
                    _ => {}
                }
            }
            None
        })
        .await
        .expect("an answer");
        assert_eq!(code, Some(1008), "exp {exp}: {texts:?}");
        assert!(
            texts.iter().any(|t| t.contains("exp is out of range")),
            "{texts:?}"
        );
    }
    // Still serving, sessions included.
    let good = token(json!({"tenant": "t1", "sub": "y"}));
    let spy = crate::auth::Spy::connect(addr, "after", &good, None).await;
    spy.wait_caught_up().await;
    assert_eq!(http(addr, None, "GET", "/health").await.0, 200);
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_under_auth_needs_the_admin_token() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE rooms (id int PRIMARY KEY, tenant text NOT NULL); CREATE TABLE salaries (id int PRIMARY KEY)")
        .await;
    let mut config = world.server_config();
    let mut auth = pgrelay_server::AuthConfig::new(pgrelay_server::JwtKey::Secret(SECRET.to_vec()));
    auth.rules = Some(RULES.to_owned());
    config.auth = Some(auth);
    config.admin_token = Some("admin-token-of-this-test".into());
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    let tenant = token(json!({"tenant": "t1", "sub": "u"}));
    for bearer in [None, Some(tenant.as_str())] {
        let (status, body) = http(addr, bearer, "GET", "/api/status").await;
        assert_eq!(status, 401, "{body}");
        assert!(!body.contains("salaries"), "{body}");
    }
    let (status, body) = http(addr, Some("admin-token-of-this-test"), "GET", "/api/status").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("public.salaries"), "{body}");
    server.shutdown().await.unwrap();

    // Under --auth without an admin token there is no one to show it to.
    let server = start_server(&world, RULES).await;
    let (status, body) = http(server.local_addr(), None, "GET", "/api/status").await;
    assert_eq!(status, 404, "{body}");
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_for_rows_out_of_scope_are_generic_and_quote_no_other_tenant() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE rooms (id int PRIMARY KEY, tenant text NOT NULL, during int4range,
                 EXCLUDE USING gist (during WITH &&));
             INSERT INTO rooms VALUES (1, 't2', '[1000,2000)');",
        )
        .await;
    let server = start_server(&world, RULES).await;
    let addr = server.local_addr();
    let t1 = token(json!({"tenant": "t1", "sub": "mallory"}));
    let result = |answer: &str| -> serde_json::Value {
        let answer: serde_json::Value = serde_json::from_str(answer).unwrap();
        answer["results"][0].clone()
    };

    // A booking overlapping another tenant's: refused, without PostgreSQL's
    // detail naming the other booking's range.
    let overlap = one_change(
        "mallory-1",
        "overlap",
        json!({"table": "public.rooms", "op": "insert",
               "new": {"id": "2", "tenant": "t1", "during": "[1500,1600)"}}),
    );
    let (status, answer) = post_changes(addr, Some(&t1), &overlap).await;
    assert_eq!(status, 200, "{answer}");
    let overlap = result(&answer);
    assert_eq!(overlap["status"], "rejected", "{answer}");
    assert!(
        !answer.contains("1000"),
        "leaked the other booking: {answer}"
    );

    // Updating another tenant's row and a row that does not exist: the same
    // refusal, so it tells nothing about which exists.
    let mut answers = Vec::new();
    for (tx, id) in [("hidden", "1"), ("missing", "99")] {
        let change = one_change(
            "mallory-1",
            tx,
            json!({"table": "public.rooms", "op": "update",
                   "old": {"id": id}, "new": {"during": "[5,6)"}}),
        );
        let (status, answer) = post_changes(addr, Some(&t1), &change).await;
        assert_eq!(status, 200, "{answer}");
        let r = result(&answer);
        assert_eq!(r["status"], "rejected", "{answer}");
        let shown: Vec<_> = r["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row["row"].clone())
            .collect();
        answers.push((
            r["code"].clone(),
            r["reason"].as_str().unwrap().replace(id, "<id>"),
            shown,
        ));
    }
    assert_eq!(
        answers[0], answers[1],
        "a hidden row answered unlike a missing one"
    );
    assert_eq!(
        world
            .count("SELECT count(*) FROM rooms WHERE id = 1 AND during = '[1000,2000)'")
            .await,
        1
    );
    // Deletes as well.
    let mut codes = Vec::new();
    for (tx, id) in [("del-hidden", "1"), ("del-missing", "98")] {
        let change = one_change(
            "mallory-1",
            tx,
            json!({"table": "public.rooms", "op": "delete", "old": {"id": id}}),
        );
        let (_, answer) = post_changes(addr, Some(&t1), &change).await;
        let r = result(&answer);
        codes.push((r["status"].clone(), r["code"].clone()));
    }
    assert_eq!(codes[0], codes[1]);
    assert_eq!(
        world.count("SELECT count(*) FROM rooms WHERE id = 1").await,
        1
    );
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
