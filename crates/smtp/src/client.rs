//! The SMTP client session used for delivery.
//!
//! [`Client::connect`] reads the greeting and sends EHLO (HELO if EHLO is
//! refused); [`Client::starttls`] upgrades with any rustls `ClientConfig`
//! (e.g. one built by [`RecordingVerifier::client_config`]); [`Client::send`]
//! runs one transaction, pipelined when the server offers PIPELINING.
//!
//! [`RecordingVerifier::client_config`]: crate::RecordingVerifier::client_config

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::Error;
use crate::data::dot_stuff;
use crate::reply::{Reply, ReplyReader};
use crate::server::{Body, Envelope};

/// Size of one write of the message data, each with its own timeout. 64 KiB.
pub const BODY_CHUNK: usize = 64 * 1024;

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Name sent in EHLO/HELO.
    pub helo_name: String,
    /// Wait for the greeting and for each reply to a command, and for each write
    /// (of a command, or of one [`BODY_CHUNK`] of the message). Defaults to 5 min
    /// (RFC 5321 4.5.3.2 gives 5 min for most commands, 3 min per send of data).
    pub command_timeout: Duration,
    /// Wait for the reply after the end of data. Defaults to 10 min (RFC 5321
    /// 4.5.3.2.6).
    pub data_timeout: Duration,
}

impl ClientConfig {
    /// Defaults as documented on each field.
    pub fn new(helo_name: impl Into<String>) -> Self {
        Self {
            helo_name: helo_name.into(),
            command_timeout: Duration::from_secs(5 * 60),
            data_timeout: Duration::from_secs(10 * 60),
        }
    }
}

/// Extensions the server announced in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The server answered EHLO (false: fell back to HELO).
    pub esmtp: bool,
    /// First word of the EHLO/HELO reply.
    pub hostname: String,
    /// STARTTLS (RFC 3207).
    pub starttls: bool,
    /// PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// 8BITMIME (RFC 6152).
    pub eight_bit_mime: bool,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// REQUIRETLS (RFC 8689).
    pub requiretls: bool,
    /// ENHANCEDSTATUSCODES (RFC 2034).
    pub enhanced_status_codes: bool,
    /// DSN (RFC 3461).
    pub dsn: bool,
    /// CHUNKING (RFC 3030).
    pub chunking: bool,
    /// SIZE limit, `Some(0)` for "SIZE" without a number (no fixed limit).
    pub size: Option<u64>,
    /// AUTH mechanisms.
    pub auth: Vec<String>,
}

impl Capabilities {
    /// Read the capabilities from an EHLO reply.
    pub fn from_ehlo(reply: &Reply) -> Self {
        let mut caps = Capabilities {
            esmtp: true,
            hostname: first_word(reply),
            ..Default::default()
        };
        for line in reply.text.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "STARTTLS" => caps.starttls = true,
                "PIPELINING" => caps.pipelining = true,
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "REQUIRETLS" => caps.requiretls = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                "DSN" => caps.dsn = true,
                "CHUNKING" => caps.chunking = true,
                "SIZE" => caps.size = Some(words.next().and_then(|w| w.parse().ok()).unwrap_or(0)),
                "AUTH" => caps.auth = words.map(str::to_ascii_uppercase).collect(),
                _ => {}
            }
        }
        caps
    }
}

fn first_word(reply: &Reply) -> String {
    reply
        .text
        .first()
        .and_then(|l| l.split_ascii_whitespace().next())
        .unwrap_or("")
        .to_string()
}

/// What the TLS handshake negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOutcome {
    /// Protocol version.
    pub version: Option<rustls::ProtocolVersion>,
    /// Cipher suite.
    pub cipher: Option<rustls::CipherSuite>,
    /// The server's certificate chain, end entity first.
    pub peer_certificates: Vec<CertificateDer<'static>>,
}

/// Replies of one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Reply to MAIL FROM (positive: otherwise [`Client::send`] returns an error).
    pub mail: Reply,
    /// Reply to each RCPT TO, in envelope order.
    pub rcpt: Vec<(String, Reply)>,
    /// Reply to DATA if it was refused (no 354), or the reply after the
    /// end of data. `None` if no recipient was accepted and DATA was not sent
    /// (without pipelining) or its reply was a refusal.
    pub data: Option<Reply>,
}

impl Delivery {
    /// Recipients the message was delivered to: those accepted at RCPT when
    /// the final reply is positive.
    pub fn delivered(&self) -> Vec<&str> {
        match &self.data {
            Some(d) if d.is_positive() => self
                .rcpt
                .iter()
                .filter(|(_, r)| r.is_positive())
                .map(|(a, _)| a.as_str())
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Plain or TLS stream, so a [`Client`] keeps one type across STARTTLS.
enum Stream<S> {
    Plain(S),
    Tls(Box<tokio_rustls::client::TlsStream<S>>),
    /// Only during the handshake, or after it failed.
    Lost,
}

fn lost() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream lost in TLS handshake")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Lost => Poll::Ready(Err(lost())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Lost => Poll::Ready(Err(lost())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
            Stream::Lost => Poll::Ready(Err(lost())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Lost => Poll::Ready(Err(lost())),
        }
    }
}

/// An SMTP client session.
pub struct Client<S> {
    stream: Stream<S>,
    config: ClientConfig,
    reader: ReplyReader,
    inbuf: Vec<u8>,
    caps: Capabilities,
    greeting: Reply,
    tls: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Client<S> {
    /// Read the greeting and introduce ourselves (EHLO, HELO if EHLO gets a
    /// 5xx). A non-220 greeting is returned as a reply error.
    pub async fn connect(stream: S, config: ClientConfig) -> Result<Self, Error> {
        let mut client = Self {
            stream: Stream::Plain(stream),
            config,
            reader: ReplyReader::new(),
            inbuf: Vec::new(),
            caps: Capabilities::default(),
            greeting: Reply::ok(),
            tls: false,
        };
        let greeting = client.read_reply(client.config.command_timeout).await?;
        if greeting.code != 220 {
            return Err(Error::from_reply(greeting));
        }
        client.greeting = greeting;
        client.hello().await?;
        Ok(client)
    }

    /// The server's greeting.
    pub fn greeting(&self) -> &Reply {
        &self.greeting
    }

    /// Capabilities from the latest EHLO.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// True after a successful [`starttls`](Self::starttls).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    async fn hello(&mut self) -> Result<(), Error> {
        let ehlo = format!("EHLO {}\r\n", self.config.helo_name);
        let reply = self.command(ehlo.as_bytes()).await?;
        if reply.is_positive() {
            self.caps = Capabilities::from_ehlo(&reply);
            return Ok(());
        }
        if !reply.is_permanent() {
            return Err(Error::from_reply(reply));
        }
        let helo = format!("HELO {}\r\n", self.config.helo_name);
        let reply = self.command(helo.as_bytes()).await?;
        if !reply.is_positive() {
            return Err(Error::from_reply(reply));
        }
        self.caps = Capabilities {
            hostname: first_word(&reply),
            ..Default::default()
        };
        Ok(())
    }

    /// STARTTLS, handshake, then EHLO again. The certificate verdict is
    /// whatever the config's verifier does: with a
    /// [`RecordingVerifier`](crate::RecordingVerifier) the handshake goes on
    /// and the verdict is read from it afterwards.
    pub async fn starttls(
        &mut self,
        tls: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
    ) -> Result<TlsOutcome, Error> {
        if self.tls {
            return Err(Error::Protocol("TLS already active".into()));
        }
        let reply = self.command(b"STARTTLS\r\n").await?;
        if reply.code != 220 {
            return Err(Error::from_reply(reply));
        }
        // Bytes after the 220 would come from the clear-text phase and could
        // be injected replies: refuse (mirror image of CVE-2011-0411).
        if !self.inbuf.is_empty() {
            return Err(Error::Protocol("data after STARTTLS reply".into()));
        }
        let Stream::Plain(plain) = std::mem::replace(&mut self.stream, Stream::Lost) else {
            return Err(Error::Protocol("stream not in plain state".into()));
        };
        let connector = tokio_rustls::TlsConnector::from(tls);
        let tls_stream = tokio::time::timeout(
            self.config.command_timeout,
            connector.connect(server_name, plain),
        )
        .await
        .map_err(|_| Error::Timeout)??;
        let (_, conn) = tls_stream.get_ref();
        let outcome = TlsOutcome {
            version: conn.protocol_version(),
            cipher: conn.negotiated_cipher_suite().map(|s| s.suite()),
            peer_certificates: conn
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default(),
        };
        self.stream = Stream::Tls(Box::new(tls_stream));
        self.tls = true;
        self.reader = ReplyReader::new();
        self.hello().await?;
        Ok(outcome)
    }

    /// Run one transaction: MAIL, RCPT for each recipient, DATA. Pipelined
    /// when the server offers PIPELINING. `message` has CRLF line ends; it is
    /// dot-stuffed here. A refused MAIL is an error; per-recipient and data
    /// replies are in the [`Delivery`].
    pub async fn send(&mut self, envelope: &Envelope, message: &[u8]) -> Result<Delivery, Error> {
        // A control character would inject commands (CR, LF) or change the mailbox; a
        // local part that is not a dot-atom is quoted, or the next hop reads it as
        // another path (`crate::address`).
        fn wire(a: &str) -> Result<std::borrow::Cow<'_, str>, Error> {
            crate::address::to_wire(a)
                .ok_or_else(|| Error::Protocol("a control character in the envelope".into()))
        }
        let mail_from = wire(&envelope.mail_from)?;
        let rcpt_to = envelope
            .rcpt_to
            .iter()
            .map(|r| wire(r))
            .collect::<Result<Vec<_>, Error>>()?;
        // An ENVID may hold any byte: it goes as xtext (`crate::address::xtext`).
        if envelope.requiretls && !(self.tls && self.caps.requiretls) {
            return Err(Error::MissingExtension("REQUIRETLS"));
        }
        if envelope.smtputf8 && !self.caps.smtputf8 {
            return Err(Error::MissingExtension("SMTPUTF8"));
        }
        // RFC 6152 §3: 8-bit data goes only to a server that offers 8BITMIME, unless
        // converted to 7 bits, which this client does not do (the caller bounces with
        // 5.6.3). A message declared 8BITMIME whose bytes are all ASCII is 7-bit data.
        let eight_bit = !message.is_ascii();
        if eight_bit && !self.caps.eight_bit_mime {
            return Err(Error::MissingExtension("8BITMIME"));
        }
        let mut mail = format!("MAIL FROM:<{mail_from}>");
        if self.caps.size.is_some() {
            mail.push_str(&format!(" SIZE={}", message.len()));
        }
        if (envelope.body == Body::EightBitMime || eight_bit) && self.caps.eight_bit_mime {
            mail.push_str(" BODY=8BITMIME");
        }
        if envelope.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if envelope.requiretls {
            mail.push_str(" REQUIRETLS");
        }
        // The DSN parameters only to a server that offers DSN (RFC 3461 §4); the caller
        // reports `relayed` where the sender asked for success notices.
        if let (Some(id), true) = (&envelope.env_id, self.caps.dsn) {
            mail.push_str(&format!(" ENVID={}", crate::address::xtext(id)));
        }
        if let (Some(ret), true) = (envelope.ret, self.caps.dsn) {
            mail.push_str(&format!(" RET={}", ret.as_str()));
        }
        mail.push_str("\r\n");
        let rcpts: Vec<String> = rcpt_to
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut line = format!("RCPT TO:<{r}>");
                if let (Some(dsn), true) = (envelope.rcpt_dsn.get(i), self.caps.dsn) {
                    if let Some(notify) = dsn.notify.to_param() {
                        line.push_str(&format!(" NOTIFY={notify}"));
                    }
                    if let Some(orcpt) = &dsn.orcpt {
                        line.push_str(&format!(" ORCPT=rfc822;{}", crate::address::xtext(orcpt)));
                    }
                }
                line.push_str("\r\n");
                line
            })
            .collect();
        let t = self.config.command_timeout;
        let (mail_reply, rcpt_replies, data_reply) = if self.caps.pipelining {
            let mut batch = mail.clone().into_bytes();
            for r in &rcpts {
                batch.extend_from_slice(r.as_bytes());
            }
            batch.extend_from_slice(b"DATA\r\n");
            self.nothing_unasked().await?;
            self.write(&batch).await?;
            let mail_reply = self.read_reply(t).await?;
            let mut replies = Vec::with_capacity(rcpts.len());
            for _ in &rcpts {
                replies.push(self.read_reply(t).await?);
            }
            let data_reply = self.read_reply(t).await?;
            // More replies than commands: which reply answers which command is lost.
            self.nothing_unasked().await?;
            (mail_reply, replies, Some(data_reply))
        } else {
            let mail_reply = self.command(mail.as_bytes()).await?;
            let mut replies = Vec::with_capacity(rcpts.len());
            if mail_reply.is_positive() {
                for r in &rcpts {
                    replies.push(self.command(r.as_bytes()).await?);
                }
            }
            let data_reply = if replies.iter().any(Reply::is_positive) {
                Some(self.command(b"DATA\r\n").await?)
            } else {
                None
            };
            (mail_reply, replies, data_reply)
        };
        if !mail_reply.is_positive() {
            if data_reply.as_ref().is_some_and(|d| d.code == 354) {
                self.end_refused(true).await;
            }
            return Err(Error::from_reply(mail_reply));
        }
        let rcpt: Vec<(String, Reply)> =
            envelope.rcpt_to.iter().cloned().zip(rcpt_replies).collect();
        let any_rcpt = rcpt.iter().any(|(_, r)| r.is_positive());
        let data = match data_reply {
            Some(d) if d.code == 354 && any_rcpt => {
                // Nothing may come between the 354 and the data: an audit's next hop sent
                // a 250 there, in its own segment, and closed without reading the data.
                self.nothing_unasked().await?;
                self.write_data(&dot_stuff(message)).await?;
                let done = self.read_reply(self.config.data_timeout).await?;
                // One reply to the end of the data: more (one per recipient, as LMTP
                // gives) and which recipient each is for is unknown; a 550 after a 250
                // had its recipient marked delivered.
                self.nothing_unasked().await?;
                Some(done)
            }
            Some(d) if d.code == 354 => {
                // A server that said 354 with no recipient: end the empty
                // message and drop its reply.
                self.end_refused(true).await;
                None
            }
            // Only a 4xx or 5xx refuses DATA. Any other reply is no answer to it: a
            // server that said 250 (or whose replies were out of step: an extra `250`
            // line in a RCPT reply made the next one read as DATA's) would have had the
            // message marked delivered with no byte of it sent. An audit lost mail so.
            Some(d) if !(400..600).contains(&d.code) => {
                return Err(Error::Protocol(format!(
                    "unexpected reply to DATA: {}",
                    d.code
                )));
            }
            Some(d) => {
                self.end_refused(false).await;
                if any_rcpt { Some(d) } else { None }
            }
            None => {
                self.end_refused(false).await;
                None
            }
        };
        Ok(Delivery {
            mail: mail_reply,
            rcpt,
            data,
        })
    }

    /// Ends a transaction the server refused (MAIL, every RCPT or DATA), ending an
    /// unwanted message first when `abort_data`. The refusal is the answer: a server
    /// that hangs up after it must not turn it into an I/O error (a permanent refusal
    /// would become a retry). So a failure here only shuts the connection, and any
    /// later command on it fails.
    async fn end_refused(&mut self, abort_data: bool) {
        let ended = if abort_data {
            self.abort_data().await
        } else {
            self.rset().await
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "connection lost after a refused transaction");
            let t = self.config.command_timeout;
            let _ = tokio::time::timeout(t, self.stream.shutdown()).await;
        }
    }

    async fn abort_data(&mut self) -> Result<(), Error> {
        self.write(b".\r\n").await?;
        let _ = self.read_reply(self.config.data_timeout).await?;
        self.rset().await
    }

    /// RSET; the reply is read but only an I/O failure is an error.
    pub async fn rset(&mut self) -> Result<(), Error> {
        self.command(b"RSET\r\n").await.map(|_| ())
    }

    /// NOOP, returning the reply.
    pub async fn noop(&mut self) -> Result<Reply, Error> {
        self.command(b"NOOP\r\n").await
    }

    /// QUIT and close.
    pub async fn quit(mut self) -> Result<Reply, Error> {
        let reply = self.command(b"QUIT\r\n").await?;
        let _ = self.stream.shutdown().await;
        Ok(reply)
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let t = self.config.command_timeout;
        tokio::time::timeout(t, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await
        .map_err(|_| Error::Timeout)??;
        Ok(())
    }

    /// Writes the (dot-stuffed) message data in chunks of [`BODY_CHUNK`], each under
    /// the command timeout: RFC 5321 §4.5.3.2.5 times each TCP send, not the whole
    /// body, which over a slow link can take far longer than one timeout while the
    /// server reads it steadily.
    async fn write_data(&mut self, data: &[u8]) -> Result<(), Error> {
        let t = self.config.command_timeout;
        for chunk in data.chunks(BODY_CHUNK) {
            tokio::time::timeout(t, self.stream.write_all(chunk))
                .await
                .map_err(|_| Error::Timeout)??;
        }
        tokio::time::timeout(t, self.stream.flush())
            .await
            .map_err(|_| Error::Timeout)??;
        Ok(())
    }

    async fn command(&mut self, line: &[u8]) -> Result<Reply, Error> {
        self.nothing_unasked().await?;
        self.write(line).await?;
        self.read_reply(self.config.command_timeout).await
    }

    /// Before a command (and before the message data, and after the reply to its end):
    /// no reply may be waiting, or it would be read as the next command's (a server that
    /// sent an extra reply puts every later one out of step). Looks at what the socket
    /// holds already too, without waiting: an extra reply in a segment of its own was
    /// missed when only the bytes read so far were checked.
    async fn nothing_unasked(&mut self) -> Result<(), Error> {
        if self.inbuf.is_empty() {
            let mut chunk = [0u8; 512];
            // `timeout` polls the read once before it looks at the (zero) deadline: ready
            // only if bytes, or the end of the stream, are there already.
            // The end of the stream or a read error is left for the next read or write
            // to report: a refusal followed by a hang-up is still a refusal.
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::ZERO, self.stream.read(&mut chunk)).await
            {
                self.inbuf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
            }
        }
        if self.inbuf.is_empty() {
            Ok(())
        } else {
            Err(Error::Protocol(
                "a reply came that no command asked for".into(),
            ))
        }
    }

    async fn read_reply(&mut self, timeout: Duration) -> Result<Reply, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.inbuf.is_empty() {
                let (n, reply) = self.reader.feed(&self.inbuf)?;
                self.inbuf.drain(..n);
                if let Some(reply) = reply {
                    return Ok(reply);
                }
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .map_err(|_| Error::Timeout)??;
            if n == 0 {
                return Err(Error::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                )));
            }
            self.inbuf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
        }
    }
}
