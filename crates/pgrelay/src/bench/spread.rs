//! Where the server and the clients of `bench latency|fanout` run: in the
//! bench's own process, or apart (`--light`, `--processes N`), and on
//! which cores (`--server-cpus`, `--client-cpus`).

use clap::Args;
use serde_json::json;

use super::reader::Kind;

/// Where the clients and the server of `bench latency|fanout` run.
#[derive(Args, Debug, Clone)]
pub struct SpreadArgs {
    /// Light clients: WebSocket readers in separate processes that parse
    /// every frame and apply nothing (commit → frame received), with the
    /// server as its own process; reports the server's CPU, system calls
    /// and bytes per delivered frame.
    #[arg(long)]
    pub light: bool,
    /// Child processes the clients are spread over, with the server as its
    /// own `pgrelay serve` process; reports the server's and the clients'
    /// CPU per delivered transaction and row. With --light: light readers
    /// (default 2). Without: full clients (real replicas applying every
    /// transaction); if not given they run in the bench's own process
    /// beside an in-process server (which adds the per-stage breakdown).
    #[arg(long, value_name = "N")]
    pub processes: Option<usize>,
    /// Pin the server process to these CPUs (a `taskset -c` list, e.g. 0);
    /// needs --light or --processes. PostgreSQL and the bench's writer
    /// stay where they are (run the bench itself under `taskset -c` to
    /// move them: a private PostgreSQL inherits its affinity).
    #[arg(long, value_name = "CPUS")]
    pub server_cpus: Option<String>,
    /// Pin the client processes to these CPUs (e.g. 1); needs --light or
    /// --processes.
    #[arg(long, value_name = "CPUS")]
    pub client_cpus: Option<String>,
}

impl SpreadArgs {
    /// Whether the server and the clients run apart from the bench's process.
    pub(crate) fn apart(&self) -> bool {
        self.light || self.processes.is_some()
    }

    pub(crate) fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.apart() || (self.server_cpus.is_none() && self.client_cpus.is_none()),
            "--server-cpus and --client-cpus need --light or --processes"
        );
        anyhow::ensure!(self.processes != Some(0), "--processes must be positive");
        Ok(())
    }

    pub(crate) fn processes(&self) -> usize {
        self.processes.unwrap_or(2)
    }

    pub(crate) fn kind<'a>(&self, table: &'a str) -> Kind<'a> {
        if self.light {
            Kind::Light
        } else {
            Kind::Full { table }
        }
    }

    pub(crate) fn clients(&self, clients: usize) -> String {
        let kind = if self.light { "light" } else { "full" };
        format!("{clients} {kind} clients in {} processes", self.processes())
    }

    pub(crate) fn placement(&self) -> String {
        let on = |cpus: &Option<String>| match cpus {
            Some(list) => format!("on CPUs {list}"),
            None => "not pinned".to_owned(),
        };
        format!(
            "server {}, clients {}",
            on(&self.server_cpus),
            on(&self.client_cpus)
        )
    }

    /// `results` (a JSON object) with where the run's parts ran.
    pub(crate) fn with(&self, mut results: serde_json::Value) -> serde_json::Value {
        if let Some(fields) = results.as_object_mut() {
            fields.insert("light".into(), json!(self.light));
            fields.insert("full".into(), json!(!self.light));
            fields.insert("processes".into(), json!(self.processes()));
            fields.insert("server_cpus".into(), json!(self.server_cpus));
            fields.insert("client_cpus".into(), json!(self.client_cpus));
        }
        results
    }
}
