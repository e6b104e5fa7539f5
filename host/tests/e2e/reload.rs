//! Policy hot-reload acceptance tests (issue 6), against the real `altroute` binary.
//!
//! The world: a lab DNS server, an MX for the test domains that does not offer STARTTLS
//! (`mx.reload.test`) and an alternate secure host with a valid certificate from a test
//! CA that the relay trusts (`alt.lab.test`). Two policies route `reload.test`
//! differently: "opportunistic" delivers it directly in clear text, "tls-required"
//! requires TLS, so the verdict after the MX's EHLO reroutes it to the alternate host.
//! Which sink got a message therefore shows which version decided its verdict, and the
//! relay's decision log names that version.
//!
//! Needs Debian's `postfix` (for `smtp-source`).

use std::collections::{BTreeMap, HashSet};
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use altroute_lab::{DnsServer, SinkConfig, SmtpSink, TestCa, Validity, free_port, loopback_ip};

use crate::support::{SmtpConn, require_tool, signal};

const TOKEN: &str = "reload-e2e-token";
const WAIT: Duration = Duration::from_secs(120);

struct World {
    ca: TestCa,
    dns: DnsServer,
    port: u16,
    /// MX of every test domain; no STARTTLS.
    mx: SmtpSink,
    /// The alternate secure host; valid TLS.
    alt: SmtpSink,
}

impl World {
    async fn new() -> World {
        let ca = TestCa::new("e2e reload root").unwrap();
        let dns = DnsServer::start(SocketAddr::new(loopback_ip().into(), 0))
            .await
            .unwrap();
        let port = free_port(loopback_ip()).unwrap();
        let mx_ip = loopback_ip();
        let mx = SmtpSink::start(SinkConfig::new(
            SocketAddr::new(mx_ip.into(), port),
            "mx.reload.test",
        ))
        .await
        .unwrap();
        dns.add_a("mx.reload.test", mx_ip).await.unwrap();
        for domain in ["reload.test", "plain.test", "shadowed.test"] {
            dns.add_mx(domain, 10, "mx.reload.test").await.unwrap();
        }
        let alt_ip = loopback_ip();
        let mut config = SinkConfig::new(SocketAddr::new(alt_ip.into(), port), "alt.lab.test");
        config.starttls = Some(
            ca.issue(&["alt.lab.test"], Validity::Valid)
                .unwrap()
                .rustls_server_config()
                .unwrap(),
        );
        let alt = SmtpSink::start(config).await.unwrap();
        dns.add_a("alt.lab.test", alt_ip).await.unwrap();
        World {
            ca,
            dns,
            port,
            mx,
            alt,
        }
    }

    /// A policy where the `strict` domains require TLS. Every policy embeds a test.
    fn policy(&self, name: &str, strict: &[&str], extra: &str) -> String {
        let domains: Vec<String> = strict.iter().map(|d| format!("{d:?}")).collect();
        format!(
            r#"
[policy]
name = "{name}"

[[hosts]]
name = "secure-relay"
address = "alt.lab.test"
port = {port}

[alternate_secure_route]
host = "secure-relay"

[[tls_compliance]]
name = "strict"
domains = [{domains}]

[[tests]]
name = "strict domain without STARTTLS takes the alternate route"
query = {{ phase = "verdict", sender = "a@corp.example", recipient = "b@{first}", mx = "mx.x", starttls = "absent" }}
expect = {{ route = "alternate", host = "secure-relay" }}
{extra}
"#,
            port = self.port,
            domains = domains.join(", "),
            first = strict[0],
        )
    }

    /// Delivers `reload.test` directly in clear text.
    fn opportunistic(&self) -> String {
        self.policy("opportunistic", &["unused.example"], "")
    }

    /// Requires TLS for `reload.test`: rerouted to the alternate host.
    fn tls_required(&self) -> String {
        self.policy("tls-required", &["reload.test"], "")
    }
}

/// The version a policy compiles to.
fn version_of(text: &str) -> String {
    altroute_policy::compile(text).unwrap().policy.version
}

/// A relay process with delivery, file watch and the admin API with a token.
struct Relay {
    child: Option<Child>,
    dir: tempfile::TempDir,
    smtp: SocketAddr,
    admin: SocketAddr,
    policy: PathBuf,
    module: Option<PathBuf>,
    audit: PathBuf,
}

impl Relay {
    fn start(world: &World, policy: &str, module: Option<&[u8]>) -> Relay {
        Relay::start_as(world, policy, module, None)
    }

    /// [`Relay::start`], the process run as user `uid` without any capability (through
    /// `setpriv`) when given.
    fn start_as(world: &World, policy: &str, module: Option<&[u8]>, uid: Option<u32>) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let ip = loopback_ip();
        let smtp = SocketAddr::new(IpAddr::V4(ip), free_port(ip).unwrap());
        let admin = SocketAddr::new(IpAddr::V4(ip), free_port(ip).unwrap());
        // The policy lives in its own directory, as a ConfigMap mount would.
        let policy_dir = dir.path().join("policy");
        std::fs::create_dir(&policy_dir).unwrap();
        let policy_path = policy_dir.join("policy.toml");
        std::fs::write(&policy_path, policy).unwrap();
        let module_path = module.map(|bytes| {
            let p = policy_dir.join("module.wasm");
            std::fs::write(&p, bytes).unwrap();
            p
        });
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, world.ca.root_pem()).unwrap();
        let audit = dir.path().join("audit.jsonl");
        let module_line = module_path
            .as_ref()
            .map(|p| format!("module = {:?}\n", p.display().to_string()))
            .unwrap_or_default();
        let config = format!(
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
ca_file = {ca:?}
helo = "relay.test"
connect_timeout_secs = 5
retry_initial_secs = 2
retry_max_secs = 4

[policy]
file = {policy:?}
{module_line}audit_log = {audit:?}
history = 10
watch = true

[admin]
listen = "{admin}"
token = "{TOKEN}"
"#,
            spool = dir.path().join("spool").display().to_string(),
            dns = world.dns.addr(),
            port = world.port,
            ca = ca_file.display().to_string(),
            policy = policy_path.display().to_string(),
            audit = audit.display().to_string(),
        );
        let config_path = dir.path().join("altroute.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("relay.log")).unwrap();
        let mut command = match uid {
            None => Command::new(env!("CARGO_BIN_EXE_altroute")),
            Some(uid) => {
                use std::os::unix::fs::PermissionsExt;
                // The relay's own directories writable by it; the policy stays root's.
                std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
                    .unwrap();
                std::fs::create_dir(dir.path().join("spool")).unwrap();
                std::fs::set_permissions(
                    dir.path().join("spool"),
                    std::fs::Permissions::from_mode(0o777),
                )
                .unwrap();
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                    "--inh-caps=-all",
                    "--bounding-set=-all",
                    env!("CARGO_BIN_EXE_altroute"),
                ]);
                c
            }
        };
        let child = command
            .arg("serve")
            .arg("-c")
            .arg(&config_path)
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
            policy: policy_path,
            module: module_path,
            audit,
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
            let up = TcpStream::connect_timeout(&self.smtp, Duration::from_millis(200)).is_ok()
                && TcpStream::connect_timeout(&self.admin, Duration::from_millis(200)).is_ok();
            // The ports are bound before the policy engine loads; the admin endpoint answers
            // once the reloader (and the file watch) are running.
            if up {
                self.status();
                return;
            }
            assert!(
                Instant::now() < deadline,
                "relay not ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("relay.log")).unwrap_or_default();
        strip_ansi(&text)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::support::signal(child.id(), "TERM");
            let _ = child.wait();
        }
    }

    /// One admin request; returns (status code, body).
    fn admin(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        who: Option<&str>,
        body: &[u8],
    ) -> (u16, String) {
        let mut s = TcpStream::connect(self.admin).unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(t) = token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(w) = who {
            head.push_str(&format!("x-altroute-who: {w}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let out = String::from_utf8_lossy(&out).into_owned();
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, body.to_owned())
    }

    /// `GET /policy` as JSON.
    fn status(&self) -> Value {
        let (code, body) = self.admin("GET", "/policy", Some(TOKEN), None, b"");
        assert_eq!(code, 200, "GET /policy: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET /policy {e}: {body}"))
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn active(&self) -> String {
        self.status()["active"]["version"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Replaces the policy file atomically (write a temp file, rename over); returns the
    /// time of the rename.
    fn replace_policy(&self, text: &str) -> SystemTime {
        replace_file(&self.policy, text.as_bytes())
    }

    fn wait_active(&self, version: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.active() != version {
            assert!(
                Instant::now() < deadline,
                "version {version} never became active; status {}\n{}",
                self.status(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn audit_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn replace_file(path: &Path, bytes: &[u8]) -> SystemTime {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    let at = SystemTime::now();
    std::fs::rename(&tmp, path).unwrap();
    at
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One `altroute::decision` log line.
#[derive(Debug, Clone)]
struct DecisionLine {
    time: SystemTime,
    recipient: String,
    version: String,
    route: String,
    hop: String,
    outcome: String,
}

/// `key=value` from a log line (quotes stripped); values here contain no spaces.
fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"').to_string())
}

fn decisions(log: &str) -> Vec<DecisionLine> {
    log.lines()
        .filter(|l| l.contains("altroute::decision"))
        .filter_map(|l| {
            Some(DecisionLine {
                time: parse_time(l.split_whitespace().next()?)?,
                recipient: field(l, "recipient")?,
                version: field(l, "policy_version")?,
                route: field(l, "route").unwrap_or_default(),
                hop: field(l, "hop").unwrap_or_default(),
                outcome: field(l, "outcome").unwrap_or_default(),
            })
        })
        .collect()
}

/// `2026-11-25T12:31:51.123456Z` (tracing's default timestamp).
fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<u64>());
    let (h, min, sec) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    let nanos: u64 = format!("{frac:0<9}")[..9].parse().ok()?;
    Some(
        UNIX_EPOCH
            + Duration::from_secs(days * 86_400 + h * 3600 + min * 60 + sec)
            + Duration::from_nanos(nanos),
    )
}

/// The lab (DNS, sinks) runs on this runtime's workers; the test thread may block.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn send(relay: &Relay, rcpts: &[&str]) {
    let mut c = SmtpConn::connect(relay.smtp, None).await.unwrap();
    for rcpt in rcpts {
        let msg = format!(
            "From: <sender@corp.example>\r\nTo: <{rcpt}>\r\nSubject: reload e2e\r\nMessage-ID: <{rcpt}>\r\n\r\nbody\r\n"
        );
        let (code, text) = c
            .send("sender@corp.example", &[rcpt], msg.as_bytes())
            .await
            .unwrap();
        assert_eq!(code, 250, "{rcpt}: {text}");
    }
}

fn wait_sinks(world: &World, total: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let n = world.mx.messages().len() + world.alt.messages().len();
        if n >= total {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} of {total} messages arrived"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn recipients(sink: &SmtpSink) -> Vec<String> {
    sink.messages()
        .into_iter()
        .flat_map(|m| m.rcpt_to)
        .collect()
}

/// (a) 50 activations alternating two policies under load: no message lost, no 4xx,
/// every message routed by the version that decided its verdict.
#[test]
fn alternating_activations_under_load_lose_nothing() {
    require_tool("/usr/sbin/smtp-source", "postfix");
    let rt = runtime();
    let world = rt.block_on(World::new());
    let (a, b) = (world.opportunistic(), world.tls_required());
    let (va, vb) = (version_of(&a), version_of(&b));
    let relay = Relay::start(&world, &a, None);
    assert_eq!(relay.active(), va);

    // The issue asks for 5,000 messages under load.
    const MESSAGES: usize = 5000;
    let source = Command::new("/usr/sbin/smtp-source")
        .args(["-s", "4", "-m", &MESSAGES.to_string(), "-N", "-l", "200"])
        .args(["-M", "client.test", "-f", "sender@corp.example"])
        .args(["-t", "u@reload.test"])
        .arg(format!("{}:{}", relay.smtp.ip(), relay.smtp.port()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // 50 activations by file replacement, alternating, spread over the load (about 1 s
    // apart); each waits until it is active.
    let mut source = source;
    let mut renames: Vec<(SystemTime, String)> = Vec::new();
    let (mut under_load, mut delivering) = (0, 0);
    for i in 0..50 {
        let (text, version) = if i % 2 == 0 { (&b, &vb) } else { (&a, &va) };
        let at = relay.replace_policy(text);
        renames.push((at, version.clone()));
        relay.wait_active(version);
        if source.try_wait().unwrap().is_none() {
            under_load += 1;
        }
        if world.mx.messages().len() + world.alt.messages().len() < MESSAGES {
            delivering += 1;
        }
        // The first 20 while messages are submitted, the rest spread over the delivery.
        let pause = if i < 20 { 100 } else { 1000 };
        std::thread::sleep(Duration::from_millis(pause));
    }
    // What the test is about: swaps while mail is submitted and while it is delivered.
    assert!(
        under_load > 0 && delivering > 0,
        "no activation under load: {under_load} while smtp-source ran, {delivering} while delivering"
    );
    let output = source.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "smtp-source failed: {stderr}");
    assert!(
        !stderr.contains("rror") && !stderr.contains(" 4"),
        "smtp-source saw errors: {stderr}"
    );

    wait_sinks(&world, MESSAGES);
    // Let the last decision lines reach the log.
    std::thread::sleep(Duration::from_millis(500));
    let log = relay.log();
    let lines = decisions(&log);
    let direct: HashSet<String> = recipients(&world.mx).into_iter().collect();
    let via_alt: HashSet<String> = recipients(&world.alt).into_iter().collect();
    assert_eq!(
        direct.len() + via_alt.len(),
        MESSAGES,
        "duplicates or losses: {} direct, {} via the alternate host",
        direct.len(),
        via_alt.len()
    );
    assert!(direct.is_disjoint(&via_alt), "a message reached both sinks");

    // The decision at the MX (hop direct) of each recipient, by version.
    let mut at_mx: BTreeMap<&str, &DecisionLine> = BTreeMap::new();
    for l in &lines {
        assert!(
            l.outcome != "deferred" && l.route != "defer" && l.outcome != "bounced",
            "a recipient was deferred or bounced: {l:?}"
        );
        if l.hop == "direct" && (l.outcome == "delivered" || l.outcome == "rerouted") {
            assert!(
                at_mx.insert(&l.recipient, l).is_none(),
                "two verdicts at the MX for {}",
                l.recipient
            );
        }
    }
    for r in &direct {
        let l = at_mx
            .get(r.as_str())
            .unwrap_or_else(|| panic!("no decision for {r}"));
        assert_eq!(
            (l.version.as_str(), l.outcome.as_str()),
            (va.as_str(), "delivered"),
            "{r}"
        );
    }
    for r in &via_alt {
        let l = at_mx
            .get(r.as_str())
            .unwrap_or_else(|| panic!("no decision for {r}"));
        assert_eq!(
            (l.version.as_str(), l.outcome.as_str()),
            (vb.as_str(), "rerouted"),
            "{r}"
        );
    }

    // Time from each rename to the first decision with the new version (printed only).
    let mut delays: Vec<Duration> = renames
        .iter()
        .filter_map(|(at, v)| {
            lines
                .iter()
                .filter(|l| &l.version == v && l.time >= *at)
                .map(|l| l.time.duration_since(*at).unwrap_or_default())
                .min()
        })
        .collect();
    delays.sort();
    let status = relay.status();
    println!(
        "reload under load: {MESSAGES} messages, {} direct (v {va}), {} via the alternate host (v {vb}); \
         {} activations ({under_load} while smtp-source ran, {delivering} while messages were being delivered); rename→first decision on the new version: median {:?}, max {:?} ({} measured)",
        direct.len(),
        via_alt.len(),
        status["activations"],
        delays.get(delays.len() / 2),
        delays.last(),
        delays.len()
    );
    assert_eq!(status["activations"], 50);
}

/// (b) A broken module, a policy that does not compile and one whose embedded test fails
/// are refused (GET /policy, audit log) while mail keeps flowing on the old version.
#[test]
fn broken_candidates_are_refused_while_mail_flows() {
    let rt = runtime();
    let world = rt.block_on(World::new());
    let a = world.opportunistic();
    let va = version_of(&a);
    let relay = Relay::start(&world, &a, Some(altroute_modules::POLICY));
    let mut sent = 0;

    // 1. A broken module, through the file watch.
    let module = relay.module.clone().unwrap();
    replace_file(&module, b"\0asm\x01\0\0\0 this is not a module");
    wait_rejections(&relay, 1);
    rt.block_on(send(&relay, &["b1@reload.test"]));
    sent += 1;

    // 2. A policy that does not compile, through the admin API: refused with the reasons.
    let (code, body) = relay.admin(
        "POST",
        "/policy",
        Some(TOKEN),
        Some("alice"),
        b"[[hosts]]\nname = \"x\"\n",
    );
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("address"), "{body}");
    wait_rejections(&relay, 2);
    rt.block_on(send(&relay, &["b2@reload.test"]));
    sent += 1;

    // 3. A policy whose embedded test fails, through the file watch (module restored first:
    //    the same module as before is not a change of its own).
    replace_file(&module, altroute_modules::POLICY);
    let failing = world.policy(
        "failing",
        &["reload.test"],
        r#"
[[tests]]
name = "wrong on purpose"
query = { phase = "plan", sender = "a@corp.example", recipient = "x@plain.test" }
expect = { tls_required = true }
"#,
    );
    relay.replace_policy(&failing);
    wait_rejections(&relay, 3);
    rt.block_on(send(&relay, &["b3@reload.test"]));
    sent += 1;

    wait_sinks(&world, sent);
    let status = relay.status();
    assert_eq!(status["active"]["version"], va.as_str(), "{status}");
    let reasons = status["last_rejection"]["reasons"].to_string();
    assert!(reasons.contains("wrong on purpose"), "{status}");
    // Mail flowed on the old version: direct, decided by va.
    assert_eq!(recipients(&world.mx).len(), sent);
    // A decision line is written once the delivery is over, which the sink can see first.
    let rcpts = ["b1@reload.test", "b2@reload.test", "b3@reload.test"];
    let logged = |lines: &[DecisionLine]| {
        rcpts
            .iter()
            .all(|r| lines.iter().any(|l| l.recipient == *r))
    };
    let mut lines = decisions(&relay.log());
    for _ in 0..100 {
        if logged(&lines) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        lines = decisions(&relay.log());
    }
    assert!(logged(&lines), "a decision line is missing: {lines:?}");
    for l in lines {
        assert_eq!(l.version, va, "{l:?}");
    }
    let audit = relay.audit_lines();
    let refused: Vec<&Value> = audit.iter().filter(|l| l["action"] == "reject").collect();
    assert_eq!(refused.len(), 3, "{audit:?}");
    assert_eq!(refused[0]["who"], "file watch");
    assert_eq!(refused[1]["who"], "admin:alice");
    for r in &refused {
        assert!(!r["reasons"].as_array().unwrap().is_empty(), "{r}");
        assert_eq!(r["old_version"], va.as_str());
    }
    println!("refused: {}", serde_json::to_string(&refused).unwrap());
}

fn wait_rejections(relay: &Relay, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.status()["rejections"].as_u64() != Some(n) {
        assert!(
            Instant::now() < deadline,
            "{n} rejections expected: {}\n{}",
            relay.status(),
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (c) Shadow mode on a policy that differs for one domain reports exactly the decisions
/// that differ.
#[test]
fn shadow_reports_exactly_the_differing_decisions() {
    let rt = runtime();
    let world = rt.block_on(World::new());
    let a = world.opportunistic();
    let va = version_of(&a);
    let relay = Relay::start(&world, &a, None);
    // The candidate: also requires TLS for shadowed.test.
    let candidate = world.policy("candidate", &["unused.example", "shadowed.test"], "");
    let vc = version_of(&candidate);

    let (code, body) = relay.admin("POST", "/policy/shadow", None, None, candidate.as_bytes());
    assert_eq!(code, 401, "no token, no shadow: {body}");
    let (code, body) = relay.admin(
        "POST",
        "/policy/shadow",
        Some(TOKEN),
        Some("carol"),
        candidate.as_bytes(),
    );
    assert_eq!(code, 200, "{body}");

    let shadowed = ["s1@shadowed.test", "s2@shadowed.test", "s3@shadowed.test"];
    let plain = [
        "p1@plain.test",
        "p2@plain.test",
        "p3@plain.test",
        "p4@plain.test",
    ];
    let all: Vec<&str> = shadowed.iter().chain(plain.iter()).copied().collect();
    rt.block_on(send(&relay, &all));
    wait_sinks(&world, all.len());
    // Every message went direct on the active version: the shadow never decides.
    assert_eq!(recipients(&world.mx).len(), all.len());
    assert!(recipients(&world.alt).is_empty());

    let status = relay.status();
    let shadow = &status["shadow"];
    assert_eq!(shadow["version"], vc.as_str(), "{status}");
    assert_eq!(status["active"]["version"], va.as_str());
    // Plan and verdict of each shadowed recipient differ (TLS required; alternate route).
    assert_eq!(shadow["differences"], 2 * shadowed.len(), "{status}");
    let recent = shadow["recent"].as_array().unwrap();
    assert_eq!(recent.len(), 2 * shadowed.len());
    for d in recent {
        let rcpt = d["recipient"].as_str().unwrap();
        assert!(rcpt.ends_with("@shadowed.test"), "{d}");
    }
    let logged = relay
        .log()
        .lines()
        .filter(|l| l.contains("altroute::shadow") && l.contains("shadow decision differs"))
        .count();
    assert_eq!(logged, 2 * shadowed.len());

    let (code, body) = relay.admin("DELETE", "/policy/shadow", Some(TOKEN), Some("carol"), b"");
    assert_eq!(code, 200, "{body}");
    assert!(relay.status()["shadow"].is_null());
    let audit = relay.audit_lines();
    let actions: Vec<&str> = audit
        .iter()
        .map(|l| l["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["start", "shadow-start", "shadow-stop"]);
    println!("shadow: {}", shadow);
}

/// (d) Rollback returns to the previous version; `altroute audit verify` detects a
/// changed and a removed line.
/// A relay that may not take a read lease on its policy file (neither its owner nor with
/// CAP_LEASE) cannot tell whether anyone still writes it: a changed file is refused, not
/// applied, and SIGHUP applies it. An audit's relay so placed applied half a policy
/// written by a process its `/proc` could not show, and mail went out in clear text.
#[test]
fn without_a_lease_the_watch_refuses_changes_and_sighup_applies_them() {
    let rt = runtime();
    let world = rt.block_on(World::new());
    let (a, b) = (world.opportunistic(), world.tls_required());
    let (va, vb) = (version_of(&a), version_of(&b));
    let relay = Relay::start_as(&world, &a, None, Some(65534));
    assert_eq!(relay.active(), va);
    assert!(
        relay.log().contains("may not take a read lease"),
        "{}",
        relay.log()
    );
    replace_file(&relay.policy, b.as_bytes());
    wait_rejections(&relay, 1);
    assert_eq!(relay.active(), va, "applied without knowing it was whole");
    let reasons = relay.status()["last_rejection"]["reasons"].to_string();
    assert!(
        reasons.contains("cannot tell whether it is still being written"),
        "{reasons}"
    );
    signal(relay.pid(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.active() != vb {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not apply it:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn rollback_and_audit_verify() {
    let rt = runtime();
    let world = rt.block_on(World::new());
    let (a, b) = (world.opportunistic(), world.tls_required());
    let (va, vb) = (version_of(&a), version_of(&b));
    let mut relay = Relay::start(&world, &a, None);

    // State changes need the token.
    let (code, _) = relay.admin("POST", "/policy", None, Some("eve"), b.as_bytes());
    assert_eq!(code, 401);
    let (code, _) = relay.admin("POST", "/policy", Some("wrong"), Some("eve"), b.as_bytes());
    assert_eq!(code, 401);
    let (code, _) = relay.admin("POST", "/policy/rollback", None, None, b"");
    assert_eq!(code, 401);
    assert_eq!(relay.active(), va);

    let (code, body) = relay.admin("POST", "/policy", Some(TOKEN), Some("alice"), b.as_bytes());
    assert_eq!(code, 200, "{body}");
    assert_eq!(relay.active(), vb);
    rt.block_on(send(&relay, &["d1@reload.test"]));
    wait_sinks(&world, 1);
    assert_eq!(recipients(&world.alt), ["d1@reload.test"]);

    let (code, body) = relay.admin("POST", "/policy/rollback", Some(TOKEN), Some("bob"), b"");
    assert_eq!(code, 200, "{body}");
    assert_eq!(relay.active(), va);
    rt.block_on(send(&relay, &["d2@reload.test"]));
    wait_sinks(&world, 2);
    assert_eq!(recipients(&world.mx), ["d2@reload.test"]);
    let history = relay.status()["history"].clone();
    assert_eq!(history[0]["version"], va.as_str(), "{history}");

    // The same through the CLI.
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_altroute"))
            .arg("policy")
            .args(args)
            .args([
                "--admin",
                &format!("http://{}", relay.admin),
                "--token",
                TOKEN,
                // Any UTF-8 name (an audit's `jörg` was recorded as `admin:anonymous`).
                "--who",
                "jörg",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code(), stdout)
    };
    let b_file = relay.dir.path().join("b.toml");
    std::fs::write(&b_file, &b).unwrap();
    let (code, out) = cli(&["apply", b_file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(relay.active(), vb);
    let (code, out) = cli(&["rollback"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(relay.active(), va);
    let (code, out) = cli(&["rollback"]);
    assert_eq!(code, Some(1), "nothing left to roll back to: {out}");

    relay.stop();
    let audit = relay.audit_lines();
    let summary: Vec<(&str, &str)> = audit
        .iter()
        .map(|l| (l["action"].as_str().unwrap(), l["who"].as_str().unwrap()))
        .collect();
    assert_eq!(
        summary,
        [
            ("start", "startup"),
            ("activate", "admin:alice"),
            ("rollback", "admin:bob"),
            ("activate", "cli:jörg"),
            ("rollback", "cli:jörg")
        ]
    );
    assert_eq!(audit[1]["summary"]["rules"]["changed"][0], "strict");

    let verify = |path: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_altroute"))
            .args(["audit", "verify"])
            .arg(path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = verify(&relay.audit);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("ok: 5 entries, chain intact"), "{out}");

    let original = std::fs::read_to_string(&relay.audit).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    let changed = original.replacen("admin:alice", "admin:mallory", 1);
    std::fs::write(&relay.audit, &changed).unwrap();
    let (code, out) = verify(&relay.audit);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("line 2"), "{out}");

    let removed = format!("{}\n{}\n", lines[0], lines[2]);
    std::fs::write(&relay.audit, removed).unwrap();
    let (code, out) = verify(&relay.audit);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("line 2"), "{out}");
    println!("audit verify on a removed line: {}", out.trim());
}
