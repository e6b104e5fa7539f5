//! altroute-policy: the policy schema, its compiler, the decision core and the header
//! contract. No I/O, no clock, no tokio: it builds for native targets and for
//! `wasm32-unknown-unknown`, and the same code decides in the relay's tests, in the
//! standard policy module and in `altroute policy explain`.
//!
//! # Core concepts
//!
//! - [`compile`] turns the TOML that admins write ([`source`]) into a [`Policy`]: validated,
//!   canonical (its JSON form is what the module loads) and versioned by content hash. It
//!   lists every problem at once, each with its location, and runs the policy's embedded
//!   tests.
//! - [`Query`] holds the facts of one routing question; [`decide`] answers it with a
//!   [`Decision`]: route, TLS requirement for the hop, rule, policy version, reason.
//!   Two phases: **plan** before connecting, **verdict** after EHLO and any STARTTLS.
//! - [`contract`] encodes queries and decisions as the HTTP headers that a proxy-wasm
//!   module reads and writes.
//!
//! # Layout
//!
//! - `types`: the closed vocabularies (route, TLS version, certificate status, ...).
//! - `source`: the TOML schema. `policy`: the compiled form and the compiler.
//!   `toml_errors`: every shape error of a TOML document, not just the first.
//! - `decide`: the decision. `contract`: the header contract. `pattern`: address patterns.
//! - `sdk` (feature `guest`): helpers for third-party extension modules (docs/extensions.md).
//!
//! # Example
//!
//! ```
//! use altroute_policy::{compile, decide, Query, Route, Hop, Starttls, TlsVersion, CertStatus};
//!
//! let compiled = compile(r#"
//!     [[hosts]]
//!     name = "secure-relay"
//!     address = "relay.example.net"
//!
//!     [alternate_secure_route]
//!     host = "secure-relay"
//!
//!     [[tls_compliance]]
//!     name = "partners"
//!     domains = ["partner.example"]
//! "#).expect("valid policy");
//!
//! // The partner's MX does not offer STARTTLS: the mail takes the alternate secure route.
//! let q = Query::plan("alice@corp.example", "bob@partner.example").verdict(
//!     Hop::Direct, "mx.partner.example", Starttls::Absent, TlsVersion::None, CertStatus::None);
//! let d = decide(&compiled.policy, &q);
//! assert_eq!(d.route, Route::Alternate);
//! assert_eq!(d.rule, "tls_compliance:partners");
//! assert_eq!(d.policy_version, compiled.policy.version);
//! ```

pub mod contract;
mod decide;
pub mod fixtures;
mod index;
pub mod pattern;
mod policy;
mod query;
#[cfg(feature = "guest")]
pub mod sdk;
pub mod source;
pub mod toml_errors;
pub mod types;

pub use decide::{compliance_rule, decide, decide_into, explain, org_unit_of, static_route};
pub use index::PatternIndex;
pub use policy::{
    Compiled, Diagnostic, FORMAT, Host, OrgUnit, Policy, PolicyTest, Rule, StaticRoute,
    TestOutcome, ancestors, compare, compile, compile_without_tests,
};
pub use query::{Decision, HostTarget, Query, TlsRequirement};
pub use types::{
    CertStatus, Direction, Hop, MinTls, MtaSts, OnTlsUnavailable, Phase, ResultType, Route,
    Starttls, TlsRequiredNo, TlsVersion, Token, Verify,
};

/// Errors of this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The compiled policy is not valid JSON of the expected shape.
    #[error("compiled policy is not valid: {0}")]
    Json(String),
    /// The compiled policy is well formed but inconsistent or fails its tests.
    #[error("compiled policy is invalid: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// A header set is not a valid query or decision.
    #[error(transparent)]
    Contract(#[from] contract::ContractError),
}
