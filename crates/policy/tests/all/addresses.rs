//! How envelope addresses meet patterns: one mailbox, however it is spelled, is matched
//! the same way, so that no spelling escapes a rule.

use altroute_policy::pattern::{Pattern, canonical};
use altroute_policy::{Policy, Query, Route, compile, decide, org_unit_of};

const POLICY: &str = r#"
[[hosts]]
name = "gw"
address = "gw.example.net"

[[org_units]]
path = "/finance"
senders = ["finance.corp.example"]

[[tls_compliance]]
name = "partners"
domains = ["partner.example", "*.bank.example"]

[[tls_compliance]]
name = "ceo"
addresses = ["ceo@other.example"]

[[routes]]
name = "sub"
domains = ["sub.example"]
host = "gw"
"#;

fn policy() -> Policy {
    compile(POLICY).unwrap().policy
}

#[test]
fn a_fully_qualified_domain_does_not_escape_a_rule() {
    let policy = policy();
    for (rcpt, rule) in [
        ("bob@partner.example.", "tls_compliance:partners"),
        ("bob@Mail.Bank.Example.", "tls_compliance:partners"),
        ("ceo@other.example.", "tls_compliance:ceo"),
    ] {
        let d = decide(&policy, &Query::plan("alice@corp.example", rcpt));
        assert!(d.tls.required, "{rcpt}: {d:?}");
        assert_eq!(d.rule, rule, "{rcpt}");
    }
    let d = decide(
        &policy,
        &Query::plan("alice@corp.example", "bob@sub.example."),
    );
    assert_eq!(d.route, Route::Host, "{d:?}");
    assert_eq!(d.rule, "route:sub");
    assert_eq!(
        org_unit_of(&policy, "alice@finance.corp.example."),
        "/finance"
    );
    // Only the one root dot: a name with an empty label is no domain and matches nothing.
    let d = decide(
        &policy,
        &Query::plan("alice@corp.example", "bob@partner.example.."),
    );
    assert!(!d.tls.required, "{d:?}");
}

#[test]
fn a_quoted_local_part_is_the_same_mailbox() {
    let policy = policy();
    for rcpt in [
        "\"ceo\"@other.example",
        "\"CEO\"@Other.Example",
        "\"c\\eo\"@other.example",
    ] {
        let d = decide(&policy, &Query::plan("alice@corp.example", rcpt));
        assert_eq!(d.rule, "tls_compliance:ceo", "{rcpt}: {d:?}");
        assert!(d.tls.required, "{rcpt}");
    }
    // A quoted `@` stays in the local part: this is not ceo@other.example.
    let d = decide(
        &policy,
        &Query::plan("alice@corp.example", "\"ceo@other.example\"@x.example"),
    );
    assert!(!d.tls.required, "{d:?}");
    // Patterns are written the same way.
    assert_eq!(
        Pattern::parse("\"CEO\"@other.example"),
        Ok(Pattern::Address("ceo@other.example".to_string()))
    );
    assert_eq!(canonical("bob@partner.example"), "bob@partner.example");
    assert_eq!(
        canonical("\"b\\\"ob\"@partner.example."),
        "b\"ob@partner.example"
    );
}

/// A sender rule and a recipient rule of the same unit: how specific a sender pattern is
/// says nothing against a recipient pattern, so the one that requires more TLS applies.
/// A sender exemption does not lower a recipient's requirement, nor the other way round.
#[test]
fn a_rule_for_one_side_never_lowers_the_other_sides_requirement() {
    let policy = compile(
        r#"
[[tls_compliance]]
name = "bank"
domains = ["bank.example"]
require_ca_signed = true
validate_hostname = true

[[tls_compliance]]
name = "internal-exempt"
direction = "inbound"
domains = ["corp.example"]
require_tls = false

[[tls_compliance]]
name = "from-partner"
direction = "inbound"
domains = ["partner.example"]

[[tls_compliance]]
name = "to-legacy"
domains = ["legacy.example"]
require_tls = false
"#,
    )
    .unwrap()
    .policy;
    for (from, to, rule, required) in [
        // Same-length patterns on both sides: the exemption used to win as the last listed.
        (
            "a@corp.example",
            "b@bank.example",
            "tls_compliance:bank",
            true,
        ),
        (
            "a@partner.example",
            "b@legacy.example",
            "tls_compliance:from-partner",
            true,
        ),
        // One side only: that side's rule, as before.
        (
            "a@corp.example",
            "b@other.example",
            "tls_compliance:internal-exempt",
            false,
        ),
        (
            "a@other.example",
            "b@bank.example",
            "tls_compliance:bank",
            true,
        ),
    ] {
        let d = decide(&policy, &Query::plan(from, to));
        assert_eq!(d.rule, rule, "{from} -> {to}: {d:?}");
        assert_eq!(d.tls.required, required, "{from} -> {to}: {d:?}");
    }
}
