//! A [proxy-wasm] ABI 0.2.1 host on Wasmtime: it runs modules built with the proxy-wasm
//! SDKs (Rust, Go, C++) the way Envoy does, sandboxed, pooled and hot-swappable. It knows
//! nothing about the embedder's protocol: an HTTP request is headers (and a body) in,
//! headers out or a local response; a stream is bytes in, bytes out.
//!
//! # Core concepts
//!
//! - [`Host`]: the Wasmtime engine, the linker with every `env.proxy_*` function, a cache
//!   of compiled modules (by BLAKE3 hash; on disk with [`HostConfig::cache_dir`]) and an epoch
//!   ticker thread that enforces [`HostConfig::deadline`] (default 100 ms per call).
//! - [`Plugin`]: one module + plugin configuration + VM configuration + root id, loaded by
//!   [`Host::load`]. It keeps a pool of configured instances (`_initialize`, root context,
//!   `proxy_on_vm_start`, `proxy_on_configure` already done), so a request neither compiles
//!   nor instantiates. [`Plugin::http_request`] runs one HTTP context
//!   ([`Plugin::http_request_with`]: the same without copies, request borrowed and
//!   outcome read in place);
//!   [`Plugin::stream`] opens a [`Stream`] (network filter).
//! - Sandbox: no WASI unless [`HostConfig::allow_wasi`]; memory capped at
//!   [`HostConfig::memory_limit`] (default 64 MiB); one instance, four tables and one
//!   memory per store. A trap, deadline or limit returns a typed [`Error`], discards that
//!   instance and rebuilds it (with backoff when faults repeat).
//! - [`PolicySlot`]: the active plugin behind an `ArcSwap`; [`PolicySlot::try_swap`]
//!   loads, configures and self-tests a candidate before swapping it in.
//!
//! # Layout
//!
//! - `host.rs`: [`Host`], [`HostConfig`], compile cache and link checks.
//! - `plugin.rs`: [`Plugin`], [`PluginSpec`], the instance pool, HTTP and stream drivers.
//! - `abi.rs`: the `env.proxy_*` functions and per-instance state.
//! - `properties.rs`, `metrics.rs`: built-in properties, [`PropertyProvider`], metrics.
//! - `wasi.rs`: the locked-down WASI preview1. `slot.rs`: [`PolicySlot`].
//!
//! The implemented ABI calls and the differences from Envoy are listed in
//! `docs/proxy-wasm-host.md`.
//!
//! # Example
//!
//! A module written in WAT that adds a header on every request:
//!
//! ```
//! use proxy_wasm_host::{Host, HostConfig, HttpRequest, PluginSpec};
//!
//! let wat = r#"(module
//!   (import "env" "proxy_add_header_map_value"
//!     (func $add (param i32 i32 i32 i32 i32) (result i32)))
//!   (memory (export "memory") 1)
//!   (data (i32.const 16) "x-seenyes")
//!   (global $heap (mut i32) (i32.const 1024))
//!   (func (export "malloc") (param $n i32) (result i32)
//!     (local $p i32)
//!     (local.set $p (global.get $heap))
//!     (global.set $heap (i32.add (global.get $heap) (local.get $n)))
//!     (local.get $p))
//!   (func (export "proxy_abi_version_0_2_1"))
//!   (func (export "proxy_on_context_create") (param i32 i32))
//!   (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
//!     (drop (call $add (i32.const 0) (i32.const 16) (i32.const 6) (i32.const 22) (i32.const 3)))
//!     (i32.const 0)))"#;
//! let module = wat::parse_str(wat).unwrap();
//!
//! let host = Host::new(HostConfig::default()).unwrap();
//! let plugin = host.load(PluginSpec::new(module, "example").version("1")).unwrap();
//! let out = plugin
//!     .http_request(&HttpRequest {
//!         headers: vec![(":path".into(), b"/".to_vec())],
//!         ..Default::default()
//!     })
//!     .unwrap();
//! assert_eq!(out.header("x-seen"), Some(&b"yes"[..]));
//! assert!(out.local_response.is_none());
//! ```
//!
//! [proxy-wasm]: https://github.com/proxy-wasm/spec/tree/main/abi-versions/v0.2.1

mod abi;
mod error;
mod host;
mod metrics;
mod plugin;
mod properties;
mod slot;
mod wasi;

pub use abi::LocalResponse;
pub use error::Error;
pub use host::{Host, HostConfig};
pub use metrics::{Metric, MetricKind};
pub use plugin::{
    Action, HttpOutcome, HttpRequest, HttpRequestRef, HttpView, Plugin, PluginSpec, Stream,
    StreamOutput,
};
pub use properties::{ConnectionInfo, PropertyProvider};
pub use slot::PolicySlot;
