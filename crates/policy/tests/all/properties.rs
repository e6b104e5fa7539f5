//! The invariants of DESIGN §2 as properties over random policies and facts.

use std::collections::BTreeMap;

use altroute_policy::contract::{
    self, decode_decision, decode_query, decode_query_into, encode_decision, encode_query,
    encode_query_compact_into, lookup,
};
use altroute_policy::pattern::Pattern;
use altroute_policy::{
    CertStatus, Decision, Direction, FORMAT, Hop, Host, HostTarget, MinTls, MtaSts,
    OnTlsUnavailable, OrgUnit, Phase, Policy, Query, ResultType, Route, Rule, Starttls,
    StaticRoute, TlsRequiredNo, TlsRequirement, TlsVersion, Token, Verify, compliance_rule, decide,
    decide_into, explain, org_unit_of, static_route,
};
use proptest::prelude::*;

fn token<T: Token + std::fmt::Debug>() -> impl Strategy<Value = T> {
    proptest::sample::select(T::ALL)
}

const DOMAINS: &[&str] = &[
    "a.example",
    "b.example",
    "x.a.example",
    "y.x.a.example",
    "c.example",
];
const UNITS: &[&str] = &["/", "/u", "/u/v", "/w"];

/// A mailbox's local part: a dot-atom (UTF-8 allowed), or a quoted string with space and
/// specials inside but no `@`, `%` or `!` (`pattern::is_mailbox`).
const LOCAL_PART: &str = "[a-zA-Z0-9é#$&'*+/=?^_`{|}~-]{1,8}(\\.[a-z0-9é-]{1,8}){0,2}|\"[ a-zé#$&'*+/=?^_`{|}~.,;:<>()\\[\\]-]{0,12}\"";

/// [`LOCAL_PART`], or nothing (the null sender).
const LOCAL_PART_OR_NONE: &str = "|[a-zA-Z0-9é#$&'*+/=?^_`{|}~-]{1,8}(\\.[a-z0-9é-]{1,8}){0,2}|\"[ a-zé#$&'*+/=?^_`{|}~.,;:<>()\\[\\]-]{0,12}\"";

fn pattern() -> impl Strategy<Value = Pattern> {
    (
        0..3u8,
        proptest::sample::select(DOMAINS),
        proptest::sample::select(&["ann", "bob", "bob+x"][..]),
    )
        .prop_map(|(kind, d, user)| match kind {
            0 => Pattern::Domain(d.to_string()),
            1 => Pattern::Subdomains(d.to_string()),
            _ => Pattern::Address(format!("{user}@{d}")),
        })
}

fn requirement() -> impl Strategy<Value = TlsRequirement> {
    (any::<bool>(), token::<Verify>(), token::<MinTls>()).prop_map(|(required, verify, min)| {
        if required {
            TlsRequirement {
                required,
                verify,
                min,
            }
        } else {
            TlsRequirement::OPPORTUNISTIC
        }
    })
}

fn host() -> impl Strategy<Value = Host> {
    (requirement(), any::<bool>()).prop_map(|(tls, mx_lookup)| Host {
        addresses: vec!["h.example".to_string()],
        port: 25,
        mx_lookup,
        tls,
    })
}

prop_compose! {
    fn policy()(
        hosts in proptest::collection::vec(host(), 1..4),
        alternate in proptest::option::of(0..4usize),
        units in proptest::collection::vec((proptest::sample::select(UNITS), proptest::collection::vec(pattern(), 0..3)), 0..4),
        rules in proptest::collection::vec((proptest::sample::select(UNITS), token::<Direction>(), proptest::collection::vec(pattern(), 1..3), requirement()), 0..6),
        routes in proptest::collection::vec((proptest::sample::select(UNITS), proptest::collection::vec(pattern(), 1..3), 0..4usize), 0..3),
        on_unavailable in token::<OnTlsUnavailable>(),
        mta_sts in any::<bool>(),
        tls_required_no in token::<TlsRequiredNo>(),
        recipient_delimiter in proptest::sample::select(&["", "+", "+-"][..]),
    ) -> Policy {
        let hosts: BTreeMap<String, Host> = hosts.into_iter().enumerate().map(|(i, h)| (format!("h{i}"), h)).collect();
        let n = hosts.len();
        let mut p = Policy {
            format: FORMAT,
            version: String::new(),
            name: "random".to_string(),
            on_tls_unavailable: on_unavailable,
            mta_sts,
            tls_required_no,
            recipient_delimiter: recipient_delimiter.to_string(),
            alternate: alternate.map(|i| format!("h{}", i % n)),
            hosts,
            org_units: units.into_iter().map(|(path, senders)| OrgUnit { path: path.to_string(), senders }).collect(),
            compliance: rules.into_iter().enumerate().map(|(i, (u, direction, patterns, tls))| Rule {
                name: format!("r{i}"), org_unit: u.to_string(), direction, patterns, tls,
            }).collect(),
            routes: routes.into_iter().enumerate().map(|(i, (u, patterns, h))| StaticRoute {
                name: format!("s{i}"), org_unit: u.to_string(),
                patterns: patterns.into_iter().filter(|p| !matches!(p, Pattern::Address(_))).collect(),
                host: format!("h{}", h % n),
            }).collect(),
            tests: Vec::new(),
            patterns: Default::default(),
        };
        p.version = p.content_version();
        p
    }
}

fn address() -> impl Strategy<Value = String> {
    (
        proptest::sample::select(&["ann", "bob", "eve", "bob+x", "bob+y", "bob-x+y", "+bob"][..]),
        proptest::sample::select(DOMAINS),
    )
        .prop_map(|(u, d)| format!("{u}@{d}"))
}

prop_compose! {
    fn query()(
        phase in token::<Phase>(), sender in address(), recipient in address(),
        requiretls in any::<bool>(), tls_required_no in any::<bool>(), hop in token::<Hop>(),
        starttls in token::<Starttls>(), tls in token::<TlsVersion>(), cert in token::<CertStatus>(),
        mta_sts in token::<MtaSts>(), attempt in 1..10u32,
    ) -> Query {
        Query { phase, sender, recipient, requiretls, tls_required_no, mx: "mx.example".to_string(), hop, starttls, tls, cert, mta_sts, attempt }
    }
}

/// The sender's org unit by matching every sender pattern in order: the most specific
/// match, the first of equals. What the pattern index must choose.
fn org_unit_by_scan<'p>(policy: &'p Policy, sender: &str) -> &'p str {
    let mut best: Option<(&Pattern, &str)> = None;
    for unit in &policy.org_units {
        for p in &unit.senders {
            if p.matches_mailbox(sender, &policy.recipient_delimiter)
                && best.is_none_or(|(b, _)| p.specificity() > b.specificity())
            {
                best = Some((p, unit.path.as_str()));
            }
        }
    }
    best.map_or("/", |(_, u)| u)
}

/// The compliance rule by matching every pattern of every rule in order, each side
/// (recipient, sender) on its own, unit by unit up the tree: the most specific match, the
/// last of equals. When both sides match: the one covering the other, else the more
/// specific with the requirement of both, field by field.
fn rule_by_scan<'p>(
    policy: &'p Policy,
    unit: &'p str,
    q: &Query,
) -> Option<(&'p Rule, &'p Pattern, &'p str, TlsRequirement)> {
    // The nearest unit's most specific match of one side, the last of equals.
    let side = |outbound: bool| {
        altroute_policy::ancestors(unit).find_map(|at| {
            policy
                .compliance
                .iter()
                .enumerate()
                .filter(|(_, r)| r.org_unit == at)
                .flat_map(|(i, r)| {
                    r.patterns
                        .iter()
                        .enumerate()
                        .map(move |(j, p)| (i, j, r, p))
                })
                .filter(|(_, _, r, p)| match (r.direction, outbound) {
                    (Direction::Outbound | Direction::Both, true) => {
                        p.matches_mailbox(&q.recipient, &policy.recipient_delimiter)
                    }
                    (Direction::Inbound | Direction::Both, false) => {
                        p.matches_mailbox(&q.sender, &policy.recipient_delimiter)
                    }
                    _ => false,
                })
                .max_by_key(|(i, j, _, p)| (p.specificity(), *i, *j))
                .map(|(i, j, r, p)| (i, j, r, p, at))
        })
    };
    let key = |m: &(usize, usize, &Rule, &Pattern, &str)| (m.3.specificity(), m.0, m.1);
    let one = |m: (usize, usize, &'p Rule, &'p Pattern, &'p str)| (m.2, m.3, m.4, m.2.tls);
    match (side(true), side(false)) {
        (Some(t), Some(f)) => match (t.2.tls.covers(f.2.tls), f.2.tls.covers(t.2.tls)) {
            (true, false) => Some(one(t)),
            (false, true) => Some(one(f)),
            (true, true) => Some(one(if key(&t) >= key(&f) { t } else { f })),
            (false, false) => {
                let tls = t.2.tls.max(f.2.tls);
                let named = if key(&t) >= key(&f) { t } else { f };
                Some((named.2, named.3, named.4, tls))
            }
        },
        (t, f) => t.or(f).map(one),
    }
}

/// The static route by matching every pattern of every route against the recipient's
/// domain, in order, unit by unit up the tree: the most specific, the last of equals.
fn route_by_scan<'p>(
    policy: &'p Policy,
    unit: &'p str,
    recipient: &str,
) -> Option<(&'p StaticRoute, &'p Pattern, &'p str)> {
    let domain = altroute_policy::pattern::domain_of(recipient);
    for at in altroute_policy::ancestors(unit) {
        let best = policy
            .routes
            .iter()
            .filter(|r| r.org_unit == at)
            .flat_map(|r| r.patterns.iter().map(move |p| (r, p)))
            .filter(|(_, p)| p.matches_split(domain, domain))
            .max_by_key(|(_, p)| p.specificity());
        if let Some((r, p)) = best {
            return Some((r, p, at));
        }
    }
    None
}

/// `policy` with `n` more rules, routes and org units of every kind of pattern in front of
/// the others, none matching the test addresses: look-ups then search among more entries
/// than the index looks through one by one.
fn padded(policy: &Policy, n: usize) -> Policy {
    let patterns = |i: usize| {
        vec![
            Pattern::Address(format!("p{i}@p{i}.x.a.example")),
            Pattern::Domain(format!("p{i}.a.example")),
            Pattern::Domain(format!("{}.example", "p".repeat(i % 12 + 1))),
            Pattern::Subdomains(format!("p{i}.b.example")),
        ]
    };
    let mut p = policy.clone();
    let mut compliance = Vec::new();
    let mut units = Vec::new();
    for i in 0..n {
        for (j, unit) in UNITS.iter().enumerate() {
            compliance.push(Rule {
                name: format!("pad{i}-{j}"),
                org_unit: unit.to_string(),
                direction: Direction::ALL[(i + j) % Direction::ALL.len()],
                patterns: patterns(i),
                tls: TlsRequirement::STRICT,
            });
            p.routes.push(StaticRoute {
                name: format!("pad{i}-{j}"),
                org_unit: unit.to_string(),
                patterns: patterns(i).split_off(1),
                host: "h0".to_string(),
            });
        }
        units.push(OrgUnit {
            path: format!("/pad{i}"),
            senders: patterns(i),
        });
    }
    compliance.append(&mut p.compliance);
    p.compliance = compliance;
    units.append(&mut p.org_units);
    p.org_units = units;
    p
}

/// `s` with the letters that `flips` selects (bit i for letter i, cycling) upper-cased.
fn mixed_case(s: &str, flips: u32) -> String {
    s.chars()
        .enumerate()
        .map(|(i, c)| {
            if flips >> (i % 32) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// The pattern index picks the org unit, the compliance rule and the static route
    /// that matching every pattern in order picks, ties included, in any letter case, on
    /// policies the compiler would refuse too (repeated and overlapping patterns).
    #[test]
    fn indexed_lookups_pick_what_a_scan_of_every_pattern_picks(
        policy in policy(),
        mut q in query(),
        flips in any::<(u32, u32)>(),
        unit in proptest::sample::select(UNITS),
    ) {
        q.sender = mixed_case(&q.sender, flips.0);
        q.recipient = mixed_case(&q.recipient, flips.1);
        for policy in [policy.clone(), padded(&policy, 16)] {
            prop_assert_eq!(org_unit_of(&policy, &q.sender), org_unit_by_scan(&policy, &q.sender));
            prop_assert_eq!(compliance_rule(&policy, unit, &q), rule_by_scan(&policy, unit, &q));
            prop_assert_eq!(
                static_route(&policy, unit, &q.recipient),
                route_by_scan(&policy, unit, &q.recipient)
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Mail that requires TLS never gets a decision that lets it over a hop whose TLS does
    /// not meet the requirement; REQUIRETLS always means verified TLS.
    #[test]
    fn tls_required_mail_never_goes_without_tls(policy in policy(), q in query()) {
        let d = decide(&policy, &q);
        let plan = decide(&policy, &Query { phase: Phase::Plan, ..q.clone() });
        match q.phase {
            Phase::Verdict => {
                if d.proceeds_on(q.hop) {
                    // The connection we are on meets what the decision requires...
                    prop_assert!(d.tls.met_by(q.tls, q.cert), "{d:?} on {q:?}");
                    // ...which is at least what the mail itself requires.
                    if q.hop == Hop::Direct && plan.route == Route::Direct {
                        prop_assert!(d.tls.covers(plan.tls), "{d:?} vs plan {plan:?}");
                    }
                    if q.requiretls {
                        prop_assert!(q.tls != TlsVersion::None && q.cert == CertStatus::Valid, "{d:?} on {q:?}");
                    }
                    if plan.tls.required && plan.route == Route::Direct {
                        prop_assert!(q.tls != TlsVersion::None, "{d:?} on {q:?}");
                    }
                }
                if d.route == Route::Alternate && q.hop != Hop::Alternate {
                    prop_assert!(d.tls.required, "reroute {d:?}");
                    if plan.route == Route::Direct {
                        prop_assert!(d.tls.covers(plan.tls), "reroute {d:?} vs plan {plan:?}");
                    }
                }
            }
            Phase::Plan => {
                if q.requiretls {
                    prop_assert!(d.tls.covers(TlsRequirement::STRICT), "{d:?}");
                }
            }
        }
    }

    /// Every decision names its rule and the policy version.
    #[test]
    fn every_decision_names_rule_and_version(policy in policy(), q in query()) {
        let d = decide(&policy, &q);
        prop_assert!(!d.rule.is_empty());
        prop_assert_eq!(&d.policy_version, &policy.version);
        if matches!(d.route, Route::Defer | Route::Bounce) {
            let reply = d.reply.clone().unwrap_or_default();
            let want = if d.route == Route::Defer { '4' } else { '5' };
            prop_assert!(reply.starts_with(want), "{reply}");
        }
    }

    /// decode(encode(q)) == q for any facts, including odd text.
    #[test]
    fn facts_round_trip(mut q in query(), sender in LOCAL_PART_OR_NONE, local in LOCAL_PART, mx in ".*") {
        // Any mailbox's local part, dot-atom or quoted (anything else makes the facts
        // invalid: `pattern::is_mailbox`); any text at all in mx.
        q.sender = if sender.is_empty() { sender } else { format!("{sender}@corp.example") };
        q.recipient = format!("{local}@example.org");
        q.mx = mx;
        let headers = encode_query(&q);
        for (_, v) in &headers {
            // Printable ASCII, no space at either end (HTTP would drop it).
            prop_assert!(v.bytes().all(|b| (b' '..=b'~').contains(&b)), "{v:?}");
            prop_assert!(!v.starts_with(' ') && !v.ends_with(' '), "{v:?}");
        }
        let back = decode_query(lookup(&headers)).unwrap();
        prop_assert_eq!(back, q);
    }

    /// The compact form (defaults left out) decodes to the same query, and leaves out
    /// exactly the facts that hold their default.
    #[test]
    fn compact_facts_round_trip(mut q in query(), sender in LOCAL_PART_OR_NONE, local in LOCAL_PART, mx in ".*") {
        // Any mailbox's local part, dot-atom or quoted (anything else makes the facts
        // invalid: `pattern::is_mailbox`); any text at all in mx.
        q.sender = if sender.is_empty() { sender } else { format!("{sender}@corp.example") };
        q.recipient = format!("{local}@example.org");
        q.mx = mx;
        let mut buf = String::new();
        let (facts, n) = encode_query_compact_into(&q, &mut buf);
        let headers: Vec<(&str, &str)> =
            facts[..n].iter().map(|(name, at)| (*name, &buf[at.clone()])).collect();
        let back = decode_query(lookup(&headers)).unwrap();
        prop_assert_eq!(&back, &q);
        let full = encode_query(&q);
        let default = encode_query(&Query::default());
        for ((name, value), (_, default_value)) in full.iter().zip(&default) {
            let sent = headers.iter().any(|(n, _)| n == name);
            let always = *name == contract::PHASE || *name == contract::RECIPIENT;
            prop_assert_eq!(sent, always || value != default_value, "{}", name);
        }
    }

    /// Deciding and decoding over what earlier questions left, as the wasm module does to
    /// reuse its strings' room, gives exactly what a fresh decision and a fresh decode give.
    #[test]
    fn decisions_and_facts_written_over_old_ones_are_the_same(
        policy in policy(), qs in proptest::collection::vec(query(), 1..8), odd in ".*",
        mx in ".*",
    ) {
        let mut out = Decision::fault(&odd, &odd);
        out.host = Some(HostTarget { name: odd.clone(), addresses: vec![odd.clone(); 3], port: 1, mx_lookup: true });
        let mut facts = Query { sender: odd.clone(), recipient: odd.clone(), mx: odd.clone(), attempt: 7, ..Query::default() };
        let mut buf = String::new();
        for (i, q) in qs.iter().enumerate() {
            let mut q = q.clone();
            if i % 2 == 1 {
                q.mx = mx.clone();
                q.sender.clear();
            }
            decide_into(&policy, &q, &mut out);
            prop_assert_eq!(&out, &decide(&policy, &q));
            prop_assert_eq!(&explain(&policy, &q).0, &out);
            let (pairs, n) = encode_query_compact_into(&q, &mut buf);
            let headers: Vec<(&str, &str)> =
                pairs[..n].iter().map(|(name, at)| (*name, &buf[at.clone()])).collect();
            prop_assert!(decode_query_into(lookup(&headers), &mut facts).is_ok());
            prop_assert_eq!(&facts, &q);
        }
    }

    /// decode(encode(d)) == d for any decision, but a reply that is not one reply line of
    /// the route's class (dropped: the relay writes its own).
    #[test]
    fn decisions_round_trip(
        route in token::<Route>(), tls in requirement(), rule in ".*", version in ".*",
        result in token::<ResultType>(), reason in ".{0,200}",
        reply in proptest::option::of(prop_oneof!["[45][0-9]{2}( [ -~]{0,60})?", ".*"]),
        host in proptest::option::of((".*", proptest::collection::vec(".+", 0..3), any::<u16>(), any::<bool>())),
    ) {
        let d = Decision {
            route, tls, rule, policy_version: version, result, reason, reply,
            host: host.map(|(name, addresses, port, mx_lookup)| HostTarget { name, addresses, port, mx_lookup }),
        };
        let headers = encode_decision(&d);
        for (_, v) in &headers {
            prop_assert!(v.bytes().all(|b| (b' '..=b'~').contains(&b)), "{v:?}");
            prop_assert!(!v.starts_with(' ') && !v.ends_with(' '), "{v:?}");
        }
        let back = decode_decision(lookup(&headers)).unwrap();
        let reply = d.reply.clone().filter(|r| altroute_policy::contract::is_reply_for(d.route, r));
        prop_assert_eq!(back, Decision { reply, ..d });
    }
}

/// A fact given twice is refused, whichever the copies say and in whatever case the name
/// is written: a decision about one copy could be acted on with the other. A decision
/// header given twice in a request is no fact (the module replaces those).
#[test]
fn a_repeated_fact_is_refused() {
    let base = [
        ("x-altroute-phase", "plan"),
        ("x-altroute-sender", "a@corp.example"),
        ("x-altroute-recipient", "bob@random.example"),
    ];
    for (name, value) in [
        ("x-altroute-recipient", "bob@partner.example"),
        ("X-Altroute-Recipient", "bob@random.example"),
        ("x-altroute-sender", "x@corp.example"),
        ("x-altroute-phase", "plan"),
    ] {
        let mut pairs = base.to_vec();
        pairs.push((name, value));
        let want = contract::ContractError::Repeated(
            contract::FACT_HEADERS
                .into_iter()
                .find(|n| n.eq_ignore_ascii_case(name))
                .unwrap(),
        );
        assert_eq!(decode_query(lookup(&pairs)), Err(want.clone()), "{name}");
        let mut q = Query::plan("a@b", "c@d");
        assert_eq!(decode_query_into(lookup(&pairs), &mut q), Err(want));
    }
    let mut pairs = base.to_vec();
    pairs.extend([("x-altroute-route", "direct"), ("x-altroute-route", "host")]);
    assert!(decode_query(lookup(&pairs)).is_ok());
}

/// An address that could be read as another mailbox is refused as a fact: a control
/// character anywhere, a domain that is not labels or an address literal (a comment,
/// white space, a backslash), or a local part that is neither a dot-atom nor a quoted
/// string, or that holds `@`, `%` or `!`. Through Envoy's HTTP face these were decided
/// as they were written (opportunistic), while an MTA given `bob@(c)partner.example`
/// delivers to bob@partner.example, and an upstream given `bob@partner.example,
/// x@random.example` (as HTTP joins a repeated header) delivers to both. Every address
/// the relay asks about passes (it refuses the others in SMTP).
#[test]
fn addresses_an_mta_reads_otherwise_are_refused_as_facts() {
    for bad in [
        "bob@(c)partner.example",
        "bob@partner.example (c)",
        "bob@partner .example",
        "bob@partner\\.example",
        "bob@partner.example\r\nx",
        "bob\u{1b}@partner.example",
        "bob@partner..example",
        "bob@",
        "bob@[192.0.2.1",
        "bob@[a b]",
        "bob@partner.example, x@random.example",
        "bob@partner.example,x@random.example",
        "<bob@partner.example>x@random.example",
        "bob smith@partner.example",
        "bob%partner.example@localhost",
        "partner.example!bob@localhost",
        "\"bob@partner.example\"@localhost",
        "bob",
    ] {
        for name in [contract::RECIPIENT, contract::SENDER] {
            let mut pairs = vec![("x-altroute-phase", "plan"), (name, bad)];
            if name == contract::SENDER {
                pairs.push((contract::RECIPIENT, "x@example.org"));
            }
            let encoded: Vec<(&str, String)> = pairs
                .iter()
                .map(|(n, v)| {
                    (
                        *n,
                        if *n == "x-altroute-phase" {
                            v.to_string()
                        } else {
                            contract::encode_text(v)
                        },
                    )
                })
                .collect();
            let err = decode_query(lookup(&encoded)).expect_err(bad);
            assert!(
                matches!(err, contract::ContractError::Invalid { name: n, .. } if n == name),
                "{bad}: {err:?}"
            );
        }
    }
    for good in [
        "bob@partner.example",
        "Bob.Smith+tag@Partner.Example.",
        "\"bob smith\"@partner.example",
        "\"a>b, c\"@partner.example",
        "j\u{f6}rg@b\u{fc}cher.example",
        "bob@[192.0.2.1]",
        "bob@[IPv6:2001:db8::1]",
        "@relay.example:bob@partner.example",
    ] {
        let q = Query::plan(good, good);
        assert_eq!(decode_query(lookup(&encode_query(&q))), Ok(q), "{good}");
    }
}

#[test]
fn garbage_facts_are_errors_not_panics() {
    for pairs in [
        vec![],
        vec![("x-altroute-phase", "plan")],
        vec![
            ("x-altroute-phase", "later"),
            ("x-altroute-recipient", "a@b"),
        ],
        vec![
            ("x-altroute-phase", "plan"),
            ("x-altroute-recipient", "no-at-sign"),
        ],
        vec![
            ("x-altroute-phase", "plan"),
            ("x-altroute-recipient", "a@b"),
            ("x-altroute-tls", "1.1"),
        ],
        vec![
            ("x-altroute-phase", "plan"),
            ("x-altroute-recipient", "a%zz@b"),
        ],
        vec![
            ("x-altroute-phase", "plan"),
            ("x-altroute-recipient", "a@b"),
            ("x-altroute-attempt", "-1"),
        ],
    ] {
        let err = decode_query(lookup(&pairs)).expect_err("garbage facts");
        // Over an earlier query: the same error.
        let mut q = Query::plan("a@b", "c@d");
        assert_eq!(
            decode_query_into(lookup(&pairs), &mut q),
            Err(err),
            "{pairs:?}"
        );
    }
    let fault = Decision::fault("v1", "bad facts");
    assert_eq!(fault.route, Route::Defer);
    assert!(fault.tls.required);
}
