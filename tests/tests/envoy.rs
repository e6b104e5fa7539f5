//! The standard policy module in a real Envoy (V8) on loopback, with the configs of
//! `deploy/envoy/`: the HTTP face against native `decide` for the whole decision table,
//! routing by decision, the SMTP edge (per-recipient refusal under PIPELINING and split
//! reads, metrics; Debian's swaks against Postfix's smtp-sink, plain and pipelined; a
//! STARTTLS session passing untouched), connection-start routing, ECDS hot reload, and a
//! trapping module failing closed.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use altroute_lab::{SinkConfig, SmtpSink, TestCa, Validity};
use altroute_policy::contract;
use altroute_policy::fixtures::TABLE;
use altroute_policy::{
    CertStatus, Hop, Policy, Query, Route, Starttls, TlsVersion, compile, decide,
};
use altroute_tests::envoy::{
    EchoPool, Envoy, PostfixSink, SmtpClient, SmtpServer, configmap_update, dumped_recipients,
    free_port, http_request, move_into_place, render, swaks, template, write_module,
    write_trapping_module,
};

/// Start Envoy with `deploy/envoy/http.yaml` and three echo pools; the policy is `toml`.
fn http_envoy(dir: &Path, toml: &str) -> (Envoy, u16) {
    let compiled = compile(toml).expect("the policy compiles");
    let module = write_module(dir, "altroute_policy.wasm");
    let direct = EchoPool::start("direct").unwrap();
    let alternate = EchoPool::start("alternate").unwrap();
    let host = EchoPool::start("host").unwrap();
    let listen = free_port();
    let config = render(
        &template("http.yaml"),
        &[
            ("LISTEN_PORT", &listen.to_string()),
            ("DIRECT_PORT", &direct.port.to_string()),
            ("ALTERNATE_PORT", &alternate.port.to_string()),
            ("HOST_PORT", &host.port.to_string()),
            ("MODULE", &module.display().to_string()),
            ("POLICY_JSON", &compiled.json),
        ],
    );
    let envoy = Envoy::start(&config, dir).unwrap();
    (envoy, listen)
}

fn ask(port: u16, query: &Query) -> altroute_tests::envoy::HttpResponse {
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

/// The decision headers an upstream pool received (from its echo).
fn echoed_decision(resp: &altroute_tests::envoy::HttpResponse) -> (String, Vec<(String, String)>) {
    let v: serde_json::Value = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("echo body is not JSON ({e}): {:?}", resp.body));
    let pool = v["pool"].as_str().unwrap_or_default().to_string();
    let mut got: Vec<(String, String)> = v["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p[0].as_str()?.to_string(), p[1].as_str()?.to_string())))
        .filter(|(n, _)| contract::DECISION_HEADERS.contains(&n.as_str()))
        .collect();
    got.sort();
    (pool, got)
}

fn sorted(pairs: Vec<(&'static str, String)>) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = pairs.into_iter().map(|(n, v)| (n.to_string(), v)).collect();
    v.sort();
    v
}

/// Asks Envoy's HTTP face `q` and checks the answer against native `decide()`: the
/// decision headers the chosen pool received, or the local response of a defer or bounce.
fn envoy_decides_as_natively(envoy: &Envoy, port: u16, policy: &Policy, q: &Query, what: &str) {
    let expected = decide(policy, q);
    let want = sorted(contract::encode_decision(&expected));
    let resp = ask(port, q);
    match expected.route {
        Route::Defer | Route::Bounce => {
            let status = if expected.route == Route::Defer {
                contract::DEFER_STATUS
            } else {
                contract::BOUNCE_STATUS
            };
            assert_eq!(u32::from(resp.status), status, "{what}");
            assert_eq!(
                String::from_utf8_lossy(&resp.body),
                expected.reply.clone().unwrap_or_default(),
                "{what}: local response body"
            );
            let mut got: Vec<(String, String)> = resp
                .headers
                .iter()
                .filter(|(n, _)| contract::DECISION_HEADERS.contains(&n.as_str()))
                .cloned()
                .collect();
            got.sort();
            assert_eq!(got, want, "{what}: local response headers");
        }
        _ => {
            assert_eq!(resp.status, 200, "{what}: {resp:?}\n{}", envoy.log_tail());
            let (pool, got) = echoed_decision(&resp);
            assert_eq!(got, want, "{what}: decision headers upstream");
            assert_eq!(pool, expected.route.to_string(), "{what}: pool");
        }
    }
}

#[test]
fn http_face_in_envoy_equals_native_decide_for_the_decision_table() {
    let mut cases = 0;
    for (file, toml) in TABLE {
        let dir = tempfile::tempdir().unwrap();
        let policy = compile(toml).unwrap().policy;
        let (envoy, port) = http_envoy(dir.path(), toml);
        for t in &policy.tests {
            envoy_decides_as_natively(
                &envoy,
                port,
                &policy,
                &t.query,
                &format!("{file}: {:?}", t.name),
            );
            cases += 1;
        }
        let decisions = envoy
            .stat("wasmcustom.altroute_decisions_total")
            .unwrap()
            .unwrap_or(0);
        assert_eq!(
            decisions,
            policy.tests.len() as u64,
            "{file}: decisions counted"
        );
    }
    println!("decision table through Envoy: {cases} cases equal to native decide");
    assert!(cases >= 20, "the decision table has only {cases} cases");
}

/// A policy of 10,000 patterns (`fixtures::large`): the module in Envoy's V8 loads it and
/// decides from its pattern index as native `decide()` does: exact domains, wildcards and
/// their apex, static routes, org units, letter case, and a domain no rule lists.
#[test]
fn http_face_in_envoy_decides_a_large_policy_as_natively() {
    let dir = tempfile::tempdir().unwrap();
    let toml = altroute_policy::fixtures::large(2_000);
    let policy = compile(&toml).unwrap().policy;
    let (envoy, port) = http_envoy(dir.path(), &toml);
    let plan = |from: &str, to: &str| Query::plan(from, to);
    let no_starttls = |q: Query| {
        q.verdict(
            Hop::Direct,
            "mx.lab.test",
            Starttls::Absent,
            TlsVersion::None,
            CertStatus::None,
        )
    };
    let queries = [
        plan("alice@corp.example", "bob@d1500-3.example"),
        no_starttls(plan("alice@unit7.corp.example", "bob@d1500-3.example")),
        plan("alice@corp.example", "x@mail.w42.example"),
        plan("alice@corp.example", "x@w42.example"),
        plan("alice@corp.example", "X@D1999-4.EXAMPLE"),
        plan("alice@a.unit3.corp.example", "x@route17.example"),
        no_starttls(plan("alice@corp.example", "x@route199.example")),
        no_starttls(plan("alice@corp.example", "x@nowhere.example")),
        no_starttls(plan("alice@corp.example", "x@d0-1.example")),
    ];
    let mut routes = std::collections::BTreeSet::new();
    for q in &queries {
        envoy_decides_as_natively(&envoy, port, &policy, q, &format!("{q:?}"));
        routes.insert(decide(&policy, q).route.to_string());
    }
    // The queries reach every kind of answer the policy gives. (A routed domain asked
    // about at a direct hop without STARTTLS defers: that hop is held to the route
    // host's TLS.)
    assert_eq!(
        routes.into_iter().collect::<Vec<_>>(),
        ["alternate", "defer", "direct", "host"],
    );
}

#[test]
fn http_face_routes_to_the_chosen_pool_and_rejects_with_the_smtp_reply() {
    let dir = tempfile::tempdir().unwrap();
    let suite = TABLE
        .iter()
        .find(|(f, _)| *f == "suite.toml")
        .map(|(_, t)| *t)
        .unwrap();
    let (envoy, port) = http_envoy(dir.path(), suite);
    let no_starttls = |rcpt: &str, hop: Hop| {
        Query::plan("alice@corp.example", rcpt).verdict(
            hop,
            "mx.example",
            Starttls::Absent,
            TlsVersion::None,
            CertStatus::None,
        )
    };
    // Opportunistic mail goes direct.
    let r = ask(port, &no_starttls("x@random.example", Hop::Direct));
    assert_eq!(echoed_decision(&r).0, "direct", "{r:?}");
    // A partner without STARTTLS takes the alternate secure route.
    let r = ask(port, &no_starttls("bob@partner.example", Hop::Direct));
    assert_eq!(echoed_decision(&r).0, "alternate", "{r:?}");
    // A static route goes to the host pool.
    let r = ask(port, &Query::plan("alice@corp.example", "x@sub.example"));
    assert_eq!(echoed_decision(&r).0, "host", "{r:?}");
    // The alternate host itself without TLS: deferred by the module, no pool reached.
    let r = ask(port, &no_starttls("bob@partner.example", Hop::Alternate));
    assert_eq!(u32::from(r.status), contract::DEFER_STATUS, "{r:?}");
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.starts_with("451 4.7.10 "), "SMTP reply body: {body:?}");
    assert_eq!(r.header(contract::ROUTE), Some("defer"));
    // A forged decision header does not route: the module removes it and decides.
    let q = Query::plan("alice@corp.example", "x@random.example");
    let mut headers = contract::encode_query(&q);
    headers.push((contract::ROUTE, "alternate".to_string()));
    let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let r = http_request(SocketAddr::from(([127, 0, 0, 1], port)), "GET", "/", &pairs).unwrap();
    let (pool, got) = echoed_decision(&r);
    assert_eq!(pool, "direct");
    assert_eq!(
        got.iter().filter(|(n, _)| n == contract::ROUTE).count(),
        1,
        "exactly one route header: {got:?}"
    );
    // Missing facts: a fault, deferred (never routed).
    let r = http_request(SocketAddr::from(([127, 0, 0, 1], port)), "GET", "/", &[]).unwrap();
    assert_eq!(u32::from(r.status), contract::DEFER_STATUS, "{r:?}");
    // A fact given twice, an opportunistic recipient then a TLS-required one: the module
    // does not guess which the upstream would act on. Deferred, no pool reached. Before,
    // the first copy was decided (direct, opportunistic) and both went upstream.
    let mut headers =
        contract::encode_query(&Query::plan("alice@corp.example", "x@random.example"));
    headers.push((contract::RECIPIENT, "bob@partner.example".to_string()));
    let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let r = http_request(SocketAddr::from(([127, 0, 0, 1], port)), "GET", "/", &pairs).unwrap();
    assert_eq!(u32::from(r.status), contract::DEFER_STATUS, "{r:?}");
    assert_eq!(r.header(contract::ROUTE), Some("defer"));
    assert!(
        r.header(contract::REASON)
            .is_some_and(|reason| reason.contains("given more than once")),
        "{r:?}"
    );
    // A recipient an MTA would read as another mailbox (a comment in the domain: Postfix
    // delivers it to bob@partner.example): refused as a fact, deferred. Before, it was
    // decided as written, opportunistic, and routed to the direct pool.
    let q = Query::plan("alice@corp.example", "bob@(c)partner.example");
    let r = ask(port, &q);
    assert_eq!(u32::from(r.status), contract::DEFER_STATUS, "{r:?}");
    assert_eq!(r.header(contract::RULE), Some("fault"));
    assert_eq!(
        envoy
            .stat("wasmcustom.altroute_policy_faults_total")
            .unwrap(),
        Some(3)
    );
}

/// The SMTP edge of `deploy/envoy/smtp.yaml` with its ECDS file.
struct Edge {
    envoy: Envoy,
    listen: u16,
    alternate_listen: u16,
    direct: SmtpServer,
    alternate: SmtpServer,
    ecds: std::path::PathBuf,
    module: String,
    _dir: tempfile::TempDir,
}

const PARTNERS_V1: &str = r#"
[policy]
name = "edge"

[[tls_compliance]]
name = "partners"
domains = ["partner.example", "xn--prtner-bua.example"]
"#;

const PARTNERS_V2: &str = r#"
[policy]
name = "edge"

[[tls_compliance]]
name = "partners"
domains = ["partner.example", "flip.example"]
"#;

fn stream_config(toml: &str, alternate_listen: u16) -> String {
    let compiled = compile(toml).expect("the policy compiles");
    format!(
        r#"{{"policy": {}, "connection_routes": [{{"destination_port": {alternate_listen}, "cluster": "mx_alternate"}}, {{"source_ip": "127.0.0.2", "cluster": "mx_alternate"}}]}}"#,
        compiled.json
    )
}

fn ecds_file(module: &str, version: &str, stream_config: &str) -> String {
    render(
        &template("ecds-smtp.yaml"),
        &[
            ("VERSION", version),
            ("MODULE", module),
            ("STREAM_CONFIG_JSON", stream_config),
        ],
    )
}

/// The ECDS edge of `smtp.yaml` in `dir`, in front of the given upstream ports. Returns
/// Envoy, its two listen ports, the ECDS file and the module path.
fn start_edge(
    dir: &Path,
    direct_port: u16,
    alternate_port: u16,
) -> (Envoy, u16, u16, std::path::PathBuf, String) {
    let module = write_module(dir, "altroute_policy-v1.wasm")
        .display()
        .to_string();
    let (listen, alternate_listen) = (free_port(), free_port());
    // Laid out as a mounted ConfigMap: updates are either renamed over the path or
    // published by a `..data` swap (`configmap_update`).
    let cm = dir.join("cm");
    let ecds = cm.join("altroute-smtp.ecds.yaml");
    configmap_update(
        &cm,
        "altroute-smtp.ecds.yaml",
        "v1",
        &ecds_file(&module, "1", &stream_config(PARTNERS_V1, alternate_listen)),
    )
    .unwrap();
    let config = render(
        &template("smtp.yaml"),
        &[
            ("LISTEN_PORT", &listen.to_string()),
            ("ALTERNATE_LISTEN_PORT", &alternate_listen.to_string()),
            ("DIRECT_PORT", &direct_port.to_string()),
            ("ALTERNATE_PORT", &alternate_port.to_string()),
            ("ECDS_PATH", &ecds.display().to_string()),
            ("ECDS_DIR", &cm.display().to_string()),
        ],
    );
    let envoy = Envoy::start(&config, dir).unwrap();
    (envoy, listen, alternate_listen, ecds, module)
}

fn edge(trickle: bool) -> Edge {
    let dir = tempfile::tempdir().unwrap();
    let direct = SmtpServer::start("mx-direct", trickle).unwrap();
    let alternate = SmtpServer::start("mx-alternate", trickle).unwrap();
    let (envoy, listen, alternate_listen, ecds, module) =
        start_edge(dir.path(), direct.port, alternate.port);
    Edge {
        envoy,
        listen,
        alternate_listen,
        direct,
        alternate,
        ecds,
        module,
        _dir: dir,
    }
}

const REFUSED: &str = "450 4.7.10 TLS required for <bob@partner.example>\r\n";

/// One pipelined transaction: a TLS-required and an opportunistic recipient.
fn pipelined_transaction(edge: &Edge, bytewise: bool) {
    let mut c = SmtpClient::connect(edge.listen, None).unwrap();
    let send = |c: &mut SmtpClient, b: &[u8]| {
        if bytewise {
            c.send_bytewise(b).unwrap()
        } else {
            c.send(b).unwrap()
        }
    };
    let greeting = c.reply().unwrap();
    assert!(greeting.starts_with("220 mx-direct"), "{greeting:?}");
    send(&mut c, b"EHLO client.example\r\n");
    let ehlo = c.reply().unwrap();
    assert!(ehlo.contains("PIPELINING"), "{ehlo:?}");
    send(
        &mut c,
        b"MAIL FROM:<alice@corp.example>\r\nRCPT TO:<bob@partner.example>\r\nRCPT TO:<carol@random.example>\r\nDATA\r\n",
    );
    let replies = c.replies(4).unwrap();
    assert!(replies[0].starts_with("250 "), "MAIL: {replies:?}");
    assert_eq!(replies[1], REFUSED, "TLS-required recipient: {replies:?}");
    assert!(
        replies[2].starts_with("250 "),
        "opportunistic recipient: {replies:?}"
    );
    assert!(replies[3].starts_with("354 "), "DATA: {replies:?}");
    send(
        &mut c,
        b"Subject: edge\r\n\r\nRCPT TO:<bob@partner.example>\r\n.\r\nQUIT\r\n",
    );
    let end = c.replies(2).unwrap();
    assert!(end[0].starts_with("250 "), "end of data: {end:?}");
    assert!(end[1].starts_with("221 "), "QUIT: {end:?}");
}

#[test]
fn smtp_edge_refuses_only_the_tls_required_recipient_under_pipelining() {
    let edge = edge(false);
    pipelined_transaction(&edge, false);

    let messages = edge.direct.messages();
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(
        messages[0].recipients,
        vec!["carol@random.example".to_string()]
    );
    // The body line that looks like a command was not touched.
    assert!(messages[0].data.contains("RCPT TO:<bob@partner.example>"));
    let commands = edge.direct.commands();
    assert!(commands.contains(&"NOOP".to_string()), "{commands:?}");
    assert!(
        !commands
            .iter()
            .any(|c| c == "RCPT TO:<bob@partner.example>"),
        "the refused RCPT reached the upstream: {commands:?}"
    );

    let stat = |n: &str| edge.envoy.stat(&format!("wasmcustom.{n}")).unwrap();
    assert_eq!(stat("altroute_smtp_sessions_total"), Some(1));
    assert_eq!(stat("altroute_smtp_recipients_checked_total"), Some(2));
    assert_eq!(stat("altroute_smtp_recipients_rejected_total"), Some(1));
    assert_eq!(stat("altroute_smtp_rejected_tls_compliance_total"), Some(1));
    assert_eq!(stat("altroute_smtp_rejected_requiretls_total"), Some(0));
}

/// RCPT pipelined after DATA: the first RCPT becomes NOOP, so the upstream refuses DATA
/// and would read the second RCPT as a command. The module closes the session instead.
#[test]
fn smtp_edge_closes_a_session_that_sends_past_data_before_its_reply() {
    let edge = edge(false);
    let mut c = SmtpClient::connect(edge.listen, None).unwrap();
    c.reply().unwrap();
    c.send(b"EHLO client.example\r\n").unwrap();
    c.reply().unwrap();
    c.send(b"MAIL FROM:<alice@corp.example>\r\nRCPT TO:<bob@partner.example>\r\nDATA\r\nRCPT TO:<bob@partner.example>\r\n")
        .unwrap();
    let rest = c.read_until_closed().unwrap();
    let commands = edge.direct.commands();
    assert!(
        !commands.iter().any(|c| c.starts_with("RCPT")),
        "a RCPT reached the upstream: {commands:?}, client saw {:?}",
        String::from_utf8_lossy(&rest)
    );
    assert!(edge.direct.messages().is_empty());
    assert_eq!(
        edge.envoy
            .wait_stat("wasmcustom.altroute_smtp_sessions_closed_total", 1)
            .unwrap(),
        1
    );
}

#[test]
fn smtp_edge_pairs_replies_when_both_directions_are_split_byte_by_byte() {
    // The upstream writes its replies one byte at a time and the client sends one byte
    // at a time.
    let edge = edge(true);
    pipelined_transaction(&edge, true);
    let messages = edge.direct.messages();
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(
        messages[0].recipients,
        vec!["carol@random.example".to_string()]
    );

    // REQUIRETLS on MAIL FROM makes every recipient TLS-required on this clear session.
    let mut c = SmtpClient::connect(edge.listen, None).unwrap();
    c.reply().unwrap();
    c.send(b"EHLO client.example\r\n").unwrap();
    c.reply().unwrap();
    c.send_bytewise(b"MAIL FROM:<alice@corp.example> REQUIRETLS\r\nRCPT TO:<carol@random.example>\r\nRSET\r\nQUIT\r\n")
        .unwrap();
    let replies = c.replies(4).unwrap();
    assert_eq!(
        replies[1], "450 4.7.10 TLS required for <carol@random.example>\r\n",
        "{replies:?}"
    );
    assert_eq!(
        edge.envoy
            .stat("wasmcustom.altroute_smtp_rejected_requiretls_total")
            .unwrap(),
        Some(1)
    );
}

#[test]
fn connection_routing_picks_the_upstream_cluster() {
    let edge = edge(false);
    let greet = |port: u16, source: Option<IpAddr>| {
        let mut c = SmtpClient::connect(port, source).unwrap();
        c.reply().unwrap()
    };
    assert!(greet(edge.listen, None).starts_with("220 mx-direct"));
    assert!(
        greet(edge.alternate_listen, None).starts_with("220 mx-alternate"),
        "by port"
    );
    let from = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    assert!(
        greet(edge.listen, from).starts_with("220 mx-alternate"),
        "by source address"
    );
    assert_eq!(
        edge.envoy
            .stat("wasmcustom.altroute_connections_routed_total")
            .unwrap(),
        Some(2)
    );
    // The alternate edge enforces the same policy.
    let mut c = SmtpClient::connect(edge.alternate_listen, None).unwrap();
    c.reply().unwrap();
    c.send(b"HELO c\r\nMAIL FROM:<a@corp.example>\r\nRCPT TO:<bob@partner.example>\r\n")
        .unwrap();
    assert_eq!(c.replies(3).unwrap()[2], REFUSED);
    let commands = edge.alternate.commands();
    assert!(commands.contains(&"NOOP".to_string()), "{commands:?}");
    assert!(
        edge.direct.commands().is_empty(),
        "the direct MX got commands"
    );
}

fn rcpt_reply(port: u16, rcpt: &str) -> String {
    let mut c = SmtpClient::connect(port, None).unwrap();
    c.reply().unwrap();
    c.send(
        format!("HELO c\r\nMAIL FROM:<a@corp.example>\r\nRCPT TO:<{rcpt}>\r\nQUIT\r\n").as_bytes(),
    )
    .unwrap();
    c.replies(4).unwrap().swap_remove(2)
}

/// A recipient domain written in Unicode (SMTPUTF8) is held to the rule for its A-label
/// in Envoy as in the relay: the SMTP edge refuses it in a clear-text session, and the
/// HTTP face decides it as native `decide()` does. Before, `bob@pärtner.example` passed
/// the rule for `xn--prtner-bua.example` at the edge.
#[test]
fn a_unicode_recipient_domain_is_held_to_the_rule_for_its_a_label() {
    let edge = edge(false);
    for rcpt in [
        "bob@pärtner.example",
        "bob@PÄRTNER.example.",
        "bob@xn--prtner-bua.example",
    ] {
        let reply = rcpt_reply(edge.listen, rcpt);
        assert!(
            reply.starts_with("450 4.7.10 TLS required for <"),
            "{rcpt}: {reply}"
        );
    }
    assert!(rcpt_reply(edge.listen, "bob@partner-ä.example").starts_with("250 "));
    assert!(
        edge.direct
            .commands()
            .iter()
            .all(|c| !c.contains("rtner.example")),
        "a refused recipient reached the upstream: {:?}",
        edge.direct.commands()
    );

    let dir = tempfile::tempdir().unwrap();
    let policy = compile(PARTNERS_V1).unwrap().policy;
    let (envoy, port) = http_envoy(dir.path(), PARTNERS_V1);
    for rcpt in [
        "bob@pärtner.example",
        "bob@PÄRTNER.example.",
        "bob@partner-ä.example",
    ] {
        let q = Query::plan("alice@corp.example", rcpt);
        envoy_decides_as_natively(&envoy, port, &policy, &q, rcpt);
        let required = decide(&policy, &q).tls.required;
        assert_eq!(required, !rcpt.contains('-'), "{rcpt}");
    }
}

/// RCPT commands spelled as servers read them but not as `RCPT TO:<addr>` are checked or
/// refused at the Envoy edge, never forwarded unchecked: a tab or two spaces between the
/// words, a quoted local part with a `>` in it, a line padded past the follower's 4 KiB
/// (Postfix would read its first 2048 bytes as a RCPT), and an argument that is no
/// `TO:`. Before, each of them reached the upstream in clear text.
#[test]
fn smtp_edge_checks_every_spelling_of_rcpt_and_forwards_none_it_cannot_read() {
    let edge = edge(false);
    let padded = format!("RCPT TO:<bob@partner.example>{}", " ".repeat(5000));
    let cases: [(&str, &str); 5] = [
        (
            "RCPT\tTO:<bob@partner.example>",
            "450 4.7.10 TLS required for <bob@partner.example>",
        ),
        (
            "RCPT  TO: <bob@partner.example>",
            "450 4.7.10 TLS required for <bob@partner.example>",
        ),
        (
            "RCPT TO:<\"a>b\"@partner.example>",
            "450 4.7.10 TLS required for <\"a>b\"@partner.example>",
        ),
        (&padded, "500 5.5.6 Line too long"),
        (
            "RCPT <bob@partner.example>",
            "501 5.5.4 Syntax: RCPT TO:<address>",
        ),
    ];
    for (rcpt, want) in cases {
        let mut c = SmtpClient::connect(edge.listen, None).unwrap();
        c.reply().unwrap();
        c.send(format!("HELO c\r\nMAIL FROM:<a@corp.example>\r\n{rcpt}\r\nQUIT\r\n").as_bytes())
            .unwrap();
        let replies = c.replies(4).unwrap();
        assert_eq!(
            replies[2],
            format!("{want}\r\n"),
            "{}",
            &rcpt[..40.min(rcpt.len())]
        );
        assert!(replies[3].starts_with("221"), "{replies:?}");
    }
    let commands = edge.direct.commands();
    assert!(
        commands.iter().all(|c| !c.contains("partner.example")),
        "a RCPT reached the upstream unchecked: {commands:?}"
    );
    assert_eq!(
        commands.iter().filter(|c| c.starts_with("NOOP")).count(),
        5,
        "{commands:?}"
    );

    // Postfix's smtp-sink takes `RCPT\tTO:` as a RCPT (250 2.1.5): through the edge, the
    // message reaches it for the opportunistic recipient only.
    let dir = tempfile::tempdir().unwrap();
    let sink = PostfixSink::start(dir.path()).unwrap();
    let (_envoy, listen, ..) = start_edge(dir.path(), sink.port, sink.port);
    let mut c = SmtpClient::connect(listen, None).unwrap();
    c.reply().unwrap();
    c.send(b"HELO c\r\nMAIL FROM:<a@corp.example>\r\nRCPT\tTO:<bob@partner.example>\r\nRCPT\tTO:<carol@random.example>\r\nDATA\r\n")
        .unwrap();
    let replies = c.replies(5).unwrap();
    assert_eq!(
        replies[2], "450 4.7.10 TLS required for <bob@partner.example>\r\n",
        "{replies:?}"
    );
    assert!(
        replies[3].starts_with("250 ") && replies[4].starts_with("354"),
        "{replies:?}"
    );
    c.send(b"Subject: tab\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        .unwrap();
    let replies = c.replies(2).unwrap();
    assert!(replies[0].starts_with("250 "), "{replies:?}");
    let messages = sink.messages().unwrap();
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(
        dumped_recipients(&messages[0]),
        vec!["carol@random.example".to_string()],
        "smtp-sink got the message for the opportunistic recipient only"
    );
}

/// Commands pipelined after `STARTTLS`, before its reply: Postfix's smtp-sink refuses
/// STARTTLS (`500 5.5.1`) and then takes them as commands in clear text, so they were an
/// unchecked RCPT. The edge drops them and closes the session: smtp-sink gets no RCPT.
#[test]
fn smtp_edge_closes_a_session_that_pipelines_past_starttls() {
    let dir = tempfile::tempdir().unwrap();
    let sink = PostfixSink::start(dir.path()).unwrap();
    let (envoy, listen, ..) = start_edge(dir.path(), sink.port, sink.port);
    let mut c = SmtpClient::connect(listen, None).unwrap();
    c.reply().unwrap();
    c.send(b"EHLO client.example\r\n").unwrap();
    c.reply().unwrap();
    c.send(
        b"STARTTLS\r\nMAIL FROM:<alice@corp.example>\r\nRCPT TO:<bob@partner.example>\r\nDATA\r\n",
    )
    .unwrap();
    let rest = String::from_utf8_lossy(&c.read_until_closed().unwrap()).into_owned();
    assert!(!rest.contains("2.1.5"), "a RCPT was accepted: {rest:?}");
    assert!(sink.messages().unwrap().is_empty());
    assert_eq!(
        envoy
            .wait_stat("wasmcustom.altroute_smtp_sessions_closed_total", 1)
            .unwrap(),
        1
    );
}

#[test]
fn ecds_reload_applies_a_new_policy_to_new_connections() {
    let mut edge = edge(false);
    let pid = edge.envoy.pid();
    let updates = "extension_config_discovery.network_filter.altroute.smtp.update_success";
    let rejected = "extension_config_discovery.network_filter.altroute.smtp.update_rejected";
    assert_eq!(edge.envoy.stat(updates).unwrap(), Some(1));
    assert!(rcpt_reply(edge.listen, "x@flip.example").starts_with("250 "));

    // A connection opened before the reload keeps the filter it started with.
    let mut old = SmtpClient::connect(edge.listen, None).unwrap();
    old.reply().unwrap();

    // Version 2: flip.example now requires TLS. Moved into place under a new name.
    let v2 = stream_config(PARTNERS_V2, edge.alternate_listen);
    move_into_place(&edge.ecds, &ecds_file(&edge.module, "2", &v2)).unwrap();
    edge.envoy.wait_stat(updates, 2).unwrap();
    assert_eq!(
        rcpt_reply(edge.listen, "x@flip.example"),
        "450 4.7.10 TLS required for <x@flip.example>\r\n"
    );
    old.send(b"HELO c\r\nMAIL FROM:<a@corp.example>\r\nRCPT TO:<x@flip.example>\r\n")
        .unwrap();
    let r = old.replies(3).unwrap();
    assert!(
        r[2].starts_with("250 "),
        "old connection, old policy: {r:?}"
    );
    // The old session completes under the old policy.
    old.send(b"DATA\r\n").unwrap();
    assert!(old.reply().unwrap().starts_with("354"));
    old.send(b"Subject: t\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        .unwrap();
    let r = old.replies(2).unwrap();
    assert!(r[0].starts_with("250 ") && r[1].starts_with("221"), "{r:?}");
    // Same Envoy process: no restart was needed.
    assert!(edge.envoy.alive(), "Envoy exited during the reload");
    assert_eq!(edge.envoy.pid(), pid);

    // A policy that fails its own tests is rejected (NACK); v2 keeps serving.
    let broken = PARTNERS_V2.to_string()
        + "\n[[tests]]\nname = \"wrong\"\nquery = { phase = \"plan\", sender = \"a@corp.example\", recipient = \"x@flip.example\" }\nexpect = { tls_required = false }\n";
    let compiled = altroute_policy::compile_without_tests(&broken).unwrap();
    let config = format!(r#"{{"policy": {}}}"#, compiled.json);
    move_into_place(&edge.ecds, &ecds_file(&edge.module, "3", &config)).unwrap();
    edge.envoy.wait_stat(rejected, 1).unwrap();
    assert_eq!(
        rcpt_reply(edge.listen, "x@flip.example"),
        "450 4.7.10 TLS required for <x@flip.example>\r\n"
    );

    // A Kubernetes ConfigMap update: the kubelet swaps the `..data` symlink and never
    // renames anything over the file's path. Version 4 goes back to v1's policy (flip
    // opportunistic). Without `watched_directory` Envoy never saw such a swap.
    let cm = edge.ecds.parent().unwrap().to_path_buf();
    std::fs::remove_file(&edge.ecds).unwrap();
    let v4 = stream_config(PARTNERS_V1, edge.alternate_listen);
    configmap_update(
        &cm,
        "altroute-smtp.ecds.yaml",
        "v4",
        &ecds_file(&edge.module, "4", &v4),
    )
    .unwrap();
    edge.envoy.wait_stat(updates, 3).unwrap();
    assert!(rcpt_reply(edge.listen, "x@flip.example").starts_with("250 "));
    assert_eq!(edge.envoy.pid(), pid);
}

/// swaks (Debian) -> Envoy with the module -> Postfix's smtp-sink: one message to a
/// TLS-required and an opportunistic recipient on a clear-text session.
fn swaks_through_the_edge(pipeline: bool) {
    let dir = tempfile::tempdir().unwrap();
    let sink = PostfixSink::start(dir.path()).unwrap();
    let (envoy, listen, ..) = start_edge(dir.path(), sink.port, sink.port);
    let mut args = vec![
        "--ehlo",
        "client.example",
        "--from",
        "alice@corp.example",
        "--to",
        "bob@partner.example,carol@random.example",
        "--header",
        "Subject: edge",
    ];
    if pipeline {
        args.push("--pipeline");
    }
    let run = swaks(listen, &args).unwrap();
    println!("swaks (pipeline: {pipeline}):\n{}", run.transcript);
    assert!(
        run.transcript
            .contains("<** 450 4.7.10 TLS required for <bob@partner.example>"),
        "swaks shows the refusal:\n{}",
        run.transcript
    );
    let replies = run.replies();
    let refused = replies
        .iter()
        .position(|r| r == "450 4.7.10 TLS required for <bob@partner.example>")
        .unwrap();
    assert!(
        replies[refused - 1].starts_with("250 "),
        "MAIL: {replies:?}"
    );
    assert!(
        replies[refused + 1].starts_with("250 "),
        "opportunistic recipient accepted: {replies:?}"
    );
    assert!(
        replies[refused + 2].starts_with("354 "),
        "DATA: {replies:?}"
    );
    assert!(
        replies.iter().any(|r| r.starts_with("221")),
        "QUIT: {replies:?}"
    );

    let messages = sink.messages().unwrap();
    assert_eq!(messages.len(), 1, "{messages:?}");
    println!("smtp-sink dump:\n{}", messages[0]);
    assert_eq!(
        dumped_recipients(&messages[0]),
        vec!["carol@random.example".to_string()],
        "smtp-sink got the message for the opportunistic recipient only"
    );
    assert!(messages[0].contains("Subject: edge"));
    let stat = |n: &str| envoy.stat(&format!("wasmcustom.{n}")).unwrap();
    assert_eq!(stat("altroute_smtp_recipients_checked_total"), Some(2));
    assert_eq!(stat("altroute_smtp_recipients_rejected_total"), Some(1));
}

#[test]
fn swaks_through_the_edge_to_smtp_sink() {
    swaks_through_the_edge(false);
}

#[test]
fn swaks_pipelined_through_the_edge_to_smtp_sink() {
    swaks_through_the_edge(true);
}

#[test]
fn starttls_session_passes_the_edge_untouched() {
    // smtp-sink has no STARTTLS: the lab sink with a certificate of a test CA is the MX.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = TestCa::new("altroute envoy test CA").unwrap();
    let cert = ca
        .issue(&["mx.example", "127.0.0.1"], Validity::Valid)
        .unwrap();
    let mut config = SinkConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), "mx.example");
    config.starttls = Some(cert.rustls_server_config().unwrap());
    let sink = rt.block_on(SmtpSink::start(config)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = sink.addr().port();
    let (envoy, listen, ..) = start_edge(dir.path(), port, port);

    // Without --tls-verify (swaks does not verify by default): the CA is a test CA.
    let run = swaks(
        listen,
        &[
            "--tls",
            "--ehlo",
            "client.example",
            "--from",
            "alice@corp.example",
            "--to",
            "bob@partner.example",
        ],
    )
    .unwrap();
    println!("swaks --tls:\n{}", run.transcript);
    assert!(run.success, "swaks failed:\n{}", run.transcript);
    assert!(
        run.transcript.contains("=== TLS started"),
        "{}",
        run.transcript
    );
    assert!(
        run.transcript.contains("<~  250 ") && !run.transcript.contains("4.7.10"),
        "the TLS-required recipient is accepted after STARTTLS:\n{}",
        run.transcript
    );
    let messages = rt
        .block_on(sink.wait_for_messages(1, std::time::Duration::from_secs(20)))
        .unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].rcpt_to, vec!["bob@partner.example".to_string()]);
    assert!(messages[0].tls_version.is_some(), "{:?}", messages[0]);
    let sessions = sink.sessions();
    let tls = sessions.iter().find_map(|s| s.tls.clone()).unwrap();
    println!("upstream session: TLS {} {}", tls.version, tls.cipher);
    // The filter saw no recipient in clear text: it did not look at encrypted bytes.
    let stat = |n: &str| envoy.stat(&format!("wasmcustom.{n}")).unwrap();
    assert_eq!(stat("altroute_smtp_recipients_checked_total"), Some(0));
    assert_eq!(stat("altroute_smtp_recipients_rejected_total"), Some(0));
    assert_eq!(stat("altroute_smtp_starttls_sessions_total"), Some(1));
}

#[test]
fn a_trapping_module_fails_closed() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let upstream = SmtpServer::start("mx-direct", false).unwrap();
    let module = write_trapping_module(dir.path(), "trap.wasm").unwrap();
    let listen = free_port();
    let config = render(
        &template("edge-static.yaml"),
        &[
            ("LISTEN_PORT", &listen.to_string()),
            ("UPSTREAM_PORT", &upstream.port.to_string()),
            ("MODULE", &module.display().to_string()),
            ("STREAM_CONFIG_JSON", "{}"),
        ],
    );
    let envoy = Envoy::start(&config, dir.path()).unwrap();
    for attempt in 1..=2 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", listen)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let mut got = Vec::new();
        let end = s.read_to_end(&mut got);
        println!(
            "client, connection {attempt}: read {:?} -> {:?} ({} bytes: {:?})",
            end.as_ref().map(|_| "EOF"),
            end.as_ref().err().map(|e| e.kind()),
            got.len(),
            String::from_utf8_lossy(&got)
        );
        assert!(got.is_empty(), "no greeting may pass: {got:?}");
        match end {
            Ok(_) => {}
            Err(e) => assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset,
                "closed, not left hanging: {e}"
            ),
        }
    }
    assert!(
        upstream.commands().is_empty(),
        "nothing reached the MX: {:?}",
        upstream.commands()
    );
    let log = envoy.log_tail();
    let trap: Vec<&str> = log.lines().filter(|l| l.contains("][wasm]")).collect();
    println!("envoy log about the trap:\n{}", trap.join("\n"));
    assert!(
        log.contains("proxy_on_new_connection failed: Uncaught RuntimeError: unreachable"),
        "Envoy logged the trap:\n{log}"
    );
}
