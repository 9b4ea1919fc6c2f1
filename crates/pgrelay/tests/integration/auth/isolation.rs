//! Promise 6 as a property: random tenants, clients (some admins), and
//! random writes from PostgreSQL and from clients, including updates that
//! move rows between tenants. Afterwards every replica holds exactly the
//! rows its claims allow, the change log holds only client writes each
//! writer was allowed to make, and nothing any session was sent (live
//! stream, snapshot, or catch-up from the change log) was outside its
//! rules.

use std::collections::BTreeMap;
use std::time::Duration;

use pgrelay_protocol::{Row, ServerMessage};
use proptest::prelude::*;
use serde_json::json;

use super::{fixed, replica_rows, start_client, start_server, token, Spy, WAIT};
use crate::support::{wait_for, World};

const RULES: &str = r#"
default = "deny"
[tables.items]
read  = "tenant = claims.tenant OR claims.role = 'admin'"
write = "tenant = claims.tenant"
"#;

#[derive(Clone, Debug)]
struct Member {
    tenant: u8,
    admin: bool,
    /// Connects after the writes: a snapshot, then the stream.
    late: bool,
    /// Disconnects halfway through the writes and comes back after them.
    pause: bool,
}

#[derive(Clone, Debug)]
enum Step {
    ServerInsert { id: u8, tenant: u8 },
    ServerMove { id: u8, tenant: u8 },
    ServerDelete { id: u8 },
    ClientInsert { client: usize, id: u8, tenant: u8 },
    ClientMove { client: usize, id: u8, tenant: u8 },
    ClientEdit { client: usize, id: u8 },
    ClientDelete { client: usize, id: u8 },
}

fn step(tenants: u8, clients: usize) -> impl Strategy<Value = Step> {
    let id = 0u8..10;
    let tenant = 0..tenants;
    let client = 0..clients;
    prop_oneof![
        3 => (id.clone(), tenant.clone()).prop_map(|(id, tenant)| Step::ServerInsert { id, tenant }),
        2 => (id.clone(), tenant.clone()).prop_map(|(id, tenant)| Step::ServerMove { id, tenant }),
        1 => id.clone().prop_map(|id| Step::ServerDelete { id }),
        3 => (client.clone(), id.clone(), tenant.clone())
            .prop_map(|(client, id, tenant)| Step::ClientInsert { client, id, tenant }),
        2 => (client.clone(), id.clone(), tenant.clone())
            .prop_map(|(client, id, tenant)| Step::ClientMove { client, id, tenant }),
        2 => (client.clone(), id.clone()).prop_map(|(client, id)| Step::ClientEdit { client, id }),
        1 => (client, id).prop_map(|(client, id)| Step::ClientDelete { client, id }),
    ]
}

fn case() -> impl Strategy<Value = (u8, Vec<Member>, Vec<Step>)> {
    (2u8..=3, 2usize..=4).prop_flat_map(|(tenants, clients)| {
        let member = (
            0..tenants,
            proptest::bool::weighted(0.25),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(tenant, admin, late, pause)| Member {
                tenant,
                admin,
                late,
                pause: pause && !late,
            });
        (
            Just(tenants),
            proptest::collection::vec(member, clients),
            proptest::collection::vec(step(tenants, clients), 5..30),
        )
    })
}

fn tenant_name(t: u8) -> String {
    format!("t{t}")
}

fn claims(member: &Member) -> serde_json::Value {
    let mut claims = json!({"tenant": tenant_name(member.tenant)});
    if member.admin {
        claims["role"] = "admin".into();
    }
    claims
}

fn may_read(member: &Member, tenant: &str) -> bool {
    member.admin || tenant == tenant_name(member.tenant)
}

/// Every row a session was sent passes its read rule; no other table.
fn check_sent(who: &str, member: &Member, seen: &[ServerMessage], snapshot: &[(String, String)]) {
    for (table, line) in snapshot {
        assert_eq!(table, "public.items", "{who} got a snapshot of {table}");
        // COPY text: id, tenant, body.
        let tenant = line.split('\t').nth(1).unwrap_or("");
        assert!(
            may_read(member, tenant),
            "{who} ({member:?}) got snapshot row {line:?}"
        );
    }
    let visible = |row: &Row| {
        row.get("tenant")
            .and_then(|t| t.as_deref())
            .is_some_and(|t| may_read(member, t))
    };
    for message in seen {
        match message {
            ServerMessage::Welcome { tables, .. } | ServerMessage::Schema { tables } => {
                for table in tables {
                    assert_eq!(
                        table.name, "public.items",
                        "{who} was told about {}",
                        table.name
                    );
                }
            }
            ServerMessage::Tx(tx) => {
                for change in &tx.changes {
                    assert_eq!(change.table, "public.items", "{who} got {change:?}");
                    for row in [&change.new, &change.old].into_iter().flatten() {
                        // A delete's old row, an insert's new row, and both
                        // rows of an update must be visible to this member.
                        assert!(visible(row), "{who} ({member:?}) was sent {change:?}");
                    }
                }
            }
            _ => {}
        }
    }
}

async fn run_case(members: Vec<Member>, steps: Vec<Step>) {
    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE items (id int PRIMARY KEY, tenant text NOT NULL, body text);
             CREATE TABLE secrets (id int PRIMARY KEY, tenant text, body text);",
        )
        .await;
    let server = start_server(&world, RULES).await;
    let addr = server.local_addr();
    // One spy per member, connected before the writes (live stream), and
    // one more per member connected after (catch-up).
    let mut spies = Vec::new();
    for (i, member) in members.iter().enumerate() {
        let spy = Spy::connect(addr, &format!("spy-{i}"), &token(claims(member)), None).await;
        spy.wait_caught_up().await;
        spies.push((format!("live spy {i}"), member.clone(), spy));
    }
    let mut clients = Vec::new();
    for (i, member) in members.iter().enumerate() {
        if member.late {
            clients.push(None);
            continue;
        }
        let path = world.replica_path(&format!("c{i}"));
        let client =
            start_client(addr, &path, &format!("c{i}"), fixed(token(claims(member)))).await;
        clients.push(Some((path, client)));
    }
    for (i, client) in clients.iter().enumerate() {
        if let Some((path, _)) = client {
            wait_for(&format!("client {i} to connect"), WAIT, || async {
                super::has_table(path, "items").then_some(())
            })
            .await;
        }
    }
    world
        .exec("INSERT INTO secrets VALUES (1, 't0', 'never synced')")
        .await;

    for (n, step) in steps.iter().enumerate() {
        if n == steps.len() / 2 {
            for (i, member) in members.iter().enumerate() {
                if member.pause {
                    if let Some((_, client)) = clients[i].take() {
                        client.stop().await;
                    }
                }
            }
        }
        match step {
            Step::ServerInsert { id, tenant } => {
                world
                    .exec(&format!(
                    "INSERT INTO items VALUES ({id}, '{}', 'server') ON CONFLICT (id) DO NOTHING",
                    tenant_name(*tenant)
                ))
                    .await
            }
            Step::ServerMove { id, tenant } => {
                world
                    .exec(&format!(
                        "UPDATE items SET tenant = '{}' WHERE id = {id}",
                        tenant_name(*tenant)
                    ))
                    .await
            }
            Step::ServerDelete { id } => {
                world
                    .exec(&format!("DELETE FROM items WHERE id = {id}"))
                    .await
            }
            Step::ClientInsert { client, id, tenant } => {
                if let Some((_, c)) = &clients[*client] {
                    // A key the replica already has fails locally: fine.
                    let _ = c
                        .client
                        .execute(format!(
                            "INSERT INTO items VALUES ({id}, '{}', 'client {client}')",
                            tenant_name(*tenant)
                        ))
                        .await;
                }
            }
            Step::ClientMove { client, id, tenant } => {
                if let Some((_, c)) = &clients[*client] {
                    let _ = c
                        .client
                        .execute(format!(
                            "UPDATE items SET tenant = '{}' WHERE id = {id}",
                            tenant_name(*tenant)
                        ))
                        .await;
                }
            }
            Step::ClientEdit { client, id } => {
                if let Some((_, c)) = &clients[*client] {
                    let _ = c
                        .client
                        .execute(format!(
                            "UPDATE items SET body = 'edited by {client}' WHERE id = {id}"
                        ))
                        .await;
                }
            }
            Step::ClientDelete { client, id } => {
                if let Some((_, c)) = &clients[*client] {
                    let _ = c
                        .client
                        .execute(format!("DELETE FROM items WHERE id = {id}"))
                        .await;
                }
            }
        }
    }

    // Late members start now (snapshot, then stream); paused ones come back
    // (catch-up from the change log). A spy per member takes a snapshot,
    // and another reads the whole change log.
    for (i, member) in members.iter().enumerate() {
        if member.late || member.pause {
            let path = world.replica_path(&format!("c{i}"));
            let client =
                start_client(addr, &path, &format!("c{i}"), fixed(token(claims(member)))).await;
            clients[i] = Some((path, client));
        }
        let t = token(claims(member));
        let spy = Spy::connect(addr, &format!("snapshot-spy-{i}"), &t, None).await;
        spies.push((format!("snapshot spy {i}"), member.clone(), spy));
        let spy = Spy::connect(addr, &format!("log-spy-{i}"), &t, Some("0/0")).await;
        spies.push((format!("change-log spy {i}"), member.clone(), spy));
    }

    // Every replica converges to exactly what its claims allow.
    for (i, member) in members.iter().enumerate() {
        let Some((path, client)) = &clients[i] else {
            unreachable!()
        };
        let mut last = String::new();
        let converged = tokio::time::timeout(WAIT, async {
            loop {
                let unsent = client
                    .replica
                    .outbox(None, 0)
                    .await
                    .map(|r| r.unsent())
                    .unwrap_or(1);
                let rows = world
                    .sql
                    .query(
                        "SELECT id, tenant, coalesce(body, 'NULL') FROM items ORDER BY id",
                        &[],
                    )
                    .await
                    .unwrap();
                let want: BTreeMap<i64, (String, String)> = rows
                    .iter()
                    .map(|r| {
                        let id = i64::from(r.get::<_, i32>(0));
                        (id, (r.get::<_, String>(1), r.get::<_, String>(2)))
                    })
                    .filter(|(_, (tenant, _))| may_read(member, tenant))
                    .collect();
                let have: BTreeMap<i64, (String, String)> = replica_rows(path, "items")
                    .into_iter()
                    .map(|(id, r)| (id, (r["tenant"].clone(), r["body"].clone())))
                    .collect();
                if unsent == 0 && want == have {
                    return;
                }
                last = format!("unsent {unsent}\n want {want:?}\n have {have:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(
            converged.is_ok(),
            "client {i} ({member:?}) never held exactly its rows:\n{last}"
        );
        assert!(
            replica_rows(path, "secrets").is_empty(),
            "client {i} has the secrets table's rows"
        );
    }

    // The change log holds only client writes their writer was allowed to
    // make: both the row before (update, delete) and after (insert, update)
    // in the writer's tenant.
    let logged = world
        .sql
        .query(
            "SELECT origin_client, operation, data->>'tenant', old_data->>'tenant' \
             FROM pgrelay.change_history WHERE origin_client IS NOT NULL AND table_name = 'public.items'",
            &[],
        )
        .await
        .unwrap();
    for row in &logged {
        let origin: String = row.get(0);
        let index: usize = (0..members.len())
            .find(|i| pgrelay_protocol::origin_tag(&format!("c{i}")) == origin)
            .unwrap_or_else(|| panic!("origin {origin} is no client's"));
        let own = tenant_name(members[index].tenant);
        for tenant in [row.get::<_, Option<String>>(2), row.get(3)]
            .into_iter()
            .flatten()
        {
            assert_eq!(
                tenant,
                own,
                "client {index} ({:?}) wrote a {} row of {tenant}",
                members[index],
                row.get::<_, String>(1)
            );
        }
    }

    for (who, member, spy) in &spies {
        spy.wait_caught_up().await;
        check_sent(who, member, &spy.messages(), &spy.snapshot());
    }
    for client in clients.into_iter().flatten() {
        client.1.stop().await;
    }
    server.shutdown().await.unwrap();
}

proptest! {
    // Each case is a fresh database, server and clients: a few seconds.
    #![proptest_config(ProptestConfig {
        cases: 6,
        max_shrink_iters: 8,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_replica_holds_exactly_what_its_claims_allow((_tenants, members, steps) in case()) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run_case(members, steps));
    }
}
