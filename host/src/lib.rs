//! altroute: an outbound mail relay whose routing decision is a sandboxed WebAssembly
//! policy module.
//!
//! # Layout
//!
//! - `policy_cmd`: `altroute policy compile | check | test | explain`.
//! - `config`: the relay configuration file, validated with every error at once.
//! - `serve`: `altroute serve`, the daemon: listeners, session cap, graceful shutdown.
//! - `inbound`: the SMTP handler: relay access control, `Received:`, into the spool.
//! - `admin`: the admin HTTP endpoint (health, metrics, policy version, queue).
//! - `queue_cmd`: `altroute queue list | show | retry | bounce` through the admin endpoint.
//! - `host_test`: `altroute host test NAME`, the TLS connection test (docs/operations.md).
//! - `metrics`: the shared Prometheus registry.
//! - `extensions`: sandboxed third-party policy extensions chained after the standard module.
//! - `edge`: the policy module's SMTP stream face on inbound listeners (`[edge]`).
//! - `output`: [`outln!`], the commands' `println!` that survives `| head`.
//! - `proxy_protocol`: the PROXY protocol header of connections from trusted proxies
//!   (`server.proxy_protocol_from`): the real client address behind Envoy or HAProxy.
//!
//! The binary (`src/main.rs`) only parses the command line and calls into this library.

pub mod admin;
pub mod audit;
pub mod civil;
pub mod config;
pub mod delivery;
pub mod demo;
pub mod edge;
pub mod extensions;
pub mod files;
pub mod host_test;
pub mod inbound;
pub mod metrics;
pub mod mta_sts;
pub mod output;
pub mod policy_cmd;
pub mod policy_engine;
pub mod proxy_protocol;
pub mod queue_cmd;
pub mod reload;
pub mod serve;
pub mod tlsrpt;
