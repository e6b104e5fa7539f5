//! Example extension: mail from the finance org unit always takes the secure relay.
//!
//! # Core concepts
//!
//! The header contract has no org-unit fact, so the unit is named by its senders in the
//! plugin configuration (the same address patterns as the policy's `org_units`), with the
//! host to use:
//!
//! ```json
//! {"senders": ["finance.corp.example", "*.finance.corp.example"],
//!  "host": {"name": "secure-relay", "addresses": ["relay.example.net"], "port": 25}}
//! ```
//!
//! - **plan**: a delivering decision (`direct`, `host`) becomes `alternate` through the
//!   configured host, with at least TLS 1.2 and a certificate naming the host.
//! - **verdict** on another hop: rerouted the same way. On the alternate hop: proceeds
//!   only if the connection has a trusted certificate naming the host, else defers.
//! - `defer` and `bounce` are never changed: a refusal stays a refusal.
//!
//! An invalid configuration makes `on_configure` return false (the relay refuses to
//! start; Envoy NACKs). A question it cannot read is left alone.

use serde::Deserialize;

use altroute_policy::pattern::Pattern;
use altroute_policy::sdk;
use altroute_policy::{Decision, Hop, HostTarget, Phase, Query, Route, TlsRequirement};

/// The rule this extension names in the decisions it makes.
pub const RULE: &str = "extension:finance-secure";

/// The plugin configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The finance org unit's senders.
    pub senders: Vec<Pattern>,
    /// The characters that end a mailbox's own local part, as the policy's
    /// `recipient_delimiter` (`cfo+x@` is cfo's mailbox). Defaults to `+`.
    #[serde(default = "default_delimiter")]
    pub recipient_delimiter: String,
    /// The secure relay.
    pub host: HostConfig,
}

/// The secure relay's address.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    pub name: String,
    pub addresses: Vec<String>,
    /// Defaults to 25.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Defaults to false.
    #[serde(default)]
    pub mx_lookup: bool,
}

fn default_port() -> u16 {
    25
}

impl Config {
    /// Parses and checks the configuration.
    pub fn parse(text: &[u8]) -> Result<Config, String> {
        let c: Config = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        if c.senders.is_empty() {
            return Err("senders: at least one pattern is needed".into());
        }
        if c.host.addresses.is_empty() {
            return Err("host.addresses: at least one address is needed".into());
        }
        Ok(c)
    }

    fn target(&self) -> HostTarget {
        HostTarget {
            name: self.host.name.clone(),
            addresses: self.host.addresses.clone(),
            port: self.host.port,
            mx_lookup: self.host.mx_lookup,
        }
    }
}

/// The decision for a finance sender, given the facts' phase and hop; `None` keeps `d`.
pub fn decide(
    config: &Config,
    phase: Phase,
    hop: Hop,
    tls: altroute_policy::TlsVersion,
    cert: altroute_policy::CertStatus,
    mut d: Decision,
) -> Option<Decision> {
    let delivering = matches!(d.route, Route::Direct | Route::Host | Route::Alternate);
    if !delivering {
        return None;
    }
    if phase == Phase::Verdict && hop == Hop::Alternate {
        if TlsRequirement::STRICT.met_by(tls, cert) {
            if d.route == Route::Alternate
                && d.host.as_ref().is_some_and(|h| h.name == config.host.name)
                && d.rule == RULE
            {
                return None;
            }
            // Proceed on this hop, under this extension's name and host.
            d.route = Route::Alternate;
            d.host = Some(config.target());
            d.tls = d.tls.max(TlsRequirement::STRICT);
            d.rule = RULE.to_string();
            d.reason = "finance mail over the secure relay".into();
            d.reply = None;
            return Some(d);
        }
        d.route = Route::Defer;
        d.tls = d.tls.max(TlsRequirement::STRICT);
        d.rule = RULE.to_string();
        d.reason = "finance mail: the secure relay did not present a trusted certificate".into();
        d.reply = Some("451 4.7.10 Secure relay failed TLS, will retry".into());
        return Some(d);
    }
    if d.route == Route::Alternate && d.host.as_ref().is_some_and(|h| h.name == config.host.name) {
        return None;
    }
    d.route = Route::Alternate;
    d.host = Some(config.target());
    d.tls = d.tls.max(TlsRequirement::STRICT);
    d.rule = RULE.to_string();
    d.reason = "finance mail always takes the secure relay".into();
    d.reply = None;
    Some(d)
}

fn default_delimiter() -> String {
    "+".to_string()
}

impl sdk::Extension for Config {
    const NAME: &'static str = "finance-secure";

    fn configure(config: &[u8]) -> Result<Self, String> {
        Config::parse(config)
    }

    fn decide(&self, q: &Query, d: Decision) -> Option<Decision> {
        if !self
            .senders
            .iter()
            .any(|p| p.matches_mailbox(&q.sender, &self.recipient_delimiter))
        {
            return None;
        }
        decide(self, q.phase, q.hop, q.tls, q.cert, d)
    }
}

proxy_wasm::main! {{
    sdk::register::<Config>();
}}
