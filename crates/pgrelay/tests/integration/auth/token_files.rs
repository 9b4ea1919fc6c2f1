//! `pgrelay serve --auth jwt` and `pgrelay client` from the command line:
//! a secret file, rules and a token file; an expired token ends
//! `--exit-when-caught-up` with the server's reason.

use std::time::{Duration, Instant};

use serde_json::json;

use super::tokens::RULES;
use super::{now, replica_rows, token, WAIT};
use crate::support::{wait_for, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_takes_a_secret_file_rules_and_a_token_file() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let world = World::new().await;
    world
        .exec(
            "CREATE TABLE todos (id int PRIMARY KEY, tenant text NOT NULL, title text);
             CREATE TABLE hidden (id int PRIMARY KEY);",
        )
        .await;
    let dir = world.dir.path();
    std::fs::write(dir.join("secret"), [super::SECRET, b"\n"].concat()).unwrap();
    std::fs::write(dir.join("rules.toml"), RULES).unwrap();
    std::fs::write(
        dir.join("token.jwt"),
        token(json!({"tenant": "t2", "sub": "dave"})),
    )
    .unwrap();
    let mut server = Command::new(crate::support::BIN)
        .args([
            "serve",
            "--database-url",
            world.url(),
            "--slot",
            &world.slot(),
        ])
        .args(["--listen", "127.0.0.1:0", "--auth", "jwt"])
        .arg("--jwt-secret-file")
        .arg(dir.join("secret"))
        .arg("--rules")
        .arg(dir.join("rules.toml"))
        .env("PGRELAY_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("pgrelay listening on ")
        .unwrap()
        .to_owned();
    world
        .exec("INSERT INTO todos VALUES (1, 't1', 'a'), (2, 't2', 'b'); INSERT INTO hidden VALUES (1)")
        .await;
    wait_for("the rows in the change log", WAIT, || async {
        (world
            .count("SELECT count(*) FROM pgrelay.change_history")
            .await
            == 3)
            .then_some(())
    })
    .await;
    let path = world.replica_path("dave");
    let status = Command::new(crate::support::BIN)
        .args([
            "client",
            "sync",
            "--server",
            &format!("ws://{addr}"),
            "--client-id",
            "dave-1",
        ])
        .arg("--db")
        .arg(&path)
        .arg("--token-file")
        .arg(dir.join("token.jwt"))
        .arg("--exit-when-caught-up")
        .env("PGRELAY_LOG", "warn")
        .status()
        .unwrap();
    assert!(status.success());
    let rows = replica_rows(&path, "todos");
    assert_eq!(rows.keys().copied().collect::<Vec<_>>(), vec![2]);
    assert!(!super::has_table(&path, "hidden"));
    let _ = server.kill();
    let _ = server.wait();
}

/// `pgrelay serve --auth jwt` as a child process; its address.
fn spawn_auth_server(world: &World) -> (std::process::Child, String) {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let secret = world.dir.path().join("secret");
    std::fs::write(&secret, [super::SECRET, b"\n"].concat()).unwrap();
    let mut server = Command::new(crate::support::BIN)
        .args([
            "serve",
            "--database-url",
            world.url(),
            "--slot",
            &world.slot(),
        ])
        .args(["--listen", "127.0.0.1:0", "--auth", "jwt"])
        .arg("--jwt-secret-file")
        .arg(&secret)
        .env("PGRELAY_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("pgrelay listening on ")
        .unwrap()
        .to_owned();
    (server, addr)
}

/// With `--exit-when-caught-up`, an expired token ends the command with
/// the server's reason after one more read of the token file, instead of
/// retrying forever and hanging the script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_when_caught_up_ends_on_a_refused_token() {
    use std::process::{Command, Stdio};

    let world = World::new().await;
    world
        .exec("CREATE TABLE todos (id int PRIMARY KEY, tenant text NOT NULL, title text)")
        .await;
    let (mut server, addr) = spawn_auth_server(&world);
    let file = world.dir.path().join("token.jwt");
    std::fs::write(&file, token(json!({"sub": "erin", "exp": now() - 120}))).unwrap();
    let mut child = Command::new(crate::support::BIN)
        .args(["client", "sync", "--server", &format!("ws://{addr}")])
        .args(["--client-id", "erin-1", "--exit-when-caught-up"])
        .arg("--db")
        .arg(world.replica_path("erin"))
        .arg("--token-file")
        .arg(&file)
        .env("PGRELAY_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = server.kill();
            let _ = server.wait();
            panic!("the client still retries 30 s after its token was refused");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("TokenExpired") && stderr.contains("token expired"),
        "{stderr}"
    );
    // The first refusal, and one more after reading the file again.
    wait_for("both refusals in the audit log", WAIT, || async {
        (world
            .count("SELECT count(*) FROM pgrelay.audit_log WHERE action = 'refused' AND client_id = 'erin-1'")
            .await
            == 2)
            .then_some(())
    })
    .await;
    let _ = server.kill();
    let _ = server.wait();
}
