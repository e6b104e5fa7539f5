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

/// A source route (`<@relay.example:ceo@other.example>`, RFC 5321 §4.1.1.3) names the
/// same mailbox: servers ignore the route (Postfix strips it), so the address rule for
/// `ceo@other.example` holds. Before, only the domain's rules could match it.
#[test]
fn a_source_route_does_not_hide_the_mailbox() {
    let policy = policy();
    for rcpt in [
        "@relay.example:ceo@other.example",
        "@a.example,@b.example:CEO@Other.Example.",
        "@[IPv6:::1],@[127.0.0.1]:ceo@other.example",
        "@relay.example:\"ceo\"@other.example",
    ] {
        let d = decide(&policy, &Query::plan("alice@corp.example", rcpt));
        assert_eq!(d.rule, "tls_compliance:ceo", "{rcpt}: {d:?}");
    }
    assert_eq!(
        canonical("@relay.example:bob@partner.example."),
        "bob@partner.example"
    );
    // Only a leading route: an `@` and `:` elsewhere are the local part's business.
    assert_eq!(
        canonical("\"a:b@c\"@partner.example"),
        "a:b@c@partner.example"
    );
    assert_eq!(
        org_unit_of(&policy, "@gw.example:alice@finance.corp.example"),
        "/finance"
    );
}

/// A domain written in Unicode (SMTPUTF8 mail, or an HTTP question from another host of
/// the module) is matched as its A-label, the form patterns are stored in and the domain
/// the mail is delivered to. Before, `bob@bücher.example` passed the rule for
/// `xn--bcher-kva.example` as opportunistic mail, at the Envoy edge too.
#[test]
fn a_unicode_domain_is_matched_as_its_a_label() {
    let policy = compile(
        r#"
[[hosts]]
name = "gw"
address = "gw.example.net"

[[org_units]]
path = "/finance"
senders = ["xn--finanz--g1a.example"]

[[tls_compliance]]
name = "books"
domains = ["xn--bcher-kva.example", "*.xn--bnk-qla.example"]

[[tls_compliance]]
name = "one"
addresses = ["jörg@xn--lieferant--z5a.example"]

[[routes]]
name = "written-in-unicode"
domains = ["münchen.example"]
host = "gw"
"#,
    )
    .unwrap()
    .policy;
    for (rcpt, rule) in [
        ("bob@bücher.example", "tls_compliance:books"),
        ("bob@BÜCHER.Example.", "tls_compliance:books"),
        ("bob@xn--bcher-kva.example", "tls_compliance:books"),
        ("bob@mail.bänk.example", "tls_compliance:books"),
        // A final full-width or ideographic full stop is the root dot (UTS 46).
        ("bob@xn--bcher-kva.example\u{3002}", "tls_compliance:books"),
        ("bob@b\u{fc}cher.example\u{ff0e}", "tls_compliance:books"),
        ("bob@xn--bcher-kva.example\u{ff61}", "tls_compliance:books"),
        ("jörg@lieferant-ä.example", "tls_compliance:one"),
        ("\"jörg\"@LIEFERANT-Ä.example", "tls_compliance:one"),
    ] {
        let d = decide(&policy, &Query::plan("alice@corp.example", rcpt));
        assert!(d.tls.required, "{rcpt}: {d:?}");
        assert_eq!(d.rule, rule, "{rcpt}");
    }
    // A route written in Unicode in the source is stored as its A-label and matches both.
    for rcpt in ["bob@münchen.example", "bob@xn--mnchen-3ya.example"] {
        let d = decide(&policy, &Query::plan("alice@corp.example", rcpt));
        assert_eq!(d.route, Route::Host, "{rcpt}: {d:?}");
        assert_eq!(d.rule, "route:written-in-unicode", "{rcpt}");
    }
    assert_eq!(org_unit_of(&policy, "anna@finanz-ö.example"), "/finance");
    assert_eq!(
        org_unit_of(&policy, "anna@xn--finanz--g1a.example"),
        "/finance"
    );
    // Other domains stay other domains.
    let d = decide(
        &policy,
        &Query::plan("alice@corp.example", "bob@bucher.example"),
    );
    assert!(!d.tls.required, "{d:?}");
    // A name that is no valid IDN matches nothing, and is refused in a policy.
    let d = decide(
        &policy,
        &Query::plan("alice@corp.example", "bob@bü\u{200b}-.example"),
    );
    assert!(!d.tls.required, "{d:?}");
    assert_eq!(
        canonical("bob@BÜCHER.example."),
        "bob@xn--bcher-kva.example"
    );
    assert_eq!(
        Pattern::parse("*.Bücher.example"),
        Ok(Pattern::Subdomains("xn--bcher-kva.example".to_string()))
    );
    assert!(Pattern::parse("xn--bcher-kva.example").is_ok());
    let err = Pattern::parse("a\u{0}b.example").unwrap_err();
    assert!(err.contains("only letters"), "{err}");
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

/// A local part in Unicode is matched case-folded, as Postfix (SMTPUTF8) folds it when it
/// delivers: `JÖRG@…` is jörg's mailbox, and `ſales` (U+017F) and `Kim` (U+212A) fold to
/// the ASCII `sales` and `kim`. These spellings escaped address rules, and Postfix
/// delivered them to the ruled mailboxes in clear text.
#[test]
fn a_unicode_local_part_is_matched_case_folded() {
    let policy = compile(
        r#"
[[tls_compliance]]
name = "people"
addresses = ["jörg@pf.example", "sales@pf.example", "kim@pf.example", "strasse@pf.example", "ÉCOLE@pf.example"]
"#,
    )
    .unwrap()
    .policy;
    for rcpt in [
        "jörg@pf.example",
        "JÖRG@pf.example",
        "Jörg@PF.example",
        "\"JÖRG\"@pf.example",
        "\u{17f}ales@pf.example",
        "\u{212a}im@pf.example",
        "STRASSE@pf.example",
        "stra\u{df}e@pf.example",
        "école@pf.example",
        "SALES@pf.example",
    ] {
        let d = decide(&policy, &Query::plan("alice@corp.example", rcpt));
        assert!(d.tls.required, "{rcpt}: {d:?}");
        assert_eq!(d.rule, "tls_compliance:people", "{rcpt}");
    }
    for other in ["jorg@pf.example", "sale@pf.example", "k@pf.example"] {
        let d = decide(&policy, &Query::plan("alice@corp.example", other));
        assert_eq!(d.rule, "default", "{other}");
    }
}

/// A `+tag` does not escape an address rule: Postfix with `recipient_delimiter = +`
/// delivers `ceo+news@x` to ceo's mailbox, so the policy matches it as `ceo@x` (the
/// policy's `recipient_delimiter`, `+` unless set). A rule for the tagged form itself is
/// more specific and wins.
#[test]
fn a_recipient_delimiter_does_not_escape_an_address_rule() {
    const RULES: &str = r#"
[[org_units]]
path = "/board"
senders = ["chair@corp.example"]

[[tls_compliance]]
name = "ceo"
addresses = ["ceo@pf.example"]
require_ca_signed = true

[[tls_compliance]]
name = "list"
addresses = ["ceo+list@pf.example"]
require_tls = false
"#;
    let policy = compile(RULES).unwrap().policy;
    assert_eq!(policy.recipient_delimiter, "+");
    for rcpt in [
        "ceo@pf.example",
        "ceo+news@pf.example",
        "CEO+News@PF.example",
        "\"ceo+x\"@pf.example",
        "ceo+@pf.example",
        "ceo+a+b@pf.example",
        "ceo+listing@pf.example",
    ] {
        let d = decide(&policy, &Query::plan("alice@corp.example", rcpt));
        assert!(d.tls.required, "{rcpt}: {d:?}");
        assert_eq!(d.rule, "tls_compliance:ceo", "{rcpt}");
    }
    let d = decide(
        &policy,
        &Query::plan("alice@corp.example", "ceo+list@pf.example"),
    );
    assert_eq!(d.rule, "tls_compliance:list", "{d:?}");
    for other in ["+ceo@pf.example", "ceo-news@pf.example", "ceox@pf.example"] {
        let d = decide(&policy, &Query::plan("alice@corp.example", other));
        assert_eq!(d.rule, "default", "{other}");
    }
    // Senders too: a tag does not move a sender out of its org unit.
    assert_eq!(org_unit_of(&policy, "chair+x@corp.example"), "/board");

    // Several delimiters, as Postfix allows: the first of any of them ends the mailbox.
    let dashes = compile(&format!("[policy]\nrecipient_delimiter = \"+-\"\n{RULES}"))
        .unwrap()
        .policy;
    for rcpt in ["ceo-news@pf.example", "ceo-a+b@pf.example"] {
        let d = decide(&dashes, &Query::plan("alice@corp.example", rcpt));
        assert_eq!(d.rule, "tls_compliance:ceo", "{rcpt}");
    }
    // As Postfix's split_addr: list owner and request addresses are their own mailboxes
    // when `-` is a delimiter, and some names are never split.
    let lists = compile(
        r#"
[policy]
recipient_delimiter = "+-"

[[tls_compliance]]
name = "owner"
addresses = ["owner@pf.example", "news@pf.example", "mailer@pf.example"]
"#,
    )
    .unwrap()
    .policy;
    for own in [
        "owner-news@pf.example",
        "OWNER-x@pf.example",
        "news-request@pf.example",
        "mailer-daemon@pf.example",
    ] {
        let d = decide(&lists, &Query::plan("alice@corp.example", own));
        assert_eq!(d.rule, "default", "{own}");
    }
    for tagged in [
        "owner+x@pf.example",
        "news-x@pf.example",
        "-request@pf.example",
    ] {
        let d = decide(&lists, &Query::plan("alice@corp.example", tagged));
        let want = if tagged.starts_with('-') {
            "default"
        } else {
            "tls_compliance:owner"
        };
        assert_eq!(d.rule, want, "{tagged}");
    }
    // None: the tagged address is another mailbox.
    let none = compile(&format!("[policy]\nrecipient_delimiter = \"\"\n{RULES}"))
        .unwrap()
        .policy;
    let d = decide(
        &none,
        &Query::plan("alice@corp.example", "ceo+news@pf.example"),
    );
    assert_eq!(d.rule, "default", "{d:?}");
    assert!(
        !none.to_json().contains("recipient_delimiter"),
        "{}",
        none.to_json()
    );
    // Round trip through the canonical JSON, as the module loads it.
    let loaded = Policy::from_json(dashes.to_json().as_bytes()).unwrap();
    assert_eq!(loaded.recipient_delimiter, "+-");
    assert_eq!(loaded.version, dashes.version);
}

#[test]
fn a_recipient_delimiter_is_punctuation_of_a_local_part() {
    for bad in ["@", ".", "a", "+ ", "\"", "++", "é", "+-=/!#$%&"] {
        let err = compile(&format!("[policy]\nrecipient_delimiter = {bad:?}\n"))
            .err()
            .unwrap_or_else(|| panic!("{bad:?} compiled"));
        assert!(
            err.iter()
                .any(|d| d.location == "policy.recipient_delimiter"),
            "{bad:?}: {err:?}"
        );
    }
    // A hand-made compiled policy (what a module is configured with) is checked too.
    let mut policy = compile("").unwrap().policy;
    policy.recipient_delimiter = "@".to_string();
    policy.version = policy.content_version();
    let err = Policy::from_json(policy.to_json().as_bytes()).unwrap_err();
    assert!(err.to_string().contains("recipient_delimiter"), "{err}");
}

/// A domain in Unicode that is not a valid IDN is no mailbox: a question about one fails
/// closed. `partner\u{200D}.example` (a zero-width joiner) matched no rule and was decided
/// opportunistic, in Envoy's HTTP face too, while a resolver that maps names by IDNA 2003
/// drops the joiner and finds partner.example.
#[test]
fn a_domain_that_is_not_a_valid_idn_is_no_mailbox() {
    use altroute_policy::pattern::is_mailbox;
    for bad in [
        "bob@partner\u{200D}.example",
        "bob@partner\u{200C}.example",
        "bob@mail.b\u{200D}ank.example",
        "@a\u{200D}.example:bob@partner.example",
        // Valid IDNs, but IDNA 2003 maps them elsewhere (strasse.example, σ.example).
        "bob@stra\u{df}e.example",
        "bob@STRA\u{df}E.example",
        "bob@\u{3c2}.example",
        "bob@stra\u{1e9e}e.example",
        "bob@partner\u{115F}.example",
        "bob@xn--strae-oqa.stra\u{df}e.example",
    ] {
        assert!(!is_mailbox(bad), "{bad:?}");
    }
    for good in [
        "bob@b\u{fc}cher.example",
        "bob@partner.example",
        "bob@xn--bcher-kva.example",
        "bob@xn--strae-oqa.example",
        "bob@\u{3c3}.example",
        "bob@xn--strae-oqa.b\u{fc}cher.example",
        "bob@b\u{fc}cher\u{3002}example",
    ] {
        assert!(is_mailbox(good), "{good:?}");
    }
}
