//! Tests for the loopback lab: one binary, a module per component.
#![allow(clippy::unwrap_used)]

mod ca;
mod client;
mod dns;
mod https;
mod net;
mod sink;
mod strip;
