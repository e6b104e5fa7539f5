//! loopback_ip and free_port.

use std::collections::HashSet;
use std::net::SocketAddr;

use altroute_lab::{SinkConfig, SmtpSink, free_port, loopback_ip};

#[test]
fn loopback_ips_are_distinct_and_in_127_slash_8() {
    let ips: Vec<_> = (0..50).map(|_| loopback_ip()).collect();
    let unique: HashSet<_> = ips.iter().collect();
    assert_eq!(unique.len(), ips.len());
    for ip in &ips {
        assert!(ip.is_loopback(), "{ip}");
        assert_ne!(ip.octets()[1], 0, "{ip} is in 127.0.0.0/24");
    }
}

#[tokio::test]
async fn mx_servers_on_different_loopback_ips_share_one_port() {
    let first = loopback_ip();
    let port = free_port(first).unwrap();
    let a = SmtpSink::start(SinkConfig::new(
        SocketAddr::new(first.into(), port),
        "mx1.example.test",
    ))
    .await
    .unwrap();
    let second = loopback_ip();
    let b = SmtpSink::start(SinkConfig::new(
        SocketAddr::new(second.into(), port),
        "mx2.example.test",
    ))
    .await
    .unwrap();
    assert_eq!(a.addr().port(), b.addr().port());
    assert_ne!(a.addr().ip(), b.addr().ip());
    let mut c = crate::client::Client::connect(b.addr()).await;
    let r = c.cmd("EHLO client").await;
    assert!(r.lines[0].starts_with("mx2.example.test"), "{r:?}");
}
