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
//!   `altroute_policy::contract`); the module removes any decision headers the request
//!   came with, sets the decision as request headers, asks the host to clear its route
//!   cache (Envoy re-routes on the new headers), and answers a defer or bounce with a
//!   local response whose body is the SMTP reply.
//!
//! # Safety
//!
//! The module never panics on input: missing or malformed facts give a `defer` decision
//! with rule `fault`. All host calls go through `proxy_wasm::hostcalls` with their errors
//! handled, not through the trait helpers that unwrap.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType};

use altroute_policy::contract;
use altroute_policy::{Decision, Policy, Route};

mod http;

/// Root ids this module answers to.
pub const HTTP_ROOT_ID: &str = "altroute.http";

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
                log(LogLevel::Error, "no plugin configuration: a compiled policy is required");
                return false;
            }
            Err(e) => {
                log(LogLevel::Error, &format!("reading the plugin configuration failed: {e:?}"));
                return false;
            }
        };
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
        Some(Box::new(http::Request::new(self.policy.clone(), self.metrics)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

fn log(level: LogLevel, msg: &str) {
    // Logging failures are not actionable inside the module.
    let _ = hostcalls::log(level, msg);
}

/// Read a request header as raw bytes; errors count as absent.
fn request_header(name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

/// The SDK's `Action` for "go on".
const CONTINUE: Action = Action::Continue;

/// The decision headers as `(name, value)` pairs.
fn decision_headers(d: &Decision) -> Vec<(&'static str, String)> {
    contract::encode_decision(d)
}
