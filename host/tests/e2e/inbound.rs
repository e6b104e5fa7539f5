//! Inbound interop and access control: swaks (plain, STARTTLS, PIPELINING, client
//! certificate, AUTH) and Postfix's smtp-source submit; bodies are read back from the
//! spool and compared byte for byte; a non-allowed client gets 5xx; admin endpoint; bad
//! configuration.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use altroute_lab::{TestCa, Validity};
use sha2::{Digest, Sha256};

use crate::support::{
    Relay, RelayConfig, SmtpConn, message_id, other_loopback, require_tool, signal, spool_messages,
    strip_received,
};

const SWAKS: &str = "/usr/bin/swaks";
const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";

/// A test message with lines that need dot-stuffing, CRLF line ends.
fn dotted_message(label: &str) -> Vec<u8> {
    let lines = [
        "From: <a@x.test>".to_owned(),
        "To: <b@y.test>".to_owned(),
        format!("Subject: dots {label}"),
        format!("Message-ID: <{label}@client.test>"),
        String::new(),
        "first line".into(),
        ".leading dot".into(),
        "..two dots".into(),
        ".".into(),
        " .space then dot".into(),
        "last line".into(),
    ];
    let mut m = lines.join("\r\n").into_bytes();
    m.extend_from_slice(b"\r\n");
    m
}

fn write(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn swaks(args: &[&str]) -> (bool, String) {
    require_tool(SWAKS, "swaks");
    let out = Command::new(SWAKS).args(args).output().expect("run swaks");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A relay with STARTTLS, client CA and a users file (user "alice", password "s3cret").
struct TlsLab {
    ca: TestCa,
    dir: tempfile::TempDir,
}

impl TlsLab {
    fn new() -> TlsLab {
        TlsLab {
            ca: TestCa::new("e2e root").unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn configure(&self, config: &mut RelayConfig) {
        let d = self.dir.path();
        let cert = self.ca.issue(&["relay.test"], Validity::Valid).unwrap();
        let cert_pem = write(d, "cert.pem", cert.chain_pem.as_bytes());
        let key_pem = write(d, "key.pem", cert.key_pem.as_bytes());
        let ca_pem = write(d, "ca.pem", self.ca.root_pem().as_bytes());
        let hash: [u8; 32] = Sha256::digest(b"s3cret").into();
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        let users = write(
            d,
            "users",
            format!("# test users\nalice:{hex}\n").as_bytes(),
        );
        config.server_extra = format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            cert_pem.display().to_string(),
            key_pem.display().to_string()
        );
        config.relay_extra = format!(
            "client_ca = {:?}\nusers_file = {:?}\n",
            ca_pem.display().to_string(),
            users.display().to_string()
        );
    }

    /// A client certificate from the relay's client CA, written as PEM files.
    fn client_cert(&self, ca: &TestCa) -> (PathBuf, PathBuf) {
        let c = ca.issue_client("client.test").unwrap();
        let name = format!("client-{}", ca.name().replace(' ', "-"));
        (
            write(
                self.dir.path(),
                &format!("{name}.pem"),
                c.chain_pem.as_bytes(),
            ),
            write(
                self.dir.path(),
                &format!("{name}.key"),
                c.key_pem.as_bytes(),
            ),
        )
    }
}

#[test]
fn swaks_and_smtp_source_land_intact_in_the_spool() {
    require_tool(SMTP_SOURCE, "postfix");
    let lab = TlsLab::new();
    let mut config = RelayConfig::new();
    lab.configure(&mut config);
    let mut relay = Relay::start(config);
    let server = relay.config.smtp.to_string();
    let files = tempfile::tempdir().unwrap();

    // swaks: plain, STARTTLS, PIPELINING (and both).
    let mut expected = Vec::new();
    for (label, extra) in [
        ("plain", &[][..]),
        ("tls", &["--tls"][..]),
        ("pipeline", &["--pipeline"][..]),
        ("tls-pipeline", &["--tls", "--pipeline"][..]),
    ] {
        let msg = dotted_message(&format!("swaks-{label}"));
        // swaks sends the file's lines with CRLF and then its own CRLF before the final
        // dot: give it LF line ends without the last one so nothing is doubled.
        let lf = String::from_utf8(msg.clone())
            .unwrap()
            .replace("\r\n", "\n");
        let lf = lf.strip_suffix('\n').unwrap();
        let file = write(files.path(), label, lf.as_bytes());
        let data = format!("@{}", file.display());
        let mut args = vec![
            "--server", &server, "--from", "a@x.test", "--to", "b@y.test", "--data", &data,
        ];
        args.extend_from_slice(extra);
        let (ok, out) = swaks(&args);
        assert!(ok, "swaks {label} failed:\n{out}");
        assert!(out.contains("250 2.0.0 Ok: queued as"), "{label}:\n{out}");
        if label.starts_with("tls") {
            assert!(out.contains("TLS started"), "{label}:\n{out}");
        }
        expected.push(msg);
    }

    // smtp-source with a pre-formatted message (-F: it dot-stuffs and appends CRLF).
    let sourced = dotted_message("smtp-source-F");
    // smtp-source sends an empty line of its own before the final dot, whatever the file
    // ends with (seen on the wire: "...last\r\n\r\n.\r\n"), so that line is part of
    // what it submitted.
    let lf = String::from_utf8(sourced.clone())
        .unwrap()
        .replace("\r\n", "\n");
    let lf = lf.strip_suffix('\n').unwrap();
    let sourced = [sourced.as_slice(), b"\r\n"].concat();
    let file = write(files.path(), "source.eml", lf.as_bytes());
    let status = Command::new(SMTP_SOURCE)
        .args([
            "-m", "20", "-s", "5", "-f", "a@x.test", "-t", "b@y.test", "-F",
        ])
        .arg(&file)
        .arg(&server)
        .status()
        .expect("run smtp-source");
    assert!(status.success());

    // The command from the issue: 50 generated messages of 4096 octets, 5 sessions.
    let out = Command::new(SMTP_SOURCE)
        .args([
            "-c", "-m", "50", "-s", "5", "-l", "4096", "-f", "a@x", "-t", "b@y", &server,
        ])
        .output()
        .expect("run smtp-source");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (status_line, metrics) = relay.admin_get("/metrics");
    assert!(status_line.contains("200"), "{status_line}");
    assert!(
        metrics.contains("altroute_messages_accepted_total 74"),
        "{metrics}"
    );
    let (_, health) = relay.admin_get("/health");
    assert_eq!(health, "ok\n");
    let (_, policy) = relay.admin_get("/policy");
    assert!(policy.contains("\"version\""), "{policy}");

    let status = relay.stop();
    assert!(status.success(), "relay exit {status}:\n{}", relay.log());

    let spool = relay.open_spool();
    let stored = spool_messages(&spool);
    assert_eq!(stored.len(), 4 + 20 + 50);
    for msg in &expected {
        let id = message_id(msg).unwrap();
        let found: Vec<_> = stored
            .iter()
            .filter(|(_, b)| message_id(strip_received(b)).as_deref() == Some(&id))
            .collect();
        assert_eq!(found.len(), 1, "{id}");
        assert_eq!(
            String::from_utf8_lossy(strip_received(&found[0].1)),
            String::from_utf8_lossy(msg),
            "{id}"
        );
    }
    let from_f = stored
        .iter()
        .filter(|(_, b)| strip_received(b) == sourced.as_slice())
        .count();
    let sample = stored
        .iter()
        .find(|(_, b)| {
            message_id(strip_received(b)).as_deref() == Some("<smtp-source-F@client.test>")
        })
        .map(|(_, b)| String::from_utf8_lossy(strip_received(b)).into_owned());
    assert_eq!(
        from_f,
        20,
        "smtp-source -F messages intact; one stored: {sample:?}, sent {:?}",
        String::from_utf8_lossy(&sourced)
    );
    let generated: Vec<_> = stored
        .iter()
        .filter(|(_, b)| strip_received(b).starts_with(b"From: <a@x>"))
        .collect();
    assert_eq!(generated.len(), 50);
    // smtp-source generates the same payload for every message: -l counts octets
    // including line ends. All 50 must arrive the same and complete.
    let mut payloads = HashSet::new();
    for (id, b) in generated {
        let body = strip_received(b);
        let split = body.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let payload = &body[split + 4..];
        assert!(payload.len() >= 4096, "{id}: payload {}", payload.len());
        payloads.insert(payload.to_vec());
        let entry = spool.entry(id).unwrap();
        assert_eq!(entry.envelope.mail_from, "a@x");
        assert_eq!(entry.envelope.rcpt_to, vec!["b@y".to_owned()]);
        assert_eq!(entry.envelope.received_from.as_deref(), Some("127.0.0.1"));
    }
    assert_eq!(payloads.len(), 1, "smtp-source payloads differ");
}

/// Raw RCPT replies from a client bound to `bind`.
fn rcpt_replies(relay: &Relay, bind: IpAddr) -> Vec<(u16, String)> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = SmtpConn::connect(relay.config.smtp, Some(bind))
            .await
            .unwrap();
        let mut out = vec![c.cmd("MAIL FROM:<a@x.test>").await.unwrap()];
        for rcpt in ["b@y.test", "c@z.test", "postmaster@relay.test"] {
            out.push(c.cmd(&format!("RCPT TO:<{rcpt}>")).await.unwrap());
        }
        out.push(c.cmd("DATA").await.unwrap());
        out
    })
}

/// Addresses a next hop reads as another mailbox are refused at RCPT and MAIL, not
/// queued: a quoted `@` (which once went out unquoted and reached `victim@sink.test`), `%`
/// and `!` routing, control characters (smtp-proto dropped a CR inside quotes: another
/// mailbox), and `<postmaster>` as a sender (read as the null sender, whose bounces are
/// dropped). A quoted local part with only space and specials is a mailbox like any.
#[test]
fn addresses_read_as_another_mailbox_are_refused() {
    let mut relay = Relay::start(RelayConfig::new());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let replies = rt.block_on(async {
        let mut c = SmtpConn::connect(relay.config.smtp, None).await.unwrap();
        let mut out = Vec::new();
        for line in [
            "MAIL FROM:<postmaster>",
            "MAIL FROM:<\"ceo@bank.test> ENVID=x\"@corp.test>",
            "MAIL FROM:<a@x.test>",
            "RCPT TO:<\"victim@sink.test> ORCPT=rfc822;x\"@pf.test>",
            "RCPT TO:<bob%partner.test@y.test>",
            "RCPT TO:<partner.test!bob@y.test>",
            "RCPT TO:<\"x\r.\r\"@y.test>",
            "RCPT TO:<\"john smith\"@y.test>",
            "DATA",
        ] {
            out.push((line, c.cmd(line).await.unwrap()));
        }
        out
    });
    let want = [
        "501 5.1.7",
        "501 5.1.7",
        "250",
        "501 5.1.3",
        "501 5.1.3",
        "501 5.1.3",
        "501 5.5.4",
        "250",
        "354",
    ];
    for ((line, (_, text)), want) in replies.iter().zip(want) {
        assert!(text.starts_with(want), "{line:?}: {text:?}, want {want}");
    }
    let (_, metrics) = relay.admin_get("/metrics");
    assert!(
        metrics.contains("altroute_recipients_rejected_total{reason=\"bad_address\"} 3"),
        "{metrics}"
    );
    assert!(relay.stop().success());
}

/// `RCPT TO:<postmaster>` (RFC 5321 §4.5.1): the relay has no mailboxes, so it takes it
/// only when `relay.postmaster` says where it goes, and stores it as that address. An
/// audit's message to it was accepted, then deferred as a policy fault for the whole
/// queue lifetime. A recipient given twice is stored once (another audit's next hop got
/// it three times).
#[test]
fn postmaster_goes_where_the_configuration_says_or_is_refused() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut bare = Relay::start(RelayConfig::new());
    let replies = rt.block_on(async {
        let mut c = SmtpConn::connect(bare.config.smtp, None).await.unwrap();
        let mut out = vec![c.cmd("MAIL FROM:<a@x.test>").await.unwrap()];
        out.push(c.cmd("RCPT TO:<Postmaster>").await.unwrap());
        out
    });
    assert!(replies[1].1.starts_with("550 5.1.1"), "{replies:?}");
    let (_, metrics) = bare.admin_get("/metrics");
    assert!(
        metrics.contains("altroute_recipients_rejected_total{reason=\"no_postmaster\"} 1"),
        "{metrics}"
    );
    assert!(bare.stop().success());

    let mut config = RelayConfig::new();
    config.relay_extra = "postmaster = \"ops@corp.test\"\n".into();
    let mut relay = Relay::start(config);
    rt.block_on(async {
        let mut c = SmtpConn::connect(relay.config.smtp, None).await.unwrap();
        let msg = b"Subject: abuse report\r\nMessage-ID: <pm@t>\r\n\r\nhi\r\n";
        let r = c
            .send(
                "a@x.test",
                &[
                    "postmaster",
                    "b@y.test",
                    "b@Y.TEST",
                    "ops@corp.test",
                    "B@y.test",
                ],
                msg,
            )
            .await
            .unwrap();
        assert_eq!(r.0, 250, "{r:?}");
        // The same mailbox with its domain as U-label and A-label (SMTPUTF8).
        for (line, want) in [
            ("MAIL FROM:<a@x.test> SMTPUTF8", 250),
            ("RCPT TO:<d@xn--bcher-kva.test>", 250),
            ("RCPT TO:<d@BÜCHER.test>", 250),
            ("DATA", 354),
            ("Subject: idn\r\n\r\nhi\r\n.", 250),
        ] {
            let r = c.cmd(line).await.unwrap();
            assert_eq!(r.0, want, "{line}: {r:?}");
        }
    });
    assert!(relay.stop().success());
    let spool = relay.open_spool();
    let mut stored: Vec<Vec<String>> = spool_messages(&spool)
        .iter()
        .map(|(id, _)| spool.entry(id).unwrap().envelope.rcpt_to)
        .collect();
    stored.sort();
    // Duplicates (the domain in any case or as its A-label; postmaster's address given
    // again) are kept once; a local part in another case is another mailbox.
    assert_eq!(
        stored,
        vec![
            vec!["d@xn--bcher-kva.test".to_string()],
            vec![
                "ops@corp.test".to_string(),
                "b@y.test".to_string(),
                "B@y.test".to_string()
            ],
        ]
    );
}

/// `server.max_sessions_per_client`: a client address outside `allow_networks` gets
/// `421 4.7.0` past the cap, and its slot comes back when a session ends; the relay's own
/// clients are not counted. Without a cap, a few clients that never read their replies
/// held every `max_sessions` slot (an audit's finding).
#[test]
fn sessions_per_client_address_are_capped_except_for_the_relay_s_clients() {
    let mut config = RelayConfig::new();
    config.allow_networks = vec!["127.0.0.1/32".into()];
    config.server_extra = "max_sessions_per_client = 2\n".into();
    let relay = Relay::start(config);
    let addr = relay.config.smtp;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let outsider = Some(other_loopback().into());
        let first = SmtpConn::connect(addr, outsider).await.unwrap();
        let second = SmtpConn::connect(addr, outsider).await.unwrap();
        let third = SmtpConn::connect(addr, outsider).await;
        let refused = third.err().expect("a third session from one address");
        assert!(
            refused.to_string().contains("421 4.7.0")
                && refused.to_string().contains("Too many connections"),
            "{refused}"
        );
        // A session that ends gives its slot back (the relay sees the close a moment
        // later: try until it has).
        drop(first);
        let mut again = None;
        for _ in 0..100 {
            if let Ok(c) = SmtpConn::connect(addr, outsider).await {
                again = Some(c);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(again.is_some(), "the slot never came back");
        // The relay's own clients are not counted.
        let mut mine = Vec::new();
        for _ in 0..5 {
            mine.push(
                SmtpConn::connect(addr, Some("127.0.0.1".parse().unwrap()))
                    .await
                    .unwrap(),
            );
        }
        drop((second, again, mine));
    });
    let (_, metrics) = relay.admin_get("/metrics");
    assert!(
        metrics.lines().any(
            |l| l.starts_with("altroute_smtp_sessions_refused_per_client_total ")
                && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
}

/// A fifth of the sessions is kept for the relay's own clients: clients outside
/// `allow_networks`, each under its per-address limit, get `421 4.7.0` once together they
/// hold the rest, and an allowed client is still greeted. An audit's six outside
/// addresses took every session (with `[edge]`, every module instance) and locked the
/// relay's own clients out until they left.
#[test]
fn a_share_of_the_sessions_is_kept_for_the_relay_s_clients() {
    let mut config = RelayConfig::new();
    config.allow_networks = vec!["127.0.0.1/32".into()];
    config.server_extra = "max_sessions = 5\n".into();
    let relay = Relay::start(config);
    let addr = relay.config.smtp;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut outsiders = Vec::new();
        for i in 0..4 {
            let from = Some(std::net::Ipv4Addr::new(127, 0, 0, 2 + i).into());
            outsiders.push(SmtpConn::connect(addr, from).await.unwrap());
        }
        let fifth = SmtpConn::connect(addr, Some(std::net::Ipv4Addr::new(127, 0, 0, 9).into()))
            .await
            .err()
            .expect("a fifth outside session");
        assert!(
            fifth.to_string().contains("421 4.7.0")
                && fifth.to_string().contains("try again later"),
            "{fifth}"
        );
        let mine = tokio::time::timeout(
            std::time::Duration::from_secs(15),
            SmtpConn::connect(addr, Some("127.0.0.1".parse().unwrap())),
        )
        .await
        .expect("the relay's own client is greeted")
        .unwrap();
        drop((outsiders, mine));
    });
    let (_, metrics) = relay.admin_get("/metrics");
    assert!(
        metrics.lines().any(
            |l| l.starts_with("altroute_smtp_sessions_refused_outside_total ")
                && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
}

#[test]
fn clients_outside_allow_networks_cannot_relay() {
    let mut config = RelayConfig::new();
    config.allow_networks = vec!["127.0.0.1/32".into()];
    let mut relay = Relay::start(config);

    let denied = rcpt_replies(&relay, other_loopback().into());
    assert_eq!(denied[0].0, 250, "MAIL: {:?}", denied[0]);
    for r in &denied[1..4] {
        assert_eq!(r.0, 550, "{r:?}");
        assert!(r.1.starts_with("550 5.7.1"), "{r:?}");
    }
    assert!(
        denied[4].0 >= 500,
        "DATA without recipients: {:?}",
        denied[4]
    );

    let allowed = rcpt_replies(&relay, "127.0.0.1".parse().unwrap());
    for r in &allowed[1..4] {
        assert_eq!(r.0, 250, "{r:?}");
    }

    // swaks from the same non-allowed address gets the same answer.
    let server = relay.config.smtp.to_string();
    let (ok, out) = swaks(&[
        "--server",
        &server,
        "--local-interface",
        "127.0.0.2",
        "--from",
        "a@x.test",
        "--to",
        "b@y.test",
    ]);
    assert!(!ok, "{out}");
    assert!(out.contains("550 5.7.1"), "{out}");

    let (_, metrics) = relay.admin_get("/metrics");
    assert!(
        metrics.contains("altroute_recipients_rejected_total{reason=\"relay_denied\"} 4"),
        "{metrics}"
    );
    assert!(relay.stop().success());
    assert!(relay.open_spool().list().is_empty());
}

#[test]
fn client_certificate_and_auth_let_other_addresses_relay() {
    let lab = TlsLab::new();
    let mut config = RelayConfig::new();
    config.allow_networks = vec!["127.0.0.1/32".into()];
    lab.configure(&mut config);
    let mut relay = Relay::start(config);
    let server = relay.config.smtp.to_string();
    let base = [
        "--server",
        server.as_str(),
        "--local-interface",
        "127.0.0.2",
        "--from",
        "a@x.test",
        "--to",
        "b@y.test",
        "--tls",
    ];

    // TLS alone from a non-allowed address: still denied.
    let (ok, out) = swaks(&base);
    assert!(!ok && out.contains("550 5.7.1"), "{out}");

    // A certificate from the client CA: allowed.
    let (cert, key) = lab.client_cert(&lab.ca);
    let (ok, out) = swaks(
        &[
            &base[..],
            &[
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    assert!(ok, "{out}");
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");

    // A certificate from another CA: the handshake fails, nothing relayed.
    let stranger = TestCa::new("stranger").unwrap();
    let (cert, key) = lab.client_cert(&stranger);
    let (ok, out) = swaks(
        &[
            &base[..],
            &[
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    assert!(!ok, "{out}");
    assert!(!out.contains("queued as"), "{out}");

    // AUTH over TLS: right password relays, wrong one does not.
    let (ok, out) = swaks(
        &[
            &base[..],
            &[
                "--auth",
                "PLAIN",
                "--auth-user",
                "alice",
                "--auth-password",
                "s3cret",
            ],
        ]
        .concat(),
    );
    assert!(ok, "{out}");
    assert!(out.contains("queued as"), "{out}");
    let (ok, out) = swaks(
        &[
            &base[..],
            &[
                "--auth",
                "PLAIN",
                "--auth-user",
                "alice",
                "--auth-password",
                "wrong",
            ],
        ]
        .concat(),
    );
    assert!(!ok, "{out}");
    assert!(out.contains("535"), "{out}");
    // Both are on record: who relayed, and the failure (an audit's 18,000 wrong guesses
    // left no trace).
    let (_, metrics) = relay.admin_get("/metrics");
    assert!(
        metrics.contains("altroute_smtp_auth_failures_total 1"),
        "{metrics}"
    );
    let log = relay.log();
    assert!(
        log.contains("SMTP AUTH succeeded") && log.contains("user=alice"),
        "{log}"
    );
    assert!(
        log.contains("SMTP AUTH failed") && log.contains("user=\"alice\""),
        "{log}"
    );

    assert!(relay.stop().success());
    let spool = relay.open_spool();
    let list = spool.list();
    assert_eq!(list.len(), 2);
    for e in list {
        assert_eq!(e.envelope.received_from.as_deref(), Some("127.0.0.2"));
        let body = spool.read_message(&e.id).unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.starts_with("Received: from") && text.contains("with ESMTPS"),
            "{text}"
        );
    }
}

#[test]
fn tls_required_no_and_requiretls_reach_the_envelope() {
    let lab = TlsLab::new();
    let mut config = RelayConfig::new();
    lab.configure(&mut config);
    let mut relay = Relay::start(config);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = SmtpConn::connect(relay.config.smtp, None).await.unwrap();
        let msg = b"Subject: relaxed\r\ntls-required:  NO\r\nMessage-ID: <relaxed@t>\r\n\r\nhi\r\n";
        let r = c.send("a@x.test", &["b@y.test"], msg).await.unwrap();
        assert_eq!(r.0, 250, "{r:?}");
        let msg = b"Subject: normal\r\nMessage-ID: <normal@t>\r\n\r\nTLS-Required: No\r\n";
        let r = c.send("a@x.test", &["b@y.test"], msg).await.unwrap();
        assert_eq!(r.0, 250, "{r:?}");
    });
    assert!(relay.stop().success());
    let spool = relay.open_spool();
    let mut seen = 0;
    for (id, body) in spool_messages(&spool) {
        let e = spool.entry(&id).unwrap();
        match message_id(strip_received(&body)).as_deref() {
            Some("<relaxed@t>") => assert!(e.envelope.tls_required_no),
            Some("<normal@t>") => assert!(!e.envelope.tls_required_no),
            other => panic!("unexpected {other:?}"),
        }
        seen += 1;
    }
    assert_eq!(seen, 2);
}

/// A message that already went through more relays than `server.max_hops` (50) is a mail
/// loop: refused at the end of DATA with `554 5.4.6`, nothing spooled. At the limit it goes.
#[test]
fn a_message_with_too_many_received_fields_is_refused_as_a_loop() {
    let mut relay = Relay::start(RelayConfig::new());
    let with_hops = |n: usize, id: &str| {
        let mut m = String::new();
        for i in 0..n {
            m.push_str(&format!(
                "Received: from hop{i}.test by hop{}.test;\r\n\tMon, 7 Dec 2026 00:00:00 +0000\r\n",
                i + 1
            ));
        }
        m.push_str(&format!(
            "Message-ID: <{id}@t>\r\nSubject: hops\r\n\r\nReceived: body lines do not count\r\n"
        ));
        m.into_bytes()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = SmtpConn::connect(relay.config.smtp, None).await.unwrap();
        let r = c
            .send("a@x.test", &["b@y.test"], &with_hops(51, "looping"))
            .await
            .unwrap();
        assert_eq!(r.0, 554, "{r:?}");
        assert!(
            r.1.contains("5.4.6 too many hops (51 Received: headers); mail loop?"),
            "{r:?}"
        );
        let r = c
            .send("a@x.test", &["b@y.test"], &with_hops(50, "at-limit"))
            .await
            .unwrap();
        assert_eq!(r.0, 250, "{r:?}");
    });
    assert!(relay.stop().success());
    let spool = relay.open_spool();
    let ids: Vec<_> = spool_messages(&spool)
        .iter()
        .map(|(_, body)| message_id(strip_received(body)))
        .collect();
    assert_eq!(ids, vec![Some("<at-limit@t>".to_string())]);
}

#[test]
fn bad_configuration_lists_every_problem_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = [\"nonsense\"]\ncolour = \"blue\"\n[relay]\nallow_networks = [\"10.0.0.0/99\"]\nclient_ca = \"nope.pem\"\n[policy]\nfile = \"missing.toml\"\n",
    )
    .unwrap();
    let out = serve_and_exit(&path);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "server.listen[0]",
        "server.colour: unknown key",
        "relay.allow_networks[0]",
        "relay.client_ca",
        "policy.file",
        "6 problems found",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}

/// `altroute serve -c config` run to its end (for configurations it refuses).
fn serve_and_exit(config: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_altroute"))
        .args(["serve", "-c"])
        .arg(config)
        .output()
        .unwrap()
}

/// A policy that does not compile is a configuration problem too: status 1, its problem
/// with file, line and column, and nothing created (an audit found status 2, after the
/// spool had been made).
#[test]
fn a_policy_that_does_not_compile_exits_1_before_the_spool_is_made() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("policy.toml"),
        "[[tls_compliance]]\nname = \"p\"\ndomains = [\"partner.example\"]\nmin_tls = \"1.1\"\n",
    )
    .unwrap();
    let path = dir.path().join("altroute.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[spool]\ndir = \"spool\"\n[policy]\nfile = \"policy.toml\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let out = serve_and_exit(&path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("policy.toml: line 4, column"), "{err}");
    assert!(err.contains("does not compile"), "{err}");
    assert!(!dir.path().join("spool").exists(), "the spool was made");
}

#[test]
fn sigterm_stops_accepting_but_lets_a_session_finish() {
    let mut relay = Relay::start(RelayConfig::new());
    let addr = relay.config.smtp;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = SmtpConn::connect(addr, None).await.unwrap();
        let m1 = b"Message-ID: <before@t>\r\n\r\nbefore\r\n";
        assert_eq!(c.send("a@x.test", &["b@y.test"], m1).await.unwrap().0, 250);

        signal(relay.pid(), "TERM");
        // The listener closes at once: new clients are refused.
        let mut refused = false;
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(refused, "still accepting after SIGTERM");

        // The session in progress still gets its message through.
        let m2 = b"Message-ID: <during@t>\r\n\r\nduring shutdown\r\n";
        let r = c.send("a@x.test", &["b@y.test"], m2).await.unwrap();
        assert_eq!(r.0, 250, "{r:?}");
        assert_eq!(c.cmd("QUIT").await.unwrap().0, 221);
    });
    let status = relay.wait();
    assert!(status.success(), "exit {status}:\n{}", relay.log());
    let spool = relay.open_spool();
    let ids: HashSet<_> = spool_messages(&spool)
        .iter()
        .filter_map(|(_, b)| message_id(strip_received(b)))
        .collect();
    assert_eq!(
        ids,
        HashSet::from(["<before@t>".to_owned(), "<during@t>".to_owned()])
    );
}
