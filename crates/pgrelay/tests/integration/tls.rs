//! TLS on every hop: `wss://` to a server serving TLS itself (a test CA
//! the client is given, or not), and PostgreSQL over TLS (`sslmode` in the
//! database URL) for the server's pool, its replication connection and the
//! CLI's connections.

use std::time::Duration;

use pgrelay_client::{ClientConfig, ClientError, SyncClient};
use pgrelay_testkit::PrivateCluster;

use crate::support::tls::TestCa;
use crate::support::{run_client, wait_for, World};

const WAIT: Duration = Duration::from_secs(60);

/// `url` with `params` added to its query string.
fn with_params(url: &str, params: &str) -> String {
    let joiner = if url.contains('?') { '&' } else { '?' };
    format!("{url}{joiner}{params}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_and_a_write_go_through_wss_to_a_tls_serving_server() {
    let world = World::new().await;
    world
        .exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'from postgres')")
        .await;
    let ca = TestCa::new(world.dir.path(), "server");
    let issued = ca.issue(world.dir.path(), "server");
    let mut config = world.server_config();
    config.tls = Some(pgrelay_server::TlsFiles {
        cert: issued.cert_file.clone(),
        key: issued.key_file.clone(),
    });
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let port = server.local_addr().port();
    let path = world.replica_path("secure");
    let mut client_config = ClientConfig::new(format!("wss://localhost:{port}"), &path);
    client_config.client_id = Some("secure".to_owned());
    client_config.ca_file = Some(ca.ca_file.clone());
    let client = std::sync::Arc::new(SyncClient::open(client_config).await.unwrap());
    let running = run_client(std::sync::Arc::clone(&client));
    world.wait_equal(&path, WAIT).await;
    client
        .execute_and_wait("INSERT INTO t VALUES (2, 'from the replica')", WAIT)
        .await
        .expect("the write over wss://");
    assert_eq!(
        world
            .count("SELECT count(*) FROM t WHERE v = 'from the replica'")
            .await,
        1
    );
    // Plain HTTP to the TLS port gets no HTTP answer, and the server
    // serves on.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut plain = tokio::net::TcpStream::connect(server.local_addr())
            .await
            .unwrap();
        plain
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut answer)).await;
        assert!(!answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    }
    world.exec("INSERT INTO t VALUES (3, 'later')").await;
    world.wait_equal(&path, WAIT).await;
    running.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_the_ca_is_refused_with_a_clear_error() {
    let world = World::new().await;
    world.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let ca = TestCa::new(world.dir.path(), "private");
    let issued = ca.issue(world.dir.path(), "server");
    let mut config = world.server_config();
    config.tls = Some(pgrelay_server::TlsFiles {
        cert: issued.cert_file,
        key: issued.key_file,
    });
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let port = server.local_addr().port();
    let mut client_config =
        ClientConfig::new(format!("wss://localhost:{port}"), world.replica_path("x"));
    client_config.exit_when_caught_up = true;
    let client = SyncClient::open(client_config).await.unwrap();
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let error = tokio::time::timeout(WAIT, client.run(stopped))
        .await
        .expect("the client gives up instead of retrying")
        .expect_err("an untrusted certificate is refused");
    assert!(matches!(error, ClientError::Tls { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("not trusted"), "{message}");
    assert!(message.contains("--ca-file"), "{message}");
    // A CA file that holds no certificate is named in the error.
    let empty = world.dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let mut client_config =
        ClientConfig::new(format!("wss://localhost:{port}"), world.replica_path("y"));
    client_config.ca_file = Some(empty);
    let client = SyncClient::open(client_config).await.unwrap();
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let error = tokio::time::timeout(WAIT, client.run(stopped))
        .await
        .expect("no retrying")
        .expect_err("an empty CA file");
    assert!(error.to_string().contains("empty.pem"), "{error}");
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgrelay_reaches_postgres_over_tls_with_verify_full() {
    crate::support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "postgres");
    let issued = ca.issue(dir.path(), "postgres");
    let (cert, key) = (issued.cert_pem.clone(), issued.key_pem.clone());
    let cluster = tokio::task::spawn_blocking(move || PrivateCluster::start_with_tls(&cert, &key))
        .await
        .unwrap()
        .unwrap();
    let world = World::on(&cluster.admin_url()).await;
    world
        .exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a')")
        .await;
    let secure_url = with_params(
        world.url(),
        &format!("sslmode=verify-full&sslrootcert={}", ca.ca_file.display()),
    );
    let mut config = world.server_config();
    config.database_url = Some(secure_url.clone().into());
    let server = pgrelay_server::Server::start(config).await.unwrap();
    let path = world.replica_path("over-tls");
    let client = crate::support::start_client(server.local_addr(), &path, "over-tls").await;
    world.exec("INSERT INTO t VALUES (2, 'b')").await;
    world.wait_equal(&path, WAIT).await;
    // Every connection the server made is encrypted, the replication
    // connection (a walsender) too.
    let (encrypted, plain): (i64, i64) =
        wait_for("the server's connections in pg_stat_ssl", WAIT, || async {
            let row = world
                .sql
                .query_one(
                    "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
                     FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                     WHERE a.application_name LIKE 'pgrelay%'",
                    &[],
                )
                .await
                .unwrap();
            let counts = (row.get::<_, i64>(0), row.get::<_, i64>(1));
            (counts.0 >= 2).then_some(counts)
        })
        .await;
    assert_eq!(plain, 0, "{encrypted} encrypted, {plain} plain");
    let walsender_encrypted = world
        .count(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.backend_type = 'walsender' AND s.ssl",
        )
        .await;
    assert_eq!(walsender_encrypted, 1);
    // The CLI's connections follow the same URL.
    let report = pgrelay::cmd::verify::verify(&secure_url, &path, None)
        .await
        .unwrap();
    assert!(report.all_match(), "{}", report.render_table());
    // A root that did not sign the server's certificate is refused.
    let other = TestCa::new(dir.path(), "other");
    let wrong = with_params(
        world.url(),
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            other.ca_file.display()
        ),
    );
    let error = pgrelay_pg::connect(&pgrelay_pg::ConnInfo::parse(&wrong).unwrap())
        .await
        .expect_err("an untrusted certificate");
    assert!(
        format!("{error:#}").to_lowercase().contains("certificate")
            || format!("{:?}", error).contains("UnknownIssuer"),
        "{error:?}"
    );
    client.stop().await;
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_against_a_server_without_tls_fails_clearly() {
    let world = World::new().await;
    let ssl: String = world.sql.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    assert_eq!(
        ssl, "off",
        "the shared test server is expected to run without TLS"
    );
    let mut config = world.server_config();
    config.database_url = Some(with_params(world.url(), "sslmode=require").into());
    let error = match pgrelay_server::Server::start(config).await {
        Ok(_) => panic!("started over a connection that cannot be encrypted"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("TLS"), "{error}");
    assert!(error.contains("does not support"), "{error}");
    // `prefer` (the default) falls back to an unencrypted connection.
    let mut config = world.server_config();
    config.database_url = Some(with_params(world.url(), "sslmode=prefer").into());
    let server = pgrelay_server::Server::start(config).await.unwrap();
    server.shutdown().await.unwrap();
    world.db.drop_database().await.unwrap();
}
