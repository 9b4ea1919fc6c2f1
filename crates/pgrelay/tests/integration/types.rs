//! Every common PostgreSQL type reaches the replica with its value intact.

use std::time::Duration;

use crate::support::{start_client, World};

const SCHEMA: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE everything (
    id bigint PRIMARY KEY,
    i2 smallint, i4 integer, i8 bigint,
    num numeric, num_scaled numeric(12,4),
    f4 real, f8 double precision,
    b boolean,
    t text, vc varchar(20), ch char(5),
    bin bytea, u uuid,
    d date, tm time, ts timestamp, tstz timestamptz, iv interval,
    j json, jb jsonb,
    arr_i integer[], arr_t text[],
    m mood,
    big text
);";

const ROWS: &str = r#"
INSERT INTO everything VALUES
 (1, 1, 2, 3, 1.5, 2.25, 0.1, 0.1, true, 'hello', 'varchar', 'ab',
  '\x000102ff', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29', '13:45:00.123456',
  '2024-02-29 13:45:00.5', '2024-02-29 13:45:00+05:30', '1 year 2 mons 3 days 04:05:06.789',
  '{"b": 1,  "a": [1, 2]}', '{"b": 1, "a": [1, 2]}', '{1,2,NULL,4}', '{"a b","c,d",NULL,"\"q\""}', 'happy', 'short'),
 (2, -32768, -2147483648, -9223372036854775808, '123456789012345678901234567890.123456789012345678901234567890', '-99999999.9999',
  '3.4028235e+38', 'NaN', false, E'unicode: \u00e9\u4e2d\U0001F600 and ''quotes'' and "dq" and \\ backslash', '', 'x',
  '\x', '00000000-0000-0000-0000-000000000000', '0001-01-01', '00:00:00', '1970-01-01 00:00:00', '1999-12-31 23:59:59.999999+00', '-1 days +02:03:04',
  '[]', '{}', '{}', '{}', 'sad', ''),
 (3, 32767, 2147483647, 9223372036854775807, '-0.000000000000000000001', '0',
  '-1.5e-10', 'Infinity', NULL, NULL, NULL, NULL, NULL, NULL, 'infinity', NULL, NULL, '-infinity', NULL, 'null', '"s"', NULL, NULL, NULL, NULL),
 (4, NULL, NULL, NULL, NULL, NULL, NULL, '-Infinity', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (5, 0, 0, 0, 'NaN', NULL, '-0', '1e308', NULL, 'tab	and
newline', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_round_trips_and_toast_survives_updates() {
    let world = World::new().await;
    world.exec(SCHEMA).await;
    world
        .exec("CREATE TABLE other (id int PRIMARY KEY, note text)")
        .await;
    let server = world.start_server().await;
    let path = world.replica_path("types");
    let client = start_client(server.local_addr(), &path, "types").await;

    world.exec(ROWS).await;
    // A large, incompressible value is stored out of line (TOAST); an update
    // that does not touch it makes PostgreSQL send it as "unchanged".
    world
        .exec("UPDATE everything SET big = (SELECT string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 4000) g) WHERE id = 1")
        .await;
    world
        .exec("UPDATE everything SET i4 = 42, t = 'changed' WHERE id = 1")
        .await;
    world
        .exec("UPDATE everything SET id = 6 WHERE id = 5")
        .await; // key change
    world.exec("DELETE FROM everything WHERE id = 4").await;
    world
        .exec("INSERT INTO other SELECT g, 'n' || g FROM generate_series(1, 50) g")
        .await;
    world.exec("TRUNCATE other").await;
    world
        .exec("INSERT INTO other VALUES (1, 'after truncate')")
        .await;
    world.wait_equal(&path, Duration::from_secs(30)).await;

    let big_len = world
        .count("SELECT length(big)::int8 FROM everything WHERE id = 1")
        .await;
    assert_eq!(big_len, 128_000);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let (big, i4, t): (String, i64, String) = conn
        .query_row("SELECT big, i4, t FROM everything WHERE id = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(
        big.len(),
        128_000,
        "the unchanged TOASTed value must survive the update"
    );
    assert_eq!((i4, t.as_str()), (42, "changed"));
    let num: String = conn
        .query_row("SELECT num FROM everything WHERE id = 2", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        num,
        "123456789012345678901234567890.123456789012345678901234567890"
    );
    let bin: Vec<u8> = conn
        .query_row("SELECT bin FROM everything WHERE id = 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(bin, vec![0, 1, 2, 0xff]);
    let i8min: i64 = conn
        .query_row("SELECT i8 FROM everything WHERE id = 2", [], |r| r.get(0))
        .unwrap();
    assert_eq!(i8min, i64::MIN);
    let f8: f64 = conn
        .query_row("SELECT f8 FROM everything WHERE id = 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(f8, 0.1);
    let tstz: String = conn
        .query_row("SELECT tstz FROM everything WHERE id = 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(tstz, "2024-02-29 08:15:00+00");
    let ids: Vec<i64> = conn
        .prepare("SELECT id FROM everything ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(ids, vec![1, 2, 3, 6]);
    let other: Vec<String> = conn
        .prepare("SELECT note FROM other")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(other, vec!["after truncate".to_owned()]);

    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_without_key_syncs_only_with_replica_identity_full() {
    let world = World::new().await;
    world.exec("CREATE TABLE keyless (a int, b text); CREATE TABLE full_identity (a int, b text); ALTER TABLE full_identity REPLICA IDENTITY FULL;").await;
    let server = world.start_server().await;
    let path = world.replica_path("keyless");
    let client = start_client(server.local_addr(), &path, "keyless").await;
    world.exec("INSERT INTO full_identity VALUES (1, 'x'), (1, 'x'), (2, 'y'); UPDATE full_identity SET b = 'z' WHERE a = 2; DELETE FROM full_identity WHERE ctid = (SELECT min(ctid) FROM full_identity WHERE a = 1);").await;
    // Writes to the keyless table still work in PostgreSQL (it is not in the publication).
    world
        .exec(
            "INSERT INTO keyless VALUES (1, 'a'); UPDATE keyless SET b = 'b'; DELETE FROM keyless;",
        )
        .await;
    world.wait_equal(&path, Duration::from_secs(30)).await;

    let status = client.replica.status().await.unwrap();
    let keyless = status
        .tables
        .iter()
        .find(|t| t.table == "public.keyless")
        .expect("keyless listed");
    assert!(
        keyless
            .skipped
            .as_deref()
            .unwrap_or("")
            .contains("REPLICA IDENTITY FULL"),
        "{keyless:?}"
    );
    let full = status
        .tables
        .iter()
        .find(|t| t.table == "public.full_identity")
        .expect("full listed");
    assert_eq!((full.rows, full.skipped.as_deref()), (Some(2), None));

    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
