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
//! - [`Extension`]: what an extension author writes: parse the plugin configuration once
//!   ([`Extension::configure`]), then answer each question ([`Extension::decide`]: the
//!   facts and the decision so far in, `Some(new decision)` or `None` to keep it out).
//!   [`register`] (called from `proxy_wasm::main!`) provides the proxy-wasm root and HTTP
//!   contexts around it: configuration errors make `on_configure` return false (the relay
//!   refuses the extension, Envoy NACKs), an unreadable question is left alone.
//! - Lower level, for modules that need their own contexts: [`Exchange::read`] reads every
//!   request header in one host call; [`Exchange::query`] and [`Exchange::decision`]
//!   decode them; [`apply`] replaces the decision headers, asks Envoy to re-route
//!   (`clear_route_cache`), and for `defer`/`bounce` answers with a local response (status
//!   [`crate::contract::DEFER_STATUS`] / [`crate::contract::BOUNCE_STATUS`], body = the
//!   SMTP reply), returning the [`Action`] to give back from `on_http_request_headers`.
//! - [`now_unix_secs`] is the host's clock (`proxy_get_current_time_nanoseconds`).
//!
//! Never trap: a fault of an extension defers the recipient.
//!
//! # Example
//!
//! ```ignore
//! use altroute_policy::sdk::{self, Extension};
//! use altroute_policy::{Decision, Query, Route, TlsRequirement};
//!
//! struct Hold {
//!     domain: String,
//! }
//!
//! impl Extension for Hold {
//!     const NAME: &'static str = "hold";
//!
//!     fn configure(config: &[u8]) -> Result<Self, String> {
//!         let domain = std::str::from_utf8(config).map_err(|e| e.to_string())?.trim();
//!         Ok(Hold { domain: format!("@{domain}") })
//!     }
//!
//!     fn decide(&self, q: &Query, mut d: Decision) -> Option<Decision> {
//!         if !q.recipient.ends_with(&self.domain) || d.route == Route::Bounce {
//!             return None;
//!         }
//!         d.route = Route::Defer;
//!         d.tls = d.tls.max(TlsRequirement::STRICT);
//!         d.rule = "extension:hold".into();
//!         d.reply = Some("451 4.7.0 held, try later".into());
//!         Some(d)
//!     }
//! }
//!
//! proxy_wasm::main! {{
//!     sdk::register::<Hold>();
//! }}
//! ```

use std::time::UNIX_EPOCH;

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType};

use crate::contract::{self, ContractError};
use crate::query::{Decision, Query};
use crate::types::Route;

/// A policy extension: its configuration, and its answer to each routing question.
pub trait Extension: Sized + 'static {
    /// The extension's name in log lines.
    const NAME: &'static str;

    /// Parses the plugin configuration (raw bytes; empty when none was given). An `Err`
    /// is logged and refuses the configuration.
    fn configure(config: &[u8]) -> Result<Self, String>;

    /// The decision for one question: `None` keeps `decision` (what the previous module
    /// left), `Some` replaces it. Called for plan and verdict alike (`query.phase`).
    fn decide(&self, query: &Query, decision: Decision) -> Option<Decision>;
}

/// Registers `E` as this module's root (HTTP contexts): call it from `proxy_wasm::main!`.
pub fn register<E: Extension>() {
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(ExtensionRoot::<E> { extension: None })
    });
}

struct ExtensionRoot<E> {
    extension: Option<Rc<E>>,
}

impl<E: Extension> Context for ExtensionRoot<E> {}

impl<E: Extension> RootContext for ExtensionRoot<E> {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = match hostcalls::get_buffer(
            proxy_wasm::types::BufferType::PluginConfiguration,
            0,
            usize::MAX,
        ) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(e) => {
                log(
                    LogLevel::Error,
                    &format!("{}: reading the configuration failed: {e:?}", E::NAME),
                );
                return false;
            }
        };
        match E::configure(&config) {
            Ok(extension) => {
                self.extension = Some(Rc::new(extension));
                true
            }
            Err(e) => {
                log(
                    LogLevel::Error,
                    &format!("{}: invalid configuration: {e}", E::NAME),
                );
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(ExtensionRequest {
            extension: self.extension.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct ExtensionRequest<E> {
    extension: Option<Rc<E>>,
}

impl<E: Extension> Context for ExtensionRequest<E> {}

impl<E: Extension> HttpContext for ExtensionRequest<E> {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        // Not configured, or a question that cannot be read: leave the decision alone.
        let Some(extension) = &self.extension else {
            return Action::Continue;
        };
        let Some(x) = Exchange::read() else {
            return Action::Continue;
        };
        let (Ok(query), Ok(decision)) = (x.query(), x.decision()) else {
            return Action::Continue;
        };
        match extension.decide(&query, decision) {
            Some(d) => apply(&d),
            None => Action::Continue,
        }
    }
}

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
        contract::lookup(&self.headers).get(name)
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
