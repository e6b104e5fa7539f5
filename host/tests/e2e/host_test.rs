//! `altroute host test` (issue 9) against lab MX servers: a valid certificate, an expired
//! one, one for the wrong host name, and no STARTTLS; plus a policy host and HOST:PORT.
//!
//! The lab (DNS, SMTP sinks with certificates from a test CA) runs on a tokio runtime of
//! the test; the real `altroute` binary runs with a configuration that points its
//! resolver, SMTP port and CA file at the lab, exactly as `altroute serve` would use them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use altroute_lab::{
    DnsServer, HttpResponse, HttpsServer, SinkConfig, SmtpSink, TestCa, Validity, free_port,
    loopback_ip,
};
use serde_json::Value;

#[derive(Clone, Copy)]
enum Tls {
    None,
    Valid,
    Expired,
    WrongName,
}

struct Lab {
    ca: TestCa,
    dns: DnsServer,
    port: u16,
    https_port: u16,
    _sinks: Vec<SmtpSink>,
    _https: Vec<HttpsServer>,
    dir: tempfile::TempDir,
    config: PathBuf,
    rt: tokio::runtime::Runtime,
}

const POLICY: &str = r#"
[policy]
name = "host-test"

[[hosts]]
name = "secure-relay"
address = "alt.lab.test"
port = {port}

[alternate_secure_route]
host = "secure-relay"

[[tls_compliance]]
name = "partners"
domains = ["*.strict.test"]
require_ca_signed = true
validate_hostname = true
"#;

impl Lab {
    fn new() -> Lab {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let ca = TestCa::new("host test root").unwrap();
        let dns = rt
            .block_on(DnsServer::start(SocketAddr::new(loopback_ip().into(), 0)))
            .unwrap();
        let port = free_port(loopback_ip()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut lab = Lab {
            ca,
            dns,
            port,
            https_port: free_port(loopback_ip()).unwrap(),
            _sinks: Vec::new(),
            _https: Vec::new(),
            config: dir.path().join("altroute.toml"),
            dir,
            rt,
        };
        lab.mx("valid.strict.test", "mx.valid.strict.test", Tls::Valid);
        lab.mx(
            "expired.strict.test",
            "mx.expired.strict.test",
            Tls::Expired,
        );
        lab.mx("wrong.strict.test", "mx.wrong.strict.test", Tls::WrongName);
        lab.mx("plain.strict.test", "mx.plain.strict.test", Tls::None);
        lab.sink("alt.lab.test", Tls::Valid);
        // An MTA-STS enforce domain whose policy does not list the MX it publishes.
        lab.mx("sts.strict.test", "mx.sts.strict.test", Tls::Valid);
        lab.sts(
            "sts.strict.test",
            "version: STSv1\r\nmode: enforce\r\nmx: mx.elsewhere.test\r\nmax_age: 86400\r\n",
        );
        lab.write_config();
        lab
    }

    fn sink(&mut self, name: &str, tls: Tls) -> std::net::Ipv4Addr {
        let ip = loopback_ip();
        let mut config = SinkConfig::new(SocketAddr::new(ip.into(), self.port), name);
        config.starttls = match tls {
            Tls::None => None,
            Tls::Valid => Some(self.ca.issue(&[name], Validity::Valid).unwrap()),
            Tls::Expired => Some(self.ca.issue(&[name], Validity::Expired).unwrap()),
            Tls::WrongName => Some(
                self.ca
                    .issue(&["someone-else.test"], Validity::Valid)
                    .unwrap(),
            ),
        }
        .map(|issued| issued.rustls_server_config().unwrap());
        let sink = self.rt.block_on(SmtpSink::start(config)).unwrap();
        self._sinks.push(sink);
        self.rt.block_on(self.dns.add_a(name, ip)).unwrap();
        ip
    }

    /// `_mta-sts.DOMAIN` and an HTTPS policy host serving `policy`.
    fn sts(&mut self, domain: &str, policy: &str) {
        let host = format!("mta-sts.{domain}");
        let ip = loopback_ip();
        let cert = self.ca.issue(&[&host], Validity::Valid).unwrap();
        let server = self
            .rt
            .block_on(HttpsServer::start(
                SocketAddr::new(ip.into(), self.https_port),
                &cert,
            ))
            .unwrap();
        server.set(altroute::mta_sts::WELL_KNOWN, HttpResponse::text(policy));
        self._https.push(server);
        self.rt.block_on(async {
            self.dns
                .add_txt(&format!("_mta-sts.{domain}"), "v=STSv1; id=1")
                .await
                .unwrap();
            self.dns.add_a(&host, ip).await.unwrap();
        });
    }

    fn mx(&mut self, domain: &str, host: &str, tls: Tls) {
        self.rt.block_on(self.dns.add_mx(domain, 10, host)).unwrap();
        self.sink(host, tls);
    }

    fn write_config(&self) {
        let d = self.dir.path();
        let policy = d.join("policy.toml");
        std::fs::write(&policy, POLICY.replace("{port}", &self.port.to_string())).unwrap();
        let ca = d.join("ca.pem");
        std::fs::write(&ca, self.ca.root_pem()).unwrap();
        let ip = loopback_ip();
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

[policy]
file = {policy:?}
audit_log = {audit:?}

[mta_sts]
https_port = {https_port}

[admin]
listen = "{admin}"
"#,
            smtp = SocketAddr::new(ip.into(), free_port(ip).unwrap()),
            admin = SocketAddr::new(ip.into(), free_port(ip).unwrap()),
            spool = d.join("spool").display().to_string(),
            dns = self.dns.addr(),
            port = self.port,
            https_port = self.https_port,
            ca = ca.display().to_string(),
            policy = policy.display().to_string(),
            audit = d.join("audit.jsonl").display().to_string(),
        );
        std::fs::write(&self.config, config).unwrap();
    }

    /// `altroute host test NAME -c CONFIG [--json]`: (exit code, stdout).
    fn run(&self, name: &str, json: bool) -> (i32, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_altroute"));
        cmd.args(["host", "test", name, "-c"]).arg(&self.config);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let code = out.status.code().unwrap_or(-1);
        assert!(
            code != 2,
            "`host test {name}` failed (2):\n{stdout}\n{stderr}"
        );
        (code, stdout)
    }

    fn json(&self, name: &str) -> (i32, Value) {
        let (code, out) = self.run(name, true);
        let v: Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("--json output is not JSON ({e}):\n{out}"));
        (code, v)
    }
}

fn problems(v: &Value) -> String {
    v["problems"].to_string()
}

#[test]
fn valid_certificate() {
    let lab = Lab::new();
    let (code, v) = lab.json("valid.strict.test");
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["status"], "ok");
    assert_eq!(v["kind"], "domain");
    assert_eq!(v["host"], "mx.valid.strict.test");
    assert_eq!(v["starttls"], "offered");
    assert_eq!(v["tls"]["version"], "1.3");
    assert!(
        v["tls"]["cipher"].as_str().unwrap().starts_with("TLS13_"),
        "{v:#}"
    );
    let cert = &v["certificate"];
    assert_eq!(cert["verdict"], "valid");
    assert_eq!(cert["trusted"], true);
    assert_eq!(cert["expired"], false);
    assert_eq!(cert["hostname_match"], true);
    assert!(cert["days_left"].as_i64().unwrap() > 0);
    let leaf = &cert["chain"][0];
    assert!(
        leaf["sans"]
            .as_array()
            .unwrap()
            .contains(&Value::from("mx.valid.strict.test")),
        "{leaf:#}"
    );
    assert!(
        leaf["issuer"].as_str().unwrap().contains("host test root"),
        "{leaf:#}"
    );
    assert!(leaf["not_before"].as_i64().unwrap() < leaf["not_after"].as_i64().unwrap());
    // The policy: partners rule requires a verified certificate; this MX has one.
    let p = &v["policy"];
    assert_eq!(p["recipient"], "postmaster@valid.strict.test");
    assert_eq!(p["plan"]["rule"], "tls_compliance:partners");
    assert_eq!(p["plan"]["tls"]["required"], true);
    assert_eq!(p["verdict"]["route"], "direct");
    assert_eq!(p["delivers_here"], true);
    assert_eq!(p["version"].as_str().unwrap().len(), "sha256:".len() + 16);

    // The text form says the same to a human.
    let (code, text) = lab.run("valid.strict.test", false);
    assert_eq!(code, 0, "{text}");
    for expected in [
        "connected:  mx.valid.strict.test",
        "STARTTLS:   offered",
        "TLS:        version 1.3, cipher TLS13_",
        "certificate: valid (trusted: yes, expired: no, host name matches: yes",
        "SANs:      mx.valid.strict.test",
        "verdict:  route direct",
        "delivers over this connection: yes",
        "status:     ok",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

#[test]
fn expired_certificate() {
    let lab = Lab::new();
    let (code, v) = lab.json("expired.strict.test");
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["status"], "problems");
    assert_eq!(v["starttls"], "offered");
    assert_eq!(v["certificate"]["verdict"], "expired");
    assert_eq!(v["certificate"]["expired"], true);
    assert!(v["certificate"]["days_left"].as_i64().unwrap() < 0);
    assert!(problems(&v).contains("expired"), "{v:#}");
    // Mail that requires TLS takes the alternate route instead.
    assert_eq!(v["policy"]["verdict"]["route"], "alternate");
    assert_eq!(v["policy"]["verdict"]["result"], "certificate-expired");
    assert_eq!(v["policy"]["delivers_here"], false);
    let (_, text) = lab.run("expired.strict.test", false);
    assert!(text.contains("certificate: expired"), "{text}");
    assert!(text.contains("status:     problems"), "{text}");
}

#[test]
fn wrong_host_name() {
    let lab = Lab::new();
    let (code, v) = lab.json("wrong.strict.test");
    assert_eq!(code, 1, "{v:#}");
    let cert = &v["certificate"];
    assert_eq!(cert["verdict"], "hostname-mismatch");
    assert_eq!(cert["trusted"], true);
    assert_eq!(cert["hostname_match"], false);
    assert_eq!(cert["expired"], false);
    assert_eq!(cert["chain"][0]["sans"][0], "someone-else.test");
    assert!(
        problems(&v).contains("not valid for mx.wrong.strict.test"),
        "{v:#}"
    );
    assert_eq!(v["policy"]["verdict"]["route"], "alternate");
    assert_eq!(
        v["policy"]["verdict"]["result"],
        "certificate-host-mismatch"
    );
}

#[test]
fn no_starttls() {
    let lab = Lab::new();
    let (code, v) = lab.json("plain.strict.test");
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["starttls"], "absent");
    assert!(v["tls"].is_null(), "{v:#}");
    assert!(v["certificate"].is_null(), "{v:#}");
    assert!(problems(&v).contains("does not offer STARTTLS"), "{v:#}");
    assert_eq!(v["policy"]["verdict"]["route"], "alternate");
    assert_eq!(v["policy"]["verdict"]["result"], "starttls-not-supported");
    let (_, text) = lab.run("plain.strict.test", false);
    assert!(text.contains("STARTTLS:   absent"), "{text}");
    assert!(text.contains("problem:"), "{text}");
}

#[test]
fn policy_host_and_host_port() {
    let lab = Lab::new();
    // The alternate secure host, by its policy name: its own requirement is met.
    let (code, v) = lab.json("secure-relay");
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["kind"], "policy-host");
    assert_eq!(v["host"], "alt.lab.test");
    assert_eq!(v["policy"]["hop"], "alternate");
    assert_eq!(v["policy"]["host_requirement"]["required"], true);
    assert_eq!(v["policy"]["host_requirement_met"], true);
    assert_eq!(v["certificate"]["verdict"], "valid");

    // HOST:PORT, bypassing MX: the expired MX by name.
    let (code, v) = lab.json(&format!("mx.expired.strict.test:{}", lab.port));
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["kind"], "host-port");
    assert_eq!(v["certificate"]["verdict"], "expired");

    // Nothing listens there: a problem (1), not an error (2).
    let ip = loopback_ip();
    let closed = free_port(ip).unwrap();
    let (code, v) = lab.json(&format!("{ip}:{closed}"));
    assert_eq!(code, 1, "{v:#}");
    assert!(v["host"].is_null());
    assert_eq!(v["connect_errors"].as_array().unwrap().len(), 1, "{v:#}");
}

#[test]
fn mta_sts_enforce_policy_that_excludes_the_mx() {
    let lab = Lab::new();
    let (code, v) = lab.json("sts.strict.test");
    assert_eq!(code, 1, "{v:#}");
    let sts = &v["mta_sts"];
    assert_eq!(sts["mode"], "enforce", "{v:#}");
    assert_eq!(sts["mx"], serde_json::json!(["mx.elsewhere.test"]));
    assert_eq!(sts["mx_match"], false);
    assert!(problems(&v).contains("MTA-STS enforce"), "{v:#}");
    // The certificate itself is fine: the problem is the MX name alone.
    assert_eq!(v["certificate"]["verdict"], "valid");
    let (_, text) = lab.run("sts.strict.test", false);
    assert!(
        text.contains("MTA-STS:    enforce (mx: mx.elsewhere.test), connected host NOT allowed"),
        "{text}"
    );
    // A domain without a policy says so.
    let (_, v) = lab.json("valid.strict.test");
    assert_eq!(v["mta_sts"]["mode"], "none", "{v:#}");
    assert!(v["mta_sts"]["failure"].is_null(), "{v:#}");
}
