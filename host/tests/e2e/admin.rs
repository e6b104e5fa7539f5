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
