//! The delivery side of MTA-STS (RFC 8461) and TLS reporting (RFC 8460): the few calls
//! `attempt.rs` makes, kept here so the attempt code stays about SMTP.
//!
//! - [`lookup`]: the domain's MTA-STS state for this attempt (a fetch failure is
//!   recorded for the report).
//! - [`restrict`]: an `enforce` policy keeps only the MX hosts matching its patterns;
//!   none left is a temporary failure (RFC 8461 §5.1: never fall back to others).
//! - [`record_session`]: the TLS result of a direct session, per policy domain.

use std::net::{IpAddr, SocketAddr};

use crate::mta_sts::{Mode, StsLookup};
use crate::tlsrpt::SessionResult;

use super::Ctx;
use super::resolve::{Candidate, ResolveFailure};

/// The MTA-STS state of `domain` (nothing when MTA-STS is off).
pub(crate) async fn lookup(ctx: &Ctx, domain: &str) -> StsLookup {
    let Some(sts) = &ctx.mta_sts else {
        return StsLookup::default();
    };
    let now = ctx.spool.clock().now();
    let found = sts.lookup(domain, now).await;
    if let (Some(f), Some(rec)) = (&found.failure, &ctx.tlsrpt) {
        let mut r = base(domain, &found, f.result_type, now);
        r.receiving_mx = Some(format!("mta-sts.{domain}"));
        rec.record(&r);
    }
    found
}

/// The candidates an `enforce` policy allows; the others are recorded as failures.
pub(crate) fn restrict(
    ctx: &Ctx,
    domain: &str,
    sts: &StsLookup,
    candidates: Vec<Candidate>,
) -> Result<Vec<Candidate>, ResolveFailure> {
    let (keep, dropped) = sts.restrict(candidates);
    if !dropped.is_empty() {
        tracing::warn!(%domain, dropped = ?dropped, "MTA-STS enforce: MX hosts not matching the policy are not used");
        if let Some(rec) = &ctx.tlsrpt {
            let now = ctx.spool.clock().now();
            for name in &dropped {
                let mut r = base(domain, sts, "validation-failure", now);
                r.receiving_mx = Some(name.clone());
                rec.record(&r);
            }
        }
    }
    if keep.is_empty() {
        return Err(ResolveFailure::Temporary(format!(
            "the MTA-STS policy of {domain} matches none of its MX hosts ({})",
            dropped.join(", ")
        )));
    }
    Ok(keep)
}

/// Records the TLS result `label` (`success` or an RFC 8460 result type) of a direct
/// session to `host` at `addr` for the domain of `recipient`. A session to an MX that
/// a `testing` policy does not list counts as a `validation-failure`.
pub(crate) fn record_session(
    ctx: &Ctx,
    recipient: &str,
    fact: altroute_policy::MtaSts,
    host: &str,
    addr: SocketAddr,
    label: &str,
) {
    let Some(rec) = &ctx.tlsrpt else {
        return;
    };
    let domain = recipient
        .rsplit_once('@')
        .map(|(_, d)| d.to_ascii_lowercase())
        .unwrap_or_default();
    let now = ctx.spool.clock().now();
    // The policy that was applied: the query's fact says whether there was one; the
    // cache holds its text (a background refresh may just have replaced it, which only
    // changes the policy-string the result is filed under).
    let sts = StsLookup {
        policy: match fact {
            altroute_policy::MtaSts::None => None,
            _ => ctx.mta_sts.as_ref().and_then(|m| m.cached(&domain, now)),
        },
        failure: None,
    };
    let label = match &sts.policy {
        Some(p) if p.policy.mode != Mode::None && !p.policy.matches(host) => "validation-failure",
        _ => label,
    };
    let mut r = base(&domain, &sts, label, now);
    r.receiving_mx = Some(host.to_string());
    r.receiving_ip = Some(addr.ip().to_string());
    r.sending_ip = source_ip(addr).map(|ip| ip.to_string());
    rec.record(&r);
}

fn base(domain: &str, sts: &StsLookup, result: &str, now: u64) -> SessionResult {
    let mut r = SessionResult::new(domain, result);
    r.time = now;
    match &sts.policy {
        Some(p) if p.policy.mode != Mode::None => {
            r.policy_type = "sts".to_string();
            r.policy_string = p.lines();
            r.mx_host = p.policy.mx.clone();
        }
        _ if sts.failure.is_some() => r.policy_type = "sts".to_string(),
        _ => {}
    }
    r
}

/// The address the kernel uses as source towards `to` (the relay does not bind a source
/// address, so this is the one its TCP connection had): a UDP socket is "connected"
/// (no packet is sent) and asked for its local address.
fn source_ip(to: SocketAddr) -> Option<IpAddr> {
    let any: SocketAddr = if to.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(any).ok()?;
    s.connect(to).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}
