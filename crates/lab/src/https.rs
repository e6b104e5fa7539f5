//! A small HTTPS server on loopback serving fixed responses, e.g. an MTA-STS policy at
//! `/.well-known/mta-sts.txt` (RFC 8461 §3.2).
//!
//! It speaks just enough HTTP/1.1 for a client that sends one request per connection:
//! it reads the request head, answers from its table of paths and closes. Deliberately
//! not built on the HTTP library the relay uses, so a bug there cannot hide itself here.
//! Responses can be changed or removed while the server runs, and every request is
//! recorded (method, path, `Host`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::{Issued, LabError};

/// Longest request head read. Defaults to 16 KiB; longer requests get a 431.
const MAX_HEAD: usize = 16 * 1024;

/// How long a connection may take to send its request head. Defaults to 10 s.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One canned response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Header fields, in order (`Content-Length` and `Connection: close` are added).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// `200 OK` with `Content-Type: text/plain` and `body`.
    pub fn text(body: &str) -> HttpResponse {
        HttpResponse {
            status: 200,
            headers: vec![("Content-Type".into(), "text/plain".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    /// A response with `status`, one `Content-Type` and `body`.
    pub fn with(status: u16, content_type: &str, body: &[u8]) -> HttpResponse {
        HttpResponse {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.to_vec(),
        }
    }

    /// A redirect (`301`, `Location: to`).
    pub fn redirect(to: &str) -> HttpResponse {
        HttpResponse {
            status: 301,
            headers: vec![("Location".into(), to.into())],
            body: Vec::new(),
        }
    }
}

/// A request the server received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The request target, e.g. `/.well-known/mta-sts.txt`.
    pub path: String,
    /// The `Host` header field, if any.
    pub host: Option<String>,
}

#[derive(Default)]
struct State {
    routes: HashMap<String, HttpResponse>,
    requests: Vec<HttpRequest>,
}

/// An HTTPS server presenting one certificate. Paths without a response get a 404.
///
/// Runs on the current tokio runtime until dropped.
pub struct HttpsServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for HttpsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpsServer {
    /// Binds `bind` and serves TLS (1.2 and 1.3) with `cert`.
    pub async fn start(bind: SocketAddr, cert: &Issued) -> Result<HttpsServer, LabError> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(cert.rustls_server_config()?);
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let state = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_one(acceptor, tcp, state).await {
                        tracing::debug!(error = %e, "lab HTTPS connection ended");
                    }
                });
            }
        });
        tracing::debug!(%addr, "lab HTTPS server started");
        Ok(HttpsServer { addr, state, task })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `response` at `path` from now on.
    pub fn set(&self, path: &str, response: HttpResponse) {
        self.lock().routes.insert(path.to_string(), response);
    }

    /// Stops serving `path` (it answers 404).
    pub fn remove(&self, path: &str) {
        self.lock().routes.remove(path);
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<HttpRequest> {
        self.lock().requests.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

async fn serve_one(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    state: Arc<Mutex<State>>,
) -> Result<(), LabError> {
    let mut tls = tokio::time::timeout(READ_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| LabError::Timeout("TLS handshake".into()))??;
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            break true;
        }
        if head.len() > MAX_HEAD {
            break false;
        }
        let n = tokio::time::timeout(READ_TIMEOUT, tls.read(&mut buf))
            .await
            .map_err(|_| LabError::Timeout("request head".into()))??;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    };
    let response = if complete {
        let text = String::from_utf8_lossy(&head);
        let mut lines = text.split("\r\n");
        let mut first = lines.next().unwrap_or_default().split(' ');
        let method = first.next().unwrap_or_default().to_string();
        let path = first.next().unwrap_or_default().to_string();
        let host = lines
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("host"))
            .map(|(_, v)| v.trim().to_string());
        let mut st = state.lock().unwrap_or_else(PoisonError::into_inner);
        st.requests.push(HttpRequest {
            method: method.clone(),
            path: path.clone(),
            host,
        });
        match st.routes.get(&path) {
            Some(r) if method == "GET" || method == "HEAD" => r.clone(),
            Some(_) => HttpResponse::with(405, "text/plain", b"method not allowed\n"),
            None => HttpResponse::with(404, "text/plain", b"not found\n"),
        }
    } else {
        HttpResponse::with(431, "text/plain", b"request head too large\n")
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        response.status,
        reason(response.status)
    );
    for (k, v) in &response.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        response.body.len()
    ));
    tls.write_all(out.as_bytes()).await?;
    tls.write_all(&response.body).await?;
    tls.flush().await?;
    // close_notify, so that the client sees a clean end of the response.
    tls.shutdown().await?;
    Ok(())
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        301 => "Moved Permanently",
        302 => "Found",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Status",
    }
}
