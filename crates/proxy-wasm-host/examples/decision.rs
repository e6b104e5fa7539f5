//! Measures one HTTP-context decision (create context, 8 header reads, 5 header writes,
//! done/log/delete) with the epoch deadline on, on a module written in WAT.
//!
//! `cargo run --release -p proxy-wasm-host --example decision [iterations]`
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use proxy_wasm_host::{Host, HostConfig, HttpRequest, PluginSpec};

const WAT: &str = r#"(module
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $put (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) "x-altroute-phasex-altroute-senderx-altroute-recipientx-altroute-mx")
  (data (i32.const 256) "x-altroute-routedirectx-altroute-rulerule-1")
  (global $heap (mut i32) (i32.const 4096))
  ;; A bump allocator reset per context: enough for a benchmark.
  (func (export "malloc") (param $n i32) (result i32) (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32) (global.set $heap (i32.const 4096)))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_delete") (param i32))
  (func $read (param $k i32) (param $l i32)
    (drop (call $get (i32.const 0) (local.get $k) (local.get $l) (i32.const 1024) (i32.const 1028))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $read (i32.const 0) (i32.const 16))
    (call $read (i32.const 16) (i32.const 17))
    (call $read (i32.const 33) (i32.const 20))
    (call $read (i32.const 53) (i32.const 13))
    (call $read (i32.const 0) (i32.const 16))
    (call $read (i32.const 16) (i32.const 17))
    (call $read (i32.const 33) (i32.const 20))
    (call $read (i32.const 53) (i32.const 13))
    (drop (call $put (i32.const 0) (i32.const 256) (i32.const 16) (i32.const 272) (i32.const 6)))
    (drop (call $put (i32.const 0) (i32.const 278) (i32.const 15) (i32.const 293) (i32.const 6)))
    (drop (call $put (i32.const 0) (i32.const 256) (i32.const 16) (i32.const 272) (i32.const 6)))
    (drop (call $put (i32.const 0) (i32.const 278) (i32.const 15) (i32.const 293) (i32.const 6)))
    (drop (call $put (i32.const 0) (i32.const 256) (i32.const 16) (i32.const 272) (i32.const 6)))
    (i32.const 0)))"#;

fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    let host = Host::new(HostConfig::default()).unwrap();
    let plugin = host
        .load(PluginSpec::new(wat::parse_str(WAT).unwrap(), "bench"))
        .unwrap();
    let req = HttpRequest {
        headers: [
            ("x-altroute-phase", "plan"),
            ("x-altroute-sender", "a@example.org"),
            ("x-altroute-recipient", "b@example.net"),
            ("x-altroute-mx", "mx.example.net"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect(),
        ..HttpRequest::default()
    };
    for _ in 0..10_000 {
        plugin.http_request(&req).unwrap();
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        let out = plugin.http_request(&req).unwrap();
        samples.push(t.elapsed().as_nanos() as u64);
        std::hint::black_box(out);
    }
    samples.sort_unstable();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "decision: {iterations} iterations, p50 {} ns, p99 {} ns, p99.9 {} ns",
        pct(0.5),
        pct(0.99),
        pct(0.999)
    );
}
