//! Facts in ([`Query`]) and the decision out ([`Decision`]).

use serde::{Deserialize, Serialize};

use crate::types::{
    CertStatus, Hop, MinTls, MtaSts, Phase, ResultType, Route, Starttls, TlsVersion, Verify,
};

/// The facts of one routing question, for one recipient of one message.
///
/// In the plan phase only the envelope facts matter; the verdict phase adds what was
/// observed on the connection to `mx` (the hop of kind `hop`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Query {
    pub phase: Phase,
    /// Envelope sender (`MAIL FROM`); empty for the null sender.
    pub sender: String,
    /// Envelope recipient (`RCPT TO`).
    pub recipient: String,
    /// The message was submitted with the REQUIRETLS `MAIL FROM` parameter (RFC 8689).
    pub requiretls: bool,
    /// The message carries a `TLS-Required: No` header field (RFC 8689 §5).
    pub tls_required_no: bool,
    /// The host connected to (verdict), or empty.
    pub mx: String,
    /// The kind of hop connected to (verdict). Defaults to `direct`.
    pub hop: Hop,
    pub starttls: Starttls,
    pub tls: TlsVersion,
    pub cert: CertStatus,
    pub mta_sts: MtaSts,
    /// Delivery attempt number, starting at 1.
    pub attempt: u32,
}

impl Default for Query {
    fn default() -> Self {
        Query {
            phase: Phase::Plan,
            sender: String::new(),
            recipient: String::new(),
            requiretls: false,
            tls_required_no: false,
            mx: String::new(),
            hop: Hop::Direct,
            starttls: Starttls::Absent,
            tls: TlsVersion::None,
            cert: CertStatus::None,
            mta_sts: MtaSts::None,
            attempt: 1,
        }
    }
}

impl Query {
    /// A plan query for one recipient.
    pub fn plan(sender: &str, recipient: &str) -> Self {
        Query {
            sender: sender.to_string(),
            recipient: recipient.to_string(),
            ..Query::default()
        }
    }

    /// The same envelope, as a verdict query with what was observed on the connection.
    pub fn verdict(
        mut self,
        hop: Hop,
        mx: &str,
        starttls: Starttls,
        tls: TlsVersion,
        cert: CertStatus,
    ) -> Self {
        self.phase = Phase::Verdict;
        self.hop = hop;
        self.mx = mx.to_string();
        self.starttls = starttls;
        self.tls = tls;
        self.cert = cert;
        self
    }
}

/// What TLS a hop must provide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TlsRequirement {
    /// TLS is required; without it the mail must not go over this hop.
    pub required: bool,
    /// How the peer must be authenticated (only meaningful when `required`).
    pub verify: Verify,
    /// Minimum version (only meaningful when `required`).
    pub min: MinTls,
}

impl TlsRequirement {
    /// Opportunistic TLS: use it when offered, deliver without it otherwise.
    pub const OPPORTUNISTIC: TlsRequirement = TlsRequirement {
        required: false,
        verify: Verify::None,
        min: MinTls::V1_2,
    };

    /// What RFC 8689 (REQUIRETLS) and RFC 8461 (MTA-STS enforce) require: TLS 1.2 or
    /// newer with a certificate that is trusted and names the host.
    pub const STRICT: TlsRequirement = TlsRequirement {
        required: true,
        verify: Verify::Hostname,
        min: MinTls::V1_2,
    };

    /// The stricter of two requirements, field by field.
    pub fn max(self, other: TlsRequirement) -> TlsRequirement {
        if !self.required {
            return if other.required { other } else { self };
        }
        if !other.required {
            return self;
        }
        TlsRequirement {
            required: true,
            verify: self.verify.max(other.verify),
            min: self.min.max(other.min),
        }
    }

    /// Whether `self` is at least as strict as `other`.
    pub fn covers(self, other: TlsRequirement) -> bool {
        !other.required || (self.required && self.verify >= other.verify && self.min >= other.min)
    }

    /// Whether the observed connection meets this requirement.
    pub fn met_by(self, tls: TlsVersion, cert: CertStatus) -> bool {
        if !self.required {
            return true;
        }
        let version_ok = match (tls, self.min) {
            (TlsVersion::None, _) => false,
            (TlsVersion::V1_2, MinTls::V1_3) => false,
            (TlsVersion::V1_2 | TlsVersion::V1_3, _) => true,
        };
        let cert_ok = match self.verify {
            Verify::None => cert != CertStatus::None,
            Verify::Ca => matches!(cert, CertStatus::Valid | CertStatus::HostnameMismatch),
            Verify::Hostname => cert == CertStatus::Valid,
        };
        version_ok && cert_ok
    }
}

/// The host a decision sends mail to (static route or alternate secure route).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostTarget {
    /// The host's name in the policy.
    pub name: String,
    /// Addresses to try in order (primary, then secondary): host names or IP literals.
    pub addresses: Vec<String>,
    pub port: u16,
    /// Look up the MX records of the address instead of connecting to it directly.
    pub mx_lookup: bool,
}

/// The answer to a [`Query`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub route: Route,
    /// The host for `Route::Host` and `Route::Alternate`.
    pub host: Option<HostTarget>,
    /// The TLS the hop must provide (for a reroute: the alternate hop's).
    pub tls: TlsRequirement,
    /// The rule that decided, e.g. `tls_compliance:partners`, `route:subsidiary`,
    /// `standard:requiretls`, `default`.
    pub rule: String,
    /// The version (content hash) of the policy that decided.
    pub policy_version: String,
    /// TLS-RPT style result type of what was observed.
    pub result: ResultType,
    /// A sentence for logs and DSNs.
    pub reason: String,
    /// The SMTP reply for `Defer` (4xx) and `Bounce` (5xx).
    pub reply: Option<String>,
}

impl Decision {
    /// The decision for a failure of the policy itself (bad facts, a broken module, a
    /// timeout): defer, never bounce and never downgrade.
    pub fn fault(policy_version: &str, why: &str) -> Decision {
        Decision {
            route: Route::Defer,
            host: None,
            tls: TlsRequirement::STRICT,
            rule: "fault".to_string(),
            policy_version: policy_version.to_string(),
            result: ResultType::PolicyError,
            reason: format!("policy error: {why}"),
            reply: Some("451 4.7.0 Routing policy unavailable, try again later".to_string()),
        }
    }

    /// Whether this verdict lets the mail go over the connection the query describes.
    pub fn proceeds_on(&self, hop: Hop) -> bool {
        self.route.hop() == Some(hop)
    }
}
