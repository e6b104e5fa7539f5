//! A proxy-wasm Rust SDK module that exercises the host calls of the proxy-wasm ABI 0.2.1,
//! for the host tests (`crates/proxy-wasm-host`) and the Envoy differential tests.
//!
//! Core concepts:
//! - One module, two roots. The root id (`plugin_root_id` property) picks the face:
//!   `testguest.stream` is a network (stream) filter, anything else (`testguest.http`) is an
//!   HTTP filter.
//! - Every answer is written into request headers (`x-tg-*`), so a test reads what the guest
//!   saw. `x-tg-config` echoes the plugin configuration: a response comes entirely from one
//!   plugin version when all its markers agree.
//! - Panic-free on bad input: header values are read as bytes, every host call result is
//!   matched, and failures become header values instead of traps.
//!
//! Plugin configuration: any bytes (echoed); the exact value `reject` makes `on_configure`
//! return false.
//!
//! HTTP request switches (request headers):
//! - `x-tg-local: <status>`: answer with a local response (`<status>`, default 403).
//! - `x-tg-replace`: replaced with `replaced`; `x-tg-remove`: removed.
//! - a request body is buffered until its end, then replaced by its upper-case form.
//!
//! Stream face: counts bytes both ways, replaces `SECRET` going upstream with `XXXXXX` and
//! `hello` coming back with `HELLO`, and on a new connection calls the foreign function
//! `set_envoy_filter_state` with `envoy.tcp_proxy.cluster` = `cluster-<plugin configuration>`.

use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType, PeerType, Status};

/// Root id of the stream face.
pub const STREAM_ROOT_ID: &str = "testguest.stream";
/// Root id of the HTTP face.
pub const HTTP_ROOT_ID: &str = "testguest.http";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> {
        let stream = hostcalls::get_property(vec!["plugin_root_id"])
            .ok()
            .flatten()
            .is_some_and(|id| id == STREAM_ROOT_ID.as_bytes());
        Box::new(Root { stream, config: Vec::new(), metrics: Metrics::default() })
    });
}}

/// Metric ids, defined in `on_configure`. Zero when the host refused the definition.
#[derive(Clone, Copy, Default)]
struct Metrics {
    requests: u32,
    headers: u32,
    ticks: u32,
    stream_bytes: u32,
}

struct Root {
    stream: bool,
    config: Vec<u8>,
    metrics: Metrics,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        // The VM configuration is read to exercise the buffer; its content is not used.
        let _ = self.get_vm_configuration();
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        self.config = self.get_plugin_configuration().unwrap_or_default();
        if self.config == b"reject" {
            proxy_wasm::hostcalls::log(LogLevel::Warn, "configuration rejected").ok();
            return false;
        }
        self.metrics = Metrics {
            requests: define(MetricType::Counter, "testguest.requests"),
            headers: define(MetricType::Histogram, "testguest.request_headers"),
            ticks: define(MetricType::Counter, "testguest.ticks"),
            stream_bytes: define(MetricType::Counter, "testguest.stream_bytes"),
        };
        self.set_tick_period(Duration::from_millis(1000));
        true
    }

    fn on_tick(&mut self) {
        hostcalls::increment_metric(self.metrics.ticks, 1).ok();
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(if self.stream {
            ContextType::StreamContext
        } else {
            ContextType::HttpContext
        })
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            config: self.config.clone(),
            metrics: self.metrics,
        }))
    }

    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Stream {
            config: self.config.clone(),
            metrics: self.metrics,
            downstream: 0,
            upstream: 0,
        }))
    }
}

fn define(kind: MetricType, name: &str) -> u32 {
    hostcalls::define_metric(kind, name).unwrap_or(0)
}

struct Http {
    config: Vec<u8>,
    metrics: Metrics,
}

impl Context for Http {}

impl Http {
    fn set(&self, name: &str, value: &[u8]) {
        self.set_http_request_header_bytes(name, Some(value));
    }

    /// Increments the shared counter `tg-counter` with compare-and-swap, retrying on races.
    fn bump_shared_counter(&self) -> Option<u64> {
        for _ in 0..16 {
            let (value, cas) = self.get_shared_data("tg-counter");
            let current = value
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            let next = current.saturating_add(1);
            match self.set_shared_data("tg-counter", Some(next.to_string().as_bytes()), cas) {
                Ok(()) => return Some(next),
                Err(Status::CasMismatch) => continue,
                Err(_) => return None,
            }
        }
        None
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, num_headers: usize, _end_of_stream: bool) -> Action {
        hostcalls::increment_metric(self.metrics.requests, 1).ok();
        let pairs = self.get_http_request_headers_bytes();
        hostcalls::record_metric(self.metrics.headers, pairs.len() as u64).ok();
        let count_ok = if pairs.len() == num_headers {
            "ok"
        } else {
            "mismatch"
        };
        self.set(
            "x-tg-header-count",
            format!("{} {count_ok}", pairs.len()).as_bytes(),
        );

        if let Some(status) = self.get_http_request_header_bytes("x-tg-local") {
            let status = std::str::from_utf8(&status)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .filter(|s| (200..600).contains(s))
                .unwrap_or(403);
            self.send_http_response(
                status,
                vec![
                    ("x-tg-local", "1"),
                    ("x-tg-config", &String::from_utf8_lossy(&self.config)),
                ],
                Some(b"denied by testguest"),
            );
            return Action::Pause;
        }

        self.set("x-tg-config", &self.config.clone());
        let path = self
            .get_http_request_header_bytes(":path")
            .unwrap_or_default();
        self.set("x-tg-path", &path);
        self.add_http_request_header("x-tg-added", "1");
        if self.get_http_request_header_bytes("x-tg-replace").is_some() {
            self.set_http_request_header("x-tg-replace", Some("replaced"));
        }
        self.remove_http_request_header("x-tg-remove");

        let root_id = self
            .get_property(vec!["plugin_root_id"])
            .unwrap_or_default();
        self.set("x-tg-root-id", &root_id);
        let source = self
            .get_property(vec!["source", "address"])
            .unwrap_or_default();
        self.set("x-tg-source", &source);
        let method = self
            .get_property(vec!["request", "method"])
            .unwrap_or_default();
        self.set("x-tg-method", &method);
        self.set_property(vec!["testguest", "seen"], Some(b"yes"));
        let seen = self
            .get_property(vec!["testguest", "seen"])
            .unwrap_or_default();
        self.set("x-tg-property-roundtrip", &seen);

        let now = self
            .get_current_time()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.set("x-tg-time", now.to_string().as_bytes());

        match self.bump_shared_counter() {
            Some(n) => self.set("x-tg-shared", n.to_string().as_bytes()),
            None => self.set("x-tg-shared", b"failed"),
        }

        let ffi = match self.call_foreign_function("clear_route_cache", None) {
            Ok(_) => "ok",
            Err(_) => "error",
        };
        self.set("x-tg-ffi", ffi.as_bytes());
        let unknown = match self.call_foreign_function("no_such_function", Some(b"x")) {
            Err(Status::NotFound) => "not-found",
            Err(_) => "other-error",
            Ok(_) => "ok",
        };
        self.set("x-tg-ffi-unknown", unknown.as_bytes());
        let requests = hostcalls::get_metric(self.metrics.requests).unwrap_or(0);
        self.set("x-tg-requests", requests.to_string().as_bytes());
        hostcalls::log(LogLevel::Info, "testguest: request headers done").ok();
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            // Buffer until the whole body is there.
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        let upper = body.to_ascii_uppercase();
        self.set_http_request_body(0, body_size, &upper);
        Action::Continue
    }
}

struct Stream {
    config: Vec<u8>,
    metrics: Metrics,
    downstream: u64,
    upstream: u64,
}

impl Context for Stream {}

/// Encodes Envoy's `SetEnvoyFilterStateArguments { path = 1, value = 2 }` (protobuf).
fn filter_state_arguments(path: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len() + value.len() + 8);
    for (tag, field) in [(0x0a_u8, path), (0x12_u8, value)] {
        out.push(tag);
        let mut len = field.len();
        loop {
            let byte = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        out.extend_from_slice(field);
    }
    out
}

fn replace_all(data: &[u8], from: &[u8], to: &[u8]) -> Option<Vec<u8>> {
    if from.is_empty() || !data.windows(from.len()).any(|w| w == from) {
        return None;
    }
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    Some(out)
}

impl StreamContext for Stream {
    fn on_new_connection(&mut self) -> Action {
        let mut cluster = b"cluster-".to_vec();
        cluster.extend_from_slice(&self.config);
        let args = filter_state_arguments(b"envoy.tcp_proxy.cluster", &cluster);
        if let Err(status) = self.call_foreign_function("set_envoy_filter_state", Some(&args)) {
            hostcalls::log(
                LogLevel::Warn,
                &format!("set_envoy_filter_state: {status:?}"),
            )
            .ok();
        }
        Action::Continue
    }

    fn on_downstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        self.downstream = self.downstream.saturating_add(data_size as u64);
        hostcalls::increment_metric(self.metrics.stream_bytes, data_size as i64).ok();
        let data = self.get_downstream_data(0, data_size).unwrap_or_default();
        if let Some(new) = replace_all(&data, b"SECRET", b"XXXXXX") {
            self.set_downstream_data(0, data_size, &new);
        }
        Action::Continue
    }

    fn on_upstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        self.upstream = self.upstream.saturating_add(data_size as u64);
        hostcalls::increment_metric(self.metrics.stream_bytes, data_size as i64).ok();
        let data = self.get_upstream_data(0, data_size).unwrap_or_default();
        if let Some(new) = replace_all(&data, b"hello", b"HELLO") {
            self.set_upstream_data(0, data_size, &new);
        }
        Action::Continue
    }

    fn on_downstream_close(&mut self, _peer_type: PeerType) {
        let message = format!(
            "testguest: connection closed, {} bytes down, {} bytes up",
            self.downstream, self.upstream
        );
        hostcalls::log(LogLevel::Info, &message).ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_state_arguments_encode_as_protobuf() {
        let out = filter_state_arguments(b"p", b"vv");
        assert_eq!(out, b"\x0a\x01p\x12\x02vv");
    }

    #[test]
    fn replace_all_replaces_every_occurrence() {
        assert_eq!(
            replace_all(b"aSECRETbSECRET", b"SECRET", b"X"),
            Some(b"aXbX".to_vec())
        );
        assert_eq!(replace_all(b"nothing", b"SECRET", b"X"), None);
    }
}
