//! altroute: an outbound mail relay whose routing decision is a sandboxed WebAssembly
//! policy module.
//!
//! # Layout
//!
//! - `policy_cmd`: `altroute policy compile | check | test | explain`.
//!
//! The binary (`src/main.rs`) only parses the command line and calls into this library.

pub mod policy_cmd;
