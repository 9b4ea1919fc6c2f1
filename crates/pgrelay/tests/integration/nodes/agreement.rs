//! Nodes on one slot must sync the same tables with the same rules: a
//! node started with other `--tables` or other rules than the capturing
//! node is refused at start with a clear error, and the capturing node
//! goes on.

use pgrelay_server::{AuthConfig, JwtKey, Server, ServerError};

use crate::support::World;

const RULES: &str = r#"
default = "deny"
[tables.t]
read  = "owner = claims.sub"
"#;

fn refusal(started: Result<Server, ServerError>) -> String {
    match started {
        Ok(_) => panic!("a node that disagrees with the capturing node started"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_other_tables_or_rules_on_the_same_slot_is_refused() {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE t (id int PRIMARY KEY, owner text); CREATE TABLE u (id int PRIMARY KEY)",
        )
        .await;
    let mut first = world.server_config();
    first.tables = pgrelay_pg::TableFilter::Only(vec!["public.t".into()]);
    let a = Server::start(first.clone()).await.expect("the first node");
    assert!(a.capturing());

    let mut other_tables = first.clone();
    other_tables.tables = pgrelay_pg::TableFilter::Only(vec!["public.t".into(), "public.u".into()]);
    let error = refusal(Server::start(other_tables).await);
    assert!(error.contains("other --tables, rules"), "{error}");
    assert!(error.contains(&world.slot()), "{error}");

    let mut other_rules = first.clone();
    let mut auth = AuthConfig::new(JwtKey::Secret(
        b"agreement-secret-0123456789abcdef".to_vec(),
    ));
    auth.rules = Some(RULES.to_owned());
    other_rules.auth = Some(auth);
    let error = refusal(Server::start(other_rules).await);
    assert!(error.contains("same tables with the same rules"), "{error}");

    // The same settings are welcome, and the first node still captures.
    let b = Server::start(first).await.expect("a node that agrees");
    assert!(a.capturing() && !b.capturing());
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
