//! End-to-end tests, one module per topic.

mod envoy;
mod extensions;
mod wasm_table;
