//! SMTP server and client sessions for altroute.
//!
//! Sessions run over any `AsyncRead + AsyncWrite` stream (tokio) and upgrade
//! in place with STARTTLS (tokio-rustls). The protocol cores are pure and
//! incremental, fed with byte slices, so they are tested and fuzzed without
//! I/O.
//!
//! # Layout
//!
//! - [`command`]: [`CommandReader`] frames command lines with a hard 512-octet
//!   bound; complete lines are parsed by smtp-proto's `Request` parser.
//! - [`data`]: [`DataReader`] reads DATA: end only at `CRLF.CRLF`,
//!   dot-unstuffing, bare CR/LF, line length and size checks in bounded memory;
//!   [`dot_stuff`] for the client.
//! - [`reply`]: [`Reply`] (shared by both sides) and the incremental
//!   [`ReplyReader`].
//! - [`server`]: [`serve_session`], the [`Handler`] trait the embedder
//!   implements (relay decision, spooling, AUTH), [`ServerConfig`].
//! - [`client`]: [`Client`] for delivery: greeting, EHLO/HELO, capabilities,
//!   STARTTLS, pipelined transactions.
//! - [`verify`]: [`RecordingVerifier`], which records the certificate verdict
//!   ([`CertResult`]) instead of aborting the handshake, so delivery policy can
//!   decide after it.
//!
//! # Core concepts
//!
//! The server never relays on its own authority: every RCPT first asks
//! [`Handler::may_relay`]; `false` gets `550 5.7.1 Relaying denied`. Replies to
//! hygiene violations (all sent with enhanced codes):
//!
//! | Violation | Reply |
//! |---|---|
//! | command line over 512 octets | `500 5.5.6 Line too long` (rest of line discarded unbuffered) |
//! | text line over 1000 octets in DATA | `500 5.5.6` after end of data |
//! | declared SIZE too big | `552 5.3.4` at MAIL |
//! | message over the size limit | `552 5.3.4` after end of data |
//! | bare CR or LF in DATA | `550 5.6.11` after end of data (only `CRLF.CRLF` ends data) |
//! | too many recipients | `452 4.5.3 Too many recipients` |
//! | command / data / session timeout | `421 4.4.2`, then close |
//! | out of sequence | `503 5.5.1`; unknown `500 5.5.2`; bad syntax `501 5.5.4` |
//! | REQUIRETLS without TLS | `530 5.7.10`; AUTH without TLS `538 5.7.11` |
//! | control character in `MAIL`/`RCPT` | `501 5.5.4` |
//! | `MAIL FROM:<postmaster>`, bad sender | `501 5.1.7` |
//! | domain in Unicode without an A-label, address literal | `501 5.1.3` |
//!
//! Bytes pipelined after `STARTTLS` are discarded and HELO, AUTH and the
//! envelope are forgotten once TLS is up. Default timeouts: 5 min per command,
//! 3 min per data block, 30 min per session ([`ServerConfig::new`]).
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use altroute_smtp::{Envelope, Handler, Reply, ServerConfig, SessionInfo, serve_session};
//!
//! struct Sink;
//! impl Handler for Sink {
//!     fn may_relay(&self, session: &SessionInfo) -> bool {
//!         session.peer.ip().is_loopback()
//!     }
//!     async fn data(&self, _: &SessionInfo, env: &Envelope, msg: Vec<u8>) -> Reply {
//!         println!("{} octets for {:?}", msg.len(), env.rcpt_to);
//!         Reply::new(250, (2, 0, 0), "Queued")
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:2525").await?;
//! let config = Arc::new(ServerConfig::new("mx.example"));
//! let handler = Arc::new(Sink);
//! loop {
//!     let (stream, peer) = listener.accept().await?;
//!     let info = SessionInfo::new(peer, stream.local_addr()?);
//!     let (config, handler) = (config.clone(), handler.clone());
//!     tokio::spawn(async move { serve_session(stream, info, config, handler).await });
//! }
//! # }
//! ```

pub mod address;
pub mod client;
pub mod command;
pub mod data;
pub mod dsn;
pub mod reply;
pub mod server;
pub mod verify;

pub use client::{BODY_CHUNK, Capabilities, Client, ClientConfig, Delivery, TlsOutcome};
pub use command::{CommandLine, CommandReader, MAX_COMMAND_LINE};
pub use data::{DataError, DataReader, MAX_TEXT_LINE, dot_stuff};
pub use reply::{Reply, ReplyError, ReplyReader};
pub use server::{
    Body, Envelope, Handler, MAX_ERRORS, ServerConfig, SessionEnd, SessionInfo, TlsInfo,
    serve_session,
};
pub use verify::{CertResult, RecordingVerifier};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Connection-level I/O failure (includes TLS handshake failures, which
    /// tokio-rustls reports as I/O errors).
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The peer did not answer in time.
    #[error("timed out")]
    Timeout,
    /// A 4xx reply: try again later.
    #[error("transient failure: {0}")]
    Transient(Reply),
    /// A 5xx reply: do not retry.
    #[error("permanent failure: {0}")]
    Permanent(Reply),
    /// The peer broke the protocol (malformed reply, unexpected reply, data
    /// after a STARTTLS reply).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A malformed reply.
    #[error(transparent)]
    Reply(#[from] ReplyError),
    /// The message needs an extension the server did not offer.
    #[error("server does not offer {0}")]
    MissingExtension(&'static str),
    /// Bad local configuration.
    #[error("configuration: {0}")]
    Config(String),
}

impl Error {
    /// Classify an unexpected reply: 4xx transient, anything else permanent.
    pub fn from_reply(reply: Reply) -> Self {
        if reply.is_transient() {
            Error::Transient(reply)
        } else {
            Error::Permanent(reply)
        }
    }
}
