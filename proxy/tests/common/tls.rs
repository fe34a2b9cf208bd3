//! TLS for tests: a throwaway CA and its certificates (rcgen), written as PEM files wsedge
//! reads, and a verifying rustls client that trusts only that CA.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, date_time_ymd,
};
use tokio::net::TcpStream;
use tokio_rustls::{
    TlsConnector,
    client::TlsStream,
    rustls::{
        self, ClientConfig, RootCertStore,
        pki_types::{CertificateDer, ServerName},
    },
};
use tokio_tungstenite::WebSocketStream;

/// A CA whose leaf certificates tests hand to wsedge.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub dir: tempfile::TempDir,
}

/// A leaf certificate and key as files in the CA's directory.
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "wsedge test CA");
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        TestCa {
            issuer,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A leaf for `names`, valid now, written as `<file>.pem` and `<file>.key`.
    pub fn leaf(&self, file: &str, names: &[&str]) -> Leaf {
        self.leaf_valid(file, names, 2020, 2090)
    }

    /// A leaf that expired in 2021.
    pub fn expired_leaf(&self, file: &str, names: &[&str]) -> Leaf {
        self.leaf_valid(file, names, 2020, 2021)
    }

    fn leaf_valid(&self, file: &str, names: &[&str], from_year: i32, until_year: i32) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.not_before = date_time_ymd(from_year, 1, 1);
        params.not_after = date_time_ymd(until_year, 1, 1);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let leaf = Leaf {
            cert: self.dir.path().join(format!("{file}.pem")),
            key: self.dir.path().join(format!("{file}.key")),
            der: cert.der().clone(),
        };
        std::fs::write(&leaf.cert, cert.pem()).unwrap();
        std::fs::write(&leaf.key, key.serialize_pem()).unwrap();
        leaf
    }

    /// The CA certificate as a PEM file (for Python's and Node's clients).
    pub fn ca_file(&self) -> PathBuf {
        let path = self.dir.path().join("ca.pem");
        std::fs::write(&path, self.issuer.pem()).unwrap();
        path
    }

    /// A client that verifies certificates against this CA only, offering `http/1.1`.
    pub fn client(&self) -> TlsConnector {
        self.client_with(rustls::DEFAULT_VERSIONS)
    }

    /// [`TestCa::client`] speaking only `versions`.
    pub fn client_with(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsConnector::from(Arc::new(config))
    }
}

/// The `[server]` lines for `tls_listen` on port 0 with `leaves` (the first the default).
pub fn tls_server_lines(leaves: &[&Leaf], extra: &str) -> String {
    let list = |f: &dyn Fn(&Leaf) -> &PathBuf| {
        leaves
            .iter()
            .map(|l| format!("{:?}", f(l).display().to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "tls_listen = \"127.0.0.1:0\"\ntls_cert = [{}]\ntls_key = [{}]\n{extra}",
        list(&|l| &l.cert),
        list(&|l| &l.key)
    )
}

/// Opens TLS to `addr`, verifying the certificate for `name` (also the SNI).
pub async fn tls_connect(
    ca: &TestCa,
    addr: SocketAddr,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    tls_connect_with(ca.client(), addr, name).await
}

/// [`tls_connect`] with the client `connector`.
pub async fn tls_connect_with(
    connector: TlsConnector,
    addr: SocketAddr,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    tokio::time::timeout(super::WAIT, connector.connect(name, tcp))
        .await
        .expect("TLS handshake finished in time")
}

/// A `wss://` WebSocket to `path` through `addr`, verified for `localhost`.
pub async fn wss_open(
    ca: &TestCa,
    addr: SocketAddr,
    path: &str,
) -> WebSocketStream<TlsStream<TcpStream>> {
    let tls = tls_connect(ca, addr, "localhost")
        .await
        .expect("TLS handshake succeeds");
    wss_over(tls, addr, path).await
}

/// The WebSocket upgrade to `path` over an open TLS stream to `addr`.
pub async fn wss_over(
    tls: TlsStream<TcpStream>,
    addr: SocketAddr,
    path: &str,
) -> WebSocketStream<TlsStream<TcpStream>> {
    let url = format!("wss://localhost:{}{path}", addr.port());
    let (ws, response) = tokio::time::timeout(
        super::WAIT,
        tokio_tungstenite::client_async(url.as_str(), tls),
    )
    .await
    .expect("upgrade within the deadline")
    .expect("upgrade succeeds");
    assert_eq!(response.status(), 101);
    ws
}
