//! `pgrelay migrate new|up|down|status`: the application's migrations,
//! numbered folders of SQL (`migrations/YYYYMMDDHHMMSS_name/up.sql`,
//! `down.sql`, optional `client_up.sql`, `client_down.sql`), applied to
//! PostgreSQL one transaction each; their client parts reach every replica
//! through running servers.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use pgrelay_server::schema_migrations::{self, DownTo, MigrationStatus, State};
use secrecy::{ExposeSecret, SecretString};

#[derive(Subcommand)]
pub enum MigrateCommand {
    /// Create an empty migration folder named for the time now.
    New {
        /// Letters, digits, '_' and '-': `add_due_date`.
        name: String,
        /// Also create client_up.sql and client_down.sql (SQL for the replicas).
        #[arg(long)]
        client: bool,
        #[arg(long, env = "PGRELAY_MIGRATIONS", default_value = "migrations")]
        dir: PathBuf,
    },
    /// Apply pending migrations, oldest first (up to --to, including it).
    Up {
        #[arg(long)]
        to: Option<i64>,
        #[command(flatten)]
        target: Target,
    },
    /// Roll back the newest migration (or --steps N, or all after --to V).
    Down {
        #[arg(long, conflicts_with = "steps")]
        to: Option<i64>,
        #[arg(long)]
        steps: Option<usize>,
        #[command(flatten)]
        target: Target,
    },
    /// List migrations: applied, pending, changed (files edited after they
    /// were applied) and missing (applied, folder gone); exits 1 on changed.
    Status {
        /// One JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Args)]
pub struct Target {
    #[arg(long, env = "PGRELAY_DATABASE_URL")]
    database_url: SecretString,
    /// The folder holding the migrations.
    #[arg(long, env = "PGRELAY_MIGRATIONS", default_value = "migrations")]
    dir: PathBuf,
}

impl Target {
    /// The migrations on disk and a connection whose pgrelay schema is
    /// up to date (it holds the migration records).
    async fn open(
        &self,
    ) -> anyhow::Result<(
        Vec<schema_migrations::LocalMigration>,
        tokio_postgres::Client,
    )> {
        let local = schema_migrations::read(&self.dir)
            .with_context(|| format!("reading migrations in {}", self.dir.display()))?;
        let info = pgrelay_pg::ConnInfo::parse(self.database_url.expose_secret())?;
        let mut client = pgrelay_pg::connect(&info).await?;
        pgrelay_server::migrate_own_schema(&mut client).await?;
        Ok((local, client))
    }
}

pub async fn run(command: MigrateCommand) -> anyhow::Result<()> {
    match command {
        MigrateCommand::New { name, client, dir } => {
            let stamp = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
            let folder = schema_migrations::create(&dir, &name, &stamp, client)?;
            println!("created {}", folder.display());
            Ok(())
        }
        MigrateCommand::Up { to, target } => {
            let (local, mut client) = target.open().await?;
            let done = schema_migrations::up(&mut client, &local, to).await?;
            report("applied", &done);
            Ok(())
        }
        MigrateCommand::Down { to, steps, target } => {
            let (local, mut client) = target.open().await?;
            let how = match to {
                Some(v) => DownTo::Version(v),
                None => DownTo::Steps(steps.unwrap_or(1)),
            };
            let done = schema_migrations::down(&mut client, &local, how).await?;
            report("rolled back", &done);
            Ok(())
        }
        MigrateCommand::Status { json, target } => {
            let (local, client) = target.open().await?;
            let lines = schema_migrations::status(&client, &local).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&lines)?);
            } else {
                for l in &lines {
                    println!(
                        "{:<8} {} {}{}",
                        state_word(l.state),
                        l.version,
                        l.name,
                        l.applied_at
                            .as_ref()
                            .map(|at| format!("  (applied {at})"))
                            .unwrap_or_default()
                    );
                }
            }
            if let Some(l) = lines.iter().find(|l| l.state == State::Changed) {
                bail!(
                    "migration {} ({}) was changed after it was applied",
                    l.version,
                    l.name
                );
            }
            Ok(())
        }
    }
}

fn state_word(state: State) -> &'static str {
    match state {
        State::Applied => "applied",
        State::Pending => "pending",
        State::Changed => "CHANGED",
        State::Missing => "missing",
    }
}

fn report(verb: &str, done: &[MigrationStatus]) {
    if done.is_empty() {
        println!("nothing to do");
    }
    for m in done {
        println!("{verb} {} {}", m.version, m.name);
    }
}
