//! The compiled policy: the canonical JSON form that the module loads, and the compiler
//! from the TOML that admins write.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::index::PatternIndex;
use crate::pattern::{Pattern, check_domain};
use crate::query::{HostTarget, TlsRequirement};
use crate::source::{Expect, SourcePolicy};
use crate::types::{Direction, MinTls, OnTlsUnavailable, TlsRequiredNo, Verify};
use crate::{Error, Query};

/// The format number of the canonical JSON. Bumped on incompatible changes.
pub const FORMAT: u32 = 1;

/// A compiled, validated policy. Build one with [`compile`] or [`Policy::from_json`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub format: u32,
    /// `sha256:` and the first 16 hex digits of the SHA-256 of the canonical JSON with this
    /// field empty.
    pub version: String,
    pub name: String,
    pub on_tls_unavailable: OnTlsUnavailable,
    pub mta_sts: bool,
    pub tls_required_no: TlsRequiredNo,
    /// The characters that end a mailbox's own local part, as a next hop's recipient
    /// delimiter (Postfix's `recipient_delimiter`): an address pattern `bob@x` also matches
    /// `bob+news@x`. Empty (and left out of the JSON, so that policies compiled before
    /// this field keep their version): none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub recipient_delimiter: String,
    /// By name; a name given twice in JSON is refused (a map keeps the last silently: an
    /// audit's second `gw` without TLS replaced the first one a reader saw).
    #[serde(deserialize_with = "unique_hosts")]
    pub hosts: BTreeMap<String, Host>,
    /// The alternate secure route's host, when enabled.
    pub alternate: Option<String>,
    pub org_units: Vec<OrgUnit>,
    pub compliance: Vec<Rule>,
    pub routes: Vec<StaticRoute>,
    pub tests: Vec<PolicyTest>,
    /// The patterns of the rules, routes and org units above, sorted for look-ups: built
    /// on the first decision, not serialized, ignored by `==` and not copied by `clone`.
    /// Leave it at `Default::default()`; once a policy has decided, its rules, routes and
    /// org units must not change (change a clone, or compile again).
    #[serde(skip)]
    pub patterns: PatternIndex,
}

/// A host for routing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub addresses: Vec<String>,
    pub port: u16,
    pub mx_lookup: bool,
    /// What a connection to this host must provide.
    pub tls: TlsRequirement,
}

/// An org unit and the sender patterns mapped to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgUnit {
    pub path: String,
    pub senders: Vec<Pattern>,
}

/// A TLS compliance rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    pub org_unit: String,
    pub direction: Direction,
    pub patterns: Vec<Pattern>,
    pub tls: TlsRequirement,
}

/// A static route to a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticRoute {
    pub name: String,
    pub org_unit: String,
    pub patterns: Vec<Pattern>,
    pub host: String,
}

/// An embedded test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTest {
    pub name: String,
    pub query: Query,
    pub expect: Expect,
}

/// One problem found by the compiler, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// `line 12, hosts[1] "gw"` or a key path.
    pub location: String,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// The result of one embedded test.
#[derive(Debug, Clone)]
pub struct TestOutcome {
    pub name: String,
    /// Empty when the test passed.
    pub mismatches: Vec<String>,
    pub decision: crate::Decision,
}

impl TestOutcome {
    pub fn passed(&self) -> bool {
        self.mismatches.is_empty()
    }
}

impl Host {
    /// The target a decision names for this host.
    pub fn target(&self, name: &str) -> HostTarget {
        HostTarget {
            name: name.to_string(),
            addresses: self.addresses.clone(),
            port: self.port,
            mx_lookup: self.mx_lookup,
        }
    }

    /// [`Host::target`], written over `t` (its strings' room reused).
    pub fn target_into(&self, name: &str, t: &mut HostTarget) {
        t.name.clear();
        t.name.push_str(name);
        t.addresses.clone_from(&self.addresses);
        t.port = self.port;
        t.mx_lookup = self.mx_lookup;
    }
}

impl Policy {
    /// Load the canonical JSON (what the module receives as plugin configuration) and
    /// check it: format, version hash, references, the alternate route's TLS, and the
    /// embedded tests.
    pub fn from_json(json: &[u8]) -> Result<Policy, Error> {
        Policy::from_json_inner(json, true)
    }

    /// [`Policy::from_json`] without running the embedded tests (to report each one, as
    /// `altroute policy test` does, with [`Policy::run_tests`]).
    pub fn from_json_without_tests(json: &[u8]) -> Result<Policy, Error> {
        Policy::from_json_inner(json, false)
    }

    fn from_json_inner(json: &[u8], run_tests: bool) -> Result<Policy, Error> {
        // One UTF-8 check of the whole text, then `from_str`: `from_slice` checks each
        // string again as it reads it, and in the wasm module (where every plugin load
        // parses the policy) that took 5% of a load (BENCHMARKS.md, decision latency).
        let text = std::str::from_utf8(json)
            .map_err(|e| Error::Json(format!("the policy is not UTF-8 text: {e}")))?;
        let policy: Policy = serde_json::from_str(text).map_err(|e| Error::Json(e.to_string()))?;
        if policy.format != FORMAT {
            return Err(Error::Invalid(vec![format!(
                "format {} is not supported (this build reads format {FORMAT})",
                policy.format
            )]));
        }
        if !policy.raw_version_matches(json) && policy.version != policy.content_version() {
            let expected = policy.content_version();
            return Err(Error::Invalid(vec![format!(
                "version {} does not match the content (hash {expected})",
                policy.version
            )]));
        }
        let mut problems = Vec::new();
        if let Err(e) = check_delimiter(&policy.recipient_delimiter) {
            problems.push(e);
        }
        policy.check_references(&mut problems);
        policy.check_structure(&mut problems);
        // Only the failures are kept: in the wasm module every plugin load runs the tests.
        if run_tests {
            policy.each_test(|test, _, mismatches| {
                if !mismatches.is_empty() {
                    problems.push(format!(
                        "test {:?} failed: {}",
                        test.name,
                        mismatches.join("; ")
                    ));
                }
            });
        }
        if problems.is_empty() {
            // The pattern index now, if the tests did not build it: a loaded policy's
            // first decision is as fast as the others.
            policy.patterns.get(&policy);
            Ok(policy)
        } else {
            Err(Error::Invalid(problems))
        }
    }

    /// The canonical JSON: compact, fields in declaration order, maps sorted.
    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Whether `json`, the bytes this policy was read from, are its canonical JSON and
    /// hash to its version: the same check as comparing with [`Policy::content_version`]
    /// without serializing the policy again (loading is on the path of a policy swap, and
    /// of every module instance's `on_configure`). `false` means "check the slow way".
    fn raw_version_matches(&self, json: &[u8]) -> bool {
        // The canonical JSON starts with the format, then the version.
        let head = format!("{{\"format\":{},\"version\":", self.format);
        let versioned = format!("{head}\"{}\",", self.version);
        let Some(rest) = json.strip_prefix(versioned.as_bytes()) else {
            return false;
        };
        let mut hasher = Sha256::new();
        hasher.update(head.as_bytes());
        hasher.update(b"\"\",");
        hasher.update(rest);
        version_of(&hasher.finalize()) == self.version
    }

    /// The version this content hashes to.
    pub fn content_version(&self) -> String {
        let mut unversioned = self.clone();
        unversioned.version = String::new();
        version_of(&Sha256::digest(unversioned.to_json().as_bytes()))
    }

    /// Run the embedded tests.
    pub fn run_tests(&self) -> Vec<TestOutcome> {
        let mut outcomes = Vec::with_capacity(self.tests.len());
        self.each_test(|test, decision, mismatches| {
            outcomes.push(TestOutcome {
                name: test.name.clone(),
                mismatches,
                decision: decision.clone(),
            });
        });
        outcomes
    }

    /// Each embedded test with the decision for its query and what differs from what it
    /// expects (empty when it passed). One decision is written over from test to test
    /// (`decide_into`, equal to `decide`'s), so a caller that keeps nothing allocates
    /// little.
    fn each_test(&self, mut f: impl FnMut(&PolicyTest, &crate::Decision, Vec<String>)) {
        let mut decision = crate::Decision::fault("", "");
        for test in &self.tests {
            crate::decide_into(self, &test.query, &mut decision);
            f(test, &decision, compare(&test.expect, &decision));
        }
    }

    /// What the TOML compiler refuses, checked again on a policy read as JSON (anyone can
    /// edit a compiled policy and hash it again): an audit's JSON policy with the unit
    /// path `finance` (no `/`) passed `policy check` and the relay, and its unit's senders
    /// escaped every rule of `/`. Unit paths and their uniqueness, a sender pattern in one
    /// unit only, rules and routes at units that exist, names, overlapping rules and
    /// routes, hosts, TLS settings that say one thing, and test questions.
    fn check_structure(&self, problems: &mut Vec<String>) {
        let mut units: BTreeSet<&str> = BTreeSet::from(["/"]);
        let mut paths: BTreeSet<&str> = BTreeSet::new();
        let mut senders: BTreeMap<&Pattern, &str> = BTreeMap::new();
        for u in &self.org_units {
            if let Err(e) = check_unit_path(&u.path) {
                problems.push(e);
                continue;
            }
            if !paths.insert(&u.path) {
                problems.push(format!("org unit {:?} is defined twice", u.path));
            }
            units.extend(ancestors(&u.path));
            for p in &u.senders {
                if let Some(other) = senders.insert(p, &u.path) {
                    problems.push(format!(
                        "sender {p} is mapped to org units {other:?} and {:?}",
                        u.path
                    ));
                }
            }
        }
        let consistent = |t: &TlsRequirement| t.required || *t == TlsRequirement::OPPORTUNISTIC;
        for (name, h) in &self.hosts {
            if name.trim().is_empty() {
                problems.push("a host needs a name".to_string());
            }
            if h.port == 0 {
                problems.push(format!("host {name:?}: port 0 is not a port"));
            }
            if h.addresses.is_empty() {
                problems.push(format!("host {name:?} has no address"));
            }
            for a in &h.addresses {
                if let Err(e) = check_address(a) {
                    problems.push(format!("host {name:?}: bad address: {e}"));
                }
            }
            if !consistent(&h.tls) {
                problems.push(format!(
                    "host {name:?}: a certificate check or TLS version without TLS required"
                ));
            }
        }
        let mut names: BTreeSet<&str> = BTreeSet::new();
        let mut seen: BTreeMap<(&str, &Pattern), Vec<(&str, Direction)>> = BTreeMap::new();
        for r in &self.compliance {
            if r.name.trim().is_empty() || !names.insert(&r.name) {
                problems.push(format!("rule name {:?} is empty or used twice", r.name));
            }
            if !units.contains(r.org_unit.as_str()) {
                problems.push(format!(
                    "rule {:?}: unknown org unit {:?}",
                    r.name, r.org_unit
                ));
            }
            if r.patterns.is_empty() {
                problems.push(format!("rule {:?} has no domain or address", r.name));
            }
            if !consistent(&r.tls) {
                problems.push(format!(
                    "rule {:?}: a certificate check or TLS version without TLS required",
                    r.name
                ));
            }
            for p in &r.patterns {
                let entry = seen.entry((r.org_unit.as_str(), p)).or_default();
                for (other, dir) in entry.iter() {
                    if directions_overlap(*dir, r.direction) {
                        problems.push(format!(
                            "overlapping rules: {p} at org unit {:?} is in rules {other:?} and {:?}",
                            r.org_unit, r.name
                        ));
                    }
                }
                entry.push((r.name.as_str(), r.direction));
            }
        }
        let mut names: BTreeSet<&str> = BTreeSet::new();
        let mut seen: BTreeMap<(&str, &Pattern), &str> = BTreeMap::new();
        for r in &self.routes {
            if r.name.trim().is_empty() || !names.insert(&r.name) {
                problems.push(format!("route name {:?} is empty or used twice", r.name));
            }
            if !units.contains(r.org_unit.as_str()) {
                problems.push(format!(
                    "route {:?}: unknown org unit {:?}",
                    r.name, r.org_unit
                ));
            }
            if r.patterns.is_empty() {
                problems.push(format!("route {:?} has no domain", r.name));
            }
            for p in &r.patterns {
                if matches!(p, Pattern::Address(_)) {
                    problems.push(format!("route {:?}: {p}: routes match domains", r.name));
                }
                if let Some(other) = seen.insert((r.org_unit.as_str(), p), &r.name) {
                    problems.push(format!(
                        "overlapping routes: {p} at org unit {:?} is in routes {other:?} and {:?}",
                        r.org_unit, r.name
                    ));
                }
            }
        }
        let mut names: BTreeSet<&str> = BTreeSet::new();
        for t in &self.tests {
            if t.name.trim().is_empty() || !names.insert(&t.name) {
                problems.push(format!("test name {:?} is empty or used twice", t.name));
            }
            if t.expect == Expect::default() {
                problems.push(format!(
                    "test {:?} needs at least one expectation: without one it cannot fail",
                    t.name
                ));
            }
            if let Some(e) = unaskable(&t.query) {
                problems.push(format!("test {:?}: {e}", t.name));
            }
        }
    }

    fn check_references(&self, problems: &mut Vec<String>) {
        if let Some(alt) = &self.alternate {
            match self.hosts.get(alt) {
                None => problems.push(format!("alternate host {alt:?} is not defined")),
                Some(h) if !(h.tls.required && h.tls.verify >= Verify::Ca) => problems.push(
                    format!("alternate host {alt:?} must require TLS with a CA-signed certificate"),
                ),
                Some(_) => {}
            }
        }
        for r in &self.routes {
            if !self.hosts.contains_key(&r.host) {
                problems.push(format!(
                    "route {:?}: host {:?} is not defined",
                    r.name, r.host
                ));
            }
        }
    }
}

/// The `hosts` map, each name once.
fn unique_hosts<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, Host>, D::Error> {
    struct Hosts;
    impl<'de> serde::de::Visitor<'de> for Hosts {
        type Value = BTreeMap<String, Host>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map of host names to hosts")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut hosts = BTreeMap::new();
            while let Some((name, host)) = map.next_entry::<String, Host>()? {
                if hosts.contains_key(&name) {
                    return Err(serde::de::Error::custom(format!(
                        "host {name:?} is defined twice"
                    )));
                }
                hosts.insert(name, host);
            }
            Ok(hosts)
        }
    }
    d.deserialize_map(Hosts)
}

/// `sha256:` and the first 16 hex digits of a digest.
fn version_of(digest: &[u8]) -> String {
    let mut hex = String::with_capacity(7 + 16);
    hex.push_str("sha256:");
    for byte in digest.iter().take(8) {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// Compare a decision with what a test expects.
pub fn compare(expect: &Expect, d: &crate::Decision) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(route) = expect.route
        && route != d.route
    {
        out.push(format!("expected route {route}, got {}", d.route));
    }
    if let Some(rule) = &expect.rule
        && rule != &d.rule
    {
        out.push(format!("expected rule {rule}, got {}", d.rule));
    }
    if let Some(host) = &expect.host {
        let got = d.host.as_ref().map(|h| h.name.as_str()).unwrap_or("");
        if host != got {
            out.push(format!("expected host {host}, got {got:?}"));
        }
    }
    if let Some(req) = expect.tls_required
        && req != d.tls.required
    {
        out.push(format!(
            "expected tls_required {req}, got {}",
            d.tls.required
        ));
    }
    if let Some(result) = expect.result
        && result != d.result
    {
        out.push(format!("expected result {result}, got {}", d.result));
    }
    out
}

/// The outcome of a successful compilation.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub policy: Policy,
    /// The canonical JSON, ready for the module.
    pub json: String,
}

/// Compile a TOML policy. On failure, returns every problem found, each with its location,
/// including embedded tests that fail.
pub fn compile(toml_src: &str) -> Result<Compiled, Vec<Diagnostic>> {
    compile_inner(toml_src, true)
}

/// Compile a TOML policy without running its embedded tests (`altroute policy test` runs
/// and reports them one by one).
pub fn compile_without_tests(toml_src: &str) -> Result<Compiled, Vec<Diagnostic>> {
    compile_inner(toml_src, false)
}

fn compile_inner(toml_src: &str, run_tests: bool) -> Result<Compiled, Vec<Diagnostic>> {
    let lines = LineIndex::new(toml_src);
    let mut diags = Vec::new();

    // Every value of the wrong type at once; the checks below need the whole shape right.
    let shape = crate::toml_errors::deserialize::<SourcePolicy>(toml_src);
    diags.extend(shape.errors.iter().map(|e| toml_error(&lines, e)));
    // Parsed again with spans, only to place unknown keys (it parsed once already).
    let doc = if shape.unknown.is_empty() {
        None
    } else {
        toml::de::DeTable::parse(&shape.text).ok()
    };
    for path in &shape.unknown {
        // `Spanned` wrappers show up as a private segment in the path; drop it.
        let path = path.replace(".$__serde_spanned_private_value", "");
        let key = path.rsplit('.').next().unwrap_or(&path).to_string();
        diags.push(Diagnostic {
            location: doc
                .as_ref()
                .and_then(|doc| lines.locate_key(doc.get_ref(), &path))
                .unwrap_or_else(|| path.clone()),
            message: format!("unknown field `{key}` (at {path})"),
        });
    }
    let Some(source) = shape.value.filter(|_| shape.errors.is_empty()) else {
        return Err(diags);
    };

    if let Err(e) = check_delimiter(&source.policy.recipient_delimiter) {
        diags.push(diag("policy.recipient_delimiter", &e));
    }

    // Hosts.
    let mut hosts = BTreeMap::new();
    for (i, spec) in source.hosts.iter().enumerate() {
        let at = lines.at(
            spec.span().start,
            &format!("hosts[{i}] {:?}", spec.get_ref().name),
        );
        let h = spec.get_ref();
        if h.name.trim().is_empty() {
            diags.push(diag(&at, "a host needs a name"));
        }
        if hosts.contains_key(&h.name) {
            diags.push(diag(&at, &format!("host {:?} is defined twice", h.name)));
        }
        let mut addresses = vec![h.address.clone()];
        addresses.extend(h.secondary_address.clone());
        for a in &addresses {
            if let Err(e) = check_address(a) {
                diags.push(diag(&at, &format!("bad address: {e}")));
            }
        }
        if h.port == 0 {
            diags.push(diag(&at, "port 0 is not a port"));
        }
        if !h.require_tls && (h.require_ca_signed || h.validate_hostname) {
            diags.push(diag(
                &at,
                "require_ca_signed and validate_hostname need require_tls = true \
                 (set them to false explicitly for a host without TLS)",
            ));
        }
        if h.validate_hostname && !h.require_ca_signed {
            diags.push(diag(
                &at,
                "validate_hostname needs require_ca_signed = true",
            ));
        }
        // As the compiled form's check says (it was silently dropped here).
        if !h.require_tls && h.min_tls == MinTls::V1_3 {
            diags.push(diag(
                &at,
                "min_tls = \"1.3\" needs require_tls = true (a host without TLS has no TLS version)",
            ));
        }
        let tls = requirement(
            h.require_tls,
            h.require_ca_signed,
            h.validate_hostname,
            h.min_tls,
        );
        hosts.insert(
            h.name.clone(),
            Host {
                addresses,
                port: h.port,
                mx_lookup: h.mx_lookup,
                tls,
            },
        );
    }

    // Org units.
    let mut units: BTreeSet<String> = BTreeSet::from(["/".to_string()]);
    let mut org_units = Vec::new();
    // Names and paths seen, to report repeats (a scan of the earlier ones per item was
    // quadratic in the policy's size).
    let mut unit_paths: BTreeSet<&str> = BTreeSet::new();
    let mut sender_owner: BTreeMap<Pattern, String> = BTreeMap::new();
    for (i, spec) in source.org_units.iter().enumerate() {
        let u = spec.get_ref();
        let at = lines.at(spec.span().start, &format!("org_units[{i}] {:?}", u.path));
        if let Err(e) = check_unit_path(&u.path) {
            diags.push(diag(&at, &e));
            continue;
        }
        if !unit_paths.insert(u.path.as_str()) {
            diags.push(diag(
                &at,
                &format!("org unit {:?} is defined twice", u.path),
            ));
        }
        for ancestor in ancestors(&u.path) {
            units.insert(ancestor.to_string());
        }
        let mut senders = Vec::new();
        for s in &u.senders {
            match Pattern::parse(s) {
                Ok(p) => {
                    if let Some(other) = sender_owner.get(&p) {
                        diags.push(diag(
                            &at,
                            &format!("sender {p} is already mapped to org unit {other:?}"),
                        ));
                    } else {
                        sender_owner.insert(p.clone(), u.path.clone());
                    }
                    senders.push(p);
                }
                Err(e) => diags.push(diag(&at, &format!("bad sender: {e}"))),
            }
        }
        org_units.push(OrgUnit {
            path: u.path.clone(),
            senders,
        });
    }

    // Alternate secure route.
    let mut alternate = None;
    if let Some(spec) = &source.alternate_secure_route {
        let a = spec.get_ref();
        let at = lines.at(spec.span().start, "alternate_secure_route");
        if a.org_unit != "/" {
            diags.push(diag(
                &at,
                &format!(
                    "the alternate secure route can only be set at the top-level org unit \"/\", not {:?}",
                    a.org_unit
                ),
            ));
        }
        match hosts.get(&a.host) {
            None => diags.push(diag(&at, &format!("unknown host {:?}", a.host))),
            Some(h) if !(h.tls.required && h.tls.verify >= Verify::Ca) => diags.push(diag(
                &at,
                &format!(
                    "host {:?} allows clear text or unverified certificates; the alternate secure \
                     route needs require_tls = true and require_ca_signed = true (never downgrade)",
                    a.host
                ),
            )),
            Some(_) => {}
        }
        if a.enabled {
            alternate = Some(a.host.clone());
        }
    }

    // TLS compliance rules.
    let mut compliance: Vec<Rule> = Vec::new();
    let mut rule_names: BTreeSet<&str> = BTreeSet::new();
    let mut seen_rule: BTreeMap<(String, Pattern), Vec<(String, Direction)>> = BTreeMap::new();
    for (i, spec) in source.tls_compliance.iter().enumerate() {
        let r = spec.get_ref();
        let at = lines.at(
            spec.span().start,
            &format!("tls_compliance[{i}] {:?}", r.name),
        );
        if r.name.trim().is_empty() {
            diags.push(diag(&at, "a rule needs a name"));
        }
        if !rule_names.insert(r.name.as_str()) {
            diags.push(diag(&at, &format!("rule name {:?} is used twice", r.name)));
        }
        if !units.contains(&r.org_unit) {
            diags.push(diag(&at, &format!("unknown org unit {:?}", r.org_unit)));
        }
        if r.domains.is_empty() && r.addresses.is_empty() {
            diags.push(diag(&at, "a rule needs at least one domain or address"));
        }
        if !r.require_tls && (r.require_ca_signed || r.validate_hostname) {
            // An exemption that looks like a requirement: say which one it is.
            diags.push(diag(
                &at,
                "require_ca_signed and validate_hostname need require_tls = true \
                 (require_tls = false exempts the rule's mail from TLS altogether)",
            ));
        }
        if !r.require_tls && r.min_tls == MinTls::V1_3 {
            diags.push(diag(
                &at,
                "min_tls = \"1.3\" needs require_tls = true (require_tls = false exempts the rule's mail from TLS altogether)",
            ));
        }
        if r.require_tls && r.validate_hostname && !r.require_ca_signed {
            diags.push(diag(
                &at,
                "validate_hostname needs require_ca_signed = true",
            ));
        }
        let mut patterns = Vec::new();
        for d in &r.domains {
            match Pattern::parse(d) {
                Ok(Pattern::Address(_)) => diags.push(diag(
                    &at,
                    &format!("`{d}` is an address: list it under addresses"),
                )),
                Ok(p) => patterns.push(p),
                Err(e) => diags.push(diag(&at, &format!("bad domain: {e}"))),
            }
        }
        for a in &r.addresses {
            match Pattern::parse(a) {
                Ok(p @ Pattern::Address(_)) => patterns.push(p),
                Ok(_) => diags.push(diag(
                    &at,
                    &format!("`{a}` is not an address (user@domain): list domains under domains"),
                )),
                Err(e) => diags.push(diag(&at, &format!("bad address: {e}"))),
            }
        }
        for p in &patterns {
            let entry = seen_rule
                .entry((r.org_unit.clone(), p.clone()))
                .or_default();
            for (other, dir) in entry.iter() {
                if directions_overlap(*dir, r.direction) {
                    diags.push(diag(
                        &at,
                        &format!(
                            "overlapping rules: {p} at org unit {:?} is also in rule {other:?}",
                            r.org_unit
                        ),
                    ));
                }
            }
            entry.push((r.name.clone(), r.direction));
        }
        compliance.push(Rule {
            name: r.name.clone(),
            org_unit: r.org_unit.clone(),
            direction: r.direction,
            patterns,
            tls: requirement(
                r.require_tls,
                r.require_ca_signed,
                r.validate_hostname,
                r.min_tls,
            ),
        });
    }

    // Static routes.
    let mut routes: Vec<StaticRoute> = Vec::new();
    let mut route_names: BTreeSet<&str> = BTreeSet::new();
    let mut seen_route: BTreeMap<(String, Pattern), String> = BTreeMap::new();
    for (i, spec) in source.routes.iter().enumerate() {
        let r = spec.get_ref();
        let at = lines.at(spec.span().start, &format!("routes[{i}] {:?}", r.name));
        if r.name.trim().is_empty() {
            diags.push(diag(&at, "a route needs a name"));
        }
        if !route_names.insert(r.name.as_str()) {
            diags.push(diag(&at, &format!("route name {:?} is used twice", r.name)));
        }
        if !units.contains(&r.org_unit) {
            diags.push(diag(&at, &format!("unknown org unit {:?}", r.org_unit)));
        }
        if !hosts.contains_key(&r.host) {
            diags.push(diag(&at, &format!("unknown host {:?}", r.host)));
        }
        if r.domains.is_empty() {
            diags.push(diag(&at, "a route needs at least one domain"));
        }
        let mut patterns = Vec::new();
        for d in &r.domains {
            match Pattern::parse(d) {
                Ok(Pattern::Address(_)) => diags.push(diag(
                    &at,
                    &format!("`{d}`: routes match domains, not addresses"),
                )),
                Ok(p) => {
                    if let Some(other) = seen_route.get(&(r.org_unit.clone(), p.clone())) {
                        diags.push(diag(
                            &at,
                            &format!(
                                "overlapping routes: {p} at org unit {:?} is also in route {other:?}",
                                r.org_unit
                            ),
                        ));
                    }
                    seen_route.insert((r.org_unit.clone(), p.clone()), r.name.clone());
                    patterns.push(p);
                }
                Err(e) => diags.push(diag(&at, &format!("bad domain: {e}"))),
            }
        }
        routes.push(StaticRoute {
            name: r.name.clone(),
            org_unit: r.org_unit.clone(),
            patterns,
            host: r.host.clone(),
        });
    }

    // Tests: each must be able to fail, and ask what the relay can ask.
    let mut tests = Vec::new();
    let mut test_names: BTreeSet<&str> = BTreeSet::new();
    for (i, spec) in source.tests.iter().enumerate() {
        let t = spec.get_ref();
        let at = lines.at(spec.span().start, &format!("tests[{i}] {:?}", t.name));
        if t.name.trim().is_empty() {
            diags.push(diag(&at, "a test needs a name"));
        }
        if !test_names.insert(t.name.as_str()) {
            diags.push(diag(&at, &format!("test name {:?} is used twice", t.name)));
        }
        if t.expect == Expect::default() {
            diags.push(diag(
                &at,
                "a test needs at least one expectation (route, rule, host, tls_required or \
                 result): without one it cannot fail",
            ));
        }
        // What the header contract refuses (`contract::decode_query`) is never asked.
        if let Some(e) = unaskable(&t.query) {
            diags.push(diag(&at, &e));
        }
        tests.push(PolicyTest {
            name: t.name.clone(),
            query: t.query.clone(),
            expect: t.expect.clone(),
        });
    }

    let mut policy = Policy {
        format: FORMAT,
        version: String::new(),
        name: source.policy.name.clone(),
        on_tls_unavailable: source.policy.on_tls_unavailable,
        mta_sts: source.standards.mta_sts,
        tls_required_no: source.standards.tls_required_no,
        recipient_delimiter: source.policy.recipient_delimiter.clone(),
        hosts,
        alternate,
        org_units,
        compliance,
        routes,
        tests,
        patterns: PatternIndex::default(),
    };
    policy.version = policy.content_version();

    // Tests run only on a policy that is otherwise sound, so that their failures are about
    // behaviour, not about the mistakes already listed.
    if diags.is_empty() && run_tests {
        for (outcome, spec) in policy.run_tests().into_iter().zip(&source.tests) {
            if !outcome.passed() {
                let at = lines.at(spec.span().start, &format!("tests {:?}", outcome.name));
                diags.push(diag(
                    &at,
                    &format!("test failed: {}", outcome.mismatches.join("; ")),
                ));
            }
        }
    }
    if diags.is_empty() {
        let json = policy.to_json();
        Ok(Compiled { policy, json })
    } else {
        Err(diags)
    }
}

fn requirement(required: bool, ca: bool, hostname: bool, min: MinTls) -> TlsRequirement {
    if !required {
        return TlsRequirement::OPPORTUNISTIC;
    }
    TlsRequirement {
        required: true,
        verify: if hostname {
            Verify::Hostname
        } else if ca {
            Verify::Ca
        } else {
            Verify::None
        },
        min,
    }
}

fn directions_overlap(a: Direction, b: Direction) -> bool {
    a == b || a == Direction::Both || b == Direction::Both
}

/// `/finance/emea` -> [`/finance/emea`, `/finance`, `/`].
pub fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    let mut next = Some(path);
    std::iter::from_fn(move || {
        let cur = next?;
        next = if cur == "/" {
            None
        } else {
            match cur.rfind('/') {
                Some(0) => Some("/"),
                Some(i) => Some(&cur[..i]),
                None => None,
            }
        };
        Some(cur)
    })
}

/// A recipient delimiter: up to 8 distinct characters of RFC 5321's `atext` that are
/// neither letters nor digits (`+`, `-`, `=`, ...), or none.
fn check_delimiter(d: &str) -> Result<(), String> {
    const MAX: usize = 8;
    let allowed = |b: u8| b"!#$%&'*+-/=?^_`{|}~".contains(&b);
    let mut seen = Vec::new();
    for c in d.chars() {
        if !c.is_ascii() || !allowed(c as u8) {
            return Err(format!(
                "recipient_delimiter {d:?}: {c:?} cannot be a delimiter (use characters among                  ! # $ % & ' * + - / = ? ^ _ ` {{ | }} ~)"
            ));
        }
        if seen.contains(&c) {
            return Err(format!("recipient_delimiter {d:?}: {c:?} is given twice"));
        }
        seen.push(c);
    }
    if seen.len() > MAX {
        return Err(format!(
            "recipient_delimiter {d:?}: at most {MAX} characters"
        ));
    }
    Ok(())
}

/// Why a test's question is one the relay never asks and the module refuses (the header
/// contract takes only mailboxes: `contract::decode_query`), if it is: a test of it would
/// pass on a decision the module never makes.
fn unaskable(q: &Query) -> Option<String> {
    if !q.recipient.contains('@') || !crate::pattern::is_mailbox(&q.recipient) {
        return Some(format!(
            "the query's recipient {:?} is not an address (user@domain) the module takes",
            q.recipient
        ));
    }
    if !q.sender.is_empty() && !crate::pattern::is_mailbox(&q.sender) {
        return Some(format!(
            "the query's sender {:?} is not an address (user@domain) the module takes",
            q.sender
        ));
    }
    None
}

fn check_unit_path(path: &str) -> Result<(), String> {
    if path == "/" {
        return Ok(());
    }
    if !path.starts_with('/') || path.ends_with('/') {
        return Err(format!(
            "org unit path {path:?} must start with `/` and not end with one"
        ));
    }
    for seg in path[1..].split('/') {
        if seg.is_empty()
            || !seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(format!(
                "org unit path {path:?}: segments use letters, digits, `-`, `_` and `.`"
            ));
        }
        // `/a/../b` read as `/b` is not what the model does (it is a unit under `/a/..`).
        if seg == "." || seg == ".." {
            return Err(format!(
                "org unit path {path:?}: a segment may not be `.` or `..`"
            ));
        }
    }
    Ok(())
}

fn check_address(a: &str) -> Result<(), String> {
    if a.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    if a.starts_with('[') {
        return Err(format!(
            "`{a}`: write an IP address without brackets (`10.0.0.1`, `2001:db8::1`)"
        ));
    }
    // `999.1.1.1` is no IP address, and no host name either (no top-level domain is all
    // digits): taken as a name, it never resolved and the route's mail waited until it
    // bounced.
    if a.rsplit('.')
        .next()
        .is_some_and(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "`{a}`: not an IP address, and not a host name (its last label is all digits)"
        ));
    }
    check_domain(&a.to_ascii_lowercase())
}

fn diag(at: &str, message: &str) -> Diagnostic {
    Diagnostic {
        location: at.to_string(),
        message: message.to_string(),
    }
}

fn toml_error(lines: &LineIndex, e: &toml::de::Error) -> Diagnostic {
    let location = match e.span() {
        Some(span) => lines.line_col(span.start),
        None => "policy".to_string(),
    };
    Diagnostic {
        location,
        message: e.message().trim().to_string(),
    }
}

/// Line numbers of byte offsets in the policy's source, for diagnostics. Every rule,
/// route and unit gets its location while it is compiled: counting the lines from the
/// start each time made compiling quadratic (17 s for 20,000 rules).
struct LineIndex<'a> {
    src: &'a str,
    /// The offset of every `\n`.
    newlines: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    fn new(src: &'a str) -> Self {
        let newlines = src
            .bytes()
            .enumerate()
            .filter(|(_, b)| *b == b'\n')
            .map(|(i, _)| i)
            .collect();
        LineIndex { src, newlines }
    }

    /// How many lines end before `offset`.
    fn lines_before(&self, offset: usize) -> usize {
        let end = offset.min(self.src.len());
        self.newlines.partition_point(|&n| n < end)
    }

    fn line_of(&self, offset: usize) -> usize {
        self.lines_before(offset) + 1
    }

    fn line_col(&self, offset: usize) -> String {
        let end = offset.min(self.src.len());
        let before = self.lines_before(offset);
        let line_start = match before {
            0 => 0,
            k => self.newlines[k - 1] + 1,
        };
        format!("line {}, column {}", before + 1, end - line_start + 1)
    }

    fn at(&self, offset: usize, what: &str) -> String {
        format!("line {}, {what}", self.line_of(offset))
    }

    /// The line of the key at `path` in `doc` (the source parsed with spans), for unknown
    /// keys. `path` is serde_ignored's: keys and array indexes joined by `.`, such as
    /// `hosts.1.priority`; `None` if it does not lead to a key (a key with a `.` in it).
    fn locate_key(&self, doc: &toml::de::DeTable<'_>, path: &str) -> Option<String> {
        use toml::de::DeValue;
        let mut table = doc;
        let mut segments = path.split('.');
        loop {
            let (key, value) = table.get_key_value(segments.next()?)?;
            let mut value = value.get_ref();
            while let DeValue::Array(items) = value {
                // The path may end at an array of tables itself (a misspelt `[[section]]`).
                let Some(next) = segments.clone().next() else {
                    break;
                };
                let index: usize = next.parse().ok()?;
                segments.next();
                value = items.get(index)?.get_ref();
            }
            match value {
                DeValue::Table(t) if segments.clone().next().is_some() => table = t,
                _ if segments.next().is_none() => {
                    return Some(format!("line {}", self.line_of(key.span().start)));
                }
                _ => return None,
            }
        }
    }
}
