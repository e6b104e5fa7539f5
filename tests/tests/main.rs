//! End-to-end tests, one module per topic.

mod envoy;
mod wasm_table;
