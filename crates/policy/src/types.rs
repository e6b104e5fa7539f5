//! The small vocabulary shared by queries, decisions, the policy format and the header
//! contract. Every enum has exactly one wire spelling, given by [`Token::token`] and parsed
//! by [`Token::parse_token`]; serde uses the same spelling.

use serde::{Deserialize, Serialize};

/// A closed set of values with one spelling each (the header contract and the policy format).
pub trait Token: Sized + Copy + 'static {
    /// Every value, in a stable order.
    const ALL: &'static [Self];
    /// The wire spelling.
    fn token(self) -> &'static str;
    /// Parse the wire spelling (exact, lower case).
    fn parse_token(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.token() == s)
    }
}

macro_rules! token_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $tok:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $tok)] $variant),+
        }
        impl Token for $name {
            const ALL: &'static [Self] = &[$(Self::$variant),+];
            fn token(self) -> &'static str {
                match self { $(Self::$variant => $tok),+ }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.token())
            }
        }
    };
}

token_enum! {
    /// Which question is asked: before connecting, or after EHLO and any STARTTLS attempt.
    Phase { Plan = "plan", Verdict = "verdict" }
}

token_enum! {
    /// The kind of next hop a connection goes to.
    Hop {
        /// The recipient domain's MX (or A/AAAA) hosts.
        Direct = "direct",
        /// A configured host, through a static route.
        Host = "host",
        /// The alternate secure route's host.
        Alternate = "alternate",
    }
}

token_enum! {
    /// Whether the peer advertised STARTTLS in its EHLO reply.
    Starttls { Offered = "offered", Absent = "absent" }
}

token_enum! {
    /// The TLS version negotiated on the connection, if any.
    TlsVersion {
        /// No TLS (clear text, or the handshake failed).
        None = "none",
        V1_2 = "1.2",
        V1_3 = "1.3",
    }
}

token_enum! {
    /// The outcome of certificate verification, recorded rather than enforced so that the
    /// policy can decide.
    CertStatus {
        Valid = "valid",
        /// The chain does not lead to a trusted root.
        Untrusted = "untrusted",
        Expired = "expired",
        /// The chain is trusted but does not name the host.
        HostnameMismatch = "hostname-mismatch",
        /// No certificate (no TLS).
        None = "none",
    }
}

token_enum! {
    /// The MTA-STS (RFC 8461) state of the recipient domain, as the relay found it.
    MtaSts { Enforce = "enforce", Testing = "testing", None = "none" }
}

token_enum! {
    /// Where a recipient goes.
    Route {
        /// Deliver to the recipient domain's MX.
        Direct = "direct",
        /// Deliver to a configured host (static route).
        Host = "host",
        /// Deliver through the alternate secure route.
        Alternate = "alternate",
        /// Temporary failure: keep the message and retry later (4xx).
        Defer = "defer",
        /// Permanent failure: return the message to its sender (5xx).
        Bounce = "bounce",
    }
}

impl Route {
    /// The hop kind this route delivers over, if it delivers.
    pub fn hop(self) -> Option<Hop> {
        match self {
            Route::Direct => Some(Hop::Direct),
            Route::Host => Some(Hop::Host),
            Route::Alternate => Some(Hop::Alternate),
            Route::Defer | Route::Bounce => None,
        }
    }
}

impl From<Hop> for Route {
    fn from(hop: Hop) -> Self {
        match hop {
            Hop::Direct => Route::Direct,
            Hop::Host => Route::Host,
            Hop::Alternate => Route::Alternate,
        }
    }
}

token_enum! {
    /// How the peer must be authenticated. Ordered: each level includes the previous one.
    Verify {
        /// Any certificate (encryption only).
        None = "none",
        /// A chain to a trusted CA; the name is not checked.
        Ca = "ca",
        /// A chain to a trusted CA that names the host.
        Hostname = "hostname",
    }
}

token_enum! {
    /// Minimum TLS version. Ordered.
    MinTls { V1_2 = "1.2", V1_3 = "1.3" }
}

token_enum! {
    /// TLS-RPT style (RFC 8460 §4.3) result of a decision, plus the states a plan has.
    ResultType {
        /// The hop met the requirement (or the plan had nothing to observe yet).
        Success = "success",
        /// A plan: nothing observed yet.
        NotAttempted = "not-attempted",
        StarttlsNotSupported = "starttls-not-supported",
        CertificateHostMismatch = "certificate-host-mismatch",
        CertificateExpired = "certificate-expired",
        CertificateNotTrusted = "certificate-not-trusted",
        /// TLS was offered but not negotiated, or another validation failure.
        ValidationFailure = "validation-failure",
        /// TLS was negotiated below the required minimum version.
        TlsVersionTooLow = "tls-version-too-low",
        /// The facts were missing or malformed, or the policy failed.
        PolicyError = "policy-error",
    }
}

token_enum! {
    /// Which way mail flows for a TLS compliance rule.
    Direction {
        /// Mail to the listed domains and addresses (matched on the recipient).
        Outbound = "outbound",
        /// Mail from the listed domains and addresses (matched on the sender).
        Inbound = "inbound",
        Both = "both",
    }
}

token_enum! {
    /// What happens when TLS is required, the hop cannot provide it and no alternate
    /// route is set.
    OnTlsUnavailable { Defer = "defer", Bounce = "bounce" }
}

token_enum! {
    /// How far a `TLS-Required: No` header field (RFC 8689 §5) relaxes TLS requirements.
    TlsRequiredNo {
        /// The header field changes nothing.
        Ignore = "ignore",
        /// It relaxes the requirement that MTA-STS imposes (what RFC 8689 describes).
        MtaSts = "mta-sts",
        /// It also relaxes the policy's own TLS compliance rules.
        All = "all",
    }
}

/// Parse a bool written as in the header contract (`yes` / `no`).
pub fn parse_yes_no(s: &str) -> Option<bool> {
    match s {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

/// The header contract's spelling of a bool.
pub fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}
