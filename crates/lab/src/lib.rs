//! altroute-lab: the "remote world" that the relay talks to, built on loopback.
//!
//! `altroute demo` and the end-to-end tests need real peers: mail servers with and
//! without STARTTLS, with good and bad certificates, a DNS that says where they are,
//! and an attacker that strips STARTTLS. This crate provides them, each a real server
//! on a 127.x.y.z address. It deliberately shares no code with `altroute-smtp`, so a
//! bug in the relay's SMTP code cannot hide itself in its own test peer.
//!
//! # Layout
//!
//! - [`ca`]: [`TestCa`], a root CA made at run time with rcgen, issuing server
//!   certificates (valid, expired, not yet valid, for any names) and client
//!   certificates, with rustls configuration helpers.
//! - [`dns`]: [`DnsServer`], an authoritative DNS server (UDP and TCP on one port, on
//!   hickory-server) whose records (MX, A, AAAA, TXT, CNAME) change at run time.
//! - [`https`]: [`HttpsServer`], an HTTPS server with canned responses (MTA-STS
//!   policies), recording every request.
//! - [`sink`]: [`SmtpSink`], a tolerant SMTP server (PIPELINING, STARTTLS, fail modes)
//!   that records every command, the TLS parameters and every message.
//! - [`strip`]: [`StripTlsProxy`], a man in the middle that removes STARTTLS.
//! - [`loopback_ip`] and [`free_port`]: addresses that parallel tests don't share.
//!
//! # Example
//!
//! ```
//! use altroute_lab::{loopback_ip, DnsServer, SinkConfig, SmtpSink, TestCa, Validity};
//! use std::net::SocketAddr;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), altroute_lab::LabError> {
//! let ca = TestCa::new("lab root")?;
//! let ip = loopback_ip();
//! let cert = ca.issue(&["mx1.example.test"], Validity::Valid)?;
//! let mut config = SinkConfig::new(SocketAddr::new(ip.into(), 0), "mx1.example.test");
//! config.starttls = Some(cert.rustls_server_config()?);
//! let sink = SmtpSink::start(config).await?;
//!
//! let dns = DnsServer::start(SocketAddr::new(loopback_ip().into(), 0)).await?;
//! dns.add_mx("example.test", 10, "mx1.example.test").await?;
//! dns.add_a("mx1.example.test", ip).await?;
//! // Point the relay's resolver at `dns.addr()` and its SMTP port at `sink.addr().port()`.
//! assert!(sink.messages().is_empty());
//! # Ok(())
//! # }
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};

pub mod ca;
pub mod dns;
pub mod https;
pub mod immutable;
pub mod sink;
pub mod strip;
pub mod tmpfs;

pub use ca::{Issued, TestCa, Validity};
pub use dns::DnsServer;
pub use https::{HttpRequest, HttpResponse, HttpsServer};
pub use immutable::Immutable;
pub use sink::{FailAt, SinkConfig, SinkMessage, SinkMode, SinkSession, SinkTls, SmtpSink};
pub use strip::StripTlsProxy;
pub use tmpfs::Tmpfs;

/// Everything that can go wrong in the lab.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// A socket could not be bound, accepted or used.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Certificate(#[from] rcgen::Error),
    /// A rustls configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// A DNS name or record was not acceptable.
    #[error("DNS: {0}")]
    Dns(String),
    /// Waiting for something (e.g. messages at a sink) took longer than allowed.
    #[error("timed out waiting for {0}")]
    Timeout(String),
}

impl From<rustls::Error> for LabError {
    fn from(e: rustls::Error) -> Self {
        LabError::Tls(e.to_string())
    }
}

/// Hands out a loopback address, 127.a.b.c, never the same twice in one process (for
/// its first 65,024 calls): `a` comes from the process id, `b.c` from a per-process
/// counter. Linux routes all of 127.0.0.0/8 to `lo`, so these can be bound without any
/// set-up; each test MX can then use the same port. (The counter once had only `c` and
/// wrapped after 254 calls: the e2e tests make more, two tests got the same address, and
/// a relay's port was taken by another test's between `free_port` and its bind.)
pub fn loopback_ip() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // a in 1..=254 keeps clear of 127.0.0.x (where real services such as a local
    // resolver live) and of 127.255.255.255.
    let a = 1 + (pid % 254) as u8;
    let b = ((n / 254) % 256) as u8;
    let c = 1 + (n % 254) as u8;
    Ipv4Addr::new(127, a, b, c)
}

/// A TCP port that is free on `ip` right now (bound to port 0, read, released).
///
/// Another process may take it before the caller binds it; on loopback addresses from
/// [`loopback_ip`] that is unlikely.
pub fn free_port(ip: Ipv4Addr) -> Result<u16, LabError> {
    let listener = std::net::TcpListener::bind(SocketAddr::new(ip.into(), 0))?;
    Ok(listener.local_addr()?.port())
}
