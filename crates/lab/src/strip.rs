//! A man in the middle that strips STARTTLS, as some networks really do.
//!
//! It relays an SMTP session line by line between a client and an upstream server,
//! removes the `STARTTLS` capability from EHLO replies, and answers a `STARTTLS` that
//! the client sends anyway with `454` itself, so the upstream never sees it. A relay
//! that requires TLS must notice and refuse to send in clear text.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::{JoinHandle, JoinSet};

use crate::LabError;

/// Reply to a client's STARTTLS when the proxy swallowed the capability.
const REFUSE_STARTTLS: &[u8] = b"454 4.7.0 TLS not available due to temporary reason\r\n";

/// How long the proxy waits to connect upstream. Defaults to 10 s.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A running STARTTLS-stripping proxy. Stops, with its sessions, when dropped.
pub struct StripTlsProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    stats: Arc<Stats>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Stats {
    sessions: AtomicUsize,
    capabilities_stripped: AtomicUsize,
    starttls_refused: AtomicUsize,
}

impl std::fmt::Debug for StripTlsProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripTlsProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl Drop for StripTlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StripTlsProxy {
    /// Listens on `bind` and relays each connection to `upstream`.
    pub async fn start(bind: SocketAddr, upstream: SocketAddr) -> Result<StripTlsProxy, LabError> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(Stats::default());
        let task = tokio::spawn(accept_loop(listener, upstream, stats.clone()));
        Ok(StripTlsProxy {
            addr,
            upstream,
            stats,
            task,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn sessions(&self) -> usize {
        self.stats.sessions.load(Ordering::Relaxed)
    }

    /// How many EHLO replies had their STARTTLS line removed.
    pub fn capabilities_stripped(&self) -> usize {
        self.stats.capabilities_stripped.load(Ordering::Relaxed)
    }

    /// How many STARTTLS commands the proxy answered with 454.
    pub fn starttls_refused(&self) -> usize {
        self.stats.starttls_refused.load(Ordering::Relaxed)
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, stats: Arc<Stats>) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    stats.sessions.fetch_add(1, Ordering::Relaxed);
                    let stats = stats.clone();
                    sessions.spawn(async move {
                        if let Err(e) = relay(client, upstream, &stats).await {
                            tracing::debug!(%peer, error = %e, "strip proxy session ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "strip proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, stats: &Stats) -> Result<(), LabError> {
    let server = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream))
        .await
        .map_err(|_| LabError::Timeout(format!("connecting to {upstream}")))??;
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Both directions write to the client: replies from upstream and the proxy's own 454.
    let client_write = Mutex::new(client_write);
    let upward = client_to_server(
        BufReader::new(client_read),
        server_write,
        &client_write,
        stats,
    );
    let downward = server_to_client(BufReader::new(server_read), &client_write, stats);
    // Either side closing ends the session.
    tokio::select! {
        r = upward => r,
        r = downward => r,
    }
}

async fn client_to_server<R, W, C>(
    mut from: BufReader<R>,
    mut to: W,
    client: &Mutex<C>,
    stats: &Stats,
) -> Result<(), LabError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    C: AsyncWrite + Unpin,
{
    let mut line = Vec::new();
    // Inside message data a line reading "STARTTLS" is content, not a command.
    let mut in_data = false;
    loop {
        line.clear();
        if from.read_until(b'\n', &mut line).await? == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        let trimmed = trim_crlf(&line);
        if in_data {
            if trimmed == b"." {
                in_data = false;
            }
        } else if trimmed.eq_ignore_ascii_case(b"STARTTLS") {
            stats.starttls_refused.fetch_add(1, Ordering::Relaxed);
            let mut client = client.lock().await;
            client.write_all(REFUSE_STARTTLS).await?;
            client.flush().await?;
            continue;
        } else if trimmed.eq_ignore_ascii_case(b"DATA") {
            in_data = true;
        }
        to.write_all(&line).await?;
        to.flush().await?;
    }
}

async fn server_to_client<R, C>(
    mut from: BufReader<R>,
    client: &Mutex<C>,
    stats: &Stats,
) -> Result<(), LabError>
where
    R: AsyncRead + Unpin,
    C: AsyncWrite + Unpin,
{
    let mut reply: Vec<Vec<u8>> = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if from.read_until(b'\n', &mut line).await? == 0 {
            let mut client = client.lock().await;
            for l in &reply {
                client.write_all(l).await?;
            }
            client.shutdown().await?;
            return Ok(());
        }
        reply.push(line.clone());
        // A reply ends with a line whose fourth byte is not '-' ("250 x" or bare "250").
        if line.get(3) == Some(&b'-') {
            continue;
        }
        let lines = std::mem::take(&mut reply);
        let filtered = strip_starttls(lines, stats);
        let mut client = client.lock().await;
        for l in &filtered {
            client.write_all(l).await?;
        }
        client.flush().await?;
    }
}

/// Removes a `250[- ]STARTTLS` line from a multi-line 250 reply, keeping the last line
/// marked as last.
fn strip_starttls(mut lines: Vec<Vec<u8>>, stats: &Stats) -> Vec<Vec<u8>> {
    let is_ehlo_reply = lines.len() > 1 && lines.iter().all(|l| l.starts_with(b"250"));
    if !is_ehlo_reply {
        return lines;
    }
    let before = lines.len();
    lines.retain(|l| {
        let text = trim_crlf(l);
        !(text.len() >= 4 && text[4..].eq_ignore_ascii_case(b"STARTTLS"))
    });
    if lines.len() != before {
        stats.capabilities_stripped.fetch_add(1, Ordering::Relaxed);
        if let Some(last) = lines.last_mut()
            && last.len() > 3
        {
            last[3] = b' ';
        }
    }
    lines
}

fn trim_crlf(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}
