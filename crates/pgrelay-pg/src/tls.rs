//! TLS to PostgreSQL, as libpq's `sslmode` and `sslrootcert` say: read
//! from the database URL once, applied alike to the ordinary connections
//! (rustls through tokio-postgres-rustls) and to the replication
//! connection (pgwire-replication's rustls). The certificate checks for
//! the modes libpq does not verify in are written here because rustls
//! only ships the full check.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::Socket;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::PgError;

/// libpq's `sslmode`. The default is libpq's: `prefer`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it, without checking its certificate;
    /// plain otherwise.
    #[default]
    Prefer,
    /// TLS or nothing; the certificate is checked against `sslrootcert`
    /// only when one is given (as libpq does).
    Require,
    /// TLS, with a certificate signed by a trusted root (any host name).
    VerifyCa,
    /// TLS, with a certificate signed by a trusted root and naming the host.
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<SslMode, PgError> {
        Ok(match text {
            "disable" => SslMode::Disable,
            // libpq's `allow` tries plain first; plain-then-TLS and
            // TLS-then-plain end the same for a server that offers TLS.
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(PgError::BadUrl(format!(
                    "sslmode={other}: use disable, prefer, require, verify-ca or verify-full"
                )))
            }
        })
    }
}

/// How pgrelay reaches one PostgreSQL over TLS.
#[derive(Clone)]
pub(crate) struct PgTls {
    pub(crate) mode: SslMode,
    /// `sslrootcert`: a PEM file of trusted roots; `None` (or `system`)
    /// for the platform's roots.
    pub(crate) root_cert: Option<PathBuf>,
    /// The connector for tokio-postgres, built (and the roots read) once.
    pub(crate) connector: Connector,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls")
            .field("mode", &self.mode)
            .field("root_cert", &self.root_cert)
            .finish()
    }
}

impl PgTls {
    /// From the URL's `sslmode` and `sslrootcert` values (either missing).
    pub(crate) fn new(mode: Option<&str>, root_cert: Option<&str>) -> Result<PgTls, PgError> {
        let mode = mode.map(SslMode::parse).transpose()?.unwrap_or_default();
        let root_cert = root_cert
            .filter(|path| *path != "system" && !path.is_empty())
            .map(PathBuf::from);
        // libpq: `require` with a root certificate checks the chain.
        let mode = match (mode, &root_cert) {
            (SslMode::Require, Some(_)) => SslMode::VerifyCa,
            (mode, _) => mode,
        };
        let connector = Connector(MakeRustlsConnect::new(client_config(
            mode,
            root_cert.as_ref(),
        )?));
        Ok(PgTls {
            mode,
            root_cert,
            connector,
        })
    }

    /// The mode tokio-postgres negotiates with (it knows no `verify-*`:
    /// those are `require` plus the connector's checks).
    pub(crate) fn negotiation(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }

    /// The same settings for the replication connection to `host`.
    pub(crate) fn replication(&self, host: &str) -> pgwire_replication::TlsConfig {
        use pgwire_replication::SslMode as Wire;
        pgwire_replication::TlsConfig {
            mode: match self.mode {
                SslMode::Disable => Wire::Disable,
                SslMode::Prefer => Wire::Prefer,
                SslMode::Require => Wire::Require,
                SslMode::VerifyCa => Wire::VerifyCa,
                SslMode::VerifyFull => Wire::VerifyFull,
            },
            ca_pem_path: self.root_cert.clone(),
            // The host itself, also when it is an IP address (which the
            // certificate then names).
            sni_hostname: Some(host.to_owned()),
            client_cert_pem_path: None,
            client_key_pem_path: None,
        }
    }
}

/// tokio-postgres-rustls's connector, also for a Unix socket: there
/// tokio-postgres asks for a connector under an empty host name, which
/// rustls refuses, though no TLS is spoken over the socket.
#[derive(Clone)]
pub struct Connector(MakeRustlsConnect);

impl MakeTlsConnect<Socket> for Connector {
    type Stream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;
    type TlsConnect = <MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect;
    type Error = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<Self::TlsConnect, Self::Error> {
        let host = if host.is_empty() { "localhost" } else { host };
        MakeTlsConnect::<Socket>::make_tls_connect(&mut self.0, host)
    }
}

/// rustls's provider for everything pgrelay encrypts.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(
    mode: SslMode,
    root_cert: Option<&PathBuf>,
) -> Result<rustls::ClientConfig, PgError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Tls(format!("TLS set-up: {e}")))?;
    let config = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unchecked(provider())))
            .with_no_client_auth(),
        SslMode::VerifyCa => {
            let full = WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(root_cert)?),
                provider(),
            )
            .build()
            .map_err(|e| PgError::Tls(format!("TLS set-up: {e}")))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyName(full)))
                .with_no_client_auth()
        }
        SslMode::VerifyFull => builder
            .with_root_certificates(roots(root_cert)?)
            .with_no_client_auth(),
    };
    Ok(config)
}

/// The trusted roots: the PEM file given, or the platform's.
fn roots(root_cert: Option<&PathBuf>) -> Result<RootCertStore, PgError> {
    let mut roots = RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = match root_cert {
        Some(path) => CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| PgError::Tls(format!("sslrootcert={}: {e}", path.display())))?,
        None => rustls_native_certs::load_native_certs().certs,
    };
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(PgError::Tls(match root_cert {
            Some(path) => format!("sslrootcert={}: no certificate in it", path.display()),
            None => "no trusted root certificates found on this system; give sslrootcert=FILE"
                .to_owned(),
        }));
    }
    Ok(roots)
}

/// `prefer` and `require` without a root certificate: encrypted, but any
/// certificate is taken (libpq does the same). The handshake's signatures
/// are still checked.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name is not
/// looked at.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Takes `sslmode` and `sslrootcert` out of a connection string (URL or
/// `key=value` form), which tokio-postgres would refuse (`verify-*`,
/// `sslrootcert`); gives back the rest and the two values.
pub(crate) fn split_tls_params(url: &str) -> (String, Option<String>, Option<String>) {
    let mut mode = None;
    let mut root = None;
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_owned(), None, None);
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("sslmode", value)) => mode = Some(decode(value)),
                Some(("sslrootcert", value)) => root = Some(decode(value)),
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, mode, root);
    }
    let mut kept = Vec::new();
    for word in url.split_whitespace() {
        match word.split_once('=') {
            Some(("sslmode", value)) => mode = Some(value.to_owned()),
            Some(("sslrootcert", value)) => root = Some(value.to_owned()),
            _ => kept.push(word),
        }
    }
    (kept.join(" "), mode, root)
}

fn decode(value: &str) -> String {
    percent_encoding::percent_decode_str(value)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_both_forms() {
        let (rest, mode, root) = split_tls_params(
            "postgres://a@h/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem",
        );
        assert_eq!(rest, "postgres://a@h/db?application_name=x");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/tmp/ca.pem"));
        let (rest, mode, root) = split_tls_params("host=h user=a sslmode=require");
        assert_eq!(rest, "host=h user=a");
        assert_eq!(mode.as_deref(), Some("require"));
        assert_eq!(root, None);
    }

    #[test]
    fn modes_follow_libpq() {
        assert_eq!(PgTls::new(None, None).unwrap().mode, SslMode::Prefer);
        assert!(PgTls::new(Some("sometimes"), None)
            .unwrap_err()
            .to_string()
            .contains("sslmode=sometimes"));
        let missing = PgTls::new(Some("verify-full"), Some("/nonexistent/ca.pem")).unwrap_err();
        assert!(
            missing.to_string().contains("/nonexistent/ca.pem"),
            "{missing}"
        );
    }
}
