//! Policies for tests and benchmarks. The decision table: policies whose embedded tests
//! are the table-driven decision cases. The same cases run natively (this crate's tests),
//! through the wasm module in the altroute proxy-wasm host, and in Envoy (the end-to-end
//! tests). And [`large`]: a generated policy of any size.

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

/// The TOML of a policy the size of a large organisation's, for benchmarks and tests:
/// `rules` TLS compliance rules `r<N>` of five patterns each (`*.w<N>.example` and
/// `d<N>-1.example` to `d<N>-4.example`), 20 org units `/unit<U>` (senders
/// `unit<U>.corp.example` and its subdomains) and 200 static routes `route<N>`
/// (`route<N>.example`) to the alternate secure route's host `secure-relay`. Deciding
/// against it shows whether a decision grows with the policy (the patterns are indexed
/// once per policy, so it should not).
pub fn large(rules: usize) -> String {
    let mut s = String::from(
        "[policy]\nname = \"large\"\n\n\
         [[hosts]]\nname = \"secure-relay\"\naddress = \"relay.secure.example\"\n\
         require_tls = true\nrequire_ca_signed = true\nvalidate_hostname = true\n\n\
         [alternate_secure_route]\nenabled = true\nhost = \"secure-relay\"\n\n",
    );
    for u in 0..20 {
        s += &format!(
            "[[org_units]]\npath = \"/unit{u}\"\n\
             senders = [\"unit{u}.corp.example\", \"*.unit{u}.corp.example\"]\n\n"
        );
    }
    for r in 0..rules {
        let domains: Vec<String> = (0..5)
            .map(|j| match j {
                0 => format!("\"*.w{r}.example\""),
                _ => format!("\"d{r}-{j}.example\""),
            })
            .collect();
        s += &format!(
            "[[tls_compliance]]\nname = \"r{r}\"\ndomains = [{}]\nrequire_ca_signed = true\n\n",
            domains.join(", ")
        );
    }
    for r in 0..200 {
        s += &format!(
            "[[routes]]\nname = \"route{r}\"\ndomains = [\"route{r}.example\"]\n\
             host = \"secure-relay\"\n\n"
        );
    }
    s
}
