//! End-to-end tests of the `altroute` binary with real peers on loopback.
//!
//! One test binary, one module per topic (see support.rs for the relay harness).
//! Needs Debian's `swaks` and `postfix` (for `smtp-source`), and root for the tmpfs
//! mount of the disk-full test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod policy_cli;
mod support;

mod admin;
mod audit;
mod cli;
mod crash;
mod delivery;
mod demo;
mod diskfull;
mod edge;
mod extensions;
mod host_test;
mod inbound;
mod inproc;
mod mta_sts;
mod queue;
mod reload;
mod startup;
mod tlsrpt;
