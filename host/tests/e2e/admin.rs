//! The admin endpoint's policy API as a client meets it: body size and authorization.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};

use crate::support::{Relay, RelayConfig, policy_file};

const TOKEN: &str = "admin-e2e-token";

fn relay() -> Relay {
    let mut config = RelayConfig::new();
    config.admin_extra = format!("token = {TOKEN:?}");
    Relay::start(config)
}

/// One HTTP/1.1 request; returns (status code, body). `headers` are whole lines.
fn request(admin: SocketAddr, head: &str, headers: &[String], body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(admin).unwrap();
    let mut req = format!("{head} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}

#[test]
fn a_large_policy_is_accepted_and_the_limit_is_named() {
    let relay = relay();
    // The example policy with 6 MiB of comments: over the old 4 MiB limit.
    let mut policy = std::fs::read_to_string(policy_file()).unwrap();
    let comment = format!("# {}\n", "x".repeat(126));
    policy.push_str(&comment.repeat(6 * 8192));
    assert!(policy.len() > 6 << 20);
    let (code, body) = request(
        relay.config.admin,
        "POST /policy",
        &[
            format!("Authorization: Bearer {TOKEN}"),
            format!("Content-Length: {}", policy.len()),
        ],
        policy.as_bytes(),
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"changed\":false"), "{body}");

    // Over the limit: refused from the declared length, before the body is read.
    let (code, body) = request(
        relay.config.admin,
        "POST /policy",
        &[
            format!("Authorization: Bearer {TOKEN}"),
            format!("Content-Length: {}", 65 << 20),
        ],
        b"",
    );
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("larger than 64 MiB"), "{body}");
}

#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let relay = relay();
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let auth = format!("Authorization: {scheme} {TOKEN}");
        // The queue endpoints (reading needs the token when one is configured)...
        let (code, body) = request(
            relay.config.admin,
            "GET /queue",
            std::slice::from_ref(&auth),
            b"",
        );
        assert_eq!(code, 200, "{scheme}: {body}");
        // ...and the policy endpoints.
        let (code, body) = request(
            relay.config.admin,
            "POST /policy/rollback",
            &[auth, "Content-Length: 0".into()],
            b"",
        );
        assert_eq!(
            code, 409,
            "{scheme}: nothing to roll back to, but authorized: {body}"
        );
    }
    let (code, _) = request(
        relay.config.admin,
        "GET /queue",
        &[format!("Authorization: Basic {TOKEN}")],
        b"",
    );
    assert_eq!(code, 401);
}

/// What an audit did to the admin endpoint without the token: unfinished bodies of
/// 63 MiB (1.3 GB held), thousands of open connections (the SMTP port starved of file
/// descriptors), and `GET /policy` showing the addresses of live mail.
/// - A change without the token is answered from its headers, body unread.
/// - At most `MAX_CONNECTIONS` (64) connections: the next is closed at once, and the
///   relay keeps serving SMTP and admin requests once they go.
/// - `GET /policy` without the token is the short form.
#[test]
fn the_admin_endpoint_refuses_before_reading_and_caps_connections() {
    let mut relay = relay();
    let held: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(relay.config.admin).unwrap())
        .collect();
    // Each held connection has its task (and permit) once the relay accepted it: one
    // more request after them proves they were all accepted.
    let mut over = TcpStream::connect(relay.config.admin).unwrap();
    let mut buf = Vec::new();
    let _ = over.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    let _ = over.read_to_end(&mut buf);
    assert!(
        buf.is_empty(),
        "the 65th connection is closed unanswered: {buf:?}"
    );
    drop(held);
    // Freed: served again (the tasks end as the held connections close).
    let health = || -> std::io::Result<String> {
        let mut c = TcpStream::connect(relay.config.admin)?;
        c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        c.read_to_string(&mut out)?;
        Ok(out)
    };
    let mut ok = false;
    for _ in 0..200 {
        if health().is_ok_and(|out| out.starts_with("HTTP/1.1 200")) {
            ok = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(ok, "admin endpoint not serving again");

    // (After the cap: its connection would hold a slot for a moment.)
    let mut s = TcpStream::connect(relay.config.admin).unwrap();
    write!(
        s,
        "POST /policy HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\npartial",
        63 << 20
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 401", "answered before the body came");

    // Reading the policy status: the short form without the token.
    let (code, body) = request(relay.config.admin, "GET /policy", &[], b"");
    assert_eq!(code, 200);
    let short: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(short["version"], short["active"]["version"]);
    assert!(short.get("last_rejection").is_none() && short.get("shadow").is_none());
    let (_, body) = request(
        relay.config.admin,
        "GET /policy",
        &[format!("Authorization: Bearer {TOKEN}")],
        b"",
    );
    let full: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(full.get("history").is_some(), "{full}");
    assert!(relay.stop().success());
}
