//! Policy extensions (issue 8): the example extensions change routing end to end, hostile
//! extensions (infinite loop, memory bomb, traps, a liar, a log flooder) are contained,
//! and the safety floor holds against a lying extension over 1,000+ attempts.
//!
//! Same world as delivery.rs: the delivery engine in-process on a spool in a tempdir, a
//! lab DNS server, SMTP sinks on loopback addresses sharing one port, certificates from a
//! test CA the relay trusts, a `ManualClock` for retries.

use std::time::Duration;

use altroute::extensions::{ExtensionConfig, ExtensionMetrics, ModuleSource, OnFault};
use altroute::policy_engine::{LoadedPolicy, PolicyEngine, STANDARD};
use altroute_lab::SinkMode;
use altroute_policy::pattern::Pattern;
use altroute_policy::{Query, Route};
use altroute_queue::RecipientState;

use crate::inproc::{Lab, Relay, Tls, WAIT, policy};

fn engine(lab: &Lab, alternate: bool, exts: &[ExtensionConfig]) -> PolicyEngine {
    PolicyEngine::standard(&policy(lab.port, alternate, ""))
        .unwrap()
        .with_extensions(exts)
        .unwrap()
}

/// Every recipient delivered (the message may already be gone from the spool).
fn delivered(states: &Option<Vec<RecipientState>>) -> bool {
    states.as_ref().is_none_or(|s| {
        s.iter()
            .all(|r| matches!(r, RecipientState::Delivered { .. }))
    })
}

fn deferred_reason(states: &Option<Vec<RecipientState>>) -> String {
    match states.as_deref() {
        Some([RecipientState::Deferred { reason, .. }]) => reason.clone(),
        other => panic!("expected one deferred recipient, got {other:?}"),
    }
}

fn finance_config(port: u16) -> String {
    format!(
        r#"{{"senders": ["finance.corp.test", "*.finance.corp.test"],
            "host": {{"name": "finance-relay", "addresses": ["alt.lab.test"], "port": {port}}}}}"#
    )
}

fn builtin(name: &str, config: &str) -> ExtensionConfig {
    ExtensionConfig::new(name, ModuleSource::Builtin(name.into()), config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finance_mail_always_takes_the_secure_relay() {
    let mut lab = Lab::new().await;
    let alt = lab
        .sink("alt.lab.test", Tls::Valid, SinkMode::Accept)
        .await
        .1;
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
        engine(
            &lab,
            false,
            &[builtin("finance-secure", &finance_config(lab.port))],
        ),
    )
    .await;

    // Finance: rerouted to the secure relay, over verified TLS.
    let id = relay
        .send("cfo@finance.corp.test", &["bob@plain.open.test"], false)
        .await;
    let states = relay.settled(&id).await;
    assert!(delivered(&states), "delivered: {states:?}");
    let got = lab.sinks[alt].wait_for_messages(1, WAIT).await.unwrap();
    assert_eq!(got[0].rcpt_to, vec!["bob@plain.open.test".to_string()]);
    assert_eq!(got[0].tls_version.as_deref(), Some("1.3"));
    // Everyone else: direct, opportunistic (clear text here), as the standard policy says.
    let id = relay
        .send("alice@corp.test", &["carol@plain.open.test"], false)
        .await;
    assert!(delivered(&relay.settled(&id).await), "delivered");
    let got = lab.sinks[mx].wait_for_messages(1, WAIT).await.unwrap();
    assert_eq!(got[0].rcpt_to, vec!["carol@plain.open.test".to_string()]);
    assert_eq!(
        lab.sinks[alt].messages().len(),
        1,
        "only finance mail at the relay"
    );
    assert!(
        !lab.sinks[mx]
            .messages()
            .iter()
            .any(|m| m.rcpt_to.contains(&"bob@plain.open.test".to_string()))
    );

    // The journal names the extension's rule; the metrics count its changes.
    let journal = relay.delivery.journal().records();
    assert!(
        journal.iter().any(|r| r.recipient == "bob@plain.open.test"
            && r.rule == "extension:finance-secure"
            && r.outcome == "delivered"),
        "{journal:?}"
    );
    let m = relay.ext();
    assert!(
        ExtensionMetrics::get(&m.changes, "finance-secure", None) >= 2,
        "plan and verdict changed"
    );
    assert!(ExtensionMetrics::get(&m.decisions, "finance-secure", None) >= 4);
}

/// A configuration whose hours contain (or not) the current UTC time.
fn hours_config(open_now: bool) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let utc_hour = i64::try_from((now % 86_400) / 3600).unwrap();
    // Local time at 12:xx (inside 09-17) or at 21:xx (outside), whatever the UTC hour.
    let local = if open_now { 12 } else { 21 };
    let offset = (local - utc_hour) * 60;
    format!(
        r#"{{"domains": ["held.test", "*.held.test"], "open_hour": 9, "close_hour": 17, "utc_offset_minutes": {offset}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_domains_are_held_outside_business_hours() {
    let mut lab = Lab::new().await;
    let mx = lab
        .mx("held.test", "mx.held.test", Tls::Valid, SinkMode::Accept)
        .await;
    let other = lab
        .mx("free.test", "mx.free.test", Tls::Valid, SinkMode::Accept)
        .await;

    // Outside hours: held, nothing reaches the MX; other domains flow.
    let closed = Relay::start(
        &lab,
        engine(
            &lab,
            false,
            &[builtin("business-hours", &hours_config(false))],
        ),
    )
    .await;
    let id = closed
        .send("alice@corp.test", &["bob@held.test"], false)
        .await;
    let reason = deferred_reason(&closed.settled(&id).await);
    assert!(
        reason.contains("4.7.0") && reason.contains("business hours"),
        "{reason}"
    );
    let id2 = closed
        .send("alice@corp.test", &["bob@free.test"], false)
        .await;
    assert!(delivered(&closed.settled(&id2).await));
    lab.sinks[other].wait_for_messages(1, WAIT).await.unwrap();
    assert!(lab.sinks[mx].messages().is_empty(), "held outside hours");
    assert!(
        lab.sinks[mx].sessions().is_empty(),
        "not even a connection: held at plan"
    );
    drop(closed);

    // Inside hours: delivered.
    let open = Relay::start(
        &lab,
        engine(
            &lab,
            false,
            &[builtin("business-hours", &hours_config(true))],
        ),
    )
    .await;
    let id = open
        .send("alice@corp.test", &["dave@held.test"], false)
        .await;
    assert!(
        delivered(&open.settled(&id).await),
        "delivered in business hours"
    );
    let got = lab.sinks[mx].wait_for_messages(1, WAIT).await.unwrap();
    assert_eq!(got[0].rcpt_to, vec!["dave@held.test".to_string()]);
    assert_eq!(
        ExtensionMetrics::get(&open.ext().changes, "business-hours", None),
        0
    );
}

#[test]
fn an_invalid_plugin_configuration_refuses_the_extension() {
    let err = PolicyEngine::standard(&policy(25, false, ""))
        .unwrap()
        .with_extensions(&[builtin(
            "business-hours",
            r#"{"domains": [], "open_hour": 17, "close_hour": 9}"#,
        )])
        .unwrap_err();
    assert!(err.to_string().contains("business-hours"), "{err}");
}

#[test]
fn extensions_keep_running_after_a_policy_swap() {
    let engine = PolicyEngine::standard(&policy(25, false, ""))
        .unwrap()
        .with_extensions(&[builtin("finance-secure", &finance_config(25))])
        .unwrap();
    let q = Query::plan("cfo@finance.corp.test", "bob@plain.open.test");
    let before = engine.answer(&q);
    assert_eq!(before.by, "finance-secure");
    assert_eq!(before.decision.route, Route::Alternate);
    let next =
        LoadedPolicy::from_source("next", &policy(25, true, "on_tls_unavailable = \"bounce\""))
            .unwrap();
    let version = engine.reload(&next, None).unwrap();
    assert_ne!(version, before.standard.policy_version);
    let after = engine.answer(&q);
    assert_eq!(after.by, "finance-secure");
    assert_eq!(after.decision.route, Route::Alternate);
    assert_eq!(
        after.standard.policy_version, version,
        "the new policy answered first"
    );
    // Mail outside the extension's scope is the standard module's alone.
    let other = engine.answer(&Query::plan("alice@corp.test", "bob@plain.open.test"));
    assert_eq!(other.by, STANDARD);
}

#[test]
fn every_extension_config_problem_is_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let policy_path = dir.path().join("p.toml");
    std::fs::write(&policy_path, policy(25, false, "")).unwrap();
    let text = format!(
        r#"
[policy]
file = {policy:?}

[[extension]]
name = "a"
module = "missing.wasm"
deadline_ms = 0

[[extension]]
name = "a"
module = "builtin:nope"
recipients = ["not a pattern@@"]
on_fault = "defer"
surprise = 1

[[extension]]
module = "builtin:finance-secure"
configuration = "{{}}"
configuration_file = "x.json"
on_fault = "panic"
"#,
        policy = policy_path.display().to_string()
    );
    let problems =
        altroute::config::Config::parse(&text, &dir.path().join("altroute.toml"), dir.path())
            .unwrap_err();
    let all = problems.join("\n");
    // A bad enum value stops the TOML parse; check the rest without it.
    assert!(all.contains("on_fault") || all.contains("panic"), "{all}");
    let text = text.replace("on_fault = \"panic\"\n", "");
    let problems =
        altroute::config::Config::parse(&text, &dir.path().join("altroute.toml"), dir.path())
            .unwrap_err();
    let all = problems.join("\n");
    for needle in [
        "extension[0].module",
        "extension[0].deadline_ms",
        "extension[1].name: \"a\" is used twice",
        "extension[1].module: no built-in module \"nope\"",
        "extension[1].recipients[0]",
        "extension.1.surprise: unknown key",
        "extension[2].name: required",
        "extension[2].configuration: give configuration or configuration_file",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
}

// ---------------------------------------------------------------------------------------
// Hostile extensions, written in WAT against the ABI.

/// Callback bodies of the hostile template; a test overrides some.
const HOSTILE: &[(&str, &str)] = &[
    ("CTX", ""),
    ("VMSTART", ""),
    ("CONFIGURE", ""),
    ("HEADERS", ""),
    ("DONE", ""),
    ("LOG", ""),
    ("DELETE", ""),
];

const TEMPLATE: &str = r#"(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 100) "x-altroute-route")
  (data (i32.const 120) "direct")
  (data (i32.const 140) "x-altroute-tls-required")
  (data (i32.const 170) "no")
  (data (i32.const 180) "x-altroute-tls-verify")
  (data (i32.const 210) "none")
  (data (i32.const 250) "x-altroute-rule")
  (data (i32.const 270) "liar")
  (data (i32.const 300) "bounce")
  (data (i32.const 310) "x-altroute-reply")
  (data (i32.const 330) "550 5.7.1 refused")
  (data (i32.const 350) "x-altroute-policy-version")
  (data (i32.const 380) "sha256:0000000000000000")
  (data (i32.const 410) "tls_compliance:partners")
  (data (i32.const 440) "x-altroute-reason")
  (data (i32.const 460) "checked by tagger")
  (data (i32.const 1024) "flood flood flood flood flood flood flood flood flood flood flood flood")
  (global $heap (mut i32) (i32.const 8192))
  (func (export "malloc") (param $n i32) (result i32) (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "_initialize"))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param $id i32) (param $root i32) CTX)
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) VMSTART (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) CONFIGURE (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (local $i i32) HEADERS (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) DONE (i32.const 1))
  (func (export "proxy_on_log") (param i32) LOG)
  (func (export "proxy_on_delete") (param i32) DELETE)
)"#;

const LOOP: &str = "(loop $l (br $l))";
const MEMORY_BOMB: &str = "(block $done (loop $l (br_if $done (i32.eq (memory.grow (i32.const 16)) (i32.const -1))) (br $l)))";
const LIE: &str = "(drop (call $replace (i32.const 0) (i32.const 100) (i32.const 16) (i32.const 120) (i32.const 6)))
    (drop (call $replace (i32.const 0) (i32.const 140) (i32.const 23) (i32.const 170) (i32.const 2)))
    (drop (call $replace (i32.const 0) (i32.const 180) (i32.const 21) (i32.const 210) (i32.const 4)))
    (drop (call $replace (i32.const 0) (i32.const 250) (i32.const 15) (i32.const 270) (i32.const 4)))";
/// A bounce, under the policy's name: a forged rule and policy version.
const BOUNCE: &str = "(drop (call $replace (i32.const 0) (i32.const 100) (i32.const 16) (i32.const 300) (i32.const 6)))
    (drop (call $replace (i32.const 0) (i32.const 310) (i32.const 16) (i32.const 330) (i32.const 17)))
    (drop (call $replace (i32.const 0) (i32.const 350) (i32.const 25) (i32.const 380) (i32.const 23)))
    (drop (call $replace (i32.const 0) (i32.const 250) (i32.const 15) (i32.const 410) (i32.const 23)))";
/// Changes only the reason.
const TAG: &str = "(drop (call $replace (i32.const 0) (i32.const 440) (i32.const 17) (i32.const 460) (i32.const 17)))";
/// 2,000 log lines per question, at error level, then no change.
const FLOOD: &str = "(local.set $i (i32.const 0))
    (block $done (loop $l
      (drop (call $log (i32.const 4) (i32.const 1024) (i32.const 71)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $done (i32.ge_u (local.get $i) (i32.const 2000)))
      (br $l)))";

fn hostile_module(overrides: &[(&str, &str)]) -> std::path::PathBuf {
    let mut text = TEMPLATE.to_string();
    for (key, default) in HOSTILE {
        let body = overrides
            .iter()
            .find(|(k, _)| k == key)
            .map_or(*default, |(_, v)| v);
        text = text.replace(key, body);
    }
    let bytes = wat::parse_str(&text).unwrap();
    // In Cargo's scratch directory for integration tests (under target/, so `cargo clean`
    // removes it and /tmp does not collect one directory per run), named by content.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("hostile-modules");
    std::fs::create_dir_all(&dir).unwrap();
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    let path = dir.join(format!("{:x}.wasm", h.finish()));
    // Tests run in parallel and may write the same module: write aside, then rename.
    let aside = tempfile::NamedTempFile::new_in(&dir).unwrap();
    std::fs::write(aside.path(), bytes).unwrap();
    aside.persist(&path).unwrap();
    path
}

fn hostile(name: &str, overrides: &[(&str, &str)], scope: &[&str]) -> ExtensionConfig {
    let mut c = ExtensionConfig::new(name, ModuleSource::File(hostile_module(overrides)), "");
    c.recipients = scope.iter().map(|s| Pattern::parse(s).unwrap()).collect();
    c.deadline = Duration::from_millis(20);
    c.memory_mb = 4;
    c.max_consecutive_faults = 3;
    c.cooldown = Duration::from_secs(600);
    c
}

/// One hostile case: mail in the extension's scope is deferred as documented, mail
/// outside it keeps flowing.
async fn contained(ext: ExtensionConfig, kind: &str) {
    let mut lab = Lab::new().await;
    let victim = lab
        .mx(
            "victim.test",
            "mx.victim.test",
            Tls::Valid,
            SinkMode::Accept,
        )
        .await;
    let ok = lab
        .mx("ok.test", "mx.ok.test", Tls::Valid, SinkMode::Accept)
        .await;
    let name = ext.name.clone();
    let relay = Relay::start(&lab, engine(&lab, false, &[ext])).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            relay
                .send("alice@corp.test", &[&format!("v{i}@victim.test")], false)
                .await,
        );
        let other = relay
            .send("alice@corp.test", &[&format!("o{i}@ok.test")], false)
            .await;
        let states = relay.settled(&other).await;
        assert!(
            delivered(&states),
            "{kind}: other mail delivered: {states:?}"
        );
    }
    for id in &ids {
        let reason = deferred_reason(&relay.settled(id).await);
        assert!(reason.starts_with("451 4.7.0"), "{kind}: {reason}");
    }
    assert_eq!(lab.sinks[ok].messages().len(), 6, "{kind}");
    assert!(
        lab.sinks[victim].messages().is_empty(),
        "{kind}: fail closed"
    );
    let m = relay.ext();
    // After a fault the host rebuilds instances with backoff, so later faults may be
    // "unavailable" rather than the original kind.
    let total: u64 = [
        "trap",
        "deadline",
        "memory",
        "limit",
        "abi",
        "unavailable",
        "other",
    ]
    .iter()
    .map(|k| ExtensionMetrics::get(&m.faults, &name, Some(k)))
    .sum();
    assert!(
        ExtensionMetrics::get(&m.faults, &name, Some(kind)) >= 1,
        "{kind}: fault kind counted"
    );
    assert!(total >= 3, "{kind}: faults counted ({total})");
    assert_eq!(
        ExtensionMetrics::get(&m.cooldowns, &name, None),
        1,
        "{kind}: one cool-down"
    );
    // The journal names the extension for each deferral.
    let journal = relay.delivery.journal().records();
    assert!(
        journal
            .iter()
            .filter(|r| r.rule == format!("extension:{name}:fault"))
            .count()
            >= 6,
        "{journal:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_loop_is_deferred_then_cooled_down() {
    contained(
        hostile("looper", &[("HEADERS", LOOP)], &["victim.test"]),
        "deadline",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_is_deferred_then_cooled_down() {
    contained(
        hostile("bomber", &[("HEADERS", MEMORY_BOMB)], &["victim.test"]),
        "memory",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_in_every_request_callback_is_deferred_then_cooled_down() {
    let trap = "(unreachable)";
    contained(
        hostile(
            "trapper",
            &[
                (
                    "CTX",
                    "(if (i32.ne (local.get $root) (i32.const 0)) (then unreachable))",
                ),
                ("HEADERS", trap),
                ("DONE", trap),
                ("LOG", trap),
                ("DELETE", trap),
            ],
            &["victim.test"],
        ),
        "trap",
    )
    .await;
}

#[test]
fn trap_at_start_refuses_the_extension() {
    let trap = "(unreachable)";
    let err = PolicyEngine::standard(&policy(25, false, ""))
        .unwrap()
        .with_extensions(&[hostile(
            "trapper",
            &[("VMSTART", trap), ("CONFIGURE", trap)],
            &[],
        )])
        .unwrap_err();
    assert!(err.to_string().contains("trapper"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cool_down_with_skip_bypasses_the_extension_visibly() {
    let mut lab = Lab::new().await;
    let victim = lab
        .mx(
            "victim.test",
            "mx.victim.test",
            Tls::Valid,
            SinkMode::Accept,
        )
        .await;
    let mut ext = hostile("looper", &[("HEADERS", LOOP)], &["victim.test"]);
    ext.on_fault = OnFault::Skip;
    let relay = Relay::start(&lab, engine(&lab, false, &[ext])).await;
    // Three faults (deferred), then the cool-down skips it: mail flows, counted.
    for i in 0..3 {
        let id = relay
            .send("alice@corp.test", &[&format!("v{i}@victim.test")], false)
            .await;
        deferred_reason(&relay.settled(&id).await);
    }
    let id = relay
        .send("alice@corp.test", &["late@victim.test"], false)
        .await;
    assert!(
        delivered(&relay.settled(&id).await),
        "bypassed in cool-down"
    );
    lab.sinks[victim].wait_for_messages(1, WAIT).await.unwrap();
    assert!(ExtensionMetrics::get(&relay.ext().skips, "looper", None) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_flooder_is_ignored_and_mail_flows() {
    let mut lab = Lab::new().await;
    let mx = lab
        .mx("ok.test", "mx.ok.test", Tls::Valid, SinkMode::Accept)
        .await;
    let mut ext = hostile("flooder", &[("HEADERS", FLOOD)], &[]);
    // Its log calls are bounded by its deadline; give it room so the test is about logs.
    ext.deadline = Duration::from_secs(2);
    let relay = Relay::start(&lab, engine(&lab, false, &[ext])).await;
    for i in 0..5 {
        let id = relay
            .send("alice@corp.test", &[&format!("r{i}@ok.test")], false)
            .await;
        assert!(delivered(&relay.settled(&id).await), "delivered");
    }
    assert_eq!(lab.sinks[mx].messages().len(), 5);
    let m = relay.ext();
    assert!(ExtensionMetrics::get(&m.decisions, "flooder", None) >= 10);
    assert_eq!(ExtensionMetrics::get(&m.changes, "flooder", None), 0);
}

/// The liar turns every decision into "direct, no TLS required". Over 1,000+ recipient
/// attempts of TLS-required mail (policy rule, REQUIRETLS; standard verdict defer or
/// bounce) to clear-text MXs, not one reaches a sink; each is refused by the floor and
/// counted against the liar. Opportunistic mail still flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_floor_holds_against_a_lying_extension_over_1000_attempts() {
    let mut lab = Lab::new().await;
    let strict = lab
        .mx(
            "plain.strict.test",
            "mx.plain.strict.test",
            Tls::None,
            SinkMode::Accept,
        )
        .await;
    let open = lab
        .mx(
            "plain.open.test",
            "mx.plain.open.test",
            Tls::None,
            SinkMode::Accept,
        )
        .await;
    let mut liar = hostile("liar", &[("HEADERS", LIE)], &[]);
    // It answers at once, but over 1,200 calls one may be paused by the machine for more
    // than 20 ms: that would be a fault, not the lie this test is about.
    liar.deadline = Duration::from_secs(2);
    let engine =
        PolicyEngine::standard(&policy(lab.port, false, "on_tls_unavailable = \"bounce\""))
            .unwrap()
            .with_extensions(&[liar])
            .unwrap();
    let relay = Relay::start(&lab, engine).await;

    const MESSAGES: usize = 120;
    const PER_MESSAGE: usize = 5;
    let mut ids = Vec::new();
    for m in 0..MESSAGES {
        // Rule-required (the standard module would bounce) ...
        let rcpts: Vec<String> = (0..PER_MESSAGE)
            .map(|r| format!("r{m}x{r}@plain.strict.test"))
            .collect();
        let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
        ids.push(relay.send("alice@corp.test", &rcpts, false).await);
        // ... and REQUIRETLS to a domain without a rule (the standard module would defer).
        ids.push(
            relay
                .send("alice@corp.test", &["req@plain.open.test"], true)
                .await,
        );
    }
    let per_round = MESSAGES * (PER_MESSAGE + 1);
    for id in &ids {
        relay.settled(id).await;
    }
    // A second round: every deferred recipient is retried.
    // Past the first retry delay (60 s), well within the queue lifetime (3600 s).
    relay.clock.advance(Duration::from_secs(120));
    relay.delivery.kick();
    // Until the second round is over: the count moved past the first round and stopped.
    let deadline = tokio::time::Instant::now() + 2 * WAIT;
    loop {
        let n = relay.metrics.safety_floor_violations.get();
        tokio::time::sleep(Duration::from_secs(1)).await;
        if n > per_round as u64 && relay.metrics.safety_floor_violations.get() == n {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "second round not done: {n}"
        );
    }
    for id in &ids {
        relay.settled(id).await;
    }
    // Opportunistic mail: the liar's answer equals the standard's, it flows.
    let id = relay
        .send("alice@corp.test", &["carol@plain.open.test"], false)
        .await;
    assert!(delivered(&relay.settled(&id).await));

    let attempts = relay.metrics.safety_floor_violations.get();
    assert!(attempts >= 1000, "{attempts} attempts");
    assert_eq!(
        ExtensionMetrics::get(&relay.ext().floor_violations, "liar", None),
        attempts
    );
    assert!(
        lab.sinks[strict].messages().is_empty(),
        "no clear-text delivery of TLS-required mail"
    );
    let at_open = lab.sinks[open].messages();
    assert_eq!(at_open.len(), 1, "only the opportunistic message");
    assert_eq!(
        at_open[0].rcpt_to,
        vec!["carol@plain.open.test".to_string()]
    );
    for id in &ids {
        let e = relay.spool.entry(id).expect("still queued");
        for s in &e.recipients {
            match s {
                RecipientState::Deferred { reason, .. } => {
                    assert!(reason.contains("4.7.10"), "{reason}")
                }
                other => panic!("expected deferred by the floor, got {other:?}"),
            }
        }
    }
    println!(
        "lying extension: {attempts} TLS-required recipient attempts, 0 clear-text deliveries"
    );
}

#[test]
fn the_relay_exposes_extension_metrics_and_loads_extensions_at_start() {
    use crate::support::{Relay as Binary, RelayConfig};
    let mut config = RelayConfig::new();
    config.relay_extra = format!(
        "\n[[extension]]\nname = \"finance-secure\"\nmodule = \"builtin:finance-secure\"\nconfiguration = {:?}\ndeadline_ms = 50\nmemory_mb = 8\n",
        finance_config(25)
    );
    let relay = Binary::start(config);
    let (status, body) = relay.admin_get("/metrics");
    assert!(status.contains("200"), "{status}");
    // The families are registered with or without extensions; the loaded extension is
    // what adds a series labelled with its name (at 0 until it decides).
    for family in ["decisions", "changes", "floor_violations"] {
        let series = format!("altroute_extension_{family}_total{{extension=\"finance-secure\"}}");
        assert!(
            body.contains(&series),
            "{series} missing in /metrics:\n{body}"
        );
    }
    let log = relay.log();
    assert!(
        log.lines()
            .any(|l| l.contains("policy extension loaded") && l.contains("finance-secure")),
        "no load line for finance-secure in the log:\n{log}"
    );
}

/// The C example (wasm/examples/hold-list-c), built here with clang from its script: mail
/// to a listed domain is held, other mail flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_c_extension_holds_listed_domains() {
    crate::support::require_tool("/usr/bin/clang", "clang");
    crate::support::require_tool("/usr/bin/wasm-ld", "lld");
    let out = tempfile::tempdir().unwrap();
    let wasm = out.path().join("hold_list.wasm");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../wasm/examples/hold-list-c/build.sh");
    let status = std::process::Command::new("sh")
        .arg(&script)
        .arg(&wasm)
        .status()
        .unwrap();
    assert!(status.success(), "{} failed", script.display());

    let mut lab = Lab::new().await;
    let held = lab
        .mx(
            "review.test",
            "mx.review.test",
            Tls::Valid,
            SinkMode::Accept,
        )
        .await;
    let ok = lab
        .mx("ok.test", "mx.ok.test", Tls::Valid, SinkMode::Accept)
        .await;
    let ext = ExtensionConfig::new(
        "hold-list",
        ModuleSource::File(wasm),
        "audit.test, review.test",
    );
    let relay = Relay::start(&lab, engine(&lab, false, &[ext])).await;
    let id = relay
        .send("alice@corp.test", &["bob@review.test"], false)
        .await;
    let reason = deferred_reason(&relay.settled(&id).await);
    assert!(reason.starts_with("451 4.7.1 Held for review"), "{reason}");
    let id = relay.send("alice@corp.test", &["bob@ok.test"], false).await;
    assert!(delivered(&relay.settled(&id).await));
    assert_eq!(lab.sinks[ok].messages().len(), 1);
    assert!(lab.sinks[held].messages().is_empty());
    assert_eq!(
        ExtensionMetrics::get(&relay.ext().changes, "hold-list", None),
        1
    );
    // An empty configuration is refused at load.
    let err = PolicyEngine::standard(&policy(25, false, ""))
        .unwrap()
        .with_extensions(&[ExtensionConfig::new(
            "hold-list",
            ModuleSource::File(out.path().join("hold_list.wasm")),
            "",
        )])
        .unwrap_err();
    assert!(err.to_string().contains("hold-list"), "{err}");
}

/// An extension that bounces mail the policy only defers (TLS required, no alternate
/// route), naming the policy's rule and a version of its own: deferred instead, counted,
/// and recorded under the extension's name and the real version. With `may_bounce` the
/// bounce stands (still under the extension's name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_may_not_bounce_what_the_policy_defers_nor_forge_its_rule() {
    // (may_bounce of `evil`, a second extension after it that may bounce and changes
    // only the reason: the first one's bounce must not pass under its name)
    for (may_bounce, tagger) in [(false, false), (true, false), (false, true)] {
        let mut lab = Lab::new().await;
        let mx = lab
            .mx(
                "plain.strict.test",
                "mx.plain.strict.test",
                Tls::None,
                SinkMode::Accept,
            )
            .await;
        let mut evil = hostile("evil", &[("HEADERS", BOUNCE)], &["plain.strict.test"]);
        evil.deadline = Duration::from_secs(2);
        evil.may_bounce = may_bounce;
        let mut chain = vec![evil];
        if tagger {
            let mut t = hostile("tagger", &[("HEADERS", TAG)], &[]);
            t.deadline = Duration::from_secs(2);
            t.may_bounce = true;
            chain.push(t);
        }
        let relay = Relay::start(&lab, engine(&lab, false, &chain)).await;
        let id = relay
            .send("alice@corp.test", &["bob@plain.strict.test"], false)
            .await;
        let states = relay.settled(&id).await;
        let plan = relay
            .delivery
            .journal()
            .records()
            .into_iter()
            .find(|r| r.recipient == "bob@plain.strict.test")
            .expect("a decision record");
        let rule = if tagger {
            "extension:tagger:extension:evil:tls_compliance:partners"
        } else {
            "extension:evil:tls_compliance:partners"
        };
        assert_eq!(plan.rule, rule);
        assert_eq!(plan.policy_version, relay.engine.version(), "{plan:?}");
        assert_ne!(plan.policy_version, "sha256:0000000000000000");
        let violations = ExtensionMetrics::get(&relay.ext().floor_violations, "evil", None);
        if may_bounce {
            assert!(states.is_none(), "bounced and removed: {states:?}");
            assert_eq!(plan.route, "bounce");
            assert_eq!(violations, 0);
        } else {
            let reason = deferred_reason(&states);
            assert!(
                reason.starts_with("451 4.7.0 held back: extension evil"),
                "{reason}"
            );
            assert_eq!(violations, 1);
        }
        assert!(lab.sinks[mx].messages().is_empty());
    }
}

/// A WAT extension that sets `headers` on every question (both phases), so it chooses
/// the next hop and leaves the verdict there to the standard module.
fn routing_extension(
    dir: &std::path::Path,
    name: &str,
    headers: &[(&str, String)],
) -> ExtensionConfig {
    let mut data = String::new();
    let mut calls = String::new();
    let mut at = 100;
    for (k, v) in headers {
        data.push_str(&format!("(data (i32.const {at}) \"{k}{v}\")\n"));
        calls.push_str(&format!(
            "(drop (call $replace (i32.const 0) (i32.const {at}) (i32.const {}) (i32.const {}) (i32.const {})))\n",
            k.len(),
            at + k.len(),
            v.len()
        ));
        at += 100;
    }
    let wat = format!(
        r#"(module
  (import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  {data}
  (global $heap (mut i32) (i32.const 8192))
  (func (export "malloc") (param $n i32) (result i32) (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "_initialize"))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) {calls} (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32)))"#
    );
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, wat::parse_str(&wat).unwrap()).unwrap();
    let mut ext = ExtensionConfig::new(name, ModuleSource::File(path), "");
    ext.deadline = Duration::from_secs(2);
    ext
}

/// The decision headers of a `host` route to `address`:`port`.
fn host_route(address: &str, port: u16) -> [(&'static str, String); 4] {
    [
        ("x-altroute-route", "host".to_string()),
        ("x-altroute-host", "chosen.invalid".to_string()),
        ("x-altroute-host-addresses", address.to_string()),
        ("x-altroute-host-port", port.to_string()),
    ]
}

/// An extension (without `may_bounce`) that routes mail to the relay itself: a loop, but
/// one a module made, so it is deferred, not bounced. It once bounced the mail as
/// `554 5.4.6`, and the DSN to the sender, routed the same way, bounced too: the message
/// was gone and nobody told. A later audit's extension looped it again (50 hops, then a
/// bounce) by writing the relay's address IPv4-mapped (`::ffff:…`), or any local address
/// when the relay listens on `0.0.0.0`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_cannot_bounce_mail_by_routing_it_to_the_relay() {
    let mut lab = Lab::new().await;
    let (own_ip, own) = lab
        .sink("self.loop.test", Tls::None, SinkMode::Accept)
        .await;
    let port = lab.port;
    let dir = tempfile::tempdir().unwrap();
    let any = std::net::Ipv4Addr::UNSPECIFIED;
    for (address, listen) in [
        (own_ip.to_string(), own_ip),
        (format!("::ffff:{own_ip}"), own_ip),
        (own_ip.to_string(), any),
        ("0.0.0.0".to_string(), any),
    ] {
        let ext = routing_extension(dir.path(), "looper", &host_route(&address, port));
        let relay = Relay::start_with(&lab, engine(&lab, false, &[ext]), |s| {
            s.listen = vec![std::net::SocketAddr::new(listen.into(), port)];
        })
        .await;
        let id = relay
            .send("alice@corp.test", &["bob@plain.open.test"], false)
            .await;
        let reason = deferred_reason(&relay.settled(&id).await);
        assert!(
            reason.starts_with("451 4.4.6 the host next hop for plain.open.test is this relay"),
            "{address} with the relay on {listen}: {reason}"
        );
        assert_eq!(relay.metrics.bounces.get(), 0);
    }
    assert!(lab.sinks[own].sessions().is_empty());
}

/// An extension without `may_bounce` cannot bounce mail by routing it to a host that
/// refuses it: an audit's extension sent mail to a server answering `550` to every RCPT,
/// and the relay bounced it, DSN and all. A permanent refusal at a hop an extension chose
/// is a deferral (the queue's lifetime still ends it), and the decision record names the
/// extension as the planner, even though the verdict at that hop was the standard
/// module's. With `may_bounce` the refusal stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_cannot_bounce_mail_by_choosing_a_host_that_refuses_it() {
    let mut lab = Lab::new().await;
    let (refuser_ip, refuser) = lab
        .sink(
            "refuser.lab.test",
            Tls::None,
            SinkMode::PermFail(altroute_lab::FailAt::Rcpt),
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    for may_bounce in [false, true] {
        let mut ext = routing_extension(
            dir.path(),
            "chooser",
            &host_route(&refuser_ip.to_string(), lab.port),
        );
        ext.may_bounce = may_bounce;
        // Not the DSN's recipient: the DSN goes where the policy sends it.
        ext.recipients = vec![Pattern::parse("plain.open.test").unwrap()];
        let relay = Relay::start(&lab, engine(&lab, false, &[ext])).await;
        let id = relay
            .send("alice@corp.test", &["bob@plain.open.test"], false)
            .await;
        let states = relay.settled(&id).await;
        let record = relay
            .delivery
            .journal()
            .records()
            .into_iter()
            .find(|r| r.recipient == "bob@plain.open.test" && r.hop == "host")
            .expect("a decision record at the chosen host");
        assert_eq!(record.planned_by, "chooser", "{record:?}");
        if may_bounce {
            assert!(
                states.as_deref().is_none_or(|s| s
                    .iter()
                    .all(|r| matches!(r, RecipientState::Bounced { .. }))),
                "bounced (and removed, or about to be): {states:?}"
            );
            assert_eq!(record.outcome, "bounced", "{record:?}");
            // (Its DSN, to a sender domain this lab does not serve, may bounce too.)
            assert!(relay.metrics.bounces.get() >= 1);
        } else {
            let reason = deferred_reason(&states);
            assert!(
                reason.starts_with("450 4.7.1 ")
                    && reason.ends_with(
                        "; the next hop was chosen by extension chooser, which may not bounce mail"
                    ),
                "{reason}"
            );
            assert_eq!(record.outcome, "deferred", "{record:?}");
            assert_eq!(relay.metrics.bounces.get(), 0);
        }
    }
    assert_eq!(lab.sinks[refuser].sessions().len(), 2);
}

/// Three more ways a round-4 audit's extensions without `may_bounce` made mail bounce
/// (each ended in a DSN), all deferrals now:
/// - `hijack` keeps the policy's host name but gives its own addresses: recipients the
///   standard module routed to that host went to the extension's addresses too (hosts
///   were grouped by name), and bounced there with `planned_by=standard`. Now the
///   standard's recipient goes to the policy's host and is delivered.
/// - `godirect` turns a routed recipient to `direct`, whose MX refuses it.
/// - `pick` routes to a refusing host and a later `tagger`, which may bounce, changes only
///   the reason: `tagger`'s `may_bounce` once stood for `pick`'s route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_cannot_bounce_mail_by_any_route_it_chooses() {
    let mut lab = Lab::new().await;
    let (_, partner) = lab
        .sink("partner.lab.test", Tls::None, SinkMode::Accept)
        .await;
    let (refuser_ip, refuser) = lab
        .sink(
            "refuser.lab.test",
            Tls::None,
            SinkMode::PermFail(altroute_lab::FailAt::Rcpt),
        )
        .await;
    lab.dns
        .add_mx("routed.test", 10, "refuser.lab.test")
        .await
        .unwrap();
    let extra = format!(
        "\n[[hosts]]\nname = \"partner\"\naddress = \"partner.lab.test\"\nport = {}\nrequire_tls = false\nrequire_ca_signed = false\nvalidate_hostname = false\n\n[[routes]]\nname = \"r1\"\ndomains = [\"routed.test\"]\nhost = \"partner\"\n",
        lab.port
    );
    let engine = |exts: &[ExtensionConfig]| {
        PolicyEngine::standard(&policy(lab.port, false, &extra))
            .unwrap()
            .with_extensions(exts)
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let scoped = |mut e: ExtensionConfig, scope: &str| {
        e.recipients = vec![Pattern::parse(scope).unwrap()];
        e
    };
    let hijack = scoped(
        routing_extension(
            dir.path(),
            "hijack",
            &[
                ("x-altroute-host-addresses", refuser_ip.to_string()),
                ("x-altroute-host-port", lab.port.to_string()),
            ],
        ),
        "a@routed.test",
    );
    let godirect = scoped(
        routing_extension(
            dir.path(),
            "godirect",
            &[("x-altroute-route", "direct".to_string())],
        ),
        "c@routed.test",
    );
    let pick = scoped(
        routing_extension(
            dir.path(),
            "pick",
            &host_route(&refuser_ip.to_string(), lab.port),
        ),
        "d@plain.test",
    );
    let mut tagger = hostile("tagger", &[("HEADERS", TAG)], &[]);
    tagger.deadline = Duration::from_secs(2);
    tagger.may_bounce = true;
    let relay = Relay::start(&lab, engine(&[hijack, godirect, pick, tagger])).await;
    // (The last: a `+tag` is in the scope of its mailbox, as in the policy's rules; it
    // once escaped a TLS-enforcing extension scoped to the mailbox.)
    let rcpts = [
        "a@routed.test",
        "b@routed.test",
        "c@routed.test",
        "d@plain.test",
        "a+tag@routed.test",
    ];
    let id = relay.send("alice@corp.test", &rcpts, false).await;
    let states = relay
        .settled(&id)
        .await
        .expect("deferred recipients stay queued");
    let reason = |i: usize| match &states[i] {
        RecipientState::Deferred { reason, .. } => reason.clone(),
        other => panic!("{}: expected deferred, got {other:?}", rcpts[i]),
    };
    for (i, ext) in [(0, "hijack"), (2, "godirect"), (3, "pick"), (4, "hijack")] {
        let r = reason(i);
        assert!(
            r.ends_with(&format!(
                "; the next hop was chosen by extension {ext}, which may not bounce mail"
            )),
            "{}: {r}",
            rcpts[i]
        );
    }
    assert!(
        matches!(states[1], RecipientState::Delivered { .. }),
        "the standard module's recipient goes to the policy's host: {:?}",
        states[1]
    );
    let delivered: Vec<String> = lab.sinks[partner]
        .messages()
        .into_iter()
        .flat_map(|m| m.rcpt_to)
        .collect();
    assert_eq!(delivered, ["b@routed.test"]);
    let refused: Vec<String> = lab.sinks[refuser]
        .sessions()
        .into_iter()
        .flat_map(|s| s.commands)
        .filter(|c| c.starts_with("RCPT"))
        .collect();
    assert!(
        !refused.iter().any(|c| c.contains("b@routed.test")),
        "{refused:?}"
    );
    assert_eq!(relay.metrics.bounces.get(), 0);
}

/// `finance-secure` matches its senders with a recipient delimiter of its own
/// configuration: one that is not the policy's is refused at load (an audit's `cfo-x@`
/// escaped it in clear text under a `+-` policy while the policy's rules held).
#[test]
fn finance_secure_must_share_the_policy_s_recipient_delimiter() {
    let config = finance_config(25);
    let dashes = PolicyEngine::standard(&policy(25, false, "recipient_delimiter = \"+-\""))
        .unwrap()
        .with_extensions(&[builtin("finance-secure", &config)]);
    let Err(err) = dashes else {
        panic!("a finance-secure with another delimiter must be refused");
    };
    let err = err.to_string();
    assert!(
        err.contains("recipient_delimiter \"+\" is not the policy's \"+-\""),
        "{err}"
    );
    let agreed = config.replacen('{', "{\"recipient_delimiter\": \"+-\", ", 1);
    assert!(
        PolicyEngine::standard(&policy(25, false, "recipient_delimiter = \"+-\""))
            .unwrap()
            .with_extensions(&[builtin("finance-secure", &agreed)])
            .is_ok()
    );
    // The default policy's `+` and the extension's default agree.
    assert!(
        PolicyEngine::standard(&policy(25, false, ""))
            .unwrap()
            .with_extensions(&[builtin("finance-secure", &config)])
            .is_ok()
    );
}
