//! The in-process relay harness shared by the delivery, extension and standards tests: a
//! lab (test CA, DNS server, SMTP sinks on their own loopback addresses, one port) and
//! the delivery workers over a spool with a manual clock, asking a given policy engine.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use altroute::delivery::{self, Delivery, DeliveryMetrics, DeliverySettings};
use altroute::extensions::ExtensionMetrics;
use altroute::policy_engine::PolicyEngine;
use altroute_lab::{
    DnsServer, SinkConfig, SinkMode, SmtpSink, TestCa, Validity, free_port, loopback_ip,
};
use altroute_queue::{
    Envelope, ManualClock, MessageId, RecipientState, RetrySchedule, Spool, SpoolConfig,
};

/// How long a message may take to be handled.
pub(crate) const WAIT: Duration = Duration::from_secs(30);
/// The manual clock's start (Unix seconds).
pub(crate) const START: u64 = 1_750_000_000;

/// How a sink does TLS.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Tls {
    None,
    Valid,
    Expired,
    WrongName,
    Untrusted,
}

pub(crate) struct Lab {
    pub(crate) ca: TestCa,
    pub(crate) dns: DnsServer,
    pub(crate) port: u16,
    pub(crate) sinks: Vec<SmtpSink>,
    /// Sinks started from now on offer SMTPUTF8.
    pub(crate) smtputf8: bool,
    /// Sinks started from now on offer DSN.
    pub(crate) dsn: bool,
}

impl Lab {
    pub(crate) async fn new() -> Lab {
        let ca = TestCa::new("e2e in-process lab root").unwrap();
        let dns = DnsServer::start(SocketAddr::new(loopback_ip().into(), 0))
            .await
            .unwrap();
        let port = free_port(loopback_ip()).unwrap();
        Lab {
            ca,
            dns,
            port,
            sinks: Vec::new(),
            smtputf8: false,
            dsn: false,
        }
    }

    /// A sink named `name` on its own loopback address (A record added), with `tls`.
    pub(crate) async fn sink(&mut self, name: &str, tls: Tls, mode: SinkMode) -> (Ipv4Addr, usize) {
        let ip = loopback_ip();
        let mut config = SinkConfig::new(SocketAddr::new(ip.into(), self.port), name);
        config.mode = mode;
        config.advertise_requiretls = true;
        config.advertise_smtputf8 = self.smtputf8;
        config.advertise_dsn = self.dsn;
        config.starttls = match tls {
            Tls::None => None,
            Tls::Valid => Some(self.ca.issue(&[name], Validity::Valid).unwrap()),
            Tls::Expired => Some(self.ca.issue(&[name], Validity::Expired).unwrap()),
            Tls::WrongName => Some(
                self.ca
                    .issue(&["someone-else.test"], Validity::Valid)
                    .unwrap(),
            ),
            Tls::Untrusted => Some(
                TestCa::new("nobody trusts me")
                    .unwrap()
                    .issue(&[name], Validity::Valid)
                    .unwrap(),
            ),
        }
        .map(|issued| issued.rustls_server_config().unwrap());
        self.sinks.push(SmtpSink::start(config).await.unwrap());
        self.dns.add_a(name, ip).await.unwrap();
        (ip, self.sinks.len() - 1)
    }

    /// `domain MX pref host` plus a sink for host.
    pub(crate) async fn mx(&mut self, domain: &str, host: &str, tls: Tls, mode: SinkMode) -> usize {
        self.dns.add_mx(domain, 10, host).await.unwrap();
        self.sink(host, tls, mode).await.1
    }
}

pub(crate) struct Relay {
    pub(crate) spool: Spool,
    pub(crate) clock: Arc<ManualClock>,
    pub(crate) delivery: Delivery,
    pub(crate) metrics: DeliveryMetrics,
    pub(crate) engine: Arc<PolicyEngine>,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Relay {
    pub(crate) async fn start(lab: &Lab, engine: PolicyEngine) -> Relay {
        Relay::start_with(lab, engine, |_| {}).await
    }

    /// [`Relay::start`] with the lab's delivery settings changed by `adjust`.
    pub(crate) async fn start_with(
        lab: &Lab,
        engine: PolicyEngine,
        adjust: impl FnOnce(&mut DeliverySettings),
    ) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        Relay::start_in_with(lab, engine, dir, async |_| {}, adjust).await
    }

    /// The spool configuration of the harness: retries after 1 min doubling to 10 min,
    /// a queue lifetime of one hour.
    pub(crate) fn spool_config() -> SpoolConfig {
        SpoolConfig::with_retry(RetrySchedule::new(
            Duration::from_secs(60),
            2,
            Duration::from_secs(600),
            Duration::from_secs(3600),
        ))
    }

    /// Like [`start`](Self::start), over the spool in `dir` (which may hold one from an
    /// earlier run, see [`spool_config`](Self::spool_config)), once `prepare` has run on
    /// the opened spool: what it queues is there before delivery starts.
    pub(crate) async fn start_in(
        lab: &Lab,
        engine: PolicyEngine,
        dir: tempfile::TempDir,
        prepare: impl AsyncFnOnce(&Spool),
    ) -> Relay {
        Relay::start_in_with(lab, engine, dir, prepare, |_| {}).await
    }

    /// [`start_in`](Self::start_in) with the delivery settings changed by `adjust`.
    async fn start_in_with(
        lab: &Lab,
        engine: PolicyEngine,
        dir: tempfile::TempDir,
        prepare: impl AsyncFnOnce(&Spool),
        adjust: impl FnOnce(&mut DeliverySettings),
    ) -> Relay {
        let clock = Arc::new(ManualClock::new(START));
        let spool = Spool::open(dir.path(), Relay::spool_config(), clock.clone()).unwrap();
        prepare(&spool).await;
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, lab.ca.root_pem()).unwrap();
        let mut settings = DeliverySettings {
            hostname: "relay.lab.test".into(),
            helo: "relay.lab.test".into(),
            resolver: Some(lab.dns.addr()),
            smtp_port: lab.port,
            ca_file: Some(ca_file),
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(100),
            ..DeliverySettings::default()
        };
        adjust(&mut settings);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let metrics = DeliveryMetrics::new();
        let engine = Arc::new(engine);
        let delivery = delivery::start(
            settings,
            spool.clone(),
            engine.clone(),
            metrics.clone(),
            async {
                let _ = stopped.await;
            },
        )
        .unwrap();
        Relay {
            spool,
            clock,
            delivery,
            metrics,
            engine,
            _dir: dir,
            _stop: stop,
        }
    }

    /// The extension metrics of the engine's chain.
    pub(crate) fn ext(&self) -> &ExtensionMetrics {
        self.engine.extension_metrics()
    }

    pub(crate) async fn send(&self, from: &str, to: &[&str], requiretls: bool) -> MessageId {
        let mut env = Envelope::new(from, to.iter().map(|s| s.to_string()).collect());
        env.requiretls = requiretls;
        let msg = format!(
            "From: <{from}>\r\nTo: <{}>\r\nSubject: e2e\r\nMessage-ID: <{}@e2e>\r\n\r\nconfidential body\r\n",
            to.join(">, <"),
            rand_id()
        );
        self.spool.store(env, msg.into_bytes()).await.unwrap()
    }

    /// Waits until `id` has left the spool (every recipient finished); false if it is
    /// still there after the usual wait. A delivered recipient is recorded as such
    /// before the message is removed: a test that saw the delivery at the sink waits
    /// here for the removal.
    pub(crate) async fn removed(&self, id: &MessageId) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.spool.entry(id).is_some() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// See [`settled`].
    pub(crate) async fn settled(&self, id: &MessageId) -> Option<Vec<RecipientState>> {
        settled(&self.spool, id).await
    }

    /// Sets the clock to `at`, wakes the delivery and waits until the first recipient of
    /// `id` has `attempts` attempts recorded; panics after the usual wait.
    pub(crate) async fn attempt_at(&self, id: &MessageId, at: u64, attempts: u32) {
        self.clock.set(at);
        self.delivery.kick();
        let deadline = tokio::time::Instant::now() + WAIT;
        while self
            .spool
            .entry(id)
            .is_some_and(|e| e.recipients[0].attempts() < attempts)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "attempt {attempts} of {id} not recorded"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until every recipient of `id` is out of `Pending`, and returns the states;
/// `None` when all were delivered (the message is removed, or about to be: delivered is
/// recorded before the removal).
pub(crate) async fn settled(spool: &Spool, id: &MessageId) -> Option<Vec<RecipientState>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match spool.entry(id) {
            None => return None,
            Some(e)
                if e.recipients
                    .iter()
                    .all(|s| matches!(s, RecipientState::Delivered { .. })) =>
            {
                return None;
            }
            Some(e)
                if e.recipients
                    .iter()
                    .all(|s| !matches!(s, RecipientState::Pending)) =>
            {
                return Some(e.recipients);
            }
            Some(_) => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "message {id} not handled in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rand_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The lab policy: `*.strict.test` requires verified TLS, `*.lax.test` encryption only;
/// the alternate secure route (`alt.lab.test` on the lab port) only when `alternate`;
/// `extra` goes into `[policy]`.
pub(crate) fn policy(port: u16, alternate: bool, extra: &str) -> String {
    let alt = if alternate {
        "[alternate_secure_route]\nhost = \"secure-relay\"\n"
    } else {
        ""
    };
    format!(
        r#"
[policy]
name = "e2e"
{extra}

[[hosts]]
name = "secure-relay"
address = "alt.lab.test"
port = {port}

{alt}

[[tls_compliance]]
name = "partners"
domains = ["*.strict.test"]
require_ca_signed = true
validate_hostname = true

[[tls_compliance]]
name = "encrypt-only"
domains = ["*.lax.test"]
"#
    )
}

/// The DSN that reached `sink` (the MX of `sender`) first, checked to go from the null
/// sender to `sender` and to report on `recipient`: its text.
pub(crate) async fn dsn_for(sink: &SmtpSink, sender: &str, recipient: &str) -> String {
    let dsn = sink.wait_for_messages(1, WAIT).await.unwrap();
    assert_eq!(dsn[0].mail_from, "", "a DSN has the null sender");
    assert_eq!(dsn[0].rcpt_to, vec![sender.to_string()]);
    let text = String::from_utf8_lossy(&dsn[0].data).into_owned();
    assert!(
        text.contains(&format!("Final-Recipient: rfc822; {recipient}")),
        "{text}"
    );
    text
}
