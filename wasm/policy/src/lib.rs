//! The standard altroute policy module, `altroute_policy.wasm` (proxy-wasm ABI 0.2.1).
//!
//! The same file runs in the altroute relay (Wasmtime) and in Envoy (V8). Its plugin
//! configuration is a compiled policy: the canonical JSON that `altroute policy compile`
//! prints. `on_configure` rejects (returns false) a configuration that is not a valid,
//! self-consistent policy whose embedded tests pass.
//!
//! # Faces
//!
//! - **HTTP** (root id `altroute.http`, also the default for any other root id): each
//!   request's headers are the facts of one routing question (see
//!   `policy::contract`); the module removes any decision headers the request
//!   came with, sets the decision as request headers, asks the host to clear its route
//!   cache (Envoy re-routes on the new headers), and answers a defer or bounce with a
//!   local response whose body is the SMTP reply.
//! - **SMTP stream** (root id `altroute.smtp`, a network filter before `tcp_proxy`): follows
//!   the SMTP dialogue and refuses, per recipient, mail that requires TLS on a clear-text
//!   session (see `smtp`); also does connection-start routing.
//! - **Connection routing** (root id `altroute.route`): picks the `tcp_proxy` cluster of a
//!   new connection from its addresses (see `connection`).
//!
//! The root id comes from the `plugin_root_id` property.
//!
//! # Safety
//!
//! The module never panics on input: missing or malformed facts give a `defer` decision
//! with rule `fault`. Host calls go through `proxy_wasm::hostcalls` with their errors
//! handled, not through the trait helpers that unwrap; the one exception is reading the
//! request headers of a routing question (module `raw`), which takes the host's header
//! block in place instead of copying every header (the SDK's `get_map_bytes` panics on
//! a status it does not expect; `raw` answers it with a `fault` decision).

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};

use policy::contract;
use policy::{Decision, Policy, Route};

mod connection;
mod http;
mod raw;
mod smtp;

/// Root ids this module answers to.
pub const HTTP_ROOT_ID: &str = "altroute.http";
/// The SMTP stream face (with connection routing).
pub const SMTP_ROOT_ID: &str = "altroute.smtp";
/// Connection-start routing only.
pub const ROUTE_ROOT_ID: &str = "altroute.route";

/// Which face a root serves, from its root id.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Face {
    #[default]
    Http,
    Smtp,
    Route,
}

impl Face {
    fn of_root() -> Face {
        let root_id = hostcalls::get_property(vec!["plugin_root_id"])
            .ok()
            .flatten()
            .unwrap_or_default();
        match root_id.as_slice() {
            b"altroute.smtp" => Face::Smtp,
            b"altroute.route" => Face::Route,
            _ => Face::Http,
        }
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(PolicyRoot::default()) });
}}

/// Counters the module defines; hosts expose them (Envoy under `wasmcustom.`).
#[derive(Default, Clone, Copy)]
struct Metrics {
    decisions: Option<u32>,
    faults: Option<u32>,
    rerouted: Option<u32>,
    rejected: Option<u32>,
}

impl Metrics {
    fn define() -> Metrics {
        let counter = |name: &str| hostcalls::define_metric(MetricType::Counter, name).ok();
        Metrics {
            decisions: counter("altroute_decisions_total"),
            faults: counter("altroute_policy_faults_total"),
            rerouted: counter("altroute_alternate_reroutes_total"),
            rejected: counter("altroute_rejections_total"),
        }
    }

    fn bump(id: Option<u32>) {
        if let Some(id) = id {
            // A host without metrics answers an error; counting is best effort.
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn count(&self, d: &Decision) {
        Self::bump(self.decisions);
        match d.route {
            Route::Alternate => Self::bump(self.rerouted),
            Route::Defer | Route::Bounce => Self::bump(self.rejected),
            _ => {}
        }
        if d.rule == "fault" {
            Self::bump(self.faults);
        }
    }
}

#[derive(Default)]
struct PolicyRoot {
    policy: Option<Rc<Policy>>,
    metrics: Metrics,
    face: Face,
    stream: Rc<connection::StreamConfig>,
    stream_metrics: connection::StreamMetrics,
}

impl Context for PolicyRoot {}

impl RootContext for PolicyRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        self.metrics = Metrics::define();
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let config = match hostcalls::get_buffer(
            proxy_wasm::types::BufferType::PluginConfiguration,
            0,
            usize::MAX,
        ) {
            Ok(Some(c)) => c,
            Ok(None) => {
                log(
                    LogLevel::Error,
                    "no plugin configuration: a compiled policy is required",
                );
                return false;
            }
            Err(e) => {
                log(
                    LogLevel::Error,
                    &format!("reading the plugin configuration failed: {e:?}"),
                );
                return false;
            }
        };
        self.face = Face::of_root();
        if self.face != Face::Http {
            return self.configure_stream(&config);
        }
        match Policy::from_json(&config) {
            Ok(p) => {
                log(
                    LogLevel::Info,
                    &format!("policy {:?} version {} loaded", p.name, p.version),
                );
                self.policy = Some(Rc::new(p));
                true
            }
            Err(e) => {
                log(LogLevel::Error, &format!("policy rejected: {e}"));
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(http::Request::new(
            self.policy.clone(),
            self.metrics,
        )))
    }

    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(connection::Connection::new(
            self.stream.clone(),
            self.stream_metrics,
            self.face == Face::Smtp,
        )))
    }

    fn get_type(&self) -> Option<ContextType> {
        match self.face {
            Face::Http => Some(ContextType::HttpContext),
            Face::Smtp | Face::Route => Some(ContextType::StreamContext),
        }
    }
}

impl PolicyRoot {
    /// `on_configure` of the stream faces.
    fn configure_stream(&mut self, config: &[u8]) -> bool {
        match connection::StreamConfig::parse(config) {
            Ok(c) if self.face == Face::Smtp && c.policy.is_none() => {
                log(LogLevel::Error, "the altroute.smtp root needs a policy");
                false
            }
            Ok(c) => {
                if let Some(p) = &c.policy {
                    log(
                        LogLevel::Info,
                        &format!("policy {:?} version {} loaded (stream)", p.name, p.version),
                    );
                }
                self.stream_metrics = connection::StreamMetrics::define();
                self.policy = c.policy.clone();
                self.stream = Rc::new(c);
                true
            }
            Err(e) => {
                log(
                    LogLevel::Error,
                    &format!("stream configuration rejected: {e}"),
                );
                false
            }
        }
    }
}

fn log(level: LogLevel, msg: &str) {
    // Logging failures are not actionable inside the module.
    let _ = hostcalls::log(level, msg);
}

/// The SDK's `Action` for "go on".
const CONTINUE: Action = Action::Continue;

/// The decision headers as `(name, value)` pairs.
fn decision_headers(d: &Decision) -> Vec<(&'static str, String)> {
    contract::encode_decision(d)
}
