//! `wss://`: the rustls connector a sync connection uses, trusting the
//! platform's root certificates and, when given, a CA of the user's own
//! (`ClientConfig::ca_file`, a self-run server's certificate authority).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::Connector;

use crate::{ClientConfig, ClientError};

/// The connector for `url` (one of `config.server`'s URLs): rustls for
/// `wss://`, none for `ws://`.
pub(crate) fn connector(
    config: &ClientConfig,
    url: &str,
) -> Result<Option<Connector>, ClientError> {
    if !url.starts_with("wss://") {
        return Ok(None);
    }
    let fail = |message: String| ClientError::Tls {
        url: url.to_owned(),
        message,
    };
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = &config.ca_file {
        let added = roots
            .add_parsable_certificates(read_pem(path).map_err(fail)?)
            .0;
        if added == 0 {
            return Err(fail(format!(
                "--ca-file {}: no usable certificate in it",
                path.display()
            )));
        }
    }
    if roots.is_empty() {
        return Err(fail(
            "no trusted root certificates on this system; give the server's CA with --ca-file"
                .to_owned(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(Connector::Rustls(Arc::new(tls))))
}

fn read_pem(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--ca-file {}: {e}", path.display()))
}

/// A failed connection attempt, with TLS failures told apart: a server
/// certificate that is not trusted will not become trusted by retrying.
pub(crate) fn connect_error(url: &str, error: tungstenite::Error) -> ClientError {
    let url = url.to_owned();
    let tls = match &error {
        tungstenite::Error::Tls(e) => Some(e.to_string()),
        tungstenite::Error::Io(e) => e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map(|e| e.to_string()),
        _ => None,
    };
    match tls {
        Some(reason) if reason.contains("certificate") => ClientError::Tls {
            message: format!(
                "the server's TLS certificate is not trusted ({reason}); \
                 give the certificate authority that signed it with --ca-file (ClientConfig::ca_file)"
            ),
            url,
        },
        Some(reason) => ClientError::Tls {
            message: reason,
            url,
        },
        None => ClientError::Connect {
            url,
            message: error.to_string(),
        },
    }
}
