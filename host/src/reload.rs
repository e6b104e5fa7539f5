//! Policy hot reload: versioned, gated, audited, reversible.
//!
//! # Core concepts
//!
//! - [`Reloader`] owns the activation pipeline, whatever the candidate's source (admin
//!   API, file watch, SIGHUP, CLI): compile the candidate ([`altroute_policy::compile`] or
//!   [`Policy::from_json`], which run the embedded tests natively), load it into a fresh
//!   plugin off the hot path, run every embedded test **through the candidate plugin**
//!   (encode the query, one HTTP context, decode, [`altroute_policy::compare`]) and only
//!   then swap it into the [`PolicySlot`]. A candidate that fails any step is not
//!   activated: the active version keeps serving and the reasons go to the log, the
//!   audit log ([`crate::audit`]) and [`Status::last_rejection`].
//! - A bounded history (default 10 versions) allows [`Reloader::rollback`].
//! - Shadow mode ([`Reloader::start_shadow`]): a candidate plugin answers every live
//!   question next to the active one without deciding ([`ShadowSlot::observe`]); each
//!   difference is logged (target `altroute::shadow`), counted and kept (the last 20).
//! - Sources: [`watch`] (the `notify` crate on the parent directories of the policy and
//!   module files, so the Kubernetes ConfigMap symlink swap is seen; re-reads the
//!   resolved files and acts only when their content hash changed; debounced, 100 ms by
//!   default) and [`sighup`].
//! - [`Target`] is what the reloader swaps: the relay's policy engine implements it.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use altroute::reload::{Candidate, Reloader, ReloadSettings, Target, Who};
//!
//! fn apply(target: Arc<dyn Target>, initial: altroute_policy::Policy, toml: &str) {
//!     let settings = ReloadSettings::new("/var/spool/altroute/audit.jsonl");
//!     let module: Arc<[u8]> = altroute_modules::POLICY.into();
//!     let reloader = Reloader::new(target, initial, module, settings).unwrap();
//!     match reloader.apply(&Who::Cli, Candidate::policy(toml)) {
//!         Ok(applied) => println!("active: {}", applied.new_version),
//!         Err(e) => println!("refused, still serving {}: {e}", reloader.version()),
//!     }
//! }
//! ```

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use notify::Watcher as _;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use proxy_wasm_host::{Host, HttpRequest, Plugin, PluginSpec, PolicySlot};

use altroute_policy::{Decision, Policy, Query, ResultType, Route, TlsRequirement, contract};

use crate::audit::{self, AuditError, AuditLog, Entry};

/// The root id of the standard module's HTTP face, the one the reloader loads.
pub const ROOT_ID: &str = "altroute.http";

/// Versions kept for rollback, the active one included. Default of [`ReloadSettings`].
pub const DEFAULT_HISTORY: usize = 10;

/// Differences kept by a shadow. Default of [`ReloadSettings`].
pub const DEFAULT_SHADOW_KEEP: usize = 20;

/// What the reloader swaps: the active slot, the shadow slot and the host that loads
/// candidates. The relay's `PolicyEngine` implements it.
pub trait Target: Send + Sync {
    /// The proxy-wasm host that loads candidates (same limits as the active plugin).
    fn host(&self) -> &Host;
    /// The active plugin's slot.
    fn slot(&self) -> &PolicySlot;
    /// The shadow slot, consulted on every decision.
    fn shadow(&self) -> &ShadowSlot;
}

/// Who asked for a change; recorded in the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// The admin API, with the identity it was given (`x-altroute-who`).
    Admin(String),
    /// The file watcher.
    FileWatch,
    /// SIGHUP.
    Sighup,
    /// The command line.
    Cli,
    /// The relay starting.
    Startup,
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Admin(id) => write!(f, "admin:{id}"),
            Who::FileWatch => f.write_str("file watch"),
            Who::Sighup => f.write_str("sighup"),
            Who::Cli => f.write_str("cli"),
            Who::Startup => f.write_str("startup"),
        }
    }
}

/// A candidate: policy (TOML or compiled JSON) and optionally a new module.
#[derive(Debug, Clone, Default)]
pub struct Candidate {
    /// Policy TOML, or compiled JSON (text starting with `{`).
    pub policy: Vec<u8>,
    /// A new module; `None` keeps the active one.
    pub module: Option<Vec<u8>>,
}

impl Candidate {
    /// A policy-only candidate.
    pub fn policy(text: impl Into<Vec<u8>>) -> Candidate {
        Candidate {
            policy: text.into(),
            module: None,
        }
    }

    /// SHA-256 (hex) of the policy and module bytes, to notice real changes.
    pub fn content_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update((self.policy.len() as u64).to_be_bytes());
        h.update(&self.policy);
        if let Some(m) = &self.module {
            h.update(m);
        }
        hex(&h.finalize())
    }
}

/// Settings of a [`Reloader`].
#[derive(Debug, Clone)]
pub struct ReloadSettings {
    /// The audit log (JSON lines). The relay defaults it to `<spool dir>/audit.jsonl`.
    pub audit_log: PathBuf,
    /// Versions kept, the active one included. Defaults to 10 (at least 1).
    pub history: usize,
    /// Differences a shadow keeps for the status. Defaults to 20.
    pub shadow_keep: usize,
}

impl ReloadSettings {
    /// Defaults with the audit log at `audit_log`.
    pub fn new(audit_log: impl Into<PathBuf>) -> ReloadSettings {
        ReloadSettings {
            audit_log: audit_log.into(),
            history: DEFAULT_HISTORY,
            shadow_keep: DEFAULT_SHADOW_KEEP,
        }
    }
}

/// Errors of the reloader.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The candidate was refused; the active version keeps serving.
    #[error("candidate refused ({}): {}", .0.version.as_deref().unwrap_or("no version"), .0.reasons.join("; "))]
    Refused(Rejection),
    /// Rollback with no earlier version in the history.
    #[error("no earlier version to roll back to")]
    NoHistory,
    /// No shadow is running.
    #[error("no shadow candidate is running")]
    NoShadow,
    /// The audit log could not be opened or written.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// A policy or module file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file watcher could not be set up.
    #[error("cannot watch {path}: {source}")]
    Watch {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: notify::Error,
    },
}

/// A refused candidate.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Rejection {
    /// When (RFC 3339 UTC).
    pub time: String,
    /// Who proposed it.
    pub who: String,
    /// Its version, when it compiled far enough to have one.
    pub version: Option<String>,
    /// Every reason.
    pub reasons: Vec<String>,
}

/// A successful [`Reloader::apply`] or [`Reloader::rollback`].
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    /// The version serving before.
    pub old_version: String,
    /// The version serving now.
    pub new_version: String,
    /// False when the candidate was the active version already (nothing swapped).
    pub changed: bool,
    /// What changed ([`audit::summarize`], plus `module` when the module changed).
    pub summary: Value,
}

/// One version in the history.
#[derive(Debug, Clone, Serialize)]
pub struct VersionInfo {
    /// The policy version (content hash).
    pub version: String,
    /// The policy's name.
    pub name: String,
    /// SHA-256 (first 16 hex digits) of the module.
    pub module: String,
    /// When it was activated (RFC 3339 UTC).
    pub activated: String,
    /// Who activated it.
    pub who: String,
}

/// What `GET /policy` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The active version.
    pub active: VersionInfo,
    /// The history, newest first (the active version first).
    pub history: Vec<VersionInfo>,
    /// The last refused candidate.
    pub last_rejection: Option<Rejection>,
    /// Activations since start (rollbacks included).
    pub activations: u64,
    /// Refused candidates since start.
    pub rejections: u64,
    /// The running shadow.
    pub shadow: Option<ShadowStatus>,
    /// The audit log: path, last sequence number and hash, and the last write error.
    pub audit: AuditStatus,
}

/// The audit log's state in [`Status`].
#[derive(Debug, Clone, Serialize)]
pub struct AuditStatus {
    /// The file.
    pub path: PathBuf,
    /// The last line's sequence number.
    pub seq: u64,
    /// The last line's hash (compare with a later `audit verify` to notice a cut tail).
    pub head: String,
    /// The last write error, if any (the change it was about did happen).
    pub error: Option<String>,
}

struct Version {
    policy: Policy,
    json: String,
    module: Arc<[u8]>,
    info: VersionInfo,
}

struct State {
    /// Oldest first; the back is the active version.
    history: VecDeque<Arc<Version>>,
    last_rejection: Option<Rejection>,
    activations: u64,
    rejections: u64,
    audit: AuditLog,
    audit_error: Option<String>,
}

/// Owns the activation pipeline. Methods block (compiling a module takes a while): call
/// them from a blocking thread (`tokio::task::spawn_blocking`).
pub struct Reloader {
    target: Arc<dyn Target>,
    settings: ReloadSettings,
    /// One change at a time; held across the whole pipeline so that the history, the
    /// slot and the audit log agree.
    state: Mutex<State>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("version", &self.version())
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// A reloader for `target`, whose slot serves `initial` on `module`. Opens the audit
    /// log and records the start-up version (`who: "startup"`, `action: "start"`).
    pub fn new(
        target: Arc<dyn Target>,
        initial: Policy,
        module: Arc<[u8]>,
        settings: ReloadSettings,
    ) -> Result<Reloader, ReloadError> {
        let mut audit = AuditLog::open(&settings.audit_log)?;
        let json = initial.to_json();
        let version = Arc::new(Version {
            info: info(&initial, &module, &Who::Startup),
            policy: initial,
            json,
            module,
        });
        let previous = last_new_version(&settings.audit_log);
        audit.append(
            Entry::new(Who::Startup.to_string(), "start")
                .versions(previous.as_deref(), Some(&version.info.version))
                .summary(json!({ "module": version.info.module })),
        )?;
        let mut history = VecDeque::new();
        history.push_back(version);
        Ok(Reloader {
            target,
            settings,
            state: Mutex::new(State {
                history,
                last_rejection: None,
                activations: 0,
                rejections: 0,
                audit,
                audit_error: None,
            }),
        })
    }

    /// The active version.
    pub fn version(&self) -> String {
        self.target.slot().version()
    }

    /// Compiles, loads, self-tests and activates `candidate`. On any failure the active
    /// version keeps serving and the reasons are logged, audited and kept for the status.
    pub fn apply(&self, who: &Who, candidate: Candidate) -> Result<Applied, ReloadError> {
        let mut state = self.lock();
        let Some(active) = state.history.back().cloned() else {
            return Err(ReloadError::NoHistory);
        };
        let module: Arc<[u8]> = match candidate.module {
            Some(m) => m.into(),
            None => active.module.clone(),
        };
        let (policy, json) = match prepare(&candidate.policy) {
            Ok(p) => p,
            Err(reasons) => {
                return Err(self.reject(&mut state, who, "reject", &active, None, reasons));
            }
        };
        if policy.version == active.info.version && *module == *active.module {
            return Ok(Applied {
                old_version: active.info.version.clone(),
                new_version: policy.version,
                changed: false,
                summary: json!({}),
            });
        }
        let spec = spec(module.clone(), &policy, &json);
        let result = self
            .target
            .slot()
            .try_swap(self.target.host(), spec, |plugin| self_test(plugin, &policy));
        match result {
            Ok(_previous) => {
                let next = Arc::new(Version {
                    info: info(&policy, &module, who),
                    policy,
                    json,
                    module,
                });
                Ok(self.activated(&mut state, who, "activate", &active, next, true))
            }
            Err(reasons) => {
                let version = Some(policy.version.clone());
                Err(self.reject(&mut state, who, "reject", &active, version, reasons))
            }
        }
    }

    /// Returns to the version before the active one (re-loaded and self-tested again).
    /// The active version leaves the history, so rolling back twice goes two back.
    pub fn rollback(&self, who: &Who) -> Result<Applied, ReloadError> {
        let mut state = self.lock();
        if state.history.len() < 2 {
            return Err(ReloadError::NoHistory);
        }
        let (Some(active), Some(previous)) = (
            state.history.back().cloned(),
            state.history.get(state.history.len() - 2).cloned(),
        ) else {
            return Err(ReloadError::NoHistory);
        };
        let spec = spec(previous.module.clone(), &previous.policy, &previous.json);
        let policy = previous.policy.clone();
        let result = self
            .target
            .slot()
            .try_swap(self.target.host(), spec, |plugin| self_test(plugin, &policy));
        match result {
            Ok(_) => {
                state.history.pop_back();
                state.history.pop_back();
                let mut info = previous.info.clone();
                info.activated = audit::rfc3339(SystemTime::now());
                info.who = who.to_string();
                let next = Arc::new(Version {
                    policy: previous.policy.clone(),
                    json: previous.json.clone(),
                    module: previous.module.clone(),
                    info,
                });
                Ok(self.activated(&mut state, who, "rollback", &active, next, false))
            }
            Err(reasons) => {
                let version = Some(previous.info.version.clone());
                Err(self.reject(&mut state, who, "reject", &active, version, reasons))
            }
        }
    }

    /// Starts shadow mode with `candidate` (replacing any running shadow): it is compiled,
    /// loaded and self-tested like an activation, then answers every live question beside
    /// the active version without deciding. Returns the shadow's version.
    pub fn start_shadow(&self, who: &Who, candidate: Candidate) -> Result<String, ReloadError> {
        let mut state = self.lock();
        let Some(active) = state.history.back().cloned() else {
            return Err(ReloadError::NoHistory);
        };
        let module: Arc<[u8]> = match candidate.module {
            Some(m) => m.into(),
            None => active.module.clone(),
        };
        let (policy, json) = match prepare(&candidate.policy) {
            Ok(p) => p,
            Err(reasons) => {
                return Err(self.reject(&mut state, who, "shadow-reject", &active, None, reasons));
            }
        };
        let loaded = self
            .target
            .host()
            .load(spec(module.clone(), &policy, &json))
            .map_err(|e| vec![format!("candidate {}: {e}", policy.version)])
            .and_then(|plugin| self_test(&plugin, &policy).map(|()| plugin));
        let plugin = match loaded {
            Ok(p) => p,
            Err(reasons) => {
                let version = Some(policy.version.clone());
                return Err(self.reject(
                    &mut state,
                    who,
                    "shadow-reject",
                    &active,
                    version,
                    reasons,
                ));
            }
        };
        let mut summary = audit::summarize(&active.policy, &policy);
        note_module(&mut summary, &active.module, &module);
        let shadow = Arc::new(Shadow::new(plugin, self.settings.shadow_keep));
        if let Some(old) = self.target.shadow().set(Some(shadow)) {
            tracing::info!(target: "altroute::shadow", version = %old.version(), "shadow replaced");
        }
        tracing::info!(
            target: "altroute::shadow",
            active = %active.info.version,
            shadow = %policy.version,
            who = %who,
            "shadow started"
        );
        self.audit(
            &mut state,
            Entry::new(who.to_string(), "shadow-start")
                .versions(Some(&active.info.version), Some(&policy.version))
                .summary(summary),
        );
        Ok(policy.version)
    }

    /// Stops shadow mode; returns the shadow's final figures.
    pub fn stop_shadow(&self, who: &Who) -> Result<ShadowStatus, ReloadError> {
        let mut state = self.lock();
        let Some(shadow) = self.target.shadow().set(None) else {
            return Err(ReloadError::NoShadow);
        };
        let status = shadow.status();
        tracing::info!(
            target: "altroute::shadow",
            shadow = %status.version,
            decisions = status.decisions,
            differences = status.differences,
            who = %who,
            "shadow stopped"
        );
        let active = state
            .history
            .back()
            .map(|v| v.info.version.clone())
            .unwrap_or_default();
        self.audit(
            &mut state,
            Entry::new(who.to_string(), "shadow-stop")
                .versions(Some(&active), Some(&status.version))
                .summary(json!({
                    "decisions": status.decisions,
                    "differences": status.differences,
                })),
        );
        Ok(status)
    }

    /// The state for `GET /policy`.
    pub fn status(&self) -> Status {
        let state = self.lock();
        let history: Vec<VersionInfo> =
            state.history.iter().rev().map(|v| v.info.clone()).collect();
        let (seq, head) = state.audit.head();
        Status {
            active: history.first().cloned().unwrap_or_else(|| VersionInfo {
                version: self.version(),
                name: String::new(),
                module: String::new(),
                activated: String::new(),
                who: String::new(),
            }),
            history,
            last_rejection: state.last_rejection.clone(),
            activations: state.activations,
            rejections: state.rejections,
            shadow: self.target.shadow().current().map(|s| s.status()),
            audit: AuditStatus {
                path: state.audit.path().to_path_buf(),
                seq,
                head: head.to_string(),
                error: state.audit_error.clone(),
            },
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (each step is one
        // assignment), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn activated(
        &self,
        state: &mut State,
        who: &Who,
        action: &str,
        old: &Version,
        next: Arc<Version>,
        push: bool,
    ) -> Applied {
        let mut summary = audit::summarize(&old.policy, &next.policy);
        note_module(&mut summary, &old.module, &next.module);
        let new_version = next.info.version.clone();
        if push {
            state.history.push_back(next);
            while state.history.len() > self.settings.history.max(1) {
                state.history.pop_front();
            }
        } else {
            state.history.push_back(next);
        }
        state.activations += 1;
        tracing::info!(
            old_version = %old.info.version,
            new_version = %new_version,
            who = %who,
            action,
            summary = %summary,
            "policy activated"
        );
        self.audit(
            state,
            Entry::new(who.to_string(), action)
                .versions(Some(&old.info.version), Some(&new_version))
                .summary(summary.clone()),
        );
        Applied {
            old_version: old.info.version.clone(),
            new_version,
            changed: true,
            summary,
        }
    }

    fn reject(
        &self,
        state: &mut State,
        who: &Who,
        action: &str,
        active: &Version,
        version: Option<String>,
        reasons: Vec<String>,
    ) -> ReloadError {
        tracing::warn!(
            active = %active.info.version,
            candidate = version.as_deref().unwrap_or("-"),
            who = %who,
            reasons = %reasons.join("; "),
            "policy candidate refused; the active version keeps serving"
        );
        let rejection = Rejection {
            time: audit::rfc3339(SystemTime::now()),
            who: who.to_string(),
            version: version.clone(),
            reasons: reasons.clone(),
        };
        state.rejections += 1;
        state.last_rejection = Some(rejection.clone());
        self.audit(
            state,
            Entry::new(who.to_string(), action)
                .versions(Some(&active.info.version), version.as_deref())
                .reasons(reasons),
        );
        ReloadError::Refused(rejection)
    }

    fn audit(&self, state: &mut State, entry: Entry) {
        match state.audit.append(entry) {
            Ok(_) => state.audit_error = None,
            Err(e) => {
                tracing::error!(error = %e, "cannot write the audit log");
                state.audit_error = Some(e.to_string());
            }
        }
    }
}

/// Compiles candidate policy bytes: compiled JSON (starting with `{`) or TOML. Both paths
/// run the embedded tests natively. Returns every problem.
pub fn prepare(bytes: &[u8]) -> Result<(Policy, String), Vec<String>> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| vec![format!("the policy is not UTF-8 text: {e}")])?;
    if text.trim().is_empty() {
        return Err(vec!["the policy is empty".into()]);
    }
    if text.trim_start().starts_with('{') {
        let policy = Policy::from_json(text.as_bytes()).map_err(|e| match e {
            altroute_policy::Error::Invalid(list) => list,
            other => vec![other.to_string()],
        })?;
        let json = policy.to_json();
        return Ok((policy, json));
    }
    let compiled = altroute_policy::compile(text)
        .map_err(|diags| diags.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    Ok((compiled.policy, compiled.json))
}

/// Runs the policy's embedded tests through `plugin`, plus a probe that the plugin answers
/// with this policy's version. Every failure is returned.
pub fn self_test(plugin: &Plugin, policy: &Policy) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    let probe = Query::plan("postmaster@self-test.invalid", "probe@self-test.invalid");
    let cases = policy
        .tests
        .iter()
        .map(|t| (format!("test {:?}", t.name), &t.query, Some(&t.expect)))
        .chain(std::iter::once(("probe".to_string(), &probe, None)));
    for (name, query, expect) in cases {
        match ask(plugin, query) {
            Err(e) => problems.push(format!("{name}: no decision through the module: {e}")),
            Ok(d) => {
                if d.policy_version != policy.version {
                    problems.push(format!(
                        "{name}: the module answered with version {} instead of {}",
                        d.policy_version, policy.version
                    ));
                }
                if let Some(expect) = expect {
                    let mismatches = altroute_policy::compare(expect, &d);
                    if !mismatches.is_empty() {
                        problems.push(format!(
                            "{name} failed through the module: {}",
                            mismatches.join("; ")
                        ));
                    }
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// One question through `plugin`: the query as request headers, the decision read back
/// from the headers the module set (or its local response).
pub fn ask(plugin: &Plugin, query: &Query) -> Result<Decision, String> {
    let mut headers: Vec<(String, Vec<u8>)> = vec![
        (":method".into(), b"POST".to_vec()),
        (":path".into(), b"/decide".to_vec()),
        (":authority".into(), b"altroute".to_vec()),
    ];
    headers.extend(
        contract::encode_query(query)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_bytes())),
    );
    let outcome = plugin
        .http_request(&HttpRequest {
            headers,
            ..HttpRequest::default()
        })
        .map_err(|e| e.to_string())?;
    let mut decision =
        contract::decode_decision(|name| outcome.header(name)).map_err(|e| e.to_string())?;
    if decision.reply.is_none()
        && let Some(r) = &outcome.local_response
        && !r.body.is_empty()
    {
        decision.reply = Some(String::from_utf8_lossy(&r.body).trim().to_string());
    }
    Ok(decision)
}

fn spec(module: Arc<[u8]>, policy: &Policy, json: &str) -> PluginSpec {
    PluginSpec::new(module, ROOT_ID)
        .plugin_config(json.as_bytes().to_vec())
        .version(policy.version.clone())
        .name(policy.name.clone())
}

fn info(policy: &Policy, module: &[u8], who: &Who) -> VersionInfo {
    VersionInfo {
        version: policy.version.clone(),
        name: policy.name.clone(),
        module: module_hash(module),
        activated: audit::rfc3339(SystemTime::now()),
        who: who.to_string(),
    }
}

fn note_module(summary: &mut Value, old: &[u8], new: &[u8]) {
    if old != new
        && let Value::Object(map) = summary
    {
        map.insert(
            "module".into(),
            json!({ "old": module_hash(old), "new": module_hash(new) }),
        );
    }
}

fn module_hash(module: &[u8]) -> String {
    let digest = Sha256::digest(module);
    hex(&digest[..8])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `new_version` of the audit log's last line, if any.
fn last_new_version(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let last = text.lines().rev().find(|l| !l.is_empty())?;
    let value: Value = serde_json::from_str(last).ok()?;
    value
        .get("new_version")
        .and_then(Value::as_str)
        .map(str::to_string)
}

// ---------------------------------------------------------------------------------------
// Shadow mode

/// Holds the running shadow, if any. The policy engine calls [`ShadowSlot::observe`]
/// after each decision; without a shadow that costs one atomic load.
#[derive(Default)]
pub struct ShadowSlot {
    current: ArcSwapOption<Shadow>,
}

impl std::fmt::Debug for ShadowSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowSlot")
            .field("version", &self.current().map(|s| s.version().to_string()))
            .finish()
    }
}

impl ShadowSlot {
    /// An empty slot.
    pub fn new() -> ShadowSlot {
        ShadowSlot::default()
    }

    /// The running shadow.
    pub fn current(&self) -> Option<Arc<Shadow>> {
        self.current.load_full()
    }

    /// Replaces the shadow; returns the previous one.
    pub fn set(&self, shadow: Option<Arc<Shadow>>) -> Option<Arc<Shadow>> {
        self.current.swap(shadow)
    }

    /// Asks the shadow (if any) the question the active version answered with `active`,
    /// and records a difference. Never affects the decision.
    pub fn observe(&self, query: &Query, active: &Decision) {
        if let Some(shadow) = self.current.load_full() {
            shadow.observe(query, active);
        }
    }
}

/// A candidate answering live questions without deciding.
pub struct Shadow {
    plugin: Arc<Plugin>,
    started: String,
    decisions: AtomicU64,
    differences: AtomicU64,
    recent: Mutex<VecDeque<Difference>>,
    keep: usize,
}

/// The parts of a decision that matter for routing (no version, no prose).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// The route.
    pub route: Route,
    /// The host's name for host and alternate routes.
    pub host: Option<String>,
    /// The TLS requirement of the hop.
    pub tls: TlsRequirement,
    /// The rule that decided.
    pub rule: String,
    /// The result type.
    pub result: ResultType,
    /// The SMTP reply for defer and bounce.
    pub reply: Option<String>,
}

impl Verdict {
    /// The routing-relevant part of `d`.
    pub fn of(d: &Decision) -> Verdict {
        Verdict {
            route: d.route,
            host: d.host.as_ref().map(|h| h.name.clone()),
            tls: d.tls,
            rule: d.rule.clone(),
            result: d.result,
            reply: d.reply.clone(),
        }
    }
}

/// One decision where the shadow disagreed with the active version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// When (RFC 3339 UTC).
    pub time: String,
    /// `plan` or `verdict`.
    pub phase: String,
    /// Envelope sender.
    pub sender: String,
    /// Envelope recipient.
    pub recipient: String,
    /// What the active version decided.
    pub active: Verdict,
    /// What the shadow would have decided (`None`: the shadow failed; see `error`).
    pub shadow: Option<Verdict>,
    /// The shadow's failure, if it failed.
    pub error: Option<String>,
}

/// A shadow's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ShadowStatus {
    /// The shadow's policy version.
    pub version: String,
    /// When it started (RFC 3339 UTC).
    pub started: String,
    /// Decisions observed.
    pub decisions: u64,
    /// Decisions where it differed.
    pub differences: u64,
    /// The last differences, oldest first.
    pub recent: Vec<Difference>,
}

impl Shadow {
    /// A shadow running `plugin`, keeping the last `keep` differences.
    pub fn new(plugin: Arc<Plugin>, keep: usize) -> Shadow {
        Shadow {
            plugin,
            started: audit::rfc3339(SystemTime::now()),
            decisions: AtomicU64::new(0),
            differences: AtomicU64::new(0),
            recent: Mutex::new(VecDeque::new()),
            keep,
        }
    }

    /// The shadow's policy version.
    pub fn version(&self) -> &str {
        self.plugin.version()
    }

    /// Asks the shadow and compares with the active decision.
    pub fn observe(&self, query: &Query, active: &Decision) {
        self.decisions.fetch_add(1, Ordering::Relaxed);
        let (shadow, error) = match ask(&self.plugin, query) {
            Ok(d) => (Some(Verdict::of(&d)), None),
            Err(e) => (None, Some(e)),
        };
        let active = Verdict::of(active);
        if shadow.as_ref() == Some(&active) {
            return;
        }
        self.differences.fetch_add(1, Ordering::Relaxed);
        let difference = Difference {
            time: audit::rfc3339(SystemTime::now()),
            phase: query.phase.to_string(),
            sender: query.sender.clone(),
            recipient: query.recipient.clone(),
            active,
            shadow,
            error,
        };
        tracing::info!(
            target: "altroute::shadow",
            shadow_version = %self.version(),
            phase = %difference.phase,
            sender = %difference.sender,
            recipient = %difference.recipient,
            active = %brief(Some(&difference.active)),
            shadow = %brief(difference.shadow.as_ref()),
            error = difference.error.as_deref().unwrap_or(""),
            "shadow decision differs"
        );
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.push_back(difference);
        while recent.len() > self.keep {
            recent.pop_front();
        }
    }

    /// The figures so far.
    pub fn status(&self) -> ShadowStatus {
        ShadowStatus {
            version: self.version().to_string(),
            started: self.started.clone(),
            decisions: self.decisions.load(Ordering::Relaxed),
            differences: self.differences.load(Ordering::Relaxed),
            recent: self
                .recent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned()
                .collect(),
        }
    }
}

fn brief(v: Option<&Verdict>) -> String {
    match v {
        None => "fault".into(),
        Some(v) => format!(
            "{}{} ({}, tls required {})",
            v.route,
            v.host.as_deref().map(|h| format!(" via {h}")).unwrap_or_default(),
            v.rule,
            v.tls.required
        ),
    }
}

// ---------------------------------------------------------------------------------------
// Sources

/// The files a running relay reloads from.
#[derive(Debug, Clone)]
pub struct Sources {
    /// `[policy].file`.
    pub policy: PathBuf,
    /// `[policy].module`; `None`: the built-in module (never changes at run time).
    pub module: Option<PathBuf>,
}

impl Sources {
    /// Reads the files (following symlinks, so a swapped ConfigMap link is seen).
    pub fn read(&self) -> Result<Candidate, ReloadError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| ReloadError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        Ok(Candidate {
            policy: read(&self.policy)?,
            module: self.module.as_deref().map(read).transpose()?,
        })
    }

    /// Directories to watch: each file's parent, plus the parent of what it resolves to
    /// now (a file that is itself a symlink into another directory).
    fn directories(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        for file in std::iter::once(&self.policy).chain(self.module.as_ref()) {
            let parent = match file.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            dirs.push(parent);
            if let Ok(real) = std::fs::canonicalize(file)
                && let Some(p) = real.parent()
            {
                dirs.push(p.to_path_buf());
            }
        }
        let mut unique: Vec<PathBuf> = Vec::new();
        for d in dirs {
            let key = std::fs::canonicalize(&d).unwrap_or(d.clone());
            if !unique
                .iter()
                .any(|u| std::fs::canonicalize(u).unwrap_or(u.clone()) == key)
            {
                unique.push(d);
            }
        }
        unique
    }
}

/// A running file watcher; dropping it stops watching.
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
    dirs: Vec<PathBuf>,
}

impl std::fmt::Debug for FileWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWatch").field("dirs", &self.dirs).finish()
    }
}

impl FileWatch {
    /// The directories watched.
    pub fn directories(&self) -> &[PathBuf] {
        &self.dirs
    }
}

/// Default quiet time after the last file event before re-reading: 100 ms.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);

/// Watches the parent directories of `sources` (non-recursively). After any event and
/// `debounce` of quiet, re-reads the resolved files and applies them (who: `file watch`)
/// only when their content hash differs from the last content seen (the files as they
/// are now count as seen). Runs on its own thread; stops when the [`FileWatch`] drops.
pub fn watch(
    reloader: Arc<Reloader>,
    sources: Sources,
    debounce: Duration,
) -> Result<FileWatch, ReloadError> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Any event (or error) only means "look again"; the content hash decides.
        if let Err(e) = &event {
            tracing::warn!(error = %e, "policy file watch error");
        }
        let _ = tx.send(());
    })
    .map_err(|source| ReloadError::Watch {
        path: sources.policy.clone(),
        source,
    })?;
    let dirs = sources.directories();
    for dir in &dirs {
        watcher
            .watch(dir, notify::RecursiveMode::NonRecursive)
            .map_err(|source| ReloadError::Watch {
                path: dir.clone(),
                source,
            })?;
    }
    let mut seen = sources.read().ok().map(|c| c.content_hash());
    tracing::info!(dirs = ?dirs, "watching the policy files");
    std::thread::Builder::new()
        .name("altroute-policy-watch".into())
        .spawn(move || {
            // Ends when the watcher (the only sender) is dropped.
            while rx.recv().is_ok() {
                // Debounce: wait until the directory has been quiet for `debounce`.
                loop {
                    match rx.recv_timeout(debounce) {
                        Ok(()) => continue,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                let candidate = match sources.read() {
                    Ok(c) => c,
                    Err(e) => {
                        // Mid-swap or removed: the next event will look again.
                        tracing::warn!(error = %e, "policy file not readable; keeping the active version");
                        continue;
                    }
                };
                let hash = candidate.content_hash();
                if seen.as_deref() == Some(hash.as_str()) {
                    continue;
                }
                seen = Some(hash);
                tracing::info!(file = %sources.policy.display(), "policy files changed");
                // Refusals are logged, audited and in the status already.
                let _ = reloader.apply(&Who::FileWatch, candidate);
            }
        })
        .map_err(|e| ReloadError::Read {
            path: sources.policy.clone(),
            source: e,
        })?;
    Ok(FileWatch {
        _watcher: watcher,
        dirs,
    })
}

/// Reloads from `sources` on every SIGHUP (who: `sighup`) until `shutdown` completes.
/// Unlike the watcher, SIGHUP re-applies the files even if they did not change since the
/// last look (e.g. after an admin API change, SIGHUP returns to the files).
pub async fn sighup(
    reloader: Arc<Reloader>,
    sources: Sources,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            got = hup.recv() => {
                if got.is_none() {
                    return Ok(());
                }
                tracing::info!("SIGHUP: reloading the policy files");
                let reloader = reloader.clone();
                let sources = sources.clone();
                let _ = tokio::task::spawn_blocking(move || match sources.read() {
                    Ok(c) => {
                        let _ = reloader.apply(&Who::Sighup, c);
                    }
                    Err(e) => tracing::warn!(error = %e, "SIGHUP: cannot read the policy files"),
                })
                .await;
            }
        }
    }
}
