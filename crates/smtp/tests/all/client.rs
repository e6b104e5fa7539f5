//! The client against our server, over real TLS, and the recording verifier.

use std::sync::Arc;

use altroute_smtp::{
    Body, CertResult, Client, ClientConfig, Envelope, Error, RecordingVerifier, ServerConfig,
};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::common::{Memory, Pki, config, spawn_server};

fn envelope(rcpts: &[&str]) -> Envelope {
    Envelope {
        mail_from: "sender@src.test".into(),
        rcpt_to: rcpts.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn round_trip_over_tls() {
    let pki = Pki::new("Test CA");
    let leaf = pki.leaf(&["mx.test"], false, false);
    let mut c = config();
    c.tls = Some(pki.server_tls(&leaf));
    let handler = Memory::new(true);
    let srv = spawn_server(c, handler.clone()).await;

    let stream = TcpStream::connect(srv.addr).await.unwrap();
    let mut client = Client::connect(stream, ClientConfig::new("relay.test"))
        .await
        .unwrap();
    let caps = client.capabilities().clone();
    assert!(caps.esmtp && caps.starttls && caps.pipelining && caps.eight_bit_mime);
    assert_eq!(caps.size, Some(35 * 1024 * 1024));
    assert!(!caps.requiretls);
    assert_eq!(caps.hostname, "mx.test");

    // REQUIRETLS mail must not go out before TLS.
    let mut env = envelope(&["a@dst.test", "nobody@dst.test", "b@dst.test"]);
    env.requiretls = true;
    env.body = Body::EightBitMime;
    assert!(matches!(
        client.send(&env, b"x\r\n").await,
        Err(Error::MissingExtension("REQUIRETLS"))
    ));

    let verifier = RecordingVerifier::new(pki.roots()).unwrap();
    let tls_config = Arc::new(verifier.client_config().unwrap());
    let outcome = client
        .starttls(tls_config, ServerName::try_from("mx.test").unwrap())
        .await
        .unwrap();
    assert_eq!(verifier.result(), Some(CertResult::Valid));
    assert_eq!(outcome.version, Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(outcome.peer_certificates, leaf.chain);
    assert!(client.is_tls());
    assert!(client.capabilities().requiretls);
    assert!(!client.capabilities().starttls);

    let message: &[u8] =
        b"Subject: round trip\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\xc3\xa9\r\n";
    let delivery = client.send(&env, message).await.unwrap();
    assert!(delivery.mail.is_positive());
    let codes: Vec<u16> = delivery.rcpt.iter().map(|(_, r)| r.code).collect();
    assert_eq!(codes, vec![250, 550, 250]);
    assert_eq!(delivery.rcpt[1].1.enhanced, Some((5, 1, 1)));
    assert_eq!(delivery.data.as_ref().map(|r| r.code), Some(250));
    assert_eq!(delivery.delivered(), vec!["a@dst.test", "b@dst.test"]);

    // All recipients refused: no message, no error, session still usable.
    let delivery = client
        .send(&envelope(&["nobody@dst.test"]), b"x\r\n")
        .await
        .unwrap();
    assert_eq!(delivery.data, None);
    assert!(delivery.delivered().is_empty());
    assert_eq!(client.noop().await.unwrap().code, 250);

    assert_eq!(client.quit().await.unwrap().code, 221);
    let stored = handler.messages();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].message, message);
    assert!(stored[0].envelope.requiretls);
    assert_eq!(stored[0].envelope.size, Some(message.len() as u64));
    assert_eq!(stored[0].envelope.body, Body::EightBitMime);
}

#[tokio::test]
async fn reply_classes_become_typed_errors() {
    // A server that refuses everyone at MAIL (not open, and AUTH absent) is
    // not available; use size instead: declared SIZE too big is a 5xx at MAIL.
    let mut c = config();
    c.max_message_size = 10;
    let srv = spawn_server(c, Memory::new(true)).await;
    let stream = TcpStream::connect(srv.addr).await.unwrap();
    let mut client = Client::connect(stream, ClientConfig::new("relay.test"))
        .await
        .unwrap();
    match client.send(&envelope(&["a@dst.test"]), &[b'x'; 100]).await {
        Err(Error::Permanent(r)) => assert_eq!((r.code, r.enhanced), (552, Some((5, 3, 4)))),
        other => panic!("expected permanent failure, got {other:?}"),
    }
    // Recipient cap gives a transient per-recipient reply; this server does
    // not offer PIPELINING, so the client goes step by step.
    let mut c: ServerConfig = config();
    c.max_recipients = 1;
    c.pipelining = false;
    let srv = spawn_server(c, Memory::new(true)).await;
    let stream = TcpStream::connect(srv.addr).await.unwrap();
    let mut client = Client::connect(stream, ClientConfig::new("relay.test"))
        .await
        .unwrap();
    let d = client
        .send(&envelope(&["a@dst.test", "b@dst.test"]), b"hi\r\n")
        .await
        .unwrap();
    assert!(!client.capabilities().pipelining);
    assert!(d.rcpt[1].1.is_transient());
    assert_eq!(d.delivered(), vec!["a@dst.test"]);
    // All refused without pipelining: DATA is not sent, the session goes on.
    let d = client
        .send(&envelope(&["nobody@dst.test"]), b"hi\r\n")
        .await
        .unwrap();
    assert_eq!(d.data, None);
    let d = client
        .send(&envelope(&["c@dst.test"]), b"second\r\n")
        .await
        .unwrap();
    assert_eq!(d.delivered(), vec!["c@dst.test"]);
}

#[tokio::test]
async fn recording_verifier_classifies() {
    let pki = Pki::new("Test CA");
    let other = Pki::new("Other CA");
    // (description, server certificate, expected verdict)
    let cases = [
        (
            "valid",
            pki.leaf(&["mx.test"], false, false),
            CertResult::Valid,
        ),
        (
            "expired",
            pki.leaf(&["mx.test"], true, false),
            CertResult::Expired,
        ),
        (
            "wrong host",
            pki.leaf(&["other.test"], false, false),
            CertResult::HostnameMismatch,
        ),
        (
            "untrusted",
            other.leaf(&["mx.test"], false, false),
            CertResult::Untrusted,
        ),
    ];
    for (what, leaf, expected) in cases {
        let mut c = config();
        c.tls = Some(pki.server_tls(&leaf));
        let srv = spawn_server(c, Memory::new(true)).await;
        let stream = TcpStream::connect(srv.addr).await.unwrap();
        let mut client = Client::connect(stream, ClientConfig::new("relay.test"))
            .await
            .unwrap();
        let verifier = RecordingVerifier::new(pki.roots()).unwrap();
        assert_eq!(verifier.result(), None);
        let tls = Arc::new(verifier.client_config().unwrap());
        let outcome = client
            .starttls(tls, ServerName::try_from("mx.test").unwrap())
            .await
            .unwrap_or_else(|e| panic!("{what}: handshake must go on: {e}"));
        assert_eq!(verifier.result(), Some(expected), "{what}");
        assert_eq!(outcome.peer_certificates, leaf.chain, "{what}");
        // The session is usable: the policy decides, not the handshake.
        assert_eq!(client.noop().await.unwrap().code, 250, "{what}");
    }
}

/// A server (or a man in the middle) that pipelines replies after the `220` to STARTTLS:
/// bytes that arrived in clear text must not be read as the first replies under TLS
/// (the client-side twin of CVE-2011-0411), so the client refuses the session.
#[tokio::test]
async fn a_reply_pipelined_after_the_starttls_220_is_refused() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        let mut line = String::new();
        w.write_all(b"220 mx.test ESMTP\r\n").await.unwrap();
        r.read_line(&mut line).await.unwrap();
        w.write_all(b"250-mx.test\r\n250 STARTTLS\r\n")
            .await
            .unwrap();
        line.clear();
        r.read_line(&mut line).await.unwrap();
        assert_eq!(line, "STARTTLS\r\n");
        w.write_all(b"220 go ahead\r\n250-injected\r\n250 AUTH PLAIN\r\n")
            .await
            .unwrap();
        // Until the client hangs up.
        let mut rest = String::new();
        let _ = r.read_line(&mut rest).await;
    });
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut client = Client::connect(stream, ClientConfig::new("relay.test"))
        .await
        .unwrap();
    let pki = Pki::new("Test CA");
    let verifier = RecordingVerifier::new(pki.roots()).unwrap();
    let tls_config = Arc::new(verifier.client_config().unwrap());
    let result = client
        .starttls(tls_config, ServerName::try_from("mx.test").unwrap())
        .await;
    match result {
        Err(Error::Protocol(why)) => assert!(why.contains("after STARTTLS"), "{why}"),
        other => panic!(
            "expected a protocol error, got {:?}",
            other.map(|o| o.version)
        ),
    }
    drop(client);
    server.await.unwrap();
}

/// RFC 5321 §4.5.3.2.5: the timeout applies to each send of the message data, not to
/// the whole of it. A 1 MiB message to a server that reads 64 KiB every 600 ms takes
/// about 10 s, ten times the 1 s command timeout, and still goes through, as each
/// chunk is taken in time. Time is paused (virtual), so the test neither waits nor
/// depends on the machine's speed.
#[tokio::test(start_paused = true)]
async fn a_message_longer_than_one_timeout_goes_to_a_steady_slow_reader() {
    use std::time::Duration;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    let (client_io, server_io) = tokio::io::duplex(altroute_smtp::BODY_CHUNK);
    let server = tokio::spawn(async move {
        let mut conn = BufReader::new(server_io);
        conn.write_all(b"220 mx.test ESMTP\r\n").await.unwrap();
        // EHLO, MAIL, RCPT, DATA, one at a time (no PIPELINING).
        for reply in ["250 mx.test\r\n", "250 ok\r\n", "250 ok\r\n", "354 go\r\n"] {
            let mut line = String::new();
            conn.read_line(&mut line).await.unwrap();
            conn.write_all(reply.as_bytes()).await.unwrap();
        }
        let mut data = Vec::new();
        let mut buf = vec![0u8; altroute_smtp::BODY_CHUNK];
        while !data.ends_with(b"\r\n.\r\n") {
            tokio::time::sleep(Duration::from_millis(600)).await;
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "client hung up after {} bytes", data.len());
            data.extend_from_slice(&buf[..n]);
        }
        conn.write_all(b"250 queued\r\n").await.unwrap();
        data
    });

    let mut config = ClientConfig::new("relay.test");
    config.command_timeout = Duration::from_secs(1);
    let mut client = Client::connect(client_io, config).await.unwrap();
    let line = [b'x'; 1022];
    let mut message = Vec::new();
    while message.len() < 1024 * 1024 {
        message.extend_from_slice(&line);
        message.extend_from_slice(b"\r\n");
    }
    let started = tokio::time::Instant::now();
    let delivery = client
        .send(&envelope(&["a@dst.test"]), &message)
        .await
        .unwrap();
    assert_eq!(delivery.data.map(|r| r.code), Some(250));
    assert!(
        started.elapsed() > Duration::from_secs(5),
        "the reader was not slow: {:?}",
        started.elapsed()
    );
    let received = server.await.unwrap();
    assert_eq!(&received[..message.len()], &message[..]);
    assert_eq!(&received[message.len()..], b".\r\n");
}

/// The server keeps a quoted local part unquoted (`"john smith"@x` as `john smith@x`);
/// the client must quote it again, or the next hop reads another path. Sent raw,
/// `v@a.test> ORCPT=rfc822;x@b.test` was read as the recipient `v@a.test`, one the
/// relay had never accepted nor decided on. Round trip through our own server: each
/// mailbox arrives as the same mailbox.
#[tokio::test]
async fn mailboxes_that_are_not_dot_atoms_go_out_quoted() {
    let handler = Memory::new(true);
    let srv = spawn_server(config(), handler.clone()).await;
    let stream = TcpStream::connect(srv.addr).await.unwrap();
    let mut client = Client::connect(stream, ClientConfig::new("relay.test"))
        .await
        .unwrap();
    let rcpts = [
        "v@a.test> ORCPT=rfc822;x@b.test",
        "john smith@b.test",
        "c\"d@b.test",
        "e\\f@b.test",
        "plain.dot-atom+tag@b.test",
    ];
    let mut env = envelope(&rcpts);
    env.mail_from = "ceo@bank.test> ENVID=x@corp.test".into();
    let delivery = client.send(&env, b"hi\r\n").await.unwrap();
    assert_eq!(delivery.delivered(), rcpts.to_vec());
    let stored = handler.messages();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].envelope.rcpt_to, rcpts.to_vec());
    assert_eq!(stored[0].envelope.mail_from, env.mail_from);

    // A control character cannot be written in any quoting: nothing is sent.
    let env = envelope(&["x\r.\r@b.test"]);
    assert!(matches!(
        client.send(&env, b"hi\r\n").await,
        Err(Error::Protocol(_))
    ));
    assert_eq!(client.noop().await.unwrap().code, 250);
    assert_eq!(handler.messages().len(), 1);
}

/// RFC 6152 §3: 8-bit data only to a server that offers 8BITMIME (the client does not
/// convert; the relay bounces with 5.6.3). ASCII data declared 8BITMIME may go.
#[tokio::test]
async fn eight_bit_data_needs_8bitmime() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"220 mx.test ESMTP\r\n").await.unwrap();
        let mut seen = Vec::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap() == 0 {
                break;
            }
            let reply: &[u8] = match line.get(..4).map(str::to_ascii_uppercase).as_deref() {
                Some("EHLO") => b"250-mx.test\r\n250 SIZE 1000\r\n",
                Some("DATA") => b"354 go on\r\n",
                Some("QUIT") => b"221 bye\r\n",
                _ if line == ".\r\n" => b"250 queued\r\n",
                _ => b"250 ok\r\n",
            };
            seen.push(line);
            w.write_all(reply).await.unwrap();
        }
        seen
    });
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut client = Client::connect(stream, ClientConfig::new("relay.test"))
        .await
        .unwrap();
    assert!(!client.capabilities().eight_bit_mime);
    let mut env = envelope(&["a@dst.test"]);
    env.body = Body::EightBitMime;
    assert!(matches!(
        client.send(&env, "caf\u{e9}\r\n".as_bytes()).await,
        Err(Error::MissingExtension("8BITMIME"))
    ));
    // Undeclared 8-bit data is 8-bit data too.
    env.body = Body::SevenBit;
    assert!(matches!(
        client.send(&env, b"\xff\r\n").await,
        Err(Error::MissingExtension("8BITMIME"))
    ));
    env.body = Body::EightBitMime;
    let d = client.send(&env, b"plain\r\n").await.unwrap();
    assert_eq!(d.delivered(), vec!["a@dst.test"]);
    client.quit().await.unwrap();
    let seen = server.await.unwrap();
    assert_eq!(
        seen.iter().filter(|l| l.starts_with("MAIL")).count(),
        1,
        "{seen:?}"
    );
    assert!(seen.contains(&"plain\r\n".to_string()), "{seen:?}");
}

/// How [`out_of_step_server`] answers.
#[derive(Clone, Copy)]
struct Answers {
    ehlo: &'static str,
    rcpt: &'static str,
    data: &'static str,
    /// Sent in a segment of its own right after a 354; then the server hangs up
    /// without reading the data.
    after_354: Option<&'static str>,
    /// The reply to the end of the data.
    data_end: &'static str,
}

const HONEST: Answers = Answers {
    ehlo: "250 mx.test\r\n",
    rcpt: "250 ok\r\n",
    data: "354 go\r\n",
    after_354: None,
    data_end: "250 2.0.0 queued\r\n",
};

/// A next hop whose replies may be out of step with the commands: each answer goes to
/// the command it names, the rest get `250 ok` (221 to QUIT). Returns what it received.
async fn out_of_step_server(
    answers: Answers,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        let mut got = Vec::new();
        let mut in_data = false;
        w.write_all(b"220 mx.test ESMTP\r\n").await.unwrap();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                return got;
            }
            let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
            let end_of_data = in_data && line == ".\r\n";
            got.push(line);
            if in_data && !end_of_data {
                continue;
            }
            in_data = false;
            let reply = match verb.as_str() {
                _ if end_of_data => answers.data_end,
                "EHLO" => answers.ehlo,
                "RCPT" => answers.rcpt,
                "DATA" => answers.data,
                "QUIT" => "221 bye\r\n",
                _ => "250 ok\r\n",
            };
            if w.write_all(reply.as_bytes()).await.is_err() {
                return got;
            }
            if reply.starts_with("354") {
                in_data = true;
                if let Some(late) = answers.after_354 {
                    // A write of its own (Nagle off): its own segment, there before the
                    // client has read the 354, or just after. (One that comes after the
                    // data is sent looks like the answer to it: no client can tell.)
                    let _ = w.write_all(late.as_bytes()).await;
                    // And it hangs up without reading the data.
                    return got;
                }
            }
        }
    });
    (addr, server)
}

/// A reply to DATA other than 354, 4xx or 5xx is no answer to it, and a reply that comes
/// before its command (or after the one reply to the end of the data) puts every later
/// one out of step: either is a protocol error (the attempt defers), never a delivery.
/// An audit's next hops answered DATA with 250, put a `250` line inside a RCPT's `250-`
/// block, sent a reply nobody asked for after EHLO or after the 354 (in a segment of its
/// own), or one reply per recipient after the data; each time the relay marked mail
/// delivered that the next hop had not taken.
#[tokio::test]
async fn replies_out_of_step_with_the_commands_are_never_a_delivery() {
    let pipelining = "250-mx.test\r\n250 PIPELINING\r\n";
    let cases: [(&str, Answers); 7] = [
        (
            "DATA answered 250",
            Answers {
                data: "250 ok\r\n",
                ..HONEST
            },
        ),
        (
            "DATA answered 250, pipelined",
            Answers {
                ehlo: pipelining,
                data: "250 ok\r\n",
                ..HONEST
            },
        ),
        (
            "a 250 line inside a RCPT's 250- block",
            Answers {
                rcpt: "250-2.1.5 a\r\n250 2.1.5 b\r\n250 2.0.0 c\r\n",
                ..HONEST
            },
        ),
        (
            "a reply nobody asked for after EHLO",
            Answers {
                ehlo: "250 mx.test\r\n250 2.0.0 unsolicited\r\n",
                ..HONEST
            },
        ),
        (
            "a reply nobody asked for after EHLO, pipelined",
            Answers {
                ehlo: "250-mx.test\r\n250 PIPELINING\r\n250 2.0.0 unsolicited\r\n",
                ..HONEST
            },
        ),
        (
            "a 250 in its own segment after the 354",
            Answers {
                after_354: Some("250 2.0.0 queued before any data\r\n"),
                ..HONEST
            },
        ),
        (
            "one reply per recipient after the data",
            Answers {
                data_end: "250 2.0.0 b delivered\r\n550 5.1.1 c unknown\r\n",
                ..HONEST
            },
        ),
    ];
    for (what, answers) in cases {
        let (addr, server) = out_of_step_server(answers).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut client = Client::connect(stream, ClientConfig::new("relay.test"))
            .await
            .unwrap();
        let sent = client
            .send(
                &envelope(&["b@dst.test", "c@dst.test"]),
                b"Subject: t\r\n\r\nbody\r\n",
            )
            .await;
        assert!(
            matches!(sent, Err(Error::Protocol(_) | Error::Io(_))),
            "{what}: {:?}",
            sent.map(|d| d.data)
        );
        drop(client);
        server.await.unwrap();
    }
    // The same server, answering in step: delivered.
    let (addr, server) = out_of_step_server(HONEST).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut client = Client::connect(stream, ClientConfig::new("relay.test"))
        .await
        .unwrap();
    let sent = client
        .send(&envelope(&["b@dst.test"]), b"Subject: t\r\n\r\nbody\r\n")
        .await
        .unwrap();
    assert_eq!(sent.data.map(|d| d.code), Some(250));
    client.quit().await.unwrap();
    let got = server.await.unwrap();
    assert!(got.iter().any(|l| l.starts_with("Subject")), "{got:?}");
}
