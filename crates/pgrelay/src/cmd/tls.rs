//! `pgrelay serve --tls-cert --tls-key`: serving HTTPS and `wss://` itself.

use std::path::PathBuf;

use clap::Args;
use pgrelay_server::TlsFiles;

#[derive(Args, Debug)]
pub struct TlsArgs {
    /// Serve TLS (https://, wss://) with this certificate chain (PEM: the server's certificate first); needs --tls-key.
    #[arg(long, env = "PGRELAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "PGRELAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    pub fn files(self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert?,
            key: self.tls_key?,
        })
    }
}
