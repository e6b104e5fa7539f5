//! End-to-end tests, one module per topic.

mod envoy;
mod extensions;
mod proxy_protocol;
mod wasm_table;
