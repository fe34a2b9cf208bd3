//! A TLS front for the load generator's `wss://` tests (only they use it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// A TLS terminator in front of an echo server, as the bench's TLS proxies are: `wss://` in,
/// plaintext to the echo. It serves a fresh `bench cert` certificate, offers every TLS 1.3
/// suite the `ring` provider has and sends session tickets (rustls' default), so what a
/// client negotiates, and that it never resumes, is the client's doing. Stops when dropped.
pub struct TlsFront {
    pub addr: SocketAddr,
    /// `bench cert`'s files: `cert.pem` is what a client pins.
    pub dir: PathBuf,
    /// Every accepted connection's handshake, as "SUITE KX KIND" (or "failed: ERROR").
    pub handshakes: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TlsFront {
    pub fn start(echo: SocketAddr) -> TlsFront {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "bench-tls-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let pki = bench::tls::Pki::generate().unwrap();
        pki.write(&dir).unwrap();
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(pki.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).unwrap();
        // The deprecation is about post-quantum groups, which the client does not offer.
        #[allow(deprecated)]
        let provider = rustls::crypto::ring::default_provider();
        let config = ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let seen = handshakes.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let accept = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let (acceptor, seen) = (acceptor.clone(), seen.clone());
                        tokio::spawn(async move {
                            let mut tls = match acceptor.accept(tcp).await {
                                Ok(tls) => tls,
                                Err(e) => {
                                    seen.lock().unwrap().push(format!("failed: {e}"));
                                    return;
                                }
                            };
                            let conn = tls.get_ref().1;
                            let handshake = format!(
                                "{:?} {:?} {:?}",
                                conn.negotiated_cipher_suite().map(|s| s.suite()),
                                conn.negotiated_key_exchange_group().map(|g| g.name()),
                                conn.handshake_kind()
                            );
                            seen.lock().unwrap().push(handshake);
                            let Ok(mut plain) = tokio::net::TcpStream::connect(echo).await else {
                                return;
                            };
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
        });
        TlsFront {
            addr,
            dir,
            handshakes,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `wss://` to this front, by the certificate's name.
    pub fn url(&self) -> String {
        format!("wss://localhost:{}/echo", self.addr.port())
    }

    pub fn handshakes(&self) -> Vec<String> {
        self.handshakes.lock().unwrap().clone()
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
