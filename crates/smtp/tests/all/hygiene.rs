//! Protocol hygiene: raw bytes in, exact reply codes out.

use std::time::Duration;

use altroute_smtp::SessionEnd;

use crate::common::{Memory, Raw, config, spawn_server};

async fn in_data(raw: &mut Raw) {
    raw.cmd("EHLO client.test", "250").await;
    raw.cmd("MAIL FROM:<a@src.test>", "250 2.1.0").await;
    raw.cmd("RCPT TO:<b@dst.test>", "250 2.1.5").await;
    raw.cmd("DATA", "354").await;
}

#[tokio::test]
async fn command_line_too_long() {
    let srv = spawn_server(config(), Memory::new(true)).await;
    let mut raw = Raw::connect(srv.addr).await;
    // (line content without CRLF, expected reply)
    let exact = format!("NOOP {}", "x".repeat(510 - 5));
    let over = format!("NOOP {}", "x".repeat(511 - 5));
    let huge = format!("NOOP {}", "x".repeat(1 << 20));
    for (line, expect) in [
        (exact.as_str(), "250 2.0.0"),
        (over.as_str(), "500 5.5.6 Line too long"),
        (huge.as_str(), "500 5.5.6 Line too long"),
        ("NOOP", "250 2.0.0"),
    ] {
        raw.cmd(line, expect).await;
    }
    // Long line in pieces, then a pipelined command behind it.
    raw.send(&vec![b'y'; 3000]).await;
    raw.send(&vec![b'y'; 3000]).await;
    raw.send(b"\r\nNOOP\r\n").await;
    assert!(raw.reply().await.starts_with("500 5.5.6"));
    assert!(raw.reply().await.starts_with("250 2.0.0"));
}

#[tokio::test]
async fn text_line_too_long_in_data() {
    let handler = Memory::new(true);
    let srv = spawn_server(config(), handler.clone()).await;
    // (line length without CRLF, expected final reply)
    for (len, expect) in [
        (998, "250 2.0.0"),
        (999, "500 5.5.6"),
        (100_000, "500 5.5.6"),
    ] {
        let mut raw = Raw::connect(srv.addr).await;
        in_data(&mut raw).await;
        let mut body = b"Subject: t\r\n\r\n".to_vec();
        body.extend(std::iter::repeat_n(b'z', len));
        body.extend_from_slice(b"\r\n.\r\n");
        raw.send(&body).await;
        let r = raw.reply().await;
        assert!(r.starts_with(expect), "{len}: {r}");
        // The session goes on after the rejection.
        raw.cmd("NOOP", "250").await;
    }
    assert_eq!(handler.messages().len(), 1);
}

#[tokio::test]
async fn size_limits() {
    let handler = Memory::new(true);
    let mut c = config();
    c.max_message_size = 1000;
    let srv = spawn_server(c, handler.clone()).await;
    let mut raw = Raw::connect(srv.addr).await;
    let ehlo = raw.cmd("EHLO client.test", "250").await;
    assert!(ehlo.contains("250-SIZE 1000\r\n"), "{ehlo}");
    for (param, expect) in [
        ("SIZE=1001", "552 5.3.4"),
        ("SIZE=99999999999999999", "552 5.3.4"),
        ("SIZE=999999999999999999999", "552 5.3.4"),
        ("SIZE=1000", "250 2.1.0"),
    ] {
        raw.cmd(&format!("MAIL FROM:<a@src.test> {param}"), expect)
            .await;
    }
    raw.cmd("RCPT TO:<b@dst.test>", "250").await;
    raw.cmd("DATA", "354").await;
    // 100 lines of 30 octets: 3000 octets, declared 1000.
    let mut body = Vec::new();
    for _ in 0..100 {
        body.extend_from_slice(b"0123456789012345678901234567\r\n");
    }
    body.extend_from_slice(b".\r\n");
    raw.send(&body).await;
    let r = raw.reply().await;
    assert!(r.starts_with("552 5.3.4"), "{r}");
    raw.cmd("NOOP", "250").await;
    assert!(handler.messages().is_empty());
}

#[tokio::test]
async fn recipient_cap() {
    let mut c = config();
    c.max_recipients = 3;
    let srv = spawn_server(c, Memory::new(true)).await;
    let mut raw = Raw::connect(srv.addr).await;
    raw.cmd("EHLO client.test", "250").await;
    raw.cmd("MAIL FROM:<a@src.test>", "250").await;
    for (i, expect) in [
        "250",
        "250",
        "250",
        "452 4.5.3 Too many recipients",
        "452 4.5.3",
    ]
    .iter()
    .enumerate()
    {
        raw.cmd(&format!("RCPT TO:<r{i}@dst.test>"), expect).await;
    }
    // A new transaction gets a fresh count.
    raw.cmd("RSET", "250").await;
    raw.cmd("MAIL FROM:<a@src.test>", "250").await;
    raw.cmd("RCPT TO:<r@dst.test>", "250").await;
}

/// Every smuggling sequence is data, never the end of it; only CRLF.CRLF
/// ends the message, and the injected "second message" never becomes one.
#[tokio::test]
async fn smuggling_sequences() {
    // (sequence, expected reply after the real end of data)
    let cases: &[(&[u8], &str)] = &[
        (b"\n.\n", "550 5.6.11"),
        (b"\r.\r", "550 5.6.11"),
        (b"\r.\n", "550 5.6.11"),
        (b"\n.\r", "550 5.6.11"),
        (b"\n.\r\n", "550 5.6.11"),
        (b"\r\n.\n", "550 5.6.11"),
        (b"\r.\r\n", "550 5.6.11"),
        (b"\r\n.\r", "550 5.6.11"),
        (b"\r\n\0.\r\n", "250 2.0.0"),
        (b"\r\n.\0\r\n", "250 2.0.0"),
        (b"\0\n.\n", "550 5.6.11"),
        (b"\r\0\n.\r\n", "550 5.6.11"),
    ];
    for (seq, expect) in cases {
        let handler = Memory::new(true);
        let srv = spawn_server(config(), handler.clone()).await;
        let mut raw = Raw::connect(srv.addr).await;
        in_data(&mut raw).await;
        let mut bytes = b"Subject: first\r\n\r\nhello".to_vec();
        bytes.extend_from_slice(seq);
        bytes.extend_from_slice(
            b"MAIL FROM:<evil@src.test>\r\nRCPT TO:<victim@dst.test>\r\nDATA\r\nSubject: smuggled\r\n",
        );
        bytes.extend_from_slice(b"\r\n.\r\n");
        raw.send(&bytes).await;
        let r = raw.reply().await;
        assert!(r.starts_with(expect), "{seq:?}: {r}");
        // Exactly one reply: the next one answers our NOOP.
        raw.cmd("NOOP", "250 2.0.0 OK").await;
        let stored = handler.messages();
        if expect.starts_with("250") {
            assert_eq!(stored.len(), 1, "{seq:?}");
            let m = &stored[0].message;
            assert!(
                m.windows(9).any(|w| w == b"MAIL FROM"),
                "{seq:?}: message was cut: {:?}",
                String::from_utf8_lossy(m)
            );
            assert_eq!(stored[0].envelope.rcpt_to, vec!["b@dst.test".to_string()]);
        } else {
            assert!(stored.is_empty(), "{seq:?}");
        }
    }
}

#[tokio::test]
async fn out_of_sequence_and_syntax() {
    let srv = spawn_server(config(), Memory::new(true)).await;
    let mut raw = Raw::connect(srv.addr).await;
    for (line, expect) in [
        ("MAIL FROM:<a@src.test>", "503 5.5.1"),
        ("RCPT TO:<b@dst.test>", "503 5.5.1"),
        ("DATA", "503 5.5.1"),
        ("FOO bar", "500 5.5.2"),
        ("EHLO client.test", "250"),
        ("RCPT TO:<b@dst.test>", "503 5.5.1"),
        ("MAIL FROM:a@src.test", "501"),
        ("MAIL FROM:<a@src.test> REQUIRETLS", "530 5.7.10"),
        ("MAIL FROM:<a@src.test> FOO=BAR", "555 5.5.4"),
        ("MAIL FROM:<a@src.test>", "250 2.1.0"),
        ("MAIL FROM:<a@src.test>", "503 5.5.1"),
        ("RCPT TO:", "501"),
        ("DATA", "554 5.5.1"),
        ("RCPT TO:<nobody@dst.test>", "550 5.1.1"),
        ("VRFY postmaster", "252"),
        ("HELP", "214"),
        ("EXPN list", "502 5.5.1"),
        ("STARTTLS", "502 5.5.1"),
        ("AUTH PLAIN", "502 5.5.1"),
        ("RSET", "250"),
        ("QUIT", "221 2.0.0"),
    ] {
        raw.cmd(line, expect).await;
    }
    raw.expect_eof().await;
}

#[tokio::test]
async fn never_an_open_relay() {
    let handler = Memory::new(false);
    let srv = spawn_server(config(), handler.clone()).await;
    let mut raw = Raw::connect(srv.addr).await;
    raw.cmd("EHLO client.test", "250").await;
    raw.cmd("MAIL FROM:<a@src.test>", "250").await;
    raw.cmd("RCPT TO:<b@dst.test>", "550 5.7.1 Relaying denied")
        .await;
    raw.cmd("DATA", "554 5.5.1").await;
    assert!(handler.messages().is_empty());
}

#[tokio::test]
async fn pipelining_and_dot_unstuffing() {
    let handler = Memory::new(true);
    let srv = spawn_server(config(), handler.clone()).await;
    let mut raw = Raw::connect(srv.addr).await;
    let ehlo = raw.cmd("EHLO client.test", "250").await;
    for ext in ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"] {
        assert!(ehlo.contains(ext), "{ext} missing: {ehlo}");
    }
    assert!(
        !ehlo.contains("REQUIRETLS"),
        "REQUIRETLS offered without TLS"
    );
    raw.send(
        b"MAIL FROM:<a@src.test> BODY=8BITMIME\r\nRCPT TO:<b@dst.test>\r\nRCPT TO:<nobody@dst.test>\r\nRCPT TO:<c@dst.test>\r\nDATA\r\n",
    )
    .await;
    for expect in ["250 2.1.0", "250 2.1.5", "550 5.1.1", "250 2.1.5", "354"] {
        let r = raw.reply().await;
        assert!(r.starts_with(expect), "expected {expect}, got {r}");
    }
    // Stuffed wire form, then QUIT pipelined behind the end of data.
    let wire: &[u8] =
        b"Subject: dots\r\n\r\n..\r\n...two\r\n..leading\r\nmid.dle\r\n\xc3\xa9t\xc3\xa9\r\n\r\n.\r\nQUIT\r\n";
    let expected: &[u8] =
        b"Subject: dots\r\n\r\n.\r\n..two\r\n.leading\r\nmid.dle\r\n\xc3\xa9t\xc3\xa9\r\n\r\n";
    raw.send(wire).await;
    assert!(raw.reply().await.starts_with("250 2.0.0"));
    assert!(raw.reply().await.starts_with("221"));
    raw.expect_eof().await;
    let stored = handler.messages();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].message, expected);
    assert_eq!(
        stored[0].envelope.rcpt_to,
        vec!["b@dst.test".to_string(), "c@dst.test".to_string()]
    );
    assert_eq!(stored[0].envelope.body, altroute_smtp::Body::EightBitMime);
}

#[tokio::test]
async fn timeouts() {
    // (which phase stalls, config tweak)
    for phase in ["command", "data", "session"] {
        let mut c = config();
        match phase {
            "command" => c.command_timeout = Duration::from_millis(200),
            "data" => c.data_timeout = Duration::from_millis(200),
            _ => c.session_timeout = Duration::from_millis(500),
        }
        let mut srv = spawn_server(c, Memory::new(true)).await;
        let mut raw = Raw::connect(srv.addr).await;
        match phase {
            "command" => {}
            "data" => {
                in_data(&mut raw).await;
                raw.send(b"partial line").await;
            }
            _ => {
                // Keep the session busy with commands: only the session
                // deadline can end it.
                loop {
                    raw.send(b"NOOP\r\n").await;
                    let r = raw.reply().await;
                    if r.starts_with("421") {
                        assert!(r.starts_with("421 4.4.2"), "{r}");
                        break;
                    }
                    assert!(r.starts_with("250"), "{r}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                raw.expect_eof().await;
                assert!(matches!(
                    srv.ends.recv().await,
                    Some(Ok(SessionEnd::Timeout))
                ));
                continue;
            }
        }
        let r = raw.reply().await;
        assert!(r.starts_with("421 4.4.2"), "{phase}: {r}");
        raw.expect_eof().await;
        assert!(
            matches!(srv.ends.recv().await, Some(Ok(SessionEnd::Timeout))),
            "{phase}"
        );
    }
}

/// A client that pipelines commands and never reads a reply: once the server's replies
/// fill the socket, writing them is bounded by the command timeout, and the session ends
/// as timed out. Only reads had a timeout, and an audit's three such clients held every
/// session slot of a relay for as long as they liked.
#[tokio::test]
async fn a_client_that_never_reads_its_replies_is_timed_out() {
    let mut c = config();
    c.command_timeout = Duration::from_millis(300);
    c.session_timeout = Duration::from_secs(3600);
    let mut srv = spawn_server(c, Memory::new(true)).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(srv.addr).await.unwrap();
    let (_unread, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt as _;
        let batch = b"HELP\r\n".repeat(1000);
        // Until the server stops reading (its replies fill the socket), then until it
        // closes the connection.
        while w.write_all(&batch).await.is_ok() {}
    });
    // A bound on the test, not a timing assertion: without the write timeout the session
    // never ends.
    let end = tokio::time::timeout(Duration::from_secs(120), srv.ends.recv())
        .await
        .expect("the session outlived its timeouts");
    assert!(matches!(end, Some(Ok(SessionEnd::Timeout))), "{end:?}");
    writer.abort();
}

/// DATA, RSET and STARTTLS take no argument: 501, as Postfix answers, not 354 or 250.
#[tokio::test]
async fn commands_that_take_no_argument_refuse_one() {
    let handler = Memory::new(true);
    let srv = spawn_server(config(), handler.clone()).await;
    let mut raw = Raw::connect(srv.addr).await;
    raw.cmd("EHLO client.test", "250").await;
    raw.cmd("MAIL FROM:<a@src.test>", "250 2.1.0").await;
    raw.cmd("RCPT TO:<b@dst.test>", "250 2.1.5").await;
    raw.cmd("DATA junk", "501 5.5.4 Syntax: DATA").await;
    raw.cmd("RSET x", "501 5.5.4 Syntax: RSET").await;
    raw.cmd("STARTTLS now", "501 5.5.4 Syntax: STARTTLS").await;
    // The transaction is still open: the refused RSET did not reset it.
    raw.cmd("DATA", "354").await;
    raw.send(b"Subject: t\r\n\r\nbody\r\n.\r\n").await;
    assert!(raw.reply().await.starts_with("250 2.0.0"));
    assert_eq!(handler.messages().len(), 1);
}

/// A line of 998 octets that starts with "." is legal: on the wire it has one more
/// octet, the stuffing dot, which RFC 5321 4.5.3.1.6 does not count. It was refused with
/// 500 5.5.6.
#[tokio::test]
async fn a_longest_line_starting_with_a_dot_is_stored() {
    let handler = Memory::new(true);
    let srv = spawn_server(config(), handler.clone()).await;
    let mut raw = Raw::connect(srv.addr).await;
    in_data(&mut raw).await;
    let line = ".".repeat(998);
    raw.send(format!("Subject: t\r\n\r\n.{line}\r\n.\r\n").as_bytes())
        .await;
    let r = raw.reply().await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    assert_eq!(
        handler.messages()[0].message,
        format!("Subject: t\r\n\r\n{line}\r\n").as_bytes()
    );
}

/// CHUNKING is not offered; a client sending BDAT anyway gets 502 after its
/// chunk, and the chunk's bytes are never run as commands.
/// Without CHUNKING offered, BDAT is an unknown command (counted as an error) and the
/// bytes after it are commands, as the SMTP edge filter in front of this port reads them.
#[tokio::test]
async fn bdat_without_chunking_is_refused_and_what_follows_is_commands() {
    let handler = Memory::new(true);
    let srv = spawn_server(config(), handler.clone()).await;
    let mut raw = Raw::connect(srv.addr).await;
    raw.cmd("EHLO client.test", "250").await;
    raw.cmd("MAIL FROM:<a@src.test>", "250 2.1.0").await;
    raw.send(b"BDAT 12 LAST\r\nRSET\r\nNOOP\r\n").await;
    assert!(raw.reply().await.starts_with("502 5.5.1"));
    assert!(raw.reply().await.starts_with("250 2.0.0"));
    assert!(raw.reply().await.starts_with("250 2.0.0"));
    // RSET ran: a new transaction may start.
    raw.cmd("MAIL FROM:<a@src.test>", "250 2.1.0").await;
    raw.cmd("BDAT 0 LAST", "502 5.5.1").await;
    raw.cmd("QUIT", "221").await;
    raw.expect_eof().await;
}

#[tokio::test]
async fn too_many_errors_close_the_session() {
    let mut srv = spawn_server(config(), Memory::new(true)).await;
    let mut raw = Raw::connect(srv.addr).await;
    raw.cmd("EHLO client.test", "250").await;
    let mut flood = Vec::new();
    for _ in 0..=altroute_smtp::MAX_ERRORS {
        flood.extend_from_slice(b"FOO\r\n");
    }
    flood.extend_from_slice(b"NOOP\r\n");
    raw.send(&flood).await;
    for _ in 0..=altroute_smtp::MAX_ERRORS {
        let r = raw.reply().await;
        assert!(r.starts_with("500 5.5.2"), "{r}");
    }
    let r = raw.reply().await;
    assert!(r.starts_with("421 4.7.0"), "{r}");
    raw.expect_eof().await;
    assert!(matches!(
        srv.ends.recv().await,
        Some(Ok(SessionEnd::TooManyErrors))
    ));
}

#[tokio::test]
async fn envelope_address_and_parameter_checks() {
    let handler = Memory::new(true);
    let srv = spawn_server(config(), handler.clone()).await;
    let mut raw = Raw::connect(srv.addr).await;
    for (line, expect) in [
        ("HELO client.test", "250"),
        // HELO offers no extensions, so no parameters.
        ("MAIL FROM:<a@src.test> SIZE=10", "555 5.5.4"),
        ("EHLO client.test", "250"),
        ("MAIL FROM:<a@src.test> SIZE=10 size=20", "501 5.5.4"),
        // White space before the verb: no command (the SMTP edge refuses it too; an
        // audit's ` RCPT TO:<…>` passed the edge unchecked and this server ran it).
        (" MAIL FROM:<a@src.test>", "500 5.5.2"),
        ("\tRSET", "500 5.5.2"),
        // AUTH is offered inside TLS only: outside, its parameter is not supported
        // (an audit's `AUTH=<>` got 250).
        ("MAIL FROM:<a@src.test> AUTH=<>", "555 5.5.4"),
        (
            "MAIL FROM:<a@src.test> BODY=8BITMIME BODY=7BIT",
            "501 5.5.4",
        ),
        ("MAIL FROM:<a@>", "501 5.1.7"),
        // smtp-proto reads `<postmaster>` as the null path; as a sender it is no
        // mailbox (it went out as `<>`, whose bounces are dropped).
        ("MAIL FROM:<postmaster>", "501 5.1.7"),
        ("MAIL FROM:<PostMaster>", "501 5.1.7"),
        // Control characters: smtp-proto dropped a CR inside quotes (`"x\r.\r"` was
        // kept as `x.`, another mailbox) and let a TAB through.
        ("MAIL FROM:<\"a\tb\"@src.test>", "501 5.5.4"),
        ("MAIL FROM:<\"a>b\"@src.test> SIZE=10", "250 2.1.0"),
        ("RCPT TO:<>", "501 5.1.3"),
        ("RCPT TO:<b@>", "501 5.1.3"),
        ("RCPT TO:<b@-dst.test>", "501 5.1.3"),
        (
            &format!("RCPT TO:<{}@dst.test>", "b".repeat(65)),
            "501 5.1.3",
        ),
        ("RCPT TO:<Postmaster>", "250 2.1.5"),
        ("RCPT TO:<\"x\r.\r\"@dst.test>", "501 5.5.4"),
        ("RCPT TO:<\"x\0\"@dst.test>", "501 5.5.4"),
        ("RCPT TO:<c@dst.test> NOTIFY=NEVER\x7f", "501 5.5.4"),
        // smtp-proto takes no address literal; were it to, only IP literals would
        // pass (`address::is_ip_literal`): a general one can hold `>`.
        ("RCPT TO:<c@[tag:x]>", "501 5.1.3"),
        ("RCPT TO:<c@[192.0.2.1]>", "501 5.1.3"),
        ("RCPT TO:<\"john smith\"@dst.test>", "250 2.1.5"),
        ("RCPT TO:<@relay.test:c@dst.test>", "250 2.1.5"),
        ("DATA", "354"),
        ("hi\r\n.", "250"),
        ("QUIT", "221"),
    ] {
        raw.cmd(line, expect).await;
    }
    let stored = handler.messages();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].envelope.rcpt_to,
        ["Postmaster", "john smith@dst.test", "c@dst.test"]
    );
}

/// A domain in Unicode (SMTPUTF8) is taken only if it has an A-label (UTS 46): the relay
/// delivers to that, and holds it to the rules written for it.
#[tokio::test]
async fn a_unicode_domain_must_be_a_valid_idn() {
    let mut c = config();
    c.smtputf8 = true;
    let handler = Memory::new(true);
    let srv = spawn_server(c, handler.clone()).await;
    let mut raw = Raw::connect(srv.addr).await;
    for (line, expect) in [
        ("EHLO client.test", "250"),
        ("MAIL FROM:<a@src.test> SMTPUTF8", "250 2.1.0"),
        ("RCPT TO:<b@b\u{fc}cher.test>", "250 2.1.5"),
        ("RCPT TO:<b@sts\u{3002}dst.test>", "250 2.1.5"),
        // U+0378 is unassigned: UTS 46 disallows it.
        ("RCPT TO:<b@a\u{378}.test>", "501 5.1.3"),
        ("RSET", "250"),
        ("QUIT", "221"),
    ] {
        raw.cmd(line, expect).await;
    }
}

/// The DSN extension (RFC 3461): offered, and its parameters kept per recipient, with
/// what the RFC forbids refused. The parameters were once accepted without DSN being
/// offered and then dropped, so a `NOTIFY=NEVER` sender got a failure notice anyway.
#[tokio::test]
async fn dsn_parameters_are_kept_or_refused() {
    use altroute_smtp::dsn::{Notify, Ret};
    let handler = Memory::new(true);
    let srv = spawn_server(config(), handler.clone()).await;
    let mut raw = Raw::connect(srv.addr).await;
    let ehlo = raw.cmd("EHLO client.test", "250").await;
    assert!(ehlo.contains("250-DSN\r\n"), "{ehlo}");
    for (line, expect) in [
        ("MAIL FROM:<a@src.test> RET=FULL RET=HDRS", "501"),
        ("MAIL FROM:<a@src.test> ENVID=id+85x", "501 5.5.4"),
        ("MAIL FROM:<a@src.test> ENVID=id+E9x", "501 5.5.4"),
        ("MAIL FROM:<a@src.test> ENVID=ref+C3+A9-42", "501 5.5.4"),
        ("MAIL FROM:<a@src.test> RET=FULL ENVID=e+2B1", "250"),
        ("RCPT TO:<b@dst.test> NOTIFY=NEVER,SUCCESS", "501 5.5.4"),
        (
            "RCPT TO:<b@dst.test> ORCPT=rfc822;x+0D+0AY@dst.test",
            "501 5.5.4",
        ),
        (
            "RCPT TO:<b@dst.test> RRVS=2030-01-01T00:00:00Z",
            "555 5.5.4",
        ),
        (
            "RCPT TO:<b@dst.test> ORCPT=rfc822;a+E2+80+A8b@dst.test",
            "501 5.5.4",
        ),
        ("RCPT TO:<b@dst.test> NOTIFY=NEVER", "250"),
        ("RCPT TO:<c@dst.test>", "250"),
        (
            "RCPT TO:<d@dst.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;D+2Bx@orig.test",
            "250",
        ),
        (
            "RCPT TO:<f@dst.test> ORCPT=rfc822;a@x ORCPT=rfc822;b@x",
            "501 5.5.4",
        ),
        (
            "RCPT TO:<f@dst.test> NOTIFY=SUCCESS NOTIFY=FAILURE",
            "501 5.5.4",
        ),
        (
            "RCPT TO:<e@dst.test> ORCPT=rfc822;j+C3+B6rg@orig.test",
            "250",
        ),
        ("DATA", "354"),
    ] {
        raw.cmd(line, expect).await;
    }
    raw.cmd("Subject: x\r\n\r\nhi\r\n.", "250").await;
    let stored = handler.messages();
    let env = &stored[0].envelope;
    assert_eq!(env.ret, Some(Ret::Full));
    assert_eq!(env.env_id.as_deref(), Some("e+1"));
    assert_eq!(
        env.rcpt_to,
        ["b@dst.test", "c@dst.test", "d@dst.test", "e@dst.test"]
    );
    // UTF-8 in xtext is UTF-8 (smtp-proto's decoder made `+C3+B6` into `Ã¶`).
    assert_eq!(env.rcpt_dsn[3].orcpt.as_deref(), Some("jörg@orig.test"));
    let never = Notify {
        never: true,
        ..Notify::default()
    };
    assert_eq!(env.rcpt_dsn[0].notify, never);
    assert!(env.rcpt_dsn[1].is_empty());
    assert_eq!(
        env.rcpt_dsn[2].notify,
        Notify {
            success: true,
            delay: true,
            ..Notify::default()
        }
    );
    assert_eq!(env.rcpt_dsn[2].orcpt.as_deref(), Some("D+x@orig.test"));
}
