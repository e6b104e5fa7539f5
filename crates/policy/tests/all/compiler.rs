use altroute_policy::compile;

fn errors(src: &str) -> Vec<String> {
    compile(src)
        .err()
        .unwrap_or_default()
        .iter()
        .map(|d| d.to_string())
        .collect()
}

#[test]
fn lists_every_mistake_at_once_with_locations() {
    let src = r#"
[policy]
name = "three mistakes"

[[hosts]]
name = "relay"
address = "relay.example.net"
requre_tls = true

[alternate_secure_route]
host = "nowhere"

[[tls_compliance]]
name = "partners"
domains = ["bad..domain"]
"#;
    let errs = errors(src);
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(
        errs[0].contains("line 8") && errs[0].contains("unknown field `requre_tls`"),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("line 10") && e.contains("unknown host \"nowhere\"")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("line 13") && e.contains("bad domain")),
        "{errs:#?}"
    );
}

#[test]
fn alternate_host_must_not_allow_clear_text() {
    let errs = errors(
        r#"
[[hosts]]
name = "weak"
address = "weak.example"
require_tls = false
require_ca_signed = false
validate_hostname = false

[alternate_secure_route]
host = "weak"
"#,
    );
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].contains("never downgrade"), "{errs:#?}");
}

#[test]
fn alternate_route_only_at_the_top_unit() {
    let errs = errors(
        r#"
[[hosts]]
name = "r"
address = "r.example"
[alternate_secure_route]
host = "r"
org_unit = "/finance"
"#,
    );
    assert!(
        errs.iter().any(|e| e.contains("top-level org unit")),
        "{errs:#?}"
    );
}

#[test]
fn overlapping_rules_and_routes_are_errors() {
    let errs = errors(
        r#"
[[hosts]]
name = "gw"
address = "gw.example"
[[tls_compliance]]
name = "a"
domains = ["x.example"]
[[tls_compliance]]
name = "b"
direction = "both"
domains = ["X.example"]
[[routes]]
name = "r1"
domains = ["y.example"]
host = "gw"
[[routes]]
name = "r2"
domains = ["y.example"]
host = "gw"
"#,
    );
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].contains("overlapping rules") && errs[0].contains("\"a\""),
        "{errs:#?}"
    );
    assert!(errs[1].contains("overlapping routes"), "{errs:#?}");
}

#[test]
fn same_pattern_in_different_units_is_an_override_not_an_overlap() {
    let src = r#"
[[org_units]]
path = "/a"
senders = ["a.example"]
[[tls_compliance]]
name = "root"
domains = ["x.example"]
[[tls_compliance]]
name = "child"
org_unit = "/a"
domains = ["x.example"]
require_tls = false
"#;
    assert!(compile(src).is_ok(), "{:?}", errors(src));
}

#[test]
fn bad_addresses_units_and_references() {
    let errs = errors(
        r#"
[[hosts]]
name = "h"
address = "not a host"
port = 0
[[org_units]]
path = "finance"
[[org_units]]
path = "/b"
senders = ["b.example"]
[[org_units]]
path = "/c"
senders = ["b.example"]
[[tls_compliance]]
name = "r"
org_unit = "/nowhere"
addresses = ["partner.example"]
[[routes]]
name = "x"
domains = ["z.example"]
host = "missing"
"#,
    );
    let joined = errs.join("\n");
    for needle in [
        "bad address",
        "port 0",
        "must start with `/`",
        "already mapped",
        "unknown org unit \"/nowhere\"",
        "is not an address",
        "unknown host \"missing\"",
    ] {
        assert!(joined.contains(needle), "missing {needle:?} in:\n{joined}");
    }
}

#[test]
fn syntax_and_type_errors_have_line_and_column() {
    let errs = errors("[policy]\nname = 12\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("line 2, column 8"), "{errs:#?}");
    let errs = errors("[policy\n");
    assert!(errs[0].starts_with("line 1"), "{errs:#?}");
}

#[test]
fn failing_embedded_test_is_reported_with_its_line() {
    let errs = errors(
        r#"
[[tls_compliance]]
name = "p"
domains = ["p.example"]

[[tests]]
name = "wrong on purpose"
query = { phase = "plan", recipient = "a@p.example" }
expect = { tls_required = false }
"#,
    );
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains("line 6") && errs[0].contains("expected tls_required false"),
        "{errs:#?}"
    );
}

/// The loader checks the version against the content: on the canonical bytes directly,
/// and on any other spelling of the same JSON by serializing it again.
#[test]
fn a_policy_loads_only_under_the_version_of_its_content() {
    use altroute_policy::Policy;
    let mut content_changes = 0;
    for (file, src) in altroute_policy::fixtures::TABLE {
        let compiled = compile(src).unwrap_or_else(|e| panic!("{file}: {e:?}"));
        let canonical = compiled.json.as_str();
        let loaded = Policy::from_json(canonical.as_bytes()).expect("canonical JSON loads");
        assert_eq!(loaded.version, compiled.policy.version, "{file}");
        assert_eq!(loaded.content_version(), loaded.version, "{file}");

        // Same content, other spelling (pretty-printed): still this version.
        let value: serde_json::Value = serde_json::from_str(canonical).unwrap();
        let pretty = serde_json::to_string_pretty(&value).unwrap();
        assert!(
            Policy::from_json(pretty.as_bytes()).is_ok(),
            "{file}: pretty JSON"
        );

        // Another version, or content changed under the same version: refused.
        let v = &compiled.policy.version;
        let wrong = canonical.replacen(v, "sha256:0000000000000000", 1);
        let err = Policy::from_json(wrong.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("does not match the content"), "{file}: {err}");
        let edited = canonical.replacen("\"format\":1,", "\"format\":1 ,", 1);
        assert!(
            Policy::from_json(edited.as_bytes()).is_ok(),
            "{file}: whitespace only"
        );
        let changed = canonical.replacen("\"defer\"", "\"bounce\"", 1);
        if changed != canonical {
            content_changes += 1;
            let err = Policy::from_json(changed.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains("does not match the content"), "{file}: {err}");
        }
    }
    assert!(content_changes > 0, "no fixture had a setting to change");
}

/// The loader reads the policy as UTF-8 text: bytes that are not UTF-8 anywhere (in a
/// string or between values) are refused with where they are, and escapes in strings
/// still read as the characters they stand for.
#[test]
fn a_policy_that_is_not_utf8_is_refused_and_escapes_still_read() {
    use altroute_policy::Policy;
    let compiled = compile(altroute_policy::fixtures::TABLE[0].1).expect("compiles");
    let canonical = compiled.json.as_bytes();
    let name_at = compiled.json.find("\"table-suite\"").expect("the name") + 1;
    for at in [name_at, 1, canonical.len() - 1] {
        let mut bad = canonical.to_vec();
        bad.insert(at, 0xff);
        let err = Policy::from_json(&bad).unwrap_err().to_string();
        assert!(
            err.contains("not UTF-8") && err.contains(&format!("index {at}")),
            "byte 0xff at {at}: {err}"
        );
    }
    // The same name spelled with escapes: same content, so same version, same name.
    let escaped = compiled
        .json
        .replacen("\"table-suite\"", "\"t\\u0061ble-\\u0073uite\"", 1);
    let loaded = Policy::from_json(escaped.as_bytes()).expect("escaped JSON loads");
    assert_eq!(loaded.name, "table-suite");
    assert_eq!(loaded.version, compiled.policy.version);
}

/// The loader runs the embedded tests: a policy whose version matches its content but
/// whose tests do not all pass is refused, and each failing test is named with what it
/// expected and what was decided; the tests that pass are not reported.
#[test]
fn a_policy_whose_embedded_tests_fail_is_refused_with_each_failure() {
    use altroute_policy::{Policy, Route};
    let compiled = compile(altroute_policy::fixtures::TABLE[0].1).expect("compiles");
    let mut policy = compiled.policy.clone();
    let count = policy.tests.len();
    // Two tests expect what their decision is not: one route, one rule.
    let direct = policy
        .tests
        .iter()
        .position(|t| t.expect.route == Some(Route::Direct))
        .expect("a test expects a direct route");
    policy.tests[direct].expect.route = Some(Route::Bounce);
    let last = count - 1;
    assert_ne!(last, direct);
    policy.tests[last].expect.rule = Some("no-such-rule".into());
    policy.version = String::new();
    policy.version = policy.content_version();
    let err = Policy::from_json(policy.to_json().as_bytes())
        .unwrap_err()
        .to_string();
    let (a, b) = (&policy.tests[direct].name, &policy.tests[last].name);
    assert!(
        err.contains(&format!(
            "test {a:?} failed: expected route bounce, got direct"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "test {b:?} failed: expected rule no-such-rule, got"
        )),
        "{err}"
    );
    assert_eq!(err.matches("failed:").count(), 2, "only the two: {err}");
    // Unchanged, all of them pass.
    assert!(Policy::from_json(compiled.json.as_bytes()).is_ok());
}

#[test]
fn repeated_names_and_units_are_reported_at_the_repeat() {
    let src = r#"
[[hosts]]
name = "gw"
address = "gw.example.net"

[[org_units]]
path = "/sales"

[[org_units]]
path = "/sales"

[[tls_compliance]]
name = "partners"
domains = ["a.example"]

[[tls_compliance]]
name = "partners"
domains = ["b.example"]

[[routes]]
name = "sub"
domains = ["sub.example"]
host = "gw"

[[routes]]
name = "sub"
domains = ["other.example"]
host = "gw"
"#;
    let errs = errors(src);
    assert_eq!(
        errs,
        [
            "line 9, org_units[1] \"/sales\": org unit \"/sales\" is defined twice",
            "line 16, tls_compliance[1] \"partners\": rule name \"partners\" is used twice",
            "line 25, routes[1] \"sub\": route name \"sub\" is used twice",
        ],
    );
}

#[test]
fn a_policy_of_twenty_thousand_rules_compiles() {
    // Each rule's location is found from a table of line starts, and repeats from sets:
    // before, both scanned everything before each rule (17 s for this policy).
    let mut src = String::from("[[hosts]]\nname = \"gw\"\naddress = \"gw.example.net\"\n");
    for r in 0..20_000 {
        src += &format!("[[tls_compliance]]\nname = \"r{r}\"\ndomains = [\"d{r}.example\"]\n");
    }
    src += "[[tls_compliance]]\nname = \"r7\"\ndomains = [\"last.example\"]\n";
    let errs = errors(&src);
    assert_eq!(
        errs,
        ["line 60004, tls_compliance[20000] \"r7\": rule name \"r7\" is used twice"]
    );
}

#[test]
fn unknown_keys_are_placed_in_their_own_table() {
    let src = r#"[[hosts]]
name = "a"
address = "a.example.net"

[[hosts]]
name = "b"
priority = 1
address = "b.example.net"

[[hosts]]
name = "c"
address = "c.example.net"
priority = 2

[[tls_compliance]]
name = "partners"
domains = ["partner.example"]
priority = 3

[policy]
name = "x"
tests_note = { priority = 4 }
"#;
    let errs = errors(src);
    let find = |at: &str| errs.iter().any(|e| e.starts_with(at));
    assert!(
        find("line 7: unknown field `priority` (at hosts.1.priority)"),
        "{errs:#?}"
    );
    assert!(
        find("line 13: unknown field `priority` (at hosts.2.priority)"),
        "{errs:#?}"
    );
    assert!(
        find("line 18: unknown field `priority` (at tls_compliance.0.priority)"),
        "{errs:#?}"
    );
    assert!(
        find("line 22: unknown field `tests_note` (at policy.tests_note)"),
        "{errs:#?}"
    );
}

#[test]
fn every_value_of_the_wrong_type_is_reported_at_once() {
    let src = r#"[policy]
name = 12

[[hosts]]
name = "gw"
address = "gw.example.net"
port = "twenty-five"
colour = "blue"

[[tls_compliance]]
name = "partners"
domains = "partner.example"
"#;
    let errs = errors(src);
    assert_eq!(errs.len(), 4, "{errs:#?}");
    assert!(
        errs.iter().any(|e| e.starts_with("line 2, column 8")),
        "{errs:#?}"
    );
    assert!(
        errs.iter().any(|e| e.starts_with("line 7, column 8")),
        "{errs:#?}"
    );
    assert!(
        errs.iter().any(|e| e.starts_with("line 12, column 11")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("line 8: unknown field `colour`")),
        "{errs:#?}"
    );
}

#[test]
fn routes_and_tests_need_names_and_tests_must_be_able_to_fail() {
    let errs = errors(
        r#"
[[hosts]]
name = "gw"
address = "gw.example"

[[routes]]
name = ""
domains = ["a.example"]
host = "gw"

[[tests]]
name = "t"
query = { recipient = "bob@a.example" }
expect = { route = "host" }

[[tests]]
name = "t"
query = { recipient = "bob@a.example" }
expect = { route = "host" }

[[tests]]
name = "nothing checked"
query = { recipient = "bob@a.example" }
expect = {}

[[tests]]
name = "no address"
query = { recipient = "a.example" }
expect = { route = "direct" }
"#,
    );
    assert_eq!(errs.len(), 4, "{errs:#?}");
    assert!(
        errs[0].contains("line 6") && errs[0].contains("a route needs a name"),
        "{errs:#?}"
    );
    assert!(
        errs[1].contains("line 16") && errs[1].contains("test name \"t\" is used twice"),
        "{errs:#?}"
    );
    assert!(
        errs[2].contains("line 21") && errs[2].contains("cannot fail"),
        "{errs:#?}"
    );
    assert!(
        errs[3].contains("line 26") && errs[3].contains("not an address"),
        "{errs:#?}"
    );
}

#[test]
fn a_required_value_of_the_wrong_type_is_not_also_missing() {
    let src = r#"[[hosts]]
name = 7
address = "gw.example.net"

[[hosts]]
name = "b"
address = 9
"#;
    let errs = errors(src);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(errs[0].starts_with("line 2"), "{errs:#?}");
    assert!(errs[1].starts_with("line 7"), "{errs:#?}");
    assert!(
        !errs.iter().any(|e| e.contains("missing field")),
        "{errs:#?}"
    );
}

#[test]
fn a_misspelt_section_is_reported_with_its_line() {
    let errs = errors(
        r#"
[policy]
name = "x"

[[tls_complance]]
name = "partners"
domains = ["partner.example"]
"#,
    );
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].starts_with("line 5") && errs[0].contains("unknown field `tls_complance`"),
        "{errs:#?}"
    );
}

/// `require_tls = false` exempts a rule's mail from TLS: certificate options next to it
/// read like a requirement that would not hold, so they are refused, as on hosts.
#[test]
fn an_exemption_with_certificate_options_is_refused() {
    let errs = errors(
        r#"
[[tls_compliance]]
name = "legacy"
domains = ["legacy.example"]
require_tls = false
require_ca_signed = true
"#,
    );
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains("line 2") && errs[0].contains("need require_tls = true"),
        "{errs:#?}"
    );
}

/// What an audit's policy audit found the compiler took and then read otherwise: a TLS
/// version on an exemption or a host without TLS (silently dropped, while the compiled
/// form's check refuses it), org unit segments `.` and `..`, a host address that is
/// neither an IP address nor a host name, and an IP address in brackets (refused with a
/// domain's syntax message).
#[test]
fn settings_that_would_be_read_otherwise_are_refused() {
    let errs = errors(
        r#"
[[hosts]]
name = "clear"
address = "clear.example.net"
require_tls = false
require_ca_signed = false
validate_hostname = false
min_tls = "1.3"

[[hosts]]
name = "nine"
address = "999.1.1.1"

[[hosts]]
name = "bracket"
address = "[10.0.0.1]"

[[org_units]]
path = "/a/../b"
senders = ["b.example"]

[[tls_compliance]]
name = "legacy"
domains = ["legacy.example"]
require_tls = false
min_tls = "1.3"
"#,
    );
    for needle in [
        "hosts[0] \"clear\": min_tls = \"1.3\" needs require_tls = true",
        "`999.1.1.1`: not an IP address, and not a host name",
        "`[10.0.0.1]`: write an IP address without brackets",
        "a segment may not be `.` or `..`",
        "tls_compliance[0] \"legacy\": min_tls = \"1.3\" needs require_tls = true",
    ] {
        assert!(
            errs.iter().any(|e| e.contains(needle)),
            "{needle}: {errs:#?}"
        );
    }
}

/// What an audit got through `policy check` and into the relay: a rule for one side
/// lowered what the other side's rule required. A sender rule asking for TLS 1.3 dropped
/// the bank's certificate check (the two now combine), and a child unit's sender
/// exemption overrode the parent's rule for the bank's recipients (clear text; each side
/// is now looked up on its own, a child overriding its parent for that side only).
#[test]
fn a_rule_for_one_side_never_lowers_the_other_side_s_rule_at_any_unit() {
    use altroute_policy::{CertStatus, Phase, Query, Route, Starttls, TlsVersion, decide};
    let src = r#"
[policy]
name = "sides"

[[org_units]]
path = "/newsletters"
senders = ["news.corp.example"]

[[tls_compliance]]
name = "bank"
domains = ["bank.example"]
require_ca_signed = true
validate_hostname = true

[[tls_compliance]]
name = "alice-tls13"
direction = "inbound"
addresses = ["alice@corp.example"]
min_tls = "1.3"

[[tls_compliance]]
name = "news-exempt"
org_unit = "/newsletters"
direction = "inbound"
domains = ["news.corp.example"]
require_tls = false

[[tls_compliance]]
name = "news-bank-exempt"
org_unit = "/newsletters"
domains = ["partner.example"]
require_tls = false

[[tls_compliance]]
name = "partner"
domains = ["partner.example"]
require_ca_signed = true
"#;
    let policy = compile(src).unwrap_or_else(|e| panic!("{e:?}")).policy;
    let verdict = |sender: &str, rcpt: &str, starttls, tls, cert| {
        decide(
            &policy,
            &Query {
                phase: Phase::Verdict,
                starttls,
                tls,
                cert,
                mx: "mx.x".into(),
                ..Query::plan(sender, rcpt)
            },
        )
    };
    // TLS 1.3 with an untrusted certificate: alice's wish for 1.3 keeps the bank's check.
    let d = verdict(
        "alice@corp.example",
        "bob@bank.example",
        Starttls::Offered,
        TlsVersion::V1_3,
        CertStatus::Untrusted,
    );
    assert_ne!(d.route, Route::Direct, "{d:?}");
    assert!(
        d.tls.required && d.tls.min == altroute_policy::MinTls::V1_3,
        "{d:?}"
    );
    // Named for the rule whose own requirement failed: the bank's certificate check.
    assert_eq!(d.rule, "tls_compliance:bank", "{d:?}");
    // ...and the bank's trusted certificate over TLS 1.2 misses alice's 1.3.
    let d = verdict(
        "alice@corp.example",
        "bob@bank.example",
        Starttls::Offered,
        TlsVersion::V1_2,
        CertStatus::Valid,
    );
    assert_ne!(d.route, Route::Direct, "{d:?}");
    assert_eq!(d.rule, "tls_compliance:alice-tls13", "{d:?}");
    // A child unit's sender exemption does not undo the root's rule for the bank.
    let d = verdict(
        "n@news.corp.example",
        "bob@bank.example",
        Starttls::Absent,
        TlsVersion::None,
        CertStatus::None,
    );
    assert_ne!(d.route, Route::Direct, "{d:?}");
    assert_eq!(d.rule, "tls_compliance:bank", "{d:?}");
    // A child unit's rule for the same side still overrides its parent's.
    let d = verdict(
        "n@news.corp.example",
        "bob@partner.example",
        Starttls::Absent,
        TlsVersion::None,
        CertStatus::None,
    );
    // (Both sides exempt there; the more specific pattern names it.)
    assert_eq!(d.route, Route::Direct, "{d:?}");
    assert_ne!(d.rule, "tls_compliance:partner", "{d:?}");
}

/// A compiled policy edited and hashed again (anyone can) is checked as its TOML would
/// be: an audit's JSON with the unit path `finance` (no `/`) loaded, and the unit's
/// senders escaped every rule of `/` (clear text to the bank).
#[test]
fn a_json_policy_is_checked_as_its_toml_would_be() {
    use altroute_policy::Policy;
    let src = r#"
[policy]
name = "json"

[[org_units]]
path = "/finance"
senders = ["corp.example"]

[[tls_compliance]]
name = "bank"
domains = ["bank.example"]
require_ca_signed = true

[[tls_compliance]]
name = "partner"
org_unit = "/finance"
domains = ["partner.example"]
"#;
    let compiled = compile(src).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(Policy::from_json(compiled.json.as_bytes()).is_ok());
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&compiled.json).unwrap();
        f(&mut v);
        let mut p: Policy = serde_json::from_value(v).unwrap();
        p.version = p.content_version();
        Policy::from_json(p.to_json().as_bytes())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let err = edit(&|v| v["org_units"][0]["path"] = "finance".into());
    assert!(err.contains("must start with `/`"), "{err}");
    let err = edit(&|v| v["compliance"][1]["org_unit"] = "/nowhere".into());
    assert!(err.contains("unknown org unit \"/nowhere\""), "{err}");
    let err = edit(&|v| {
        v["compliance"][1]["org_unit"] = "/".into();
        v["compliance"][1]["patterns"][0] = "bank.example".into();
    });
    assert!(err.contains("overlapping rules"), "{err}");
    let err = edit(&|v| v["compliance"][1]["name"] = "bank".into());
    assert!(err.contains("used twice"), "{err}");
    let err = edit(&|v| {
        v["org_units"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"path": "/sales", "senders": ["corp.example"]}))
    });
    assert!(err.contains("mapped to org units"), "{err}");
    let err = edit(&|v| {
        v["tests"] = serde_json::json!([
            {"name": "t", "query": {"phase": "plan", "recipient": "b@bank.example"}, "expect": {}}
        ])
    });
    assert!(err.contains("cannot fail"), "{err}");
    // A host given twice: a map would keep the second silently.
    let with_host = compile(&format!(
        "{src}\n[[hosts]]\nname = \"gw\"\naddress = \"gw.example\"\nrequire_ca_signed = true\n"
    ))
    .unwrap_or_else(|e| panic!("{e:?}"));
    let at = with_host.json.find("\"gw\":{").unwrap();
    // `"gw":{…,"tls":{…}}`
    let end = at + with_host.json[at..].find("}}").unwrap() + 2;
    let entry = &with_host.json[at..end];
    let twice = with_host
        .json
        .replacen(entry, &format!("{entry},{entry}"), 1);
    let err = Policy::from_json(twice.as_bytes()).unwrap_err().to_string();
    assert!(err.contains("host \"gw\" is defined twice"), "{err}");
}

/// A test's question must be one the module takes: an audit's test with the recipient
/// `bob@bank.example, x@random.example` passed on a decision the module never makes (it
/// answers a fault there).
#[test]
fn a_test_asks_only_what_the_module_takes() {
    let src = r#"
[policy]
name = "asks"

[[tests]]
name = "two recipients"
query = { phase = "plan", sender = "a@corp.example", recipient = "bob@bank.example, x@random.example" }
expect = { route = "direct" }

[[tests]]
name = "a sender with a comment"
query = { phase = "plan", sender = "bob@(c)corp.example", recipient = "bob@bank.example" }
expect = { route = "direct" }
"#;
    let errs = errors(src);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].contains("recipient") && errs[0].contains("the module takes"),
        "{errs:#?}"
    );
    assert!(
        errs[1].contains("sender") && errs[1].contains("the module takes"),
        "{errs:#?}"
    );
}
