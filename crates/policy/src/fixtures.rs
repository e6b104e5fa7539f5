//! The decision table: policies whose embedded tests are the table-driven decision cases.
//! The same cases run natively (this crate's tests), through the wasm module in the
//! altroute proxy-wasm host, and in Envoy (the end-to-end tests).

/// `(file name, TOML)` of every table policy.
pub const TABLE: &[(&str, &str)] = &[
    ("suite.toml", include_str!("../tests/table/suite.toml")),
    (
        "no-alternate.toml",
        include_str!("../tests/table/no-alternate.toml"),
    ),
    ("bounce.toml", include_str!("../tests/table/bounce.toml")),
    (
        "standards.toml",
        include_str!("../tests/table/standards.toml"),
    ),
];
