//! A tolerant SMTP server that accepts (or refuses) mail and records everything.
//!
//! It is a peer implementation, not a production MTA: it accepts loose syntax, answers
//! every command line in order (which is all PIPELINING needs from a server), and keeps
//! a full transcript of each session so a test can assert what the relay did: which
//! commands, over which TLS version and cipher, and which messages arrived.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use crate::LabError;

/// Longest command or data line accepted (bytes, including CRLF). Defaults to 64 KiB:
/// far above RFC 5321's 1000 so the sink stays tolerant, low enough to bound memory.
const MAX_LINE: usize = 64 * 1024;

/// How long a session may stay silent before the sink hangs up. Defaults to 60 s.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a failing sink refuses mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailAt {
    /// At `MAIL FROM`.
    Mail,
    /// At every `RCPT TO`.
    Rcpt,
    /// After the message data (the final `.`).
    Data,
}

/// How the sink answers mail transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SinkMode {
    /// Accept every message. The default.
    #[default]
    Accept,
    /// Answer `451 4.3.0` at the given stage.
    TempFail(FailAt),
    /// Answer `550 5.7.1` at the given stage.
    PermFail(FailAt),
    /// Never answer the end of the message data: read what the client sends until it
    /// hangs up (a next hop that holds a connection, and a worker, as long as the client
    /// waits).
    SilentAfterData,
}

impl SinkMode {
    fn failure(self, stage: FailAt) -> Option<&'static str> {
        match self {
            SinkMode::TempFail(at) if at == stage => {
                Some("451 4.3.0 altroute-lab sink: temporary failure, try again later")
            }
            SinkMode::PermFail(at) if at == stage => {
                Some("550 5.7.1 altroute-lab sink: permanently refused")
            }
            _ => None,
        }
    }
}

/// What a sink is and how it behaves.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Address to listen on (use [`crate::loopback_ip`] and port 0, or a shared port).
    pub bind: SocketAddr,
    /// Name in the greeting and EHLO reply.
    pub hostname: String,
    /// TLS configuration for STARTTLS; `None` (the default) means STARTTLS is not offered.
    pub starttls: Option<Arc<ServerConfig>>,
    /// How mail is answered. Defaults to [`SinkMode::Accept`].
    pub mode: SinkMode,
    /// Whether EHLO advertises REQUIRETLS (RFC 8689); only once TLS is active, as the
    /// RFC intends. Defaults to false.
    pub advertise_requiretls: bool,
    /// Whether EHLO advertises SMTPUTF8 (RFC 6531). Defaults to false.
    pub advertise_smtputf8: bool,
    /// Whether EHLO advertises DSN (RFC 3461; the parameters are only recorded, in
    /// [`SinkSession::commands`]). Defaults to false.
    pub advertise_dsn: bool,
    /// Whether the sink hangs up right after refusing a transaction at DATA (the `554`
    /// to a DATA without an accepted recipient, or the [`SinkMode`] refusal after the
    /// data), as some servers do after a permanent error: the client's RSET then meets
    /// a closed connection. Defaults to false.
    pub hang_up_after_refusal: bool,
}

impl SinkConfig {
    /// A sink on `bind` named `hostname` that accepts everything, without STARTTLS.
    pub fn new(bind: SocketAddr, hostname: &str) -> SinkConfig {
        SinkConfig {
            bind,
            hostname: hostname.to_owned(),
            starttls: None,
            mode: SinkMode::Accept,
            advertise_requiretls: false,
            advertise_smtputf8: false,
            advertise_dsn: false,
            hang_up_after_refusal: false,
        }
    }
}

/// The TLS parameters of a session after STARTTLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkTls {
    /// "1.2" or "1.3".
    pub version: String,
    /// The rustls name of the cipher suite, e.g. "TLS13_AES_256_GCM_SHA384".
    pub cipher: String,
    /// SNI the client sent, if any.
    pub sni: Option<String>,
}

/// One message received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkMessage {
    /// The reverse path, without angle brackets ("" for the null sender).
    pub mail_from: String,
    /// The accepted recipients, without angle brackets, in order.
    pub rcpt_to: Vec<String>,
    /// The message, CRLF line endings, dot-unstuffed, without the final ".".
    pub data: Vec<u8>,
    /// TLS version of the session when the message arrived ("1.2", "1.3"), or `None`.
    pub tls_version: Option<String>,
}

/// The record of one SMTP session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkSession {
    /// The client's address.
    pub peer: SocketAddr,
    /// Every command line received, in order, without CRLF (not message data).
    pub commands: Vec<String>,
    /// Set once STARTTLS completed.
    pub tls: Option<SinkTls>,
    /// Messages accepted in this session.
    pub messages: Vec<SinkMessage>,
}

#[derive(Default)]
struct Record {
    sessions: Vec<SinkSession>,
}

/// A running SMTP sink. Stops (and drops its sessions) when dropped.
pub struct SmtpSink {
    addr: SocketAddr,
    record: Arc<Mutex<Record>>,
    count: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for SmtpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSink")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SmtpSink {
    /// Binds `config.bind` and starts accepting sessions on the current tokio runtime.
    pub async fn start(config: SinkConfig) -> Result<SmtpSink, LabError> {
        let listener = TcpListener::bind(config.bind).await?;
        let addr = listener.local_addr()?;
        let record = Arc::new(Mutex::new(Record::default()));
        let (count_tx, count) = watch::channel(0usize);
        let shared = Arc::new(Shared {
            config,
            record: record.clone(),
            count: count_tx,
        });
        let task = tokio::spawn(accept_loop(listener, shared));
        tracing::debug!(%addr, "lab SMTP sink started");
        Ok(SmtpSink {
            addr,
            record,
            count,
            task,
        })
    }

    /// The address the sink listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A snapshot of every session so far (including ones still open).
    pub fn sessions(&self) -> Vec<SinkSession> {
        lock(&self.record).sessions.clone()
    }

    /// Every message accepted so far, in order of arrival per session.
    pub fn messages(&self) -> Vec<SinkMessage> {
        lock(&self.record)
            .sessions
            .iter()
            .flat_map(|s| s.messages.iter().cloned())
            .collect()
    }

    /// Waits until at least `n` messages have arrived, then returns all of them.
    pub async fn wait_for_messages(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<SinkMessage>, LabError> {
        let mut count = self.count.clone();
        let waited = tokio::time::timeout(timeout, count.wait_for(|c| *c >= n)).await;
        match waited {
            Ok(Ok(_)) => Ok(self.messages()),
            // The sender lives in the accept task; it only goes away when the sink stops.
            Ok(Err(_)) => Err(LabError::Timeout(format!("{n} messages (sink stopped)"))),
            Err(_) => Err(LabError::Timeout(format!(
                "{n} messages at {} (got {})",
                self.addr,
                *self.count.borrow()
            ))),
        }
    }
}

/// A poisoned lock only means another session task panicked; the record is still usable.
fn lock(record: &Mutex<Record>) -> MutexGuard<'_, Record> {
    record.lock().unwrap_or_else(|p| p.into_inner())
}

struct Shared {
    config: SinkConfig,
    record: Arc<Mutex<Record>>,
    count: watch::Sender<usize>,
}

impl Shared {
    fn with_session<T>(&self, index: usize, f: impl FnOnce(&mut SinkSession) -> T) -> Option<T> {
        lock(&self.record).sessions.get_mut(index).map(f)
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Sessions live in this JoinSet so that stopping the sink (aborting this task) ends them.
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let index = {
                        let mut record = lock(&shared.record);
                        record.sessions.push(SinkSession {
                            peer,
                            commands: Vec::new(),
                            tls: None,
                            messages: Vec::new(),
                        });
                        record.sessions.len() - 1
                    };
                    let shared = shared.clone();
                    sessions.spawn(async move {
                        if let Err(e) = session(stream, &shared, index).await {
                            tracing::debug!(%peer, error = %e, "sink session ended with an error");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "sink accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // Reap finished sessions so the set does not grow without bound.
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
}

/// What the plain-text phase ended with.
enum Ended {
    Closed,
    StartTls,
}

async fn session(stream: TcpStream, shared: &Shared, index: usize) -> Result<(), LabError> {
    let mut conn = BufReader::new(stream);
    let hostname = &shared.config.hostname;
    write_reply(
        &mut conn,
        &format!("220 {hostname} ESMTP altroute-lab sink"),
    )
    .await?;
    match dialogue(&mut conn, shared, index, false).await? {
        Ended::Closed => Ok(()),
        Ended::StartTls => {
            let Some(tls_config) = shared.config.starttls.clone() else {
                return Ok(());
            };
            // Bytes the client pipelined after STARTTLS are dropped with the BufReader:
            // accepting them would allow STARTTLS command injection (CVE-2011-0411 class).
            let stream = conn.into_inner();
            let tls = TlsAcceptor::from(tls_config).accept(stream).await?;
            let (_, server) = tls.get_ref();
            let info = SinkTls {
                version: match server.protocol_version() {
                    Some(rustls::ProtocolVersion::TLSv1_3) => "1.3".to_owned(),
                    Some(rustls::ProtocolVersion::TLSv1_2) => "1.2".to_owned(),
                    Some(other) => format!("{other:?}"),
                    None => "unknown".to_owned(),
                },
                cipher: server
                    .negotiated_cipher_suite()
                    .map(|s| format!("{:?}", s.suite()))
                    .unwrap_or_default(),
                sni: server.server_name().map(str::to_owned),
            };
            shared.with_session(index, |s| s.tls = Some(info));
            let mut conn = BufReader::new(tls);
            dialogue(&mut conn, shared, index, true).await?;
            Ok(())
        }
    }
}

#[derive(Default)]
struct Envelope {
    mail_from: Option<String>,
    rcpt_to: Vec<String>,
}

async fn dialogue<S>(
    conn: &mut BufReader<S>,
    shared: &Shared,
    index: usize,
    tls_active: bool,
) -> Result<Ended, LabError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = &shared.config;
    let hostname = &config.hostname;
    let tls_version = if tls_active {
        shared
            .with_session(index, |s| s.tls.as_ref().map(|t| t.version.clone()))
            .flatten()
    } else {
        None
    };
    // After STARTTLS the client must greet again (RFC 3207 4.2).
    let mut greeted = false;
    let mut envelope = Envelope::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        if !read_line(conn, &mut line).await? {
            return Ok(Ended::Closed);
        }
        let text = String::from_utf8_lossy(&line)
            .trim_end_matches(['\r', '\n'])
            .to_owned();
        shared.with_session(index, |s| s.commands.push(text.clone()));
        let (verb, arg) = match text.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a.trim()),
            None => (text.trim().to_ascii_uppercase(), ""),
        };
        match verb.as_str() {
            "EHLO" => {
                greeted = true;
                envelope = Envelope::default();
                let mut lines = vec![
                    format!("{hostname} greets {arg}"),
                    "PIPELINING".to_owned(),
                    "8BITMIME".to_owned(),
                    "SIZE 52428800".to_owned(),
                    "ENHANCEDSTATUSCODES".to_owned(),
                ];
                if config.starttls.is_some() && !tls_active {
                    lines.push("STARTTLS".to_owned());
                }
                if config.advertise_requiretls && tls_active {
                    lines.push("REQUIRETLS".to_owned());
                }
                if config.advertise_smtputf8 {
                    lines.push("SMTPUTF8".to_owned());
                }
                if config.advertise_dsn {
                    lines.push("DSN".to_owned());
                }
                write_multiline(conn, 250, &lines).await?;
            }
            "HELO" => {
                greeted = true;
                envelope = Envelope::default();
                write_reply(conn, &format!("250 {hostname}")).await?;
            }
            "STARTTLS" => {
                if tls_active {
                    write_reply(conn, "503 5.5.1 TLS already active").await?;
                } else if config.starttls.is_none() {
                    write_reply(conn, "502 5.5.1 STARTTLS not offered").await?;
                } else {
                    write_reply(conn, "220 2.0.0 Ready to start TLS").await?;
                    return Ok(Ended::StartTls);
                }
            }
            "MAIL" => {
                if !greeted {
                    write_reply(conn, "503 5.5.1 Send EHLO first").await?;
                } else if envelope.mail_from.is_some() {
                    write_reply(conn, "503 5.5.1 Nested MAIL command").await?;
                } else if let Some(reply) = config.mode.failure(FailAt::Mail) {
                    write_reply(conn, reply).await?;
                } else {
                    match path_arg(arg, "FROM:") {
                        Some(path) => {
                            envelope.mail_from = Some(path);
                            write_reply(conn, "250 2.1.0 Ok").await?;
                        }
                        None => write_reply(conn, "501 5.5.4 Syntax: MAIL FROM:<address>").await?,
                    }
                }
            }
            "RCPT" => {
                if envelope.mail_from.is_none() {
                    write_reply(conn, "503 5.5.1 Need MAIL command").await?;
                } else if let Some(reply) = config.mode.failure(FailAt::Rcpt) {
                    write_reply(conn, reply).await?;
                } else {
                    match path_arg(arg, "TO:") {
                        Some(path) if !path.is_empty() => {
                            envelope.rcpt_to.push(path);
                            write_reply(conn, "250 2.1.5 Ok").await?;
                        }
                        _ => write_reply(conn, "501 5.5.4 Syntax: RCPT TO:<address>").await?,
                    }
                }
            }
            "DATA" => {
                let Some(mail_from) = envelope.mail_from.clone() else {
                    write_reply(conn, "503 5.5.1 Need MAIL command").await?;
                    continue;
                };
                if envelope.rcpt_to.is_empty() {
                    write_reply(conn, "554 5.5.1 No valid recipients").await?;
                    if config.hang_up_after_refusal {
                        return Ok(Ended::Closed);
                    }
                    continue;
                }
                write_reply(conn, "354 End data with <CR><LF>.<CR><LF>").await?;
                let Some(data) = read_data(conn).await? else {
                    return Ok(Ended::Closed);
                };
                let rcpt_to = std::mem::take(&mut envelope.rcpt_to);
                envelope = Envelope::default();
                if config.mode == SinkMode::SilentAfterData {
                    let mut rest = [0u8; 1024];
                    while conn.read(&mut rest).await? > 0 {}
                    return Ok(Ended::Closed);
                }
                if let Some(reply) = config.mode.failure(FailAt::Data) {
                    write_reply(conn, reply).await?;
                    if config.hang_up_after_refusal {
                        return Ok(Ended::Closed);
                    }
                    continue;
                }
                let message = SinkMessage {
                    mail_from,
                    rcpt_to,
                    data,
                    tls_version: tls_version.clone(),
                };
                let id = {
                    let mut record = lock(&shared.record);
                    if let Some(s) = record.sessions.get_mut(index) {
                        s.messages.push(message);
                    }
                    record
                        .sessions
                        .iter()
                        .map(|s| s.messages.len())
                        .sum::<usize>()
                };
                // Tell waiters only after the message is visible in the record.
                shared.count.send_replace(id);
                write_reply(conn, &format!("250 2.0.0 Ok: queued as LAB{id}")).await?;
            }
            "RSET" => {
                envelope = Envelope::default();
                write_reply(conn, "250 2.0.0 Ok").await?;
            }
            "NOOP" => write_reply(conn, "250 2.0.0 Ok").await?,
            "VRFY" => write_reply(conn, "252 2.5.2 Cannot VRFY user").await?,
            "QUIT" => {
                write_reply(conn, &format!("221 2.0.0 {hostname} closing connection")).await?;
                return Ok(Ended::Closed);
            }
            _ => write_reply(conn, "502 5.5.2 Command not recognized").await?,
        }
    }
}

/// Extracts the address from `FROM:<a@b> PARAMS` / `TO:<a@b>`; tolerates a space after
/// the colon and a missing pair of angle brackets.
fn path_arg(arg: &str, prefix: &str) -> Option<String> {
    let head = arg.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = arg.get(prefix.len()..)?.trim_start();
    let path = match rest.strip_prefix('<') {
        Some(inner) => inner.split_once('>')?.0,
        None => rest.split_whitespace().next().unwrap_or(""),
    };
    Some(path.to_owned())
}

/// Reads one line (up to and including LF) into `buf`. Returns false at end of stream.
async fn read_line<S: AsyncRead + Unpin>(
    conn: &mut BufReader<S>,
    buf: &mut Vec<u8>,
) -> Result<bool, LabError> {
    let read = tokio::time::timeout(IDLE_TIMEOUT, async {
        loop {
            let available = conn.fill_buf().await?;
            if available.is_empty() {
                return Ok::<bool, std::io::Error>(!buf.is_empty());
            }
            let (take, done) = match available.iter().position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None => (available.len(), false),
            };
            buf.extend_from_slice(&available[..take]);
            conn.consume(take);
            if done {
                return Ok(true);
            }
            if buf.len() > MAX_LINE {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "line too long",
                ));
            }
        }
    })
    .await
    .map_err(|_| LabError::Timeout("an SMTP command".into()))?;
    Ok(read?)
}

/// Reads message data up to the lone "." line, undoing dot-stuffing. `None` if the
/// client went away first.
async fn read_data<S: AsyncRead + Unpin>(
    conn: &mut BufReader<S>,
) -> Result<Option<Vec<u8>>, LabError> {
    let mut data = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if !read_line(conn, &mut line).await? {
            return Ok(None);
        }
        if line == b".\r\n" || line == b".\n" {
            return Ok(Some(data));
        }
        let unstuffed = line.strip_prefix(b".").unwrap_or(&line);
        data.extend_from_slice(unstuffed);
    }
}

async fn write_reply<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut BufReader<S>,
    reply: &str,
) -> Result<(), LabError> {
    let stream = conn.get_mut();
    stream.write_all(reply.as_bytes()).await?;
    stream.write_all(b"\r\n").await?;
    stream.flush().await?;
    Ok(())
}

async fn write_multiline<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut BufReader<S>,
    code: u16,
    lines: &[String],
) -> Result<(), LabError> {
    let mut out = String::new();
    for (i, l) in lines.iter().enumerate() {
        let sep = if i + 1 == lines.len() { ' ' } else { '-' };
        out.push_str(&format!("{code}{sep}{l}\r\n"));
    }
    let stream = conn.get_mut();
    stream.write_all(out.as_bytes()).await?;
    stream.flush().await?;
    Ok(())
}
