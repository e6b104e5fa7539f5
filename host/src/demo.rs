//! `altroute demo`: a self-contained showcase on loopback.
//!
//! It builds a small world with the lab crate: a DNS server, an MX with valid STARTTLS,
//! one without STARTTLS, one with an expired certificate, one with a certificate for
//! another name, an opportunistic domain in clear text, and an alternate secure host;
//! every certificate comes from a test CA that the relay trusts. The relay runs
//! in-process (a spool in a temporary directory, the delivery engine with the standard
//! wasm module and [`SAMPLE_POLICY`], and an SMTP listener in front of the spool); sample
//! mail goes in through the relay's SMTP port over STARTTLS, and the demo prints each
//! routing decision. Exit status 0 when every sample was handled as expected, 1 otherwise.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

use altroute_lab::{DnsServer, SinkConfig, SmtpSink, TestCa, Validity, free_port, loopback_ip};
use altroute_queue::{Spool, SpoolConfig, SystemClock};
use altroute_smtp::{
    Client, ClientConfig, Envelope, Handler, Reply, ServerConfig, SessionInfo, serve_session,
};

use crate::delivery::{self, DecisionRecord, DeliveryMetrics, DeliverySettings};
use crate::policy_engine::PolicyEngine;

/// The demo's policy. `{port}` is replaced with the lab's SMTP port.
pub const SAMPLE_POLICY: &str = r#"
[policy]
name = "demo"

# The alternate secure route: a relay that delivers securely for us.
[[hosts]]
name = "secure-relay"
address = "secure-relay.demo.test"
port = {port}

[alternate_secure_route]
host = "secure-relay"

# Partners: TLS with a trusted certificate naming the MX.
[[tls_compliance]]
name = "partners"
domains = ["good.demo.test", "plain.demo.test", "expired.demo.test", "wrongname.demo.test"]
require_ca_signed = true
validate_hostname = true
"#;

/// One sample message and what must happen to it.
struct Sample {
    recipient: &'static str,
    requiretls: bool,
    /// The route the final decision must take.
    route: &'static str,
    /// The host that must receive it.
    host: &'static str,
}

const SAMPLES: &[Sample] = &[
    Sample {
        recipient: "alice@good.demo.test",
        requiretls: false,
        route: "direct",
        host: "mx.good.demo.test",
    },
    Sample {
        recipient: "bob@plain.demo.test",
        requiretls: false,
        route: "alternate",
        host: "secure-relay.demo.test",
    },
    Sample {
        recipient: "carol@expired.demo.test",
        requiretls: false,
        route: "alternate",
        host: "secure-relay.demo.test",
    },
    Sample {
        recipient: "dave@wrongname.demo.test",
        requiretls: false,
        route: "alternate",
        host: "secure-relay.demo.test",
    },
    Sample {
        recipient: "erin@open.demo.test",
        requiretls: false,
        route: "direct",
        host: "mx.open.demo.test",
    },
    Sample {
        recipient: "frank@open.demo.test",
        requiretls: true,
        route: "alternate",
        host: "secure-relay.demo.test",
    },
];

/// The demo's inbound side: loopback clients may relay; messages go to the spool.
struct DemoInbound {
    spool: Spool,
}

impl Handler for DemoInbound {
    fn may_relay(&self, session: &SessionInfo) -> bool {
        session.peer.ip().is_loopback()
    }

    async fn data(&self, session: &SessionInfo, env: &Envelope, message: Vec<u8>) -> Reply {
        let mut queued = altroute_queue::Envelope::new(env.mail_from.clone(), env.rcpt_to.clone());
        queued.requiretls = env.requiretls;
        queued.received_from = Some(session.peer.to_string());
        match self.spool.store(queued, message).await {
            Ok(id) => Reply::new(250, (2, 0, 0), format!("Queued as {id}")),
            Err(e) => Reply::new(451, (4, 3, 0), format!("Cannot queue: {e}")),
        }
    }
}

/// Runs the demo; returns the process exit code.
pub fn run() -> Result<i32> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(demo())
}

async fn sink(
    ca: &TestCa,
    dns: &DnsServer,
    port: u16,
    name: &str,
    cert: Option<(&[&str], Validity)>,
) -> Result<SmtpSink> {
    let ip = loopback_ip();
    let mut config = SinkConfig::new(SocketAddr::new(ip.into(), port), name);
    config.advertise_requiretls = true;
    if let Some((names, validity)) = cert {
        config.starttls = Some(ca.issue(names, validity)?.rustls_server_config()?);
    }
    let sink = SmtpSink::start(config).await?;
    dns.add_a(name, ip).await?;
    Ok(sink)
}

async fn demo() -> Result<i32> {
    let started = std::time::Instant::now();
    let ca = TestCa::new("altroute demo root")?;
    let dns = DnsServer::start(SocketAddr::new(loopback_ip().into(), 0)).await?;
    let port = free_port(loopback_ip())?;

    // The world.
    let mut sinks = Vec::new();
    for (domain, host, cert) in [
        ("good.demo.test", "mx.good.demo.test", Some(Validity::Valid)),
        ("plain.demo.test", "mx.plain.demo.test", None),
        (
            "expired.demo.test",
            "mx.expired.demo.test",
            Some(Validity::Expired),
        ),
        (
            "wrongname.demo.test",
            "mx.wrongname.demo.test",
            Some(Validity::Valid),
        ),
        ("open.demo.test", "mx.open.demo.test", None),
    ] {
        dns.add_mx(domain, 10, host).await?;
        let own = [host];
        let other = ["somebody-else.demo.test"];
        let names: &[&str] = if domain.starts_with("wrongname") {
            &other
        } else {
            &own
        };
        sinks.push((
            host,
            sink(&ca, &dns, port, host, cert.map(|v| (names, v))).await?,
        ));
    }
    let alt_name = "secure-relay.demo.test";
    sinks.push((
        alt_name,
        sink(
            &ca,
            &dns,
            port,
            alt_name,
            Some((&[alt_name], Validity::Valid)),
        )
        .await?,
    ));

    // The relay.
    let dir = tempfile::tempdir().context("temporary directory")?;
    let ca_file = dir.path().join("demo-ca.pem");
    std::fs::write(&ca_file, ca.root_pem())?;
    let spool = Spool::open(
        &dir.path().join("spool"),
        SpoolConfig::default(),
        Arc::new(SystemClock),
    )?;
    let engine = Arc::new(PolicyEngine::standard(
        &SAMPLE_POLICY.replace("{port}", &port.to_string()),
    )?);
    let settings = DeliverySettings {
        hostname: "relay.demo.test".into(),
        helo: "relay.demo.test".into(),
        resolver: Some(dns.addr()),
        smtp_port: port,
        ca_file: Some(ca_file),
        connect_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(10),
        poll_interval: Duration::from_millis(100),
        ..DeliverySettings::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let delivery = delivery::start(
        settings,
        spool.clone(),
        engine.clone(),
        DeliveryMetrics::new(),
        async {
            let _ = stopped.await;
        },
    )?;
    let relay_ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let listener = TcpListener::bind(SocketAddr::new(relay_ip, 0)).await?;
    let relay_addr = listener.local_addr()?;
    let relay_cert = ca.issue(&["relay.demo.test"], Validity::Valid)?;
    let mut server = ServerConfig::new("relay.demo.test");
    server.tls = Some(relay_cert.rustls_server_config()?);
    let server = Arc::new(server);
    let inbound = Arc::new(DemoInbound {
        spool: spool.clone(),
    });
    let accept = tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let Ok(local) = stream.local_addr() else {
                continue;
            };
            let (server, inbound) = (server.clone(), inbound.clone());
            tokio::spawn(async move {
                let _ = serve_session(stream, SessionInfo::new(peer, local), server, inbound).await;
            });
        }
    });

    println!(
        "altroute demo: policy {} (standard wasm module), relay SMTP on {relay_addr}, lab DNS on {}",
        engine.version(),
        dns.addr()
    );

    // Sample mail, over STARTTLS (REQUIRETLS needs it).
    for s in SAMPLES {
        let stream = TcpStream::connect(relay_addr).await?;
        let mut client = Client::connect(stream, ClientConfig::new("sender.demo.test")).await?;
        client
            .starttls(
                ca.rustls_client_config()?,
                ServerName::try_from("relay.demo.test")?,
            )
            .await?;
        let env = Envelope {
            mail_from: "sender@corp.demo.test".into(),
            requiretls: s.requiretls,
            rcpt_to: vec![s.recipient.into()],
            ..Envelope::default()
        };
        let msg = format!(
            "From: <sender@corp.demo.test>\r\nTo: <{}>\r\nSubject: altroute demo\r\n\r\nHello from the altroute demo.\r\n",
            s.recipient
        );
        let d = client.send(&env, msg.as_bytes()).await?;
        if d.delivered().is_empty() {
            bail!("the relay did not accept mail for {}: {d:?}", s.recipient);
        }
        let _ = client.quit().await;
    }

    // Wait until every sample has a final decision (delivered, deferred or bounced).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let finals = loop {
        let records = delivery.journal().records();
        let finals: Vec<DecisionRecord> = SAMPLES
            .iter()
            .filter_map(|s| {
                records
                    .iter()
                    .rev()
                    .find(|r| r.recipient == s.recipient && r.outcome != "rerouted")
                    .cloned()
            })
            .collect();
        if finals.len() == SAMPLES.len() || tokio::time::Instant::now() > deadline {
            break finals;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // The table.
    println!();
    let records = delivery.journal().records();
    println!(
        "{:<34} {:<10} {:<24} {:<4} {:<10} {:<52} {:<24} {:<24} ok",
        "recipient", "route", "hop host", "tls", "outcome", "result", "rule", "policy version"
    );
    let mut failures = 0;
    for s in SAMPLES {
        let r = finals.iter().find(|r| r.recipient == s.recipient);
        let Some(r) = r else {
            println!("{:<34} (no decision in time)", s.recipient);
            failures += 1;
            continue;
        };
        let received = sinks
            .iter()
            .find(|(h, _)| *h == s.host)
            .map(|(_, sink)| {
                sink.messages()
                    .iter()
                    .any(|m| m.rcpt_to.iter().any(|x| x == s.recipient))
            })
            .unwrap_or(false);
        let clear_text_leak = s.route == "alternate"
            && sinks.iter().any(|(h, sink)| {
                *h != s.host
                    && sink
                        .messages()
                        .iter()
                        .any(|m| m.rcpt_to.iter().any(|x| x == s.recipient))
            });
        let ok = r.route == s.route
            && r.host == s.host
            && r.outcome == "delivered"
            && received
            && !clear_text_leak;
        if !ok {
            failures += 1;
        }
        let label = if s.requiretls {
            format!("{} +REQUIRETLS", s.recipient)
        } else {
            s.recipient.to_string()
        };
        // For a reroute, show what the first hop had (why it was rerouted).
        let result = match records
            .iter()
            .find(|x| x.recipient == s.recipient && x.outcome == "rerouted")
        {
            Some(first) => format!("{} at {}", first.result, first.host),
            None => r.result.clone(),
        };
        println!(
            "{:<34} {:<10} {:<24} {:<4} {:<10} {:<52} {:<24} {:<24} {}",
            label,
            r.route,
            r.host,
            r.tls,
            r.outcome,
            result,
            r.rule,
            r.policy_version,
            if ok { "yes" } else { "NO" }
        );
    }
    println!();
    let (_, mx_plain) = &sinks[1];
    let sessions = mx_plain.sessions();
    let with_mail = sessions
        .iter()
        .filter(|s| {
            s.commands
                .iter()
                .any(|c| c.to_ascii_uppercase().starts_with("MAIL"))
        })
        .count();
    println!("{}", plain_mx_summary(sessions.len(), with_mail));
    let leaked = with_mail > 0;
    if leaked {
        failures += 1;
    }
    println!(
        "{} of {} samples handled as expected in {:.1} s.",
        SAMPLES.len() - failures.min(SAMPLES.len()),
        SAMPLES.len(),
        started.elapsed().as_secs_f64()
    );

    let _ = stop.send(());
    delivery.stopped().await;
    accept.abort();
    Ok(if failures == 0 { 0 } else { 1 })
}

/// What the MX without STARTTLS saw: `sessions` in all, `with_mail` of them with a MAIL
/// FROM (mail offered in clear text, which the demo's policy must never do).
fn plain_mx_summary(sessions: usize, with_mail: usize) -> String {
    let head = format!("mx.plain.demo.test (no STARTTLS) saw {sessions} session(s)");
    if with_mail == 0 {
        format!("{head}, none of them with MAIL FROM: nothing was sent to it in clear text.")
    } else {
        format!(
            "{head}, {with_mail} of them with MAIL FROM: mail was offered to it in clear text \
             (a leak)."
        )
    }
}

#[cfg(test)]
mod tests {
    use super::plain_mx_summary;

    #[test]
    fn the_plain_mx_summary_says_what_happened() {
        assert_eq!(
            plain_mx_summary(3, 0),
            "mx.plain.demo.test (no STARTTLS) saw 3 session(s), none of them with MAIL FROM: \
             nothing was sent to it in clear text."
        );
        let leak = plain_mx_summary(3, 2);
        assert!(leak.contains("2 of them with MAIL FROM"), "{leak}");
        assert!(
            leak.contains("mail was offered to it in clear text"),
            "{leak}"
        );
        assert!(!leak.contains("nothing was sent"), "{leak}");
    }
}
