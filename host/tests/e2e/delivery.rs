//! Delivery acceptance tests (issue 5): mail that requires TLS reaches its destination over
//! TLS, directly when the destination can, through the alternate secure route when it
//! can't, and never in clear text.
//!
//! Everything is real: the delivery engine runs in-process on a spool in a tempdir with
//! the wasm policy module; the world is a lab DNS server and SMTP sinks on distinct
//! loopback addresses sharing one port, with certificates from a test CA that the relay
//! trusts (`ca_file`). Time is a `ManualClock`, so a deferred recipient stays deferred
//! until a test moves the clock.

use std::net::SocketAddr;
use std::time::Duration;

use altroute::delivery::DeliveryMetrics;
use altroute::policy_engine::{LoadedPolicy, PolicyEngine};
use altroute_lab::{
    FailAt, SinkConfig, SinkMode, SmtpSink, StripTlsProxy, Validity, free_port, loopback_ip,
};
use altroute_queue::RecipientState;
use proxy_wasm_host::HostConfig;

use crate::inproc::{Lab, Relay, Tls, WAIT, dsn_for, policy};

fn standard(policy: &str) -> PolicyEngine {
    PolicyEngine::standard(policy).unwrap()
}

/// The commands a sink saw, over every session.
fn commands(sink: &SmtpSink) -> Vec<String> {
    sink.sessions()
        .into_iter()
        .flat_map(|s| s.commands)
        .collect()
}

fn assert_no_transaction(sink: &SmtpSink, what: &str) {
    let cmds = commands(sink);
    assert!(
        !cmds.iter().any(|c| {
            let u = c.to_ascii_uppercase();
            u.starts_with("MAIL") || u.starts_with("RCPT") || u.starts_with("DATA")
        }),
        "{what}: nothing of the message may reach it beyond EHLO, got {cmds:?}"
    );
    assert!(sink.messages().is_empty(), "{what}: no message expected");
}

async fn alt_sink(lab: &mut Lab) -> usize {
    lab.sink("alt.lab.test", Tls::Valid, SinkMode::Accept)
        .await
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_domains_go_direct_or_through_the_alternate_route() {
    let mut lab = Lab::new().await;
    let alt = alt_sink(&mut lab).await;
    // (domain, its MX's TLS, where the mail must land: true = direct)
    let cases = [
        ("valid.strict.test", Tls::Valid, true),
        ("plain.strict.test", Tls::None, false),
        ("untrusted.strict.test", Tls::Untrusted, false),
        ("expired.strict.test", Tls::Expired, false),
        ("wrongname.strict.test", Tls::WrongName, false),
        // A rule that only asks for encryption accepts these certificates.
        ("untrusted.lax.test", Tls::Untrusted, true),
        ("expired.lax.test", Tls::Expired, true),
        ("wrongname.lax.test", Tls::WrongName, true),
        // No rule: opportunistic, clear text is fine.
        ("plain.open.test", Tls::None, true),
    ];
    let mut mx = Vec::new();
    for (domain, tls, _) in cases {
        mx.push(
            lab.mx(domain, &format!("mx.{domain}"), tls, SinkMode::Accept)
                .await,
        );
    }
    let relay = Relay::start(&lab, standard(&policy(lab.port, true, ""))).await;
    for (domain, _, _) in cases {
        relay
            .send("alice@corp.test", &[&format!("bob@{domain}")], false)
            .await;
    }
    let rerouted = cases.iter().filter(|c| !c.2).count();
    let at_alt = lab.sinks[alt]
        .wait_for_messages(rerouted, WAIT)
        .await
        .unwrap();
    for (i, (domain, tls, direct)) in cases.iter().enumerate() {
        let sink = &lab.sinks[mx[i]];
        let rcpt = format!("bob@{domain}");
        if *direct {
            let got = sink.wait_for_messages(1, WAIT).await.unwrap();
            assert_eq!(got[0].rcpt_to, vec![rcpt.clone()], "{domain}");
            if *tls == Tls::None {
                assert_eq!(
                    got[0].tls_version, None,
                    "{domain}: opportunistic, clear text"
                );
            } else {
                assert_eq!(
                    got[0].tls_version.as_deref(),
                    Some("1.3"),
                    "{domain}: over TLS"
                );
            }
            assert!(
                !at_alt.iter().any(|m| m.rcpt_to.contains(&rcpt)),
                "{domain} must not be rerouted"
            );
        } else {
            assert_no_transaction(sink, domain);
            let m = at_alt
                .iter()
                .find(|m| m.rcpt_to.contains(&rcpt))
                .unwrap_or_else(|| panic!("{domain}: expected at the alternate host"));
            assert_eq!(
                m.tls_version.as_deref(),
                Some("1.3"),
                "{domain}: alternate over TLS"
            );
            assert!(String::from_utf8_lossy(&m.data).contains("confidential body"));
        }
    }
    assert_eq!(lab.sinks[alt].messages().len(), rerouted);
    // The sink has the message a moment before the relay records it.
    let deadline = tokio::time::Instant::now() + WAIT;
    while DeliveryMetrics::count(&relay.metrics.deliveries, &[("route", "alternate")])
        < rerouted as u64
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "deliveries not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(relay.metrics.safety_floor_violations.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_alternate_route_tls_failure_defers_or_bounces_with_dsn() {
    // Defer (the default).
    let mut lab = Lab::new().await;
    let mx = lab
        .mx(
            "plain.strict.test",
            "mx.plain.strict.test",
            Tls::None,
            SinkMode::Accept,
        )
        .await;
    let relay = Relay::start(&lab, standard(&policy(lab.port, false, ""))).await;
    let id = relay
        .send("alice@corp.test", &["bob@plain.strict.test"], false)
        .await;
    let states = relay
        .settled(&id)
        .await
        .expect("deferred message stays queued");
    match &states[0] {
        RecipientState::Deferred {
            reason, attempts, ..
        } => {
            assert_eq!(*attempts, 1);
            assert!(reason.starts_with("451 4.7.10"), "{reason}");
        }
        other => panic!("expected deferred, got {other:?}"),
    }
    assert_no_transaction(&lab.sinks[mx], "MX without STARTTLS");

    // Bounce, per policy setting: a DSN goes to the sender (whose domain has a sink).
    let mut lab = Lab::new().await;
    let mx = lab
        .mx(
            "plain.strict.test",
            "mx.plain.strict.test",
            Tls::None,
            SinkMode::Accept,
        )
        .await;
    let sender_mx = lab
        .mx("corp.test", "mx.corp.test", Tls::Valid, SinkMode::Accept)
        .await;
    let relay = Relay::start(
        &lab,
        standard(&policy(lab.port, false, "on_tls_unavailable = \"bounce\"")),
    )
    .await;
    relay
        .send("alice@corp.test", &["bob@plain.strict.test"], false)
        .await;
    let dsn = lab.sinks[sender_mx]
        .wait_for_messages(1, WAIT)
        .await
        .unwrap();
    assert_eq!(dsn[0].mail_from, "", "a DSN has the null sender");
    assert_eq!(dsn[0].rcpt_to, vec!["alice@corp.test".to_string()]);
    let text = String::from_utf8_lossy(&dsn[0].data);
    assert!(text.contains("report-type=delivery-status"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; bob@plain.strict.test"),
        "{text}"
    );
    assert!(text.contains("Status: 5.7.10"), "{text}");
    assert!(!text.contains("confidential body"), "only headers go back");
    assert_no_transaction(&lab.sinks[mx], "MX without STARTTLS");
    assert_eq!(relay.metrics.bounces.get(), 1);
}

/// The DSN extension (RFC 3461) end to end: `NOTIFY=NEVER` gets no failure notice (an
/// audit saw one sent anyway: the parameters were accepted and dropped), a recipient
/// without `NOTIFY` gets one, `RET=FULL` returns the message, `ORCPT` comes back as
/// `Original-Recipient`. A next hop that offers DSN gets the parameters and reports
/// itself; for one that does not, the relay sends `Action: relayed` where `NOTIFY=SUCCESS`
/// asked for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsn_parameters_are_honoured_and_passed_on() {
    use altroute_smtp::dsn::{Notify, RcptDsn, Ret};
    let mut lab = Lab::new().await;
    let sender_mx = lab
        .mx("corp.test", "mx.corp.test", Tls::Valid, SinkMode::Accept)
        .await;
    let refuser = lab
        .mx(
            "refuse.test",
            "mx.refuse.test",
            Tls::None,
            SinkMode::PermFail(FailAt::Rcpt),
        )
        .await;
    let plain = lab
        .mx("plain.test", "mx.plain.test", Tls::None, SinkMode::Accept)
        .await;
    lab.dsn = true;
    let reporting = lab
        .mx("dsn.test", "mx.dsn.test", Tls::None, SinkMode::Accept)
        .await;
    let relay = Relay::start(&lab, standard(&policy(lab.port, false, ""))).await;

    let rcpts = [
        "a@refuse.test",
        "b@refuse.test",
        "c@plain.test",
        "d@dsn.test",
    ];
    let mut env = altroute_queue::Envelope::new(
        "alice@corp.test",
        rcpts.iter().map(|r| r.to_string()).collect(),
    );
    env.ret = Some(Ret::Full);
    env.env_id = Some("env-1".into());
    let success = Notify {
        success: true,
        ..Notify::default()
    };
    env.dsn = vec![
        RcptDsn {
            notify: Notify {
                never: true,
                ..Notify::default()
            },
            orcpt: None,
        },
        RcptDsn::default(),
        RcptDsn {
            notify: success,
            orcpt: Some("C@Orig.test".into()),
        },
        RcptDsn {
            notify: Notify {
                success: true,
                failure: true,
                ..Notify::default()
            },
            orcpt: Some("d+x@orig.test".into()),
        },
    ];
    let msg = b"From: <alice@corp.test>\r\nSubject: dsn\r\n\r\nconfidential body\r\n";
    let id = relay.spool.store(env, msg.to_vec()).await.unwrap();
    assert!(relay.removed(&id).await, "every recipient final");

    let notices = lab.sinks[sender_mx]
        .wait_for_messages(2, WAIT)
        .await
        .unwrap();
    assert_eq!(notices.len(), 2, "one failure notice, one success notice");
    let texts: Vec<String> = notices
        .iter()
        .map(|m| String::from_utf8_lossy(&m.data).into_owned())
        .collect();
    let failed = texts
        .iter()
        .find(|t| t.contains("Action: failed"))
        .expect("a failure notice");
    assert!(
        failed.contains("Final-Recipient: rfc822; b@refuse.test"),
        "{failed}"
    );
    assert!(!failed.contains("a@refuse.test"), "NOTIFY=NEVER: {failed}");
    assert!(failed.contains("Original-Envelope-Id: env-1"), "{failed}");
    assert!(failed.contains("Content-Type: message/rfc822"), "{failed}");
    assert!(failed.contains("confidential body"), "RET=FULL: {failed}");
    let relayed = texts
        .iter()
        .find(|t| t.contains("Action: relayed"))
        .expect("a relayed notice");
    assert!(
        relayed.contains(
            "Original-Recipient: rfc822; C@Orig.test\r\nFinal-Recipient: rfc822; c@plain.test"
        ),
        "{relayed}"
    );
    assert!(
        !relayed.contains("d@dsn.test"),
        "its next hop reports: {relayed}"
    );
    assert!(relayed.contains("Status: 2.0.0"), "{relayed}");

    // The next hop with DSN got the parameters; the ones without, none.
    let with = commands(&lab.sinks[reporting]);
    assert!(
        with.iter()
            .any(|c| c.starts_with("MAIL FROM:<alice@corp.test>")
                && c.contains(" ENVID=env-1")
                && c.contains(" RET=FULL")),
        "{with:?}"
    );
    assert!(
        with.contains(
            &"RCPT TO:<d@dsn.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;d+2Bx@orig.test".to_string()
        ),
        "{with:?}"
    );
    for sink in [plain, refuser] {
        let without = commands(&lab.sinks[sink]);
        assert!(
            without
                .iter()
                .all(|c| !c.contains("NOTIFY") && !c.contains("RET=") && !c.contains("ORCPT")),
            "{without:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requiretls_is_never_sent_in_clear_text() {
    // A policy without any rule: REQUIRETLS alone makes TLS required.
    let mut lab = Lab::new().await;
    let alt = alt_sink(&mut lab).await;
    let mx = lab
        .mx(
            "plain.open.test",
            "mx.plain.open.test",
            Tls::None,
            SinkMode::Accept,
        )
        .await;
    let relay = Relay::start(&lab, standard(&policy(lab.port, true, ""))).await;
    relay
        .send("alice@corp.test", &["bob@plain.open.test"], true)
        .await;
    let got = lab.sinks[alt].wait_for_messages(1, WAIT).await.unwrap();
    assert_eq!(got[0].tls_version.as_deref(), Some("1.3"));
    assert_no_transaction(&lab.sinks[mx], "REQUIRETLS to an MX without STARTTLS");

    // Without an alternate route: deferred, never the MX.
    let mut lab = Lab::new().await;
    let mx = lab
        .mx(
            "plain.open.test",
            "mx.plain.open.test",
            Tls::None,
            SinkMode::Accept,
        )
        .await;
    let relay = Relay::start(&lab, standard(&policy(lab.port, false, ""))).await;
    let id = relay
        .send("alice@corp.test", &["bob@plain.open.test"], true)
        .await;
    let states = relay.settled(&id).await.unwrap();
    assert!(
        matches!(states[0], RecipientState::Deferred { .. }),
        "{states:?}"
    );
    assert_no_transaction(&lab.sinks[mx], "REQUIRETLS without alternate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dsn_of_requiretls_mail_requires_tls_too() {
    // The sender's MX offers REQUIRETLS: the DSN carries the parameter.
    let mail = dsn_of_requiretls_mail(true).await;
    assert!(mail.contains("REQUIRETLS"), "{mail}");
    // It does not: the DSN still goes, over TLS, without the parameter; a bounce must not
    // be lost for it (RFC 8689 §5).
    let mail = dsn_of_requiretls_mail(false).await;
    assert!(!mail.contains("REQUIRETLS"), "{mail}");
}

/// REQUIRETLS mail bounced at RCPT; the DSN's MAIL command at the sender's MX (which
/// offers REQUIRETLS or not), after checking that it came over TLS from the null sender.
async fn dsn_of_requiretls_mail(sender_offers_requiretls: bool) -> String {
    let mut lab = Lab::new().await;
    lab.mx(
        "refusing.test",
        "mx.refusing.test",
        Tls::Valid,
        SinkMode::PermFail(FailAt::Rcpt),
    )
    .await;
    let sender_mx = if sender_offers_requiretls {
        lab.mx("corp.test", "mx.corp.test", Tls::Valid, SinkMode::Accept)
            .await
    } else {
        mx_without_requiretls(&mut lab, "corp.test", 10, "mx.corp.test").await
    };
    let relay = Relay::start(&lab, standard(&policy(lab.port, false, ""))).await;
    relay
        .send("alice@corp.test", &["bob@refusing.test"], true)
        .await;
    let dsn = lab.sinks[sender_mx]
        .wait_for_messages(1, WAIT)
        .await
        .unwrap();
    assert_eq!(dsn[0].mail_from, "");
    assert!(dsn[0].tls_version.is_some(), "the DSN went over TLS");
    let mut mail: Vec<String> = commands(&lab.sinks[sender_mx])
        .into_iter()
        .filter(|c| c.starts_with("MAIL FROM:<>"))
        .collect();
    assert_eq!(mail.len(), 1, "{mail:?}");
    mail.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtputf8_mail_keeps_its_flag_or_bounces_where_it_cannot_go() {
    let mut lab = Lab::new().await;
    lab.smtputf8 = true;
    let utf8 = lab
        .mx("utf8.test", "mx.utf8.test", Tls::Valid, SinkMode::Accept)
        .await;
    lab.smtputf8 = false;
    let ascii = lab
        .mx("ascii.test", "mx.ascii.test", Tls::Valid, SinkMode::Accept)
        .await;
    let sender_mx = lab
        .mx("corp.test", "mx.corp.test", Tls::Valid, SinkMode::Accept)
        .await;
    let relay = Relay::start(&lab, standard(&policy(lab.port, false, ""))).await;
    let store = |to: &str| {
        let mut env = altroute_queue::Envelope::new("alice@corp.test", vec![to.to_string()]);
        env.smtputf8 = true;
        let msg =
            format!("From: <alice@corp.test>\r\nTo: <{to}>\r\nSubject: caf\u{e9}\r\n\r\nbody\r\n");
        relay.spool.store(env, msg.into_bytes())
    };
    // A server that offers it gets the parameter.
    let id = store("jos\u{e9}@utf8.test").await.unwrap();
    let got = lab.sinks[utf8].wait_for_messages(1, WAIT).await.unwrap();
    assert_eq!(got[0].rcpt_to, vec!["jos\u{e9}@utf8.test".to_string()]);
    let mail: Vec<String> = commands(&lab.sinks[utf8])
        .into_iter()
        .filter(|c| c.starts_with("MAIL"))
        .collect();
    assert!(mail[0].ends_with(" SMTPUTF8"), "{mail:?}");
    assert!(relay.removed(&id).await);
    // One that does not: bounced as RFC 6531 says, never sent without it.
    store("jos\u{e9}@ascii.test").await.unwrap();
    let dsn = lab.sinks[sender_mx]
        .wait_for_messages(1, WAIT)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&dsn[0].data);
    assert!(text.contains("Status: 5.6.7"), "{text}");
    assert!(text.contains("SMTPUTF8 required"), "{text}");
    assert_eq!(relay.metrics.bounces.get(), 1);
    assert_no_transaction(&lab.sinks[ascii], "SMTPUTF8 mail to a server without it");
}

/// Policy patterns are written as A-labels. A recipient at the same domain written in
/// UTF-8 (SMTPUTF8 mail) is asked of the policy as its A-label, so the rule holds: the
/// MX without STARTTLS gets nothing, the alternate secure route takes the mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_utf8_recipient_domain_is_held_to_the_rule_for_its_a_label() {
    let mut lab = Lab::new().await;
    lab.smtputf8 = true;
    let clear = lab
        .mx(
            "xn--bcher-kva.test",
            "mx.xn--bcher-kva.test",
            Tls::None,
            SinkMode::Accept,
        )
        .await;
    let (_, alt) = lab.sink("alt.lab.test", Tls::Valid, SinkMode::Accept).await;
    let rule = "\n[[tls_compliance]]\nname = \"idn-partner\"\ndomains = [\"xn--bcher-kva.test\"]\n";
    let relay = Relay::start(&lab, standard(&policy(lab.port, true, rule))).await;
    let mut env =
        altroute_queue::Envelope::new("alice@corp.test", vec!["bob@b\u{fc}cher.test".to_string()]);
    env.smtputf8 = true;
    let msg = "From: <alice@corp.test>\r\nTo: <bob@b\u{fc}cher.test>\r\nSubject: x\r\n\r\nbody\r\n";
    let id = relay
        .spool
        .store(env, msg.as_bytes().to_vec())
        .await
        .unwrap();
    let got = lab.sinks[alt].wait_for_messages(1, WAIT).await.unwrap();
    // The same mailbox, its domain written as the A-label it was resolved and asked as.
    assert_eq!(got[0].rcpt_to, vec!["bob@xn--bcher-kva.test".to_string()]);
    assert_eq!(got[0].tls_version.as_deref(), Some("1.3"));
    assert!(relay.removed(&id).await, "delivered and removed");
    assert_no_transaction(&lab.sinks[clear], "UTF-8 domain of a TLS rule");
}

/// A module that answers every question with "direct, no TLS required": the relay's
/// safety floor must still refuse to send REQUIRETLS mail in clear text.
const LIAR_WAT: &str = r#"(module
  (import "env" "proxy_add_header_map_value"
    (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "x-altroute-route")
  (data (i32.const 120) "direct")
  (data (i32.const 140) "x-altroute-tls-required")
  (data (i32.const 170) "no")
  (data (i32.const 180) "x-altroute-tls-verify")
  (data (i32.const 210) "none")
  (data (i32.const 220) "x-altroute-tls-min")
  (data (i32.const 240) "1.2")
  (data (i32.const 250) "x-altroute-rule")
  (data (i32.const 270) "liar")
  (data (i32.const 280) "x-altroute-policy-version")
  (data (i32.const 310) "liar-1")
  (global $heap (mut i32) (i32.const 4096))
  (func (export "malloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $add (i32.const 0) (i32.const 100) (i32.const 16) (i32.const 120) (i32.const 6)))
    (drop (call $add (i32.const 0) (i32.const 140) (i32.const 23) (i32.const 170) (i32.const 2)))
    (drop (call $add (i32.const 0) (i32.const 180) (i32.const 21) (i32.const 210) (i32.const 4)))
    (drop (call $add (i32.const 0) (i32.const 220) (i32.const 18) (i32.const 240) (i32.const 3)))
    (drop (call $add (i32.const 0) (i32.const 250) (i32.const 15) (i32.const 270) (i32.const 4)))
    (drop (call $add (i32.const 0) (i32.const 280) (i32.const 25) (i32.const 310) (i32.const 6)))
    (i32.const 0)))"#;

fn wat_engine(wat: &str, lab_port: u16, deadline: Duration) -> PolicyEngine {
    let module = wat::parse_str(wat).unwrap();
    let policy = LoadedPolicy::from_source("e2e", &policy(lab_port, true, "")).unwrap();
    PolicyEngine::new(
        HostConfig {
            deadline,
            warm_instances: 1,
            ..HostConfig::default()
        },
        module,
        &policy,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_floor_holds_against_a_lying_module() {
    let mut lab = Lab::new().await;
    let mx = lab
        .mx(
            "plain.open.test",
            "mx.plain.open.test",
            Tls::None,
            SinkMode::Accept,
        )
        .await;
    let relay = Relay::start(
        &lab,
        // A deadline the liar never nears, even if the machine pauses it: the test is
        // about its answer, not about a fault.
        wat_engine(LIAR_WAT, lab.port, Duration::from_secs(2)),
    )
    .await;
    let id = relay
        .send("alice@corp.test", &["bob@plain.open.test"], true)
        .await;
    let states = relay.settled(&id).await.unwrap();
    match &states[0] {
        RecipientState::Deferred { reason, .. } => {
            assert!(reason.contains("TLS required"), "{reason}")
        }
        other => panic!("expected deferred by the safety floor, got {other:?}"),
    }
    assert_no_transaction(&lab.sinks[mx], "lying module + REQUIRETLS");
    assert_eq!(relay.metrics.safety_floor_violations.get(), 1);

    // The same lie for mail that does not require TLS is obeyed: the floor is a floor.
    let id = relay
        .send("alice@corp.test", &["carol@plain.open.test"], false)
        .await;
    let got = lab.sinks[mx].wait_for_messages(1, WAIT).await.unwrap();
    assert_eq!(got[0].rcpt_to, vec!["carol@plain.open.test".to_string()]);
    assert!(relay.removed(&id).await, "delivered and removed");
}

/// The policy requires verified TLS for `*.strict.test` (a `tls_compliance` rule; no
/// REQUIRETLS, no MTA-STS): a `[policy].module` that answers "no TLS required" cannot lower
/// that, because the floor reads the compiled policy itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_floor_holds_the_policy_tls_rule_against_a_lying_module() {
    let mut lab = Lab::new().await;
    let clear = lab
        .mx(
            "plain.strict.test",
            "mx.plain.strict.test",
            Tls::None,
            SinkMode::Accept,
        )
        .await;
    let verified = lab
        .mx(
            "good.strict.test",
            "mx.good.strict.test",
            Tls::Valid,
            SinkMode::Accept,
        )
        .await;
    let relay = Relay::start(&lab, wat_engine(LIAR_WAT, lab.port, Duration::from_secs(2))).await;
    let id = relay
        .send("alice@corp.test", &["bob@plain.strict.test"], false)
        .await;
    let states = relay.settled(&id).await.unwrap();
    match &states[0] {
        RecipientState::Deferred { reason, .. } => {
            assert!(reason.starts_with("451 4.7.10"), "{reason}");
            assert!(reason.contains("TLS required"), "{reason}");
        }
        other => panic!("expected deferred by the safety floor, got {other:?}"),
    }
    assert_no_transaction(
        &lab.sinks[clear],
        "lying module + policy rule requiring TLS",
    );
    assert_eq!(relay.metrics.safety_floor_violations.get(), 1);

    // Over a connection that meets the policy's requirement, the liar's mail goes.
    let id = relay
        .send("alice@corp.test", &["carol@good.strict.test"], false)
        .await;
    let got = lab.sinks[verified]
        .wait_for_messages(1, WAIT)
        .await
        .unwrap();
    assert_eq!(got[0].tls_version.as_deref(), Some("1.3"));
    assert!(relay.removed(&id).await, "delivered and removed");
    assert_eq!(relay.metrics.safety_floor_violations.get(), 1);
}

/// The policy's own reading by the floor agrees with the standard module: its deliveries
/// (verified TLS where the policy requires it, clear text where it does not) go as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_floor_agrees_with_the_standard_module() {
    let mut lab = Lab::new().await;
    let verified = lab
        .mx(
            "good.strict.test",
            "mx.good.strict.test",
            Tls::Valid,
            SinkMode::Accept,
        )
        .await;
    let clear = lab
        .mx(
            "plain.open.test",
            "mx.plain.open.test",
            Tls::None,
            SinkMode::Accept,
        )
        .await;
    let relay = Relay::start(&lab, standard(&policy(lab.port, true, ""))).await;
    let strict = relay
        .send("alice@corp.test", &["bob@good.strict.test"], false)
        .await;
    let open = relay
        .send("alice@corp.test", &["carol@plain.open.test"], false)
        .await;
    let got = lab.sinks[verified]
        .wait_for_messages(1, WAIT)
        .await
        .unwrap();
    assert_eq!(got[0].tls_version.as_deref(), Some("1.3"));
    let got = lab.sinks[clear].wait_for_messages(1, WAIT).await.unwrap();
    assert_eq!(got[0].tls_version, None);
    assert!(relay.removed(&strict).await && relay.removed(&open).await);
    assert_eq!(relay.metrics.safety_floor_violations.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripped_starttls_is_never_clear_text() {
    let mut lab = Lab::new().await;
    let alt = alt_sink(&mut lab).await;
    // The real MX (valid TLS) sits behind a STARTTLS-stripping proxy; DNS points at the proxy.
    let (real_ip, real) = lab
        .sink("real-mx.strict.test", Tls::Valid, SinkMode::Accept)
        .await;
    let proxy_ip = loopback_ip();
    let proxy = StripTlsProxy::start(
        SocketAddr::new(proxy_ip.into(), lab.port),
        SocketAddr::new(real_ip.into(), lab.port),
    )
    .await
    .unwrap();
    lab.dns
        .add_mx("victim.strict.test", 10, "mx.victim.strict.test")
        .await
        .unwrap();
    lab.dns
        .add_a("mx.victim.strict.test", proxy_ip)
        .await
        .unwrap();
    let relay = Relay::start(&lab, standard(&policy(lab.port, true, ""))).await;
    relay
        .send("alice@corp.test", &["bob@victim.strict.test"], false)
        .await;
    let got = lab.sinks[alt].wait_for_messages(1, WAIT).await.unwrap();
    assert_eq!(got[0].tls_version.as_deref(), Some("1.3"));
    assert!(
        proxy.capabilities_stripped() >= 1,
        "the proxy did strip STARTTLS"
    );
    assert_no_transaction(&lab.sinks[real], "MX behind a STARTTLS stripper");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_mx_down_uses_the_second() {
    let mut lab = Lab::new().await;
    let alt = alt_sink(&mut lab).await;
    // Preference 10: an address where nothing listens (connection refused).
    lab.dns
        .add_mx("two.strict.test", 10, "down.two.strict.test")
        .await
        .unwrap();
    lab.dns
        .add_a("down.two.strict.test", loopback_ip())
        .await
        .unwrap();
    lab.dns
        .add_mx("two.strict.test", 20, "up.two.strict.test")
        .await
        .unwrap();
    let (_, up) = lab
        .sink("up.two.strict.test", Tls::Valid, SinkMode::Accept)
        .await;
    let relay = Relay::start(&lab, standard(&policy(lab.port, true, ""))).await;
    relay
        .send("alice@corp.test", &["bob@two.strict.test"], false)
        .await;
    let got = lab.sinks[up].wait_for_messages(1, WAIT).await.unwrap();
    assert_eq!(got[0].tls_version.as_deref(), Some("1.3"));
    assert!(
        lab.sinks[alt].messages().is_empty(),
        "a refused connection is not a reroute"
    );
    assert!(relay.metrics.connection_failures.get() >= 1);
}

/// An MX that is the relay itself (one of its listen addresses) is never connected to:
/// with no other address left the mail bounces as a loop, at once, instead of going round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mx_pointing_at_the_relay_itself_bounces_as_a_loop() {
    let mut lab = Lab::new().await;
    // A real listener stands for the relay's own SMTP service.
    let (own_ip, own) = lab
        .sink("self.loop.test", Tls::None, SinkMode::Accept)
        .await;
    lab.dns
        .add_mx("loop.open.test", 10, "self.loop.test")
        .await
        .unwrap();
    let sender_mx = lab
        .mx("corp.test", "mx.corp.test", Tls::Valid, SinkMode::Accept)
        .await;
    let port = lab.port;
    let relay = Relay::start_with(&lab, standard(&policy(lab.port, true, "")), |s| {
        s.listen = vec![SocketAddr::new(own_ip.into(), port)];
    })
    .await;
    relay
        .send("alice@corp.test", &["bob@loop.open.test"], false)
        .await;
    let text = dsn_for(
        &lab.sinks[sender_mx],
        "alice@corp.test",
        "bob@loop.open.test",
    )
    .await;
    assert!(text.contains("Status: 5.4.6"), "{text}");
    assert!(
        text.contains("mail for loop.open.test loops back to myself"),
        "{text}"
    );
    assert_eq!(relay.metrics.bounces.get(), 1);
    assert!(
        lab.sinks[own].sessions().is_empty(),
        "the relay never connects to itself"
    );
}

/// The relay among a domain's MX hosts: RFC 5321 §5.1, those as preferred as it or less
/// are not used. As the best MX the mail bounces as a loop at once, without a connection
/// to a backup MX (an audit's two backup MX hosts passed the mail back, and it went
/// round 50 times, each copy taken with 250, until the hop limit); as a backup MX, only
/// the more preferred hosts are used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mx_hosts_less_preferred_than_the_relay_itself_are_not_used() {
    let mut lab = Lab::new().await;
    let (own_ip, own) = lab
        .sink("self.loop.test", Tls::None, SinkMode::Accept)
        .await;
    lab.dns
        .add_mx("backup.open.test", 10, "self.loop.test")
        .await
        .unwrap();
    lab.dns
        .add_mx("backup.open.test", 20, "mx2.backup.open.test")
        .await
        .unwrap();
    let (_, other) = lab
        .sink("mx2.backup.open.test", Tls::None, SinkMode::Accept)
        .await;
    // The relay as a backup MX: the primary takes the mail, the one after the relay is
    // never used.
    let (_, primary) = lab
        .sink("mx1.second.open.test", Tls::None, SinkMode::Accept)
        .await;
    for (pref, host) in [
        (10, "mx1.second.open.test"),
        (20, "self.loop.test"),
        (30, "mx2.backup.open.test"),
    ] {
        lab.dns
            .add_mx("second.open.test", pref, host)
            .await
            .unwrap();
    }
    let sender_mx = lab
        .mx("corp.test", "mx.corp.test", Tls::Valid, SinkMode::Accept)
        .await;
    let port = lab.port;
    let relay = Relay::start_with(&lab, standard(&policy(lab.port, true, "")), |s| {
        s.listen = vec![SocketAddr::new(own_ip.into(), port)];
    })
    .await;
    relay
        .send("alice@corp.test", &["bob@backup.open.test"], false)
        .await;
    let text = dsn_for(
        &lab.sinks[sender_mx],
        "alice@corp.test",
        "bob@backup.open.test",
    )
    .await;
    assert!(text.contains("Status: 5.4.6"), "{text}");
    assert!(
        text.contains("mail for backup.open.test loops back to myself"),
        "{text}"
    );
    let id = relay
        .send("alice@corp.test", &["carol@second.open.test"], false)
        .await;
    lab.sinks[primary].wait_for_messages(1, WAIT).await.unwrap();
    assert!(relay.removed(&id).await, "delivered and removed");
    assert!(lab.sinks[own].sessions().is_empty(), "never to itself");
    assert!(
        lab.sinks[other].sessions().is_empty(),
        "an MX less preferred than the relay was used"
    );
}

/// `domain MX 10 <an IP-like name>`, the name's A record leading to a sink whose
/// certificate names that IP address (not the one connected to): the name and the sink.
async fn ip_like_mx(lab: &mut Lab, domain: &str) -> (String, usize) {
    let (named, ip) = (loopback_ip().to_string(), loopback_ip());
    let mut config = SinkConfig::new(SocketAddr::new(ip.into(), lab.port), "ip-cert");
    config.starttls = Some(
        lab.ca
            .issue(&[&named], Validity::Valid)
            .unwrap()
            .rustls_server_config()
            .unwrap(),
    );
    lab.sinks.push(SmtpSink::start(config).await.unwrap());
    lab.dns.add_mx(domain, 10, &named).await.unwrap();
    lab.dns.add_a(&named, ip).await.unwrap();
    (named, lab.sinks.len() - 1)
}

/// An MX exchange that reads like an IP address is a host name all the same: a
/// certificate for that IP address does not name it, so mail that requires a verified
/// host name goes to the alternate route. An audit's was delivered over a certificate
/// for another address than the one connected to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ip_like_mx_name_is_not_verified_by_an_ip_address_certificate() {
    let mut lab = Lab::new().await;
    let alt = alt_sink(&mut lab).await;
    let (named, mx) = ip_like_mx(&mut lab, "ipname.strict.test").await;
    let relay = Relay::start(&lab, standard(&policy(lab.port, true, ""))).await;
    let id = relay
        .send("alice@corp.test", &["bob@ipname.strict.test"], false)
        .await;
    lab.sinks[alt].wait_for_messages(1, WAIT).await.unwrap();
    assert!(relay.removed(&id).await);
    assert_no_transaction(&lab.sinks[mx], "the MX whose certificate names an address");
    assert_eq!(
        outcome_at(&relay, "bob@ipname.strict.test", &named),
        Some((
            "rerouted".to_string(),
            "certificate-host-mismatch".to_string()
        ))
    );
}

/// The same for the MX hosts of a static route's host (`mx_lookup = true`): the route
/// requires a verified host name, and a certificate for the address its IP-like MX name
/// spells does not give one, so the mail waits (the routing host failed its own TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ip_like_mx_name_of_a_route_host_is_not_verified_by_an_ip_address_certificate() {
    let mut lab = Lab::new().await;
    let (_, mx) = ip_like_mx(&mut lab, "gw.route.test").await;
    let extra = format!(
        "\n[[hosts]]\nname = \"gw\"\naddress = \"gw.route.test\"\nport = {}\nmx_lookup = true\nrequire_tls = true\nrequire_ca_signed = true\nvalidate_hostname = true\n\n[[routes]]\nname = \"via-gw\"\ndomains = [\"routed.open.test\"]\nhost = \"gw\"\n",
        lab.port
    );
    let relay = Relay::start(&lab, standard(&policy(lab.port, true, &extra))).await;
    let id = relay
        .send("alice@corp.test", &["bob@routed.open.test"], false)
        .await;
    let states = relay.settled(&id).await.unwrap();
    let reason = deferred_reason(&states[0]);
    assert!(reason.contains("certificate-host-mismatch"), "{reason}");
    assert_no_transaction(
        &lab.sinks[mx],
        "the route's MX whose certificate names an address",
    );
}

/// An MX exchange names a host (RFC 5321 §5.1, RFC 2181 §10.3): a numeric name without
/// an A record is a host without an address (deferred), not the IP it spells.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_numeric_mx_name_is_looked_up_not_used_as_an_address() {
    let mut lab = Lab::new().await;
    let ip = loopback_ip();
    let config = SinkConfig::new(SocketAddr::new(ip.into(), lab.port), "numeric");
    lab.sinks.push(SmtpSink::start(config).await.unwrap());
    let numeric = lab.sinks.len() - 1;
    lab.dns
        .add_mx("numeric.open.test", 10, &ip.to_string())
        .await
        .unwrap();
    let relay = Relay::start(&lab, standard(&policy(lab.port, true, ""))).await;
    let id = relay
        .send("alice@corp.test", &["bob@numeric.open.test"], false)
        .await;
    let states = relay.settled(&id).await.unwrap();
    match &states[0] {
        RecipientState::Deferred { reason, .. } => {
            assert!(reason.starts_with("451 4.4.3"), "{reason}");
            assert!(reason.contains(&ip.to_string()), "{reason}");
        }
        other => panic!("expected deferred (MX host without address), got {other:?}"),
    }
    assert!(
        lab.sinks[numeric].sessions().is_empty(),
        "nothing connects to the IP the MX name spells"
    );
}

/// A domain with many black-hole MX hosts holds a worker for at most
/// `mx_address_limit` (5) connection attempts per delivery attempt; the rest waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_tries_at_most_mx_address_limit_addresses() {
    let lab = Lab::new().await;
    for i in 0..8u16 {
        // Each a fresh loopback address where nothing listens: connection refused.
        let host = format!("hole{i}.many.open.test");
        lab.dns
            .add_mx("many.open.test", 10 + i, &host)
            .await
            .unwrap();
        lab.dns.add_a(&host, loopback_ip()).await.unwrap();
    }
    let relay = Relay::start(&lab, standard(&policy(lab.port, true, ""))).await;
    let id = relay
        .send("alice@corp.test", &["bob@many.open.test"], false)
        .await;
    let states = relay.settled(&id).await.unwrap();
    match &states[0] {
        RecipientState::Deferred { reason, .. } => {
            assert!(reason.starts_with("451 4.4.1"), "{reason}");
            assert!(reason.contains("hole4.many.open.test"), "{reason}");
            assert!(!reason.contains("hole5.many.open.test"), "{reason}");
            assert!(
                reason.contains("3 more address(es) left for the next attempt"),
                "{reason}"
            );
        }
        other => panic!("expected deferred, got {other:?}"),
    }
    assert_eq!(relay.metrics.connection_failures.get(), 5);
}

/// Hosts that take a session but not the mail (here: no STARTTLS for mail that requires
/// TLS) are tried at most `mx_session_limit` (2) times per attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_opens_at_most_mx_session_limit_sessions() {
    let mut lab = Lab::new().await;
    let mut sinks = Vec::new();
    for i in 0..3u16 {
        let host = format!("mx{i}.three.strict.test");
        lab.dns
            .add_mx("three.strict.test", 10 + i, &host)
            .await
            .unwrap();
        sinks.push(lab.sink(&host, Tls::None, SinkMode::Accept).await.1);
    }
    let relay = Relay::start(&lab, standard(&policy(lab.port, false, ""))).await;
    let id = relay
        .send("alice@corp.test", &["bob@three.strict.test"], false)
        .await;
    let states = relay.settled(&id).await.unwrap();
    assert!(
        matches!(&states[0], RecipientState::Deferred { .. }),
        "{states:?}"
    );
    assert_eq!(lab.sinks[sinks[0]].sessions().len(), 1);
    assert_eq!(lab.sinks[sinks[1]].sessions().len(), 1);
    assert!(
        lab.sinks[sinks[2]].sessions().is_empty(),
        "the third host waits for the next attempt"
    );
}

/// A next hop that never answers the end of the data holds its connection slots, but
/// not every worker: a delivery waits at most the command timeout for one of a host's
/// slots, then that host counts as failed for the attempt. An audit's such MX held 4
/// workers for 10 minutes, 4 more waited for its slots, and a well-behaved domain's mail
/// waited for a worker all that time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_hop_that_never_answers_cannot_hold_every_worker() {
    let mut lab = Lab::new().await;
    for d in ["one.open.test", "two.open.test"] {
        lab.dns.add_mx(d, 10, "mx.tarpit.open.test").await.unwrap();
    }
    let (_, tarpit) = lab
        .sink("mx.tarpit.open.test", Tls::None, SinkMode::SilentAfterData)
        .await;
    let good = lab
        .mx(
            "good.open.test",
            "mx.good.open.test",
            Tls::None,
            SinkMode::Accept,
        )
        .await;
    let relay = Relay::start_with(&lab, standard(&policy(lab.port, false, "")), |s| {
        s.workers = 2;
        s.per_destination = 1;
        s.command_timeout = Duration::from_secs(1);
        s.data_done_timeout = Duration::from_secs(3600);
    })
    .await;
    let first = relay
        .send("alice@corp.test", &["a@one.open.test"], false)
        .await;
    // The first holds the tarpit's only slot (its data sent, no answer coming).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while lab.sinks[tarpit].sessions().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no session at the tarpit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = relay
        .send("alice@corp.test", &["b@two.open.test"], false)
        .await;
    let third = relay
        .send("alice@corp.test", &["c@good.open.test"], false)
        .await;
    // The second gives up waiting for the slot: deferred, its worker free again.
    let states = relay.settled(&second).await.unwrap();
    assert!(
        deferred_reason(&states[0]).contains("connection slots to this host are busy"),
        "{states:?}"
    );
    assert_eq!(
        relay.settled(&third).await,
        None,
        "the good mail was not delivered"
    );
    assert_eq!(lab.sinks[good].messages().len(), 1);
    assert!(
        relay.spool.entry(&first).is_some(),
        "the first is still waiting"
    );
}

/// One policy answers every question of a delivery attempt: a policy applied between
/// the plan and the verdict applies from the next attempt on. An audit's reload of a
/// stricter policy (TLS required, bounce when unavailable) between the two bounced mail
/// that the policy of its plan delivered, and the other way round raised a false alarm
/// of the safety floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_applied_between_plan_and_verdict_waits_for_the_next_attempt() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let lab = Lab::new().await;
    // A next hop that greets only when told: the plan is made, no verdict yet.
    let ip = loopback_ip();
    let listener = tokio::net::TcpListener::bind((ip, lab.port)).await.unwrap();
    lab.dns
        .add_mx("held.open.test", 10, "mx.held.open.test")
        .await
        .unwrap();
    lab.dns.add_a("mx.held.open.test", ip).await.unwrap();
    let (connected, planned) = tokio::sync::oneshot::channel::<()>();
    let (greet, greet_now) = tokio::sync::oneshot::channel::<()>();
    let mx = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        connected.send(()).unwrap();
        greet_now.await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"220 mx.held.open.test\r\n").await.unwrap();
        let (mut got, mut in_data) = (Vec::new(), false);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                return got;
            }
            let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
            got.push(line.clone());
            let reply: &[u8] = if in_data {
                if line != ".\r\n" {
                    continue;
                }
                in_data = false;
                b"250 2.0.0 queued\r\n"
            } else {
                match verb.as_str() {
                    "EHLO" => b"250 mx.held.open.test\r\n",
                    "DATA" => {
                        in_data = true;
                        b"354 go\r\n"
                    }
                    "QUIT" => b"221 bye\r\n",
                    _ => b"250 ok\r\n",
                }
            };
            w.write_all(reply).await.unwrap();
        }
    });
    let relay = Relay::start(&lab, standard(&policy(lab.port, false, ""))).await;
    let id = relay
        .send("alice@corp.test", &["bob@held.open.test"], false)
        .await;
    planned.await.unwrap();
    let strict = LoadedPolicy::from_source(
        "strict",
        &format!(
            "{}\n[[tls_compliance]]\nname = \"held\"\ndomains = [\"held.open.test\"]\n",
            policy(lab.port, false, "on_tls_unavailable = \"bounce\"")
        ),
    )
    .unwrap();
    relay.engine.reload(&strict, None).unwrap();
    greet.send(()).unwrap();
    assert_eq!(relay.settled(&id).await, None);
    let got = mx.await.unwrap();
    assert!(
        got.iter().any(|l| l.starts_with("Subject: e2e")),
        "not delivered under its plan's policy: {got:?}"
    );
    assert_eq!(relay.metrics.bounces.get(), 0);
}

/// The reason of a recipient deferred with a 4xx reply (panics on any other state).
fn deferred_reason(state: &RecipientState) -> &str {
    match state {
        RecipientState::Deferred { reason, .. } => {
            assert!(reason.starts_with('4'), "{reason}");
            reason
        }
        other => panic!("expected deferred, got {other:?}"),
    }
}

/// A refusal that would bounce (TLS required and unavailable with `on_tls_unavailable =
/// "bounce"`; REQUIRETLS not offered) while another MX of the domain could not be reached
/// in this attempt defers instead: that MX may take the mail at the next attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_while_another_mx_was_unreachable_defers_not_bounces() {
    let mut lab = Lab::new().await;
    let sender_mx = lab
        .mx("corp.test", "mx.corp.test", Tls::Valid, SinkMode::Accept)
        .await;
    // Each domain: preference 10 where nothing listens, preference 20 a host that refuses.
    for domain in ["half.strict.test", "half.open.test"] {
        let down = format!("down.{domain}");
        lab.dns.add_mx(domain, 10, &down).await.unwrap();
        lab.dns.add_a(&down, loopback_ip()).await.unwrap();
    }
    let clear = lab
        .sink("mx2.half.strict.test", Tls::None, SinkMode::Accept)
        .await
        .1;
    lab.dns
        .add_mx("half.strict.test", 20, "mx2.half.strict.test")
        .await
        .unwrap();
    let without = mx_without_requiretls(&mut lab, "half.open.test", 20, "mx2.half.open.test").await;
    let relay = Relay::start(
        &lab,
        standard(&policy(lab.port, false, "on_tls_unavailable = \"bounce\"")),
    )
    .await;
    let tls_rule = relay
        .send("alice@corp.test", &["bob@half.strict.test"], false)
        .await;
    let requiretls = relay
        .send("alice@corp.test", &["carol@half.open.test"], true)
        .await;
    for (id, status) in [(tls_rule, "4.7.10"), (requiretls, "4.7.30")] {
        let states = relay.settled(&id).await.unwrap();
        let reason = deferred_reason(&states[0]);
        assert!(reason.contains(status), "{reason}");
        assert!(reason.contains("another host was not reached"), "{reason}");
    }
    assert_eq!(relay.metrics.bounces.get(), 0);
    assert!(lab.sinks[sender_mx].messages().is_empty(), "no DSN");
    assert_no_transaction(&lab.sinks[clear], "MX without STARTTLS");
    assert_no_transaction(&lab.sinks[without], "MX without REQUIRETLS");
}

/// A more preferred MX whose address lookup fails (here NXDOMAIN; a SERVFAIL takes the
/// same path) was not reached either: the refusal of the next MX defers, and a loop
/// through the next MX defers too. An audit's mail bounced in both cases while the
/// primary MX had only a DNS error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_more_preferred_mx_that_did_not_resolve_keeps_a_refusal_or_a_loop_from_bouncing() {
    let mut lab = Lab::new().await;
    let sender_mx = lab
        .mx("corp.test", "mx.corp.test", Tls::Valid, SinkMode::Accept)
        .await;
    let (own_ip, own) = lab
        .sink("self.loop.test", Tls::None, SinkMode::Accept)
        .await;
    for (domain, second) in [
        ("unres.strict.test", "mx2.unres.strict.test"),
        ("unres.open.test", "self.loop.test"),
    ] {
        // Preference 10: a name without any record.
        lab.dns
            .add_mx(domain, 10, &format!("gone.{domain}"))
            .await
            .unwrap();
        lab.dns.add_mx(domain, 20, second).await.unwrap();
    }
    let clear = lab
        .sink("mx2.unres.strict.test", Tls::None, SinkMode::Accept)
        .await
        .1;
    let port = lab.port;
    let relay = Relay::start_with(
        &lab,
        standard(&policy(lab.port, false, "on_tls_unavailable = \"bounce\"")),
        |s| s.listen = vec![SocketAddr::new(own_ip.into(), port)],
    )
    .await;
    let refused = relay
        .send("alice@corp.test", &["bob@unres.strict.test"], false)
        .await;
    let looped = relay
        .send("alice@corp.test", &["bob@unres.open.test"], false)
        .await;
    for (id, expected) in [
        (refused, ["4.7.10", "another host was not reached"]),
        (looped, ["4.4.1", "gone.unres.open.test"]),
    ] {
        let states = relay.settled(&id).await.unwrap();
        let reason = deferred_reason(&states[0]);
        for part in expected {
            assert!(reason.contains(part), "{part}: {reason}");
        }
    }
    assert_eq!(relay.metrics.bounces.get(), 0);
    assert!(lab.sinks[sender_mx].messages().is_empty(), "no DSN");
    assert_no_transaction(&lab.sinks[clear], "MX without STARTTLS");
    assert!(
        lab.sinks[own].sessions().is_empty(),
        "the relay never connects to itself"
    );
}

/// The same when only one address family of the MX host fails: its A lookup answers
/// SERVFAIL, its AAAA (an IPv4-mapped address) leads to a host without STARTTLS, or back
/// to the relay. Looked up together, the failed family was dropped without a word and
/// an audit's mail bounced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mx_host_whose_a_lookup_fails_keeps_a_refusal_or_a_loop_from_bouncing() {
    use hickory_resolver::proto::rr::RecordType;
    let mut lab = Lab::new().await;
    let sender_mx = lab
        .mx("corp.test", "mx.corp.test", Tls::Valid, SinkMode::Accept)
        .await;
    let (own_ip, own) = lab
        .sink("self.loop.test", Tls::None, SinkMode::Accept)
        .await;
    let (secure_ip, secure) = lab
        .sink("mx.fam.strict.test", Tls::Valid, SinkMode::Accept)
        .await;
    let (clear_ip, clear) = lab
        .sink("clear.fam.test", Tls::None, SinkMode::Accept)
        .await;
    for (domain, v4, v6) in [
        ("fam.strict.test", secure_ip, clear_ip),
        ("fam.open.test", secure_ip, own_ip),
    ] {
        let host = format!("mx.{domain}");
        lab.dns.add_mx(domain, 10, &host).await.unwrap();
        lab.dns.add_a(&host, v4).await.unwrap();
        lab.dns.add_aaaa(&host, v6.to_ipv6_mapped()).await.unwrap();
        lab.dns.fail(&host, RecordType::A).unwrap();
    }
    let port = lab.port;
    let relay = Relay::start_with(
        &lab,
        standard(&policy(lab.port, false, "on_tls_unavailable = \"bounce\"")),
        |s| s.listen = vec![SocketAddr::new(own_ip.into(), port)],
    )
    .await;
    let refused = relay
        .send("alice@corp.test", &["bob@fam.strict.test"], false)
        .await;
    let looped = relay
        .send("alice@corp.test", &["bob@fam.open.test"], false)
        .await;
    for (id, expected) in [
        (refused, "another host was not reached"),
        (looped, "A lookup for mx.fam.open.test failed"),
    ] {
        let states = relay.settled(&id).await.unwrap();
        let reason = deferred_reason(&states[0]);
        assert!(reason.contains(expected), "{expected}: {reason}");
    }
    assert_eq!(relay.metrics.bounces.get(), 0);
    assert!(lab.sinks[sender_mx].messages().is_empty(), "no DSN");
    assert_no_transaction(&lab.sinks[clear], "the AAAA host without STARTTLS");
    assert!(lab.sinks[secure].sessions().is_empty(), "its A failed");
    assert!(
        lab.sinks[own].sessions().is_empty(),
        "the relay never connects to itself"
    );
}

/// At most `MAX_MX_HOSTS` MX hosts are looked up per attempt (all at once): a host past
/// them waits for the next attempt, and counts as not reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mx_hosts_past_the_lookup_limit_wait_for_the_next_attempt() {
    let mut lab = Lab::new().await;
    let domain = "many.open.test";
    let limit = altroute::delivery::resolve::MAX_MX_HOSTS;
    for i in 0..limit {
        // Names without any record.
        lab.dns
            .add_mx(domain, 10 + i as u16, &format!("gone{i}.{domain}"))
            .await
            .unwrap();
    }
    let (_, last) = lab
        .sink("last.many.open.test", Tls::None, SinkMode::Accept)
        .await;
    lab.dns
        .add_mx(domain, 1000, "last.many.open.test")
        .await
        .unwrap();
    let relay = Relay::start(&lab, standard(&policy(lab.port, false, ""))).await;
    let id = relay
        .send("alice@corp.test", &["bob@many.open.test"], false)
        .await;
    let states = relay.settled(&id).await.unwrap();
    let reason = deferred_reason(&states[0]);
    assert!(reason.contains("not looked up in this attempt"), "{reason}");
    assert!(lab.sinks[last].sessions().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mx_answering_4xx_is_retried_not_rerouted() {
    let mut lab = Lab::new().await;
    let alt = alt_sink(&mut lab).await;
    let mx = lab
        .mx(
            "busy.strict.test",
            "mx.busy.strict.test",
            Tls::Valid,
            SinkMode::TempFail(FailAt::Rcpt),
        )
        .await;
    let relay = Relay::start(&lab, standard(&policy(lab.port, true, ""))).await;
    let id = relay
        .send("alice@corp.test", &["bob@busy.strict.test"], false)
        .await;
    let states = relay.settled(&id).await.unwrap();
    let next = match &states[0] {
        RecipientState::Deferred {
            reason,
            next_attempt,
            ..
        } => {
            assert!(reason.starts_with("451"), "{reason}");
            *next_attempt
        }
        other => panic!("expected deferred, got {other:?}"),
    };
    assert!(
        lab.sinks[alt].messages().is_empty(),
        "a 4xx is not a reroute"
    );
    // Later it is retried (same MX, not the alternate).
    let sessions_before = lab.sinks[mx].sessions().len();
    relay.attempt_at(&id, next, 2).await;
    assert!(
        lab.sinks[mx].sessions().len() > sessions_before,
        "retried at the MX"
    );
    assert!(lab.sinks[alt].messages().is_empty());
}

/// The audit's reproduction: one bit flipped in a queued message's body. It was deferred
/// at every attempt until its queue lifetime ran out, then removed (nothing left in
/// `msg/` or `corrupt/`) with an "expired" DSN. Now the first attempt that finds it
/// corrupt fails its open recipients with a DSN that says so, and moves the file, as it
/// was found, to the spool's `corrupt/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_message_is_kept_aside_and_its_sender_told() {
    let mut lab = Lab::new().await;
    let mx = lab
        .mx(
            "busy.test",
            "mx.busy.test",
            Tls::Valid,
            SinkMode::TempFail(FailAt::Rcpt),
        )
        .await;
    let sender_mx = lab
        .mx("corp.test", "mx.corp.test", Tls::Valid, SinkMode::Accept)
        .await;
    let relay = Relay::start(&lab, standard(&policy(lab.port, false, ""))).await;
    let id = relay
        .send(
            "alice@corp.test",
            &["bob@busy.test", "carol@busy.test"],
            false,
        )
        .await;
    let states = relay.settled(&id).await.unwrap();
    let next = states[0].due_at().unwrap();
    // One bit of the stored body flipped on disk: its checksum no longer matches.
    let path = relay.spool.message_path(&id);
    let mut found = std::fs::read(&path).unwrap();
    let at = found
        .windows(17)
        .position(|w| w == b"confidential body")
        .unwrap();
    found[at] ^= 0x20;
    std::os::unix::fs::FileExt::write_at(
        &std::fs::OpenOptions::new().write(true).open(&path).unwrap(),
        &found[at..=at],
        at as u64,
    )
    .unwrap();
    let sessions_before = lab.sinks[mx].sessions().len();

    relay.clock.set(next);
    relay.delivery.kick();
    let text = dsn_for(&lab.sinks[sender_mx], "alice@corp.test", "bob@busy.test").await;
    assert!(
        text.contains("Final-Recipient: rfc822; carol@busy.test"),
        "{text}"
    );
    assert!(text.contains("Action: failed"), "{text}");
    assert!(text.contains("Status: 5.3.0"), "{text}");
    assert!(text.contains("found corrupt"), "{text}");
    assert!(text.contains("kept aside for the operator"), "{text}");
    assert!(
        !text.contains("onfidential body"),
        "no untrusted content: {text}"
    );
    assert!(relay.removed(&id).await, "the message leaves the queue");
    let kept = relay.spool.root().join("corrupt").join(id.as_str());
    let kept = std::fs::read(&kept).expect("the message file is kept in corrupt/");
    assert!(
        kept.starts_with(&found),
        "kept as found (the final states appended at most)"
    );
    assert!(!path.exists());
    assert_eq!(relay.spool.stats().corrupt_moved, 1);
    assert_eq!(relay.metrics.bounces.get(), 2);
    assert_eq!(relay.metrics.dsns.get(), 1);
    // Nothing went out for it.
    assert_eq!(lab.sinks[mx].sessions().len(), sessions_before);
}

/// A message that cannot be read for a reason other than corruption (here: its file
/// replaced by a symbolic link to itself, so opening it fails with ELOOP, an I/O error
/// like EIO or EMFILE) is deferred like a failed attempt: not set aside, not removed,
/// and delivered as usual once it reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_fails_to_read_for_another_reason_waits_for_its_retry() {
    let mut lab = Lab::new().await;
    let mx = lab
        .mx(
            "busy.test",
            "mx.busy.test",
            Tls::Valid,
            SinkMode::TempFail(FailAt::Rcpt),
        )
        .await;
    let relay = Relay::start(&lab, standard(&policy(lab.port, false, ""))).await;
    let id = relay
        .send("alice@corp.test", &["bob@busy.test"], false)
        .await;
    let states = relay.settled(&id).await.unwrap();
    let next = states[0].due_at().unwrap();
    let path = relay.spool.message_path(&id);
    let saved = relay.spool.root().join("saved");
    std::fs::rename(&path, &saved).unwrap();
    std::os::unix::fs::symlink(&path, &path).unwrap();
    let sessions_before = lab.sinks[mx].sessions().len();

    // The attempt cannot read it, and cannot record its deferral either (same file):
    // the message is held back for a retry interval.
    relay.clock.set(next);
    relay.delivery.kick();
    let deadline = tokio::time::Instant::now() + WAIT;
    while relay.metrics.unrecorded.get() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "attempt 2 not made");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(relay.spool.entry(&id).is_some(), "still queued");
    assert!(std::fs::symlink_metadata(&path).is_ok(), "not removed");
    let corrupt = relay.spool.root().join("corrupt");
    assert_eq!(
        std::fs::read_dir(&corrupt).unwrap().count(),
        0,
        "not set aside"
    );
    assert_eq!(relay.spool.stats().corrupt_moved, 0);
    assert_eq!(lab.sinks[mx].sessions().len(), sessions_before);

    // Readable again: the next attempt goes to the MX, and is deferred by it.
    std::fs::rename(&saved, &path).unwrap();
    let retry = next + 600;
    relay.attempt_at(&id, retry, 2).await;
    match &relay.spool.entry(&id).unwrap().recipients[0] {
        RecipientState::Deferred { reason, .. } => {
            assert!(!reason.contains("cannot be read"), "{reason}");
        }
        other => panic!("expected deferred, got {other:?}"),
    }
    assert!(lab.sinks[mx].sessions().len() > sessions_before);
}

const TRAP_WAT: &str = r#"(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (func (export "malloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    unreachable))"#;

const LOOP_WAT: &str = r#"(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (func (export "malloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (loop $forever (br $forever))
    (i32.const 0)))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_or_looping_module_defers_and_the_relay_keeps_serving() {
    for (name, wat) in [("trap", TRAP_WAT), ("loop", LOOP_WAT)] {
        let mut lab = Lab::new().await;
        let alt = alt_sink(&mut lab).await;
        let mx = lab
            .mx(
                "valid.strict.test",
                "mx.valid.strict.test",
                Tls::Valid,
                SinkMode::Accept,
            )
            .await;
        let sender_mx = lab
            .mx("corp.test", "mx.corp.test", Tls::Valid, SinkMode::Accept)
            .await;
        let relay = Relay::start(&lab, wat_engine(wat, lab.port, Duration::from_millis(50))).await;
        let id = relay
            .send("alice@corp.test", &["bob@valid.strict.test"], false)
            .await;
        let states = relay
            .settled(&id)
            .await
            .unwrap_or_else(|| panic!("{name}: message vanished"));
        match &states[0] {
            RecipientState::Deferred { reason, .. } => {
                assert!(reason.starts_with("451 4.7.0"), "{name}: {reason}")
            }
            other => panic!("{name}: expected deferred, got {other:?}"),
        }
        assert!(relay.engine.faults() >= 1, "{name}: fault counted");
        // The relay keeps serving: a retry runs (and defers again), nothing is ever sent
        // or bounced.
        let next = states[0].due_at().unwrap();
        relay.attempt_at(&id, next, 2).await;
        assert!(matches!(
            relay.spool.entry(&id).unwrap().recipients[0],
            RecipientState::Deferred { .. }
        ));
        for sink in [mx, alt, sender_mx] {
            assert!(
                lab.sinks[sink].messages().is_empty(),
                "{name}: nothing delivered, no DSN"
            );
        }
        assert_eq!(relay.metrics.bounces.get(), 0, "{name}");
        assert!(
            relay.metrics.policy_faults.get() >= 2,
            "{name}: both attempts faulted"
        );
    }
}

/// The real `altroute serve` process: mail submitted over SMTP to a TLS-required domain
/// whose MX lacks STARTTLS reaches the alternate host over TLS, with one structured log
/// line per decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_process_reroutes_through_the_alternate_route() {
    let mut lab = Lab::new().await;
    let alt = alt_sink(&mut lab).await;
    let mx = lab
        .mx(
            "plain.strict.test",
            "mx.plain.strict.test",
            Tls::None,
            SinkMode::Accept,
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let process = RelayProcess::start(&lab, dir.path(), "");
    let log = || process.log();
    let stream = process.connect().await;
    let mut client =
        altroute_smtp::Client::connect(stream, altroute_smtp::ClientConfig::new("sender.test"))
            .await
            .unwrap();
    let env = altroute_smtp::Envelope {
        mail_from: "alice@corp.test".into(),
        rcpt_to: vec!["bob@plain.strict.test".into()],
        ..Default::default()
    };
    let d = client
        .send(
            &env,
            b"Subject: via the process\r\n\r\nconfidential body\r\n",
        )
        .await
        .unwrap();
    assert_eq!(d.delivered(), vec!["bob@plain.strict.test"], "{d:?}");
    let _ = client.quit().await;

    let got = lab.sinks[alt]
        .wait_for_messages(1, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", log()));
    assert_eq!(got[0].tls_version.as_deref(), Some("1.3"));
    assert_no_transaction(&lab.sinks[mx], "MX without STARTTLS (relay process)");
    let logged = log();
    assert!(
        logged.contains("altroute::decision") && logged.contains("tls_compliance:partners"),
        "one structured line per decision: {logged}"
    );
}

/// The relay binary (`altroute serve`) delivering into the lab, its spool and log in
/// `dir`; killed on drop.
struct RelayProcess {
    child: Option<std::process::Child>,
    smtp: SocketAddr,
    dir: std::path::PathBuf,
}

impl RelayProcess {
    /// `server_extra`: more lines for `[server]`.
    fn start(lab: &Lab, dir: &std::path::Path, server_extra: &str) -> RelayProcess {
        let policy_path = dir.join("policy.toml");
        std::fs::write(&policy_path, policy(lab.port, true, "")).unwrap();
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, lab.ca.root_pem()).unwrap();
        let ip = loopback_ip();
        let smtp = SocketAddr::new(ip.into(), free_port(ip).unwrap());
        let admin = SocketAddr::new(ip.into(), free_port(ip).unwrap());
        let config = format!(
            "[server]\nhostname = \"relay.lab.test\"\nlisten = [\"{smtp}\"]\n{server_extra}\n\
             [relay]\nallow_networks = [\"127.0.0.0/8\"]\n\
             [spool]\ndir = {spool:?}\n\
             [delivery]\nresolver = \"{dns}\"\nsmtp_port = {port}\nca_file = {ca:?}\nconnect_timeout_secs = 5\n\
             [policy]\nfile = {policy:?}\n\
             [admin]\nlisten = \"{admin}\"\n",
            spool = dir.join("spool").display().to_string(),
            dns = lab.dns.addr(),
            port = lab.port,
            ca = ca_path.display().to_string(),
            policy = policy_path.display().to_string(),
        );
        let config_path = dir.join("altroute.toml");
        std::fs::write(&config_path, config).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_altroute"))
            .args(["serve", "-c"])
            .arg(&config_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("relay.log")).unwrap())
            .spawn()
            .unwrap();
        RelayProcess {
            child: Some(child),
            smtp,
            dir: dir.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("relay.log")).unwrap_or_default()
    }

    /// A connection to the relay's SMTP port, once it is up.
    async fn connect(&self) -> tokio::net::TcpStream {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::net::TcpStream::connect(self.smtp).await {
                Ok(s) => return s,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("relay did not come up: {e}\n{}", self.log()),
            }
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `domain MX 10 mx1.<domain>` (a sink with `first`) and `MX 20 mx2.<domain>` (valid
/// TLS); returns both sinks.
async fn two_mx(lab: &mut Lab, domain: &str, first: Tls, second: Tls) -> (usize, usize) {
    let (mx1, mx2) = (format!("mx1.{domain}"), format!("mx2.{domain}"));
    lab.dns.add_mx(domain, 10, &mx1).await.unwrap();
    lab.dns.add_mx(domain, 20, &mx2).await.unwrap();
    let first = lab.sink(&mx1, first, SinkMode::Accept).await.1;
    let second = lab.sink(&mx2, second, SinkMode::Accept).await.1;
    (first, second)
}

/// `domain MX pref name` with a sink that has valid TLS but does not offer REQUIRETLS.
async fn mx_without_requiretls(lab: &mut Lab, domain: &str, pref: u16, name: &str) -> usize {
    let sink = host_without_requiretls(lab, name).await;
    lab.dns.add_mx(domain, pref, name).await.unwrap();
    sink
}

/// A sink at `name` (its A record) with valid TLS that does not offer REQUIRETLS.
async fn host_without_requiretls(lab: &mut Lab, name: &str) -> usize {
    let ip = loopback_ip();
    let mut config = SinkConfig::new(SocketAddr::new(ip.into(), lab.port), name);
    config.starttls = Some(
        lab.ca
            .issue(&[name], Validity::Valid)
            .unwrap()
            .rustls_server_config()
            .unwrap(),
    );
    config.advertise_requiretls = false;
    lab.sinks.push(SmtpSink::start(config).await.unwrap());
    lab.dns.add_a(name, ip).await.unwrap();
    lab.sinks.len() - 1
}

/// REQUIRETLS mail rerouted to an alternate secure route that does not offer REQUIRETLS
/// is deferred, as for any failure of the alternate host (docs/delivery.md): an audit's
/// bounced for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requiretls_mail_at_an_alternate_host_without_requiretls_is_deferred() {
    let mut lab = Lab::new().await;
    let alt = host_without_requiretls(&mut lab, "alt.lab.test").await;
    let plain = lab
        .mx(
            "plain.open.test",
            "mx.plain.open.test",
            Tls::None,
            SinkMode::Accept,
        )
        .await;
    let relay = Relay::start(&lab, standard(&policy(lab.port, true, ""))).await;
    let id = relay
        .send("alice@corp.test", &["bob@plain.open.test"], true)
        .await;
    let states = relay.settled(&id).await.unwrap();
    let reason = deferred_reason(&states[0]);
    assert!(reason.starts_with("450 4.7.30"), "{reason}");
    assert!(reason.contains("alt.lab.test"), "{reason}");
    assert_eq!(relay.metrics.bounces.get(), 0);
    assert_no_transaction(&lab.sinks[alt], "the alternate host without REQUIRETLS");
    assert_no_transaction(&lab.sinks[plain], "the MX without STARTTLS");
}

/// The journal's outcome of the verdict for `rcpt` at `host`, with its result type.
fn outcome_at(relay: &Relay, rcpt: &str, host: &str) -> Option<(String, String)> {
    relay
        .delivery
        .journal()
        .records()
        .into_iter()
        .find(|r| r.recipient == rcpt && r.host == host)
        .map(|r| (r.outcome, r.result))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_failure_at_the_first_mx_tries_the_next_mx() {
    let mut lab = Lab::new().await;
    let alt = alt_sink(&mut lab).await;
    // (domain, the preferred MX's TLS, the result type it gets)
    let cases = [
        (
            "nostarttls.strict.test",
            Tls::None,
            "starttls-not-supported",
        ),
        (
            "untrusted.strict.test",
            Tls::Untrusted,
            "certificate-not-trusted",
        ),
        ("expired.strict.test", Tls::Expired, "certificate-expired"),
        (
            "wrongname.strict.test",
            Tls::WrongName,
            "certificate-host-mismatch",
        ),
    ];
    let mut sinks = Vec::new();
    for (domain, tls, _) in cases {
        sinks.push(two_mx(&mut lab, domain, tls, Tls::Valid).await);
    }
    let relay = Relay::start(&lab, standard(&policy(lab.port, true, ""))).await;
    let mut ids = Vec::new();
    for (domain, _, _) in cases {
        ids.push(
            relay
                .send("alice@corp.test", &[&format!("bob@{domain}")], false)
                .await,
        );
    }
    for (i, (domain, _, result)) in cases.iter().enumerate() {
        let (first, second) = sinks[i];
        let rcpt = format!("bob@{domain}");
        let got = lab.sinks[second].wait_for_messages(1, WAIT).await.unwrap();
        assert_eq!(got[0].rcpt_to, vec![rcpt.clone()], "{domain}");
        assert_eq!(got[0].tls_version.as_deref(), Some("1.3"), "{domain}");
        assert!(relay.removed(&ids[i]).await, "{domain}: delivered");
        assert_no_transaction(&lab.sinks[first], domain);
        assert!(
            !lab.sinks[first].sessions().is_empty(),
            "{domain}: the preferred MX was tried first"
        );
        assert_eq!(
            outcome_at(&relay, &rcpt, &format!("mx1.{domain}")),
            Some(("next-host".to_string(), result.to_string())),
            "{domain}: the preferred MX's verdict is logged"
        );
        assert_eq!(
            outcome_at(&relay, &rcpt, &format!("mx2.{domain}")),
            Some(("delivered".to_string(), "success".to_string())),
            "{domain}"
        );
    }
    assert!(
        lab.sinks[alt].messages().is_empty(),
        "a backup MX with valid TLS comes before the alternate route"
    );
    assert_eq!(relay.metrics.safety_floor_violations.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mx_failing_tls_leaves_the_last_verdict() {
    // With the alternate route: rerouted, after both MX hosts were tried.
    let mut lab = Lab::new().await;
    let alt = alt_sink(&mut lab).await;
    let (first, second) = two_mx(&mut lab, "both.strict.test", Tls::None, Tls::Expired).await;
    let relay = Relay::start(&lab, standard(&policy(lab.port, true, ""))).await;
    let id = relay
        .send("alice@corp.test", &["bob@both.strict.test"], false)
        .await;
    let got = lab.sinks[alt].wait_for_messages(1, WAIT).await.unwrap();
    assert_eq!(got[0].tls_version.as_deref(), Some("1.3"));
    assert!(relay.removed(&id).await, "delivered");
    assert_no_transaction(&lab.sinks[first], "MX without STARTTLS");
    assert_no_transaction(&lab.sinks[second], "MX with an expired certificate");
    let rcpt = "bob@both.strict.test";
    assert_eq!(
        outcome_at(&relay, rcpt, "mx1.both.strict.test"),
        Some(("next-host".into(), "starttls-not-supported".into()))
    );
    assert_eq!(
        outcome_at(&relay, rcpt, "mx2.both.strict.test"),
        Some(("rerouted".into(), "certificate-expired".into()))
    );

    // Without it: deferred, with what the last MX showed.
    let mut lab = Lab::new().await;
    let (first, second) = two_mx(&mut lab, "both.strict.test", Tls::None, Tls::Expired).await;
    let relay = Relay::start(&lab, standard(&policy(lab.port, false, ""))).await;
    let id = relay
        .send("alice@corp.test", &["bob@both.strict.test"], false)
        .await;
    let states = relay.settled(&id).await.expect("deferred stays queued");
    match &states[0] {
        RecipientState::Deferred { reason, .. } => {
            assert!(reason.starts_with("451 4.7.10"), "{reason}");
            assert!(reason.contains("certificate-expired"), "{reason}");
        }
        other => panic!("expected deferred, got {other:?}"),
    }
    assert_no_transaction(&lab.sinks[first], "MX without STARTTLS");
    assert_no_transaction(&lab.sinks[second], "MX with an expired certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requiretls_mail_tries_the_next_mx_that_offers_requiretls() {
    let mut lab = Lab::new().await;
    let alt = alt_sink(&mut lab).await;
    let sender_mx = lab
        .mx("corp.test", "mx.corp.test", Tls::Valid, SinkMode::Accept)
        .await;
    // The preferred MX has valid TLS but no REQUIRETLS; the backup offers it.
    let without = mx_without_requiretls(&mut lab, "two.open.test", 10, "mx1.two.open.test").await;
    lab.dns
        .add_mx("two.open.test", 20, "mx2.two.open.test")
        .await
        .unwrap();
    let (_, with) = lab
        .sink("mx2.two.open.test", Tls::Valid, SinkMode::Accept)
        .await;
    // No MX offers it: bounced (RFC 8689 §4.2.1), after both were tried.
    let none = [
        mx_without_requiretls(&mut lab, "none.open.test", 10, "mx1.none.open.test").await,
        mx_without_requiretls(&mut lab, "none.open.test", 20, "mx2.none.open.test").await,
    ];
    let relay = Relay::start(&lab, standard(&policy(lab.port, true, ""))).await;

    relay
        .send("alice@corp.test", &["bob@two.open.test"], true)
        .await;
    let got = lab.sinks[with].wait_for_messages(1, WAIT).await.unwrap();
    assert_eq!(got[0].rcpt_to, vec!["bob@two.open.test".to_string()]);
    assert_eq!(got[0].tls_version.as_deref(), Some("1.3"));
    assert_no_transaction(&lab.sinks[without], "MX without REQUIRETLS");
    assert!(
        commands(&lab.sinks[without]).contains(&"STARTTLS".to_string()),
        "the preferred MX was tried first"
    );

    relay
        .send("alice@corp.test", &["bob@none.open.test"], true)
        .await;
    let text = dsn_for(
        &lab.sinks[sender_mx],
        "alice@corp.test",
        "bob@none.open.test",
    )
    .await;
    assert!(text.contains("Status: 5.7.30"), "{text}");
    for sink in none {
        assert_no_transaction(&lab.sinks[sink], "MX without REQUIRETLS");
        assert!(!lab.sinks[sink].sessions().is_empty(), "every MX was tried");
    }
    assert!(
        lab.sinks[alt].messages().is_empty(),
        "a missing REQUIRETLS is not a reroute"
    );
}

/// A server that refuses every recipient and hangs up after its `554` to DATA: the
/// client's RSET meets a closed connection, which must not turn the `550` into an I/O
/// error and a retry. The recipient bounces, with the server's reply, and the sender
/// gets the DSN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_followed_by_a_hang_up_still_bounces() {
    let mut lab = Lab::new().await;
    let name = "mx.gone.test";
    let ip = loopback_ip();
    let mut config = SinkConfig::new(SocketAddr::new(ip.into(), lab.port), name);
    config.starttls = Some(
        lab.ca
            .issue(&[name], Validity::Valid)
            .unwrap()
            .rustls_server_config()
            .unwrap(),
    );
    config.mode = SinkMode::PermFail(FailAt::Rcpt);
    config.hang_up_after_refusal = true;
    lab.sinks.push(SmtpSink::start(config).await.unwrap());
    let mx = lab.sinks.len() - 1;
    lab.dns.add_a(name, ip).await.unwrap();
    lab.dns.add_mx("gone.test", 10, name).await.unwrap();
    let sender_mx = lab
        .mx("corp.test", "mx.corp.test", Tls::Valid, SinkMode::Accept)
        .await;
    let relay = Relay::start(&lab, standard(&policy(lab.port, false, ""))).await;
    let id = relay
        .send("alice@corp.test", &["bob@gone.test"], false)
        .await;
    // Bounced, then removed: either may be seen here; a deferral is the defect.
    let states = relay.settled(&id).await;
    assert!(
        states
            .as_ref()
            .is_none_or(|s| matches!(s[0], RecipientState::Bounced { .. })),
        "bounced, not {states:?}"
    );
    let text = dsn_for(&lab.sinks[sender_mx], "alice@corp.test", "bob@gone.test").await;
    assert!(text.contains("Diagnostic-Code: smtp; 550 5.7.1"), "{text}");
    assert!(relay.removed(&id).await);
    assert_eq!(relay.metrics.deferrals.get(), 0);
    assert_eq!(relay.metrics.bounces.get(), 1);
    // The sink did hang up after the refusal.
    let cmds = commands(&lab.sinks[mx]);
    assert_eq!(cmds.last().map(String::as_str), Some("DATA"), "{cmds:?}");
}

/// Shutdown does not wait for a delivery attempt beyond `server.shutdown_grace_secs`:
/// an MX that accepts the connection and never greets would hold the attempt for the
/// command timeout (an hour here). SIGTERM ends the process within the grace period
/// (exit 0); the cut-off attempt recorded nothing, so the message is still queued for
/// the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_a_slow_delivery_attempt_off_at_the_grace_period() {
    let lab = Lab::new().await;
    // A tarpit MX: accepts, says nothing, tells the test when the relay is connected.
    let ip = loopback_ip();
    let tarpit = tokio::net::TcpListener::bind((ip, lab.port)).await.unwrap();
    let (connected, mut attempt) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = tarpit.accept().await {
            held.push(s);
            let _ = connected.try_send(());
        }
    });
    lab.dns
        .add_mx("slow.test", 10, "mx.slow.test")
        .await
        .unwrap();
    lab.dns.add_a("mx.slow.test", ip).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut process = RelayProcess::start(
        &lab,
        dir.path(),
        "command_timeout_secs = 3600\nshutdown_grace_secs = 1",
    );
    let stream = process.connect().await;
    let mut client =
        altroute_smtp::Client::connect(stream, altroute_smtp::ClientConfig::new("sender.test"))
            .await
            .unwrap();
    let env = altroute_smtp::Envelope {
        mail_from: "alice@corp.test".into(),
        rcpt_to: vec!["bob@slow.test".into()],
        ..Default::default()
    };
    let d = client.send(&env, b"Subject: slow\r\n\r\nbody\r\n").await;
    assert_eq!(d.unwrap().delivered(), vec!["bob@slow.test"]);
    let _ = client.quit().await;
    tokio::time::timeout(WAIT, attempt.recv())
        .await
        .unwrap_or_else(|_| panic!("no delivery attempt at the tarpit\n{}", process.log()));

    let mut child = process.child.take().unwrap();
    crate::support::signal(child.id(), "TERM");
    let exited = tokio::task::spawn_blocking(move || {
        // Far more than the grace period, far less than the command timeout.
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    let log = process.log();
    let status =
        exited.unwrap_or_else(|| panic!("still running long after the grace period\n{log}"));
    assert!(status.success(), "exit {status}\n{log}");
    assert!(
        log.contains("delivery attempts still running after the grace period"),
        "{log}"
    );

    let spool = crate::support::open_spool(&dir.path().join("spool"));
    let queued = spool.list();
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert_eq!(
        queued[0].envelope.rcpt_to,
        vec!["bob@slow.test".to_string()]
    );
    assert!(matches!(queued[0].recipients[0], RecipientState::Pending));
}

/// A recipient the first MX accepted is recorded delivered right after that transaction,
/// not when the whole attempt for its domain ends: here the attempt goes on to a second
/// MX (for a recipient the first one's clear text cannot take) that never greets, for
/// as long as the command timeout (an hour). Cut off there (a crash, the shutdown
/// deadline), an attempt used to leave the accepted recipient open, to be sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_accepted_at_one_mx_is_recorded_before_the_next_mx_is_tried() {
    let mut lab = Lab::new().await;
    let (_, clear) = lab
        .sink("mx1.mixed.test", Tls::None, SinkMode::Accept)
        .await;
    lab.dns
        .add_mx("mixed.test", 10, "mx1.mixed.test")
        .await
        .unwrap();
    // A tarpit second MX: accepts, says nothing, tells the test when the relay is there.
    let ip = loopback_ip();
    let tarpit = tokio::net::TcpListener::bind((ip, lab.port)).await.unwrap();
    let (connected, mut at_tarpit) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = tarpit.accept().await {
            held.push(s);
            let _ = connected.try_send(());
        }
    });
    lab.dns.add_a("mx2.mixed.test", ip).await.unwrap();
    lab.dns
        .add_mx("mixed.test", 20, "mx2.mixed.test")
        .await
        .unwrap();
    let rule = "\n[[tls_compliance]]\nname = \"vip\"\naddresses = [\"vip@mixed.test\"]\n";
    let relay = Relay::start_with(&lab, standard(&policy(lab.port, false, rule)), |s| {
        s.command_timeout = Duration::from_secs(3600);
    })
    .await;
    let id = relay
        .send(
            "alice@corp.test",
            &["bob@mixed.test", "vip@mixed.test"],
            false,
        )
        .await;
    tokio::time::timeout(WAIT, at_tarpit.recv())
        .await
        .expect("the attempt reaches the second MX")
        .unwrap();
    let got = lab.sinks[clear].messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_to, vec!["bob@mixed.test".to_string()]);
    let states = relay.spool.entry(&id).unwrap().recipients;
    assert!(
        matches!(states[0], RecipientState::Delivered { .. }),
        "recorded while the attempt is still at the second MX: {states:?}"
    );
    assert!(states[1].due_at().is_some(), "{states:?}");
}

/// The envelope keeps a quoted local part unquoted (`"a>b c"@x` as `a>b c@x`); the relay
/// must quote it again on the wire. Written raw, `"v@a.test> ORCPT=rfc822;x"@b.test` was
/// read by the next hop as a recipient at `a.test`, which the relay had never accepted
/// nor decided on (an audit delivered it so through Postfix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quoted_local_part_goes_out_quoted() {
    let mut lab = Lab::new().await;
    let mx = lab
        .mx(
            "plain.open.test",
            "mx.plain.open.test",
            Tls::None,
            SinkMode::Accept,
        )
        .await;
    let relay = Relay::start(&lab, standard(&policy(lab.port, true, ""))).await;
    let id = relay
        .send("john smith@corp.test", &["a>b c@plain.open.test"], false)
        .await;
    assert_eq!(relay.settled(&id).await, None, "delivered");
    let commands: Vec<String> = lab.sinks[mx]
        .sessions()
        .into_iter()
        .flat_map(|s| s.commands)
        .collect();
    assert!(
        commands
            .iter()
            .any(|c| c.starts_with("MAIL FROM:<\"john smith\"@corp.test>")),
        "{commands:?}"
    );
    assert!(
        commands.contains(&"RCPT TO:<\"a>b c\"@plain.open.test>".to_string()),
        "{commands:?}"
    );
    // (The lab sink's own reading of the path stops at the first `>`: the command line
    // above is what a server gets.)
    assert_eq!(lab.sinks[mx].messages().len(), 1);
}
