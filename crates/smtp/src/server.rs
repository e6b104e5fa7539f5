//! The ESMTP server session.
//!
//! [`serve_session`] runs one SMTP session over any `AsyncRead + AsyncWrite`
//! stream (normally a `TcpStream`), upgrading it in place on STARTTLS. What
//! to do with mail is the embedder's: a [`Handler`] decides who may relay and
//! spools messages.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use smtp_proto::Request;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::Error;
use crate::command::{CommandLine, CommandReader, parse_command};
use crate::data::DataReader;
use crate::reply::Reply;

/// What the server learnt about the TLS layer of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// Negotiated protocol version.
    pub version: Option<rustls::ProtocolVersion>,
    /// Negotiated cipher suite.
    pub cipher: Option<rustls::CipherSuite>,
    /// The client's end-entity certificate (DER). Present only if the client
    /// sent one and the client verifier of [`ServerConfig::tls`] accepted it
    /// (rustls aborts the handshake otherwise), so presence means verified
    /// against whatever roots that verifier holds.
    pub client_cert_der: Option<Vec<u8>>,
    /// SNI the client asked for.
    pub sni: Option<String>,
}

/// Facts about the session, passed to every [`Handler`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Client address.
    pub peer: SocketAddr,
    /// Our address.
    pub local: SocketAddr,
    /// Set once STARTTLS completed.
    pub tls: Option<TlsInfo>,
    /// Argument of the last HELO/EHLO (reset by STARTTLS).
    pub helo: Option<String>,
    /// Identity returned by [`Handler::authenticate`] after a successful AUTH.
    pub auth: Option<String>,
}

impl SessionInfo {
    /// A fresh session: no TLS, no HELO, no AUTH.
    pub fn new(peer: SocketAddr, local: SocketAddr) -> Self {
        Self {
            peer,
            local,
            tls: None,
            helo: None,
            auth: None,
        }
    }
}

/// Body type declared with `BODY=` (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Body {
    /// `BODY=7BIT` or no BODY parameter.
    #[default]
    SevenBit,
    /// `BODY=8BITMIME`.
    EightBitMime,
}

/// The envelope of one transaction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Envelope {
    /// Reverse path without angle brackets; empty for the null sender.
    pub mail_from: String,
    /// `REQUIRETLS` given on MAIL FROM (RFC 8689); only accepted over TLS.
    pub requiretls: bool,
    /// `BODY=` parameter.
    pub body: Body,
    /// `SMTPUTF8` given on MAIL FROM.
    pub smtputf8: bool,
    /// Declared `SIZE=`.
    pub size: Option<u64>,
    /// DSN `ENVID=`.
    pub env_id: Option<String>,
    /// DSN `RET=`.
    pub ret: Option<crate::dsn::Ret>,
    /// Accepted recipients, in order.
    pub rcpt_to: Vec<String>,
    /// The DSN parameters of each of `rcpt_to` (same order), or empty: none given. A
    /// client may leave it empty or shorter.
    pub rcpt_dsn: Vec<crate::dsn::RcptDsn>,
}

/// How a session ended (errors aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEnd {
    /// The client sent QUIT.
    Quit,
    /// The client closed the connection.
    Disconnected,
    /// A command, data or session timeout fired and `421 4.4.2` was sent, or the
    /// client did not take its replies within the command timeout.
    Timeout,
    /// The client made more than [`MAX_ERRORS`] errors; `421 4.7.0` was sent.
    TooManyErrors,
}

/// Errors a session may make (unknown or unimplemented commands, syntax
/// errors, over-long lines, failed AUTH) before it is closed with
/// `421 4.7.0`. Postfix's `smtpd_hard_error_limit` has the same default.
pub const MAX_ERRORS: u32 = 20;

/// The embedder's side of a server session.
///
/// The server enforces protocol rules and limits; the handler decides who
/// may relay and takes messages. All calls get the current [`SessionInfo`].
pub trait Handler: Send + Sync + 'static {
    /// May this session relay mail? Checked for every RCPT before
    /// [`rcpt_to`](Self::rcpt_to); `false` gets `550 5.7.1 Relaying denied`.
    /// Decide from `session.peer`, `session.tls` (client certificate) and
    /// `session.auth`. There is no default: every embedder must choose.
    fn may_relay(&self, session: &SessionInfo) -> bool;

    /// MAIL FROM was syntactically valid and passed the server's checks
    /// (`envelope.rcpt_to` is empty). Defaults to `250 2.1.0`.
    fn mail_from(
        &self,
        _session: &SessionInfo,
        _envelope: &Envelope,
    ) -> impl Future<Output = Reply> + Send {
        async { Reply::new(250, (2, 1, 0), "Sender OK") }
    }

    /// A recipient from a client allowed to relay. Defaults to `250 2.1.5`.
    fn rcpt_to(
        &self,
        _session: &SessionInfo,
        _envelope: &Envelope,
        _rcpt: &str,
    ) -> impl Future<Output = Reply> + Send {
        async { Reply::new(250, (2, 1, 5), "Recipient OK") }
    }

    /// A complete message (dot-unstuffed, CRLF line ends, within all limits).
    /// Return 250 only once it is durable; 4xx if it could not be stored.
    fn data(
        &self,
        session: &SessionInfo,
        envelope: &Envelope,
        message: Vec<u8>,
    ) -> impl Future<Output = Reply> + Send;

    /// Check AUTH PLAIN/LOGIN credentials (only ever called over TLS, and only
    /// if [`ServerConfig::auth`] is set). Return the authenticated identity.
    /// Defaults to rejecting everyone.
    fn authenticate(
        &self,
        _session: &SessionInfo,
        _authcid: &str,
        _password: &str,
    ) -> impl Future<Output = Option<String>> + Send {
        async { None }
    }
}

/// Server settings. Build with [`ServerConfig::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Our name in the greeting and EHLO reply.
    pub hostname: String,
    /// Largest message in octets, advertised as SIZE. Defaults to 35 MiB.
    pub max_message_size: usize,
    /// Recipients per message. Defaults to 100 (RFC 5321 4.5.3.1.8 minimum).
    pub max_recipients: usize,
    /// Wait for each command. Defaults to 5 min (RFC 5321 4.5.3.2.7).
    pub command_timeout: Duration,
    /// Wait for each block of message data. Defaults to 3 min (RFC 5321
    /// 4.5.3.2.5 asks the client for 3 min per block; we mirror it).
    pub data_timeout: Duration,
    /// Whole session. Defaults to 30 min.
    pub session_timeout: Duration,
    /// STARTTLS is offered when set. A client verifier on it decides whether
    /// client certificates are requested/verified.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Offer AUTH PLAIN LOGIN (only after TLS). Defaults to false.
    pub auth: bool,
    /// Offer SMTPUTF8. Defaults to true.
    pub smtputf8: bool,
    /// Offer PIPELINING. Defaults to true. (Pipelined input is handled
    /// correctly either way; this only changes the EHLO reply.)
    pub pipelining: bool,
}

impl ServerConfig {
    /// Defaults as documented on each field.
    pub fn new(hostname: impl Into<String>) -> Self {
        Self {
            hostname: hostname.into(),
            max_message_size: 35 * 1024 * 1024,
            max_recipients: 100,
            command_timeout: Duration::from_secs(5 * 60),
            data_timeout: Duration::from_secs(3 * 60),
            session_timeout: Duration::from_secs(30 * 60),
            tls: None,
            auth: false,
            smtputf8: true,
            pipelining: true,
        }
    }
}

/// Run one SMTP session to its end. Sends the greeting, serves commands,
/// upgrades to TLS on STARTTLS. Returns how it ended; I/O and TLS handshake
/// failures are errors.
pub async fn serve_session<S, H>(
    stream: S,
    info: SessionInfo,
    config: Arc<ServerConfig>,
    handler: Arc<H>,
) -> Result<SessionEnd, Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    H: Handler,
{
    let deadline = Instant::now() + config.session_timeout;
    let mut session = Session {
        info,
        config: config.clone(),
        handler,
        envelope: None,
        deadline,
        errors: 0,
        esmtp: false,
    };
    let mut conn = Conn::new(stream, config.command_timeout);
    conn.push(&Reply::new(
        220,
        (2, 0, 0),
        format!("{} ESMTP altroute", config.hostname),
    ));
    let stream = match ended_by_timeout(session.run(&mut conn).await)? {
        Step::End(end) => return Ok(end),
        Step::StartTls => conn.stream,
    };
    // Whatever the client pipelined after STARTTLS was dropped with `conn`:
    // nothing sent in clear text may be acted upon inside TLS (CVE-2011-0411).
    let Some(tls_config) = config.tls.clone() else {
        return Err(Error::Config("STARTTLS without TLS config".into()));
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_config);
    let wait = deadline.min(Instant::now() + config.command_timeout);
    let tls = match tokio::time::timeout_at(wait, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err(Error::Io(e)),
        Err(_) => return Ok(SessionEnd::Timeout),
    };
    let (_, server) = tls.get_ref();
    session.info.tls = Some(TlsInfo {
        version: server.protocol_version(),
        cipher: server.negotiated_cipher_suite().map(|s| s.suite()),
        client_cert_der: server
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec()),
        sni: server.server_name().map(str::to_string),
    });
    // RFC 3207 4.2: forget everything learnt before TLS.
    session.info.helo = None;
    session.info.auth = None;
    session.envelope = None;
    let mut conn = Conn::new(tls, config.command_timeout);
    match ended_by_timeout(session.run(&mut conn).await)? {
        Step::End(end) => Ok(end),
        // STARTTLS inside TLS is refused with 503, so this cannot happen;
        // treat it as a protocol end rather than trusting that.
        Step::StartTls => Ok(SessionEnd::Disconnected),
    }
}

enum Step {
    End(SessionEnd),
    StartTls,
}

/// A client that did not take its replies within the command timeout: the session ends
/// as timed out (no 421: its buffers are full).
fn ended_by_timeout(step: Result<Step, Error>) -> Result<Step, Error> {
    match step {
        Err(Error::Timeout) => Ok(Step::End(SessionEnd::Timeout)),
        other => other,
    }
}

enum Read {
    Data,
    Eof,
    Timeout,
}

/// A stream with an input buffer and a reply buffer. Replies are flushed only
/// when the server needs more input, which batches replies to pipelined
/// commands (RFC 2920).
struct Conn<T> {
    stream: T,
    inbuf: Vec<u8>,
    pos: usize,
    out: Vec<u8>,
    reader: CommandReader,
    /// How long writing the pending replies may take (the command timeout).
    write_wait: Duration,
}

/// Replies held back for a pipelined batch before they are written anyway: a client
/// that pipelines thousands of short commands (HELP, NOOP) must not make the server
/// hold many times their size in replies.
const OUT_HIGH_WATER: usize = 64 * 1024;

/// How long the last reply of a session that is being closed (421) may take to write.
const FAREWELL_WAIT: Duration = Duration::from_secs(10);

impl<T: AsyncRead + AsyncWrite + Unpin> Conn<T> {
    fn new(stream: T, write_wait: Duration) -> Self {
        Self {
            stream,
            inbuf: Vec::with_capacity(16 * 1024),
            pos: 0,
            out: Vec::new(),
            reader: CommandReader::new(),
            write_wait,
        }
    }

    fn push(&mut self, reply: &Reply) {
        self.out.extend_from_slice(&reply.to_bytes());
    }

    /// Write the pending replies within the command timeout. A client that does not
    /// read its replies gets [`Error::Timeout`]: an audit's clients that pipelined
    /// commands and never read held their sessions (and every `max_sessions` slot)
    /// past every timeout, since only reads had one.
    async fn flush(&mut self) -> Result<(), Error> {
        let until = Instant::now() + self.write_wait;
        self.flush_until(until).await
    }

    async fn flush_until(&mut self, until: Instant) -> Result<(), Error> {
        if !self.out.is_empty() {
            let write = async {
                self.stream.write_all(&self.out).await?;
                self.stream.flush().await
            };
            tokio::time::timeout_at(until, write)
                .await
                .map_err(|_| Error::Timeout)??;
            self.out.clear();
        }
        Ok(())
    }

    /// The session's last reply (421), written if the client takes it within
    /// [`FAREWELL_WAIT`]; then the stream is shut down.
    async fn farewell(&mut self, reply: &Reply) {
        self.push(reply);
        let until = Instant::now() + FAREWELL_WAIT.min(self.write_wait);
        // Best effort: the peer may be gone or may not read.
        if self.flush_until(until).await.is_ok() {
            let _ = tokio::time::timeout_at(until, self.stream.shutdown()).await;
        }
    }

    fn pending(&self) -> &[u8] {
        self.inbuf.get(self.pos..).unwrap_or(&[])
    }

    /// Flush replies, then read more input, waiting until `wait`.
    async fn fill(&mut self, wait: Instant) -> Result<Read, Error> {
        self.flush().await?;
        self.inbuf.clear();
        self.pos = 0;
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(wait, self.stream.read(&mut chunk)).await {
            Err(_) => Ok(Read::Timeout),
            Ok(Ok(0)) => Ok(Read::Eof),
            Ok(Ok(n)) => {
                self.inbuf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
                Ok(Read::Data)
            }
            // A reset peer is a disconnect, not a server error.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(Read::Eof),
            Ok(Err(e)) => Err(Error::Io(e)),
        }
    }

    async fn timeout_reply(&mut self, hostname: &str) -> Result<(), Error> {
        self.farewell(&Reply::new(
            421,
            (4, 4, 2),
            format!("{hostname} Timeout, closing connection"),
        ))
        .await;
        Ok(())
    }
}

enum Next {
    Line(CommandLine),
    End(SessionEnd),
}

struct Session<H> {
    info: SessionInfo,
    config: Arc<ServerConfig>,
    handler: Arc<H>,
    envelope: Option<Envelope>,
    deadline: Instant,
    /// Errors so far (see [`MAX_ERRORS`]); not reset by STARTTLS.
    errors: u32,
    /// The last greeting was EHLO, not HELO.
    esmtp: bool,
}

impl<H: Handler> Session<H> {
    fn command_wait(&self) -> Instant {
        self.deadline
            .min(Instant::now() + self.config.command_timeout)
    }

    async fn next_line<T: AsyncRead + AsyncWrite + Unpin>(
        &self,
        conn: &mut Conn<T>,
    ) -> Result<Next, Error> {
        loop {
            if Instant::now() >= self.deadline {
                conn.timeout_reply(&self.config.hostname).await?;
                return Ok(Next::End(SessionEnd::Timeout));
            }
            let (n, line) = {
                let pending = conn.inbuf.get(conn.pos..).unwrap_or(&[]);
                conn.reader.feed(pending)
            };
            conn.pos += n;
            if let Some(line) = line {
                return Ok(Next::Line(line));
            }
            match conn.fill(self.command_wait()).await? {
                Read::Data => {}
                Read::Eof => return Ok(Next::End(SessionEnd::Disconnected)),
                Read::Timeout => {
                    conn.timeout_reply(&self.config.hostname).await?;
                    return Ok(Next::End(SessionEnd::Timeout));
                }
            }
        }
    }

    async fn run<T: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<T>,
    ) -> Result<Step, Error> {
        loop {
            if self.errors > MAX_ERRORS {
                conn.farewell(&Reply::new(
                    421,
                    (4, 7, 0),
                    format!(
                        "{} Too many errors, closing connection",
                        self.config.hostname
                    ),
                ))
                .await;
                return Ok(Step::End(SessionEnd::TooManyErrors));
            }
            if conn.out.len() >= OUT_HIGH_WATER {
                conn.flush().await?;
            }
            let line = match self.next_line(conn).await? {
                Next::Line(CommandLine::Line(line)) => line,
                Next::Line(CommandLine::TooLong) => {
                    self.errors += 1;
                    conn.push(&Reply::new(500, (5, 5, 6), "Line too long"));
                    continue;
                }
                Next::End(end) => return Ok(Step::End(end)),
            };
            let request = match parse_command(&line) {
                Ok(r) => r,
                Err(e) => {
                    self.errors += 1;
                    conn.push(&parse_error_reply(&e));
                    continue;
                }
            };
            match request {
                Request::Ehlo { host } => {
                    self.envelope = None;
                    self.esmtp = true;
                    self.info.helo = Some(host);
                    conn.push(&self.ehlo_reply());
                }
                Request::Helo { host } => {
                    self.envelope = None;
                    self.esmtp = false;
                    self.info.helo = Some(host);
                    conn.push(&Reply {
                        code: 250,
                        enhanced: None,
                        text: vec![self.config.hostname.clone()],
                    });
                }
                // smtp-proto lets control characters through inside quotes and drops
                // CRs there: `"x\r.\r"@d` would be kept as `x.@d`, another mailbox.
                // No mailbox or parameter may hold one (RFC 5321 4.1.2).
                Request::Mail { .. } | Request::Rcpt { .. }
                    if line.iter().any(|&b| crate::address::is_control(b)) =>
                {
                    self.errors += 1;
                    conn.push(&Reply::new(
                        501,
                        (5, 5, 4),
                        "Control characters are not allowed in MAIL or RCPT",
                    ));
                }
                Request::Mail { from } => {
                    let reply = self.mail(from, &line).await;
                    conn.push(&reply);
                }
                Request::Rcpt { to } => {
                    let reply = self.rcpt(to, &line).await;
                    conn.push(&reply);
                }
                Request::Data => {
                    if let Some(end) = self.data(conn).await? {
                        return Ok(Step::End(end));
                    }
                }
                Request::StartTls => {
                    if self.info.tls.is_some() {
                        conn.push(&Reply::new(503, (5, 5, 1), "TLS already active"));
                    } else if self.config.tls.is_none() {
                        conn.push(&Reply::new(502, (5, 5, 1), "STARTTLS not available"));
                    } else {
                        conn.push(&Reply::new(220, (2, 0, 0), "Ready to start TLS"));
                        conn.flush().await?;
                        return Ok(Step::StartTls);
                    }
                }
                Request::Auth {
                    mechanism,
                    initial_response,
                } => {
                    conn.reader.set_limit(crate::command::MAX_AUTH_LINE);
                    let end = self.auth(conn, mechanism, initial_response).await;
                    conn.reader.set_limit(crate::command::MAX_COMMAND_LINE);
                    if let Some(end) = end? {
                        return Ok(Step::End(end));
                    }
                    // Every AUTH that did not authenticate is an error of the session, a
                    // cancelled or malformed one too: an audit's 60 of those kept a
                    // session (and its slot) open, uncounted.
                    if self.info.auth.is_none() {
                        self.errors += 1;
                    }
                }
                Request::Rset => {
                    self.envelope = None;
                    conn.push(&Reply::ok());
                }
                Request::Noop { .. } => conn.push(&Reply::ok()),
                Request::Vrfy { .. } => conn.push(&Reply::new(
                    252,
                    (2, 5, 0),
                    "Cannot VRFY user, but will accept message and attempt delivery",
                )),
                Request::Help { .. } => conn.push(&Reply::new(
                    214,
                    (2, 0, 0),
                    "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH",
                )),
                Request::Quit => {
                    conn.farewell(&Reply::new(221, (2, 0, 0), "Bye")).await;
                    return Ok(Step::End(SessionEnd::Quit));
                }
                // CHUNKING is not offered, so BDAT is a command we do not know,
                // and whatever follows it is read as commands, as by any server
                // without CHUNKING (RFC 3030 §2). The SMTP edge filter in front
                // of this port (wasm/policy/src/smtp.rs) reads them the same way
                // and checks each one; a server that skipped `chunk_size` octets
                // would desynchronise from it, and a command the filter rewrote
                // to a shorter one would shift where the server resumes reading.
                // Known commands we do not offer (BDAT, EXPN, ETRN, LHLO,
                // ATRN, BURL).
                _ => {
                    self.errors += 1;
                    conn.push(&Reply::new(502, (5, 5, 1), "Command not implemented"));
                }
            }
        }
    }

    fn ehlo_reply(&self) -> Reply {
        let c = &self.config;
        let mut text = vec![c.hostname.clone()];
        if c.pipelining {
            text.push("PIPELINING".into());
        }
        text.extend([
            "8BITMIME".into(),
            format!("SIZE {}", c.max_message_size),
            "ENHANCEDSTATUSCODES".into(),
            "DSN".into(),
        ]);
        if c.smtputf8 {
            text.push("SMTPUTF8".into());
        }
        if self.info.tls.is_some() {
            // RFC 8689 section 4: only offered once TLS is active.
            text.push("REQUIRETLS".into());
            if c.auth {
                text.push("AUTH PLAIN LOGIN".into());
            }
        } else if c.tls.is_some() {
            text.push("STARTTLS".into());
        }
        text.push("HELP".into());
        Reply {
            code: 250,
            enhanced: None,
            text,
        }
    }

    async fn mail(&mut self, from: smtp_proto::MailFrom<String>, line: &[u8]) -> Reply {
        if self.info.helo.is_none() {
            return Reply::new(503, (5, 5, 1), "Send EHLO or HELO first");
        }
        if self.envelope.is_some() {
            return Reply::new(503, (5, 5, 1), "Nested MAIL command");
        }
        let params = mail_params(line);
        if !self.esmtp && !params.is_empty() {
            // RFC 5321 4.1.1.11: parameters only for extensions offered in
            // the EHLO reply, and HELO offers none.
            return Reply::new(555, (5, 5, 4), "MAIL parameters need EHLO");
        }
        if let Some(dup) = duplicate(&params) {
            return Reply::new(
                501,
                (5, 5, 4),
                format!("Duplicate parameter {}", String::from_utf8_lossy(dup)),
            );
        }
        if !from.address.is_empty() && !valid_mailbox(&from.address) {
            return Reply::new(501, (5, 1, 7), "Bad sender address syntax");
        }
        let f = from.flags;
        if f & smtp_proto::MAIL_RET_FULL != 0 && f & smtp_proto::MAIL_RET_HDRS != 0 {
            return Reply::new(501, (5, 5, 4), "Duplicate parameter RET");
        }
        // AUTH= only where AUTH is offered (this server offers it inside TLS only): an
        // extension not offered is a parameter not supported (RFC 5321 §4.1.1.11).
        let auth_offered = self.config.auth && self.info.tls.is_some();
        if f & smtp_proto::MAIL_BODY_BINARYMIME != 0
            || from.auth.is_some() && !auth_offered
            || from.trans_id.is_some()
            || from.mtrk.is_some()
            || from.by != 0
            || from.hold_for != 0
            || from.hold_until != 0
            || from.solicit.is_some()
            || f & (smtp_proto::MAIL_CONPERM
                | smtp_proto::MAIL_BY_NOTIFY
                | smtp_proto::MAIL_BY_RETURN
                | smtp_proto::MAIL_BY_TRACE)
                != 0
        {
            return Reply::new(555, (5, 5, 4), "Unsupported MAIL parameter");
        }
        // Decoded here from the line (UTF-8, one line), not as smtp-proto decodes it.
        let env_id = match from.env_id {
            None => None,
            // RFC 3461 §4.4: printable US-ASCII (Postfix refuses anything else, and the
            // mail then bounced at it).
            Some(_) => match dsn_param(line, "ENVID")
                .filter(|id| id.bytes().all(|b| (0x20..=0x7e).contains(&b)))
            {
                Some(id) => Some(id),
                None => {
                    return Reply::new(501, (5, 5, 4), "ENVID must be xtext of printable US-ASCII");
                }
            },
        };
        let smtputf8 = f & smtp_proto::MAIL_SMTPUTF8 != 0;
        if smtputf8 && !self.config.smtputf8 {
            return Reply::new(555, (5, 5, 4), "SMTPUTF8 not supported");
        }
        if !smtputf8 && !from.address.is_ascii() {
            return Reply::new(553, (5, 6, 7), "Non-ASCII address requires SMTPUTF8");
        }
        let requiretls = f & smtp_proto::MAIL_REQUIRETLS != 0;
        if requiretls && self.info.tls.is_none() {
            return Reply::new(530, (5, 7, 10), "REQUIRETLS needs a TLS session");
        }
        // smtp-proto reports an absent SIZE as 0.
        let size = (from.size != 0).then_some(from.size as u64);
        if size.is_some_and(|s| s > self.config.max_message_size as u64) {
            return Reply::new(552, (5, 3, 4), "Message size exceeds fixed maximum");
        }
        let envelope = Envelope {
            mail_from: from.address,
            requiretls,
            body: if f & smtp_proto::MAIL_BODY_8BITMIME != 0 {
                Body::EightBitMime
            } else {
                Body::SevenBit
            },
            smtputf8,
            size,
            env_id,
            ret: if f & smtp_proto::MAIL_RET_FULL != 0 {
                Some(crate::dsn::Ret::Full)
            } else if f & smtp_proto::MAIL_RET_HDRS != 0 {
                Some(crate::dsn::Ret::Hdrs)
            } else {
                None
            },
            rcpt_to: Vec::new(),
            rcpt_dsn: Vec::new(),
        };
        let reply = self.handler.mail_from(&self.info, &envelope).await;
        if reply.is_positive() {
            self.envelope = Some(envelope);
        }
        reply
    }

    async fn rcpt(&mut self, to: smtp_proto::RcptTo<String>, line: &[u8]) -> Reply {
        let Some(envelope) = self.envelope.as_ref() else {
            return Reply::new(503, (5, 5, 1), "Need MAIL command first");
        };
        let address = to.address;
        if let Some(dup) = duplicate(&mail_params(line)) {
            return Reply::new(
                501,
                (5, 5, 4),
                format!("Duplicate parameter {}", String::from_utf8_lossy(dup)),
            );
        }
        // RFC 3461 §4: NOTIFY and ORCPT; anything else this server does not offer.
        if to.rrvs != 0 || to.flags & smtp_proto::RCPT_CONNEG != 0 {
            return Reply::new(555, (5, 5, 4), "Unsupported RCPT parameter");
        }
        let Some(notify) = crate::dsn::Notify::from_flags(to.flags) else {
            return Reply::new(501, (5, 5, 4), "NOTIFY=NEVER cannot be combined");
        };
        // The original recipient goes into DSNs and on to DSN next hops: decoded here
        // from the line (UTF-8, one line), not as smtp-proto decodes it.
        let orcpt = match to.orcpt {
            None => None,
            Some(_) => match dsn_param(line, "ORCPT") {
                Some(o) => Some(o),
                None => {
                    return Reply::new(
                        501,
                        (5, 5, 4),
                        "ORCPT must be rfc822;xtext of UTF-8 without control characters",
                    );
                }
            },
        };
        let dsn = crate::dsn::RcptDsn { notify, orcpt };
        if envelope.rcpt_to.len() >= self.config.max_recipients {
            return Reply::new(452, (4, 5, 3), "Too many recipients");
        }
        if !envelope.smtputf8 && !address.is_ascii() {
            return Reply::new(553, (5, 6, 7), "Non-ASCII address requires SMTPUTF8");
        }
        // RFC 5321 4.1.1.3: the forward path is never null; "postmaster"
        // alone is the only mailbox without a domain.
        if !valid_mailbox(&address) && !address.eq_ignore_ascii_case("postmaster") {
            return Reply::new(501, (5, 1, 3), "Bad recipient address syntax");
        }
        if !self.handler.may_relay(&self.info) {
            return Reply::new(550, (5, 7, 1), "Relaying denied");
        }
        let reply = self.handler.rcpt_to(&self.info, envelope, &address).await;
        if reply.is_positive()
            && let Some(envelope) = self.envelope.as_mut()
        {
            envelope.rcpt_to.push(address);
            envelope.rcpt_dsn.push(dsn);
        }
        reply
    }

    /// DATA: 354, read to the end of data, hand over or reject. `Some` ends
    /// the session.
    async fn data<T: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<T>,
    ) -> Result<Option<SessionEnd>, Error> {
        let Some(envelope) = self.envelope.as_ref() else {
            conn.push(&Reply::new(503, (5, 5, 1), "Need MAIL command first"));
            return Ok(None);
        };
        if envelope.rcpt_to.is_empty() {
            conn.push(&Reply::new(554, (5, 5, 1), "No valid recipients"));
            return Ok(None);
        }
        conn.push(&Reply {
            code: 354,
            enhanced: None,
            text: vec!["End data with <CR><LF>.<CR><LF>".into()],
        });
        let mut reader = DataReader::new(self.config.max_message_size);
        loop {
            let n = reader.feed(conn.pending());
            conn.pos += n;
            if reader.is_done() {
                break;
            }
            let wait = self.deadline.min(Instant::now() + self.config.data_timeout);
            match conn.fill(wait).await? {
                Read::Data => {}
                Read::Eof => return Ok(Some(SessionEnd::Disconnected)),
                Read::Timeout => {
                    conn.timeout_reply(&self.config.hostname).await?;
                    return Ok(Some(SessionEnd::Timeout));
                }
            }
        }
        // The transaction ends here whatever the outcome (RFC 5321 4.1.1.4).
        let Some(envelope) = self.envelope.take() else {
            return Ok(None);
        };
        let reply = match reader.finish() {
            Ok(message) => self.handler.data(&self.info, &envelope, message).await,
            Err(e) => e.reply(),
        };
        conn.push(&reply);
        Ok(None)
    }

    /// AUTH PLAIN / LOGIN (RFC 4954), only over TLS.
    async fn auth<T: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<T>,
        mechanism: u64,
        initial: String,
    ) -> Result<Option<SessionEnd>, Error> {
        if !self.config.auth {
            conn.push(&Reply::new(502, (5, 5, 1), "AUTH not available"));
            return Ok(None);
        }
        if self.info.tls.is_none() {
            conn.push(&Reply::new(
                538,
                (5, 7, 11),
                "Encryption required for requested authentication mechanism",
            ));
            return Ok(None);
        }
        if self.info.auth.is_some() || self.envelope.is_some() {
            conn.push(&Reply::new(503, (5, 5, 1), "AUTH not allowed now"));
            return Ok(None);
        }
        let plain = mechanism == smtp_proto::AUTH_PLAIN;
        if !plain && mechanism != smtp_proto::AUTH_LOGIN {
            conn.push(&Reply::new(
                504,
                (5, 5, 4),
                "Unrecognized authentication type",
            ));
            return Ok(None);
        }
        // Each prompt's answer, base64-decoded; `None` = cancelled/invalid.
        let mut answers: Vec<Vec<u8>> = Vec::new();
        let prompts: &[&str] = if plain {
            &[""]
        } else {
            &["VXNlcm5hbWU6", "UGFzc3dvcmQ6"]
        };
        let mut first = (!initial.is_empty()).then_some(initial);
        for prompt in prompts {
            let line = match first.take() {
                // "=" is an empty initial response (RFC 4954 section 4).
                Some(s) => s.into_bytes(),
                None => {
                    conn.push(&Reply {
                        code: 334,
                        enhanced: None,
                        text: vec![(*prompt).to_string()],
                    });
                    match self.next_line(conn).await? {
                        Next::Line(CommandLine::Line(l)) => l,
                        Next::Line(CommandLine::TooLong) => {
                            conn.push(&Reply::new(
                                500,
                                (5, 5, 6),
                                "Authentication exchange line is too long",
                            ));
                            return Ok(None);
                        }
                        Next::End(end) => return Ok(Some(end)),
                    }
                }
            };
            if line == b"*" {
                conn.push(&Reply::new(501, (5, 0, 0), "Authentication cancelled"));
                return Ok(None);
            }
            let decoded = if line == b"=" {
                Vec::new()
            } else {
                match BASE64.decode(&line) {
                    Ok(d) => d,
                    Err(_) => {
                        conn.push(&Reply::new(501, (5, 5, 2), "Invalid base64"));
                        return Ok(None);
                    }
                }
            };
            answers.push(decoded);
        }
        let creds = if plain {
            // authzid NUL authcid NUL passwd
            let mut parts = answers
                .first()
                .map(|a| a.split(|b| *b == 0))
                .into_iter()
                .flatten();
            let authzid = parts.next().unwrap_or_default();
            match (parts.next(), parts.next(), parts.next()) {
                // Acting as another identity is not offered (RFC 4616 §2: the server must
                // check that the client may; it may not): an authzid is this user's or
                // none. It was ignored.
                (Some(user), Some(_), None) if !authzid.is_empty() && authzid != user => {
                    conn.push(&Reply::new(
                        535,
                        (5, 7, 8),
                        "Authentication credentials invalid: no authorization as another identity",
                    ));
                    return Ok(None);
                }
                (Some(user), Some(pass), None) => Some((user.to_vec(), pass.to_vec())),
                _ => None,
            }
        } else {
            match (answers.first(), answers.get(1)) {
                (Some(u), Some(p)) => Some((u.clone(), p.clone())),
                _ => None,
            }
        };
        let Some((user, pass)) = creds else {
            conn.push(&Reply::new(501, (5, 5, 2), "Malformed credentials"));
            return Ok(None);
        };
        let (Ok(user), Ok(pass)) = (String::from_utf8(user), String::from_utf8(pass)) else {
            conn.push(&Reply::new(501, (5, 5, 2), "Malformed credentials"));
            return Ok(None);
        };
        match self.handler.authenticate(&self.info, &user, &pass).await {
            Some(identity) => {
                self.info.auth = Some(identity);
                conn.push(&Reply::new(235, (2, 7, 0), "Authentication successful"));
            }
            None => {
                conn.push(&Reply::new(
                    535,
                    (5, 7, 8),
                    "Authentication credentials invalid",
                ));
            }
        }
        Ok(None)
    }
}

fn parse_error_reply(e: &smtp_proto::Error) -> Reply {
    use smtp_proto::Error as E;
    match e {
        E::UnknownCommand => Reply::new(500, (5, 5, 2), "Command unrecognized"),
        E::InvalidSenderAddress => Reply::new(501, (5, 1, 7), "Bad sender address syntax"),
        E::InvalidRecipientAddress => Reply::new(501, (5, 1, 3), "Bad recipient address syntax"),
        E::UnsupportedParameter { .. } => Reply::new(555, (5, 5, 4), "Unsupported parameter"),
        E::SyntaxError { syntax } => Reply::new(501, (5, 5, 4), format!("Syntax: {syntax}")),
        E::InvalidParameter { param } => {
            Reply::new(501, (5, 5, 4), format!("Invalid parameter {param}"))
        }
        _ => Reply::new(501, (5, 5, 4), "Syntax error"),
    }
}

/// The ESMTP parameters of a MAIL line: the words after the closing `>` of
/// the reverse path (quoted local parts may contain `>`).
/// The value of DSN parameter `name` (`ENVID`, or `ORCPT` without its `rfc822;`) in a
/// MAIL or RCPT `line`, xtext-decoded ([`crate::address::xtext_decode`]); `None` if it is
/// absent or not valid.
fn dsn_param(line: &[u8], name: &str) -> Option<String> {
    let param = mail_params(line).into_iter().find(|p| {
        p.len() > name.len()
            && p[..name.len()].eq_ignore_ascii_case(name.as_bytes())
            && p[name.len()] == b'='
    })?;
    let mut value = &param[name.len() + 1..];
    if name == "ORCPT" {
        let semi = value.iter().position(|b| *b == b';')?;
        if !value[..semi].eq_ignore_ascii_case(b"rfc822") {
            return None;
        }
        value = &value[semi + 1..];
    }
    crate::address::xtext_decode(value)
}

fn mail_params(line: &[u8]) -> Vec<&[u8]> {
    let Some(open) = line.iter().position(|b| *b == b'<') else {
        return Vec::new();
    };
    let (mut quoted, mut escaped) = (false, false);
    let mut close = None;
    for (i, &b) in line.iter().enumerate().skip(open + 1) {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'>' if !quoted => {
                close = Some(i);
                break;
            }
            _ => {}
        }
    }
    let rest = close.and_then(|c| line.get(c + 1..)).unwrap_or(&[]);
    rest.split(|b| *b == b' ' || *b == b'\t')
        .filter(|w| !w.is_empty())
        .collect()
}

/// The first parameter keyword given twice (RFC 5321 4.1.2 allows each
/// once), compared without case and without its `=value`.
fn duplicate<'a>(params: &[&'a [u8]]) -> Option<&'a [u8]> {
    let key = |p: &'a [u8]| p.split(|b| *b == b'=').next().unwrap_or(p);
    params.iter().enumerate().find_map(|(i, p)| {
        let k = key(p);
        params
            .get(..i)
            .unwrap_or(&[])
            .iter()
            .any(|q| key(q).eq_ignore_ascii_case(k))
            .then_some(k)
    })
}

/// `local@domain` within RFC 5321 4.5.3.1 limits (local part 64 octets,
/// domain 255), with a non-empty local part and a domain of LDH labels or an IP
/// address literal ([`crate::address::is_ip_literal`]). A domain with non-ASCII
/// octets (SMTPUTF8) must be a valid IDN (UTS 46): the relay delivers to its A-label,
/// and a name with no A-label could be neither resolved nor held to a rule. The local
/// part's syntax was checked by the parser; the client quotes it again when it is not
/// a dot-atom ([`crate::address::to_wire`]).
fn valid_mailbox(address: &str) -> bool {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return false;
    };
    if local.is_empty() || local.len() > 64 || domain.is_empty() || domain.len() > 255 {
        return false;
    }
    if domain.starts_with('[') {
        return crate::address::is_ip_literal(domain);
    }
    if !domain.is_ascii() && idna::domain_to_ascii(domain).is_err() {
        return false;
    }
    domain.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || !b.is_ascii())
    })
}
