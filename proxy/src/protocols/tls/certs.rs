//! The certificates `wss://` clients are offered: loaded from PEM files, chosen by SNI,
//! replaced whole on reload (SIGHUP) while handshakes under way keep the set they started
//! with.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use tokio_rustls::rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{}: {source}", path.display())]
    Pem {
        path: PathBuf,
        source: tokio_rustls::rustls::pki_types::pem::Error,
    },
    #[error("{}: holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: the leaf certificate is not a valid X.509 certificate: {reason}", path.display())]
    BadLeaf { path: PathBuf, reason: String },
    #[error("{} and {} do not belong together: {reason}", cert.display(), key.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// One `tls_cert` and its `tls_key`, as configured (already resolved against the config's
/// directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The configured certificates, the first being the default.
#[derive(Debug)]
pub struct Certificates {
    files: Vec<CertFiles>,
    provider: Arc<CryptoProvider>,
    loaded: RwLock<Arc<[Arc<CertifiedKey>]>>,
}

impl Certificates {
    /// Reads every pair; any error refuses the whole set.
    pub fn load(
        files: Vec<CertFiles>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Certificates, CertError> {
        let loaded = read_all(&files, &provider)?;
        Ok(Certificates {
            files,
            provider,
            loaded: RwLock::new(loaded),
        })
    }

    /// Reads the same files again; on an error the certificates in use stay.
    pub fn reload(&self) -> Result<(), CertError> {
        let loaded = read_all(&self.files, &self.provider)?;
        *self.loaded.write().expect("certificates lock") = loaded;
        Ok(())
    }

    /// How many certificates are configured (a set loads whole or not at all).
    pub fn count(&self) -> usize {
        self.files.len()
    }
}

fn read_all(
    files: &[CertFiles],
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<[Arc<CertifiedKey>]>, CertError> {
    files
        .iter()
        .map(|f| read_pair(f, provider).map(Arc::new))
        .collect()
}

fn pem(path: &Path) -> impl FnOnce(tokio_rustls::rustls::pki_types::pem::Error) -> CertError + '_ {
    move |source| CertError::Pem {
        path: path.into(),
        source,
    }
}

fn read_pair(files: &CertFiles, provider: &CryptoProvider) -> Result<CertifiedKey, CertError> {
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .map_err(pem(&files.cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem(&files.cert))?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate {
            path: files.cert.clone(),
        });
    };
    // Parsed now so that a client's SNI can always be matched against it later.
    webpki::EndEntityCert::try_from(leaf).map_err(|e| CertError::BadLeaf {
        path: files.cert.clone(),
        reason: e.to_string(),
    })?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(pem(&files.key))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| CertError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    })
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let loaded = self.loaded.read().expect("certificates lock").clone();
        let default = loaded.first().cloned();
        if loaded.len() == 1 {
            return default;
        }
        let Some(name) = hello
            .server_name()
            .and_then(|n| ServerName::try_from(n).ok())
        else {
            return default;
        };
        loaded
            .iter()
            .find(|c| serves(&c.cert[0], &name))
            .cloned()
            .or(default)
    }
}

/// Whether `leaf` names `name` (wildcards included), by the same rules a client's verifier
/// applies.
fn serves(leaf: &CertificateDer<'_>, name: &ServerName<'_>) -> bool {
    webpki::EndEntityCert::try_from(leaf)
        .map(|cert| cert.verify_is_valid_for_subject_name(name).is_ok())
        .unwrap_or(false)
}
