//! The PROXY protocol (HAProxy's, versions 1 and 2) on inbound connections from trusted
//! proxies.
//!
//! Behind a TCP proxy (Envoy's `tcp_proxy`, HAProxy, a load balancer) every client
//! reaches the relay from the proxy's address. The relay decides who may relay by the
//! client address, so without the real one a relay behind a co-located proxy would let
//! everyone relay through it, and `Received:` and the logs would name the proxy. A proxy
//! that speaks the PROXY protocol writes the client's address in a header before the
//! first byte of the client's stream; Envoy (`envoy.transport_sockets.upstream_proxy_protocol`),
//! HAProxy (`send-proxy`, `send-proxy-v2`) and Postfix (`smtpd_upstream_proxy_protocol`)
//! all use it.
//!
//! # Core concepts
//!
//! - `server.proxy_protocol_from` (the networks of trusted proxies; empty, the default,
//!   turns the protocol off). A connection from one of them must start with a PROXY
//!   header; it is read before the greeting, within [`HEADER_TIMEOUT`], and exactly its
//!   bytes are consumed (v1: up to its CRLF, at most 107 bytes; v2: the 16-byte prefix and
//!   the length it announces), so the SMTP session, or the edge filter, starts at the
//!   client's first byte. A connection from any other address is served as it is: a
//!   PROXY header from an untrusted peer is just a bad SMTP command.
//! - [`Origin`]: what a valid header says. The source address of `PROXY TCP4|TCP6` (v1) or
//!   of a v2 `PROXY` over IPv4/IPv6 becomes the session's peer (relay access checks,
//!   `Received:`, logs, the edge module's `source.address`). `PROXY UNKNOWN`, a v2
//!   `LOCAL` (the proxy speaking for itself, e.g. a health check), or a v2 address family
//!   without IP addresses keeps the proxy's own address.
//! - [`HeaderError`]: no valid header, a close or a timeout. The caller closes the
//!   connection without a greeting and counts it by [`HeaderError::reason`].
//!
//! The headers are parsed by the `ppp` crate; this module only reads the bytes (a v1 line
//! one byte at a time, since its length is unknown until its LF; a v2 header as its
//! prefix announces), so that nothing after the header is consumed.
//!
//! # Example
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use altroute::proxy_protocol::{HEADER_TIMEOUT, Origin, read_header};
//!
//! let mut input: &[u8] = b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 25\r\nEHLO client\r\n";
//! let origin = read_header(&mut input, HEADER_TIMEOUT).await.unwrap();
//! assert_eq!(
//!     origin,
//!     Origin::Client {
//!         source: "192.0.2.7:40000".parse().unwrap(),
//!         destination: "192.0.2.1:25".parse().unwrap(),
//!     }
//! );
//! assert_eq!(input, b"EHLO client\r\n"); // the session's bytes are left unread
//! # });
//! ```

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use ppp::{HeaderResult, PartialResult, v1, v2};
use tokio::io::{AsyncRead, AsyncReadExt};

/// How long a trusted proxy has to send the whole header. 5 s, as Postfix's
/// `smtpd_upstream_proxy_timeout`.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest v1 header, CRLF included (the specification's 107 bytes).
const V1_MAX: usize = 107;

/// Where a proxied connection comes from, as its PROXY header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Origin {
    /// A TCP client over IPv4 or IPv6: the session's peer is `source`.
    Client {
        /// The client's address, as the proxy saw it.
        source: SocketAddr,
        /// The address the client connected to (the proxy's listener).
        destination: SocketAddr,
    },
    /// `PROXY UNKNOWN`, v2 `LOCAL`, or a v2 `PROXY` without IP addresses (unspecified or
    /// UNIX family): the proxy speaks for itself and keeps its own address.
    Proxy,
}

/// Why a connection from a trusted proxy did not start with a valid PROXY header.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The header was not complete within the timeout.
    #[error("no complete PROXY header within {} s", .0.as_secs_f32())]
    Timeout(Duration),
    /// The proxy closed the connection (or it failed) before the header was complete.
    #[error("the connection ended before the PROXY header was complete")]
    Closed(#[source] std::io::Error),
    /// The bytes are not a PROXY v1 header.
    #[error("invalid PROXY v1 header: {0}")]
    V1(#[source] v1::BinaryParseError),
    /// The bytes are not a PROXY v2 header.
    #[error("invalid PROXY v2 header: {0}")]
    V2(#[source] v2::ParseError),
    /// A v2 header of a proxied connection that is not a stream (a UDP datagram's): no
    /// SMTP client is behind it.
    #[error("PROXY v2 header for a {0} connection, not a stream (TCP) one")]
    NotStream(&'static str),
    /// 107 bytes (the longest v1 header) without the LF that ends a v1 header.
    #[error("PROXY v1 header longer than {V1_MAX} bytes")]
    TooLong,
}

impl HeaderError {
    /// The `reason` label of `altroute_smtp_proxy_protocol_errors_total`: `timeout`,
    /// `closed` or `invalid`.
    pub fn reason(&self) -> &'static str {
        match self {
            HeaderError::Timeout(_) => "timeout",
            HeaderError::Closed(_) => "closed",
            HeaderError::V1(_)
            | HeaderError::V2(_)
            | HeaderError::NotStream(_)
            | HeaderError::TooLong => "invalid",
        }
    }
}

/// Whether connections from `peer` must carry a PROXY header (`peer` is in one of the
/// trusted `networks`). An IPv4 peer on a dual-stack socket (`::ffff:a.b.c.d`) counts as
/// IPv4.
pub fn trusted(networks: &[IpNet], peer: IpAddr) -> bool {
    crate::config::in_networks(networks, peer)
}

/// Reads one PROXY header (v1 or v2) from the start of `stream`, consuming exactly its
/// bytes, within `timeout` (the accept path uses [`HEADER_TIMEOUT`]).
pub async fn read_header<R>(stream: &mut R, timeout: Duration) -> Result<Origin, HeaderError>
where
    R: AsyncRead + Unpin,
{
    tokio::time::timeout(timeout, read(stream))
        .await
        .map_err(|_| HeaderError::Timeout(timeout))?
}

async fn read<R>(stream: &mut R) -> Result<Origin, HeaderError>
where
    R: AsyncRead + Unpin,
{
    let mut buf: Vec<u8> = Vec::with_capacity(V1_MAX);
    next_byte(stream, &mut buf).await?;
    // (Indexing is safe: `next_byte` pushed one byte or returned an error.)
    if buf[0] == v2::PROTOCOL_PREFIX[0] {
        // v2: the 16-byte prefix ends with the length of the rest (addresses and TLVs).
        buf.resize(16, 0);
        stream
            .read_exact(&mut buf[1..])
            .await
            .map_err(HeaderError::Closed)?;
        if let Err(v2::ParseError::Partial(have, wanted)) = v2::Header::try_from(&buf[..]) {
            let start = buf.len();
            buf.resize(start + wanted.saturating_sub(have), 0);
            stream
                .read_exact(&mut buf[start..])
                .await
                .map_err(HeaderError::Closed)?;
        }
        return origin(v2::Header::try_from(&buf[..]).into());
    }
    // v1: one line. Its length is unknown until the LF, so read one byte at a time: no byte
    // of the session may be taken with it. ppp's parser is not incremental past the
    // prefix (a line cut after a space does not parse), so it sees the whole line, except
    // that a line that cannot start with `PROXY` is refused at once.
    while buf.last() != Some(&b'\n') {
        if buf.len() <= v1::PROTOCOL_PREFIX.len() {
            let early = v1::Header::try_from(&buf[..]);
            if early.is_complete() {
                return origin(early.into());
            }
        }
        if buf.len() == V1_MAX {
            return Err(HeaderError::TooLong);
        }
        next_byte(stream, &mut buf).await?;
    }
    origin(v1::Header::try_from(&buf[..]).into())
}

async fn next_byte<R>(stream: &mut R, buf: &mut Vec<u8>) -> Result<(), HeaderError>
where
    R: AsyncRead + Unpin,
{
    let mut byte = [0u8; 1];
    stream
        .read_exact(&mut byte)
        .await
        .map_err(HeaderError::Closed)?;
    buf.push(byte[0]);
    Ok(())
}

/// What a complete parse result says.
fn origin(result: HeaderResult<'_>) -> Result<Origin, HeaderError> {
    match result {
        HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            v1::Addresses::Tcp4(a) => Origin::Client {
                source: SocketAddr::new(a.source_address.into(), a.source_port),
                destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
            },
            v1::Addresses::Tcp6(a) => Origin::Client {
                source: SocketAddr::new(a.source_address.into(), a.source_port),
                destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
            },
            v1::Addresses::Unknown => Origin::Proxy,
        }),
        HeaderResult::V2(Ok(h))
            if h.command == v2::Command::Proxy
                && matches!(h.addresses, v2::Addresses::IPv4(_) | v2::Addresses::IPv6(_))
                && h.protocol != v2::Protocol::Stream =>
        {
            // An audit's header for a UDP connection was taken as a TCP client's.
            Err(HeaderError::NotStream(match h.protocol {
                v2::Protocol::Datagram => "datagram (UDP)",
                _ => "unspecified transport",
            }))
        }
        HeaderResult::V2(Ok(h)) => Ok(match (h.command, h.addresses) {
            (v2::Command::Local, _) => Origin::Proxy,
            (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Origin::Client {
                source: SocketAddr::new(a.source_address.into(), a.source_port),
                destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
            },
            (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Origin::Client {
                source: SocketAddr::new(a.source_address.into(), a.source_port),
                destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
            },
            (v2::Command::Proxy, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => {
                Origin::Proxy
            }
        }),
        HeaderResult::V1(Err(e)) => Err(HeaderError::V1(e)),
        HeaderResult::V2(Err(e)) => Err(HeaderError::V2(e)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::Ipv6Addr;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A connected pair of real loopback sockets: (proxy side, relay side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (relay, _) = listener.accept().await.unwrap();
        (proxy, relay)
    }

    /// A v2 header: `command` 0x20 (LOCAL) or 0x21 (PROXY), family/protocol byte, then
    /// the address block and TLVs.
    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.push(command);
        h.push(family);
        h.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn v2_tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, tlvs: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&src);
        body.extend_from_slice(&dst);
        body.extend_from_slice(&sport.to_be_bytes());
        body.extend_from_slice(&dport.to_be_bytes());
        body.extend_from_slice(tlvs);
        v2(0x21, 0x11, &body)
    }

    /// Sends `header` then `after` at once, reads the header on the other side, and
    /// returns what it said and the bytes that were left for the session.
    async fn over_socket(header: &[u8], after: &[u8]) -> (Result<Origin, HeaderError>, Vec<u8>) {
        let (mut proxy, mut relay) = pair().await;
        let mut all = header.to_vec();
        all.extend_from_slice(after);
        proxy.write_all(&all).await.unwrap();
        proxy.shutdown().await.unwrap();
        let origin = read_header(&mut relay, HEADER_TIMEOUT).await;
        let mut rest = Vec::new();
        relay.read_to_end(&mut rest).await.unwrap();
        (origin, rest)
    }

    fn client(source: &str, destination: &str) -> Origin {
        Origin::Client {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
        }
    }

    /// A v2 header of a UDP connection (family 0x12, 0x22) is no SMTP client's: refused.
    /// An audit's was taken as a TCP client at the address it gave.
    #[tokio::test]
    async fn a_v2_header_for_a_datagram_connection_is_refused() {
        let mut body = Vec::new();
        body.extend_from_slice(&[192, 0, 2, 7, 192, 0, 2, 1]);
        body.extend_from_slice(&40_000u16.to_be_bytes());
        body.extend_from_slice(&25u16.to_be_bytes());
        for family in [0x12u8, 0x10] {
            let (origin, _) = over_socket(&v2(0x21, family, &body), b"").await;
            let err = origin.unwrap_err();
            assert_eq!(err.reason(), "invalid", "{family:#x}");
            assert!(err.to_string().contains("not a stream"), "{err}");
        }
    }

    #[tokio::test]
    async fn valid_headers_give_the_client_and_leave_the_session_bytes() {
        let ehlo: &[u8] = b"EHLO client.example\r\n";
        let mut v6 = Vec::new();
        v6.extend_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7).octets());
        v6.extend_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).octets());
        v6.extend_from_slice(&40_000u16.to_be_bytes());
        v6.extend_from_slice(&25u16.to_be_bytes());
        let cases: Vec<(&str, Vec<u8>, Origin)> = vec![
            (
                "v1 TCP4",
                b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 25\r\n".to_vec(),
                client("192.0.2.7:40000", "192.0.2.1:25"),
            ),
            (
                "v1 TCP6",
                b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n".to_vec(),
                client("[2001:db8::7]:40000", "[2001:db8::1]:25"),
            ),
            ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n".to_vec(), Origin::Proxy),
            (
                "v1 UNKNOWN with addresses",
                b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n".to_vec(),
                Origin::Proxy,
            ),
            (
                "v2 PROXY TCP4",
                v2_tcp4([192, 0, 2, 7], [192, 0, 2, 1], 40_000, 25, &[]),
                client("192.0.2.7:40000", "192.0.2.1:25"),
            ),
            (
                "v2 PROXY TCP4 with a TLV (NOOP, 3 bytes of value)",
                v2_tcp4(
                    [192, 0, 2, 7],
                    [192, 0, 2, 1],
                    40_000,
                    25,
                    &[0x04, 0, 3, 1, 2, 3],
                ),
                client("192.0.2.7:40000", "192.0.2.1:25"),
            ),
            (
                "v2 PROXY TCP6",
                v2(0x21, 0x21, &v6),
                client("[2001:db8::7]:40000", "[2001:db8::1]:25"),
            ),
            ("v2 LOCAL", v2(0x20, 0x00, &[]), Origin::Proxy),
            (
                "v2 LOCAL with addresses (ignored)",
                v2(0x20, 0x11, &[192, 0, 2, 7, 192, 0, 2, 1, 0, 1, 0, 25]),
                Origin::Proxy,
            ),
            ("v2 PROXY UNSPEC", v2(0x21, 0x00, &[]), Origin::Proxy),
        ];
        for (name, header, want) in cases {
            let (got, rest) = over_socket(&header, ehlo).await;
            assert_eq!(got.unwrap(), want, "{name}");
            assert_eq!(rest, ehlo, "{name}: the session's bytes");
        }
    }

    #[tokio::test]
    async fn invalid_headers_are_refused_by_reason() {
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "an SMTP command",
                b"EHLO client.example\r\n".to_vec(),
                "invalid",
            ),
            (
                "lower case",
                b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
                "invalid",
            ),
            (
                "bad address",
                b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n".to_vec(),
                "invalid",
            ),
            (
                "v6 address as TCP4",
                b"PROXY TCP4 ::1 ::1 1 2\r\n".to_vec(),
                "invalid",
            ),
            (
                "port out of range",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 25\r\n".to_vec(),
                "invalid",
            ),
            (
                "bare LF",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".to_vec(),
                "invalid",
            ),
            (
                "no LF in 107 bytes",
                {
                    let mut h = b"PROXY UNKNOWN ".to_vec();
                    h.extend(std::iter::repeat_n(b'x', 200));
                    h
                },
                "invalid",
            ),
            (
                "v2 version 1",
                {
                    let mut h = v2(0x21, 0x11, &[0; 12]);
                    h[12] = 0x11;
                    h
                },
                "invalid",
            ),
            ("v2 bad command", v2(0x2F, 0x11, &[0; 12]), "invalid"),
            (
                "v2 length shorter than its addresses",
                v2(0x21, 0x11, &[0; 4]),
                "invalid",
            ),
            (
                "a truncated v2 header",
                v2_tcp4([1, 2, 3, 4], [5, 6, 7, 8], 1, 2, &[])[..20].to_vec(),
                "closed",
            ),
            (
                "a truncated v1 header",
                b"PROXY TCP4 1.2.3.4".to_vec(),
                "closed",
            ),
            ("nothing", Vec::new(), "closed"),
            (
                "binary garbage",
                vec![0x16, 0x03, 0x01, 0x00, 0xa5],
                "invalid",
            ),
        ];
        for (name, bytes, reason) in cases {
            let (got, _) = over_socket(&bytes, b"").await;
            let err = got.expect_err(name);
            assert_eq!(err.reason(), reason, "{name}: {err}");
        }
    }

    #[tokio::test]
    async fn garbage_is_refused_without_waiting_for_more() {
        // An SMTP client talking to the proxy port as if it were the relay: refused at its
        // second byte, with the connection still open (no timeout, no EOF needed).
        let (mut proxy, mut relay) = pair().await;
        proxy.write_all(b"EH").await.unwrap();
        let err = read_header(&mut relay, HEADER_TIMEOUT).await.unwrap_err();
        assert!(matches!(err, HeaderError::V1(_)), "{err}");
    }

    #[tokio::test]
    async fn a_slow_proxy_sending_byte_by_byte_is_read_exactly() {
        for header in [
            b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 25\r\n".to_vec(),
            v2_tcp4([192, 0, 2, 7], [192, 0, 2, 1], 40_000, 25, &[0x04, 0, 1, 9]),
        ] {
            let (mut proxy, mut relay) = pair().await;
            proxy.set_nodelay(true).unwrap();
            let writer = tokio::spawn(async move {
                for b in header {
                    proxy.write_all(&[b]).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                // The client's first command, in the same segment as nothing else.
                proxy.write_all(b"QUIT\r\n").await.unwrap();
                proxy
            });
            let origin = read_header(&mut relay, HEADER_TIMEOUT).await.unwrap();
            assert_eq!(origin, client("192.0.2.7:40000", "192.0.2.1:25"));
            let mut next = [0u8; 6];
            relay.read_exact(&mut next).await.unwrap();
            assert_eq!(&next, b"QUIT\r\n");
            drop(writer.await.unwrap());
        }
    }

    #[tokio::test]
    async fn a_proxy_that_stops_midway_times_out() {
        // The accept path passes HEADER_TIMEOUT (5 s); a shorter one keeps the test quick.
        let timeout = Duration::from_millis(300);
        for partial in [
            b"PROXY TCP4 192.0.2.7".to_vec(),
            v2_tcp4([192, 0, 2, 7], [192, 0, 2, 1], 40_000, 25, &[])[..20].to_vec(),
            Vec::new(),
        ] {
            let (mut proxy, mut relay) = pair().await;
            proxy.write_all(&partial).await.unwrap();
            let started = std::time::Instant::now();
            let err = read_header(&mut relay, timeout).await.unwrap_err();
            assert!(matches!(err, HeaderError::Timeout(_)), "{err}");
            assert_eq!(err.reason(), "timeout");
            assert!(started.elapsed() >= timeout);
            // The proxy's connection stayed open all along.
            drop(proxy);
        }
        assert_eq!(HEADER_TIMEOUT, Duration::from_secs(5));
    }

    #[test]
    fn trusted_networks_match_ipv4_mapped_peers() {
        let nets: Vec<IpNet> = vec![
            "127.0.0.1/32".parse().unwrap(),
            "2001:db8::/64".parse().unwrap(),
        ];
        assert!(trusted(&nets, "127.0.0.1".parse().unwrap()));
        assert!(trusted(&nets, "::ffff:127.0.0.1".parse().unwrap()));
        assert!(trusted(&nets, "2001:db8::5".parse().unwrap()));
        assert!(!trusted(&nets, "127.0.0.2".parse().unwrap()));
        assert!(!trusted(&[], "127.0.0.1".parse().unwrap()));
    }
}
