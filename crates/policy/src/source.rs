//! The policy as admins write it (TOML). See `docs/policy.md` for the full reference.
//!
//! These types mirror the file; [`crate::compile`] checks them and produces the canonical
//! [`crate::Policy`].

use serde::Deserialize;
use toml::Spanned;

use crate::query::Query;
use crate::types::{Direction, MinTls, OnTlsUnavailable, ResultType, Route, TlsRequiredNo};

/// A whole policy file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct SourcePolicy {
    pub policy: PolicySection,
    pub standards: Standards,
    pub hosts: Vec<Spanned<HostSpec>>,
    pub alternate_secure_route: Option<Spanned<AlternateSpec>>,
    pub org_units: Vec<Spanned<OrgUnitSpec>>,
    pub tls_compliance: Vec<Spanned<ComplianceSpec>>,
    pub routes: Vec<Spanned<RouteSpec>>,
    pub tests: Vec<Spanned<TestSpec>>,
}

/// `[policy]`: name and global behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PolicySection {
    /// A label for people; the version is the content hash. Defaults to "unnamed".
    pub name: String,
    /// TLS required, unavailable, and no alternate secure route. Defaults to `defer`.
    pub on_tls_unavailable: OnTlsUnavailable,
    /// The next hops' recipient delimiter characters (`bob+news@x` is bob's mailbox).
    /// Defaults to `+`; `""` for none.
    pub recipient_delimiter: String,
}

impl Default for PolicySection {
    fn default() -> Self {
        PolicySection {
            name: "unnamed".to_string(),
            on_tls_unavailable: OnTlsUnavailable::Defer,
            recipient_delimiter: "+".to_string(),
        }
    }
}

/// `[standards]`: which Internet standards make TLS required.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Standards {
    /// An MTA-STS `enforce` policy of the recipient domain requires TLS with a verified
    /// certificate naming the MX. Defaults to true.
    pub mta_sts: bool,
    /// How far `TLS-Required: No` relaxes requirements. Defaults to `mta-sts` (RFC 8689).
    pub tls_required_no: TlsRequiredNo,
}

impl Default for Standards {
    fn default() -> Self {
        Standards {
            mta_sts: true,
            tls_required_no: TlsRequiredNo::MtaSts,
        }
    }
}

/// `[[hosts]]`: a mail server for routing, as hosted suites define one.
#[derive(Debug, Clone, Deserialize)]
pub struct HostSpec {
    pub name: String,
    /// Primary address: host name or IP literal.
    pub address: String,
    /// Secondary address, tried when the primary cannot be reached.
    #[serde(default)]
    pub secondary_address: Option<String>,
    /// Defaults to 25.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Resolve the MX records of `address` instead of connecting to it. Defaults to false.
    #[serde(default)]
    pub mx_lookup: bool,
    /// Defaults to true: a host used for routing should be reached securely.
    #[serde(default = "yes")]
    pub require_tls: bool,
    /// Defaults to true.
    #[serde(default = "yes")]
    pub require_ca_signed: bool,
    /// Defaults to true.
    #[serde(default = "yes")]
    pub validate_hostname: bool,
    /// Defaults to 1.2.
    #[serde(default = "default_min_tls")]
    pub min_tls: MinTls,
}

/// `[alternate_secure_route]`: where mail that requires TLS goes when its hop can't.
#[derive(Debug, Clone, Deserialize)]
pub struct AlternateSpec {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// A host name from `[[hosts]]`.
    pub host: String,
    /// Only the top-level org unit (`/`) may set it.
    #[serde(default = "root_unit")]
    pub org_unit: String,
}

/// `[[org_units]]`: a node of the org tree and the senders that belong to it.
#[derive(Debug, Clone, Deserialize)]
pub struct OrgUnitSpec {
    /// `/finance`, `/finance/emea`. Parents exist implicitly.
    pub path: String,
    /// Sender addresses, domains and `*.` subdomain wildcards.
    #[serde(default)]
    pub senders: Vec<String>,
}

/// `[[tls_compliance]]`: require secure transport for mail to and/or from some parties.
#[derive(Debug, Clone, Deserialize)]
pub struct ComplianceSpec {
    pub name: String,
    /// Defaults to `/`. Applies to this unit and its descendants unless they override.
    #[serde(default = "root_unit")]
    pub org_unit: String,
    /// Defaults to `outbound`.
    #[serde(default = "default_direction")]
    pub direction: Direction,
    #[serde(default)]
    pub domains: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Defaults to true. `false` at a child unit exempts it from a parent's rule.
    #[serde(default = "yes")]
    pub require_tls: bool,
    /// Defaults to false.
    #[serde(default)]
    pub require_ca_signed: bool,
    /// Defaults to false.
    #[serde(default)]
    pub validate_hostname: bool,
    /// Defaults to 1.2.
    #[serde(default = "default_min_tls")]
    pub min_tls: MinTls,
}

/// `[[routes]]`: a static route (smart host) for some recipient domains.
#[derive(Debug, Clone, Deserialize)]
pub struct RouteSpec {
    pub name: String,
    #[serde(default = "root_unit")]
    pub org_unit: String,
    pub domains: Vec<String>,
    /// A host name from `[[hosts]]`.
    pub host: String,
}

/// `[[tests]]`: an example query and what the policy must answer.
#[derive(Debug, Clone, Deserialize)]
pub struct TestSpec {
    pub name: String,
    pub query: Query,
    pub expect: Expect,
}

/// The parts of a decision a test checks; absent fields are not checked.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Expect {
    pub route: Option<Route>,
    pub rule: Option<String>,
    pub host: Option<String>,
    pub tls_required: Option<bool>,
    pub result: Option<ResultType>,
}

fn yes() -> bool {
    true
}
fn default_port() -> u16 {
    25
}
fn default_min_tls() -> MinTls {
    MinTls::V1_2
}
fn default_direction() -> Direction {
    Direction::Outbound
}
fn root_unit() -> String {
    "/".to_string()
}
