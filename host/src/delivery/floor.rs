//! The relay's safety floor: outside every module, whatever the chain decided.
//!
//! Mail that requires TLS goes only over a connection that meets the strictest of:
//!
//! - the final plan and verdict of the chain (standard module + extensions),
//! - the **standard module's own** plan and verdict (so an extension that rewrites a
//!   bounce or a defer of TLS-required mail into a delivery, or lowers the requirement,
//!   gains nothing),
//! - the **compiled policy's** requirement for the plan and the verdict questions, decided
//!   natively by the relay on the policy the answering module was configured with
//!   ([`crate::policy_engine::Answer::policy_tls`]; so a custom or buggy `[policy].module`
//!   that lowers it gains nothing either),
//! - REQUIRETLS (RFC 8689): TLS 1.2+, a trusted certificate naming the host,
//! - MTA-STS enforce (RFC 8461) for the recipient domain, the same, unless the message
//!   carries `TLS-Required: No` (RFC 8689 §5); then the standard module's decision, which
//!   applies the policy's `tls_required_no` setting, is what holds.
//!
//! A violation defers the recipient (`451 4.7.10`); the caller logs it, counts it and
//! names the module that made the decision.

use altroute_policy::{CertStatus, Decision, MtaSts, Query, TlsRequirement, TlsVersion};

/// Everything the floor looks at for one recipient on one connection.
#[derive(Debug, Clone, Copy)]
pub struct Floor<'a> {
    /// The recipient's facts (envelope, MTA-STS state).
    pub query: &'a Query,
    /// The chain's plan.
    pub plan: &'a Decision,
    /// The standard module's plan.
    pub standard_plan: &'a Decision,
    /// The chain's verdict (the one about to be acted on).
    pub verdict: &'a Decision,
    /// The standard module's verdict.
    pub standard_verdict: &'a Decision,
    /// The compiled policy's requirement for the plan question.
    pub policy_plan: TlsRequirement,
    /// The compiled policy's requirement for the verdict question.
    pub policy_verdict: TlsRequirement,
    /// The negotiated TLS version of the connection.
    pub tls: TlsVersion,
    /// The certificate verdict of the connection.
    pub cert: CertStatus,
}

impl Floor<'_> {
    /// The strictest requirement that applies.
    pub fn requirement(&self) -> TlsRequirement {
        let q = self.query;
        let mut req = self
            .verdict
            .tls
            .max(self.plan.tls)
            .max(self.standard_plan.tls)
            .max(self.standard_verdict.tls)
            .max(self.policy_plan)
            .max(self.policy_verdict);
        if q.requiretls {
            req = req.max(TlsRequirement::STRICT);
        }
        if q.mta_sts == MtaSts::Enforce && !q.tls_required_no {
            req = req.max(TlsRequirement::STRICT);
        }
        req
    }

    /// `Err(why)` when the connection does not meet [`Floor::requirement`].
    pub fn check(&self) -> Result<(), String> {
        let req = self.requirement();
        if req.required && !req.met_by(self.tls, self.cert) {
            return Err(format!(
                "TLS required (min {}, verify {}) but the connection has TLS {} with certificate {}",
                req.min, req.verify, self.tls, self.cert
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use altroute_policy::{Hop, ResultType, Route, Starttls, Verify};

    use super::*;

    fn decision(route: Route, tls: TlsRequirement) -> Decision {
        Decision {
            route,
            host: None,
            tls,
            rule: "t".into(),
            policy_version: "v".into(),
            result: ResultType::Success,
            reason: String::new(),
            reply: None,
        }
    }

    fn floor_ok(
        q: &Query,
        std_verdict: Route,
        std_tls: TlsRequirement,
        tls: TlsVersion,
        cert: CertStatus,
    ) -> bool {
        let open = decision(Route::Direct, TlsRequirement::OPPORTUNISTIC);
        let std_plan = decision(Route::Direct, std_tls);
        let std_v = decision(std_verdict, std_tls);
        Floor {
            query: q,
            plan: &open,
            standard_plan: &std_plan,
            verdict: &open,
            standard_verdict: &std_v,
            policy_plan: TlsRequirement::OPPORTUNISTIC,
            policy_verdict: TlsRequirement::OPPORTUNISTIC,
            tls,
            cert,
        }
        .check()
        .is_ok()
    }

    #[test]
    fn a_lying_extension_gains_nothing() {
        let q = Query::plan("a@corp.test", "b@strict.test").verdict(
            Hop::Direct,
            "mx.strict.test",
            Starttls::Absent,
            TlsVersion::None,
            CertStatus::None,
        );
        let strict = TlsRequirement {
            required: true,
            verify: Verify::Ca,
            min: altroute_policy::MinTls::V1_2,
        };
        // The standard module bounced (or deferred) TLS-required mail; the chain says
        // "direct, opportunistic" on a clear-text hop: refused.
        for route in [Route::Bounce, Route::Defer, Route::Alternate] {
            assert!(!floor_ok(
                &q,
                route,
                strict,
                TlsVersion::None,
                CertStatus::None
            ));
        }
        // Opportunistic mail may go in clear text.
        assert!(floor_ok(
            &q,
            Route::Direct,
            TlsRequirement::OPPORTUNISTIC,
            TlsVersion::None,
            CertStatus::None
        ));
        // Over a verified TLS connection it may go.
        assert!(floor_ok(
            &q,
            Route::Bounce,
            strict,
            TlsVersion::V1_3,
            CertStatus::Valid
        ));
    }

    #[test]
    fn mta_sts_enforce_and_requiretls_mean_verified_tls() {
        let open = TlsRequirement::OPPORTUNISTIC;
        let mut q = Query::plan("a@corp.test", "b@sts.test");
        q.mta_sts = MtaSts::Enforce;
        assert!(!floor_ok(
            &q,
            Route::Direct,
            open,
            TlsVersion::None,
            CertStatus::None
        ));
        assert!(!floor_ok(
            &q,
            Route::Direct,
            open,
            TlsVersion::V1_3,
            CertStatus::Untrusted
        ));
        assert!(floor_ok(
            &q,
            Route::Direct,
            open,
            TlsVersion::V1_2,
            CertStatus::Valid
        ));
        // TLS-Required: No leaves it to the standard module's decision.
        q.tls_required_no = true;
        assert!(floor_ok(
            &q,
            Route::Direct,
            open,
            TlsVersion::None,
            CertStatus::None
        ));
        let mut q = Query::plan("a@corp.test", "b@any.test");
        q.requiretls = true;
        assert!(!floor_ok(
            &q,
            Route::Direct,
            open,
            TlsVersion::V1_3,
            CertStatus::HostnameMismatch
        ));
        assert!(floor_ok(
            &q,
            Route::Direct,
            open,
            TlsVersion::V1_3,
            CertStatus::Valid
        ));
    }
}
