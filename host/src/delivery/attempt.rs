//! One delivery attempt for the due recipients of one message at one domain.
//!
//! plan (engine) -> resolve -> connect (MX preference order; refused or timed out: next)
//! -> EHLO -> STARTTLS with a recording verifier (a failed handshake: reconnect in clear
//! text and report "offered, none") -> verdict (engine) per recipient -> safety floor ->
//! send. A recipient this host refused for its TLS (or its missing REQUIRETLS) is asked
//! again at the next host; once no host is left, its last verdict applies: in the same
//! attempt, reroute to the alternate secure host and ask again with `hop = alternate`;
//! or defer / bounce.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use altroute_policy::pattern::canonical_domain;
use altroute_policy::{
    CertStatus, Decision, Hop, HostTarget, Query, ResultType, Route, Starttls, TlsRequirement,
    TlsVersion,
};
use altroute_queue::QueueEntry;
use altroute_smtp::{Body, CertResult, Client, ClientConfig, Envelope, RecordingVerifier};

use super::Ctx;
use super::resolve::{Candidate, ResolveFailure};
use crate::policy_engine::{Answer, STANDARD};

/// What happened to one recipient in this attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by the next hop.
    Delivered {
        /// Host, address, route and TLS, for the queue record.
        via: String,
        /// The route it took (`direct`, `host`, `alternate`).
        route: String,
        /// Already written to the spool, right after the transaction (see `at_host`).
        recorded: bool,
        /// The next hop does not offer DSN (RFC 3461 §6.2.2): where the sender asked for
        /// success notices, the relay sends one (`Action: relayed`).
        relayed: bool,
    },
    /// Try again later.
    Deferred {
        /// The reply or reason.
        reason: String,
    },
    /// Permanent failure (DSN to the sender).
    Bounced {
        /// The reply or reason.
        reason: String,
    },
}

/// A recipient being worked on: its index in the envelope and its plan query.
#[derive(Clone)]
struct Rcpt {
    index: usize,
    query: Query,
    plan: Decision,
    /// The standard module's plan (the safety floor holds the chain to it).
    standard_plan: Decision,
    /// The compiled policy's requirement for the plan (the safety floor holds to it too).
    policy_plan: TlsRequirement,
    /// The module whose plan this is: [`STANDARD`] or an extension (logged with every
    /// decision about the recipient, so that a hop an extension chose is on record even
    /// when the verdict there is the standard module's).
    plan_by: String,
    /// The module that chose the plan's route ([`Answer::routed_by`]): not always
    /// `plan_by`, the last module that changed anything (a later one may change only the
    /// reason, and once hid the one that chose the hop).
    routed_by: String,
    /// The extension that chose the current next hop (a host or the alternate route the
    /// standard module did not choose) and may not bounce mail: a permanent refusal at
    /// that hop is a deferral ([`Rcpt::hold`]).
    hop_by: Option<String>,
    /// The policy that made the plan, which answers the verdicts too
    /// ([`PolicyEngine::pin`](crate::policy_engine::PolicyEngine::pin)).
    policy: Arc<proxy_wasm_host::Plugin>,
}

impl Rcpt {
    /// `outcome`, or its temporary form when the next hop was chosen by an extension that
    /// may not bounce mail: such an extension could otherwise bounce any mail by routing
    /// it to a host that refuses it (an audit's extension did).
    fn hold(&self, outcome: Outcome) -> Outcome {
        match (outcome, &self.hop_by) {
            (Outcome::Bounced { reason }, Some(name)) => {
                tracing::warn!(
                    target: "altroute::decision",
                    extension = %name,
                    recipient = %self.query.recipient,
                    reason = %reason,
                    "permanent failure at a next hop an extension without may_bounce chose: deferred"
                );
                Outcome::Deferred {
                    reason: format!(
                        "{}; the next hop was chosen by extension {name}, which may not bounce mail",
                        temporary(&reason)
                    ),
                }
            }
            (outcome, _) => outcome,
        }
    }
}

/// The extension that chose the next hop of `answer` (see [`Rcpt::hop_by`]), if one did
/// and may not bounce mail: the extension that last changed the route
/// ([`Answer::routed_by`]), when the next hop (direct, a host or the alternate, with its
/// addresses and port) is not the standard module's.
fn hop_chooser(answer: &Answer) -> Option<String> {
    let d = &answer.decision;
    let chose = answer.routed_by != STANDARD
        && matches!(d.route, Route::Direct | Route::Host | Route::Alternate)
        && (d.route, &d.host) != (answer.standard.route, &answer.standard.host);
    (chose && !answer.may_bounce).then(|| answer.routed_by.clone())
}

/// What recipients must share to go to one next hop together: the hop and the whole
/// target. Grouped by the host's name alone, recipients the standard module routed
/// once went to the addresses an extension had given the same name.
type TargetKey = (Hop, String, Vec<String>, u16, bool);

fn target_key(hop: Hop, t: &HostTarget) -> TargetKey {
    (
        hop,
        t.name.clone(),
        t.addresses.clone(),
        t.port,
        t.mx_lookup,
    )
}

/// The host a session went to and what was observed there: the facts of its verdict.
#[derive(Clone)]
struct Peer {
    host: String,
    addr: SocketAddr,
    starttls: Starttls,
    tls: TlsVersion,
    cert: CertStatus,
}

/// An established SMTP session, holding its host's concurrency permit until dropped.
struct Session {
    client: Client<TcpStream>,
    peer: Peer,
    _permit: OwnedSemaphorePermit,
}

/// Why a host did not take a recipient, for a reason of its own: its TLS fell short of
/// what the mail requires (the verdict says so), or it does not offer REQUIRETLS for
/// REQUIRETLS mail. Another host of the same hop may do better (RFC 5321 §5.1: try the
/// next MX); when none is left, the last refusal stands.
struct Refusal {
    verdict: Decision,
    peer: Peer,
    /// The host met the TLS requirement but does not offer REQUIRETLS (RFC 8689 §4.2.1).
    no_requiretls: bool,
    /// The extension that chose the verdict's alternate host ([`hop_chooser`]).
    chooser: Option<String>,
}

/// Plans, connects, asks verdicts and sends for `indices` (all at `domain`). Adds to
/// `open` the recipients whose plan required no TLS (their message may go back whole in
/// a notice, `RET=FULL`).
pub(crate) async fn deliver_domain(
    ctx: &Ctx,
    entry: &QueueEntry,
    message: &[u8],
    domain: &str,
    indices: &[usize],
    open: &mut std::collections::BTreeSet<usize>,
) -> Vec<(usize, Outcome)> {
    let env = &entry.envelope;
    let mut out = Vec::new();
    // Plan each recipient; group those that go the same way.
    let mut direct = Vec::new();
    // MTA-STS (RFC 8461): the domain's policy is a fact of every query.
    let sts = super::standards::lookup(ctx, domain).await;
    let mut hosts: BTreeMap<TargetKey, (HostTarget, Vec<Rcpt>)> = BTreeMap::new();
    // One policy for the whole attempt: a policy applied meanwhile applies from the
    // next attempt on (an audit's reload between plan and verdict bounced mail planned
    // for delivery, and raised a false safety-floor alarm the other way round).
    let policy = ctx.engine.pin();
    for &index in indices {
        let Some(recipient) = env.rcpt_to.get(index) else {
            continue;
        };
        let mut query = Query::plan(
            &question_address(&env.mail_from),
            &question_address(recipient),
        );
        query.requiretls = env.requiretls;
        query.tls_required_no = env.tls_required_no;
        query.mta_sts = sts.fact();
        query.attempt = entry
            .recipients
            .get(index)
            .map(|s| s.attempts())
            .unwrap_or(0)
            .saturating_add(1);
        let answer = ctx
            .engine
            .answer_async_on(policy.clone(), query.clone())
            .await;
        let hop_by = hop_chooser(&answer);
        if !(env.requiretls
            || answer.decision.tls.required
            || answer.standard.tls.required
            || answer.policy_tls.required)
        {
            open.insert(index);
        }
        let plan = answer.decision;
        count_decision(ctx, "plan", &plan);
        let rcpt = Rcpt {
            index,
            query,
            plan: plan.clone(),
            standard_plan: answer.standard,
            policy_plan: answer.policy_tls,
            plan_by: answer.by,
            routed_by: answer.routed_by,
            hop_by,
            policy: policy.clone(),
        };
        match (plan.route, plan.host.clone()) {
            (Route::Direct, _) => direct.push(rcpt),
            (Route::Host, Some(h)) => push_host(&mut hosts, Hop::Host, h, rcpt),
            (Route::Alternate, Some(h)) => push_host(&mut hosts, Hop::Alternate, h, rcpt),
            (Route::Bounce, _) => {
                log_decision(ctx, &rcpt, &plan, None, None, "bounced");
                out.push((
                    index,
                    Outcome::Bounced {
                        reason: reply_of(&plan),
                    },
                ));
            }
            _ => {
                // Defer, or a route without its host: never guess a destination.
                log_decision(ctx, &rcpt, &plan, None, None, "deferred");
                out.push((
                    index,
                    Outcome::Deferred {
                        reason: reply_of(&plan),
                    },
                ));
            }
        }
    }
    if !direct.is_empty() {
        match ctx
            .resolver
            .mail_hosts(domain)
            .await
            .and_then(|c| super::standards::restrict(ctx, domain, &sts, c))
        {
            Ok(candidates) => {
                out.extend(
                    run_hop(
                        ctx,
                        entry,
                        message,
                        Hop::Direct,
                        candidates,
                        ctx.settings.smtp_port,
                        direct,
                    )
                    .await,
                );
            }
            Err(failure) => out.extend(resolve_failed(ctx, &direct, failure)),
        }
    }
    for ((hop, ..), (target, rcpts)) in hosts {
        match ctx.resolver.host_target(&target).await {
            Ok(candidates) => {
                out.extend(run_hop(ctx, entry, message, hop, candidates, target.port, rcpts).await)
            }
            Err(failure) => out.extend(resolve_failed(ctx, &rcpts, failure)),
        }
    }
    out
}

fn push_host(
    hosts: &mut BTreeMap<TargetKey, (HostTarget, Vec<Rcpt>)>,
    hop: Hop,
    target: HostTarget,
    rcpt: Rcpt,
) {
    hosts
        .entry(target_key(hop, &target))
        .or_insert_with(|| (target, Vec::new()))
        .1
        .push(rcpt);
}

fn resolve_failed(ctx: &Ctx, rcpts: &[Rcpt], failure: ResolveFailure) -> Vec<(usize, Outcome)> {
    rcpts
        .iter()
        .map(|r| {
            let outcome = match &failure {
                ResolveFailure::Permanent(why) => Outcome::Bounced {
                    reason: format!("550 5.1.2 {why}"),
                },
                ResolveFailure::Temporary(why) => Outcome::Deferred {
                    reason: format!("451 4.4.3 {why}"),
                },
            };
            let outcome = r.hold(outcome);
            tracing::info!(
                target: "altroute::decision",
                recipient = %r.query.recipient,
                policy_version = %r.plan.policy_version,
                rule = %r.plan.rule,
                planned_by = %r.plan_by,
                routed_by = %r.routed_by,
                route = %r.plan.route,
                result = "dns-failure",
                outcome = ?outcome,
                "destination not resolved"
            );
            journal_failure(ctx, r, "dns-failure", &outcome);
            (r.index, outcome)
        })
        .collect()
}

/// Boxed because a hop may recurse once (to the alternate host).
type HopFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Vec<(usize, Outcome)>> + Send + 'a>>;

/// Tries the candidates of `hop` in order. At each host it connects to, it asks a verdict
/// per recipient still waiting and acts on it; a recipient the host refused for a reason
/// of its own (see [`Refusal`]) waits for the next host, and only when no host is left
/// does its last refusal apply. From a direct or host hop, recipients whose verdict is
/// `alternate` are taken to the alternate host in this same attempt, once every session
/// of this hop is closed.
fn run_hop<'a>(
    ctx: &'a Ctx,
    entry: &'a QueueEntry,
    message: &'a [u8],
    hop: Hop,
    candidates: Vec<Candidate>,
    port: u16,
    rcpts: Vec<Rcpt>,
) -> HopFuture<'a> {
    Box::pin(async move {
        let mut settled = Settled::default();
        let mut errors = Vec::new();
        // Recipients without a final outcome, each with the last host's refusal, if any.
        let mut waiting: Vec<(Rcpt, Option<Refusal>)> =
            rcpts.into_iter().map(|r| (r, None)).collect();
        let (targets, looped, unresolved) =
            addresses(ctx, entry, hop, &candidates, port, &mut errors);
        let mx_names: std::collections::BTreeSet<&str> = candidates
            .iter()
            .filter(|c| c.from_mx)
            .map(|c| c.name.as_str())
            .collect();
        // A hostile domain with dozens of black-hole MX hosts must not hold a worker for
        // hours: at most `mx_address_limit` addresses and `mx_session_limit` sessions per
        // hop (as Postfix's smtp_mx_address_limit and smtp_mx_session_limit); the rest
        // waits for the next attempt.
        let address_limit = ctx.settings.mx_address_limit.max(1);
        let session_limit = ctx.settings.mx_session_limit.max(1);
        let mut left = targets.len().saturating_sub(address_limit);
        let mut targets = targets.into_iter().take(address_limit);
        let (mut sessions, mut unreachable) = (0, 0);
        while let Some((name, addr)) = targets.next() {
            if waiting.is_empty() {
                break;
            }
            if sessions >= session_limit {
                left += 1 + targets.len();
                break;
            }
            let session = match connect(ctx, name, addr, hop, mx_names.contains(name)).await {
                Ok(s) => s,
                Err(e) => {
                    unreachable += 1;
                    ctx.metrics.connection_failures.inc();
                    tracing::debug!(host = %name, %addr, error = %e, "connection failed, trying the next host");
                    errors.push(e);
                    continue;
                }
            };
            sessions += 1;
            let rcpts = waiting
                .drain(..)
                .map(|(r, refusal)| {
                    if let Some(f) = refusal {
                        log_decision(ctx, &r, &f.verdict, Some(hop), Some(&f.peer), "next-host");
                    }
                    r
                })
                .collect();
            waiting = at_host(ctx, entry, message, hop, session, rcpts, &mut settled)
                .await
                .into_iter()
                .map(|(r, f)| (r, Some(f)))
                .collect();
        }

        if left > 0 && !waiting.is_empty() {
            errors.push(format!(
                "{left} more address(es) left for the next attempt \
                 (mx_address_limit {address_limit}, mx_session_limit {session_limit})"
            ));
        }
        let why = if errors.is_empty() {
            "no address to connect to".to_string()
        } else {
            errors.join("; ")
        };
        // A host of the hop was not reached (or not tried, or not even resolved) in this
        // attempt: it may take the mail at the next one, so a refusal here bounces nothing.
        let incomplete = left > 0 || unreachable > 0 || unresolved > 0;
        for (r, refusal) in waiting {
            match refusal {
                Some(f) => settled.refused(ctx, hop, r, f, incomplete),
                None if looped => settled.looped(ctx, hop, &r),
                None => settled.unreachable(ctx, hop, &r, &why),
            }
        }

        let Settled { mut out, reroute } = settled;
        for (_, (target, rcpts)) in reroute {
            match ctx.resolver.host_target(&target).await {
                Ok(candidates) => out.extend(
                    run_hop(
                        ctx,
                        entry,
                        message,
                        Hop::Alternate,
                        candidates,
                        target.port,
                        rcpts,
                    )
                    .await,
                ),
                Err(failure) => out.extend(resolve_failed(ctx, &rcpts, failure)),
            }
        }
        out
    })
}

/// What a hop has decided: final outcomes, and the recipients for the alternate host.
#[derive(Default)]
struct Settled {
    out: Vec<(usize, Outcome)>,
    reroute: BTreeMap<TargetKey, (HostTarget, Vec<Rcpt>)>,
}

impl Settled {
    /// Acts on a verdict that does not send over this hop: the alternate route (from a
    /// direct or host hop), bounce, or defer.
    /// `chooser`: the extension that chose the alternate host, if one did and may not
    /// bounce mail ([`hop_chooser`]).
    fn act(
        &mut self,
        ctx: &Ctx,
        hop: Hop,
        mut r: Rcpt,
        d: &Decision,
        peer: &Peer,
        chooser: Option<String>,
    ) {
        match (d.route, &d.host) {
            (Route::Alternate, Some(target)) if hop != Hop::Alternate => {
                log_decision(ctx, &r, d, Some(hop), Some(peer), "rerouted");
                // The standard module's reroute from a hop an extension chose is still
                // the extension's doing (it sent the mail where TLS failed).
                r.hop_by = chooser.or(r.hop_by.take());
                self.reroute
                    .entry(target_key(Hop::Alternate, target))
                    .or_insert_with(|| (target.clone(), Vec::new()))
                    .1
                    .push(r);
            }
            (Route::Bounce, _) => {
                // At a hop an extension chose, the policy's own bounce (TLS required
                // and unavailable there, say) is the extension's doing.
                let outcome = r.hold(Outcome::Bounced {
                    reason: reply_of(d),
                });
                let label = if matches!(outcome, Outcome::Bounced { .. }) {
                    "bounced"
                } else {
                    "deferred"
                };
                log_decision(ctx, &r, d, Some(hop), Some(peer), label);
                self.out.push((r.index, outcome));
            }
            _ => {
                log_decision(ctx, &r, d, Some(hop), Some(peer), "deferred");
                self.out.push((
                    r.index,
                    Outcome::Deferred {
                        reason: reply_of(d),
                    },
                ));
            }
        }
    }

    /// Acts on the last refusal of a recipient that no host of the hop took. When a host
    /// of the hop was not reached in this attempt (`incomplete`), a bounce becomes a defer:
    /// that host may take the mail at the next attempt.
    fn refused(&mut self, ctx: &Ctx, hop: Hop, r: Rcpt, f: Refusal, incomplete: bool) {
        // The alternate secure route only ever defers what it cannot take (as for its
        // TLS): an audit's alternate host without REQUIRETLS bounced the mail for good.
        if f.no_requiretls && hop == Hop::Alternate {
            log_decision(ctx, &r, &f.verdict, Some(hop), Some(&f.peer), "deferred");
            let reason = temporary(&no_requiretls(&f.peer.host));
            self.out.push((r.index, Outcome::Deferred { reason }));
            return;
        }
        let bounce = if f.no_requiretls {
            no_requiretls(&f.peer.host)
        } else if f.verdict.route == Route::Bounce {
            reply_of(&f.verdict)
        } else {
            return self.act(ctx, hop, r, &f.verdict, &f.peer, f.chooser);
        };
        let outcome = if incomplete {
            log_decision(ctx, &r, &f.verdict, Some(hop), Some(&f.peer), "deferred");
            Outcome::Deferred {
                reason: format!(
                    "{}; another host was not reached in this attempt",
                    temporary(&bounce)
                ),
            }
        } else {
            let outcome = r.hold(Outcome::Bounced { reason: bounce });
            let label = if matches!(outcome, Outcome::Bounced { .. }) {
                "bounced"
            } else {
                "deferred"
            };
            log_decision(ctx, &r, &f.verdict, Some(hop), Some(&f.peer), label);
            outcome
        };
        self.out.push((r.index, outcome));
    }

    /// Bounces a recipient whose every next-hop address is this relay, when the domain's
    /// MX hosts say so (as Postfix: a mail loop does not go away by waiting). A host or
    /// alternate route that points back is a decision of a module (an extension may name
    /// any host) or a configuration to fix: deferred, so that no module can bounce mail
    /// by routing it to the relay (an audit's extension did, DSN and all).
    fn looped(&mut self, ctx: &Ctx, hop: Hop, r: &Rcpt) {
        let domain = r.query.recipient.rsplit_once('@').map_or("", |(_, d)| d);
        let reason = match hop {
            Hop::Direct => format!("554 5.4.6 mail for {domain} loops back to myself"),
            Hop::Host | Hop::Alternate => {
                format!("451 4.4.6 the {hop} next hop for {domain} is this relay")
            }
        };
        tracing::warn!(
            target: "altroute::decision",
            recipient = %r.query.recipient,
            policy_version = %r.plan.policy_version,
            rule = %r.plan.rule,
            planned_by = %r.plan_by,
            routed_by = %r.routed_by,
            hop = %hop,
            result = "mail-loop",
            reason = %reason,
            "every next hop is this relay"
        );
        // A direct hop an extension chose (the domain's MX is this relay, the policy
        // routes it to a host): held like any failure at an extension's hop.
        let outcome = r.hold(if reason.starts_with('5') {
            Outcome::Bounced { reason }
        } else {
            Outcome::Deferred { reason }
        });
        journal_failure(ctx, r, "mail-loop", &outcome);
        self.out.push((r.index, outcome));
    }

    /// Defers a recipient for which no host of the hop could be reached.
    fn unreachable(&mut self, ctx: &Ctx, hop: Hop, r: &Rcpt, why: &str) {
        tracing::info!(
            target: "altroute::decision",
            recipient = %r.query.recipient,
            policy_version = %r.plan.policy_version,
            rule = %r.plan.rule,
            planned_by = %r.plan_by,
            routed_by = %r.routed_by,
            hop = %hop,
            result = "connection-failed",
            reason = %why,
            "no next hop reachable: deferred"
        );
        let outcome = Outcome::Deferred {
            reason: format!("451 4.4.1 {why}"),
        };
        journal_failure(ctx, r, "connection-failed", &outcome);
        self.out.push((r.index, outcome));
    }
}

/// Asks a verdict per recipient at the host of `session` and acts on it: sends what it
/// lets through, settles what it decides for good, and returns the recipients this host
/// refused for a reason of its own (they wait for the next host). Ends with QUIT, which
/// releases the host's permit.
async fn at_host(
    ctx: &Ctx,
    entry: &QueueEntry,
    message: &[u8],
    hop: Hop,
    mut session: Session,
    rcpts: Vec<Rcpt>,
    settled: &mut Settled,
) -> Vec<(Rcpt, Refusal)> {
    let peer = session.peer.clone();
    ctx.metrics.tls_result(observed_label(&peer));
    if hop == Hop::Direct
        && let Some(r) = rcpts.first()
    {
        super::standards::record_session(
            ctx,
            &r.query.recipient,
            r.query.mta_sts,
            &peer.host,
            peer.addr,
            observed_label(&peer),
        );
    }

    let mut send: Vec<(Rcpt, Decision)> = Vec::new();
    let mut refused = Vec::new();
    for r in rcpts {
        let q = r
            .query
            .clone()
            .verdict(hop, &peer.host, peer.starttls, peer.tls, peer.cert);
        let answer = ctx.engine.answer_async_on(r.policy.clone(), q).await;
        let d = answer.decision.clone();
        let chooser = hop_chooser(&answer);
        count_decision(ctx, "verdict", &d);
        if d.proceeds_on(hop) {
            // The safety floor: outside the module, whatever it said.
            let floor = super::floor::Floor {
                query: &r.query,
                plan: &r.plan,
                standard_plan: &r.standard_plan,
                verdict: &d,
                standard_verdict: &answer.standard,
                policy_plan: r.policy_plan,
                policy_verdict: answer.policy_tls,
                tls: peer.tls,
                cert: peer.cert,
            };
            if let Err(why) = floor.check() {
                ctx.metrics.safety_floor_violations.inc();
                // The standard module's verdict at a hop an extension planned: the
                // extension's doing.
                let culprit = if answer.by == STANDARD {
                    &r.routed_by
                } else {
                    &answer.by
                };
                ctx.engine.floor_violation(culprit);
                tracing::error!(
                    target: "altroute::decision",
                    module = %culprit,
                    recipient = %r.query.recipient,
                    policy_version = %d.policy_version,
                    rule = %d.rule,
                    route = %d.route,
                    hop = %hop,
                    mx = %peer.host,
                    tls = %peer.tls,
                    cert = %peer.cert,
                    result = %d.result,
                    "safety floor violation: {why}; deferred"
                );
                log_decision(ctx, &r, &d, Some(hop), Some(&peer), "deferred-safety-floor");
                settled.out.push((
                    r.index,
                    Outcome::Deferred {
                        reason: format!("451 4.7.10 {why}"),
                    },
                ));
                continue;
            }
            send.push((r, d));
        } else if tls_refusal(&d) {
            refused.push((
                r,
                Refusal {
                    verdict: d,
                    peer: peer.clone(),
                    no_requiretls: false,
                    chooser,
                },
            ));
        } else {
            settled.act(ctx, hop, r, &d, &peer, chooser);
        }
    }
    // REQUIRETLS is a property of the whole envelope: this host takes all or none of it.
    // Except a DSN (null sender): RFC 8689 §5 does not let it be lost for want of the
    // extension; it goes without the parameter, over TLS meeting the requirement.
    if entry.envelope.requiretls
        && !entry.envelope.mail_from.is_empty()
        && !session.client.capabilities().requiretls
    {
        refused.extend(send.drain(..).map(|(r, verdict)| {
            (
                r,
                Refusal {
                    verdict,
                    peer: peer.clone(),
                    no_requiretls: true,
                    chooser: None,
                },
            )
        }));
    }
    if !send.is_empty() {
        let mut sent = send_to(ctx, &entry.envelope, message, hop, &mut session, send).await;
        // Recorded now, not when the whole domain's attempt ends: that may be minutes
        // later (other hosts of the hop, the alternate route), and an attempt cut off
        // meanwhile (a crash, the shutdown deadline) would send these recipients again.
        // A write that fails here is tried again by the caller (`process`).
        for (index, outcome) in &mut sent {
            if let Outcome::Delivered { via, recorded, .. } = outcome {
                *recorded = ctx.spool.delivered(&entry.id, *index, via).await.is_ok();
            }
        }
        settled.out.extend(sent);
    }
    let Session { client, .. } = session;
    // Nothing else to say to this host: QUIT (errors only mean it hung up first).
    let _ = client.quit().await;
    refused
}

/// Whether a verdict that does not send over this hop is about the TLS this host offered
/// (so another host of the hop may meet the requirement), rather than a policy fault or
/// a decision about the mail itself.
fn tls_refusal(d: &Decision) -> bool {
    matches!(
        d.result,
        ResultType::StarttlsNotSupported
            | ResultType::CertificateHostMismatch
            | ResultType::CertificateExpired
            | ResultType::CertificateNotTrusted
            | ResultType::ValidationFailure
            | ResultType::TlsVersionTooLow
    )
}

/// A permanent reply (`550 5.7.30 text`) as the temporary one of the same kind
/// (`450 4.7.30 text`); anything else behind `451 4.4.1`.
fn temporary(reason: &str) -> String {
    let mut parts = reason.splitn(3, ' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(code), Some(status), Some(text))
            if code.len() == 3
                && code.starts_with('5')
                && code.bytes().all(|b| b.is_ascii_digit())
                && status.starts_with("5.") =>
        {
            format!("4{} 4{} {text}", &code[1..], &status[1..])
        }
        _ => format!("451 4.4.1 {reason}"),
    }
}

fn no_requiretls(host: &str) -> String {
    // RFC 8689 §4.2.1: a hop that does not support REQUIRETLS cannot take it.
    format!("550 5.7.30 REQUIRETLS support required but {host} does not offer it")
}

async fn send_to(
    ctx: &Ctx,
    env: &altroute_queue::Envelope,
    message: &[u8],
    hop: Hop,
    session: &mut Session,
    send: Vec<(Rcpt, Decision)>,
) -> Vec<(usize, Outcome)> {
    let envelope = Envelope {
        mail_from: env.mail_from.clone(),
        // RFC 8689 §5: a DSN of REQUIRETLS mail (null sender) carries REQUIRETLS, but is
        // not lost for a next hop that lacks the extension: it goes without the parameter,
        // still only over TLS that meets the requirement (the safety floor).
        requiretls: env.requiretls
            && (!env.mail_from.is_empty() || session.client.capabilities().requiretls),
        body: if message.iter().any(|b| *b >= 0x80) {
            Body::EightBitMime
        } else {
            Body::SevenBit
        },
        // Only when the sender asked for it and something in this transaction needs it
        // (as Postfix: an all-ASCII message goes to any server).
        smtputf8: env.smtputf8 && needs_smtputf8(&env.mail_from, &send, message),
        size: Some(message.len() as u64),
        env_id: env.env_id.clone(),
        ret: env.ret,
        rcpt_dsn: send.iter().map(|(r, _)| env.dsn_of(r.index)).collect(),
        // As stored, with the domain the question named: the query's form is quoted.
        rcpt_to: send
            .iter()
            .map(|(r, _)| {
                env.rcpt_to
                    .get(r.index)
                    .map_or_else(String::new, |a| delivery_address(a).into_owned())
            })
            .collect(),
    };
    let peer = &session.peer;
    let via = format!("{hop} {}[{}] tls={}", peer.host, peer.addr.ip(), peer.tls);
    let result = session.client.send(&envelope, message).await;
    let mut out = Vec::new();
    for (i, (r, d)) in send.iter().enumerate() {
        let outcome = match &result {
            Ok(delivery) => {
                let rcpt_reply = delivery.rcpt.get(i).map(|(_, reply)| reply);
                match (rcpt_reply, &delivery.data) {
                    (Some(rr), _) if !rr.is_positive() => reply_outcome(rr),
                    (Some(_), Some(data)) if data.is_positive() => Outcome::Delivered {
                        via: via.clone(),
                        route: d.route.to_string(),
                        recorded: false,
                        relayed: !session.client.capabilities().dsn,
                    },
                    (Some(_), Some(data)) => reply_outcome(data),
                    _ => Outcome::Deferred {
                        reason: "451 4.4.2 no reply to DATA".to_string(),
                    },
                }
            }
            Err(altroute_smtp::Error::Permanent(reply)) => reply_outcome(reply),
            Err(altroute_smtp::Error::Transient(reply)) => reply_outcome(reply),
            // `at_host` passed such a host by; this is only the client's own check.
            Err(altroute_smtp::Error::MissingExtension("REQUIRETLS")) => Outcome::Bounced {
                reason: no_requiretls(&peer.host),
            },
            Err(altroute_smtp::Error::MissingExtension("SMTPUTF8")) => Outcome::Bounced {
                // RFC 6531 §3.4: without the extension, the server cannot take it.
                reason: format!(
                    "550 5.6.7 SMTPUTF8 required but {} does not offer it",
                    peer.host
                ),
            },
            Err(altroute_smtp::Error::MissingExtension("8BITMIME")) => Outcome::Bounced {
                // RFC 6152 §3: deliver converted or return; the relay does not convert.
                reason: format!(
                    "554 5.6.3 the message has 8-bit data but {} does not offer 8BITMIME",
                    peer.host
                ),
            },
            Err(e) => Outcome::Deferred {
                reason: format!("451 4.4.2 {}: {e}", peer.host),
            },
        };
        let outcome = r.hold(outcome);
        let label = match &outcome {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Deferred { .. } => "deferred",
            Outcome::Bounced { .. } => "bounced",
        };
        log_decision(ctx, r, d, Some(hop), Some(peer), label);
        out.push((r.index, outcome));
    }
    out
}

/// Whether a transaction needs SMTPUTF8: a non-ASCII address in its envelope, or
/// non-ASCII bytes in the message's header section.
fn needs_smtputf8(mail_from: &str, send: &[(Rcpt, Decision)], message: &[u8]) -> bool {
    let header_end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(message.len());
    !mail_from.is_ascii()
        || send.iter().any(|(r, _)| !r.query.recipient.is_ascii())
        || !message[..header_end].is_ascii()
}

fn reply_outcome(reply: &altroute_smtp::Reply) -> Outcome {
    // One line of bounded length: it is kept in the queue and goes into DSNs.
    let reason = super::dsn::brief(reply.to_string().trim());
    if reply.is_permanent() {
        Outcome::Bounced { reason }
    } else {
        Outcome::Deferred { reason }
    }
}

/// The peer address the message came from, if `received_from` names one (loop check).
fn received_ip(received_from: Option<&str>) -> Option<IpAddr> {
    let s = received_from?.trim();
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    // Forms like "helo.name [192.0.2.1]" or "[192.0.2.1]:25".
    let start = s.find('[')?;
    let end = s[start..].find(']')? + start;
    s.get(start + 1..end)?.parse().ok()
}

/// Every address of `candidates` in order, with its host's name; whether every address
/// there was is this relay's own, with no host left unresolved (a loop); and how many
/// hosts are left unresolved ([`Candidate::unresolved`], noted in `errors`). An address
/// the message came from, or one this relay listens on (`DeliverySettings::listen`), is
/// left out (and noted in `errors`): sending there would be a mail loop.
fn addresses<'c>(
    ctx: &Ctx,
    entry: &QueueEntry,
    hop: Hop,
    candidates: &'c [Candidate],
    port: u16,
    errors: &mut Vec<String>,
) -> (Vec<(&'c str, SocketAddr)>, bool, usize) {
    let from = received_ip(entry.envelope.received_from.as_deref()).map(destination_ip);
    let is_ours = |ip: IpAddr| is_listening_at(&ctx.settings.listen, destination_ip(ip), port);
    // RFC 5321 §5.1: a client that finds itself among the MX hosts MUST discard the hosts
    // as preferred as itself or less (an audit's backup MX hosts passed the mail back to
    // the relay, its best MX, and it went round until the hop limit). A domain's MX set
    // only: a static route's or the alternate route's addresses are skipped one by one.
    let own_preference = candidates
        .iter()
        .filter(|c| hop == Hop::Direct && c.addrs.iter().any(|&ip| is_ours(ip)))
        .map(|c| c.preference)
        .min();
    let mut out = Vec::new();
    let (mut ours, mut unresolved) = (0, 0);
    for cand in candidates {
        if let Some(own) = own_preference
            && cand.preference >= own
        {
            if let Some(&ip) = cand.addrs.iter().find(|&&ip| is_ours(ip)) {
                // Its other address family, not looked up for the moment, may be the
                // real host: then this is no loop yet.
                if let Some(why) = &cand.unresolved {
                    unresolved += 1;
                    errors.push(why.clone());
                }
                ours += 1;
                errors.push(format!(
                    "{} [{}] is this relay (loop)",
                    cand.name,
                    SocketAddr::new(ip, port)
                ));
            } else {
                errors.push(format!(
                    "{} (MX preference {}) is not preferred over this relay (MX preference {own}): not used",
                    cand.name, cand.preference
                ));
            }
            continue;
        }
        if let Some(why) = &cand.unresolved {
            unresolved += 1;
            errors.push(why.clone());
        }
        for &ip in &cand.addrs {
            let addr = SocketAddr::new(ip, port);
            let ip = destination_ip(ip);
            if is_listening_at(&ctx.settings.listen, ip, port) {
                ours += 1;
                errors.push(format!("{} [{addr}] is this relay (loop)", cand.name));
            } else if Some(ip) == from {
                errors.push(format!(
                    "{} [{ip}] is where the message came from (loop)",
                    cand.name
                ));
            } else {
                out.push((cand.name.as_str(), addr));
            }
        }
    }
    // A more preferred host whose lookup failed for the moment may be the real next hop
    // (an audit's mail bounced as a loop while the primary MX only had a DNS error).
    let looped = out.is_empty() && ours > 0 && unresolved == 0;
    (out, looped, unresolved)
}

/// The address a connection to `ip` reaches: an IPv4-mapped IPv6 address is the IPv4
/// address, and an unspecified one (`0.0.0.0`, `::`) is this machine's loopback, as Linux
/// connects it. An audit's extension looped mail through `::ffff:` spellings of the
/// relay's own address.
fn destination_ip(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    }
}

/// Whether this relay listens where a connection to `ip`:`port` (as [`destination_ip`]
/// gives it) arrives: a listener on that address, or a wildcard listener (`0.0.0.0`,
/// `::`) on that port when `ip` is one of this machine's addresses.
fn is_listening_at(listen: &[SocketAddr], ip: IpAddr, port: u16) -> bool {
    listen.iter().any(|l| {
        l.port() == port
            && (destination_ip(l.ip()) == ip || l.ip().is_unspecified() && is_local_ip(ip))
    })
}

/// Whether `ip` is an address of this machine: a loopback address, or one a socket can
/// be bound to (the kernel refuses addresses of other machines with EADDRNOTAVAIL). A
/// bind of UDP port 0 sends nothing and needs no privilege; it avoids a crate that lists
/// the interfaces, whose answer could be stale anyway.
fn is_local_ip(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// A permit for the host, then TCP, greeting, EHLO and STARTTLS at `addr`.
/// `mx_name`: `name` is an MX record's exchange (see [`Candidate::from_mx`]).
async fn connect(
    ctx: &Ctx,
    name: &str,
    addr: SocketAddr,
    hop: Hop,
    mx_name: bool,
) -> Result<Session, String> {
    let connected = async {
        // Bounded: a worker waiting here is a worker no other domain's mail can have. An
        // audit's MX that never answered the end of data held all 4 slots for 10
        // minutes, the other 4 workers waited for them, and a well-behaved domain's
        // mail waited 10 minutes for a worker. The bound is the command timeout, not
        // the connect timeout: a busy but honest host frees a slot within one
        // transaction, and mail waiting for it should not be deferred for a retry
        // interval (an audit saw that with a 3 s bound).
        let permit = tokio::time::timeout(
            ctx.settings.command_timeout,
            ctx.destination(name).acquire_owned(),
        )
        .await
        .map_err(|_| {
            format!(
                "all {} connection slots to this host are busy",
                ctx.settings.per_destination
            )
        })?
        .map_err(|_| "no connection slot".to_string())?;
        let client = open(ctx, name, addr).await?;
        establish(ctx, client, name, addr, hop, mx_name, permit).await
    };
    connected.await.map_err(|e| format!("{name} [{addr}]: {e}"))
}

/// TCP connect (with the connect timeout), greeting and EHLO.
async fn open(ctx: &Ctx, name: &str, addr: SocketAddr) -> Result<Client<TcpStream>, String> {
    let stream = tokio::time::timeout(ctx.settings.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| "connection timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let mut config = ClientConfig::new(ctx.settings.helo.clone());
    config.command_timeout = ctx.settings.command_timeout;
    config.data_timeout = ctx.settings.data_done_timeout;
    Client::connect(stream, config)
        .await
        .map_err(|e| format!("{name}: {e}"))
}

/// STARTTLS when offered, recording the certificate verdict. A failed handshake: the
/// session is lost, so reconnect in clear text and report "offered, no TLS".
async fn establish(
    ctx: &Ctx,
    mut client: Client<TcpStream>,
    name: &str,
    addr: SocketAddr,
    hop: Hop,
    mx_name: bool,
    permit: OwnedSemaphorePermit,
) -> Result<Session, String> {
    let plain = |client, starttls, permit| Session {
        client,
        peer: Peer {
            host: name.to_string(),
            addr,
            starttls,
            tls: TlsVersion::None,
            cert: CertStatus::None,
        },
        _permit: permit,
    };
    if !client.capabilities().starttls {
        return Ok(plain(client, Starttls::Absent, permit));
    }
    let server_name = match ServerName::try_from(name.to_string()) {
        Ok(n) => n,
        Err(e) => return Err(format!("not a valid TLS server name: {e}")),
    };
    // An MX exchange is a host name (RFC 2181 §10.3), also when it reads like an IP
    // address (`10 127.0.0.30`): a certificate for that IP address does not name it
    // (RFC 7672 and Postfix match DNS names only). An audit's certificate for another
    // address than the one connected to was recorded as valid for such an MX. So also
    // for the MX hosts of a static route or the alternate route (`mx_lookup`).
    let ip_named_mx = mx_name && matches!(server_name, ServerName::IpAddress(_));
    let attempt = async {
        let verifier = RecordingVerifier::new(ctx.roots.clone()).map_err(|e| e.to_string())?;
        let config = verifier.client_config().map_err(|e| e.to_string())?;
        let outcome = client
            .starttls(Arc::new(config), server_name)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((outcome, verifier.result()))
    };
    match attempt.await {
        Ok((outcome, verdict)) => {
            let tls = match outcome.version {
                Some(rustls::ProtocolVersion::TLSv1_3) => TlsVersion::V1_3,
                Some(rustls::ProtocolVersion::TLSv1_2) => TlsVersion::V1_2,
                _ => TlsVersion::None,
            };
            let cert = match verdict {
                Some(CertResult::Valid) => CertStatus::Valid,
                Some(CertResult::Expired) => CertStatus::Expired,
                Some(CertResult::HostnameMismatch) => CertStatus::HostnameMismatch,
                // Untrusted, or anything the verifier could not classify: not trusted.
                Some(_) | None => CertStatus::Untrusted,
            };
            let cert = if ip_named_mx && cert == CertStatus::Valid {
                CertStatus::HostnameMismatch
            } else {
                cert
            };
            Ok(Session {
                client,
                peer: Peer {
                    host: name.to_string(),
                    addr,
                    starttls: Starttls::Offered,
                    tls,
                    cert,
                },
                _permit: permit,
            })
        }
        Err(e) => {
            tracing::info!(host = %name, %addr, %hop, error = %e, "STARTTLS failed; reconnecting without TLS for the verdict");
            drop(client);
            let client = open(ctx, name, addr).await.map_err(|again| {
                format!("STARTTLS failed ({e}); reconnecting without TLS: {again}")
            })?;
            Ok(plain(client, Starttls::Offered, permit))
        }
    }
}

fn observed_label(s: &Peer) -> &'static str {
    match (s.starttls, s.tls, s.cert) {
        (Starttls::Absent, _, _) => "starttls-not-supported",
        (Starttls::Offered, TlsVersion::None, _) => "validation-failure",
        (_, _, CertStatus::Valid) => "success",
        (_, _, CertStatus::Expired) => "certificate-expired",
        (_, _, CertStatus::HostnameMismatch) => "certificate-host-mismatch",
        (_, _, CertStatus::Untrusted | CertStatus::None) => "certificate-not-trusted",
    }
}

fn reply_of(d: &Decision) -> String {
    d.reply.clone().unwrap_or_else(|| match d.route {
        Route::Bounce => format!("550 5.7.10 {}", d.reason),
        _ => format!("451 4.7.0 {}", d.reason),
    })
}

fn count_decision(ctx: &Ctx, phase: &str, d: &Decision) {
    if d.rule == "fault" {
        ctx.metrics.policy_faults.inc();
    }
    ctx.metrics.decision(
        phase,
        d.route.to_string().as_str(),
        d.result.to_string().as_str(),
    );
}

/// A journal record for a recipient that failed before any verdict.
fn journal_failure(ctx: &Ctx, r: &Rcpt, result: &str, outcome: &Outcome) {
    let (route, label) = match outcome {
        Outcome::Bounced { .. } => ("bounce", "bounced"),
        _ => ("defer", "deferred"),
    };
    ctx.journal.push(super::DecisionRecord {
        recipient: r.query.recipient.clone(),
        route: route.to_string(),
        hop: "-".to_string(),
        host: "-".to_string(),
        tls: "none".to_string(),
        cert: "none".to_string(),
        result: result.to_string(),
        rule: r.plan.rule.clone(),
        policy_version: r.plan.policy_version.clone(),
        outcome: label.to_string(),
        planned_by: r.plan_by.clone(),
        routed_by: r.routed_by.clone(),
    });
}

/// The one structured line per recipient decision, also kept in the journal.
fn log_decision(
    ctx: &Ctx,
    r: &Rcpt,
    d: &Decision,
    hop: Option<Hop>,
    s: Option<&Peer>,
    outcome: &str,
) {
    ctx.journal.push(super::DecisionRecord {
        recipient: r.query.recipient.clone(),
        route: d.route.to_string(),
        hop: hop
            .map(|h| h.to_string())
            .unwrap_or_else(|| "-".to_string()),
        host: s.map(|s| s.host.clone()).unwrap_or_else(|| "-".to_string()),
        tls: s
            .map(|s| s.tls.to_string())
            .unwrap_or_else(|| "none".to_string()),
        cert: s
            .map(|s| s.cert.to_string())
            .unwrap_or_else(|| "none".to_string()),
        result: d.result.to_string(),
        rule: d.rule.clone(),
        policy_version: d.policy_version.clone(),
        outcome: outcome.to_string(),
        planned_by: r.plan_by.clone(),
        routed_by: r.routed_by.clone(),
    });
    tracing::info!(
        target: "altroute::decision",
        recipient = %r.query.recipient,
        policy_version = %d.policy_version,
        rule = %d.rule,
        planned_by = %r.plan_by,
        routed_by = %r.routed_by,
        plan_rule = %r.plan.rule,
        route = %d.route,
        hop = %hop.map(|h| h.to_string()).unwrap_or_else(|| "-".to_string()),
        mx = %s.map(|s| s.host.as_str()).unwrap_or("-"),
        tls = %s.map(|s| s.tls.to_string()).unwrap_or_else(|| "none".to_string()),
        cert = %s.map(|s| s.cert.to_string()).unwrap_or_else(|| "none".to_string()),
        result = %d.result,
        outcome,
        reason = %d.reason,
        "decision"
    );
}

/// `address` as the relay asks the policy about it: its domain as an A-label (UTS 46,
/// RFC 5891), the domain it is delivered to (`bob@bücher.example` is asked as
/// `bob@xn--bcher-kva.example`), and its local part as it goes on the wire, quoted when
/// it is not a dot-atom (`"john smith"@x.example`; the envelope keeps it unquoted). The
/// standard module's `decide()` matches a Unicode domain so anyway ([`canonical_domain`]);
/// asking in that form also holds a custom `[policy].module` that compares bytes to the
/// rules written for the domain. The contract takes only such mailboxes
/// ([`altroute_policy::pattern::is_mailbox`]), and the relay's SMTP server refuses others
/// ([`crate::inbound`]). A domain that is not a valid IDN stays as it is: it cannot be
/// resolved either.
pub(crate) fn question_address(address: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let ascii = delivery_address(address);
    match altroute_smtp::address::to_wire(&ascii) {
        Some(Cow::Owned(quoted)) => Cow::Owned(quoted),
        _ => ascii,
    }
}

/// `address` with its domain as an A-label and its local part as the envelope keeps it
/// (unquoted: the SMTP client quotes it on the wire).
pub(crate) fn delivery_address(address: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    match address.rsplit_once('@') {
        Some((local, domain)) if !domain.is_ascii() => match canonical_domain(domain) {
            Cow::Owned(ascii) => Cow::Owned(format!("{local}@{ascii}")),
            Cow::Borrowed(_) => Cow::Borrowed(address),
        },
        _ => Cow::Borrowed(address),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_ask_about_a_labels_and_quoted_local_parts() {
        let cases = [
            ("bob@bücher.example", "bob@xn--bcher-kva.example"),
            ("bob@BÜCHER.example", "bob@xn--bcher-kva.example"),
            ("jörg@bücher.example", "jörg@xn--bcher-kva.example"),
            ("bob@partner.example", "bob@partner.example"),
            ("", ""),
            ("postmaster", "postmaster"),
            (
                "john smith@b\u{fc}cher.example",
                "\"john smith\"@xn--bcher-kva.example",
            ),
            ("a>b@partner.example", "\"a>b\"@partner.example"),
        ];
        for (address, want) in cases {
            assert_eq!(question_address(address), want, "{address}");
        }
    }

    #[test]
    fn a_permanent_reply_made_temporary() {
        let cases = [
            ("550 5.7.30 no REQUIRETLS", "450 4.7.30 no REQUIRETLS"),
            ("554 5.7.10 TLS required", "454 4.7.10 TLS required"),
            ("TLS required", "451 4.4.1 TLS required"),
            ("5xx 5.7.1 odd", "451 4.4.1 5xx 5.7.1 odd"),
        ];
        for (permanent, want) in cases {
            assert_eq!(temporary(permanent), want);
        }
    }
}
