//! SmtpSink: real SMTP sessions over loopback, plain and with STARTTLS.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use altroute_lab::ca::crypto_provider;
use altroute_lab::{
    FailAt, LabError, SinkConfig, SinkMode, SmtpSink, TestCa, Validity, loopback_ip,
};
use rustls::{CertificateError, ClientConfig, Error};

use crate::client::{Client, rustls_error};

const WAIT: Duration = Duration::from_secs(10);

fn config(name: &str) -> SinkConfig {
    SinkConfig::new(SocketAddr::new(loopback_ip().into(), 0), name)
}

async fn tls_sink(ca: &TestCa, names: &[&str], validity: Validity) -> SmtpSink {
    let mut c = config("mx1.example.test");
    c.starttls = Some(
        ca.issue(names, validity)
            .unwrap()
            .rustls_server_config()
            .unwrap(),
    );
    c.advertise_requiretls = true;
    SmtpSink::start(c).await.unwrap()
}

fn client_config(
    ca: &TestCa,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    Arc::new(
        ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(ca.rustls_root_store())
            .with_no_client_auth(),
    )
}

#[tokio::test]
async fn plain_session_records_commands_and_unstuffed_message() {
    let sink = SmtpSink::start(config("mx1.example.test")).await.unwrap();
    let mut c = Client::connect(sink.addr()).await;
    let ehlo = c.cmd("EHLO relay.test").await;
    assert_eq!(ehlo.code, 250);
    assert!(ehlo.has_line("PIPELINING"), "{ehlo:?}");
    assert!(
        !ehlo.has_line("STARTTLS"),
        "STARTTLS offered without a TLS config: {ehlo:?}"
    );
    let r = c
        .send_mail(
            "a@origin.test",
            &["b@example.test", "c@example.test"],
            "Subject: hi\r\n\r\n.dot line\r\nend",
        )
        .await;
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(c.cmd("QUIT").await.code, 221);

    let messages = sink.wait_for_messages(1, WAIT).await.unwrap();
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m.mail_from, "a@origin.test");
    assert_eq!(m.rcpt_to, vec!["b@example.test", "c@example.test"]);
    assert_eq!(m.data, b"Subject: hi\r\n\r\n.dot line\r\nend\r\n");
    assert_eq!(m.tls_version, None);

    let sessions = sink.sessions();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].tls, None);
    assert_eq!(
        sessions[0].commands,
        vec![
            "EHLO relay.test",
            "MAIL FROM:<a@origin.test>",
            "RCPT TO:<b@example.test>",
            "RCPT TO:<c@example.test>",
            "DATA",
            "QUIT"
        ]
    );
}

#[tokio::test]
async fn pipelined_commands_get_replies_in_order() {
    let sink = SmtpSink::start(config("mx1.example.test")).await.unwrap();
    let mut c = Client::connect(sink.addr()).await;
    c.cmd("EHLO relay.test").await;
    c.send(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<b@example.test>\r\nRCPT TO:<c@example.test>\r\nDATA\r\n")
        .await;
    let codes = [
        c.reply().await.code,
        c.reply().await.code,
        c.reply().await.code,
        c.reply().await.code,
    ];
    assert_eq!(codes, [250, 250, 250, 354]);
    c.send(b"body\r\n.\r\nQUIT\r\n").await;
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(c.reply().await.code, 221);
    let m = sink.wait_for_messages(1, WAIT).await.unwrap();
    assert_eq!(m[0].rcpt_to.len(), 2);
}

#[tokio::test]
async fn starttls_with_tls13_is_recorded() {
    let ca = TestCa::new("lab root").unwrap();
    let sink = tls_sink(&ca, &["mx1.example.test"], Validity::Valid).await;
    let mut c = Client::connect(sink.addr()).await;
    let ehlo = c.cmd("EHLO relay.test").await;
    assert!(ehlo.has_line("STARTTLS"), "{ehlo:?}");
    assert!(
        !ehlo.has_line("REQUIRETLS"),
        "REQUIRETLS before TLS: {ehlo:?}"
    );
    c.starttls(
        client_config(&ca, &[&rustls::version::TLS13]),
        "mx1.example.test",
    )
    .await
    .unwrap();
    assert_eq!(c.tls_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    let ehlo = c.cmd("EHLO relay.test").await;
    assert!(
        !ehlo.has_line("STARTTLS"),
        "STARTTLS offered again inside TLS: {ehlo:?}"
    );
    assert!(ehlo.has_line("REQUIRETLS"), "{ehlo:?}");
    assert_eq!(
        c.send_mail("a@origin.test", &["b@example.test"], "secret")
            .await
            .code,
        250
    );
    c.cmd("QUIT").await;

    let m = sink.wait_for_messages(1, WAIT).await.unwrap();
    assert_eq!(m[0].tls_version.as_deref(), Some("1.3"));
    let session = &sink.sessions()[0];
    let tls = session.tls.as_ref().expect("TLS recorded");
    assert_eq!(tls.version, "1.3");
    assert!(tls.cipher.starts_with("TLS13_"), "{}", tls.cipher);
    assert_eq!(tls.sni.as_deref(), Some("mx1.example.test"));
    assert_eq!(
        &session.commands[..3],
        ["EHLO relay.test", "STARTTLS", "EHLO relay.test"]
    );
}

#[tokio::test]
async fn starttls_with_tls12_is_recorded() {
    let ca = TestCa::new("lab root").unwrap();
    let sink = tls_sink(&ca, &["mx1.example.test"], Validity::Valid).await;
    let mut c = Client::connect(sink.addr()).await;
    c.cmd("EHLO relay.test").await;
    c.starttls(
        client_config(&ca, &[&rustls::version::TLS12]),
        "mx1.example.test",
    )
    .await
    .unwrap();
    c.cmd("EHLO relay.test").await;
    assert_eq!(
        c.send_mail("a@origin.test", &["b@example.test"], "x")
            .await
            .code,
        250
    );
    let m = sink.wait_for_messages(1, WAIT).await.unwrap();
    assert_eq!(m[0].tls_version.as_deref(), Some("1.2"));
    let tls = sink.sessions()[0].tls.clone().unwrap();
    assert_eq!(tls.version, "1.2");
    assert!(tls.cipher.starts_with("TLS_ECDHE_"), "{}", tls.cipher);
}

async fn handshake_error(
    sink_ca: &TestCa,
    trusted: &TestCa,
    names: &[&str],
    validity: Validity,
    name: &str,
) -> Error {
    let sink = tls_sink(sink_ca, names, validity).await;
    let mut c = Client::connect(sink.addr()).await;
    c.cmd("EHLO relay.test").await;
    let err = c
        .starttls(client_config(trusted, &[&rustls::version::TLS13]), name)
        .await
        .unwrap_err();
    rustls_error(&err)
}

#[tokio::test]
async fn expired_certificate_fails_the_handshake_as_expired() {
    let ca = TestCa::new("lab root").unwrap();
    let err = handshake_error(
        &ca,
        &ca,
        &["mx1.example.test"],
        Validity::Expired,
        "mx1.example.test",
    )
    .await;
    assert!(
        matches!(
            err,
            Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            )
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn wrong_name_fails_the_handshake_as_not_valid_for_name() {
    let ca = TestCa::new("lab root").unwrap();
    let err = handshake_error(
        &ca,
        &ca,
        &["other.example.test"],
        Validity::Valid,
        "mx1.example.test",
    )
    .await;
    assert!(
        matches!(
            err,
            Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn untrusted_certificate_fails_the_handshake_as_unknown_issuer() {
    let trusted = TestCa::new("trusted root").unwrap();
    let rogue = TestCa::new("rogue root").unwrap();
    let err = handshake_error(
        &rogue,
        &trusted,
        &["mx1.example.test"],
        Validity::Valid,
        "mx1.example.test",
    )
    .await;
    assert_eq!(
        err,
        Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
}

#[tokio::test]
async fn starttls_is_refused_when_not_configured() {
    let sink = SmtpSink::start(config("mx1.example.test")).await.unwrap();
    let mut c = Client::connect(sink.addr()).await;
    c.cmd("EHLO relay.test").await;
    assert_eq!(c.cmd("STARTTLS").await.code, 502);
}

async fn failing_sink(mode: SinkMode) -> (SmtpSink, Client) {
    let mut cfg = config("mx1.example.test");
    cfg.mode = mode;
    let sink = SmtpSink::start(cfg).await.unwrap();
    let mut c = Client::connect(sink.addr()).await;
    c.cmd("EHLO relay.test").await;
    (sink, c)
}

#[tokio::test]
async fn temp_fail_at_rcpt_answers_451() {
    let (sink, mut c) = failing_sink(SinkMode::TempFail(FailAt::Rcpt)).await;
    assert_eq!(c.cmd("MAIL FROM:<a@origin.test>").await.code, 250);
    let r = c.cmd("RCPT TO:<b@example.test>").await;
    assert_eq!(r.code, 451);
    assert!(r.lines[0].starts_with("4.3.0"), "{r:?}");
    assert_eq!(c.cmd("DATA").await.code, 554);
    assert!(sink.messages().is_empty());
}

#[tokio::test]
async fn perm_fail_at_mail_answers_550() {
    let (_sink, mut c) = failing_sink(SinkMode::PermFail(FailAt::Mail)).await;
    assert_eq!(c.cmd("MAIL FROM:<a@origin.test>").await.code, 550);
}

#[tokio::test]
async fn temp_fail_after_data_keeps_no_message() {
    let (sink, mut c) = failing_sink(SinkMode::TempFail(FailAt::Data)).await;
    assert_eq!(
        c.send_mail("a@origin.test", &["b@example.test"], "x")
            .await
            .code,
        451
    );
    assert_eq!(c.cmd("NOOP").await.code, 250);
    assert!(sink.messages().is_empty());
    let err = sink
        .wait_for_messages(1, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, LabError::Timeout(_)), "{err:?}");
}

#[tokio::test]
async fn rset_clears_the_envelope() {
    let sink = SmtpSink::start(config("mx1.example.test")).await.unwrap();
    let mut c = Client::connect(sink.addr()).await;
    assert_eq!(
        c.cmd("MAIL FROM:<a@origin.test>").await.code,
        503,
        "MAIL before EHLO"
    );
    c.cmd("HELO relay.test").await;
    c.cmd("MAIL FROM:<a@origin.test>").await;
    c.cmd("RCPT TO:<b@example.test>").await;
    assert_eq!(c.cmd("RSET").await.code, 250);
    assert_eq!(c.cmd("DATA").await.code, 503);
    assert_eq!(c.cmd("XYZZY").await.code, 502);
}

/// swaks, a real SMTP client, delivers through STARTTLS to the sink.
#[tokio::test]
async fn swaks_delivers_over_starttls() {
    let ca = TestCa::new("lab root").unwrap();
    let sink = tls_sink(&ca, &["mx1.example.test"], Validity::Valid).await;
    let addr = sink.addr();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("swaks")
            .args([
                "--server",
                &addr.ip().to_string(),
                "--port",
                &addr.port().to_string(),
            ])
            .args([
                "--from",
                "a@origin.test",
                "--to",
                "b@example.test",
                "--ehlo",
                "relay.test",
            ])
            .args([
                "--tls",
                "--pipeline",
                "--body",
                "hello from swaks",
                "--timeout",
                "20",
            ])
            .output()
    })
    .await
    .unwrap()
    .expect("swaks not found: run scripts/setup.sh (apt-get install swaks libnet-ssleay-perl)");
    assert!(
        out.status.success(),
        "swaks failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let m = sink.wait_for_messages(1, WAIT).await.unwrap();
    assert_eq!(m[0].rcpt_to, vec!["b@example.test"]);
    assert!(String::from_utf8_lossy(&m[0].data).contains("hello from swaks"));
    assert_eq!(m[0].tls_version.as_deref(), Some("1.3"));
}
