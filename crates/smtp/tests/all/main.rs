//! Integration tests for altroute-smtp: real loopback sockets, real TLS with
//! rcgen certificates, and Debian's swaks as an independent client.
#![allow(clippy::unwrap_used)]

mod client;
mod common;
mod hygiene;
mod swaks;
mod tls;
