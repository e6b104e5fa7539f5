//! `altroute queue list | show | retry | bounce` (issue 9) against a running relay with
//! deferred mail, and the metrics an operator scrapes from it.
//!
//! The relay is the real binary with delivery on, pointed at a lab DNS. The MX of
//! `down.test` has an address but nothing listens there at first (connection refused:
//! deferred); a retry after the sink comes up delivers; a bounce queues a DSN that the
//! sender's MX (a lab sink) receives. The retry delay is an hour, so nothing moves unless
//! an operator command moves it.

use std::io::Read as _;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use altroute_lab::{DnsServer, SinkConfig, SmtpSink, free_port, loopback_ip};
use serde_json::Value;

use crate::support::SmtpConn;

const TOKEN: &str = "queue-e2e-token";
const WAIT: Duration = Duration::from_secs(30);

struct World {
    rt: tokio::runtime::Runtime,
    dns: DnsServer,
    port: u16,
    /// Where mx.down.test is (no sink at first).
    down: SocketAddr,
    /// The sender's MX (receives DSNs).
    corp: SmtpSink,
}

impl World {
    fn new() -> World {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dns = rt
            .block_on(DnsServer::start(SocketAddr::new(loopback_ip().into(), 0)))
            .unwrap();
        let port = free_port(loopback_ip()).unwrap();
        let down_ip = loopback_ip();
        let corp_ip = loopback_ip();
        rt.block_on(async {
            dns.add_mx("down.test", 10, "mx.down.test").await.unwrap();
            dns.add_a("mx.down.test", down_ip).await.unwrap();
            dns.add_mx("corp.example", 10, "mx.corp.example")
                .await
                .unwrap();
            dns.add_a("mx.corp.example", corp_ip).await.unwrap();
        });
        let corp = rt
            .block_on(SmtpSink::start(SinkConfig::new(
                SocketAddr::new(corp_ip.into(), port),
                "mx.corp.example",
            )))
            .unwrap();
        World {
            rt,
            dns,
            port,
            down: SocketAddr::new(down_ip.into(), port),
            corp,
        }
    }

    /// Bring mx.down.test up.
    fn start_down_sink(&self) -> SmtpSink {
        self.rt
            .block_on(SmtpSink::start(SinkConfig::new(self.down, "mx.down.test")))
            .unwrap()
    }
}

struct Relay {
    child: Option<Child>,
    dir: tempfile::TempDir,
    smtp: SocketAddr,
    admin: SocketAddr,
    config: PathBuf,
}

impl Relay {
    fn start(world: &World) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let ip = loopback_ip();
        let smtp = SocketAddr::new(IpAddr::V4(ip), free_port(ip).unwrap());
        let admin = SocketAddr::new(IpAddr::V4(ip), free_port(ip).unwrap());
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, "[policy]\nname = \"queue-e2e\"\n").unwrap();
        let config = dir.path().join("altroute.toml");
        std::fs::write(
            &config,
            format!(
                r#"[server]
hostname = "relay.test"
listen = ["{smtp}"]

[relay]
allow_networks = ["127.0.0.0/8"]

[spool]
dir = {spool:?}

[delivery]
resolver = "{dns}"
smtp_port = {port}
helo = "relay.test"
connect_timeout_secs = 5
retry_initial_secs = 3600
retry_max_secs = 3600

[policy]
file = {policy:?}
audit_log = {audit:?}

[admin]
listen = "{admin}"
token = "{TOKEN}"
"#,
                spool = dir.path().join("spool").display().to_string(),
                dns = world.dns.addr(),
                port = world.port,
                policy = policy.display().to_string(),
                audit = dir.path().join("audit.jsonl").display().to_string(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("relay.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_altroute"))
            .args(["serve", "-c"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut relay = Relay {
            child: Some(child),
            dir,
            smtp,
            admin,
            config,
        };
        relay.wait_ready();
        relay
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                self.child = None;
                panic!("altroute exited early ({status}):\n{}", self.log());
            }
            if TcpStream::connect_timeout(&self.smtp, Duration::from_millis(200)).is_ok()
                && self.get("/health").0.contains("200")
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "relay not ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("relay.log")).unwrap_or_default()
    }

    /// Plain GET on the admin endpoint: (status line, body); empty when unreachable.
    fn get(&self, path: &str) -> (String, String) {
        use std::io::Write as _;
        let Ok(mut s) = TcpStream::connect(self.admin) else {
            return (String::new(), String::new());
        };
        let _ = write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (
            head.lines().next().unwrap_or("").to_owned(),
            body.to_owned(),
        )
    }

    /// `altroute queue ARGS -c CONFIG`: (exit code, stdout, stderr).
    fn queue(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_altroute"))
            .arg("queue")
            .args(args)
            .arg("-c")
            .arg(&self.config)
            .env_remove("ALTROUTE_ADMIN_TOKEN")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `altroute queue ARGS --json`, exit code and parsed output.
    fn queue_json(&self, args: &[&str]) -> (i32, Value) {
        let mut all = args.to_vec();
        all.push("--json");
        let (code, out, err) = self.queue(&all);
        let v = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("queue {args:?}: not JSON ({e}): {out}\n{err}"));
        (code, v)
    }

    /// Waits until `queue list` shows `n` messages, all deferred after one attempt.
    fn wait_deferred(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let (code, v) = self.queue_json(&["list"]);
            assert_eq!(code, 0, "{v}");
            let msgs = v["messages"].as_array().cloned().unwrap_or_default();
            if msgs.len() == n
                && msgs
                    .iter()
                    .all(|m| m["state"] == "deferred" && m["attempts"] == 1)
            {
                return msgs;
            }
            assert!(
                Instant::now() < deadline,
                "queue never showed {n} deferred messages: {v:#}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn send(world: &World, relay: &Relay, rcpt: &str) {
    world.rt.block_on(async {
        let mut c = SmtpConn::connect(relay.smtp, None).await.unwrap();
        let msg = format!(
            "From: <sender@corp.example>\r\nTo: <{rcpt}>\r\nSubject: queue e2e\r\nMessage-ID: <{rcpt}.queue-e2e>\r\n\r\nbody\r\n"
        );
        let (code, text) = c
            .send("sender@corp.example", &[rcpt], msg.as_bytes())
            .await
            .unwrap();
        assert_eq!(code, 250, "{rcpt}: {text}");
    });
}

#[test]
fn queue_commands_on_deferred_mail() {
    let world = World::new();
    let relay = Relay::start(&world);
    send(&world, &relay, "a@down.test");
    send(&world, &relay, "b@down.test");
    let msgs = relay.wait_deferred(2);
    let id_of = |rcpt: &str| -> String {
        msgs.iter()
            .find(|m| {
                m["message_id"]
                    .as_str()
                    .is_some_and(|mid| mid.contains(rcpt))
            })
            .and_then(|m| m["id"].as_str())
            .unwrap_or_else(|| panic!("no message for {rcpt}: {msgs:#?}"))
            .to_string()
    };
    let (a, b) = (id_of("a@down.test"), id_of("b@down.test"));
    for m in &msgs {
        assert_eq!(m["sender"], "sender@corp.example");
        assert_eq!(m["recipients"], 1);
        assert_eq!(m["open_recipients"], 1);
        assert!(m["next_attempt"].as_u64().unwrap() > m["received_at"].as_u64().unwrap());
        assert!(m["last_error"].as_str().unwrap().contains("4.4.1"), "{m:#}");
    }

    // Human list: one line per message with its state and the last error.
    let (code, text, _) = relay.queue(&["list"]);
    assert_eq!(code, 0);
    assert!(text.contains(&a) && text.contains(&b), "{text}");
    assert!(text.contains("deferred"), "{text}");
    assert!(text.contains("last error: 451 4.4.1"), "{text}");
    assert!(text.contains("2 message(s)"), "{text}");

    // Show: the recipient's details.
    let (code, v) = relay.queue_json(&["show", &a]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["id"], a.as_str());
    let r = &v["recipients"][0];
    assert_eq!(r["address"], "a@down.test");
    assert_eq!(r["state"], "deferred");
    assert_eq!(r["attempts"], 1);
    assert!(
        r["last_error"].as_str().unwrap().contains("mx.down.test"),
        "{r:#}"
    );
    let (code, text, _) = relay.queue(&["show", &a]);
    assert_eq!(code, 0);
    assert!(text.contains("a@down.test  deferred  attempts=1"), "{text}");

    // Unknown and malformed ids: exit 1, with a JSON error for scripts.
    let unknown = "00000000000000000000000";
    let (code, v) = relay.queue_json(&["show", unknown]);
    assert_eq!(code, 1);
    assert!(
        v["error"].as_str().unwrap().contains("not in the queue"),
        "{v}"
    );
    for args in [
        vec!["retry", unknown],
        vec!["bounce", unknown],
        vec!["show", "zzz"],
    ] {
        let (code, _, err) = relay.queue(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
    }
    // Without the token, changes are refused (401): exit 1.
    let out = Command::new(env!("CARGO_BIN_EXE_altroute"))
        .args(["queue", "retry", "--all", "--admin"])
        .arg(format!("http://{}", relay.admin))
        .env_remove("ALTROUTE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("bearer token"));

    // Retry once the MX is up: delivered, and gone from the queue.
    let down = world.start_down_sink();
    let (code, v) = relay.queue_json(&["retry", &a]);
    assert_eq!((code, v["retried"].as_u64()), (0, Some(1)), "{v}");
    let got = world
        .rt
        .block_on(down.wait_for_messages(1, WAIT))
        .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
    assert_eq!(got[0].rcpt_to, vec!["a@down.test".to_string()]);
    let deadline = Instant::now() + WAIT;
    while relay.queue(&["show", &a]).0 != 1 {
        assert!(Instant::now() < deadline, "{a} never left the queue");
        std::thread::sleep(Duration::from_millis(50));
    }
    // b was not retried: still deferred, not delivered.
    assert_eq!(down.messages().len(), 1);
    assert_eq!(relay.queue_json(&["show", &b]).1["state"], "deferred");

    // Bounce: the recipient fails for good, a DSN goes to the sender, the message goes.
    let (code, v) = relay.queue_json(&["bounce", &b]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["bounced"], serde_json::json!(["b@down.test"]));
    assert_eq!(v["removed"], true);
    assert!(v["dsn"].is_string(), "{v:#}");
    let dsn = world
        .rt
        .block_on(world.corp.wait_for_messages(1, WAIT))
        .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
    assert_eq!(dsn[0].mail_from, "");
    assert_eq!(dsn[0].rcpt_to, vec!["sender@corp.example".to_string()]);
    let body = String::from_utf8_lossy(&dsn[0].data);
    assert!(body.contains("report-type=delivery-status"), "{body}");
    assert!(
        body.contains("Final-Recipient: rfc822; b@down.test"),
        "{body}"
    );
    assert!(body.contains("Status: 5.0.0"), "{body}");
    assert_eq!(relay.queue(&["show", &b]).0, 1);
    assert_eq!(
        down.messages().len(),
        1,
        "the bounced message was delivered"
    );

    // Retry --all on what is left (nothing deferred): fine, 0.
    let (code, v) = relay.queue_json(&["retry", "--all"]);
    assert_eq!((code, v["retried"].as_u64()), (0, Some(0)), "{v}");
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, v) = relay.queue_json(&["list"]);
        if v["count"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "queue not empty: {v:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, text, _) = relay.queue(&["list"]);
    assert_eq!((code, text.trim()), (0, "queue is empty"));

    // The operator actions are in the log with the queue id, and every decision line of
    // an attempt carries the queue id and the domain (the delivery span).
    let log = relay.log();
    assert!(
        log.lines().any(
            |l| l.contains(&format!("delivery{{queue_id={a} domain=down.test}}"))
                && l.contains("rule=")
                && l.contains("policy_version=")
        ),
        "{log}"
    );
    assert!(
        log.contains("bounced by the operator") && log.contains(&format!("queue_id={b}")),
        "{log}"
    );
}

/// Label names allowed on altroute metrics: each with a handful of values. A new label
/// must be added here and to docs/operations.md on purpose.
const LABELS: &[&str] = &[
    "reason",
    "state",
    "kind",
    "phase",
    "route",
    "result",
    "version",
    "extension",
];

/// Checks one scrape against the Prometheus naming conventions; returns the families.
fn check_conventions(text: &str) -> Vec<(String, String)> {
    let mut families: Vec<(String, String)> = Vec::new();
    let mut helped = Vec::new();
    let mut problems = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            families.push((name.to_string(), kind.to_string()));
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.push(rest.split_once(' ').map_or(rest, |(n, _)| n).to_string());
        }
    }
    assert!(!families.is_empty(), "no metrics in:\n{text}");
    let snake = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !s.starts_with('_')
            && !s.contains("__")
    };
    for (name, kind) in &families {
        if !name.starts_with("altroute_") || !snake(name) {
            problems.push(format!("{name}: not snake_case with the altroute_ prefix"));
        }
        if !helped.contains(name) {
            problems.push(format!("{name}: no HELP"));
        }
        for bad in [
            "_milliseconds",
            "_millis",
            "_ms",
            "_minutes",
            "_hours",
            "_kilobytes",
            "_megabytes",
            "_percent",
        ] {
            if name.ends_with(bad) || name.contains(&format!("{bad}_")) {
                problems.push(format!("{name}: not a base unit ({bad})"));
            }
        }
        for unit in ["bytes", "seconds"] {
            if name.contains(unit) && !name.ends_with(&format!("_{unit}")) {
                problems.push(format!("{name}: the unit `{unit}` must be the suffix"));
            }
        }
        match kind.as_str() {
            "counter" => {}
            "gauge" | "info" | "histogram" | "summary" | "stateset" | "unknown" => {
                if name.ends_with("_total") {
                    problems.push(format!("{name}: a {kind} must not end in _total"));
                }
            }
            other => problems.push(format!("{name}: unexpected type {other}")),
        }
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, _value) = line.rsplit_once(' ').unwrap();
        let (sample, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let family = families
            .iter()
            .filter(|(f, _)| sample.starts_with(f.as_str()))
            .max_by_key(|(f, _)| f.len());
        let Some((fname, kind)) = family else {
            problems.push(format!("{sample}: sample without a TYPE"));
            continue;
        };
        if kind == "counter"
            && sample != format!("{fname}_total")
            && sample != format!("{fname}_created")
        {
            problems.push(format!("{sample}: counter samples must end in _total"));
        }
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (label, _) = pair.split_once('=').unwrap();
            if !snake(label) || !LABELS.contains(&label) {
                problems.push(format!(
                    "{sample}: label `{label}` is not one of the documented low-cardinality labels {LABELS:?}"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "metric naming problems:\n  {}\n\nscrape:\n{text}",
        problems.join("\n  ")
    );
    families
}

#[test]
fn queue_metrics_follow_prometheus_conventions() {
    let world = World::new();
    let relay = Relay::start(&world);
    // Some traffic first, so that labelled families have series: one delivered (to the
    // sender's MX), one deferred (down.test is down).
    send(&world, &relay, "someone@corp.example");
    send(&world, &relay, "c@down.test");
    world
        .rt
        .block_on(world.corp.wait_for_messages(1, WAIT))
        .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
    relay.wait_deferred(1);

    let (status, text) = relay.get("/metrics");
    assert!(status.contains("200"), "{status}");
    let families = check_conventions(&text);
    let names: Vec<&str> = families.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "altroute_smtp_sessions",
        "altroute_messages_accepted",
        "altroute_messages_accepted_bytes",
        "altroute_spool_messages",
        "altroute_spool_bytes",
        "altroute_spool_oldest_message_age_seconds",
        "altroute_spool_fsyncs",
        "altroute_spool_commit_batches",
        "altroute_spool_corrupt_moved",
        "altroute_policy_info",
        "altroute_decisions",
        "altroute_tls_results",
        "altroute_recipients_delivered",
        "altroute_recipients_deferred",
        "altroute_recipients_bounced",
        "altroute_dsn_messages",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from:\n{text}"
        );
    }
    // Values an operator would look at.
    for expected in [
        "altroute_recipients_delivered_total{route=\"direct\"} 1",
        "altroute_recipients_deferred_total 1",
        "altroute_spool_messages{state=\"queued\"} 1",
        "altroute_messages_accepted_total 2",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
    assert!(
        text.contains("# TYPE altroute_spool_fsyncs counter"),
        "{text}"
    );
    assert!(
        text.contains("altroute_policy_info{version=\"sha256:"),
        "{text}"
    );

    // The checker itself rejects what the conventions forbid.
    for bad in [
        "# TYPE altroute_latency_ms gauge\n# HELP altroute_latency_ms x\naltroute_latency_ms 1\n",
        "# TYPE altroute_things counter\n# HELP altroute_things x\naltroute_things 1\n",
        "# TYPE altroute_sent_total gauge\n# HELP altroute_sent_total x\naltroute_sent_total 1\n",
        "# TYPE altroute_x counter\n# HELP altroute_x x\naltroute_x_total{recipient=\"a@b\"} 1\n",
        "# TYPE smtp_x gauge\n# HELP smtp_x x\nsmtp_x 1\n",
    ] {
        let caught = std::panic::catch_unwind(|| check_conventions(bad)).is_err();
        assert!(caught, "the checker accepted:\n{bad}");
    }
}
