//! Shared test fixtures: a test PKI made with rcgen, an in-memory handler,
//! a loopback server and a raw byte-level client.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use altroute_smtp::{
    Envelope, Handler, Reply, ServerConfig, SessionEnd, SessionInfo, serve_session,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A test certificate authority.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Leaf {
    pub fn der(&self) -> Vec<u8> {
        self.chain[0].as_ref().to_vec()
    }
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { ca }
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        Arc::new(roots)
    }

    /// A leaf for `names`; `expired` puts its validity in 2020.
    pub fn leaf(&self, names: &[&str], expired: bool, client: bool) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("client"),
        );
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 6, 1);
        }
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Leaf {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    /// Server TLS config presenting `leaf`; client certificates from this CA
    /// are requested and verified but optional.
    pub fn server_tls(&self, leaf: &Leaf) -> Arc<rustls::ServerConfig> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots(), provider())
            .allow_unauthenticated()
            .build()
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(leaf.chain.clone(), leaf.key.clone_key())
            .unwrap();
        Arc::new(config)
    }

    /// A verifying client config, optionally with a client certificate.
    pub fn client_tls(&self, client: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
        let b = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots());
        let config = match client {
            Some(leaf) => b
                .with_client_auth_cert(leaf.chain.clone(), leaf.key.clone_key())
                .unwrap(),
            None => b.with_no_client_auth(),
        };
        Arc::new(config)
    }
}

/// What the in-memory handler stored.
#[derive(Debug, Clone)]
pub struct Stored {
    pub session: SessionInfo,
    pub envelope: Envelope,
    pub message: Vec<u8>,
}

/// Relay rule for tests: loopback (if `open_to_loopback`), an AUTH identity
/// or a verified client certificate.
pub struct Memory {
    pub open_to_loopback: bool,
    pub stored: Mutex<Vec<Stored>>,
}

impl Memory {
    pub fn new(open_to_loopback: bool) -> Arc<Self> {
        Arc::new(Self {
            open_to_loopback,
            stored: Mutex::new(Vec::new()),
        })
    }

    pub fn messages(&self) -> Vec<Stored> {
        self.stored.lock().unwrap().clone()
    }
}

impl Handler for Memory {
    fn may_relay(&self, session: &SessionInfo) -> bool {
        (self.open_to_loopback && session.peer.ip().is_loopback())
            || session.auth.is_some()
            || session
                .tls
                .as_ref()
                .is_some_and(|t| t.client_cert_der.is_some())
    }

    async fn rcpt_to(&self, _: &SessionInfo, _: &Envelope, rcpt: &str) -> Reply {
        if rcpt.starts_with("nobody@") {
            Reply::new(550, (5, 1, 1), "No such user")
        } else {
            Reply::new(250, (2, 1, 5), "Recipient OK")
        }
    }

    async fn data(&self, session: &SessionInfo, envelope: &Envelope, message: Vec<u8>) -> Reply {
        self.stored.lock().unwrap().push(Stored {
            session: session.clone(),
            envelope: envelope.clone(),
            message,
        });
        Reply::new(250, (2, 0, 0), "Queued")
    }

    async fn authenticate(&self, _: &SessionInfo, user: &str, pass: &str) -> Option<String> {
        (user == "alice" && pass == "secret").then(|| user.to_string())
    }
}

pub struct Server {
    pub addr: SocketAddr,
    pub ends: mpsc::UnboundedReceiver<Result<SessionEnd, String>>,
}

/// Serve sessions on a loopback port until the test ends.
pub async fn spawn_server(config: ServerConfig, handler: Arc<Memory>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Arc::new(config);
    let (tx, ends) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            let info = SessionInfo::new(peer, stream.local_addr().unwrap());
            let (config, handler, tx) = (config.clone(), handler.clone(), tx.clone());
            tokio::spawn(async move {
                let end = serve_session(stream, info, config, handler).await;
                let _ = tx.send(end.map_err(|e| e.to_string()));
            });
        }
    });
    Server { addr, ends }
}

pub fn config() -> ServerConfig {
    let mut c = ServerConfig::new("mx.test");
    // Generous so that slow CI never trips them in non-timeout tests.
    c.command_timeout = Duration::from_secs(60);
    c
}

/// Byte-level client: send raw bytes, read whole replies as text.
pub struct Raw<S = TcpStream> {
    pub stream: S,
    buf: Vec<u8>,
}

impl Raw<TcpStream> {
    pub async fn connect(addr: SocketAddr) -> Self {
        let mut raw = Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        };
        let greeting = raw.reply().await;
        assert!(greeting.starts_with("220 "), "{greeting}");
        raw
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Raw<S> {
    pub fn wrap(stream: S) -> Self {
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn into_inner(self) -> (S, Vec<u8>) {
        (self.stream, self.buf)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// One complete (possibly multi-line) reply, CRLFs included.
    pub async fn reply(&mut self) -> String {
        loop {
            if let Some(end) = reply_end(&self.buf) {
                let r: Vec<u8> = self.buf.drain(..end).collect();
                return String::from_utf8(r).unwrap();
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(30), self.stream.read(&mut chunk))
                .await
                .expect("no reply within 30 s")
                .unwrap();
            assert!(
                n > 0,
                "connection closed; buffered: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Send a command and check the reply starts with `expect`.
    pub async fn cmd(&mut self, line: &str, expect: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        let r = self.reply().await;
        assert!(
            r.starts_with(expect),
            "{line:?}: expected {expect:?}, got {r:?}"
        );
        r
    }

    /// After the server closed: nothing more to read.
    pub async fn expect_eof(&mut self) {
        assert!(
            self.buf.is_empty(),
            "unread: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        let mut chunk = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(30), self.stream.read(&mut chunk))
            .await
            .expect("server did not close")
            .unwrap_or(0);
        assert_eq!(n, 0, "unexpected bytes {:?}", &chunk[..n]);
    }
}

fn reply_end(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(off) = buf[start..].iter().position(|b| *b == b'\n') {
        let line = &buf[start..start + off + 1];
        start += off + 1;
        if line.get(3) != Some(&b'-') {
            return Some(start);
        }
    }
    None
}
