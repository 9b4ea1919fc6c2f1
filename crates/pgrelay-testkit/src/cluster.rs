//! A private PostgreSQL cluster (`initdb` + `pg_ctl`) with
//! `wal_level=logical`. PostgreSQL refuses to run as root, so when we are
//! root every server command runs as the `postgres` user.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::TestkitError;

/// The directory with `initdb`, `pg_ctl`, `pg_recvlogical`, ...
pub fn pg_bindir() -> Result<PathBuf, TestkitError> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    for version in ["17", "16", "15"] {
        let dir = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    Err(TestkitError::NoBinaries(
        "no initdb from pg_config --bindir or /usr/lib/postgresql/*/bin".to_owned(),
    ))
}

pub fn pg_binary(name: &str) -> Result<PathBuf, TestkitError> {
    let path = pg_bindir()?.join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(TestkitError::NoBinaries(format!(
            "{} missing",
            path.display()
        )))
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A command for a PostgreSQL server binary, as `postgres` when we are root.
fn server_command(binary: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(binary);
        cmd
    } else {
        Command::new(binary)
    }
}

fn run(mut cmd: Command, what: &str) -> Result<(), TestkitError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| TestkitError::Command {
            command: what.to_owned(),
            message: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TestkitError::Command {
            command: what.to_owned(),
            message: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }
}

fn io(context: &str) -> impl FnOnce(std::io::Error) -> TestkitError + '_ {
    move |source| TestkitError::Io {
        context: context.to_owned(),
        source,
    }
}

/// A running private cluster. Dropping it stops the server and removes
/// its directory (unless `PGRELAY_KEEP_CLUSTER` is set).
pub struct PrivateCluster {
    dir: PathBuf,
    port: u16,
    bindir: PathBuf,
}

impl PrivateCluster {
    /// Starts a cluster in a fresh directory under the system temp dir.
    pub fn start() -> Result<PrivateCluster, TestkitError> {
        PrivateCluster::start_with("")
    }

    /// Starts a cluster in a fresh directory with extra `postgresql.conf`
    /// lines, for tests that need settings the shared server must not get
    /// (e.g. `max_slot_wal_keep_size`, which applies to every slot).
    pub fn start_with(settings: &str) -> Result<PrivateCluster, TestkitError> {
        let dir = std::env::temp_dir().join(format!(
            "pgrelay-pg-{}-{:x}",
            std::process::id(),
            rand_suffix()
        ));
        PrivateCluster::start_configured(&dir, settings)
    }

    /// Starts a cluster that also accepts TLS (`ssl = on`) with the given
    /// certificate and key (PEM), for tests of `sslmode`.
    pub fn start_with_tls(cert_pem: &str, key_pem: &str) -> Result<PrivateCluster, TestkitError> {
        let dir = std::env::temp_dir().join(format!(
            "pgrelay-pg-tls-{}-{:x}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).map_err(io("creating the cluster directory"))?;
        let cert = dir.join("server.crt");
        let key = dir.join("server.key");
        std::fs::write(&cert, cert_pem).map_err(io("writing the server certificate"))?;
        std::fs::write(&key, key_pem).map_err(io("writing the server key"))?;
        // PostgreSQL refuses a key others may read; the directory is
        // handed to the server's user before it starts.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                .map_err(io("restricting the server key"))?;
        }
        let settings = format!(
            "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
            cert.display(),
            key.display()
        );
        PrivateCluster::start_configured(&dir, &settings)
    }

    /// Starts a cluster whose files live in `dir` (created; must not hold a cluster).
    pub fn start_in(dir: &Path) -> Result<PrivateCluster, TestkitError> {
        PrivateCluster::start_configured(dir, "")
    }

    fn start_configured(dir: &Path, settings: &str) -> Result<PrivateCluster, TestkitError> {
        let bindir = pg_bindir()?;
        std::fs::create_dir_all(dir).map_err(io("creating the cluster directory"))?;
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres:postgres"]).arg(dir);
                    c
                },
                "chown",
            )?;
        }
        let data = dir.join("data");
        let mut initdb = server_command(&bindir.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "--auth=trust",
            "-U",
            "postgres",
            "--encoding=UTF8",
            "--locale=C",
        ]);
        run(initdb, "initdb")?;
        let port = free_port()?;
        let conf = format!(
            "\n# pgrelay test cluster\nwal_level = logical\nmax_replication_slots = 100\nmax_wal_senders = 100\n\
             max_connections = 300\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             shared_buffers = 128MB\nwal_sender_timeout = 60s\nlog_min_messages = warning\n",
            dir.display()
        );
        let conf_path = data.join("postgresql.conf");
        let mut text =
            std::fs::read_to_string(&conf_path).map_err(io("reading postgresql.conf"))?;
        text.push_str(&conf);
        text.push_str(settings);
        text.push('\n');
        std::fs::write(&conf_path, text).map_err(io("writing postgresql.conf"))?;
        let cluster = PrivateCluster {
            dir: dir.to_owned(),
            port,
            bindir,
        };
        cluster.pg_ctl(&["-w", "-t", "60", "start"])?;
        Ok(cluster)
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), TestkitError> {
        let mut cmd = server_command(&self.bindir.join("pg_ctl"));
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(args);
        run(cmd, &format!("pg_ctl {}", args.join(" ")))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// postgres://postgres@127.0.0.1:PORT/postgres
    pub fn admin_url(&self) -> String {
        self.url_for("postgres")
    }

    /// Crashes PostgreSQL (`pg_ctl stop -m immediate`) and starts it again
    /// on the same port; returns once it accepts connections.
    pub fn restart_immediate(&self) -> Result<(), TestkitError> {
        self.pg_ctl(&["-w", "-m", "immediate", "stop"])?;
        self.pg_ctl(&["-w", "-t", "60", "start"])
    }

    /// Stops PostgreSQL cleanly (`pg_ctl stop -m fast`: sessions ended,
    /// a checkpoint) and starts it again on the same port.
    pub fn restart_fast(&self) -> Result<(), TestkitError> {
        self.pg_ctl(&["-w", "-m", "fast", "stop"])?;
        self.pg_ctl(&["-w", "-t", "60", "start"])
    }

    /// A clean, fast shutdown.
    pub fn stop(&self) -> Result<(), TestkitError> {
        self.pg_ctl(&["-w", "-m", "fast", "stop"])
    }

    /// Stops and removes the cluster when `pid` exits: a watchdog process
    /// for clusters that live as long as a whole test process.
    pub(crate) fn stop_when_process_exits(self, pid: u32) {
        let data = self.dir.join("data");
        let pg_ctl = self.bindir.join("pg_ctl");
        let prefix = if is_root() {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {prefix}'{}' -D '{}' -m immediate stop >/dev/null 2>&1; rm -rf '{}'",
            pg_ctl.display(),
            data.display(),
            self.dir.display()
        );
        let spawned = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if spawned.is_ok() {
            std::mem::forget(self);
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-w", "-m", "immediate", "stop"]);
        if std::env::var_os("PGRELAY_KEEP_CLUSTER").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn free_port() -> Result<u16, TestkitError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(io("finding a free port"))?
        .port())
}

pub(crate) fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}
