//! The workspace's wasm modules, built for `wasm32-unknown-unknown` by this crate's build
//! script and embedded as bytes, so that the relay, the tests and the benchmarks always run
//! the module built from the sources next to them.
//!
//! ```
//! assert_eq!(&altroute_modules::POLICY[..4], b"\0asm");
//! ```

/// The standard policy module, `altroute_policy.wasm` (HTTP face, SMTP stream face,
/// connection-start routing).
pub const POLICY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/altroute_policy.wasm"));

/// A proxy-wasm Rust SDK module that exercises every host call (tests only).
pub const TESTGUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/altroute_testguest.wasm"));

/// Example extension (wasm/examples/finance-secure): mail from the finance org unit always
/// takes the secure relay.
pub const FINANCE_SECURE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/finance_secure.wasm"));

/// Example extension (wasm/examples/business-hours): listed domains are held outside
/// business hours.
pub const BUSINESS_HOURS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/business_hours.wasm"));
