//! Third-party policy extensions: sandboxed proxy-wasm modules chained after the standard
//! policy module, like Envoy's HTTP filter chain (docs/extensions.md).
//!
//! # Core concepts
//!
//! - [`ExtensionConfig`] is one `[[extension]]` entry of the relay configuration, checked
//!   by [`check`] with every problem reported at once.
//! - [`Extension`] is a loaded extension: its own [`Host`] (so its own deadline and memory
//!   cap), its own [`Plugin`] (pool of instances), its scope (senders, recipients), its
//!   fault state (consecutive faults, cool-down) and its metrics.
//! - [`Extension::step`] runs one routing question through the extension: the request
//!   headers are the facts (`x-altroute-*`, always the relay's own) plus the decision
//!   headers as the previous module left them; the extension may replace the decision
//!   headers. The policy engine (`crate::policy_engine`) runs the chain and decodes the
//!   final decision once.
//! - Metrics ([`ExtensionMetrics`]): `altroute_extension_decisions_total{extension}`,
//!   `altroute_extension_faults_total{extension,kind}`,
//!   `altroute_extension_changes_total{extension}`,
//!   `altroute_extension_floor_violations_total{extension}`,
//!   `altroute_extension_cooldowns_total{extension}`,
//!   `altroute_extension_skips_total{extension}`.
//!
//! # Error policy
//!
//! A trap, a deadline, a memory or host limit, an ABI violation, no free instance or a
//! decision that does not decode is a **fault**: the decision for that recipient becomes
//! [`Decision::fault`] (defer, 4xx; fail closed), naming the extension. After
//! `max_consecutive_faults` faults in a row (default 5) the extension is put in a
//! cool-down (default 30 s): it is not called at all, and every recipient in its scope
//! gets what `on_fault` says: `defer` (the default: fail closed, retried later) or `skip`
//! (the extension is bypassed; chosen explicitly by the operator for advisory
//! extensions; logged and counted, never silent). The first question after the cool-down
//! probes the extension again; a success closes the circuit. Neither outcome can
//! downgrade TLS: the safety floor (`crate::delivery::floor`) sits under the whole chain.
//!
//! # Example
//!
//! ```
//! let problems = &mut Vec::new();
//! let raw: Vec<altroute::extensions::RawExtension> = toml::from_str::<toml::Table>(r#"
//!     [[extension]]
//!     name = "finance-secure"
//!     module = "builtin:finance-secure"
//!     configuration = '{"senders": ["finance.corp.example"], "host": {"name": "secure-relay", "addresses": ["relay.example.net"]}}'
//!     deadline_ms = 20
//! "#).unwrap()["extension"].clone().try_into().unwrap();
//! let exts = altroute::extensions::check(raw, std::path::Path::new("."), problems);
//! assert!(problems.is_empty(), "{problems:?}");
//! assert_eq!(exts[0].deadline, std::time::Duration::from_millis(20));
//! assert_eq!(exts[0].memory_mb, 16);
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Deserialize;

use proxy_wasm_host::{Host, HostConfig, HttpRequest, Plugin, PluginSpec};

use altroute_policy::pattern::Pattern;
use altroute_policy::{Query, contract};

/// Default budget of one call into an extension (`deadline_ms`).
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(20);
/// Default memory cap of one extension instance, MiB (`memory_mb`).
pub const DEFAULT_MEMORY_MB: u64 = 16;
/// Default faults in a row before a cool-down (`max_consecutive_faults`).
pub const DEFAULT_MAX_CONSECUTIVE_FAULTS: u32 = 5;
/// Default cool-down (`cooldown_secs`).
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(30);
/// Default instances kept per extension (`max_instances`).
pub const DEFAULT_MAX_INSTANCES: usize = 16;

/// Modules shipped in the binary, usable as `module = "builtin:NAME"`.
pub const BUILTIN: &[(&str, &[u8])] = &[
    ("finance-secure", altroute_modules::FINANCE_SECURE),
    ("business-hours", altroute_modules::BUSINESS_HOURS),
];

/// What happens to recipients in an extension's scope while it cools down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFault {
    /// Defer them (fail closed). The default.
    Defer,
    /// Bypass the extension (its decision is not applied); logged and counted.
    Skip,
}

/// One `[[extension]]` entry as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RawExtension {
    name: Option<String>,
    module: Option<String>,
    root_id: Option<String>,
    configuration: Option<String>,
    configuration_file: Option<String>,
    deadline_ms: Option<u64>,
    memory_mb: Option<u64>,
    max_instances: Option<u64>,
    senders: Option<Vec<String>>,
    recipients: Option<Vec<String>>,
    max_consecutive_faults: Option<u32>,
    cooldown_secs: Option<u64>,
    on_fault: Option<OnFault>,
    may_bounce: Option<bool>,
}

/// Where an extension's module comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSource {
    /// A `.wasm` file.
    File(PathBuf),
    /// A module shipped in the binary ([`BUILTIN`]).
    Builtin(String),
}

/// One validated `[[extension]]`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ExtensionConfig {
    /// Unique name; used in metrics, logs and `rule`s. Required.
    pub name: String,
    /// The module. Required.
    pub module: ModuleSource,
    /// Root id of the HTTP root. Defaults to the empty string (the SDK's single root).
    pub root_id: String,
    /// Plugin configuration (`configuration`, or the content of `configuration_file`).
    /// Defaults to empty.
    pub configuration: Vec<u8>,
    /// Budget of one call. Defaults to 20 ms ([`DEFAULT_DEADLINE`]).
    pub deadline: Duration,
    /// Memory cap of one instance, MiB. Defaults to 16 ([`DEFAULT_MEMORY_MB`]).
    pub memory_mb: u64,
    /// Instances kept (idle + busy). Defaults to 16.
    pub max_instances: usize,
    /// Only mail from these senders (address patterns). Defaults to every sender.
    pub senders: Vec<Pattern>,
    /// Only mail to these recipients (address patterns). Defaults to every recipient.
    pub recipients: Vec<Pattern>,
    /// Faults in a row before a cool-down. Defaults to 5.
    pub max_consecutive_faults: u32,
    /// Length of a cool-down. Defaults to 30 s.
    pub cooldown: Duration,
    /// What a cool-down does to recipients in scope. Defaults to [`OnFault::Defer`].
    pub on_fault: OnFault,
    /// Whether the extension may bounce mail that the standard module did not bounce.
    /// Defaults to `false`: such a bounce is deferred instead (a bounce is final, and the
    /// policy promises that mail it holds back for TLS is deferred, never bounced, unless
    /// it says so itself).
    pub may_bounce: bool,
}

impl ExtensionConfig {
    /// An extension running `module` with `configuration` and every default.
    pub fn new(name: &str, module: ModuleSource, configuration: impl Into<Vec<u8>>) -> Self {
        ExtensionConfig {
            name: name.to_string(),
            module,
            root_id: String::new(),
            configuration: configuration.into(),
            deadline: DEFAULT_DEADLINE,
            memory_mb: DEFAULT_MEMORY_MB,
            max_instances: DEFAULT_MAX_INSTANCES,
            senders: Vec::new(),
            recipients: Vec::new(),
            max_consecutive_faults: DEFAULT_MAX_CONSECUTIVE_FAULTS,
            cooldown: DEFAULT_COOLDOWN,
            on_fault: OnFault::Defer,
            may_bounce: false,
        }
    }

    /// Whether a question about this mail goes to the extension. Addresses match as the
    /// policy matches them, its recipient `delimiter` included (`vip@x` covers
    /// `vip+tag@x`).
    pub fn in_scope(&self, query: &Query, delimiter: &str) -> bool {
        let any = |patterns: &[Pattern], address: &str| {
            patterns.is_empty()
                || patterns
                    .iter()
                    .any(|p| p.matches_mailbox(address, delimiter))
        };
        any(&self.senders, &query.sender) && any(&self.recipients, &query.recipient)
    }
}

/// The shipped extensions that match senders themselves (`builtin:finance-secure`) do so
/// with a `recipient_delimiter` of their own configuration (`+` by default); it must be
/// the policy's, or a sender tagged with the other escapes them (an audit's `cfo-x@`
/// went out in clear text under a `+-` policy). Each disagreement, for `policy_delimiter`.
pub fn delimiter_conflicts(configs: &[ExtensionConfig], policy_delimiter: &str) -> Vec<String> {
    configs
        .iter()
        .filter(|c| matches!(&c.module, ModuleSource::Builtin(b) if b == "finance-secure"))
        .filter_map(|c| {
            let own = serde_json::from_slice::<serde_json::Value>(&c.configuration)
                .ok()?
                .get("recipient_delimiter")
                .map_or(Some("+".to_string()), |v| v.as_str().map(str::to_string))?;
            (own != policy_delimiter).then(|| {
                format!(
                    "extension {}: its recipient_delimiter {own:?} is not the policy's {policy_delimiter:?} (a sender tagged with one and not the other would escape it)",
                    c.name
                )
            })
        })
        .collect()
}

/// Validates every `[[extension]]` entry; problems are appended (each names
/// `extension[i].key`). `base` resolves relative paths.
pub fn check(
    raw: Vec<RawExtension>,
    base: &Path,
    problems: &mut Vec<String>,
) -> Vec<ExtensionConfig> {
    let resolve = |s: &str| {
        let p = Path::new(s);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    let mut out = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let key = |k: &str| format!("extension[{i}].{k}");
        let before = problems.len();
        let name = r.name.unwrap_or_default();
        if name.is_empty() {
            problems.push(format!("{}: required", key("name")));
        } else if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            problems.push(format!(
                "{}: {name:?} may only hold letters, digits, '-', '_' and '.'",
                key("name")
            ));
        } else if names.contains(&name) {
            problems.push(format!("{}: {name:?} is used twice", key("name")));
        }
        names.push(name.clone());
        let module = match r.module.as_deref() {
            None => {
                problems.push(format!(
                    "{}: required (a .wasm file or builtin:NAME)",
                    key("module")
                ));
                None
            }
            Some(m) => match m.strip_prefix("builtin:") {
                Some(b) if BUILTIN.iter().any(|(n, _)| *n == b) => {
                    Some(ModuleSource::Builtin(b.to_string()))
                }
                Some(b) => {
                    let known: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
                    problems.push(format!(
                        "{}: no built-in module {b:?} (known: {})",
                        key("module"),
                        known.join(", ")
                    ));
                    None
                }
                None => {
                    let path = resolve(m);
                    match std::fs::metadata(&path) {
                        Ok(md) if md.is_file() => Some(ModuleSource::File(path)),
                        Ok(_) => {
                            problems.push(format!(
                                "{}: {} is not a regular file",
                                key("module"),
                                path.display()
                            ));
                            None
                        }
                        Err(e) => {
                            problems.push(format!("{}: {}: {e}", key("module"), path.display()));
                            None
                        }
                    }
                }
            },
        };
        let configuration = match (r.configuration, r.configuration_file) {
            (Some(_), Some(_)) => {
                problems.push(format!(
                    "{}: give configuration or configuration_file, not both",
                    key("configuration")
                ));
                Vec::new()
            }
            (Some(c), None) => c.into_bytes(),
            (None, Some(f)) => {
                let path = resolve(&f);
                std::fs::read(&path).unwrap_or_else(|e| {
                    problems.push(format!(
                        "{}: {}: {e}",
                        key("configuration_file"),
                        path.display()
                    ));
                    Vec::new()
                })
            }
            (None, None) => Vec::new(),
        };
        let mut positive = |k: &str, v: Option<u64>, default: u64| match v {
            Some(0) => {
                problems.push(format!("{}: must be greater than 0", key(k)));
                default
            }
            Some(v) => v,
            None => default,
        };
        let deadline_ms = positive(
            "deadline_ms",
            r.deadline_ms,
            DEFAULT_DEADLINE.as_millis() as u64,
        );
        let memory_mb = positive("memory_mb", r.memory_mb, DEFAULT_MEMORY_MB);
        let max_instances = positive(
            "max_instances",
            r.max_instances,
            DEFAULT_MAX_INSTANCES as u64,
        );
        let max_faults = positive(
            "max_consecutive_faults",
            r.max_consecutive_faults.map(u64::from),
            u64::from(DEFAULT_MAX_CONSECUTIVE_FAULTS),
        );
        let cooldown_secs = positive("cooldown_secs", r.cooldown_secs, DEFAULT_COOLDOWN.as_secs());
        if deadline_ms > 10_000 {
            problems.push(format!(
                "{}: at most 10000 (a decision must not stall delivery)",
                key("deadline_ms")
            ));
        }
        if memory_mb > 4096 {
            problems.push(format!(
                "{}: at most 4096 (wasm32 addresses 4 GiB)",
                key("memory_mb")
            ));
        }
        let mut patterns = |k: &str, list: Option<Vec<String>>| -> Vec<Pattern> {
            list.unwrap_or_default()
                .iter()
                .enumerate()
                .filter_map(|(j, s)| match Pattern::parse(s) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        problems.push(format!("{}[{j}]: {e}", key(k)));
                        None
                    }
                })
                .collect()
        };
        let senders = patterns("senders", r.senders);
        let recipients = patterns("recipients", r.recipients);
        if problems.len() > before {
            continue;
        }
        let Some(module) = module else { continue };
        out.push(ExtensionConfig {
            name,
            module,
            root_id: r.root_id.unwrap_or_default(),
            configuration,
            deadline: Duration::from_millis(deadline_ms),
            memory_mb,
            max_instances: usize::try_from(max_instances).unwrap_or(DEFAULT_MAX_INSTANCES),
            senders,
            recipients,
            max_consecutive_faults: u32::try_from(max_faults).unwrap_or(u32::MAX),
            cooldown: Duration::from_secs(cooldown_secs),
            on_fault: r.on_fault.unwrap_or(OnFault::Defer),
            may_bounce: r.may_bounce.unwrap_or(false),
        });
    }
    out
}

/// The extension counters, shared by every extension of an engine (label `extension`).
#[derive(Debug, Clone, Default)]
pub struct ExtensionMetrics {
    /// Questions answered by an extension (faults included).
    pub decisions: Family<Vec<(String, String)>, Counter>,
    /// Faults by kind: trap, deadline, memory, limit, abi, unavailable, bad-decision.
    pub faults: Family<Vec<(String, String)>, Counter>,
    /// Answers that changed the decision.
    pub changes: Family<Vec<(String, String)>, Counter>,
    /// Decisions refused by the safety floor, by the module that made them.
    pub floor_violations: Family<Vec<(String, String)>, Counter>,
    /// Cool-downs started.
    pub cooldowns: Family<Vec<(String, String)>, Counter>,
    /// Questions not asked during a cool-down with `on_fault = "skip"`.
    pub skips: Family<Vec<(String, String)>, Counter>,
}

fn label(name: &str) -> Vec<(String, String)> {
    vec![("extension".to_string(), name.to_string())]
}

impl ExtensionMetrics {
    /// Registers every family (names `altroute_extension_*_total` in the relay's registry).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "extension_decisions",
            "Questions answered by each policy extension",
            self.decisions.clone(),
        );
        registry.register(
            "extension_faults",
            "Policy extension faults by kind (each deferred the recipient)",
            self.faults.clone(),
        );
        registry.register(
            "extension_changes",
            "Decisions changed by each policy extension",
            self.changes.clone(),
        );
        registry.register(
            "extension_floor_violations",
            "Decisions of each module refused by the relay's TLS safety floor",
            self.floor_violations.clone(),
        );
        registry.register(
            "extension_cooldowns",
            "Cool-downs of policy extensions after repeated faults",
            self.cooldowns.clone(),
        );
        registry.register(
            "extension_skips",
            "Questions that bypassed an extension in cool-down (on_fault = skip)",
            self.skips.clone(),
        );
    }

    /// A counter's value (tests, benchmarks). `kind` only for `faults`.
    pub fn get(
        family: &Family<Vec<(String, String)>, Counter>,
        extension: &str,
        kind: Option<&str>,
    ) -> u64 {
        let mut l = label(extension);
        if let Some(k) = kind {
            l.push(("kind".to_string(), k.to_string()));
        }
        family.get_or_create(&l).get()
    }

    /// Counts a safety floor violation of `module`.
    pub fn floor_violation(&self, module: &str) {
        self.floor_violations.get_or_create(&label(module)).inc();
    }
}

/// The decision headers, by lower-case name, sorted: what a module hands to the next.
pub type DecisionHeaders = Vec<(String, Vec<u8>)>;

/// What one extension did with one question.
#[derive(Debug)]
pub enum Step {
    /// Out of scope, or it left the decision as it was.
    Unchanged,
    /// It replaced the decision headers.
    Changed(DecisionHeaders),
    /// A fault: defer (the reason names the extension and the kind).
    Fault(String),
    /// In cool-down with `on_fault = "skip"`: bypassed.
    Skipped,
}

/// A loaded extension.
pub struct Extension {
    config: ExtensionConfig,
    // Keeps the ticker of this extension's deadline running.
    _host: Host,
    plugin: Arc<Plugin>,
    metrics: ExtensionMetrics,
    consecutive: AtomicU32,
    cooldown_until: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Extension {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extension")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

impl Extension {
    /// Compiles, instantiates and configures the extension in its own host.
    pub fn load(config: &ExtensionConfig, metrics: ExtensionMetrics) -> Result<Extension, String> {
        let module: Arc<[u8]> = match &config.module {
            ModuleSource::File(p) => std::fs::read(p)
                .map_err(|e| format!("extension {}: {}: {e}", config.name, p.display()))?
                .into(),
            ModuleSource::Builtin(b) => BUILTIN
                .iter()
                .find(|(n, _)| n == b)
                .map(|(_, bytes)| Arc::<[u8]>::from(*bytes))
                .ok_or_else(|| format!("extension {}: no built-in module {b}", config.name))?,
        };
        let host_config = HostConfig {
            deadline: config.deadline,
            memory_limit: usize::try_from(config.memory_mb)
                .unwrap_or(4096)
                .saturating_mul(1 << 20),
            max_instances: config.max_instances,
            // Two are enough to start; more are built on demand up to max_instances.
            warm_instances: 2.min(config.max_instances),
            ..HostConfig::default()
        };
        let host = Host::new(host_config).map_err(|e| format!("extension {}: {e}", config.name))?;
        let spec = PluginSpec::new(module, config.root_id.clone())
            .plugin_config(config.configuration.clone())
            .name(config.name.clone())
            .version(format!("extension:{}", config.name));
        let plugin = host
            .load(spec)
            .map_err(|e| format!("extension {}: {e}", config.name))?;
        // Every series exists from the start (a scrape shows 0, not nothing).
        let l = label(&config.name);
        for family in [
            &metrics.decisions,
            &metrics.changes,
            &metrics.floor_violations,
            &metrics.cooldowns,
            &metrics.skips,
        ] {
            let _ = family.get_or_create(&l);
        }
        tracing::info!(extension = %config.name, deadline_ms = config.deadline.as_millis() as u64, memory_mb = config.memory_mb, "policy extension loaded");
        Ok(Extension {
            config: config.clone(),
            _host: host,
            plugin,
            metrics,
            consecutive: AtomicU32::new(0),
            cooldown_until: Mutex::new(None),
        })
    }

    /// Counts a safety floor violation of this extension.
    pub fn floor_violation(&self) {
        self.metrics.floor_violation(&self.config.name);
    }

    /// The extension's name (its `[[extension]]` name).
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Its configuration.
    pub fn config(&self) -> &ExtensionConfig {
        &self.config
    }

    fn cooling(&self) -> bool {
        let mut until = self
            .cooldown_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match *until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                // Over: the next question probes the extension (half-open).
                *until = None;
                false
            }
            None => false,
        }
    }

    /// Records a fault of `kind`; starts a cool-down after too many in a row.
    pub fn fault(&self, kind: &str, why: &str) {
        let mut l = label(&self.config.name);
        l.push(("kind".to_string(), kind.to_string()));
        self.metrics.faults.get_or_create(&l).inc();
        let n = self
            .consecutive
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        tracing::warn!(target: "altroute::decision", extension = %self.config.name, kind, consecutive = n, error = %why, "policy extension fault: deferring");
        if n >= self.config.max_consecutive_faults {
            let mut until = self
                .cooldown_until
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if until.is_none() {
                *until = Some(Instant::now() + self.config.cooldown);
                self.metrics
                    .cooldowns
                    .get_or_create(&label(&self.config.name))
                    .inc();
                tracing::error!(
                    extension = %self.config.name,
                    consecutive = n,
                    cooldown_secs = self.config.cooldown.as_secs(),
                    on_fault = ?self.config.on_fault,
                    "policy extension put in cool-down"
                );
            }
        }
    }

    /// One question: `facts` holds the question's request headers once encoded (shared by
    /// the chain), `decision` the decision so far (headers as the previous module left
    /// them).
    pub fn step(
        &self,
        query: &Query,
        delimiter: &str,
        facts: &std::cell::OnceCell<Vec<(String, Vec<u8>)>>,
        decision: &DecisionHeaders,
    ) -> Step {
        if !self.config.in_scope(query, delimiter) {
            return Step::Unchanged;
        }
        if self.cooling() {
            return match self.config.on_fault {
                OnFault::Defer => Step::Fault(format!(
                    "extension {} is in cool-down after repeated faults",
                    self.config.name
                )),
                OnFault::Skip => {
                    self.metrics
                        .skips
                        .get_or_create(&label(&self.config.name))
                        .inc();
                    tracing::warn!(target: "altroute::decision", extension = %self.config.name, recipient = %query.recipient, "policy extension in cool-down: skipped (on_fault = skip)");
                    Step::Skipped
                }
            };
        }
        self.metrics
            .decisions
            .get_or_create(&label(&self.config.name))
            .inc();
        let mut headers = facts.get_or_init(|| request_headers(query)).clone();
        headers.extend(decision.iter().cloned());
        let outcome = match self.plugin.http_request(&HttpRequest {
            headers,
            ..HttpRequest::default()
        }) {
            Ok(o) => o,
            Err(e) => {
                let kind = fault_kind(&e);
                let why = format!("extension {}: {e}", self.config.name);
                self.fault(kind, &why);
                return Step::Fault(why);
            }
        };
        if outcome.reset {
            // Envoy would reset the request: no answer, a fault like a trap.
            let why = format!(
                "extension {}: the module reset the request",
                self.config.name
            );
            self.fault("reset", &why);
            return Step::Fault(why);
        }
        let mut out = decision_headers(&outcome.headers);
        // A refusal may carry its SMTP reply only as the local response body (one that
        // cannot be a reply line is left out here; the decision's decoding checks the rest).
        if let Some(r) = &outcome.local_response
            && !r.body.is_empty()
            && r.body.len() <= contract::MAX_REPLY + 2
            && !out.iter().any(|(k, _)| k == contract::REPLY)
        {
            let body = String::from_utf8_lossy(&r.body);
            out.push((
                contract::REPLY.to_string(),
                contract::encode_text(body.trim()).into_bytes(),
            ));
            out.sort();
        }
        self.consecutive.store(0, Ordering::Relaxed);
        if &out == decision {
            Step::Unchanged
        } else {
            self.metrics
                .changes
                .get_or_create(&label(&self.config.name))
                .inc();
            Step::Changed(out)
        }
    }
}

/// The request a module sees: pseudo-headers and the facts (always the relay's own; a
/// module cannot change the facts the next one sees).
pub fn request_headers(query: &Query) -> Vec<(String, Vec<u8>)> {
    let mut headers: Vec<(String, Vec<u8>)> = crate::policy_engine::PSEUDO_HEADERS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect();
    headers.extend(
        contract::encode_query(query)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_bytes())),
    );
    headers
}

/// The decision headers among `headers` (lower-case names, sorted).
pub fn decision_headers(headers: &[(String, Vec<u8>)]) -> DecisionHeaders {
    let mut out: DecisionHeaders = headers
        .iter()
        .filter_map(|(k, v)| {
            contract::decision_header(k.as_bytes()).map(|d| (d.to_string(), v.clone()))
        })
        .collect();
    out.sort();
    out
}

/// The metrics label of a runtime error.
pub fn fault_kind(e: &proxy_wasm_host::Error) -> &'static str {
    use proxy_wasm_host::Error;
    match e {
        Error::Trap { .. } => "trap",
        Error::Deadline { .. } => "deadline",
        Error::MemoryLimit { .. } => "memory",
        Error::Limit { .. } => "limit",
        Error::Guest { .. } => "abi",
        Error::Unavailable(_) => "unavailable",
        _ => "other",
    }
}
