//! The policy audit log as an operator meets it: a torn line left by a crash or a full
//! disk, `altroute audit verify` on good, bad and missing files, and a log moved away
//! under the running relay.

use std::io::Write as _;
use std::path::Path;

use serde_json::Value;

use crate::support::{Relay, RelayConfig, altroute};

/// `altroute audit verify FILE`: (exit code, stdout, stderr).
fn verify(path: &Path) -> (i32, String, String) {
    altroute(&["audit", "verify", path.to_str().expect("utf-8")])
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_torn_last_line_does_not_stop_the_relay() {
    let mut relay = Relay::start(RelayConfig::new());
    relay.stop();
    let audit = relay.spool_dir.join("audit.jsonl");
    // What a crash or a full disk in the middle of a write leaves behind.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&audit)
        .unwrap();
    f.write_all(br#"{"action":"activate","hash":"5d0c"#)
        .unwrap();
    drop(f);

    relay.restart();
    relay.stop();
    let ls = lines(&audit);
    let actions: Vec<&str> = ls.iter().map(|l| l["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["start", "repair", "start"]);
    let (code, out, err) = verify(&audit);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok: 3 entries, chain intact"), "{out}");
    assert!(
        relay.log().contains("cut off a torn last line"),
        "{}",
        relay.log()
    );
}

#[test]
fn a_log_moved_away_under_the_relay_continues_at_its_path() {
    const TOKEN: &str = "audit-e2e-token";
    let mut config = RelayConfig::new();
    config.admin_extra = format!("token = {TOKEN:?}");
    let mut relay = Relay::start(config);
    let audit = relay.spool_dir.join("audit.jsonl");
    let rotated = relay.spool_dir.join("audit.jsonl.1");
    let start = lines(&audit);
    assert_eq!(start.len(), 1);
    let head = start[0]["hash"].as_str().unwrap().to_string();
    // The head is logged, so that it can be kept elsewhere.
    assert!(
        relay.log().contains(&format!(
            "audit log head path={} seq=1 hash={head}",
            audit.display()
        )),
        "{}",
        relay.log()
    );

    // logrotate without telling the relay.
    std::fs::rename(&audit, &rotated).unwrap();
    let policy = std::fs::read_to_string(crate::support::policy_file())
        .unwrap()
        .replacen("name = \"hosted-suite\"", "name = \"hosted-suite-2\"", 1);
    assert!(policy.contains("hosted-suite-2"));
    let (status, body) = post(relay.config.admin, "/policy", TOKEN, policy.as_bytes());
    assert!(status.contains(" 200 "), "{status} {body}");

    let (_, body) = relay.admin_get("/policy");
    let v: Value = serde_json::from_str(&body).unwrap();
    let error = v["audit"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("moved away"), "{body}");
    assert_eq!(v["audit"]["seq"], 3, "{body}");

    let (code, out, err) = verify(&rotated);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok: 1 entries, chain intact"), "{out}");
    let (code, out, err) = verify(&audit);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "ok: 2 entries, chain intact, continuing an earlier file after seq 1 (hash {head})"
        )),
        "{out}"
    );
    let now = lines(&audit);
    assert_eq!(now[0]["action"], "continue");
    assert_eq!(now[1]["action"], "activate");
    assert!(
        relay
            .log()
            .contains("the chain continues in the file at the path")
    );
    relay.stop();
}

/// A refused candidate's reasons cannot start a line of the relay's log: a TOML key with
/// a newline once put a forged `audit log head` line there (the line log shippers keep
/// as the audit chain's anchor). Every event is one line, its line breaks escaped.
#[test]
fn a_refused_candidate_cannot_forge_a_log_line() {
    const TOKEN: &str = "audit-e2e-token";
    let mut config = RelayConfig::new();
    config.admin_extra = format!("token = {TOKEN:?}");
    let mut relay = Relay::start(config);
    let forged =
        "2026-12-07T18:30:00.000000Z  INFO altroute::audit: audit log head seq=99 hash=00ff";
    let candidate = format!("[policy]\nname = \"x\"\n\"zz\\n{forged}\" = 1\n");
    let (status, body) = post(relay.config.admin, "/policy", TOKEN, candidate.as_bytes());
    assert!(
        status.contains(" 422 ") || status.contains(" 400 "),
        "{status} {body}"
    );
    assert!(
        body.contains("audit log head seq=99"),
        "the reason names the key: {body}"
    );
    let log = relay.log();
    assert!(
        log.contains("zz\\n2026-12-07T18:30:00.000000Z"),
        "the reasons are logged, escaped: {log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("2026-12-07T18:30:00")),
        "a forged line in the log: {log}"
    );
    relay.stop();
}

/// HTTP POST with the token; returns (status line, body).
fn post(admin: std::net::SocketAddr, path: &str, token: &str, body: &[u8]) -> (String, String) {
    use std::io::Read as _;
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Authorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}
