//! Guest SDK for third-party policy extensions (feature `guest`), on top of the proxy-wasm
//! Rust SDK.
//!
//! An extension is a proxy-wasm module with an HTTP root. The host (the altroute relay, or
//! Envoy with the extension as a second HTTP filter after the standard module) asks it one
//! routing question per HTTP request: the request headers carry the facts ([`Query`]) and
//! the decision so far ([`Decision`], as the previous module left it). The extension may
//! replace the decision. Everything goes through [`crate::contract`], so an extension reads
//! and writes exactly what the standard module does.
//!
//! # Core concepts
//!
//! - [`Exchange::read`] reads every request header in one host call; [`Exchange::query`]
//!   and [`Exchange::decision`] decode them.
//! - [`apply`] replaces the decision headers, asks Envoy to re-route
//!   (`clear_route_cache`), and for `defer`/`bounce` answers with a local response (status
//!   [`crate::contract::DEFER_STATUS`] / [`crate::contract::BOUNCE_STATUS`], body = the
//!   SMTP reply), returning the [`Action`] to give back from `on_http_request_headers`.
//! - [`now_unix_secs`] is the host's clock (`proxy_get_current_time_nanoseconds`).
//!
//! Never trap: a fault of an extension defers the recipient. When the facts cannot be
//! read, return [`Action::Continue`] and leave the decision as it is.
//!
//! # Example
//!
//! ```ignore
//! use altroute_policy::sdk::{self, Exchange};
//! use altroute_policy::{Route, TlsRequirement};
//! use proxy_wasm::traits::{Context, HttpContext};
//! use proxy_wasm::types::Action;
//!
//! struct Hold;
//! impl Context for Hold {}
//! impl HttpContext for Hold {
//!     fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
//!         let Some(x) = Exchange::read() else { return Action::Continue };
//!         let (Ok(q), Ok(mut d)) = (x.query(), x.decision()) else { return Action::Continue };
//!         if q.recipient.ends_with("@held.example") && d.route != Route::Bounce {
//!             d.route = Route::Defer;
//!             d.tls = d.tls.max(TlsRequirement::STRICT);
//!             d.rule = "extension:hold".into();
//!             d.reply = Some("451 4.7.0 held, try later".into());
//!             return sdk::apply(&d);
//!         }
//!         Action::Continue
//!     }
//! }
//! ```

use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{Action, LogLevel, MapType};

use crate::contract::{self, ContractError};
use crate::query::{Decision, Query};
use crate::types::Route;

/// The request headers of one routing question, read in one host call.
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    /// Every request header, as the host holds them (raw bytes).
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Exchange {
    /// Reads the request headers. `None` when the host refuses (then leave the decision
    /// alone and continue).
    pub fn read() -> Option<Exchange> {
        hostcalls::get_map_bytes(MapType::HttpRequestHeaders)
            .ok()
            .map(|headers| Exchange { headers })
    }

    /// From headers already read (tests, other hosts).
    pub fn from_headers(headers: Vec<(String, Vec<u8>)>) -> Exchange {
        Exchange { headers }
    }

    /// The facts ([`contract::decode_query`]).
    pub fn query(&self) -> Result<Query, ContractError> {
        contract::decode_query(contract::lookup(&self.headers))
    }

    /// The decision so far ([`contract::decode_decision`]). `Err` when no module decided
    /// yet (Missing) or a previous module wrote something invalid.
    pub fn decision(&self) -> Result<Decision, ContractError> {
        contract::decode_decision(contract::lookup(&self.headers))
    }

    /// The raw value of one header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        contract::lookup(&self.headers)(name)
    }
}

/// Replaces the decision headers with `decision` and returns the action for
/// `on_http_request_headers`: [`Action::Continue`] for a route that delivers, and a local
/// response + [`Action::Pause`] for `defer`/`bounce` (how Envoy stops the request; the
/// relay reads the headers either way).
pub fn apply(decision: &Decision) -> Action {
    // Stale headers of the previous decision (a host, a reply) must not survive.
    for name in contract::DECISION_HEADERS {
        if let Err(e) = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name) {
            log(LogLevel::Warn, &format!("removing {name} failed: {e:?}"));
        }
    }
    let headers = contract::encode_decision(decision);
    for (name, value) in &headers {
        if let Err(e) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value)) {
            log(LogLevel::Error, &format!("setting {name} failed: {e:?}"));
        }
    }
    // Envoy chose the route before this filter ran. Other hosts answer NOT_FOUND.
    let _ = hostcalls::call_foreign_function("clear_route_cache", None);
    let status = match decision.route {
        Route::Defer => contract::DEFER_STATUS,
        Route::Bounce => contract::BOUNCE_STATUS,
        Route::Direct | Route::Host | Route::Alternate => return Action::Continue,
    };
    let body = decision.reply.clone().unwrap_or_default();
    let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    match hostcalls::send_http_response(status, pairs, Some(body.as_bytes())) {
        Ok(()) => Action::Pause,
        Err(e) => {
            log(LogLevel::Error, &format!("local response failed: {e:?}"));
            Action::Continue
        }
    }
}

/// The host's wall clock in seconds since the Unix epoch; `None` if the host has none.
pub fn now_unix_secs() -> Option<u64> {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
}

/// The plugin configuration as UTF-8 text (empty when none was given).
pub fn plugin_configuration() -> Option<String> {
    match hostcalls::get_buffer(
        proxy_wasm::types::BufferType::PluginConfiguration,
        0,
        usize::MAX,
    ) {
        Ok(Some(bytes)) => String::from_utf8(bytes).ok(),
        Ok(None) => Some(String::new()),
        Err(_) => None,
    }
}

/// Logs through the host; errors are ignored (there is nowhere else to report them).
pub fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}
