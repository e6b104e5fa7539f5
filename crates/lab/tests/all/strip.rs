//! StripTlsProxy: the client never learns that the server offers STARTTLS.

use std::net::SocketAddr;
use std::time::Duration;

use altroute_lab::{SinkConfig, SmtpSink, StripTlsProxy, TestCa, Validity, loopback_ip};

use crate::client::Client;

#[tokio::test]
async fn starttls_is_stripped_and_refused_and_mail_flows_in_clear() {
    let ca = TestCa::new("lab root").unwrap();
    let mut cfg = SinkConfig::new(SocketAddr::new(loopback_ip().into(), 0), "mx1.example.test");
    cfg.starttls = Some(
        ca.issue(&["mx1.example.test"], Validity::Valid)
            .unwrap()
            .rustls_server_config()
            .unwrap(),
    );
    let sink = SmtpSink::start(cfg).await.unwrap();

    // Directly, the sink offers STARTTLS as the last capability.
    let mut direct = Client::connect(sink.addr()).await;
    let ehlo = direct.cmd("EHLO relay.test").await;
    assert!(ehlo.has_line("STARTTLS"), "{ehlo:?}");
    assert_eq!(direct.raw.last().map(String::as_str), Some("250 STARTTLS"));
    direct.cmd("QUIT").await;

    let proxy = StripTlsProxy::start(SocketAddr::new(loopback_ip().into(), 0), sink.addr())
        .await
        .unwrap();
    let mut c = Client::connect(proxy.addr()).await;
    let ehlo = c.cmd("EHLO relay.test").await;
    assert_eq!(ehlo.code, 250);
    assert!(!ehlo.has_line("STARTTLS"), "{ehlo:?}");
    assert!(ehlo.has_line("PIPELINING"), "{ehlo:?}");
    // The reply stays well formed: the new last line is marked as last.
    let last = c.raw.last().unwrap();
    assert!(last.starts_with("250 "), "{:?}", c.raw);
    assert!(
        c.raw[c.raw.len() - ehlo.lines.len()..c.raw.len() - 1]
            .iter()
            .all(|l| l.starts_with("250-"))
    );

    let r = c.cmd("STARTTLS").await;
    assert_eq!(r.code, 454, "{r:?}");
    assert_eq!(
        c.send_mail("a@origin.test", &["b@example.test"], "clear text")
            .await
            .code,
        250
    );
    c.cmd("QUIT").await;

    let m = sink
        .wait_for_messages(1, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(m[0].tls_version, None);
    let proxied = &sink.sessions()[1];
    assert!(
        !proxied
            .commands
            .iter()
            .any(|c| c.eq_ignore_ascii_case("STARTTLS")),
        "{:?}",
        proxied.commands
    );
    assert_eq!(proxy.sessions(), 1);
    assert_eq!(proxy.capabilities_stripped(), 1);
    assert_eq!(proxy.starttls_refused(), 1);
}
