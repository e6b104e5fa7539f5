//! The stream faces: SMTP enforcement at the edge (root id `altroute.smtp`) and
//! connection-start routing (both `altroute.smtp` and `altroute.route`).
//!
//! # Configuration
//!
//! Either a bare compiled policy (the JSON `altroute policy compile` prints), or an object
//! that wraps it with connection routes:
//!
//! ```json
//! {"policy": { ...compiled policy... },
//!  "connection_routes": [
//!    {"destination_port": 2525, "cluster": "alternate"},
//!    {"source_ip": "127.0.0.2", "cluster": "partners"}]}
//! ```
//!
//! The first route whose every given field matches the new connection names the
//! `tcp_proxy` cluster (through the foreign function `set_envoy_filter_state`, path
//! `envoy.tcp_proxy.cluster`); without a match the `tcp_proxy`'s own cluster is used.
//! `altroute.smtp` requires the policy; `altroute.route` only reads the routes.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, StreamContext};
use proxy_wasm::types::{Action, BufferType, LogLevel, MetricType};
use serde_json::Value;

use policy::Policy;

use crate::log;
use crate::smtp::{REASON_KINDS, Session};

/// The limit on connection routes in a configuration. Defaults to 256.
const MAX_ROUTES: usize = 256;

/// The filter state key that Envoy's `tcp_proxy` reads the cluster name from.
const TCP_PROXY_CLUSTER: &str = "envoy.tcp_proxy.cluster";

/// One connection route: the match fields that are set, and the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnectionRoute {
    pub destination_port: Option<u16>,
    pub source_ip: Option<String>,
    pub cluster: String,
}

/// The configuration of a stream root.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamConfig {
    pub policy: Option<Rc<Policy>>,
    pub routes: Vec<ConnectionRoute>,
}

impl StreamConfig {
    /// Parse a bare compiled policy or the `{"policy", "connection_routes"}` wrapper.
    pub(crate) fn parse(bytes: &[u8]) -> Result<StreamConfig, String> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let Value::Object(map) = &value else {
            return Err("the configuration must be a JSON object".to_string());
        };
        let wrapped = map.contains_key("policy") || map.contains_key("connection_routes");
        if !wrapped {
            let policy = Policy::from_json(bytes).map_err(|e| e.to_string())?;
            return Ok(StreamConfig {
                policy: Some(Rc::new(policy)),
                routes: Vec::new(),
            });
        }
        if let Some(key) = map
            .keys()
            .find(|k| !matches!(k.as_str(), "policy" | "connection_routes"))
        {
            return Err(format!("unknown configuration key {key:?}"));
        }
        let policy = match map.get("policy") {
            None | Some(Value::Null) => None,
            Some(p) => {
                let json = serde_json::to_vec(p).map_err(|e| e.to_string())?;
                Some(Rc::new(
                    Policy::from_json(&json).map_err(|e| e.to_string())?,
                ))
            }
        };
        let routes = match map.get("connection_routes") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                if items.len() > MAX_ROUTES {
                    return Err(format!("more than {MAX_ROUTES} connection routes"));
                }
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| {
                        route(item).map_err(|e| format!("connection_routes[{i}]: {e}"))
                    })
                    .collect::<Result<_, _>>()?
            }
            Some(_) => return Err("connection_routes must be an array".to_string()),
        };
        Ok(StreamConfig { policy, routes })
    }
}

fn route(item: &Value) -> Result<ConnectionRoute, String> {
    let Value::Object(map) = item else {
        return Err("must be an object".to_string());
    };
    let mut r = ConnectionRoute {
        destination_port: None,
        source_ip: None,
        cluster: String::new(),
    };
    for (key, value) in map {
        match (key.as_str(), value) {
            ("cluster", Value::String(s)) if !s.is_empty() => r.cluster = s.clone(),
            ("destination_port", Value::Number(n)) => {
                r.destination_port = Some(
                    n.as_u64()
                        .and_then(|p| u16::try_from(p).ok())
                        .ok_or("destination_port must be a port number")?,
                );
            }
            ("source_ip", Value::String(s)) => r.source_ip = Some(s.clone()),
            _ => return Err(format!("unexpected field {key:?} = {value}")),
        }
    }
    if r.cluster.is_empty() {
        return Err("cluster is required".to_string());
    }
    if r.destination_port.is_none() && r.source_ip.is_none() {
        return Err("give destination_port or source_ip (or both)".to_string());
    }
    Ok(r)
}

/// Counters of the stream faces; Envoy shows them as `wasmcustom.<name>`.
#[derive(Default, Clone, Copy)]
pub(crate) struct StreamMetrics {
    sessions: Option<u32>,
    checked: Option<u32>,
    rejected: Option<u32>,
    by_reason: [Option<u32>; REASON_KINDS.len()],
    encrypted: Option<u32>,
    overlong: Option<u32>,
    routed: Option<u32>,
    closed: Option<u32>,
}

impl StreamMetrics {
    pub(crate) fn define() -> StreamMetrics {
        let counter = |name: &str| hostcalls::define_metric(MetricType::Counter, name).ok();
        let mut by_reason = [None; REASON_KINDS.len()];
        for (slot, kind) in by_reason.iter_mut().zip(REASON_KINDS) {
            *slot = counter(&format!("altroute_smtp_rejected_{kind}_total"));
        }
        StreamMetrics {
            sessions: counter("altroute_smtp_sessions_total"),
            checked: counter("altroute_smtp_recipients_checked_total"),
            rejected: counter("altroute_smtp_recipients_rejected_total"),
            by_reason,
            encrypted: counter("altroute_smtp_starttls_sessions_total"),
            overlong: counter("altroute_smtp_overlong_lines_total"),
            routed: counter("altroute_connections_routed_total"),
            closed: counter("altroute_smtp_sessions_closed_total"),
        }
    }

    fn add(id: Option<u32>, n: u32) {
        if let Some(id) = id
            && n > 0
        {
            // Counting is best effort: a host without metrics answers an error.
            let _ = hostcalls::increment_metric(id, i64::from(n));
        }
    }
}

/// One downstream connection.
pub(crate) struct Connection {
    config: Rc<StreamConfig>,
    metrics: StreamMetrics,
    /// `None` for `altroute.route` (routing only) and once nothing is left to follow.
    session: Option<Session>,
}

impl Connection {
    pub(crate) fn new(config: Rc<StreamConfig>, metrics: StreamMetrics, enforce: bool) -> Self {
        let session = if enforce {
            config.policy.clone().map(Session::new)
        } else {
            None
        };
        Connection {
            config,
            metrics,
            session,
        }
    }

    /// Pick the cluster for this connection from the routes, if one matches.
    fn route(&self) {
        if self.config.routes.is_empty() {
            return;
        }
        let destination = property_string(&["destination", "address"]);
        let port = destination
            .as_deref()
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .or_else(|| {
                // Envoy also gives the port alone, as a little-endian 64-bit integer.
                let raw = hostcalls::get_property(vec!["destination", "port"]).ok()??;
                let bytes: [u8; 8] = raw.get(..8)?.try_into().ok()?;
                u16::try_from(i64::from_le_bytes(bytes)).ok()
            });
        let source_ip = property_string(&["source", "address"]).map(|a| host_of(&a).to_string());
        let Some(route) = self.config.routes.iter().find(|r| {
            r.destination_port.is_none_or(|p| Some(p) == port)
                && r.source_ip
                    .as_deref()
                    .is_none_or(|ip| source_ip.as_deref() == Some(ip))
        }) else {
            return;
        };
        let args = filter_state_arguments(TCP_PROXY_CLUSTER, &route.cluster);
        match hostcalls::call_foreign_function("set_envoy_filter_state", Some(&args)) {
            Ok(_) => StreamMetrics::add(self.metrics.routed, 1),
            Err(e) => log(
                LogLevel::Warn,
                &format!(
                    "set_envoy_filter_state for cluster {:?} failed: {e:?}",
                    route.cluster
                ),
            ),
        }
    }

    fn count(&mut self) {
        let Some(session) = &mut self.session else {
            return;
        };
        let e = session.take_events();
        if e.is_empty() {
            // Most reads (replies, message bodies): no host call at all.
            return;
        }
        let m = self.metrics;
        StreamMetrics::add(m.checked, e.checked);
        StreamMetrics::add(m.rejected, e.refused_total());
        for (id, n) in m.by_reason.iter().zip(e.refused) {
            StreamMetrics::add(*id, n);
        }
        StreamMetrics::add(m.encrypted, u32::from(e.encrypted));
        StreamMetrics::add(m.overlong, e.overlong);
    }

    /// Run one direction's bytes through the session and put back what it returns.
    fn filter(&mut self, buffer: BufferType, size: usize, end: bool) -> Action {
        let Some(session) = &mut self.session else {
            return Action::Continue;
        };
        if session.is_opaque() {
            return Action::Continue;
        }
        let data = match hostcalls::get_buffer(buffer, 0, size) {
            Ok(Some(d)) => d,
            Ok(None) => Vec::new(),
            Err(e) => {
                log(
                    LogLevel::Warn,
                    &format!("reading {buffer:?} failed: {e:?}; passing it"),
                );
                return Action::Continue;
            }
        };
        if data.is_empty() && !end {
            return Action::Continue;
        }
        let out = if buffer == BufferType::DownstreamData {
            session.client_bytes(&data, end)
        } else {
            session.server_bytes(&data, end)
        };
        if let Some(why) = session.take_violation() {
            // The follower can no longer tell commands from message data: nothing more
            // goes upstream, and the connection is closed (the client sees it close; no
            // mail of this transaction was accepted).
            log(LogLevel::Warn, &format!("closing the SMTP session: {why}"));
            StreamMetrics::add(self.metrics.closed, 1);
            if let Err(e) = hostcalls::set_buffer(buffer, 0, data.len(), &[]) {
                log(
                    LogLevel::Error,
                    &format!("dropping {buffer:?} failed: {e:?}"),
                );
            }
            if let Err(e) = hostcalls::close_downstream() {
                log(LogLevel::Error, &format!("closing failed: {e:?}"));
            }
            self.count();
            return Action::Continue;
        }
        // `None`: the bytes pass as they are (no copy, no write back).
        if let Some(out) = out
            && let Err(e) = hostcalls::set_buffer(buffer, 0, data.len(), &out)
        {
            log(
                LogLevel::Error,
                &format!("rewriting {buffer:?} failed: {e:?}"),
            );
        }
        self.count();
        Action::Continue
    }
}

impl Context for Connection {}

impl StreamContext for Connection {
    fn on_new_connection(&mut self) -> Action {
        if self.session.is_some() {
            StreamMetrics::add(self.metrics.sessions, 1);
        }
        self.route();
        Action::Continue
    }

    fn on_downstream_data(&mut self, data_size: usize, end_of_stream: bool) -> Action {
        self.filter(BufferType::DownstreamData, data_size, end_of_stream)
    }

    fn on_upstream_data(&mut self, data_size: usize, end_of_stream: bool) -> Action {
        self.filter(BufferType::UpstreamData, data_size, end_of_stream)
    }

    fn on_log(&mut self) {
        // Formatting and a host call per connection are measurable at the edge: only
        // when the host logs at debug level.
        if let Some(s) = &self.session
            && matches!(
                hostcalls::get_log_level(),
                Ok(LogLevel::Debug | LogLevel::Trace)
            )
        {
            log(
                LogLevel::Debug,
                &format!(
                    "smtp session closed: starttls offered {}, encrypted {}",
                    s.starttls_offered(),
                    s.is_opaque()
                ),
            );
        }
    }
}

fn property_string(path: &[&str]) -> Option<String> {
    let raw = hostcalls::get_property(path.to_vec()).ok()??;
    String::from_utf8(raw).ok()
}

/// `127.0.0.1:5000` -> `127.0.0.1`; `[::1]:5000` -> `::1`.
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Envoy's `SetEnvoyFilterStateArguments` protobuf, encoded by hand: field 1 `path`
/// (string), field 2 `value` (string), field 3 `span` (enum; 0 = FilterChain).
pub(crate) fn filter_state_arguments(path: &str, value: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len() + value.len() + 8);
    for (tag, s) in [(0x0a_u8, path), (0x12, value)] {
        out.push(tag);
        varint(s.len() as u64, &mut out);
        out.extend_from_slice(s.as_bytes());
    }
    // Span FilterChain (0), written out so the intent is visible on the wire.
    out.extend_from_slice(&[0x18, 0x00]);
    out
}

fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn filter_state_arguments_encode() {
        assert_eq!(
            filter_state_arguments("ab", "c"),
            vec![0x0a, 2, b'a', b'b', 0x12, 1, b'c', 0x18, 0]
        );
        let long = "x".repeat(200);
        let enc = filter_state_arguments("p", &long);
        assert_eq!(&enc[3..6], &[0x12, 0xc8, 0x01]);
    }

    #[test]
    fn config_forms() {
        let compiled = policy::compile("[policy]\nname = \"t\"\n").unwrap();
        let bare = StreamConfig::parse(compiled.json.as_bytes()).unwrap();
        assert!(bare.policy.is_some() && bare.routes.is_empty());
        let wrapped = format!(
            r#"{{"policy": {}, "connection_routes": [{{"destination_port": 25, "cluster": "a"}}]}}"#,
            compiled.json
        );
        let w = StreamConfig::parse(wrapped.as_bytes()).unwrap();
        assert_eq!(w.routes[0].cluster, "a");
        assert!(StreamConfig::parse(br#"{"connection_routes": [{"cluster": "a"}]}"#).is_err());
        assert!(StreamConfig::parse(br#"{"polcy": {}}"#).is_err());
    }
}
