//! The example policy extensions in a real Envoy (V8), as further HTTP filters after the
//! standard module (`deploy/envoy/http-extension.yaml`): Envoy routes by the decision the
//! chain leaves, and a held recipient is answered by the extension's local response.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;

use altroute_policy::{Query, compile, contract};
use altroute_tests::envoy::{
    EchoPool, Envoy, HttpResponse, free_port, http_request, render, template, write_module,
};

const POLICY: &str = r#"
[[hosts]]
name = "secure-relay"
address = "relay.example.net"

[[tls_compliance]]
name = "partners"
domains = ["*.strict.example"]
"#;

/// Envoy with the chain; `open_now` picks a business-hours configuration whose hours do
/// (or do not) contain the current time.
fn chain_envoy(dir: &Path, open_now: bool) -> (Envoy, u16) {
    let compiled = compile(POLICY).expect("the policy compiles");
    let module = write_module(dir, "altroute_policy.wasm");
    let finance = dir.join("finance_secure.wasm");
    std::fs::write(&finance, altroute_modules::FINANCE_SECURE).unwrap();
    let hours = dir.join("business_hours.wasm");
    std::fs::write(&hours, altroute_modules::BUSINESS_HOURS).unwrap();
    let direct = EchoPool::start("direct").unwrap();
    let alternate = EchoPool::start("alternate").unwrap();
    let host = EchoPool::start("host").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let utc_hour = i64::try_from((now % 86_400) / 3600).unwrap();
    let offset = (if open_now { 12 } else { 21 } - utc_hour) * 60;
    let hours_config = format!(
        r#"{{"domains": ["held.example"], "open_hour": 9, "close_hour": 17, "utc_offset_minutes": {offset}}}"#
    );
    let finance_config = r#"{"senders": ["finance.corp.example"], "host": {"name": "finance-relay", "addresses": ["relay.example.net"]}}"#;
    let listen = free_port();
    let config = render(
        &template("http-extension.yaml"),
        &[
            ("LISTEN_PORT", &listen.to_string()),
            ("DIRECT_PORT", &direct.port.to_string()),
            ("ALTERNATE_PORT", &alternate.port.to_string()),
            ("HOST_PORT", &host.port.to_string()),
            ("MODULE", &module.display().to_string()),
            ("POLICY_JSON", &compiled.json),
            ("FINANCE_MODULE", &finance.display().to_string()),
            ("FINANCE_CONFIG", finance_config),
            ("HOURS_MODULE", &hours.display().to_string()),
            ("HOURS_CONFIG", &hours_config),
        ],
    );
    let envoy = Envoy::start(&config, dir).unwrap();
    (envoy, listen)
}

fn ask(port: u16, query: &Query) -> HttpResponse {
    let headers = contract::encode_query(query);
    let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    http_request(
        SocketAddr::from(([127, 0, 0, 1], port)),
        "GET",
        "/submit",
        &pairs,
    )
    .unwrap()
}

/// The pool that answered and the value of one header it received.
fn echoed(resp: &HttpResponse, header: &str) -> (String, Option<String>) {
    let v: serde_json::Value = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("echo body is not JSON ({e}): {resp:?}"));
    let pool = v["pool"].as_str().unwrap_or_default().to_string();
    let value = v["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p[0].as_str() == Some(header))
        .and_then(|p| p[1].as_str().map(str::to_string));
    (pool, value)
}

#[test]
fn extensions_route_as_second_filters_in_envoy() {
    let dir = tempfile::tempdir().unwrap();
    let (envoy, port) = chain_envoy(dir.path(), false);

    // Finance mail: the extension reroutes it; Envoy sends it to the alternate pool.
    let r = ask(
        port,
        &Query::plan("cfo@finance.corp.example", "bob@open.example"),
    );
    assert_eq!(r.status, 200, "{r:?}\n{}", envoy.log_tail());
    let (pool, rule) = echoed(&r, contract::RULE);
    assert_eq!(pool, "alternate");
    assert_eq!(rule.as_deref(), Some("extension:finance-secure"));
    let (_, host) = echoed(&r, contract::HOST);
    assert_eq!(host.as_deref(), Some("finance-relay"));

    // Anyone else: the standard module's decision, direct.
    let r = ask(port, &Query::plan("alice@corp.example", "bob@open.example"));
    let (pool, rule) = echoed(&r, contract::RULE);
    assert_eq!(pool, "direct");
    assert_eq!(rule.as_deref(), Some("default"));

    // Outside business hours a listed domain is held by the second extension.
    let r = ask(port, &Query::plan("alice@corp.example", "bob@held.example"));
    assert_eq!(r.status, contract::DEFER_STATUS as u16, "{r:?}");
    let body = String::from_utf8_lossy(&r.body);
    assert!(
        body.starts_with("451 4.7.0") && body.contains("business hours"),
        "{body}"
    );
}

#[test]
fn business_hours_lets_mail_through_in_hours_in_envoy() {
    let dir = tempfile::tempdir().unwrap();
    let (envoy, port) = chain_envoy(dir.path(), true);
    let r = ask(port, &Query::plan("alice@corp.example", "bob@held.example"));
    assert_eq!(r.status, 200, "{r:?}\n{}", envoy.log_tail());
    let (pool, rule) = echoed(&r, contract::RULE);
    assert_eq!(pool, "direct");
    assert_eq!(rule.as_deref(), Some("default"));
}
