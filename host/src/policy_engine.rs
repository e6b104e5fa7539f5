//! The policy engine: every routing question of the relay goes through the wasm policy
//! module, never through the native `decide`.
//!
//! [`PolicyEngine`] holds a [`PolicySlot`] with the module (the built-in standard module or
//! `[policy].module`) configured with the compiled policy (canonical JSON). A question is
//! one HTTP context: the facts are the request headers
//! ([`contract::encode_query`]), the decision is read back from the request headers the
//! module set ([`contract::decode_decision`]). Any failure on the way (trap, deadline,
//! memory limit, no free instance, a missing or malformed decision) becomes
//! [`Decision::fault`]: defer, never bounce, never downgrade. Faults are logged and counted.
//!
//! Extensions (`[[extension]]`, [`crate::extensions`]) run after the standard module, like
//! Envoy's HTTP filter chain: each sees the facts and the decision headers as the previous
//! module left them and may replace them. The final decision is decoded once at the end;
//! [`Answer`] also keeps the standard module's decision (for the safety floor) and names
//! the module that last changed the decision. The reloader swaps only the standard
//! module's slot: extensions keep running across policy swaps.
//!
//! The one native reading of the policy is for the safety floor: [`Answer::policy_tls`],
//! the TLS requirement that `altroute_policy::decide` gives for the question on the
//! compiled policy the answering plugin was configured with (read from that plugin's own
//! configuration, so it is always the same version as the module's answer). It never
//! routes; it only keeps a custom or buggy `[policy].module` from lowering what the
//! policy requires.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use proxy_wasm_host::{Host, HostConfig, HttpRequestRef, Plugin, PluginSpec, PolicySlot};

use altroute_policy::{Decision, Policy, Query, Route, TlsRequirement, contract};

use crate::extensions::{self, Extension, ExtensionConfig, ExtensionMetrics, Step};
use crate::reload::{ShadowSlot, Target};

/// The name of the standard module in [`Answer::by`] and in metrics.
pub const STANDARD: &str = "standard";

/// The answer of the whole chain to one question.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The final decision (what the relay acts on).
    pub decision: Decision,
    /// The standard module's own decision (the safety floor holds the chain to it).
    pub standard: Decision,
    /// The module that last changed the decision: [`STANDARD`] or an extension's name.
    pub by: String,
    /// Whether the module that last changed the route (route, host, its addresses, port
    /// or MX lookup) may make mail bounce: the standard module may, an extension only
    /// with `may_bounce = true`. The relay holds to it when the route is not the standard
    /// module's: a permanent refusal at that next hop is a deferral unless its chooser
    /// may bounce.
    pub may_bounce: bool,
    /// The module that last changed the route: [`STANDARD`] or an extension's name. Not
    /// always [`Answer::by`]: a later extension may change only the reason, and once
    /// took over an earlier one's route and its `may_bounce` so.
    pub routed_by: String,
    /// The TLS requirement of the compiled policy for this question, decided natively on
    /// the policy the answering standard plugin was configured with (same version as
    /// [`Answer::standard`]). The safety floor holds the chain to it, so a module cannot
    /// lower what the policy requires. [`TlsRequirement::STRICT`] when it is unknown.
    pub policy_tls: TlsRequirement,
}

/// The route decision headers `h` name, decoded: the route and its host target (name,
/// addresses, port, MX lookup). Compared as values, not as bytes: an SDK extension that
/// changed only the reason re-encodes every header (adding a default an earlier
/// extension left out), and was once taken for the one that chose the route. `None` when
/// the headers do not decode (the decision is then a fault).
fn route_of(
    h: &extensions::DecisionHeaders,
) -> Option<(Route, Option<altroute_policy::HostTarget>)> {
    let d = contract::decode_decision(contract::lookup(h)).ok()?;
    Some((d.route, d.host))
}

/// The value of header `k` in sorted, lower-case decision headers (empty when absent).
fn value<'h>(h: &'h extensions::DecisionHeaders, k: &str) -> &'h [u8] {
    h.iter()
        .find(|(n, _)| n == k)
        .map_or(&[][..], |(_, v)| v.as_slice())
}

/// An extension's changed decision headers `h` (the decision before it: `prev`), as the
/// relay passes them on, records and acts on them. Checked after each extension that
/// changes something, with that extension's own settings, so that a later extension's
/// change cannot carry an earlier one's decision through under its name:
/// - the policy version is the one that was asked (an extension cannot claim another);
/// - the rule names the extension (`extension:NAME`, or `extension:NAME:RULE` for
///   whatever else it holds): an audit's extension logged its bounces as
///   `tls_compliance:partners` of a forged version;
/// - a bounce this extension made stands only where the standard module bounced too or
///   the extension has `may_bounce = true`; otherwise it becomes a defer, logged and
///   counted as a floor violation.
fn police(
    h: &mut extensions::DecisionHeaders,
    prev: &extensions::DecisionHeaders,
    standard: &Decision,
    ext: &Extension,
) {
    let name = ext.name();
    fn set(h: &mut extensions::DecisionHeaders, k: &str, v: Vec<u8>) {
        match h.iter_mut().find(|(n, _)| n == k) {
            Some(e) => e.1 = v,
            None => {
                h.push((k.to_string(), v));
                h.sort();
            }
        }
    }
    set(
        h,
        contract::POLICY_VERSION,
        contract::encode_text(&standard.policy_version).into_bytes(),
    );
    let bounced =
        value(h, contract::ROUTE) == b"bounce" && value(prev, contract::ROUTE) != b"bounce";
    if bounced && standard.route != Route::Bounce && !ext.config().may_bounce {
        tracing::warn!(
            target: "altroute::decision",
            extension = %name,
            "an extension without may_bounce bounced mail the policy did not: deferred"
        );
        ext.floor_violation();
        set(h, contract::ROUTE, b"defer".to_vec());
        let reply =
            format!("451 4.7.0 held back: extension {name} would bounce this mail and may not");
        set(
            h,
            contract::REPLY,
            contract::encode_text(&reply).into_bytes(),
        );
        let reason = format!(
            "extension {name} bounced mail the policy did not bounce; deferred (may_bounce = false)"
        );
        set(
            h,
            contract::REASON,
            contract::encode_text(&reason).into_bytes(),
        );
    }
    let rule = value(h, contract::RULE).to_vec();
    let own = format!("extension:{name}");
    if !(rule == own.as_bytes() || rule.starts_with(format!("{own}:").as_bytes())) {
        // The prefix needs no escaping (a name is letters, digits, `-`, `_`, `.`), so it
        // goes in front of the value as encoded.
        let mut v = format!("{own}:").into_bytes();
        v.extend_from_slice(&rule);
        set(h, contract::RULE, v);
    }
}

/// The root id of the standard module's HTTP face.
pub const ROOT_ID: &str = "altroute.http";

/// Errors of the policy engine (loading; deciding never fails, it defers).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The policy does not compile (every diagnostic, one per line).
    #[error("policy {path} does not compile:\n{}", .errors.join("\n"))]
    Policy {
        /// The policy file.
        path: String,
        /// Every problem found.
        errors: Vec<String>,
    },
    /// The wasm host could not be set up or the module could not be loaded/configured.
    #[error("policy module: {0}")]
    Module(String),
    /// A candidate policy was refused; the active one keeps serving.
    #[error("policy candidate refused: {}", .0.join("; "))]
    Refused(Vec<String>),
}

/// What the engine needs from `[policy]` in the configuration.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// The policy: TOML source or compiled JSON (a file starting with `{`).
    pub file: PathBuf,
    /// A policy module; `None` means the built-in standard module.
    pub module: Option<PathBuf>,
    /// Budget of one decision. Defaults to 100 ms.
    pub deadline: Duration,
    /// Cap on the module's memory, bytes. Defaults to 64 MiB.
    pub memory_limit: usize,
}

impl EngineSettings {
    /// Settings for `file` with the built-in module and the default limits.
    pub fn new(file: impl Into<PathBuf>) -> Self {
        EngineSettings {
            file: file.into(),
            module: None,
            deadline: Duration::from_millis(100),
            memory_limit: 64 << 20,
        }
    }
}

/// A compiled policy ready for the module: the canonical JSON and its version.
#[derive(Debug, Clone)]
pub struct LoadedPolicy {
    /// Canonical JSON (the module's plugin configuration).
    pub json: String,
    /// The content hash.
    pub version: String,
    /// The policy's name.
    pub name: String,
}

impl LoadedPolicy {
    /// Compiles TOML (running the policy's tests) or validates compiled JSON.
    pub fn from_source(label: &str, text: &str) -> Result<LoadedPolicy, EngineError> {
        if text.trim_start().starts_with('{') {
            let policy = Policy::from_json(text.as_bytes()).map_err(|e| EngineError::Policy {
                path: label.to_string(),
                errors: vec![e.to_string()],
            })?;
            return Ok(LoadedPolicy {
                json: policy.to_json(),
                version: policy.version.clone(),
                name: policy.name.clone(),
            });
        }
        let compiled = altroute_policy::compile(text).map_err(|diags| EngineError::Policy {
            path: label.to_string(),
            errors: diags
                .iter()
                .map(|d| format!("{}: {}", d.location, d.message))
                .collect(),
        })?;
        Ok(LoadedPolicy {
            version: compiled.policy.version.clone(),
            name: compiled.policy.name.clone(),
            json: compiled.json,
        })
    }

    /// Reads and compiles a policy file.
    pub fn from_file(path: &Path) -> Result<LoadedPolicy, EngineError> {
        let text = std::fs::read_to_string(path).map_err(|source| EngineError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        LoadedPolicy::from_source(&path.display().to_string(), &text)
    }
}

/// Asks the policy module plan and verdict questions. Cheap to share (`Arc`).
pub struct PolicyEngine {
    host: Host,
    slot: PolicySlot,
    module: Arc<[u8]>,
    /// A shadow candidate that answers beside the active plugin without deciding
    /// (hot reload, `crate::reload`).
    shadow: ShadowSlot,
    faults: AtomicU64,
    decisions: AtomicU64,
    /// Extensions, in configuration order.
    extensions: Vec<Extension>,
    extension_metrics: ExtensionMetrics,
    /// The policy the active plugin was configured with, parsed once per plugin (see
    /// [`Answer::policy_tls`]). Weak: it does not keep a swapped-out plugin alive, and
    /// while it exists no other plugin can have the same address.
    /// Read on every question, written once per plugin: lock-free for the readers.
    parsed: arc_swap::ArcSwapOption<Parsed>,
}

/// A plugin and the policy its configuration holds (`None`: not a policy).
struct Parsed {
    plugin: Weak<Plugin>,
    policy: Option<Arc<Policy>>,
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("version", &self.version())
            .finish_non_exhaustive()
    }
}

impl PolicyEngine {
    /// Loads the module and policy of the relay's `[policy]` section.
    pub fn from_config(
        section: &crate::config::PolicySection,
    ) -> Result<PolicyEngine, EngineError> {
        PolicyEngine::from_settings(&EngineSettings {
            file: section.file.clone(),
            module: section.module.clone(),
            deadline: section.deadline,
            memory_limit: usize::try_from(section.memory_limit_mb)
                .unwrap_or(usize::MAX / (1 << 20))
                .saturating_mul(1 << 20),
        })
    }

    /// Loads the module and the policy named by the settings.
    pub fn from_settings(settings: &EngineSettings) -> Result<PolicyEngine, EngineError> {
        let policy = LoadedPolicy::from_file(&settings.file)?;
        let module: Vec<u8> = match &settings.module {
            None => altroute_modules::POLICY.to_vec(),
            Some(path) => std::fs::read(path).map_err(|source| EngineError::Read {
                path: path.clone(),
                source,
            })?,
        };
        let config = HostConfig {
            deadline: settings.deadline,
            memory_limit: settings.memory_limit,
            ..HostConfig::default()
        };
        PolicyEngine::new(config, module, &policy)
    }

    /// An engine running `module` (root id [`ROOT_ID`]) configured with `policy`.
    pub fn new(
        config: HostConfig,
        module: Vec<u8>,
        policy: &LoadedPolicy,
    ) -> Result<PolicyEngine, EngineError> {
        let host = Host::new(config).map_err(|e| EngineError::Module(e.to_string()))?;
        let module: Arc<[u8]> = module.into();
        let plugin = host
            .load(spec(module.clone(), policy))
            .map_err(|e| EngineError::Module(e.to_string()))?;
        tracing::info!(
            policy = %policy.name,
            version = %policy.version,
            "policy module loaded"
        );
        Ok(PolicyEngine {
            host,
            slot: PolicySlot::new(plugin),
            module,
            shadow: ShadowSlot::new(),
            faults: AtomicU64::new(0),
            decisions: AtomicU64::new(0),
            extensions: Vec::new(),
            extension_metrics: ExtensionMetrics::default(),
            parsed: arc_swap::ArcSwapOption::empty(),
        })
    }

    /// Loads `configs` (in order) as the extension chain after the standard module.
    /// Every extension that fails to load is reported.
    pub fn with_extensions(
        mut self,
        configs: &[ExtensionConfig],
    ) -> Result<PolicyEngine, EngineError> {
        let delimiter = self
            .policy_of(&self.slot.current())
            .map(|p| p.recipient_delimiter.clone())
            .unwrap_or_default();
        let mut errors = extensions::delimiter_conflicts(configs, &delimiter);
        for c in configs {
            match Extension::load(c, self.extension_metrics.clone()) {
                Ok(e) => self.extensions.push(e),
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(self)
        } else {
            Err(EngineError::Module(errors.join("; ")))
        }
    }

    /// The extension counters (register them with [`ExtensionMetrics::register`]).
    pub fn extension_metrics(&self) -> &ExtensionMetrics {
        &self.extension_metrics
    }

    /// The loaded extensions, in chain order.
    pub fn extensions(&self) -> &[Extension] {
        &self.extensions
    }

    /// Counts a safety floor violation against `module` (an extension or [`STANDARD`]).
    pub fn floor_violation(&self, module: &str) {
        self.extension_metrics.floor_violation(module);
    }

    /// The built-in standard module with a policy given as TOML or JSON text (demo, tests).
    pub fn standard(policy_text: &str) -> Result<PolicyEngine, EngineError> {
        let policy = LoadedPolicy::from_source("<inline>", policy_text)?;
        PolicyEngine::new(
            HostConfig::default(),
            altroute_modules::POLICY.to_vec(),
            &policy,
        )
    }

    /// The active policy version.
    pub fn version(&self) -> String {
        self.slot.version()
    }

    /// Policy faults since start (each one deferred a recipient).
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// Decisions asked since start (faults included).
    pub fn decisions(&self) -> u64 {
        self.decisions.load(Ordering::Relaxed)
    }

    /// Asks one question of the whole chain. Never fails: any error is a
    /// [`Decision::fault`] (defer).
    pub fn decide(&self, query: &Query) -> Decision {
        self.answer(query).decision
    }

    /// Asks one question of the whole chain: the final decision, the standard module's and
    /// who decided. Never fails.
    pub fn answer(&self, query: &Query) -> Answer {
        self.answer_on(self.slot.current(), query)
    }

    /// The active policy, to answer every question of one delivery attempt with
    /// ([`answer_async_on`](Self::answer_async_on)): a policy applied while the attempt
    /// runs applies from the next attempt on. An audit's reload between plan and verdict
    /// bounced mail that a looser policy had planned to deliver, and raised a false
    /// safety-floor alarm the other way round.
    pub fn pin(&self) -> Arc<Plugin> {
        self.slot.current()
    }

    /// [`answer`](Self::answer) by the policy `plugin` (from [`pin`](Self::pin)).
    pub fn answer_on(&self, plugin: Arc<Plugin>, query: &Query) -> Answer {
        let (standard, policy_tls, policy) = self.decide_standard(plugin, query);
        // Extension scopes match mailboxes as the policy does (`+tag` included: an audit's
        // `vip+x@` escaped a TLS-enforcing extension scoped to `vip@`). An unreadable
        // policy: `+`, the default.
        let delimiter = policy
            .as_ref()
            .map_or("+", |p| p.recipient_delimiter.as_str());
        // A fault of the standard module is final: no extension may override it.
        if self.extensions.is_empty() || standard.rule == "fault" {
            return Answer {
                decision: standard.clone(),
                standard,
                by: STANDARD.to_string(),
                may_bounce: true,
                routed_by: STANDARD.to_string(),
                policy_tls,
            };
        }
        let mut headers: extensions::DecisionHeaders = contract::encode_decision(&standard)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_bytes()))
            .collect();
        headers.sort();
        let mut by: Option<&Extension> = None;
        let mut routed_by: Option<&Extension> = None;
        // The facts as request headers: encoded once per question, when an extension
        // first needs them.
        let facts = std::cell::OnceCell::new();
        for ext in &self.extensions {
            match ext.step(query, delimiter, &facts, &headers) {
                Step::Unchanged | Step::Skipped => {}
                Step::Changed(mut h) => {
                    police(&mut h, &headers, &standard, ext);
                    if route_of(&h) != route_of(&headers) {
                        routed_by = Some(ext);
                    }
                    headers = h;
                    by = Some(ext);
                }
                Step::Fault(why) => {
                    tracing::warn!(
                        target: "altroute::decision",
                        extension = %ext.name(),
                        recipient = %query.recipient,
                        phase = %query.phase,
                        error = %why,
                        "policy extension fault: deferring"
                    );
                    let mut d = Decision::fault(&standard.policy_version, &why);
                    d.rule = format!("extension:{}:fault", ext.name());
                    return Answer {
                        decision: d,
                        standard,
                        by: ext.name().to_string(),
                        may_bounce: ext.config().may_bounce,
                        routed_by: ext.name().to_string(),
                        policy_tls,
                    };
                }
            }
        }
        let Some(ext) = by else {
            return Answer {
                decision: standard.clone(),
                standard,
                by: STANDARD.to_string(),
                may_bounce: true,
                routed_by: STANDARD.to_string(),
                policy_tls,
            };
        };
        // Decoded once, at the end; a bad decision is the fault of the last module that
        // changed it.
        let decision = match contract::decode_decision(contract::lookup(&headers)) {
            Ok(d) => d,
            Err(e) => {
                let why = format!("extension {} left no valid decision: {e}", ext.name());
                ext.fault("bad-decision", &why);
                let mut d = Decision::fault(&standard.policy_version, &why);
                d.rule = format!("extension:{}:fault", ext.name());
                d
            }
        };
        Answer {
            decision,
            standard,
            by: ext.name().to_string(),
            may_bounce: routed_by.is_none_or(|e| e.config().may_bounce),
            routed_by: routed_by.map_or_else(|| STANDARD.to_string(), |e| e.name().to_string()),
            policy_tls,
        }
    }

    /// The standard module alone (plus the shadow comparison), and the policy's own TLS
    /// requirement (see [`Answer::policy_tls`]), both from the same plugin snapshot.
    /// The standard module's decision, the compiled policy's TLS requirement, and the
    /// policy itself (`None` if it cannot be read; see [`Self::policy_of`]).
    fn decide_standard(
        &self,
        plugin: Arc<Plugin>,
        query: &Query,
    ) -> (Decision, TlsRequirement, Option<Arc<Policy>>) {
        self.decisions.fetch_add(1, Ordering::Relaxed);
        // One snapshot for the whole question: a swap meanwhile does not mix versions.
        let policy = self.policy_of(&plugin);
        let policy_tls = match &policy {
            Some(policy) => altroute_policy::decide(policy, query).tls,
            None => TlsRequirement::STRICT,
        };
        let decision = match ask(&plugin, query) {
            Ok(d) => d,
            Err(why) => {
                self.faults.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    target: "altroute::decision",
                    policy_version = %plugin.version(),
                    recipient = %query.recipient,
                    phase = %query.phase,
                    error = %why,
                    "policy fault: deferring"
                );
                Decision::fault(plugin.version(), &why)
            }
        };
        // Shadow mode: the candidate sees the same question; its answer is only compared.
        self.shadow.observe(query, &decision);
        (decision, policy_tls, policy)
    }

    /// The policy `plugin` was configured with (its plugin configuration is the compiled
    /// policy's canonical JSON), parsed once per plugin. `None` if it does not parse,
    /// which the loader and the reloader never let happen; the floor then assumes the
    /// strictest requirement.
    fn policy_of(&self, plugin: &Arc<Plugin>) -> Option<Arc<Policy>> {
        if let Some(parsed) = self.parsed.load().as_ref()
            && std::ptr::eq(parsed.plugin.as_ptr(), Arc::as_ptr(plugin))
        {
            return parsed.policy.clone();
        }
        let policy = match Policy::from_json(plugin.plugin_config()) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                tracing::error!(
                    policy_version = %plugin.version(),
                    error = %e,
                    "the policy module's configuration is not a policy: the safety floor requires verified TLS"
                );
                None
            }
        };
        self.parsed.store(Some(Arc::new(Parsed {
            plugin: Arc::downgrade(plugin),
            policy: policy.clone(),
        })));
        policy
    }

    /// The module bytes the engine started with.
    pub fn module(&self) -> Arc<[u8]> {
        self.module.clone()
    }

    /// [`decide`](Self::decide) on the blocking pool, so a slow module (up to its
    /// deadline) never stalls the async workers.
    pub async fn decide_async(self: &Arc<Self>, query: Query) -> Decision {
        self.answer_async(query).await.decision
    }

    /// [`answer`](Self::answer) on the blocking pool.
    pub async fn answer_async(self: &Arc<Self>, query: Query) -> Answer {
        self.answer_async_on(self.pin(), query).await
    }

    /// [`answer_on`](Self::answer_on) on the blocking pool.
    pub async fn answer_async_on(self: &Arc<Self>, plugin: Arc<Plugin>, query: Query) -> Answer {
        let engine = self.clone();
        let fallback = plugin.version().to_string();
        match tokio::task::spawn_blocking(move || engine.answer_on(plugin, &query)).await {
            Ok(a) => a,
            Err(e) => {
                self.faults.fetch_add(1, Ordering::Relaxed);
                let d = Decision::fault(&fallback, &format!("decision task failed: {e}"));
                Answer {
                    decision: d.clone(),
                    standard: d,
                    by: STANDARD.to_string(),
                    may_bounce: true,
                    routed_by: STANDARD.to_string(),
                    policy_tls: TlsRequirement::STRICT,
                }
            }
        }
    }

    /// Swaps in a new policy (and optionally a new module) after the candidate answered
    /// a self-test query with its own version. The active one keeps serving on failure.
    /// Returns the new version.
    pub fn reload(
        &self,
        policy: &LoadedPolicy,
        module: Option<Vec<u8>>,
    ) -> Result<String, EngineError> {
        let module: Arc<[u8]> = match module {
            Some(m) => m.into(),
            None => self.module.clone(),
        };
        let expected = policy.version.clone();
        self.slot
            .try_swap(&self.host, spec(module, policy), |candidate| {
                let probe = Query::plan("postmaster@self-test.invalid", "probe@self-test.invalid");
                match ask(candidate, &probe) {
                    Ok(d) if d.policy_version == expected => Ok(()),
                    Ok(d) => Err(vec![format!(
                        "self-test answered with version {} instead of {expected}",
                        d.policy_version
                    )]),
                    Err(e) => Err(vec![format!("self-test failed: {e}")]),
                }
            })
            .map_err(EngineError::Refused)?;
        tracing::info!(version = %expected, "policy activated");
        Ok(expected)
    }
}

/// The reloader swaps the engine's slots (`crate::reload`).
impl Target for PolicyEngine {
    fn host(&self) -> &Host {
        &self.host
    }

    fn slot(&self) -> &PolicySlot {
        &self.slot
    }

    fn shadow(&self) -> &ShadowSlot {
        &self.shadow
    }
}

fn spec(module: Arc<[u8]>, policy: &LoadedPolicy) -> PluginSpec {
    PluginSpec::new(module, ROOT_ID)
        .plugin_config(policy.json.clone().into_bytes())
        .version(policy.version.clone())
        .name(policy.name.clone())
}

/// The pseudo-headers of every routing question (one HTTP request per question).
pub const PSEUDO_HEADERS: [(&str, &[u8]); 3] = [
    (":method", b"POST"),
    (":path", b"/decide"),
    (":authority", b"altroute"),
];

/// Room for every request header of a routing question.
pub const MAX_REQUEST_HEADERS: usize = PSEUDO_HEADERS.len() + contract::FACT_HEADERS.len();

/// The request headers of the routing question `query`, as [`ask`] sends them: the
/// pseudo-headers, then the facts not at their default value (fewer headers for the host
/// to store and the module to parse, and the same query once decoded). The values are
/// encoded into `buf`; the headers are the first `n` of the array returned with `n`.
#[inline]
pub fn request_headers<'b>(
    query: &Query,
    buf: &'b mut String,
) -> ([(&'static str, &'b [u8]); MAX_REQUEST_HEADERS], usize) {
    let (facts, n) = contract::encode_query_compact_into(query, buf);
    let buf: &'b String = buf;
    let mut headers = [("", &b""[..]); MAX_REQUEST_HEADERS];
    headers[..PSEUDO_HEADERS.len()].copy_from_slice(&PSEUDO_HEADERS);
    for (slot, (name, at)) in headers[PSEUDO_HEADERS.len()..].iter_mut().zip(&facts[..n]) {
        *slot = (name, buf[at.clone()].as_bytes());
    }
    (headers, PSEUDO_HEADERS.len() + n)
}

/// One HTTP context through `plugin`; the decision headers it set, decoded.
pub fn ask(plugin: &Plugin, query: &Query) -> Result<Decision, String> {
    // Borrowed headers in, the outcome read in place: no copies on the way (the hot path
    // of every delivery; see BENCHMARKS.md, decision latency).
    let mut buf = String::with_capacity(160);
    let (headers, n) = request_headers(query, &mut buf);
    let request = HttpRequestRef {
        headers: &headers[..n],
        ..HttpRequestRef::default()
    };
    plugin
        .http_request_with(request, |outcome| {
            if outcome.reset {
                // Envoy would reset the request: no decision, and the caller defers.
                return Err("the module reset the request (no decision)".to_owned());
            }
            let decision = contract::decode_decision(contract::lookup(outcome.headers));
            let mut decision = decision.map_err(|e| match outcome.local_response {
                Some(r) => format!(
                    "no valid decision ({e}); local response {} {:?}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                ),
                None => format!("no valid decision: {e}"),
            })?;
            // A rejection may carry its SMTP reply only as the local response body.
            if decision.reply.is_none()
                && let Some(r) = outcome.local_response
                && !r.body.is_empty()
                && r.body.len() <= contract::MAX_REPLY + 2
            {
                let body = String::from_utf8_lossy(&r.body);
                let reply = body.trim();
                // Only a reply line of the decision's class (see `contract::is_reply_for`).
                if contract::is_reply_for(decision.route, reply) {
                    decision.reply = Some(reply.to_string());
                }
            }
            Ok(decision)
        })
        .map_err(|e| e.to_string())?
}
