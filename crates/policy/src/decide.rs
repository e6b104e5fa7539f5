//! The decision: facts in, decision out. Pure; no clock, no I/O.
//!
//! Three separate axes, as the best MTAs separate them: whether encryption is required
//! ([`TlsRequirement::required`]), how the peer is authenticated ([`Verify`]), and which
//! name must match (the host connected to, which the relay checks and reports as
//! [`CertStatus::HostnameMismatch`]).

use crate::index::Entry;
use crate::pattern::{Canonical, Pattern};
use crate::policy::{Host, Policy, Rule, StaticRoute, ancestors};
use crate::query::{Decision, HostTarget, Query, TlsRequirement};
use crate::types::{
    CertStatus, Hop, MtaSts, OnTlsUnavailable, Phase, ResultType, Route, Starttls, TlsRequiredNo,
    TlsVersion, Token,
};

/// Decide a query.
pub fn decide(policy: &Policy, query: &Query) -> Decision {
    let mut out = blank();
    decide_into(policy, query, &mut out);
    out
}

/// A decision for [`Decider`] to fill in, with nothing allocated.
fn blank() -> Decision {
    Decision {
        route: Route::Defer,
        host: None,
        tls: TlsRequirement::STRICT,
        rule: String::new(),
        policy_version: String::new(),
        result: ResultType::PolicyError,
        reason: String::new(),
        reply: None,
    }
}

/// [`decide`], written over `out`: every field is set, and the room its strings already
/// have is reused. A caller that keeps `out` from one question to the next decides
/// without allocating (the wasm module, where each allocation is a call into its
/// allocator; BENCHMARKS.md, decision latency). The result equals [`decide`]'s whatever
/// `out` held before.
pub fn decide_into(policy: &Policy, query: &Query, out: &mut Decision) {
    Decider {
        policy,
        query,
        trace: None,
        out,
        both: None,
    }
    .run();
}

/// Decide a query and say why, step by step (`altroute policy explain`).
pub fn explain(policy: &Policy, query: &Query) -> (Decision, Vec<String>) {
    let mut trace = Vec::new();
    let mut decision = blank();
    Decider {
        policy,
        query,
        trace: Some(&mut trace),
        out: &mut decision,
        both: None,
    }
    .run();
    (decision, trace)
}

/// The org unit a sender belongs to: the unit whose sender pattern matches most
/// specifically (of equally specific ones, the first listed), or `/`.
pub fn org_unit_of<'p>(policy: &'p Policy, sender: &str) -> &'p str {
    unit_of(policy, &Canonical::new(sender))
}

/// [`org_unit_of`] for a sender already in canonical form.
fn unit_of<'p>(policy: &'p Policy, sender: &Canonical<'_>) -> &'p str {
    let tables = policy.patterns.get(policy);
    let mut best: Option<((u8, usize), (usize, usize))> = None;
    tables.senders.matching("", sender, |e| {
        let unit = &policy.org_units[e.owner];
        let specificity = unit.senders[e.pattern].specificity();
        let at = (e.owner, e.pattern);
        if best.is_none_or(|(s, a)| specificity > s || (specificity == s && at < a)) {
            best = Some((specificity, at));
        }
    });
    best.map_or("/", |(_, (u, _))| policy.org_units[u].path.as_str())
}

/// The TLS compliance rule that applies to `query` when the sender is in org unit `unit`,
/// and the TLS it requires. Each side is looked up on its own: the recipient side
/// (outbound rules and those for both ways) and the sender side (inbound ones), each in
/// that unit or its nearest ancestor with a match of that side (a child overrides its
/// parent for that side only), within a unit the most specific matching pattern (of
/// equally specific ones, the last listed). When both sides have a rule, the one that
/// requires at least as much TLS in every respect applies; when neither does, the
/// requirement is the stricter of the two in every respect, named by the rule of the more
/// specific pattern. A rule for one side never lowers what the other side's rule
/// requires: an audit's child-unit sender exemption once sent mail in clear text that a
/// parent's recipient rule required TLS for, and a sender rule asking for TLS 1.3 once
/// dropped a recipient rule's certificate check. Returns the rule, its pattern that
/// matched, the unit it belongs to, and the requirement.
pub fn compliance_rule<'p>(
    policy: &'p Policy,
    unit: &'p str,
    query: &Query,
) -> Option<(&'p Rule, &'p Pattern, &'p str, TlsRequirement)> {
    let (rcpt, from) = (
        Canonical::new(&query.recipient),
        Canonical::new(&query.sender),
    );
    rule_for(policy, unit, &rcpt, &from).map(|a| (a.rule, a.pattern, a.unit, a.tls))
}

/// A compliance rule as [`compliance_rule`] finds it, with the other side's rule when
/// the requirement combines both.
struct Applied<'p> {
    rule: &'p Rule,
    pattern: &'p Pattern,
    unit: &'p str,
    tls: TlsRequirement,
    /// The other side's rule, when neither side's requirement covers the other's.
    also: Option<(&'p Rule, &'p str)>,
}

/// [`compliance_rule`] for a recipient and a sender already in canonical form.
fn rule_for<'p>(
    policy: &'p Policy,
    unit: &'p str,
    rcpt: &Canonical<'_>,
    from: &Canonical<'_>,
) -> Option<Applied<'p>> {
    let tables = policy.patterns.get(policy);
    let side = |outbound: bool| {
        nearest_unit_match(unit, |at, best| {
            let keep = |e: &Entry| {
                keep_last_most_specific(best, &policy.compliance[e.owner].patterns, e);
            };
            if outbound {
                tables.to.matching(at, rcpt, keep);
            } else {
                tables.from.matching(at, from, keep);
            }
        })
    };
    let found = |(at, r, p): (&'p str, usize, usize)| {
        let rule = &policy.compliance[r];
        let pattern = &rule.patterns[p];
        (rule, pattern, at, (pattern.specificity(), r, p))
    };
    let (to, from_side) = (side(true).map(found), side(false).map(found));
    let applied = |(rule, pattern, unit, _): (&'p Rule, &'p Pattern, &'p str, _)| Applied {
        rule,
        pattern,
        unit,
        tls: rule.tls,
        also: None,
    };
    Some(match (to, from_side) {
        (Some(t), Some(f)) => match (t.0.tls.covers(f.0.tls), f.0.tls.covers(t.0.tls)) {
            (true, false) => applied(t),
            (false, true) => applied(f),
            // The same requirement: the more specific pattern (of equals, the last listed).
            (true, true) => applied(if t.3 >= f.3 { t } else { f }),
            // Neither stricter in every respect: both, field by field.
            (false, false) => {
                let (named, other) = if t.3 >= f.3 { (t, f) } else { (f, t) };
                Applied {
                    tls: t.0.tls.max(f.0.tls),
                    also: Some((other.0, other.2)),
                    ..applied(named)
                }
            }
        },
        (t, f) => applied(t.or(f)?),
    })
}

/// The static route for mail to `recipient` when the sender is in org unit `unit`: a
/// route of that unit or of its nearest ancestor with a match; within a unit, the one
/// with the most specific pattern matching the recipient's domain (of equally specific
/// ones, the last listed). Returns the route, its pattern that matched and the unit it
/// belongs to.
pub fn static_route<'p>(
    policy: &'p Policy,
    unit: &'p str,
    recipient: &str,
) -> Option<(&'p StaticRoute, &'p Pattern, &'p str)> {
    route_for(policy, unit, &Canonical::new(recipient))
}

/// [`static_route`] for a recipient already in canonical form.
fn route_for<'p>(
    policy: &'p Policy,
    unit: &'p str,
    recipient: &Canonical<'_>,
) -> Option<(&'p StaticRoute, &'p Pattern, &'p str)> {
    let tables = policy.patterns.get(policy);
    let domain = recipient.domain_only();
    let (at, r, p) = nearest_unit_match(unit, |at, best| {
        tables.routes.matching(at, &domain, |e| {
            keep_last_most_specific(best, &policy.routes[e.owner].patterns, e);
        });
    })?;
    let route = &policy.routes[r];
    Some((route, &route.patterns[p], at))
}

/// `unit`, then its ancestors, nearest first: the first where `look` keeps a match in
/// `best`, with the owner and pattern it kept (rules and routes of a nearer unit win).
fn nearest_unit_match<'u>(
    unit: &'u str,
    mut look: impl FnMut(&'u str, &mut Best),
) -> Option<(&'u str, usize, usize)> {
    ancestors(unit).find_map(|at| {
        let mut best = None;
        look(at, &mut best);
        best.map(|(_, owner, pattern)| (at, owner, pattern))
    })
}

/// The most specific pattern seen so far: its specificity, owner and place.
type Best = Option<((u8, usize), usize, usize)>;

/// Keeps in `best` the most specific of the entries seen, of equals the last listed (what
/// `max_by_key` picks over the patterns in the policy's order). `patterns`: the entry
/// owner's.
fn keep_last_most_specific(best: &mut Best, patterns: &[Pattern], e: &Entry) {
    let key = (patterns[e.pattern].specificity(), e.owner, e.pattern);
    if best.is_none_or(|b| key > b) {
        *best = Some(key);
    }
}

struct Decider<'a> {
    policy: &'a Policy,
    query: &'a Query,
    trace: Option<&'a mut Vec<String>>,
    /// Where the decision is written, once, at the end ([`Decider::finish`]).
    out: &'a mut Decision,
    /// When both sides' rules apply ([`Applied::also`]): the rule the decision names and
    /// the other one, so that a failure names the rule whose own requirement it fails.
    both: Option<(&'a Rule, &'a Rule)>,
}

impl<'a> Decider<'a> {
    fn note(&mut self, line: impl FnOnce() -> String) {
        if let Some(t) = self.trace.as_deref_mut() {
            t.push(line());
        }
    }

    fn run(mut self) {
        let q = self.query;
        let policy = self.policy;
        // Each address in the form patterns see, once for every table.
        let (from, rcpt) = (Canonical::new(&q.sender), Canonical::new(&q.recipient));
        let unit = unit_of(policy, &from);
        self.note(|| format!("sender {:?} belongs to org unit {unit}", q.sender));

        let (req, req_rule) = self.requirement(unit, &rcpt, &from);
        let route = self.route(unit, &rcpt);

        match q.phase {
            Phase::Plan => self.plan(req, req_rule, route),
            Phase::Verdict => self.verdict(req, req_rule, route),
        }
    }

    /// The TLS the mail itself requires, and the rule that set it.
    fn requirement(
        &mut self,
        unit: &'a str,
        rcpt: &Canonical<'_>,
        from: &Canonical<'_>,
    ) -> (TlsRequirement, RuleId<'a>) {
        let q = self.query;
        let policy = self.policy;
        let (mut req, mut rule) = match rule_for(policy, unit, rcpt, from) {
            Some(Applied {
                rule: r,
                pattern: p,
                unit: at,
                tls,
                also,
            }) => {
                self.note(|| {
                    format!(
                        "tls_compliance rule {:?} (org unit {at}, {} {p}) applies: {}",
                        r.name,
                        r.direction,
                        describe(r.tls).concat()
                    )
                });
                self.both = also.map(|(o, _)| (r, o));
                if let Some((o, o_at)) = also {
                    self.note(|| {
                        format!(
                            "and tls_compliance rule {:?} (org unit {o_at}, {}) for the other \
                             side: neither requires more in every respect, so both apply: {}",
                            o.name,
                            o.direction,
                            describe(tls).concat()
                        )
                    });
                }
                (tls, ("tls_compliance:", r.name.as_str()))
            }
            None => {
                self.note(|| "no tls_compliance rule applies: TLS is opportunistic".to_string());
                (TlsRequirement::OPPORTUNISTIC, ("default", ""))
            }
        };
        // REQUIRETLS and TLS-Required: No are exclusive (RFC 8689); REQUIRETLS wins.
        let relaxed = q.tls_required_no && !q.requiretls;
        if relaxed && policy.tls_required_no == TlsRequiredNo::All && req.required {
            self.note(|| {
                "TLS-Required: No relaxes the policy's rules (tls_required_no = all)".to_string()
            });
            req = TlsRequirement::OPPORTUNISTIC;
            rule = ("standard:tls-required-no", "");
        }
        if q.requiretls && !req.covers(TlsRequirement::STRICT) {
            self.note(|| {
                "REQUIRETLS: TLS 1.2+ with a trusted certificate naming the host, whatever the policy says"
                    .to_string()
            });
            req = req.max(TlsRequirement::STRICT);
            rule = ("standard:requiretls", "");
        }
        if policy.mta_sts && q.mta_sts == MtaSts::Enforce {
            if relaxed && policy.tls_required_no != TlsRequiredNo::Ignore {
                self.note(|| "MTA-STS enforce is relaxed by TLS-Required: No".to_string());
            } else if !req.covers(TlsRequirement::STRICT) {
                self.note(|| {
                    "MTA-STS enforce: TLS 1.2+ with a trusted certificate naming the MX".to_string()
                });
                req = req.max(TlsRequirement::STRICT);
                rule = ("standard:mta-sts", "");
            }
        }
        (req, rule)
    }

    fn route(&mut self, unit: &'a str, rcpt: &Canonical<'_>) -> Option<&'a StaticRoute> {
        match route_for(self.policy, unit, rcpt) {
            Some((r, p, at)) => {
                self.note(|| {
                    format!(
                        "static route {:?} (org unit {at}, {p}) sends it to host {:?}",
                        r.name, r.host
                    )
                });
                Some(r)
            }
            None => {
                self.note(|| "no static route: direct delivery to the domain's MX".to_string());
                None
            }
        }
    }

    fn plan(mut self, req: TlsRequirement, req_rule: RuleId<'a>, route: Option<&'a StaticRoute>) {
        let policy = self.policy;
        let (route_kind, host, tls, rule) =
            match route.and_then(|r| policy.hosts.get(&r.host).map(|h| (r, h))) {
                Some((r, h)) => (
                    Route::Host,
                    Some((r.host.as_str(), h)),
                    req.max(h.tls),
                    ("route:", r.name.as_str()),
                ),
                None => (Route::Direct, None, req, req_rule),
            };
        self.note(|| format!("plan: {route_kind}, {}", describe(tls).concat()));
        let outcome = Outcome {
            route: route_kind,
            host,
            tls,
            rule,
            result: ResultType::NotAttempted,
            reply: None,
        };
        self.finish(
            outcome,
            &[&[route_kind.token(), " delivery, "], &describe(tls)],
            None,
        );
    }

    fn verdict(
        mut self,
        req: TlsRequirement,
        req_rule: RuleId<'a>,
        route: Option<&'a StaticRoute>,
    ) {
        let q = self.query;
        let policy = self.policy;
        let alternate = policy
            .alternate
            .as_ref()
            .and_then(|name| policy.hosts.get(name).map(|h| (name.as_str(), h)));

        // What this hop must provide, and the host it is.
        let routed = route.and_then(|r| policy.hosts.get(&r.host).map(|h| (r, h)));
        // What a hop to a routed domain must provide: the mail's requirement and the
        // route host's own, named by the mail's rule when it requires TLS.
        let via_route = |r: &'a StaticRoute, h: &'a Host| -> (TlsRequirement, RuleId<'a>) {
            let rule = if req.required {
                req_rule
            } else {
                ("route:", r.name.as_str())
            };
            (req.max(h.tls), rule)
        };
        let (hop_req, target, hop_rule) = match q.hop {
            // A domain the policy routes to a host, asked about at a direct hop (a caller
            // that did not follow the plan, or a route added since): the hop is held to
            // that host's TLS too. An audit's verdict for `direct` to a domain routed to a
            // TLS-only host came back opportunistic, and Envoy's HTTP face sent it to the
            // direct pool.
            Hop::Direct => match routed {
                Some((r, h)) => {
                    let (tls, rule) = via_route(r, h);
                    (tls, None, rule)
                }
                None => (req, None, req_rule),
            },
            Hop::Host => match routed {
                Some((r, h)) => {
                    let (tls, rule) = via_route(r, h);
                    (tls, Some((r.host.as_str(), h)), rule)
                }
                // The policy no longer routes this domain to a host: hold the hop to what
                // the mail requires.
                None => (req, None, req_rule),
            },
            Hop::Alternate => match alternate {
                Some((name, h)) => (req.max(h.tls), Some((name, h)), req_rule),
                None => (
                    req.max(TlsRequirement::STRICT),
                    None,
                    ("alternate_secure_route", ""),
                ),
            },
        };
        let observed = observe(q, hop_req);
        self.note(|| {
            format!(
                "observed at {} hop {:?}: STARTTLS {}, TLS {}, certificate {} -> {observed}",
                q.hop, q.mx, q.starttls, q.tls, q.cert
            )
        });

        let decision = |route: Route,
                        host: Option<(&'a str, &'a Host)>,
                        tls: TlsRequirement,
                        rule: RuleId<'a>,
                        reply: Option<[&'static str; 3]>| Outcome {
            route,
            host,
            tls,
            rule,
            result: observed,
            reply,
        };

        // Both sides' rules apply and the hop fails: named for the one whose own
        // requirement the hop fails (an audit's verdict named a sender's rule asking TLS
        // 1.3 for a failed certificate check that the recipient's rule asked for).
        let blamed = match self.both {
            Some((named, other))
                if named.tls.met_by(q.tls, q.cert) && !other.tls.met_by(q.tls, q.cert) =>
            {
                Some((named.name.as_str(), other.name.as_str()))
            }
            _ => None,
        };
        let blame = |rule: RuleId<'a>| match blamed {
            Some((named, other)) if rule == ("tls_compliance:", named) => {
                ("tls_compliance:", other)
            }
            _ => rule,
        };
        let (hop_rule, req_rule) = (blame(hop_rule), blame(req_rule));
        if hop_req.met_by(q.tls, q.cert) {
            self.note(|| format!("verdict: deliver over this {} hop", q.hop));
            let outcome = decision(Route::from(q.hop), target, hop_req, hop_rule, None);
            if hop_req.required {
                self.finish(
                    outcome,
                    &[&tls_phrase(q), &[" meets "], &describe(hop_req)],
                    None,
                );
            } else {
                self.finish(outcome, &[&["opportunistic TLS: "], &tls_phrase(q)], None);
            }
            return;
        }

        // "<what was seen> does not meet <requirement> (<result>)"
        let (phrase, needs) = (tls_phrase(q), describe(hop_req));
        let result = [" (", observed.token(), ")"];
        // `failure(prefix, suffix)`: the sentence's groups around this part.
        let failure = |prefix: &'static [&'static str], suffix: &'static [&'static str]| {
            [
                prefix,
                &phrase,
                &[" does not meet "],
                &needs,
                &result,
                suffix,
            ]
        };
        if q.hop == Hop::Alternate {
            self.note(|| "verdict: the alternate host itself failed: defer".to_string());
            let outcome = decision(
                Route::Defer,
                target,
                hop_req,
                hop_rule,
                Some([
                    "451 4.7.10 Alternate secure route failed TLS (",
                    observed.token(),
                    "), will retry",
                ]),
            );
            return self.finish(
                outcome,
                &failure(&["alternate secure route failed: "], &[]),
                None,
            );
        }
        if !req.required {
            // Only the configured host demands TLS; the mail does not. Not a case for the
            // alternate route: the host is misbehaving.
            self.note(|| "verdict: the routing host failed its own TLS setting: defer".to_string());
            let outcome = decision(
                Route::Defer,
                target,
                hop_req,
                hop_rule,
                Some([
                    "451 4.7.10 Routing host failed TLS (",
                    observed.token(),
                    "), will retry",
                ]),
            );
            return self.finish(
                outcome,
                &failure(&["host failed its TLS setting: "], &[]),
                None,
            );
        }
        if let Some((name, h)) = alternate {
            let alt_req = req.max(h.tls);
            self.note(|| format!("verdict: reroute to the alternate secure route {name:?}"));
            let outcome = decision(Route::Alternate, Some((name, h)), alt_req, req_rule, None);
            return self.finish(
                outcome,
                &failure(&[], &["; rerouted to the alternate secure route "]),
                Some(name),
            );
        }
        match policy.on_tls_unavailable {
            OnTlsUnavailable::Defer => {
                self.note(|| "verdict: no alternate secure route: defer".to_string());
                let outcome = decision(
                    Route::Defer,
                    None,
                    req,
                    req_rule,
                    Some([
                        "451 4.7.10 TLS required for this recipient (",
                        observed.token(),
                        "), will retry",
                    ]),
                );
                self.finish(
                    outcome,
                    &failure(&[], &["; no alternate secure route"]),
                    None,
                );
            }
            OnTlsUnavailable::Bounce => {
                self.note(|| "verdict: no alternate secure route: bounce".to_string());
                let outcome = decision(
                    Route::Bounce,
                    None,
                    req,
                    req_rule,
                    Some([
                        "550 5.7.10 TLS required for this recipient but unavailable (",
                        observed.token(),
                        ")",
                    ]),
                );
                self.finish(
                    outcome,
                    &failure(&[], &["; no alternate secure route"]),
                    None,
                );
            }
        }
    }
}

/// The TLS-RPT style result of what was observed, judged against `req`.
fn observe(q: &Query, req: TlsRequirement) -> ResultType {
    match q.tls {
        TlsVersion::None => match q.starttls {
            Starttls::Absent => ResultType::StarttlsNotSupported,
            Starttls::Offered => ResultType::ValidationFailure,
        },
        TlsVersion::V1_2 if req.required && req.min == crate::MinTls::V1_3 => {
            ResultType::TlsVersionTooLow
        }
        TlsVersion::V1_2 | TlsVersion::V1_3 => match q.cert {
            CertStatus::Valid => ResultType::Success,
            CertStatus::Untrusted => ResultType::CertificateNotTrusted,
            CertStatus::Expired => ResultType::CertificateExpired,
            CertStatus::HostnameMismatch => ResultType::CertificateHostMismatch,
            CertStatus::None => ResultType::ValidationFailure,
        },
    }
}

/// A rule as `(kind prefix, name)`, e.g. `("tls_compliance:", "partners")` or
/// `("default", "")`: joined into [`Decision::rule`] once, when the decision is made.
type RuleId<'p> = (&'static str, &'p str);

// Reasons are joined from static pieces (written once into the decision's string by
// `Decider::finish`) rather than with `format!`: this runs on every decision, in the wasm
// module too, where the formatting machinery cost more than the rest of the decision.

/// What was seen on the connection, e.g. "TLS 1.3 with a valid certificate".
fn tls_phrase(q: &Query) -> [&'static str; 3] {
    match q.tls {
        TlsVersion::None => match q.starttls {
            Starttls::Absent => ["no STARTTLS", "", ""],
            Starttls::Offered => ["STARTTLS offered but not negotiated", "", ""],
        },
        v => ["TLS ", v.token(), cert_phrase(q.cert)],
    }
}

/// The certificate seen, as the end of [`tls_phrase`] (its token is the result type's
/// business; this is for people reading logs and bounces).
fn cert_phrase(c: CertStatus) -> &'static str {
    match c {
        CertStatus::Valid => " with a valid certificate",
        CertStatus::Untrusted => " with an untrusted certificate",
        CertStatus::Expired => " with an expired certificate",
        CertStatus::HostnameMismatch => " with a certificate for another host name",
        CertStatus::None => " without a certificate",
    }
}

/// What [`Decider`] decided, borrowing from the policy, but its reason.
struct Outcome<'p> {
    route: Route,
    /// The host's name in the policy, and the host.
    host: Option<(&'p str, &'p Host)>,
    tls: TlsRequirement,
    rule: RuleId<'p>,
    result: ResultType,
    /// The SMTP reply, in pieces.
    reply: Option<[&'static str; 3]>,
}

impl Decider<'_> {
    /// Write the decision over [`Decider::out`], reusing the room of its strings. The
    /// reason is the pieces of `reason` joined, then `quoted` as `{name:?}` writes it.
    fn finish(self, o: Outcome<'_>, reason: &[&[&str]], quoted: Option<&str>) {
        let out = self.out;
        out.route = o.route;
        match o.host {
            Some((name, h)) => {
                let t = out.host.get_or_insert_with(|| HostTarget {
                    name: String::new(),
                    addresses: Vec::new(),
                    port: 0,
                    mx_lookup: false,
                });
                h.target_into(name, t);
            }
            None => out.host = None,
        }
        out.tls = o.tls;
        // Each string gets room for its whole value before its pieces: one allocation at
        // most, and none when it already has the room.
        out.rule.clear();
        out.rule.reserve(o.rule.0.len() + o.rule.1.len());
        out.rule.push_str(o.rule.0);
        out.rule.push_str(o.rule.1);
        out.policy_version.clone_from(&self.policy.version);
        out.result = o.result;
        let pieces = || reason.iter().flat_map(|g| g.iter());
        out.reason.clear();
        out.reason
            .reserve(pieces().map(|p| p.len()).sum::<usize>() + quoted.map_or(0, |n| n.len() + 2));
        pieces().for_each(|p| out.reason.push_str(p));
        if let Some(name) = quoted {
            push_quoted(name, &mut out.reason);
        }
        match o.reply {
            Some(parts) => {
                let r = out.reply.get_or_insert_with(String::new);
                r.clear();
                r.reserve(parts.iter().map(|p| p.len()).sum());
                parts.iter().for_each(|p| r.push_str(p));
            }
            None => out.reply = None,
        }
    }
}

/// `name` as `{name:?}` writes it; without the formatting machinery when nothing in it
/// needs an escape (the usual host name).
fn push_quoted(name: &str, out: &mut String) {
    if name
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        out.push('"');
        out.push_str(name);
        out.push('"');
    } else {
        use std::fmt::Write;
        // Writing to a String cannot fail.
        let _ = write!(out, "{name:?}");
    }
}

/// A requirement in words, e.g. "TLS 1.2+ required, verify hostname".
fn describe(t: TlsRequirement) -> [&'static str; 4] {
    if t.required {
        [
            "TLS ",
            t.min.token(),
            "+ required, verify ",
            t.verify.token(),
        ]
    } else {
        ["opportunistic TLS", "", "", ""]
    }
}
