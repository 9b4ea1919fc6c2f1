//! `pgrelay doctor`: checks PostgreSQL and pgrelay's state in it with the
//! same flags as `pgrelay serve`, prints each finding with its fix, and
//! exits non-zero when any is an error.

use clap::Args;
use pgrelay_server::doctor::{self, Severity};

use super::serve::ServeArgs;

#[derive(Args)]
pub struct DoctorArgs {
    /// Print the findings as one JSON object (`{"findings": [...]}`).
    #[arg(long)]
    json: bool,
    /// Also check the application's migrations folder: pending migrations
    /// (warning), applied ones whose files changed (error).
    #[arg(long)]
    migrations: Option<std::path::PathBuf>,
    #[command(flatten)]
    serve: ServeArgs,
}

pub async fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let config = args.serve.into_config()?.server;
    if config.database_url.is_none() {
        anyhow::bail!("pgrelay doctor needs --database-url (or PGRELAY_DATABASE_URL)");
    }
    let report = doctor::diagnose_with_migrations(&config, args.migrations.as_deref()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for finding in &report.findings {
            let mark = match finding.severity {
                Severity::Ok => "ok   ",
                Severity::Info => "info ",
                Severity::Warning => "WARN ",
                Severity::Error => "ERROR",
            };
            println!("{mark} {:<13} {}", finding.check, finding.message);
            if let Some(fix) = &finding.fix {
                println!("      {:<13} fix: {fix}", "");
            }
        }
    }
    match report.worst() {
        Severity::Error => anyhow::bail!("doctor found errors"),
        _ => Ok(()),
    }
}
