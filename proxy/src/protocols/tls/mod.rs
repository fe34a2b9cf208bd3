//! TLS termination for `wss://`: rustls does the handshake; where the kernel has TLS the
//! session keys then move into the socket, so no record is encrypted or decrypted in
//! userspace.

pub mod certs;
pub mod ktls;
pub mod read_ahead;

use std::{path::Path, sync::Arc, time::Duration};

use tokio::{net::TcpStream, time::timeout};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{self, crypto::CryptoProvider},
};

use crate::{
    config::{DataPlaneMode, ServerConfig},
    protocols::stream::ClientStream,
};
use certs::{CertError, CertFiles, Certificates};
use ktls::{KernelTls, KtlsStream};
use read_ahead::ReadAhead;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls_cert: {0}")]
    Certificates(#[from] CertError),
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Why a client's TLS handshake did not produce a stream.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("no TLS handshake within {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("moving the session keys into the kernel failed: {0}")]
    Kernel(::ktls::Error),
}

impl AcceptError {
    /// The label of `wsedge_tls_handshakes_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            AcceptError::Timeout(_) => "timeout",
            AcceptError::Handshake(_) => "failed",
            AcceptError::Kernel(_) => "ktls_failed",
        }
    }
}

/// ring rather than aws-lc-rs: it builds with a C compiler alone. Its price is no
/// post-quantum key exchange, which rustls marks by deprecating this provider.
#[allow(deprecated)]
fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The configured certificate and key files, resolved against the config's directory.
fn cert_files(server: &ServerConfig, base_dir: &Path) -> Vec<CertFiles> {
    server
        .tls_cert
        .iter()
        .zip(&server.tls_key)
        .map(|(cert, key)| CertFiles {
            cert: base_dir.join(cert),
            key: base_dir.join(key),
        })
        .collect()
}

/// Loads the configured certificates as a start would (for `wsedge check`); returns how many.
pub fn check_certificates(server: &ServerConfig, base_dir: &Path) -> Result<usize, CertError> {
    let certificates = Certificates::load(cert_files(server, base_dir), Arc::new(provider()))?;
    Ok(certificates.count())
}

/// The TLS side of the `tls_listen` listener.
pub struct TlsTerminator {
    acceptor: TlsAcceptor,
    certificates: Arc<Certificates>,
    kernel: Option<KernelTls>,
    handshake_timeout: Duration,
}

impl TlsTerminator {
    /// Loads the certificates and finds out whether the kernel can take TLS sessions over.
    pub async fn build(server: &ServerConfig, base_dir: &Path) -> Result<TlsTerminator, TlsError> {
        // `data_plane = "userspace"` keeps TLS in userspace too: it is the way to compare.
        let kernel = match server.data_plane {
            DataPlaneMode::Userspace => None,
            DataPlaneMode::Auto | DataPlaneMode::Kernel => KernelTls::probe().await,
        };
        let mut provider = provider();
        if let Some(kernel) = &kernel {
            // Offer only what the kernel can carry, so every session can move into it.
            provider.cipher_suites.retain(|s| kernel.supports(*s));
        }
        let provider = Arc::new(provider);
        let certificates = Arc::new(Certificates::load(
            cert_files(server, base_dir),
            provider.clone(),
        )?);
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(certificates.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.enable_secret_extraction = kernel.is_some();
        Ok(TlsTerminator {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            certificates,
            kernel,
            handshake_timeout: Duration::from_secs(server.tls_handshake_timeout_s),
        })
    }

    /// Whether sessions move into the kernel after the handshake.
    pub fn kernel_tls(&self) -> bool {
        self.kernel.is_some()
    }

    pub fn certificates(&self) -> &Certificates {
        &self.certificates
    }

    /// Runs the server side of a TLS handshake within `tls_handshake_timeout_s`.
    pub async fn accept(&self, tcp: TcpStream) -> Result<ClientStream, AcceptError> {
        let handshake = async {
            if self.kernel.is_some() {
                // Corked: rustls must not read past the handshake, so that every record after
                // it is left for the kernel to decrypt.
                let tls = self
                    .acceptor
                    .accept(::ktls::CorkStream::new(tcp))
                    .await
                    .map_err(AcceptError::Handshake)?;
                let stream = KtlsStream::from_rustls(tls)
                    .await
                    .map_err(AcceptError::Kernel)?;
                Ok(ClientStream::Ktls(stream))
            } else {
                let tls = self
                    .acceptor
                    .accept(ReadAhead::new(tcp))
                    .await
                    .map_err(AcceptError::Handshake)?;
                Ok(ClientStream::Tls(Box::new(tls)))
            }
        };
        timeout(self.handshake_timeout, handshake)
            .await
            .map_err(|_| AcceptError::Timeout(self.handshake_timeout))?
    }
}
