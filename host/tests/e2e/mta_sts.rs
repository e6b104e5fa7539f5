//! MTA-STS acceptance tests (issue 9): policies published through a lab DNS server
//! (`_mta-sts` TXT) and served by lab HTTPS servers with certificates from a test CA,
//! applied by the in-process delivery engine with the standard wasm policy module.
//!
//! Each lab host (MX sink, policy host) has its own loopback address; the MX sinks share
//! one SMTP port and the policy hosts one HTTPS port, which the relay is told to use (the
//! `https_port` test knob; RFC 8461 fixes 443).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use altroute::delivery::{self, Delivery, DeliveryMetrics, DeliverySettings};
use altroute::mta_sts::MtaStsSettings;
use altroute::policy_engine::PolicyEngine;
use altroute::tlsrpt::{SessionResult, day_of, read_day};
use altroute_lab::{
    DnsServer, HttpResponse, HttpsServer, SinkConfig, SinkMode, SmtpSink, TestCa, Validity,
    free_port, loopback_ip,
};
use altroute_queue::{Envelope, ManualClock, MessageId, RecipientState, Spool, SpoolConfig};

pub(crate) const WAIT: Duration = Duration::from_secs(20);
pub(crate) const START: u64 = 1_750_000_000;

/// How an MX sink does TLS.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Tls {
    None,
    Valid,
    WrongName,
}

/// The remote world: DNS, MX sinks, MTA-STS policy hosts.
pub(crate) struct World {
    pub ca: TestCa,
    pub dns: DnsServer,
    pub smtp_port: u16,
    pub https_port: u16,
    pub sinks: Vec<SmtpSink>,
    pub https: Vec<HttpsServer>,
}

impl World {
    pub async fn new() -> World {
        let ca = TestCa::new("e2e mta-sts root").unwrap();
        let dns = DnsServer::start(SocketAddr::new(loopback_ip().into(), 0))
            .await
            .unwrap();
        World {
            ca,
            dns,
            smtp_port: free_port(loopback_ip()).unwrap(),
            https_port: free_port(loopback_ip()).unwrap(),
            sinks: Vec::new(),
            https: Vec::new(),
        }
    }

    /// An SMTP sink named `name` on its own address (A record added).
    pub async fn sink(&mut self, name: &str, tls: Tls) -> usize {
        let ip = loopback_ip();
        let mut config = SinkConfig::new(SocketAddr::new(ip.into(), self.smtp_port), name);
        config.mode = SinkMode::Accept;
        config.starttls = match tls {
            Tls::None => None,
            Tls::Valid => Some(self.ca.issue(&[name], Validity::Valid).unwrap()),
            Tls::WrongName => Some(
                self.ca
                    .issue(&["someone-else.test"], Validity::Valid)
                    .unwrap(),
            ),
        }
        .map(|i| i.rustls_server_config().unwrap());
        self.sinks.push(SmtpSink::start(config).await.unwrap());
        self.dns.add_a(name, ip).await.unwrap();
        self.sinks.len() - 1
    }

    /// `domain MX pref host` and a sink for `host`.
    pub async fn mx(&mut self, domain: &str, pref: u16, host: &str, tls: Tls) -> usize {
        self.dns.add_mx(domain, pref, host).await.unwrap();
        self.sink(host, tls).await
    }

    /// Publishes an MTA-STS policy for `domain`: TXT `_mta-sts.domain` with `id`, and
    /// `mta-sts.domain` served by its own HTTPS server (certificate from `ca`, or the
    /// world's CA) answering `response` at the well-known path.
    pub async fn sts(
        &mut self,
        domain: &str,
        id: &str,
        response: HttpResponse,
        ca: Option<&TestCa>,
    ) -> usize {
        self.dns
            .add_txt(&format!("_mta-sts.{domain}"), &format!("v=STSv1; id={id}"))
            .await
            .unwrap();
        let host = format!("mta-sts.{domain}");
        let ip = loopback_ip();
        let cert = ca
            .unwrap_or(&self.ca)
            .issue(&[&host], Validity::Valid)
            .unwrap();
        let server = HttpsServer::start(SocketAddr::new(ip.into(), self.https_port), &cert)
            .await
            .unwrap();
        server.set(altroute::mta_sts::WELL_KNOWN, response);
        self.dns.add_a(&host, ip).await.unwrap();
        self.https.push(server);
        self.https.len() - 1
    }

    /// An address nothing listens on (for an unreachable policy host).
    pub fn dead_ip() -> Ipv4Addr {
        loopback_ip()
    }
}

/// A policy body.
pub(crate) fn sts_policy(mode: &str, mx: &[&str]) -> String {
    let mut s = format!("version: STSv1\r\nmode: {mode}\r\n");
    for m in mx {
        s.push_str(&format!("mx: {m}\r\n"));
    }
    s.push_str("max_age: 86400\r\n");
    s
}

/// The standard policy with an alternate secure route to `alt.lab.test`.
pub(crate) fn policy(port: u16) -> String {
    format!(
        r#"
[policy]
name = "e2e-standards"

[[hosts]]
name = "secure-relay"
address = "alt.lab.test"
port = {port}

[alternate_secure_route]
host = "secure-relay"
"#
    )
}

/// The delivery engine with MTA-STS and TLS reporting on.
pub(crate) struct Relay {
    pub spool: Spool,
    pub delivery: Delivery,
    pub tlsrpt_dir: PathBuf,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Relay {
    /// Starts on a fresh spool in `dir`, with the MTA-STS cache in `cache_dir`.
    pub async fn start(world: &World, dir: &Path, cache_dir: &Path) -> Relay {
        let clock = Arc::new(ManualClock::new(START));
        let spool_dir = tempfile::tempdir_in(dir).unwrap().keep();
        let spool = Spool::open(&spool_dir, SpoolConfig::default(), clock).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, world.ca.root_pem()).unwrap();
        let tlsrpt_dir = dir.join("tlsrpt");
        let settings = DeliverySettings {
            hostname: "relay.lab.test".into(),
            helo: "relay.lab.test".into(),
            resolver: Some(world.dns.addr()),
            smtp_port: world.smtp_port,
            ca_file: Some(ca_file),
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(100),
            mta_sts: Some(MtaStsSettings {
                cache_dir: Some(cache_dir.to_path_buf()),
                https_port: world.https_port,
                fetch_timeout: Duration::from_secs(5),
            }),
            tlsrpt_dir: Some(tlsrpt_dir.clone()),
            ..DeliverySettings::default()
        };
        let engine = Arc::new(PolicyEngine::standard(&policy(world.smtp_port)).unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let delivery = delivery::start(
            settings,
            spool.clone(),
            engine,
            DeliveryMetrics::new(),
            async {
                let _ = stopped.await;
            },
        )
        .unwrap();
        Relay {
            spool,
            delivery,
            tlsrpt_dir,
            _stop: stop,
        }
    }

    pub async fn send(&self, to: &str) -> MessageId {
        let env = Envelope::new("alice@corp.test", vec![to.to_string()]);
        let msg = format!(
            "From: <alice@corp.test>\r\nTo: <{to}>\r\nSubject: sts\r\n\r\nconfidential body\r\n"
        );
        self.spool.store(env, msg.into_bytes()).await.unwrap()
    }

    /// See [`crate::inproc::settled`].
    pub async fn settled(&self, id: &MessageId) -> Option<Vec<RecipientState>> {
        crate::inproc::settled(&self.spool, id).await
    }

    /// The TLS results recorded today (the test clock's day).
    pub fn results(&self) -> Vec<SessionResult> {
        read_day(&self.tlsrpt_dir, &day_of(START)).unwrap()
    }
}

pub(crate) fn commands(sink: &SmtpSink) -> Vec<String> {
    sink.sessions()
        .into_iter()
        .flat_map(|s| s.commands)
        .collect()
}

pub(crate) fn assert_no_mail(sink: &SmtpSink, what: &str) {
    let cmds = commands(sink);
    assert!(
        !cmds
            .iter()
            .any(|c| c.to_ascii_uppercase().starts_with("MAIL")),
        "{what}: no MAIL expected, got {cmds:?}"
    );
    assert!(sink.messages().is_empty(), "{what}: no message expected");
}

/// The journal's delivered record for `rcpt`.
fn delivered_record(relay: &Relay, rcpt: &str) -> delivery::DecisionRecord {
    relay
        .delivery
        .journal()
        .records()
        .into_iter()
        .rfind(|r| r.recipient == rcpt && r.outcome == "delivered")
        .unwrap_or_else(|| panic!("no delivered record for {rcpt}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_needs_verified_tls_else_the_alternate_route() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = World::new().await;
    let alt = w.sink("alt.lab.test", Tls::Valid).await;
    // (domain, its MX's TLS, delivered directly?)
    let cases = [
        ("plain.enforce.test", Tls::None, false),
        ("wrongname.enforce.test", Tls::WrongName, false),
        ("good.enforce.test", Tls::Valid, true),
    ];
    let mut mx = Vec::new();
    for (domain, tls, _) in cases {
        let host = format!("mx.{domain}");
        mx.push(w.mx(domain, 10, &host, tls).await);
        w.sts(
            domain,
            "1",
            HttpResponse::text(&sts_policy("enforce", &[&host])),
            None,
        )
        .await;
    }
    let relay = Relay::start(&w, dir.path(), &dir.path().join("cache")).await;
    for (domain, _, _) in cases {
        let id = relay.send(&format!("bob@{domain}")).await;
        assert_eq!(relay.settled(&id).await, None, "{domain}: delivered");
    }
    for (i, (domain, _, direct)) in cases.iter().enumerate() {
        let rcpt = format!("bob@{domain}");
        let rec = delivered_record(&relay, &rcpt);
        if *direct {
            let got = w.sinks[mx[i]].messages();
            assert_eq!(got.len(), 1, "{domain}");
            assert_eq!(got[0].tls_version.as_deref(), Some("1.3"), "{domain}");
            assert_eq!(rec.route, "direct");
        } else {
            assert_no_mail(&w.sinks[mx[i]], domain);
            assert!(
                w.sinks[alt]
                    .messages()
                    .iter()
                    .any(|m| m.rcpt_to.contains(&rcpt)),
                "{domain}: expected at the alternate host"
            );
            assert_eq!(rec.route, "alternate", "{domain}");
            // The verdict that sent it there names the MTA-STS rule.
            let verdict = relay
                .delivery
                .journal()
                .records()
                .into_iter()
                .find(|r| r.recipient == rcpt && r.outcome == "rerouted")
                .unwrap();
            assert_eq!(verdict.rule, "standard:mta-sts", "{domain}");
        }
        // The policy was fetched from its host, with the right Host header.
        let reqs = w.https[i].requests();
        assert_eq!(reqs.len(), 1, "{domain}: one fetch, then the cache");
        assert_eq!(reqs[0].path, "/.well-known/mta-sts.txt");
        assert_eq!(reqs[0].host.as_deref(), Some(&*format!("mta-sts.{domain}")));
        // And cached on disk.
        assert!(
            dir.path()
                .join("cache")
                .join(format!("{domain}.json"))
                .is_file()
        );
    }
}

/// An MTA-STS domain written in Unicode is still that domain: `bücher` is
/// `xn--bcher-kva`, and a full-width dot or full-width letters (UTS 46 maps them) spell
/// an ASCII name. The lookup once took only ASCII names, so these went out in clear text
/// to the MX that the resolver (which converts) found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_holds_for_every_spelling_of_the_domain() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = World::new().await;
    let alt = w.sink("alt.lab.test", Tls::Valid).await;
    let mut mx = Vec::new();
    for domain in ["sts.enforce.test", "xn--bcher-kva.enforce.test"] {
        let host = format!("mx.{domain}");
        // STARTTLS stripped, as by an attacker on the path.
        mx.push(w.mx(domain, 10, &host, Tls::None).await);
        w.sts(
            domain,
            "1",
            HttpResponse::text(&sts_policy("enforce", &[&host])),
            None,
        )
        .await;
    }
    let relay = Relay::start(&w, dir.path(), &dir.path().join("cache")).await;
    let rcpts = [
        "u1@sts\u{3002}enforce.test",
        "u2@\u{ff53}\u{ff54}\u{ff53}.enforce.test",
        "u3@b\u{fc}cher.enforce.test",
        "u4@B\u{dc}CHER.enforce.test",
    ];
    for rcpt in rcpts {
        let mut env = Envelope::new("alice@corp.test", vec![rcpt.to_string()]);
        env.smtputf8 = true;
        let msg = format!("From: <alice@corp.test>\r\nSubject: sts\r\n\r\nfor {rcpt}\r\n");
        let id = relay.spool.store(env, msg.into_bytes()).await.unwrap();
        assert_eq!(relay.settled(&id).await, None, "{rcpt}: delivered");
    }
    for (i, sink) in mx.iter().enumerate() {
        assert_no_mail(&w.sinks[*sink], &format!("MX {i}"));
    }
    let at_alt = w.sinks[alt].messages();
    assert_eq!(at_alt.len(), rcpts.len(), "all four at the alternate host");
    for m in &at_alt {
        assert!(m.tls_version.is_some(), "over TLS: {:?}", m.rcpt_to);
    }
    let rerouted: Vec<_> = relay
        .delivery
        .journal()
        .records()
        .into_iter()
        .filter(|r| r.outcome == "rerouted")
        .collect();
    assert_eq!(rerouted.len(), rcpts.len(), "{rerouted:?}");
    assert!(rerouted.iter().all(|r| r.rule == "standard:mta-sts"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testing_is_delivered_as_usual_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = World::new().await;
    let alt = w.sink("alt.lab.test", Tls::Valid).await;
    let mx = w
        .mx("t.testing.test", 10, "mx.t.testing.test", Tls::None)
        .await;
    w.sts(
        "t.testing.test",
        "7",
        HttpResponse::text(&sts_policy("testing", &["mx.t.testing.test"])),
        None,
    )
    .await;
    let relay = Relay::start(&w, dir.path(), &dir.path().join("cache")).await;
    // A burst: the three are delivered by concurrent workers.
    let mut ids = Vec::new();
    for rcpt in [
        "bob@t.testing.test",
        "carol@t.testing.test",
        "dave@t.testing.test",
    ] {
        ids.push(relay.send(rcpt).await);
    }
    for id in &ids {
        assert_eq!(relay.settled(id).await, None);
    }
    let got = w.sinks[mx].messages();
    assert_eq!(got.len(), 3, "delivered directly");
    assert!(
        got.iter().all(|m| m.tls_version.is_none()),
        "in clear text, as without a policy"
    );
    assert!(w.sinks[alt].messages().is_empty());
    assert_eq!(
        w.https[0].requests().len(),
        1,
        "one policy fetch for the burst"
    );
    let results = relay.results();
    assert_eq!(
        results
            .iter()
            .filter(|r| r.domain == "t.testing.test" && r.result == "starttls-not-supported")
            .count(),
        3,
        "{results:?}"
    );
    let r = results
        .iter()
        .find(|r| r.domain == "t.testing.test")
        .expect("a TLS result for the domain");
    assert_eq!(r.result, "starttls-not-supported");
    assert_eq!(r.policy_type, "sts");
    assert_eq!(r.mx_host, vec!["mx.t.testing.test".to_string()]);
    assert!(r.policy_string.contains(&"mode: testing".to_string()));
    assert_eq!(r.receiving_mx.as_deref(), Some("mx.t.testing.test"));
    assert_eq!(
        r.receiving_ip.as_deref(),
        Some(&*w.sinks[mx].addr().ip().to_string())
    );
    assert!(r.sending_ip.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_failure_without_a_cached_policy_delivers_as_if_none() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = World::new().await;
    let _alt = w.sink("alt.lab.test", Tls::Valid).await;
    let stranger = TestCa::new("not trusted").unwrap();
    let big = format!(
        "{}{}",
        sts_policy("enforce", &["mx.x"]),
        "# padding\r\n".repeat(7000)
    );
    // (domain, what the policy host does, result type recorded)
    let cases: Vec<(&str, Option<HttpResponse>, Option<&TestCa>, &str)> = vec![
        (
            "notfound.fail.test",
            Some(HttpResponse::with(404, "text/plain", b"")),
            None,
            "sts-policy-fetch-error",
        ),
        (
            "redirect.fail.test",
            Some(HttpResponse::redirect("https://elsewhere.test/")),
            None,
            "sts-policy-fetch-error",
        ),
        (
            "html.fail.test",
            Some(HttpResponse::with(
                200,
                "text/html",
                sts_policy("enforce", &["mx.html.fail.test"]).as_bytes(),
            )),
            None,
            "sts-policy-fetch-error",
        ),
        (
            "big.fail.test",
            Some(HttpResponse::text(&big)),
            None,
            "sts-policy-fetch-error",
        ),
        (
            "invalid.fail.test",
            Some(HttpResponse::text("version: STSv1\r\nmode: strict\r\n")),
            None,
            "sts-policy-invalid",
        ),
        (
            "untrusted.fail.test",
            Some(HttpResponse::text(&sts_policy(
                "enforce",
                &["mx.untrusted.fail.test"],
            ))),
            Some(&stranger),
            "sts-webpki-invalid",
        ),
        (
            "unreachable.fail.test",
            None,
            None,
            "sts-policy-fetch-error",
        ),
    ];
    let mut mx = Vec::new();
    for (domain, response, ca, _) in &cases {
        mx.push(w.mx(domain, 10, &format!("mx.{domain}"), Tls::None).await);
        match response {
            Some(r) => {
                w.sts(domain, "1", r.clone(), *ca).await;
            }
            None => {
                w.dns
                    .add_txt(&format!("_mta-sts.{domain}"), "v=STSv1; id=1")
                    .await
                    .unwrap();
                w.dns
                    .add_a(&format!("mta-sts.{domain}"), World::dead_ip())
                    .await
                    .unwrap();
            }
        }
    }
    let relay = Relay::start(&w, dir.path(), &dir.path().join("cache")).await;
    for (domain, ..) in &cases {
        let id = relay.send(&format!("bob@{domain}")).await;
        assert_eq!(relay.settled(&id).await, None, "{domain}: delivered");
    }
    let results = relay.results();
    for (i, (domain, _, _, result_type)) in cases.iter().enumerate() {
        // RFC 8461 §5.1: no usable policy, so delivered as without one (clear text here).
        let got = w.sinks[mx[i]].messages();
        assert_eq!(got.len(), 1, "{domain}: delivered directly");
        assert_eq!(got[0].tls_version, None, "{domain}");
        assert_eq!(
            delivered_record(&relay, &format!("bob@{domain}")).route,
            "direct"
        );
        let failure = results
            .iter()
            .find(|r| r.domain == *domain && r.result.starts_with("sts-"))
            .unwrap_or_else(|| panic!("{domain}: no policy failure recorded in {results:?}"));
        assert_eq!(failure.result, *result_type, "{domain}");
        assert_eq!(failure.policy_type, "sts");
        assert!(
            results.iter().any(|r| r.domain == *domain
                && r.policy_type == "no-policy-found"
                && r.result == "starttls-not-supported"),
            "{domain}: the session itself is filed under no-policy-found"
        );
        assert!(
            !dir.path()
                .join("cache")
                .join(format!("{domain}.json"))
                .exists(),
            "{domain}: nothing cached"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_failure_with_a_cached_policy_keeps_enforcing_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut w = World::new().await;
    let alt = w.sink("alt.lab.test", Tls::Valid).await;
    let mx = w.mx("cached.test", 10, "mx.cached.test", Tls::None).await;
    let host = w
        .sts(
            "cached.test",
            "1",
            HttpResponse::text(&sts_policy("enforce", &["mx.cached.test"])),
            None,
        )
        .await;

    // First run: the policy is fetched and cached; enforce reroutes.
    let relay = Relay::start(&w, dir.path(), &cache).await;
    let id = relay.send("bob@cached.test").await;
    assert_eq!(relay.settled(&id).await, None);
    assert_eq!(w.sinks[alt].messages().len(), 1);
    drop(relay);

    // The policy host breaks and the id changes: a refresh is due but fails.
    w.https[host].remove(altroute::mta_sts::WELL_KNOWN);
    w.dns
        .remove("_mta-sts.cached.test", hickory_proto_rr_txt())
        .await
        .unwrap();
    w.dns
        .add_txt("_mta-sts.cached.test", "v=STSv1; id=2")
        .await
        .unwrap();

    // Restart on the same cache: the unexpired cached policy still enforces.
    let relay = Relay::start(&w, dir.path(), &cache).await;
    let id = relay.send("carol@cached.test").await;
    assert_eq!(relay.settled(&id).await, None);
    assert_no_mail(
        &w.sinks[mx],
        "MX without STARTTLS under a cached enforce policy",
    );
    assert_eq!(w.sinks[alt].messages().len(), 2);
    assert_eq!(
        delivered_record(&relay, "carol@cached.test").route,
        "alternate"
    );
    // The refresh was tried (in the background) and failed: the cache is unchanged.
    let deadline = tokio::time::Instant::now() + WAIT;
    while w.https[host].requests().len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no refresh attempt");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cached: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.join("cached.test.json")).unwrap()).unwrap();
    assert_eq!(cached["id"], "1");
    // More mail within the refresh interval tries no other refresh: a domain whose id
    // changes on every query (or whose policy host keeps failing) once cost a fetch per
    // message.
    let id = relay.send("erin@cached.test").await;
    assert_eq!(relay.settled(&id).await, None);
    assert_eq!(w.sinks[alt].messages().len(), 3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        w.https[host].requests().len(),
        2,
        "refreshed again within {} s",
        altroute::mta_sts::REFRESH_INTERVAL
    );
    drop(relay);

    // Without the cache, the same failure means no policy: delivered directly.
    let relay = Relay::start(&w, dir.path(), &dir.path().join("empty-cache")).await;
    let id = relay.send("dave@cached.test").await;
    assert_eq!(relay.settled(&id).await, None);
    let got = w.sinks[mx].messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_to, vec!["dave@cached.test".to_string()]);
}

fn hickory_proto_rr_txt() -> hickory_resolver::proto::rr::RecordType {
    hickory_resolver::proto::rr::RecordType::TXT
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mx_not_matching_an_enforce_policy_is_not_used() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = World::new().await;
    let _alt = w.sink("alt.lab.test", Tls::Valid).await;
    // The preferred MX is not in the policy; the second one is (wildcard).
    let evil = w.mx("pat.test", 10, "mx.evil.test", Tls::Valid).await;
    let good = w.mx("pat.test", 20, "mx1.pat.test", Tls::Valid).await;
    w.sts(
        "pat.test",
        "1",
        HttpResponse::text(&sts_policy("enforce", &["*.pat.test"])),
        None,
    )
    .await;
    // Only unlisted MX hosts: nothing is delivered, the mail waits.
    let lonely = w.mx("none.test", 10, "mx.elsewhere.test", Tls::Valid).await;
    w.sts(
        "none.test",
        "1",
        HttpResponse::text(&sts_policy("enforce", &["mx.none.test"])),
        None,
    )
    .await;
    let relay = Relay::start(&w, dir.path(), &dir.path().join("cache")).await;
    let id = relay.send("bob@pat.test").await;
    assert_eq!(relay.settled(&id).await, None);
    assert!(
        w.sinks[evil].sessions().is_empty(),
        "the unlisted MX is not even connected to"
    );
    assert_eq!(w.sinks[good].messages().len(), 1);
    assert_eq!(
        w.sinks[good].messages()[0].tls_version.as_deref(),
        Some("1.3")
    );

    let id = relay.send("bob@none.test").await;
    match relay.settled(&id).await.as_deref() {
        Some([RecipientState::Deferred { reason, .. }]) => {
            assert!(reason.contains("MTA-STS"), "{reason}")
        }
        other => panic!("expected deferred, got {other:?}"),
    }
    assert!(w.sinks[lonely].sessions().is_empty());
    let results = relay.results();
    assert!(
        results.iter().any(|r| r.domain == "pat.test"
            && r.result == "validation-failure"
            && r.receiving_mx.as_deref() == Some("mx.evil.test")),
        "{results:?}"
    );
}
