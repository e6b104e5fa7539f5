//! Tests of the policy crate: the decision table, the compiler's diagnostics, and the
//! invariants as properties.
#![allow(clippy::unwrap_used)]

mod addresses;
mod compiler;
mod examples;
mod properties;
mod table;
