//! A relay behind a real Envoy (`deploy/envoy/relays.yaml`: tcp_proxy with the upstream
//! PROXY protocol v2 transport socket): the relay trusts Envoy's address
//! (`server.proxy_protocol_from`) and decides who may relay, and what `Received:` says,
//! by the client address in the header, not by Envoy's.
//!
//! The relay is the real `altroute::serve::run` (listeners, PROXY header, SMTP server,
//! spool) in this process; Envoy connects to it from 127.0.0.1. Clients connect to Envoy
//! from chosen loopback addresses: 127.0.0.5 may relay, 127.0.0.6 may not.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use altroute_queue::{ManualClock, Spool, SpoolConfig};
use altroute_tests::envoy::{
    Envoy, SmtpClient, free_port, http_request, render, template, workspace,
};

const ALLOWED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
const DENIED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// `altroute::serve::run` on its own runtime and thread, stopped (gracefully) on drop.
struct Relay {
    port: u16,
    admin: SocketAddr,
    spool: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Relay {
    /// A relay on 127.0.0.1 that trusts PROXY headers from `proxies` and lets `allow`
    /// relay; delivery off, so accepted mail stays in the spool.
    fn start(dir: &Path, proxies: &str, allow: &str) -> Relay {
        let port = free_port();
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let spool = dir.join("spool");
        let policy = workspace().join("examples/policies/hosted-suite.toml");
        let toml = format!(
            "[server]\nhostname = \"relay.test\"\nlisten = [\"127.0.0.1:{port}\"]\n\
             proxy_protocol_from = [\"{proxies}\"]\nshutdown_grace_secs = 5\n\
             [relay]\nallow_networks = [\"{allow}\"]\n\
             [spool]\ndir = {:?}\n\
             [delivery]\nenabled = false\n\
             [policy]\nfile = {:?}\nwatch = false\n\
             [admin]\nlisten = \"{admin}\"\n",
            spool.display().to_string(),
            policy.display().to_string(),
        );
        let path = dir.join("altroute.toml");
        std::fs::write(&path, &toml).unwrap();
        let config = altroute::config::Config::load(&path)
            .unwrap_or_else(|e| panic!("{e}\nconfiguration:\n{toml}"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(altroute::serve::run(config, async {
                let _ = stopped.await;
            }))
        });
        let relay = Relay {
            port,
            admin,
            spool,
            stop: Some(stop),
            thread: Some(thread),
        };
        // Ready = the admin endpoint answers (the SMTP listener is bound before it, and a
        // direct connection from 127.0.0.1 would have to bring a PROXY header).
        let deadline = Instant::now() + Duration::from_secs(60);
        while !http_request(admin, "GET", "/health", &[]).is_ok_and(|r| r.status == 200) {
            assert!(
                !relay.thread.as_ref().unwrap().is_finished(),
                "the relay stopped before it was ready"
            );
            assert!(Instant::now() < deadline, "the relay was not ready in 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        relay
    }

    /// One sample of `/metrics` (name with labels, as printed).
    fn metric(&self, sample: &str) -> Option<f64> {
        let r = http_request(self.admin, "GET", "/metrics", &[]).unwrap();
        String::from_utf8_lossy(&r.body)
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
    }

    /// Shut down (the sessions' tasks end with the runtime) and open the spool.
    fn stop(mut self) -> Spool {
        self.shutdown();
        let clock = Arc::new(ManualClock::new(1_700_000_000));
        Spool::open(&self.spool, SpoolConfig::default(), clock).unwrap()
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap().unwrap();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.shutdown();
        }
    }
}

/// Envoy's tcp_proxy in front of `relay`, sending PROXY v2.
fn envoy_in_front(dir: &Path, relay: &Relay) -> (Envoy, u16) {
    let listen = free_port();
    let config = render(
        &template("relays.yaml"),
        &[
            ("LISTEN_PORT", &listen.to_string()),
            ("RELAY_ADDRESS", "127.0.0.1"),
            ("RELAY_PORT", &relay.port.to_string()),
        ],
    );
    (Envoy::start(&config, dir).unwrap(), listen)
}

/// Greeting, EHLO, MAIL, RCPT through Envoy from `source`; returns the RCPT reply and the
/// open client.
fn rcpt_through(envoy_port: u16, source: Ipv4Addr, rcpt: &str) -> (String, SmtpClient) {
    let mut c = SmtpClient::connect(envoy_port, Some(IpAddr::V4(source))).unwrap();
    let greeting = c.reply().unwrap();
    assert!(
        greeting.starts_with("220 ") && greeting.contains(" relay.test "),
        "{greeting}"
    );
    c.send(
        format!("EHLO client.test\r\nMAIL FROM:<alice@corp.example>\r\nRCPT TO:<{rcpt}>\r\n")
            .as_bytes(),
    )
    .unwrap();
    let replies = c.replies(3).unwrap();
    assert!(replies[0].starts_with("250"), "{replies:?}");
    assert!(replies[1].starts_with("250"), "{replies:?}");
    (replies[2].clone(), c)
}

#[test]
fn the_relay_behind_envoy_checks_the_client_address_from_the_proxy_header() {
    let dir = tempfile::tempdir().unwrap();
    // Envoy connects from 127.0.0.1 (the kernel's source for loopback); only it is trusted.
    let relay = Relay::start(dir.path(), "127.0.0.1/32", &format!("{ALLOWED}/32"));
    let (envoy, port) = envoy_in_front(dir.path(), &relay);

    // A client the relay admits: RCPT for a remote domain is accepted, and so is the message.
    let (rcpt, mut c) = rcpt_through(port, ALLOWED, "bob@random.example");
    assert!(rcpt.starts_with("250"), "{rcpt}\n{}", envoy.log_tail());
    c.send(b"DATA\r\n").unwrap();
    assert!(c.reply().unwrap().starts_with("354"));
    c.send(b"Subject: through Envoy\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        .unwrap();
    let queued = c.reply().unwrap();
    assert!(queued.starts_with("250 2.0.0 Ok: queued as"), "{queued}");
    assert!(c.reply().unwrap().starts_with("221"));

    // A client it does not admit, through the same Envoy: refused although Envoy's own
    // address (127.0.0.1) is loopback.
    let (rcpt, denied) = rcpt_through(port, DENIED, "bob@random.example");
    assert!(rcpt.starts_with("550 5.7.1"), "{rcpt}");
    assert_eq!(
        relay.metric("altroute_recipients_rejected_total{reason=\"relay_denied\"}"),
        Some(1.0)
    );

    // Envoy's address without a header (Envoy not sending PROXY, or anyone else on that
    // address): closed before the greeting, counted.
    let mut direct = SmtpClient::connect(relay.port, None).unwrap();
    direct.send(b"EHLO client.test\r\n").unwrap();
    assert_eq!(direct.read_until_closed().unwrap(), b"");
    assert_eq!(
        relay.metric("altroute_smtp_proxy_protocol_errors_total{reason=\"invalid\"}"),
        Some(1.0)
    );
    // An address that is not a trusted proxy is served as before: a PROXY line is a bad
    // command from it.
    let mut untrusted = SmtpClient::connect(relay.port, Some(IpAddr::V4(ALLOWED))).unwrap();
    assert!(untrusted.reply().unwrap().contains(" relay.test "));
    untrusted
        .send(b"PROXY TCP4 192.0.2.1 127.0.0.1 1 25\r\n")
        .unwrap();
    let bad = untrusted.reply().unwrap();
    assert!(bad.starts_with('5'), "{bad}");

    // Every session closed, so the relay stops at once.
    drop((untrusted, denied, envoy));
    let spool = relay.stop();
    let entries = spool.list();
    assert_eq!(entries.len(), 1, "one message accepted");
    assert_eq!(
        entries[0].envelope.rcpt_to,
        vec!["bob@random.example".to_string()]
    );
    assert_eq!(
        entries[0].envelope.received_from.as_deref(),
        Some("127.0.0.5")
    );
    let message = spool.read_message(&entries[0].id).unwrap();
    let text = String::from_utf8_lossy(&message);
    let received = text.split("\r\n\t").next().unwrap();
    assert_eq!(
        received, "Received: from client.test ([127.0.0.5])",
        "{text}"
    );
}
