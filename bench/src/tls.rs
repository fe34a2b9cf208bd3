//! TLS for `wss://`: the certificate every TLS mode of the bench serves, and the load
//! generator's client side of it.
//!
//! The client speaks TLS 1.3 with one cipher suite (TLS13_AES_128_GCM_SHA256) and one key
//! exchange group (X25519), so every proxy is measured doing the same cryptography, and never
//! resumes a session, so every handshake is a full one. It is rustls on the `ring` provider,
//! driven by the generator's own mio loop: rustls is the sans-I/O core `tokio-rustls` wraps,
//! and the generator keeps an async runtime out of what it measures.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, ring};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

/// The one cipher suite every TLS mode is measured on, by its IANA name (what OpenSSL's
/// `Ciphersuites` setting takes).
pub const CIPHER_SUITE: &str = "TLS_AES_128_GCM_SHA256";

/// Names the certificate is valid for.
pub const NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// A self-signed ECDSA P-256 CA and a P-256 leaf it signed for [`NAMES`], in PEM.
pub struct Pki {
    pub ca_pem: String,
    /// The leaf alone: the chain a server sends (the client knows the CA, or the leaf itself).
    pub cert_pem: String,
    /// The leaf's PKCS#8 private key.
    pub key_pem: String,
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(e)
}

impl Pki {
    pub fn generate() -> io::Result<Pki> {
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(other)?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "wsedge bench CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(other)?;
        let ca = CertifiedIssuer::self_signed(ca, ca_key).map_err(other)?;
        let mut leaf = CertificateParams::new(NAMES.map(String::from).to_vec()).map_err(other)?;
        leaf.distinguished_name.push(DnType::CommonName, NAMES[0]);
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(other)?;
        let cert = leaf.signed_by(&leaf_key, &ca).map_err(other)?;
        Ok(Pki {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: leaf_key.serialize_pem(),
        })
    }

    /// Writes `ca.pem`, `cert.pem`, `key.pem`, and `cert-key.pem` (certificate then key in one
    /// file, as HAProxy's `crt` takes them) into `dir`.
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca.pem"), &self.ca_pem)?;
        std::fs::write(dir.join("cert.pem"), &self.cert_pem)?;
        std::fs::write(dir.join("key.pem"), &self.key_pem)?;
        std::fs::write(
            dir.join("cert-key.pem"),
            format!("{}{}", self.cert_pem, self.key_pem),
        )
    }
}

/// The certificates in a PEM file.
pub fn read_certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: no certificate in it", path.display()),
        ));
    }
    Ok(certs)
}

/// Accepts a server whose certificate is one of `pinned`, byte for byte, and checks that it
/// holds that certificate's key (the TLS 1.3 CertificateVerify signature). Pinning instead of
/// building a chain to a CA spares the generator one ECDSA verification per handshake: its
/// CPU counts in every figure, and a handshake-bound run should spend it on the proxy's side.
#[derive(Debug)]
struct Pinned {
    pinned: Vec<CertificateDer<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .pinned
            .iter()
            .any(|c| c.as_ref() == end_entity.as_ref())
        {
            true => Ok(ServerCertVerified::assertion()),
            false => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The config offers TLS 1.3 only, so rustls never asks.
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The generator's client configuration: TLS 1.3, [`CIPHER_SUITE`] over X25519, no session
/// resumption (tickets the server sends are dropped), servers whose certificate is one of
/// `pinned` accepted.
pub fn client_config(pinned: Vec<CertificateDer<'static>>) -> io::Result<Arc<ClientConfig>> {
    // Deprecated for lacking post-quantum key exchange, which this client would not offer
    // anyway: OpenSSL 3.0's nginx and HAProxy have none, and one group for all keeps the
    // comparison on the same cryptography.
    #[allow(deprecated)]
    let base = ring::default_provider();
    let algorithms = base.signature_verification_algorithms;
    let provider = CryptoProvider {
        cipher_suites: vec![ring::cipher_suite::TLS13_AES_128_GCM_SHA256],
        kx_groups: vec![ring::kx_group::X25519],
        ..base
    };
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(other)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned { pinned, algorithms }))
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}
