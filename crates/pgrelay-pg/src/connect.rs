//! Connection settings shared by every PostgreSQL connection pgrelay opens.

use secrecy::SecretString;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::Socket;

use crate::tls::{split_tls_params, Connector, PgTls};
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
    tls: PgTls,
}

impl ConnInfo {
    /// Reads a `postgres://` URL (or a `key=value` string), with libpq's
    /// `sslmode` (`disable`, `prefer` (the default), `require`,
    /// `verify-ca`, `verify-full`) and `sslrootcert` (a PEM file of
    /// trusted roots; the platform's when missing).
    pub fn parse(url: &str) -> Result<ConnInfo, PgError> {
        let (url, sslmode, sslrootcert) = split_tls_params(url);
        let tls = PgTls::new(sslmode.as_deref(), sslrootcert.as_deref())?;
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| PgError::BadUrl(e.to_string()))?;
        // No TLS over a Unix socket (libpq's rule too).
        let unix_only = config
            .get_hosts()
            .iter()
            .all(|h| !matches!(h, tokio_postgres::config::Host::Tcp(_)));
        config.ssl_mode(if unix_only && !config.get_hosts().is_empty() {
            tokio_postgres::config::SslMode::Disable
        } else {
            tls.negotiation()
        });
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
            tls,
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

    /// The URL's `sslmode`.
    pub fn ssl_mode(&self) -> crate::SslMode {
        self.tls.mode
    }

    pub(crate) fn tls(&self) -> &PgTls {
        &self.tls
    }

    fn target(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.database)
    }

    /// A failed connection attempt. tokio-postgres prints a TLS or I/O
    /// failure without its cause ("error performing TLS handshake"), so
    /// the cause ("server does not support TLS", the certificate's fault)
    /// goes into the context.
    pub(crate) fn connect_failed(&self, source: tokio_postgres::Error) -> PgError {
        let context = match std::error::Error::source(&source) {
            Some(cause) if source.code().is_none() => {
                format!("connecting to {} ({cause})", self.target())
            }
            _ => format!("connecting to {}", self.target()),
        };
        PgError::Sql { context, source }
    }
}

/// The stream under a connection: TCP or a Unix socket, with TLS or not.
pub type PgStream = <Connector as MakeTlsConnect<Socket>>::Stream;

/// A connection not yet driven, for a caller that reads its messages
/// itself (`LISTEN`).
pub type PgConnection = tokio_postgres::Connection<Socket, PgStream>;

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
    let (client, _driver) = open(&info.config, &info.tls.connector)
        .await
        .map_err(|e| info.connect_failed(e))?;
    Ok(client)
}

/// Opens a connection and hands back its driver too, for a caller that
/// reads the connection's messages (notifications) itself.
pub async fn connect_undriven(
    info: &ConnInfo,
) -> Result<(tokio_postgres::Client, PgConnection), PgError> {
    info.config
        .connect(info.tls.connector.clone())
        .await
        .map_err(|e| info.connect_failed(e))
}

/// The one place an ordinary connection is opened, for [`connect`] and for
/// the pool alike, so both reach PostgreSQL the same way (and with the
/// same TLS).
pub(crate) async fn open(
    config: &tokio_postgres::Config,
    tls: &Connector,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
    let (client, connection) = config.connect(tls.clone()).await?;
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
