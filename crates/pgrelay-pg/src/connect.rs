//! Connection settings shared by every PostgreSQL connection pgrelay opens.

use secrecy::SecretString;
use tokio_postgres::NoTls;

use crate::PgError;

/// Session settings pinned on every connection (ordinary and replication),
/// so PostgreSQL's text output of a value is the same wherever pgrelay reads
/// it: UTC times, ISO dates, shortest-exact floats.
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
];

/// Where to reach PostgreSQL, parsed from a `postgres://` URL.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: SecretString,
    pub database: String,
    config: tokio_postgres::Config,
}

impl ConnInfo {
    pub fn parse(url: &str) -> Result<ConnInfo, PgError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| PgError::BadUrl(e.to_string()))?;
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.to_string_lossy().into_owned(),
            None => "127.0.0.1".to_owned(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config.get_user().unwrap_or("postgres").to_owned();
        let password = config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default()
            .into();
        let database = config.get_dbname().unwrap_or(&user).to_owned();
        config.options(options_string());
        if config.get_application_name().is_none() {
            config.application_name("pgrelay");
        }
        Ok(ConnInfo {
            host,
            port,
            user,
            password,
            database,
            config,
        })
    }

    /// The same database under another `application_name`, so its
    /// sessions can be told apart in `pg_stat_activity`.
    pub fn with_application_name(&self, name: &str) -> ConnInfo {
        let mut info = self.clone();
        info.config.application_name(name);
        info
    }

    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }
}

/// The startup `options` string that applies [`SESSION_SETTINGS`].
pub(crate) fn options_string() -> String {
    SESSION_SETTINGS
        .iter()
        .map(|(k, v)| format!("-c {k}={}", v.replace(' ', "\\ ")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Opens an ordinary connection and drives it on a task of its own; the
/// task ends when the client is dropped.
pub async fn connect(info: &ConnInfo) -> Result<tokio_postgres::Client, PgError> {
    let (client, _driver) = open(&info.config).await.map_err(PgError::sql(format!(
        "connecting to {}:{}/{}",
        info.host, info.port, info.database
    )))?;
    Ok(client)
}

/// The one place an ordinary connection is opened, for [`connect`] and for
/// the pool alike, so both reach PostgreSQL the same way.
pub(crate) async fn open(
    config: &tokio_postgres::Config,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok((client, driver))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_not_printed() {
        let info = ConnInfo::parse("postgres://app:pg-password-9@db.example:5433/app").unwrap();
        let printed = format!("{info:?}");
        assert!(!printed.contains("pg-password-9"), "{printed}");
        assert!(printed.contains("db.example"), "{printed}");
    }
}
