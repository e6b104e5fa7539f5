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

use proxy_wasm_host::{Host, Plugin, PluginSpec, PolicySlot};

use altroute_policy::{Decision, Policy, Query, ResultType, Route, TlsRequirement};

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
    /// The command line, without a name (a program calling the reloader itself).
    Cli,
    /// The command line (`altroute policy`, `altroute queue`), run by this user
    /// (`--who`, else `$SUDO_USER` or `$USER`).
    CliUser(String),
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
            Who::CliUser(user) => write!(f, "cli:{user}"),
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
    /// Part of every activation's gate (the edge filter, which runs the same policy on
    /// the inbound port).
    followers: Mutex<Vec<Follower>>,
    /// The status as of the last change (without the live shadow figures), so that
    /// `GET /policy` answers while a candidate compiles (an audit's status request
    /// timed out behind a gigabyte policy file).
    published: arc_swap::ArcSwap<Status>,
}

/// Called with the canonical JSON and the version of each candidate policy, before it
/// is activated, under the reloader's lock: loads it and returns what makes it current
/// there, or why it cannot serve it. A refusal refuses the candidate (audited); the
/// commits run in order right after the swap. The edge once refused a policy on its own
/// after the relay had activated it, and kept an older, laxer one while the status and
/// the audit log named the new one.
pub type Follower = Box<dyn Fn(&str, &str) -> Result<Commit, String> + Send + Sync>;

/// Makes a follower's prepared policy current.
pub type Commit = Box<dyn FnOnce() + Send>;

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
        // A start line that cannot be written (a full disk: the audit log lives in the
        // spool by default) does not keep the relay from starting and draining its
        // queue: an audit's relay could not restart at all on a full spool. It is
        // logged, and shown in `GET /policy` until a later write succeeds.
        let audit_error = match audit.append(
            Entry::new(Who::Startup.to_string(), "start")
                .versions(previous.as_deref(), Some(&version.info.version))
                .summary(json!({ "module": version.info.module })),
        ) {
            Ok(a) => a.reopened,
            Err(e) => {
                tracing::error!(error = %e, "cannot write the audit log's start line; starting anyway");
                Some(e.to_string())
            }
        };
        let mut history = VecDeque::new();
        history.push_back(version);
        let state = State {
            history,
            last_rejection: None,
            activations: 0,
            rejections: 0,
            audit,
            audit_error,
        };
        let published = arc_swap::ArcSwap::from_pointee(snapshot(&state));
        Ok(Reloader {
            target,
            settings,
            state: Mutex::new(state),
            followers: Mutex::new(Vec::new()),
            published,
        })
    }

    /// Registers `follower`, part of every later activation (apply and rollback).
    pub fn follow(&self, follower: Follower) {
        self.followers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(follower);
    }

    /// Each follower's prepared commit for `version`, or every follower's refusal.
    fn prepare_followers(&self, json: &str, version: &str) -> Result<Vec<Commit>, Vec<String>> {
        let followers = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        let mut commits = Vec::new();
        let mut refusals = Vec::new();
        for follower in followers.iter() {
            match follower(json, version) {
                Ok(c) => commits.push(c),
                Err(why) => refusals.push(why),
            }
        }
        if refusals.is_empty() {
            Ok(commits)
        } else {
            Err(refusals)
        }
    }

    /// Records a candidate a source could not offer (a policy file changed in place, or
    /// one that is not a regular file or too big): logged as a refusal, audited
    /// (`reject`, no version) and kept as the last rejection. The active version keeps
    /// serving.
    pub fn refuse_source(&self, who: &Who, reasons: Vec<String>) {
        let mut state = self.lock();
        let Some(active) = state.history.back().cloned() else {
            return;
        };
        let _ = self.reject(&mut state, who, "reject", &active, None, reasons);
    }

    /// A refusal of the policy sources that is logged but not audited (the file watch's
    /// rate limit): counted, and the status's last rejection, as for an audited one.
    fn note_refusal(&self, who: &Who, reasons: Vec<String>) {
        let mut state = self.lock();
        state.rejections += 1;
        state.last_rejection = Some(Rejection {
            time: audit::rfc3339(SystemTime::now()),
            who: who.to_string(),
            version: None,
            reasons,
        });
        self.published.store(Arc::new(snapshot(&state)));
    }

    /// The active policy's canonical JSON.
    pub fn active_json(&self) -> String {
        self.lock()
            .history
            .back()
            .map(|v| v.json.clone())
            .unwrap_or_default()
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
        // The content, not only its 64-bit version, decides a no-op: a crafted
        // collision must not pass for the active policy.
        if policy.version == active.info.version && json == active.json && *module == *active.module
        {
            return Ok(Applied {
                old_version: active.info.version.clone(),
                new_version: policy.version,
                changed: false,
                summary: json!({}),
            });
        }
        let commits = match self.prepare_followers(&json, &policy.version) {
            Ok(c) => c,
            Err(reasons) => {
                let version = Some(policy.version.clone());
                return Err(self.reject(&mut state, who, "reject", &active, version, reasons));
            }
        };
        let spec = spec(module.clone(), &policy, &json);
        let result = self
            .target
            .slot()
            .try_swap(self.target.host(), spec, |plugin| {
                self_test(plugin, &policy)
            });
        match result {
            Ok(_previous) => {
                let next = Arc::new(Version {
                    info: info(&policy, &module, who),
                    policy,
                    json,
                    module,
                });
                commits.into_iter().for_each(|commit| commit());
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
        let commits = match self.prepare_followers(&previous.json, &previous.info.version) {
            Ok(c) => c,
            Err(reasons) => {
                let version = Some(previous.info.version.clone());
                return Err(self.reject(&mut state, who, "reject", &active, version, reasons));
            }
        };
        let spec = spec(previous.module.clone(), &previous.policy, &previous.json);
        let policy = previous.policy.clone();
        let result = self
            .target
            .slot()
            .try_swap(self.target.host(), spec, |plugin| {
                self_test(plugin, &policy)
            });
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
                commits.into_iter().for_each(|commit| commit());
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
            // The replaced shadow's figures are part of the record, as at a stop.
            let status = old.status();
            tracing::info!(target: "altroute::shadow", version = %status.version, "shadow replaced");
            self.audit(
                &mut state,
                Entry::new(who.to_string(), "shadow-stop")
                    .versions(Some(&active.info.version), Some(&status.version))
                    .summary(json!({
                        "decisions": status.decisions,
                        "differences": status.differences,
                        "replaced_by": policy.version,
                    })),
            );
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

    /// The state for `GET /policy`: as of the last change, with the shadow's live
    /// figures. It does not wait for a change in progress.
    pub fn status(&self) -> Status {
        let mut status = Status::clone(&self.published.load());
        status.shadow = self.target.shadow().current().map(|s| s.status());
        status
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

    /// Appends `entry` to the audit log (every change and refusal ends so) and publishes
    /// the new status.
    fn audit(&self, state: &mut State, entry: Entry) {
        self.append(state, entry);
        self.published.store(Arc::new(snapshot(state)));
    }

    fn append(&self, state: &mut State, entry: Entry) {
        match state.audit.append(entry) {
            // A rotated or deleted file is not an error of this write, but an operator
            // should see it (it is logged as a warning too).
            Ok(a) => {
                state.audit_error = a.reopened.map(|why| {
                    format!(
                        "audit log {}: {why}; the chain continues there with a \"continue\" line",
                        state.audit.path().display()
                    )
                });
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot write the audit log");
                state.audit_error = Some(e.to_string());
            }
        }
    }
}

/// The status of `state` (no shadow figures: they are live, see [`Reloader::status`]).
fn snapshot(state: &State) -> Status {
    let history: Vec<VersionInfo> = state.history.iter().rev().map(|v| v.info.clone()).collect();
    let (seq, head) = state.audit.head();
    Status {
        active: history.first().cloned().unwrap_or_else(|| VersionInfo {
            version: String::new(),
            name: String::new(),
            module: String::new(),
            activated: String::new(),
            who: String::new(),
        }),
        history,
        last_rejection: state.last_rejection.clone(),
        activations: state.activations,
        rejections: state.rejections,
        shadow: None,
        audit: AuditStatus {
            path: state.audit.path().to_path_buf(),
            seq,
            head: head.to_string(),
            error: state.audit_error.clone(),
        },
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

/// One question through `plugin` (the engine's own path: query as request headers,
/// decision read back from what the module set).
pub use crate::policy_engine::ask;

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

/// The version that was serving at the end of the audit log: the `new_version` of its
/// last `start`, `activate` or `rollback` line. Other lines name a version that never
/// served (a refused candidate, a shadow) or none.
fn last_new_version(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().rev().find_map(|line| {
        let value: Value = serde_json::from_str(line).ok()?;
        let action = value.get("action").and_then(Value::as_str)?;
        if !matches!(action, "start" | "activate" | "rollback") {
            return None;
        }
        value
            .get("new_version")
            .and_then(Value::as_str)
            .map(str::to_string)
    })
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
            v.host
                .as_deref()
                .map(|h| format!(" via {h}"))
                .unwrap_or_default(),
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

/// The largest policy or module file read (the admin API's limit on a body too): a
/// sparse file of gigabytes once took the relay's memory to 6 GB.
pub const MAX_SOURCE_FILE: u64 = 64 << 20;

impl Sources {
    /// Reads the files (following symlinks, so a swapped ConfigMap link is seen). Each
    /// must be a regular file of at most [`MAX_SOURCE_FILE`] bytes: a FIFO put in its
    /// place once blocked the watch thread for good, and is refused without waiting.
    pub fn read(&self) -> Result<Candidate, ReloadError> {
        Ok(Candidate {
            policy: read_source(&self.policy)?,
            module: self.module.as_deref().map(read_source).transpose()?,
        })
    }

    /// Directories to watch: each file's directory and the one above it (a directory
    /// swapped under the path), the directory holding each symlink on the way to the
    /// file (a swapped link), and the directory the file resolves to now.
    fn directories(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        for file in std::iter::once(&self.policy).chain(self.module.as_ref()) {
            let parent = match file.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            dirs.extend(
                parent
                    .parent()
                    .filter(|g| !g.as_os_str().is_empty())
                    .map(Path::to_path_buf),
            );
            dirs.push(parent);
            // Each prefix of the path that is a symlink: its directory.
            let mut prefix = PathBuf::new();
            for part in file.components() {
                prefix.push(part);
                if std::fs::symlink_metadata(&prefix).is_ok_and(|m| m.file_type().is_symlink())
                    && let Some(p) = prefix.parent()
                {
                    dirs.push(if p.as_os_str().is_empty() {
                        PathBuf::from(".")
                    } else {
                        p.to_path_buf()
                    });
                    // And the symlinks the link itself leads through (ConfigMaps).
                    if let Ok(real) = std::fs::canonicalize(&prefix)
                        && let Some(rp) = real.parent()
                    {
                        dirs.push(rp.to_path_buf());
                    }
                }
            }
            if let Ok(real) = std::fs::canonicalize(file)
                && let Some(p) = real.parent()
            {
                dirs.push(p.to_path_buf());
            }
        }
        dirs
    }
}

/// One policy or module file, as [`Sources::read`] takes it.
fn read_source(path: &Path) -> Result<Vec<u8>, ReloadError> {
    read_file(path, false).map(|(bytes, ..)| bytes)
}

/// Where a watched file's content came from: the file its path resolves to, that file's
/// (device, inode) and birth time (an inode number is reused at once on ext4: a new file
/// must not pass for the old one), read from the descriptor the content was read
/// through, and the (device, inode) of the directory holding it (a directory swapped
/// under the same path is a new file too).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    resolved: PathBuf,
    inode: (u64, u64),
    born: Option<std::time::SystemTime>,
    directory: Option<(u64, u64)>,
}

/// A file's content, (device, inode), birth time and whether it is being written
/// ([`leased_writer`]), as [`read_file`] gives them.
type FileRead = (
    Vec<u8>,
    (u64, u64),
    Option<std::time::SystemTime>,
    Option<bool>,
);

/// Whether any process, in any PID namespace, has `file` open for writing, as the kernel
/// tells it: a read lease cannot be taken then (`EAGAIN`). The lease is dropped at once.
/// `None` when this process may not take one (it neither owns the file nor has
/// `CAP_LEASE`) or the file system has no leases. An audit's writer in another PID
/// namespace, invisible in this `/proc`, renamed half a policy into place and the watch
/// applied it.
fn leased_writer(file: &std::fs::File) -> Option<bool> {
    use std::os::fd::AsRawFd;
    sigio_harmless();
    let fd = file.as_raw_fd();
    // SAFETY: `fcntl(F_SETLEASE, F_RDLCK)` on a descriptor `file` owns and keeps open for
    // the call; the third argument is an int, no memory is passed. A writer opening the
    // file while the lease is held breaks it with SIGIO, which `sigio_harmless` keeps
    // from terminating the process.
    #[allow(unsafe_code)]
    let taken = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) };
    if taken == 0 {
        // SAFETY: as above; dropping the lease just taken.
        #[allow(unsafe_code)]
        let _ = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
        return Some(false);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => Some(true),
        _ => None,
    }
}

/// Makes SIGIO (sent to a lease holder when a writer opens the file) harmless for the
/// process: a handler through tokio's registry, which stays for the process's life.
fn sigio_harmless() {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let io = tokio::signal::unix::SignalKind::io();
        // In a runtime (the relay's first look, under `serve`), register there: a runtime
        // cannot be started from within one (the relay once panicked at every start).
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = tokio::signal::unix::signal(io);
        } else if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
        {
            rt.block_on(async {
                let _ = tokio::signal::unix::signal(io);
            });
        }
    });
}

/// [`read_source`], with the file's device, inode and birth time, and, when `probe`
/// (the watch), whether it is being written ([`leased_writer`]; SIGHUP applies what is
/// there and takes no lease).
fn read_file(path: &Path, probe: bool) -> Result<FileRead, ReloadError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let error = |source: std::io::Error| ReloadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let refuse = |why: String| error(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
    // Non-blocking, so that opening a FIFO returns at once, and only a regular file.
    let file =
        crate::files::open_regular(path, std::fs::OpenOptions::new().read(true)).map_err(error)?;
    let meta = file.metadata().map_err(error)?;
    let inode = (meta.dev(), meta.ino());
    let born = meta.created().ok();
    let writer = if probe { leased_writer(&file) } else { None };
    if meta.len() > MAX_SOURCE_FILE {
        return Err(refuse(format!(
            "{} bytes, more than the {} MiB a policy or module file may have",
            meta.len(),
            MAX_SOURCE_FILE >> 20
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_SOURCE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(error)?;
    if bytes.len() as u64 > MAX_SOURCE_FILE {
        return Err(refuse(format!(
            "grew over {} MiB while read",
            MAX_SOURCE_FILE >> 20
        )));
    }
    Ok((bytes, inode, born, writer))
}

/// What a file event means to the watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Signal {
    /// Something changed in a watched directory: look at the files again.
    Look,
    /// A file was renamed into place under this name: a file that arrives so is complete
    /// once nobody writes it any more.
    RenamedTo(std::ffi::OsString),
    /// A file under this name was written (its data changed).
    Modified(std::ffi::OsString),
    /// A file (or symlink) was created under this name: not evidence of a whole file
    /// (`cp` creates and then writes), but the moment a symlink made by `ln -sf` appears.
    Created(std::ffi::OsString),
    /// The kernel's event queue overflowed: events were lost (look again).
    Overflow,
}

/// The meaning of `event`; `None` for events that change nothing (opens, reads and
/// closes after reading, the watcher's own among them). A close after writing is a
/// look: a writer the last look waited for may be done.
fn signal_of(event: &notify::Event) -> Option<Signal> {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
    if event.need_rescan() {
        return Some(Signal::Overflow);
    }
    let name = |p: Option<&PathBuf>| p.and_then(|p| p.file_name()).map(ToOwned::to_owned);
    Some(match &event.kind {
        // A close only says the file had been opened for writing: an atomic writer may
        // rename its file into place and close it after (`NamedTempFile::persist`).
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Signal::Look,
        EventKind::Modify(ModifyKind::Data(_)) => {
            name(event.paths.first()).map_or(Signal::Look, Signal::Modified)
        }
        EventKind::Access(_) => return None,
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
            name(event.paths.first()).map_or(Signal::Look, Signal::RenamedTo)
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
            name(event.paths.get(1)).map_or(Signal::Look, Signal::RenamedTo)
        }
        EventKind::Create(_) => name(event.paths.first()).map_or(Signal::Look, Signal::Created),
        _ => Signal::Look,
    })
}

/// Whether a process has the file `inode` (device, inode) open for writing, or mapped
/// shared and writable, as far as `/proc` shows this process (all processes as root,
/// its own user's otherwise). The file watch does not read a file someone still
/// writes: an audit renamed a file into place, or swapped a symlink to it, while its
/// writer still had half of it to write.
fn being_written(inode: (u64, u64)) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let procs = std::fs::read_dir("/proc").ok()?;
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let base = p.path();
        if let Ok(fds) = std::fs::read_dir(base.join("fd")) {
            for fd in fds.flatten() {
                // Follows the link to the open file.
                let Ok(meta) = std::fs::metadata(fd.path()) else {
                    continue;
                };
                if (meta.dev(), meta.ino()) != inode {
                    continue;
                }
                let info = std::fs::read_to_string(base.join("fdinfo").join(fd.file_name()))
                    .unwrap_or_default();
                let flags = info
                    .lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                    .unwrap_or(0);
                // O_WRONLY or O_RDWR.
                if flags & 3 != 0 {
                    return Some(pid);
                }
            }
        }
        // A shared writable mapping outlives its descriptor.
        if let Ok(maps) = std::fs::read_to_string(base.join("maps")) {
            for line in maps.lines() {
                let mut f = line.split_ascii_whitespace();
                let (perms, ino) = (f.nth(1), f.nth(2));
                if perms.is_some_and(|p| {
                    p.as_bytes().get(1) == Some(&b'w') && p.as_bytes().get(3) == Some(&b's')
                }) && ino.and_then(|i| i.parse::<u64>().ok()) == Some(inode.1)
                {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// A running file watcher; dropping it stops watching.
pub struct FileWatch {
    // The watch thread holds it weakly: dropping this stops it.
    _watcher: Arc<Mutex<notify::RecommendedWatcher>>,
    dirs: Vec<PathBuf>,
}

impl std::fmt::Debug for FileWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWatch")
            .field("dirs", &self.dirs)
            .finish()
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

/// The longest a stream of events (a busy neighbour file) postpones a look: 1 s.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(1);

/// At most one refusal by the file watch is audited per minute; the next audited one
/// says how many were not (a process re-creating the file in a loop once wrote 133
/// audit lines in 20 s).
pub const REFUSAL_AUDIT_INTERVAL: Duration = Duration::from_secs(60);

/// What the watcher keeps of one file: as last applied, and the files seen arriving
/// whole (renamed into place, behind a swapped symlink or in a swapped directory) since.
#[derive(Debug, Clone, Default)]
struct Tracked {
    applied: Option<(Identity, String)>,
    arrived: Vec<Identity>,
    /// The file last refused as written in place: its symlink swap is no evidence any more.
    refused_in_place: Option<Identity>,
}

/// The file events of one judgement: for each name, the order number of its last event
/// of each kind.
#[derive(Default)]
struct Events {
    next: u64,
    /// Per kind ([`Events::RENAMED`], [`Events::MODIFIED`], [`Events::CREATED`]).
    last: [std::collections::BTreeMap<std::ffi::OsString, u64>; 3],
}

impl Events {
    const RENAMED: usize = 0;
    const MODIFIED: usize = 1;
    const CREATED: usize = 2;

    fn note(&mut self, kind: usize, name: std::ffi::OsString) {
        self.next += 1;
        self.last[kind].insert(name, self.next);
    }

    fn latest(&self, kind: usize, names: &[&std::ffi::OsStr]) -> Option<u64> {
        names
            .iter()
            .filter_map(|n| self.last[kind].get(*n))
            .max()
            .copied()
    }

    /// Whether one of `names` was renamed into place.
    fn renamed(&self, names: &[&std::ffi::OsStr]) -> bool {
        self.latest(Self::RENAMED, names).is_some()
    }

    /// Whether one of `names` was created.
    fn created(&self, names: &[&std::ffi::OsStr]) -> bool {
        self.latest(Self::CREATED, names).is_some()
    }

    /// Whether one of `names` was written after the last time one of them was renamed
    /// into place or created (or at all, when neither happened).
    fn written_after_arrival(&self, names: &[&std::ffi::OsStr]) -> bool {
        let arrival = self
            .latest(Self::RENAMED, names)
            .max(self.latest(Self::CREATED, names));
        self.latest(Self::MODIFIED, names)
            .is_some_and(|w| arrival.is_none_or(|a| w > a))
    }
}

/// Watches the directories of `sources` (non-recursively): each file's directory and
/// the one above it, the directory of each symlink on the way to the file, and the
/// directory the file resolves to, again after each look. After an event and `debounce`
/// of quiet (at most [`MAX_DEBOUNCE`] after the first event), re-reads the resolved
/// files and applies them (who: `file watch`) when their content changed and every
/// changed file arrived whole:
/// - it was seen arriving: renamed into place under its name (`mv new policy.toml` in
///   the same directory), or its path now leads to another file (a symlink swap: a
///   Kubernetes ConfigMap update, `ln -sf`; a directory swapped under the path);
/// - no process has it open for writing or mapped writable (`/proc`), and its size and
///   modification time held for one more debounce: a file renamed into place while its
///   writer still had half of it to write waits for the writer.
///
/// A file changed in place (the same file written again), created and written at its
/// path (`install`, `cp`, `mv` from another filesystem) is not applied: it may be read
/// half-written. An audit's slow in-place writer once got the first half of a policy
/// activated, without its TLS rule and its tests, then mail went out in clear text. Such
/// a change, or a file that cannot be read, is refused: logged, and audited at most once
/// a minute ([`REFUSAL_AUDIT_INTERVAL`]). SIGHUP applies the files whatever they are. The
/// first look is made before returning (a no-op when the files hold the active version);
/// call it before anything else (the admin API) can change the policy. Blocks while a
/// changed file compiles. Then runs on its own thread; stops when the [`FileWatch`]
/// drops.
pub fn watch(
    reloader: Arc<Reloader>,
    sources: Sources,
    debounce: Duration,
) -> Result<FileWatch, ReloadError> {
    let (tx, rx) = std::sync::mpsc::channel::<Signal>();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let signal = match &event {
            Ok(event) => signal_of(event),
            Err(e) => {
                tracing::warn!(error = %e, "policy file watch error");
                Some(Signal::Look)
            }
        };
        if let Some(signal) = signal {
            let _ = tx.send(signal);
        }
    })
    .map_err(|source| ReloadError::Watch {
        path: sources.policy.clone(),
        source,
    })?;
    let watcher = Arc::new(Mutex::new(watcher));
    let mut dirs: Vec<(PathBuf, (u64, u64))> = Vec::new();
    watch_directories(&watcher, &sources, &mut dirs, true)?;
    // A first look now, before anything else can change the policy: files replaced
    // between the engine's load and now are applied (the usual case, the files holding
    // the active version, is a no-op).
    let files: Vec<PathBuf> = std::iter::once(&sources.policy)
        .chain(sources.module.as_ref())
        .cloned()
        .collect();
    let mut tracked: Vec<Tracked> = vec![Tracked::default(); files.len()];
    if let Ok(read) = read_sources(&sources) {
        for (t, (_, seen, _)) in tracked.iter_mut().zip(&read) {
            t.applied = Some((seen.identity.clone(), seen.hash.clone()));
        }
        let _ = reloader.apply(&Who::FileWatch, candidate_of(read));
    }
    tracing::info!(dirs = ?dirs.iter().map(|(d, _)| d).collect::<Vec<_>>(), "watching the policy files");
    if let Ok(read) = read_sources(&sources)
        && read.iter().any(|(_, seen, _)| seen.writer.is_none())
    {
        tracing::warn!(
            "the relay may not take a read lease on its policy files (give it CAP_LEASE, or make it their owner): changed files will be refused by the watch; SIGHUP applies them"
        );
    }
    let policy_path = sources.policy.clone();
    let watched = dirs.iter().map(|(d, _)| d.clone()).collect();
    let thread_watcher = Arc::downgrade(&watcher);
    std::thread::Builder::new()
        .name("altroute-policy-watch".into())
        .spawn(move || {
            let mut refusals = Refusals::default();
            let mut waiting: Option<PathBuf> = None;
            // What happened to which names since the last judgement, in order.
            let mut events = Events::default();
            let note = |signal: Signal, events: &mut Events| match signal {
                Signal::RenamedTo(name) => events.note(Events::RENAMED, name),
                Signal::Modified(name) => events.note(Events::MODIFIED, name),
                Signal::Created(name) => events.note(Events::CREATED, name),
                Signal::Overflow => {
                    tracing::warn!("policy file watch: events were lost (inotify queue overflow); looking again");
                }
                Signal::Look => {}
            };
            // Ends when the watcher (the only sender) is dropped.
            while let Ok(first) = rx.recv() {
                note(first, &mut events);
                // Debounce: until the directories have been quiet for `debounce`, or
                // `MAX_DEBOUNCE` has passed.
                let until = std::time::Instant::now() + MAX_DEBOUNCE.max(debounce);
                loop {
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match rx.recv_timeout(debounce.min(left)) {
                        Ok(signal) => note(signal, &mut events),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                // A symlink may now lead into another directory: watch it too.
                if let Some(w) = thread_watcher.upgrade() {
                    let _ = watch_directories(&w, &sources, &mut dirs, false);
                }
                let read = match read_sources(&sources) {
                    Ok(r) => r,
                    Err(e) => {
                        // Mid-swap or removed: the next event looks again (the names seen
                        // renamed are kept for it). Anything else is a refusal the
                        // operator should see.
                        let missing = matches!(&e, ReloadError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound);
                        if !missing && refusals.refuse(&reloader, e.to_string(), false) {
                            tracing::warn!(error = %e, "policy file not readable; keeping the active version");
                        }
                        continue;
                    }
                };
                // Nobody may still be writing a file before it is judged: the kernel says so
                // through a read lease (any PID namespace); where the relay may not take
                // one, `/proc` as far as it shows. Judged at the writer's close.
                let writer = read.iter().find_map(|(path, now, _)| match now.writer {
                    Some(true) => Some((path.clone(), None)),
                    Some(false) => None,
                    None => being_written(now.identity.inode).map(|pid| (path.clone(), Some(pid))),
                });
                if let Some((path, pid)) = writer {
                    // Once per wait: the line must not feed the watch (a log file in a
                    // watched directory).
                    if waiting.as_ref() != Some(&path) {
                        tracing::info!(file = %path.display(), ?pid, "a policy file is still open for writing; waiting for its writer");
                        waiting = Some(path);
                    }
                    continue;
                }
                waiting = None;
                let now_seen = std::mem::take(&mut events);
                // The evidence that a file arrived whole, kept until it is applied and
                // consumed at each judgement that finds it unchanged. A name written after
                // its rename (or its link's swap) is evidence of nothing; a symlink's target
                // written before the link was swapped to it is the usual way to swap (an
                // audit's `cp v2 q2.toml && ln -sfn q2.toml .l && mv -T .l policy.toml` was
                // refused as written in place, and applied later on an unrelated event).
                for (t, (path, now, _)) in tracked.iter_mut().zip(&read) {
                    let names: Vec<&std::ffi::OsStr> =
                        [path.file_name(), now.identity.resolved.file_name()]
                            .into_iter()
                            .flatten()
                            .collect();
                    let written = now_seen.written_after_arrival(&names);
                    if written {
                        t.arrived.clear();
                    }
                    // A symlink made anew under the path (`ln -sf v3.toml policy.toml`) is
                    // an arrival too, also of a target refused before and fixed since.
                    let relinked = path.file_name().is_some_and(|n| now_seen.created(&[n]))
                        && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
                    let renamed_here = now_seen.renamed(&names) || relinked;
                    // A swap already refused as written in place is not evidence again: only
                    // a new arrival is (it was once applied at a later, unrelated event).
                    let swapped = t.applied.as_ref().is_some_and(|(before, _)| {
                        before.resolved != now.identity.resolved
                            || before.directory != now.identity.directory
                    }) && t.refused_in_place.as_ref() != Some(&now.identity);
                    let new = t.applied.as_ref().is_none_or(|(before, _)| *before != now.identity);
                    if new
                        && (swapped || renamed_here)
                        && !written
                        && !t.arrived.contains(&now.identity)
                    {
                        t.arrived.push(now.identity.clone());
                    }
                }
                let changed: Vec<bool> = tracked
                    .iter()
                    .zip(&read)
                    .map(|(t, (_, now, _))| t.applied.as_ref().is_none_or(|(_, h)| *h != now.hash))
                    .collect();
                if !changed.iter().any(|c| *c) {
                    // The same content (a rename that changed nothing): this file is the
                    // applied one now, and leaves no evidence for a later write in place.
                    for (t, (_, now, _)) in tracked.iter_mut().zip(&read) {
                        t.applied = Some((now.identity.clone(), now.hash.clone()));
                        t.arrived.clear();
                    }
                    continue;
                }
                let in_place: Vec<String> = tracked
                    .iter()
                    .zip(&read)
                    .zip(&changed)
                    .filter(|((t, (_, now, _)), changed)| **changed && !t.arrived.contains(&now.identity))
                    .map(|((_, (path, _, _)), _)| path.display().to_string())
                    .collect();
                if !in_place.is_empty() {
                    for ((t, (_, now, _)), changed) in tracked.iter_mut().zip(&read).zip(&changed) {
                        if *changed && !t.arrived.contains(&now.identity) {
                            t.refused_in_place = Some(now.identity.clone());
                        }
                    }
                    let why = format!(
                        "{} changed in place (written at its path, not renamed into place from the same directory): not applied, as it may have been read half-written; write the new file in the same directory and rename it into place, or send SIGHUP",
                        in_place.join(", ")
                    );
                    if refusals.refuse(&reloader, why.clone(), true) {
                        tracing::warn!(reason = %why, "policy file watch: change not applied");
                    }
                    continue;
                }
                // Without a lease the kernel cannot say that nobody still writes a file, and
                // `/proc` shows only part of the machine: such a change is not applied
                // (fail closed). An audit's relay without CAP_LEASE applied half a policy
                // written by a process it could not see.
                let blind: Vec<String> = read
                    .iter()
                    .zip(&changed)
                    .filter(|((_, now, _), changed)| **changed && now.writer.is_none())
                    .map(|((path, _, _), _)| path.display().to_string())
                    .collect();
                if !blind.is_empty() {
                    let why = format!(
                        "{}: cannot tell whether it is still being written, as the relay may not take a read lease on it (give the relay CAP_LEASE, or own the file): not applied; send SIGHUP to apply it",
                        blind.join(", ")
                    );
                    if refusals.refuse(&reloader, why.clone(), false) {
                        tracing::warn!(reason = %why, "policy file watch: change not applied");
                    }
                    continue;
                }
                std::thread::sleep(debounce);
                match read_sources(&sources) {
                    Ok(again)
                        if again.iter().zip(&read).all(|((_, a, _), (_, b, _))| {
                            a.identity == b.identity && a.hash == b.hash && a.writer != Some(true)
                        }) => {}
                    _ => {
                        // It changed again meanwhile: the next event looks again.
                        continue;
                    }
                }
                for (t, (_, now, _)) in tracked.iter_mut().zip(&read) {
                    t.applied = Some((now.identity.clone(), now.hash.clone()));
                    t.arrived.clear();
                }
                refusals.last_reason = None;
                refusals.in_place_audited.clear();
                tracing::info!(file = %sources.policy.display(), "policy files changed");
                // Refusals are logged, audited and in the status already.
                let _ = reloader.apply(&Who::FileWatch, candidate_of(read));
            }
        })
        .map_err(|e| ReloadError::Read {
            path: policy_path,
            source: e,
        })?;
    Ok(FileWatch {
        _watcher: watcher,
        dirs: watched,
    })
}

/// The file watch's refusals: a refusal for the same reason as the last one is neither
/// logged nor audited again (a refused file is not judged again until it changes: a log
/// file beside the policy once made each warning an event, and a warning again). A change
/// in place is audited once per reason until a change is applied; refusals for other
/// reasons are audited at most once per [`REFUSAL_AUDIT_INTERVAL`], the next audited one
/// counting the others (logged, and in the status, all the same). An audit found a
/// change in place only logged, and the status showing an older rejection.
#[derive(Default)]
struct Refusals {
    last_audit: Option<std::time::Instant>,
    suppressed: u64,
    last_reason: Option<String>,
    /// Changes in place audited since the last applied change.
    in_place_audited: Vec<String>,
}

impl Refusals {
    /// Records a refusal for `why` (`in_place`: a change written in place); whether it is
    /// new (to be logged).
    fn refuse(&mut self, reloader: &Reloader, why: String, in_place: bool) -> bool {
        if self.last_reason.as_deref() == Some(why.as_str()) {
            return false;
        }
        self.last_reason = Some(why.clone());
        let first_in_place = in_place && !self.in_place_audited.contains(&why);
        if first_in_place {
            self.in_place_audited.push(why.clone());
        }
        if !first_in_place
            && self
                .last_audit
                .is_some_and(|t| t.elapsed() < REFUSAL_AUDIT_INTERVAL)
        {
            self.suppressed += 1;
            reloader.note_refusal(&Who::FileWatch, vec![why]);
            return true;
        }
        let mut reasons = vec![why];
        if self.suppressed > 0 {
            reasons.push(format!(
                "{} other refusal(s) in the last minute were logged, not audited",
                self.suppressed
            ));
        }
        reloader.refuse_source(&Who::FileWatch, reasons);
        self.last_audit = Some(std::time::Instant::now());
        self.suppressed = 0;
        true
    }
}

/// Watches the directories of `sources` not watched yet (by device and inode: a path
/// may now name another directory). `strict`: a directory that cannot be watched is an
/// error (at start); later only a warning.
fn watch_directories(
    watcher: &Mutex<notify::RecommendedWatcher>,
    sources: &Sources,
    dirs: &mut Vec<(PathBuf, (u64, u64))>,
    strict: bool,
) -> Result<(), ReloadError> {
    use std::os::unix::fs::MetadataExt;
    let mut watcher = watcher.lock().unwrap_or_else(|p| p.into_inner());
    for dir in sources.directories() {
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        let key = (meta.dev(), meta.ino());
        if dirs.iter().any(|(_, k)| *k == key) {
            continue;
        }
        match watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
            Ok(()) => dirs.push((dir, key)),
            Err(source) if strict => return Err(ReloadError::Watch { path: dir, source }),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a policy file's new directory")
            }
        }
    }
    Ok(())
}

/// What a read keeps of a file: where it came from, a hash of its content, and whether
/// it was being written ([`leased_writer`]; `None`: not known).
#[derive(Debug, Clone)]
struct Seen {
    identity: Identity,
    hash: String,
    writer: Option<bool>,
}

/// Each file of `sources` (the policy, then the module if any), read, with what the
/// watcher keeps of it.
fn read_sources(sources: &Sources) -> Result<Vec<(PathBuf, Seen, Vec<u8>)>, ReloadError> {
    use std::os::unix::fs::MetadataExt;
    std::iter::once(&sources.policy)
        .chain(sources.module.as_ref())
        .map(|path| {
            let resolved = std::fs::canonicalize(path).map_err(|source| ReloadError::Read {
                path: path.clone(),
                source,
            })?;
            let directory = resolved
                .parent()
                .and_then(|d| std::fs::metadata(d).ok())
                .map(|m| (m.dev(), m.ino()));
            let (bytes, inode, born, writer) = read_file(path, true)?;
            let hash = hex(&Sha256::digest(&bytes));
            Ok((
                path.clone(),
                Seen {
                    identity: Identity {
                        resolved,
                        inode,
                        born,
                        directory,
                    },
                    hash,
                    writer,
                },
                bytes,
            ))
        })
        .collect()
}

/// The candidate of files [`read_sources`] read.
fn candidate_of(read: Vec<(PathBuf, Seen, Vec<u8>)>) -> Candidate {
    let mut files = read.into_iter().map(|(_, _, bytes)| bytes);
    Candidate {
        policy: files.next().unwrap_or_default(),
        module: files.next(),
    }
}

/// Reloads from `sources` on every SIGHUP that `hup` receives (who: `sighup`) until
/// `shutdown` completes. Unlike the watcher, SIGHUP re-applies the files even if they did
/// not change since the last look (e.g. after an admin API change, SIGHUP returns to the
/// files). Create `hup` early: a SIGHUP it received before this runs is applied at once.
pub async fn sighup(
    reloader: Arc<Reloader>,
    sources: Sources,
    mut hup: tokio::signal::unix::Signal,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            got = hup.recv() => {
                if got.is_none() {
                    return;
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

// ---------------------------------------------------------------------------------------
// The admin API's policy endpoints

/// An answer of [`handle_api`]: HTTP status and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    /// HTTP status code.
    pub status: u16,
    /// JSON body (one line).
    pub body: String,
}

impl ApiResponse {
    fn json(status: u16, value: &impl Serialize) -> ApiResponse {
        let mut body = serde_json::to_string(value).unwrap_or_else(|_| "{}".into());
        body.push('\n');
        ApiResponse { status, body }
    }

    fn error(status: u16, message: &str) -> ApiResponse {
        ApiResponse::json(status, &json!({ "error": message }))
    }
}

/// A request to the admin API, as far as the policy endpoints care.
#[derive(Debug, Clone, Copy)]
pub struct ApiRequest<'a> {
    /// `GET`, `POST`, `DELETE`, ...
    pub method: &'a str,
    /// The path, e.g. `/policy/rollback`.
    pub path: &'a str,
    /// The `Authorization` header.
    pub authorization: Option<&'a str>,
    /// The `x-altroute-who` header: the admin's identity (`cli` from `altroute policy`).
    pub who: Option<&'a str>,
    /// The body (a candidate policy for `POST /policy` and `POST /policy/shadow`).
    pub body: &'a [u8],
}

/// Whether `path` is one of the policy endpoints [`handle_api`] answers.
pub fn is_api_path(path: &str) -> bool {
    matches!(path, "/policy" | "/policy/rollback" | "/policy/shadow")
}

/// Answers the policy endpoints (`GET /policy`, `POST /policy`, `POST /policy/rollback`,
/// `POST /policy/shadow`, `DELETE /policy/shadow`). State changes need
/// `Authorization: Bearer <token>`; with no token configured they are refused (403).
/// Blocks while a candidate compiles: call it from a blocking thread.
pub fn handle_api(reloader: &Reloader, token: Option<&str>, req: ApiRequest<'_>) -> ApiResponse {
    let route = (req.method, req.path);
    if route == ("GET", "/policy") {
        let status = reloader.status();
        // With a token configured, only its holder sees the rest: the shadow's recent
        // differences and the last rejection's reasons hold live addresses (an audit
        // read them without one). The short form stays open for monitoring.
        let full = token.is_none() || authorize(token, req.authorization).is_ok();
        let value = if full {
            let mut value = serde_json::to_value(&status).unwrap_or(Value::Null);
            if let Value::Object(map) = &mut value {
                // The short form that monitoring scripts read.
                map.insert("version".into(), json!(status.active.version));
            }
            value
        } else {
            json!({
                "version": status.active.version,
                "active": status.active,
                "activations": status.activations,
                "rejections": status.rejections,
                "audit": status.audit,
                "detail": "the rest needs the bearer token",
            })
        };
        return ApiResponse::json(200, &value);
    }
    let known = matches!(
        route,
        ("POST", "/policy")
            | ("POST", "/policy/rollback")
            | ("POST", "/policy/shadow")
            | ("DELETE", "/policy/shadow")
    );
    if !known {
        return if is_api_path(req.path) {
            ApiResponse::error(405, "method not allowed")
        } else {
            ApiResponse::error(404, "not found")
        };
    }
    if let Err((status, error)) = authorize(token, req.authorization) {
        return ApiResponse::error(status, error);
    }
    let who = who_of(req.who);
    let result = match route {
        ("POST", "/policy") => reloader
            .apply(&who, Candidate::policy(req.body))
            .map(|a| ApiResponse::json(200, &a)),
        ("POST", "/policy/rollback") => reloader.rollback(&who).map(|a| ApiResponse::json(200, &a)),
        ("POST", "/policy/shadow") => reloader
            .start_shadow(&who, Candidate::policy(req.body))
            .map(|v| ApiResponse::json(200, &json!({ "shadow_version": v }))),
        _ => reloader
            .stop_shadow(&who)
            .map(|s| ApiResponse::json(200, &s)),
    };
    result.unwrap_or_else(|e| match e {
        ReloadError::Refused(r) => ApiResponse::json(
            422,
            &json!({ "error": "candidate refused", "version": r.version, "reasons": r.reasons }),
        ),
        ReloadError::NoHistory => ApiResponse::error(409, &e.to_string()),
        ReloadError::NoShadow => ApiResponse::error(404, &e.to_string()),
        other => ApiResponse::error(500, &other.to_string()),
    })
}

/// Whether `authorization` (an `Authorization` header) carries the configured `token`:
/// `Err((403, …))` when no token is configured (changes are disabled), `Err((401, …))`
/// when it does not.
pub(crate) fn authorize(
    token: Option<&str>,
    authorization: Option<&str>,
) -> Result<(), (u16, &'static str)> {
    let Some(expected) = token else {
        return Err((
            403,
            "policy changes through the admin API are disabled: set [admin].token",
        ));
    };
    let given = authorization.and_then(bearer_token);
    if given.is_some_and(|g| same_secret(g, expected)) {
        Ok(())
    } else {
        Err((401, "a valid bearer token is required"))
    }
}

/// `x-altroute-who`: `cli` or `cli:<user>` from `altroute policy` / `altroute queue`,
/// else an admin identity (printable, at most 64 characters; `anonymous` when missing).
/// Self-asserted, like any name a caller gives: the token is what authenticates.
fn who_of(header: Option<&str>) -> Who {
    let id: String = header
        .unwrap_or("")
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(64)
        .collect();
    match id.as_str() {
        "cli" => Who::Cli,
        "" => Who::Admin("anonymous".into()),
        _ => match id.strip_prefix("cli:") {
            Some(user) if !user.trim().is_empty() => Who::CliUser(user.trim().to_string()),
            _ => Who::Admin(id),
        },
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is case-insensitive
/// (RFC 7235 §2.1: `bearer`, `BEARER` too).
pub(crate) fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Compares secrets without stopping at the first difference.
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---------------------------------------------------------------------------------------
// Command line: talk to a running relay's admin endpoint

/// Where the running relay's admin endpoint is, for `altroute policy apply | rollback`.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// The admin endpoint. Defaults to http://127.0.0.1:8025.
    #[arg(long, default_value = "http://127.0.0.1:8025")]
    pub admin: String,
    /// Bearer token ([admin].token). Defaults to $ALTROUTE_ADMIN_TOKEN.
    #[arg(long)]
    pub token: Option<String>,
    /// Who you are, for the audit log and the relay's log (`cli:<who>`). Defaults to
    /// $SUDO_USER, else $USER.
    #[arg(long)]
    pub who: Option<String>,
}

impl AdminArgs {
    /// The `x-altroute-who` value: `cli:<who>`, or `cli` when no name is known.
    fn who_header(&self) -> String {
        let name = self.who.clone().or_else(|| {
            ["SUDO_USER", "USER"]
                .iter()
                .find_map(|v| std::env::var(v).ok().filter(|u| !u.trim().is_empty()))
        });
        // One header line: no control characters (a CR or LF would end it).
        match name.map(|n| n.chars().filter(|c| !c.is_control()).collect::<String>()) {
            Some(n) if !n.trim().is_empty() => format!("cli:{}", n.trim()),
            _ => "cli".to_string(),
        }
    }

    fn token(&self) -> Option<String> {
        self.token
            .clone()
            .or_else(|| std::env::var("ALTROUTE_ADMIN_TOKEN").ok())
    }
}

/// `altroute policy apply FILE`: sends the file to `POST /policy`; prints the answer.
/// Returns 0 when the relay activated it (or already ran it), 1 when it was refused.
pub fn apply_command(file: &Path, args: &AdminArgs) -> anyhow::Result<i32> {
    let body =
        std::fs::read(file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    let (code, text) = admin_request(args, "POST", "/policy", &body)?;
    println!("{}", text.trim_end());
    Ok(if code == 200 { 0 } else { 1 })
}

/// `altroute policy rollback`: `POST /policy/rollback`; prints the answer.
pub fn rollback_command(args: &AdminArgs) -> anyhow::Result<i32> {
    let (code, text) = admin_request(args, "POST", "/policy/rollback", b"")?;
    println!("{}", text.trim_end());
    Ok(if code == 200 { 0 } else { 1 })
}

/// One HTTP/1.1 request to the admin endpoint (plain HTTP on localhost); returns the
/// status code and body.
pub fn admin_request(
    args: &AdminArgs,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};

    let authority = args
        .admin
        .strip_prefix("http://")
        .unwrap_or(&args.admin)
        .trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(authority)
        .map_err(|e| anyhow::anyhow!("cannot reach the admin endpoint {authority}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\
         Content-Length: {}\r\nx-altroute-who: {}\r\n",
        body.len(),
        args.who_header()
    );
    if let Some(token) = args.token() {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed answer from {authority}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("malformed status line from {authority}"))?;
    Ok((code, body.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Instant;

    use proxy_wasm_host::HostConfig;

    use super::*;

    /// A real host and slot, as the policy engine holds them.
    struct Slots {
        host: Host,
        slot: PolicySlot,
        shadow: ShadowSlot,
    }

    impl Target for Slots {
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

    impl Slots {
        /// What the engine does: ask the active plugin, show the question to the shadow.
        fn decide(&self, q: &Query) -> Decision {
            let d = ask(&self.slot.current(), q).unwrap();
            self.shadow.observe(q, &d);
            d
        }
    }

    /// A policy: `strict` domains require TLS (alternate route when the MX has none).
    fn policy(name: &str, strict: &[&str], extra: &str) -> String {
        let domains: Vec<String> = strict.iter().map(|d| format!("{d:?}")).collect();
        format!(
            r#"
[policy]
name = "{name}"

[[hosts]]
name = "secure-relay"
address = "alt.lab.test"

[alternate_secure_route]
host = "secure-relay"

[[tls_compliance]]
name = "partners"
domains = [{}]

[[tests]]
name = "partner without STARTTLS takes the alternate route"
query = {{ phase = "verdict", sender = "a@corp.example", recipient = "b@{}", mx = "mx.x", starttls = "absent" }}
expect = {{ route = "alternate", host = "secure-relay" }}
{extra}
"#,
            domains.join(", "),
            strict[0]
        )
    }

    fn setup(initial: &str) -> (tempfile::TempDir, Arc<Slots>, Reloader) {
        let dir = tempfile::tempdir().unwrap();
        let (policy, json) = prepare(initial.as_bytes()).unwrap();
        let host = Host::new(HostConfig::default()).unwrap();
        let module: Arc<[u8]> = altroute_modules::POLICY.into();
        let plugin = host.load(spec(module.clone(), &policy, &json)).unwrap();
        let slots = Arc::new(Slots {
            host,
            slot: PolicySlot::new(plugin),
            shadow: ShadowSlot::new(),
        });
        let reloader = Reloader::new(
            slots.clone(),
            policy,
            module,
            ReloadSettings::new(dir.path().join("audit/audit.jsonl")),
        )
        .unwrap();
        (dir, slots, reloader)
    }

    fn audit_lines(dir: &tempfile::TempDir) -> Vec<Value> {
        std::fs::read_to_string(dir.path().join("audit/audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn plan(rcpt: &str) -> Query {
        Query::plan("a@corp.example", rcpt)
    }

    fn no_starttls(rcpt: &str) -> Query {
        Query {
            phase: altroute_policy::Phase::Verdict,
            mx: "mx.x".into(),
            ..plan(rcpt)
        }
    }

    #[test]
    fn the_cli_names_its_user() {
        assert_eq!(who_of(Some("cli:carol")).to_string(), "cli:carol");
        assert_eq!(who_of(Some("cli")).to_string(), "cli");
        assert_eq!(who_of(Some("cli:")).to_string(), "admin:cli:");
        assert_eq!(who_of(Some("alice")).to_string(), "admin:alice");
        assert_eq!(who_of(None).to_string(), "admin:anonymous");
        let args = |who: Option<&str>| AdminArgs {
            admin: String::new(),
            token: None,
            who: who.map(str::to_string),
        };
        assert_eq!(args(Some("carol")).who_header(), "cli:carol");
        assert_eq!(args(Some("ca\r\nrol")).who_header(), "cli:carol");
    }

    #[test]
    fn activation_swaps_records_and_summarizes() {
        let (dir, slots, reloader) = setup(&policy("a", &["partner.example"], ""));
        let v1 = reloader.version();
        let before = slots.decide(&no_starttls("x@other.example"));
        assert_eq!(before.route, Route::Direct);

        let b = policy("b", &["partner.example", "other.example"], "");
        let applied = reloader
            .apply(&Who::Admin("alice".into()), Candidate::policy(b.clone()))
            .unwrap();
        assert!(applied.changed);
        assert_eq!(applied.old_version, v1);
        assert_ne!(applied.new_version, v1);
        assert_eq!(reloader.version(), applied.new_version);
        let after = slots.decide(&no_starttls("x@other.example"));
        assert_eq!(after.route, Route::Alternate);
        assert_eq!(after.policy_version, applied.new_version);

        // The same content again changes nothing and records nothing.
        let again = reloader.apply(&Who::Cli, Candidate::policy(b)).unwrap();
        assert!(!again.changed);

        let lines = audit_lines(&dir);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["action"], "start");
        assert_eq!(lines[0]["who"], "startup");
        assert_eq!(lines[1]["action"], "activate");
        assert_eq!(lines[1]["who"], "admin:alice");
        assert_eq!(lines[1]["old_version"], v1.as_str());
        assert_eq!(lines[1]["new_version"], applied.new_version.as_str());
        assert_eq!(
            lines[1]["summary"]["rules"],
            json!({"changed": ["partners"]})
        );
        assert_eq!(lines[1]["summary"]["settings"], json!(["name"]));
        assert_eq!(
            audit::verify(&dir.path().join("audit/audit.jsonl")).unwrap(),
            2
        );

        let status = reloader.status();
        assert_eq!(status.active.version, applied.new_version);
        assert_eq!(status.history.len(), 2);
        assert_eq!(status.activations, 1);
        assert_eq!(status.audit.seq, 2);
    }

    /// A no-op is decided by the content, not by the 64-bit version alone: an active
    /// version whose JSON differs from a candidate's under the same version (a collision,
    /// made here by hand) does not make the candidate a no-op.
    #[test]
    fn a_version_collision_is_not_a_no_op() {
        let a = policy("a", &["partner.example"], "");
        let (_dir, slots, reloader) = setup(&a);
        let again = reloader
            .apply(&Who::Cli, Candidate::policy(a.clone()))
            .unwrap();
        assert!(!again.changed, "the same content is a no-op");
        {
            let mut state = reloader.lock();
            let active = state.history.pop_back().unwrap();
            let (other, other_json) =
                prepare(policy("b", &["partner.example", "other.example"], "").as_bytes()).unwrap();
            assert_ne!(other.version, active.info.version);
            state.history.push_back(Arc::new(Version {
                policy: other,
                json: other_json,
                module: active.module.clone(),
                info: active.info.clone(),
            }));
        }
        let applied = reloader.apply(&Who::Cli, Candidate::policy(a)).unwrap();
        assert!(applied.changed, "same version, other content: applied");
        assert_eq!(applied.old_version, applied.new_version);
        assert_eq!(
            slots.decide(&no_starttls("x@partner.example")).route,
            Route::Alternate
        );
    }

    /// A large organisation's list: compiled, loaded into the module (its `on_configure`
    /// parses 2.5 MB of JSON, under the host's load deadline), self-tested and swapped
    /// like any other, and its decisions made from the pattern index.
    #[test]
    fn a_policy_of_a_hundred_thousand_domains_applies() {
        let (_dir, slots, reloader) = setup(&policy("a", &["partner.example"], ""));
        let domains: Vec<String> = (0..100_000).map(|i| format!("d{i}.example")).collect();
        let refs: Vec<&str> = domains.iter().map(String::as_str).collect();
        let big = policy("big", &refs, "");
        let applied = reloader.apply(&Who::Cli, Candidate::policy(big)).unwrap();
        assert!(applied.changed);
        for rcpt in ["x@d0.example", "x@d54321.example", "x@d99999.example"] {
            let d = slots.decide(&no_starttls(rcpt));
            assert_eq!(d.route, Route::Alternate, "{rcpt}");
            assert_eq!(d.rule, "tls_compliance:partners", "{rcpt}");
            assert_eq!(d.policy_version, applied.new_version);
        }
        assert_eq!(
            slots.decide(&no_starttls("x@d100000.example")).route,
            Route::Direct
        );
    }

    #[test]
    fn bad_candidates_are_refused_and_the_active_version_keeps_serving() {
        let (dir, slots, reloader) = setup(&policy("a", &["partner.example"], ""));
        let v1 = reloader.version();
        let good = policy("b", &["partner.example", "other.example"], "");

        // 1. A module that is not wasm.
        let e = reloader
            .apply(
                &Who::FileWatch,
                Candidate {
                    policy: good.clone().into_bytes(),
                    module: Some(b"\0asm garbage".to_vec()),
                },
            )
            .unwrap_err();
        assert!(matches!(e, ReloadError::Refused(_)), "{e}");
        assert_eq!(reloader.version(), v1);

        // 2. A module that loads but does not answer the contract (the SDK test guest):
        //    only the self-test through the plugin can catch it.
        let e = reloader
            .apply(
                &Who::FileWatch,
                Candidate {
                    policy: good.clone().into_bytes(),
                    module: Some(altroute_modules::TESTGUEST.to_vec()),
                },
            )
            .unwrap_err();
        let ReloadError::Refused(r) = &e else {
            panic!("{e}")
        };
        assert!(
            r.reasons
                .iter()
                .any(|x| x.contains("no decision through the module")),
            "{r:?}"
        );
        assert_eq!(reloader.version(), v1);

        // 3. A policy that does not compile: every diagnostic.
        let broken = "[[hosts]]\nname = \"x\"\nadress = \"typo\"\n";
        let e = reloader
            .apply(&Who::Sighup, Candidate::policy(broken))
            .unwrap_err();
        let ReloadError::Refused(r) = &e else {
            panic!("{e}")
        };
        assert!(r.reasons.iter().any(|x| x.contains("address")), "{r:?}");
        assert_eq!(r.version, None);

        // 4. A policy whose embedded test fails.
        let failing = policy(
            "c",
            &["partner.example"],
            r#"
[[tests]]
name = "wrong on purpose"
query = { phase = "plan", sender = "a@corp.example", recipient = "x@elsewhere.example" }
expect = { tls_required = true }
"#,
        );
        let e = reloader
            .apply(&Who::Cli, Candidate::policy(failing))
            .unwrap_err();
        let ReloadError::Refused(r) = &e else {
            panic!("{e}")
        };
        assert!(
            r.reasons.iter().any(|x| x.contains("wrong on purpose")),
            "{r:?}"
        );

        // Still serving v1, and it still decides.
        assert_eq!(reloader.version(), v1);
        assert_eq!(slots.decide(&plan("b@partner.example")).policy_version, v1);
        let status = reloader.status();
        assert_eq!(status.rejections, 4);
        assert_eq!(status.last_rejection.as_ref().unwrap().who, "cli");
        let lines = audit_lines(&dir);
        let actions: Vec<&str> = lines
            .iter()
            .map(|l| l["action"].as_str().unwrap())
            .collect();
        assert_eq!(actions, ["start", "reject", "reject", "reject", "reject"]);
        assert!(!lines[4]["reasons"].as_array().unwrap().is_empty());
        assert_eq!(lines[2]["who"], "file watch");
    }

    #[test]
    fn rollback_walks_back_through_a_bounded_history() {
        let (dir, _slots, reloader) = setup(&policy("v0", &["partner.example"], ""));
        let v0 = reloader.version();
        let mut versions = vec![v0.clone()];
        for i in 1..=12 {
            let p = policy(&format!("v{i}"), &["partner.example"], "");
            versions.push(
                reloader
                    .apply(&Who::Cli, Candidate::policy(p))
                    .unwrap()
                    .new_version,
            );
        }
        assert_eq!(reloader.status().history.len(), DEFAULT_HISTORY);
        let back = reloader.rollback(&Who::Admin("bob".into())).unwrap();
        assert_eq!(back.old_version, versions[12]);
        assert_eq!(back.new_version, versions[11]);
        assert_eq!(reloader.version(), versions[11]);
        assert_eq!(
            reloader.rollback(&Who::Cli).unwrap().new_version,
            versions[10]
        );
        // 10 kept: versions 3..=12; after two rollbacks 8 remain, back to version 3.
        for expected in (3..=9).rev() {
            assert_eq!(
                reloader.rollback(&Who::Cli).unwrap().new_version,
                versions[expected]
            );
        }
        assert!(matches!(
            reloader.rollback(&Who::Cli),
            Err(ReloadError::NoHistory)
        ));
        let lines = audit_lines(&dir);
        let last = lines.last().unwrap();
        assert_eq!(last["action"], "rollback");
        assert_eq!(lines[13]["who"], "admin:bob");
        assert_eq!(
            audit::verify(&dir.path().join("audit/audit.jsonl")).unwrap(),
            lines.len()
        );
    }

    #[test]
    fn shadow_reports_exactly_the_differing_decisions() {
        let (dir, slots, reloader) = setup(&policy("a", &["partner.example"], ""));
        let candidate = policy("b", &["partner.example", "shadowed.example"], "");
        let shadow_version = reloader
            .start_shadow(&Who::Admin("carol".into()), Candidate::policy(candidate))
            .unwrap();
        assert_ne!(shadow_version, reloader.version());

        // 3 recipients × 2 phases; only shadowed.example differs, in both phases.
        for rcpt in [
            "x@partner.example",
            "y@shadowed.example",
            "z@elsewhere.example",
        ] {
            let d = slots.decide(&plan(rcpt));
            assert_eq!(
                d.policy_version,
                reloader.version(),
                "the shadow never decides"
            );
            slots.decide(&no_starttls(rcpt));
        }
        let status = reloader.status().shadow.unwrap();
        assert_eq!(status.decisions, 6);
        assert_eq!(status.differences, 2);
        assert!(
            status
                .recent
                .iter()
                .all(|d| d.recipient == "y@shadowed.example")
        );
        let verdict = status.recent.iter().find(|d| d.phase == "verdict").unwrap();
        assert_eq!(verdict.active.route, Route::Direct);
        assert_eq!(verdict.shadow.as_ref().unwrap().route, Route::Alternate);

        // Replaced by another shadow: the first one's figures are audited as a stop
        // (they once went only to the log).
        let other = policy("c", &["partner.example", "other.example"], "");
        let other_version = reloader
            .start_shadow(&Who::Admin("dave".into()), Candidate::policy(other))
            .unwrap();
        let stopped = reloader.stop_shadow(&Who::Cli).unwrap();
        assert_eq!(stopped.version, other_version);
        assert!(reloader.status().shadow.is_none());
        assert!(matches!(
            reloader.stop_shadow(&Who::Cli),
            Err(ReloadError::NoShadow)
        ));
        let lines = audit_lines(&dir);
        assert_eq!(lines[1]["action"], "shadow-start");
        assert_eq!(
            lines[1]["summary"]["rules"],
            json!({"changed": ["partners"]})
        );
        assert_eq!(lines[2]["action"], "shadow-stop");
        assert_eq!(lines[2]["who"], "admin:dave");
        assert_eq!(lines[2]["summary"]["differences"], 2);
        assert_eq!(lines[2]["summary"]["replaced_by"], json!(other_version));
        assert_eq!(lines[3]["action"], "shadow-start");
        assert_eq!(lines[4]["action"], "shadow-stop");
        assert_eq!(lines[4]["summary"]["differences"], 0);
    }

    #[test]
    fn restart_names_the_version_that_served_last_as_old() {
        let (dir, slots, reloader) = setup(&policy("a", &["partner.example"], ""));
        let b = policy("b", &["partner.example", "other.example"], "");
        let vb = reloader
            .apply(&Who::Cli, Candidate::policy(b))
            .unwrap()
            .new_version;
        // Lines after the activation that name versions which never served.
        let c = policy("c", &["partner.example", "shadowed.example"], "");
        let vc = reloader
            .start_shadow(&Who::Cli, Candidate::policy(c.clone()))
            .unwrap();
        reloader.stop_shadow(&Who::Cli).unwrap();
        let failing = policy(
            "d",
            &["partner.example"],
            r#"
[[tests]]
name = "wrong on purpose"
query = { phase = "plan", sender = "a@corp.example", recipient = "b@partner.example" }
expect = { route = "alternate" }
"#,
        );
        assert!(
            reloader
                .apply(&Who::Cli, Candidate::policy(failing))
                .is_err()
        );
        drop(reloader);

        let (policy_c, _) = prepare(c.as_bytes()).unwrap();
        let _restarted = Reloader::new(
            slots.clone(),
            policy_c,
            altroute_modules::POLICY.into(),
            ReloadSettings::new(dir.path().join("audit/audit.jsonl")),
        )
        .unwrap();
        let lines = audit_lines(&dir);
        let actions: Vec<&str> = lines
            .iter()
            .map(|l| l["action"].as_str().unwrap())
            .collect();
        assert_eq!(
            actions,
            [
                "start",
                "activate",
                "shadow-start",
                "shadow-stop",
                "reject",
                "start"
            ]
        );
        let start = lines.last().unwrap();
        assert_eq!(start["old_version"], vb.as_str(), "{start}");
        assert_eq!(start["new_version"], vc.as_str(), "{start}");
    }

    /// Waits (bounded, so a broken watcher fails instead of hanging) until `f` holds.
    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "gave up waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kubernetes ConfigMap layout: `policy.toml -> ..data/policy.toml`,
    /// `..data -> ..<timestamp>/`; an update makes a new timestamped directory and
    /// renames a new `..data_tmp` link over `..data`.
    fn configmap_swap(dir: &Path, generation: &str, content: &str) {
        let gen_dir = dir.join(generation);
        std::fs::create_dir(&gen_dir).unwrap();
        std::fs::write(gen_dir.join("policy.toml"), content).unwrap();
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(generation, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
    }

    #[test]
    fn file_watch_follows_a_configmap_symlink_swap() {
        let a = policy("a", &["partner.example"], "");
        let (dir, _slots, reloader) = setup(&a);
        let reloader = Arc::new(reloader);
        let cm = dir.path().join("configmap");
        std::fs::create_dir(&cm).unwrap();
        configmap_swap(&cm, "..2026_11_25_1", &a);
        std::os::unix::fs::symlink("..data/policy.toml", cm.join("policy.toml")).unwrap();
        let sources = Sources {
            policy: cm.join("policy.toml"),
            module: None,
        };
        let watch = watch(reloader.clone(), sources, DEFAULT_DEBOUNCE).unwrap();
        // The file's directory and the one above, and the generation it resolves to.
        assert_eq!(watch.directories().len(), 3, "{:?}", watch.directories());
        let v1 = reloader.version();

        let b = policy("b", &["partner.example", "other.example"], "");
        let (expected, _) = prepare(b.as_bytes()).unwrap();
        configmap_swap(&cm, "..2026_11_25_2", &b);
        wait_until("the swapped policy", || {
            reloader.version() == expected.version
        });

        // Events that do not change the content do not reload.
        std::fs::write(cm.join("unrelated"), "x").unwrap();
        configmap_swap(&cm, "..2026_11_25_3", &b);
        // A broken file is refused once, then the fixed one goes live.
        configmap_swap(&cm, "..2026_11_25_4", "not = [valid");
        wait_until("the refusal", || reloader.status().rejections == 1);
        configmap_swap(&cm, "..2026_11_25_5", &a);
        wait_until("the original policy", || reloader.version() == v1);
        // The audit line is written after the swap, under the reloader's lock.
        wait_until("the audit entry", || reloader.status().activations == 2);

        let lines = audit_lines(&dir);
        let actions: Vec<(&str, &str)> = lines
            .iter()
            .map(|l| (l["action"].as_str().unwrap(), l["who"].as_str().unwrap()))
            .collect();
        assert_eq!(
            actions,
            [
                ("start", "startup"),
                ("activate", "file watch"),
                ("reject", "file watch"),
                ("activate", "file watch")
            ]
        );
    }

    /// The watcher applies a policy file only when it arrived whole: renamed into place
    /// or behind a swapped symlink. Written in place (scp, `rsync --inplace`,
    /// `cat > policy.toml`, an editor that writes in place), it may be read half-written:
    /// an audit's slow writer got the first half activated, a valid policy without its
    /// TLS rule and its tests; another `touch`ed the file mid-write to defeat a check on
    /// closes. Such a change is refused once (audited) and never applied; a FIFO or an
    /// oversized file is refused without blocking the watcher; the next file renamed
    /// into place goes live.
    #[test]
    fn file_watch_applies_only_files_renamed_into_place() {
        use std::io::Write;
        let a = policy("a", &["partner.example"], "");
        let (dir, _slots, reloader) = setup(&a);
        let reloader = Arc::new(reloader);
        let watched = dir.path().join("watched");
        std::fs::create_dir(&watched).unwrap();
        let file = watched.join("policy.toml");
        std::fs::write(&file, &a).unwrap();
        let sources = Sources {
            policy: file.clone(),
            module: None,
        };
        let _watch = watch(reloader.clone(), sources, DEFAULT_DEBOUNCE).unwrap();
        let v1 = reloader.version();

        // b's first half is itself a valid policy (one rule fewer, no tests).
        let b = policy("b", &["partner.example", "other.example"], "");
        let (expected, _) = prepare(b.as_bytes()).unwrap();
        let cut = b.find("[[tls_compliance]]").unwrap();
        assert!(
            prepare(&b.as_bytes()[..cut]).is_ok(),
            "the half must compile"
        );
        let mut writer = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&file)
            .unwrap();
        writer.write_all(&b.as_bytes()[..cut]).unwrap();
        writer.flush().unwrap();
        // Another process closes the file mid-write, a neighbour file is busy.
        for i in 0..15 {
            drop(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&file)
                    .unwrap(),
            );
            std::fs::write(watched.join("neighbour"), format!("{i}")).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        writer.write_all(&b.as_bytes()[cut..]).unwrap();
        drop(writer);
        wait_until("the refusal", || reloader.status().rejections == 1);
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(reloader.version(), v1, "a file written in place went live");
        assert_eq!(reloader.status().rejections, 1, "refused once per file");
        let reasons = reloader.status().last_rejection.unwrap().reasons;
        assert!(reasons[0].contains("changed in place"), "{reasons:?}");

        // A FIFO renamed into its place: refused at once (the watcher goes on; within the
        // minute the refusal is logged, not audited again).
        let fifo = watched.join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        std::fs::rename(&fifo, &file).unwrap();
        let err = read_source(&file).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        // A sparse file over the limit: refused without being read.
        let big = watched.join("big.toml");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_SOURCE_FILE + 1)
            .unwrap();
        let err = read_source(&big).unwrap_err().to_string();
        assert!(err.contains("64 MiB"), "{err}");
        // Renamed into place while its writer still has half of it to write: not read
        // while the writer is at it (an audit got the half activated so), and written
        // after its rename, it is a change in place: refused, not applied.
        let tmp = watched.join(".policy.toml.new");
        let mut slow = std::fs::File::create(&tmp).unwrap();
        slow.write_all(&b.as_bytes()[..cut]).unwrap();
        slow.flush().unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(reloader.version(), v1, "half a renamed file went live");
        slow.write_all(&b.as_bytes()[cut..]).unwrap();
        drop(slow);
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            reloader.version(),
            v1,
            "a file written after its rename went live"
        );
        // The whole file, renamed into place: applied.
        let tmp = watched.join(".policy.toml.new2");
        std::fs::write(&tmp, &b).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        wait_until("the whole renamed file", || {
            reloader.version() == expected.version
        });
        // The audit line is written after the swap, under the reloader's lock.
        wait_until("the audit entry", || reloader.status().activations == 1);
        let lines = audit_lines(&dir);
        let actions: Vec<&str> = lines
            .iter()
            .map(|l| l["action"].as_str().unwrap())
            .collect();
        assert_eq!(actions, ["start", "reject", "activate"]);
    }

    /// A symlink swapped to a file written just before, in the same moment (`cp v2
    /// q2.toml && ln -sfn q2.toml .l && mv -T .l policy.toml`), arrived whole: applied at
    /// once. An audit's such swap was refused as written in place (the target's write fell
    /// in the same debounce window), and then applied, unlogged and unaudited, at a later
    /// unrelated event. A target written after its swap is refused, audited even within a
    /// minute of another refusal, shown in the status, and not applied at a later event.
    #[test]
    fn file_watch_applies_a_symlink_swapped_to_a_file_just_written() {
        let a = policy("a", &["partner.example"], "");
        let (dir, _slots, reloader) = setup(&a);
        let reloader = Arc::new(reloader);
        let watched = dir.path().join("watched");
        std::fs::create_dir(&watched).unwrap();
        std::fs::write(watched.join("v1.toml"), &a).unwrap();
        let file = watched.join("policy.toml");
        std::os::unix::fs::symlink("v1.toml", &file).unwrap();
        let swap = |target: &str| {
            let tmp = watched.join(".policy.toml.lnk");
            std::os::unix::fs::symlink(target, &tmp).unwrap();
            std::fs::rename(&tmp, &file).unwrap();
        };
        let sources = Sources {
            policy: file.clone(),
            module: None,
        };
        let _watch = watch(reloader.clone(), sources, DEFAULT_DEBOUNCE).unwrap();

        let b = policy("b", &["partner.example", "other.example"], "");
        let (expected, _) = prepare(b.as_bytes()).unwrap();
        std::fs::write(watched.join("v2.toml"), &b).unwrap();
        swap("v2.toml");
        wait_until("the swapped policy", || {
            reloader.version() == expected.version
        });
        wait_until("its audit entry", || reloader.status().activations == 1);

        // A refusal for another reason (a FIFO behind the link), audited...
        let made = std::process::Command::new("mkfifo")
            .arg(watched.join("fifo"))
            .status()
            .unwrap();
        assert!(made.success());
        swap("fifo");
        wait_until("the FIFO's refusal", || reloader.status().rejections == 1);
        // ...then, within the minute, a target written after the link was swapped to it.
        let c = policy("c", &["partner.example", "third.example"], "");
        std::fs::write(watched.join("v3.toml"), "").unwrap();
        swap("v3.toml");
        std::fs::write(watched.join("v3.toml"), &c).unwrap();
        wait_until("the refusal in place", || reloader.status().rejections == 2);
        let reasons = reloader.status().last_rejection.unwrap().reasons;
        assert!(reasons[0].contains("changed in place"), "{reasons:?}");
        // An unrelated event later does not apply it.
        std::fs::write(watched.join("unrelated"), "x").unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            reloader.version(),
            expected.version,
            "a file refused as written in place went live at an unrelated event"
        );
        let lines = audit_lines(&dir);
        let actions: Vec<&str> = lines
            .iter()
            .map(|l| l["action"].as_str().unwrap())
            .collect();
        assert_eq!(actions, ["start", "activate", "reject", "reject"]);
        assert!(
            lines[3]["reasons"][0]
                .as_str()
                .unwrap()
                .contains("changed in place"),
            "{:?}",
            lines[3]
        );
        // The same file linked anew (`ln -sf v3.toml policy.toml`: a fresh arrival): applied.
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink("v3.toml", &file).unwrap();
        let (expected_c, _) = prepare(c.as_bytes()).unwrap();
        wait_until("the fresh link", || {
            reloader.version() == expected_c.version
        });
    }

    /// The watch starts inside a runtime, as `serve` starts it: its first look takes a
    /// read lease, and making SIGIO harmless once built a runtime there, which panicked
    /// (the relay could not start with the default `watch = true`).
    #[tokio::test]
    async fn file_watch_starts_inside_a_runtime() {
        let a = policy("a", &["partner.example"], "");
        let (dir, _slots, reloader) = setup(&a);
        let file = dir.path().join("policy.toml");
        std::fs::write(&file, &a).unwrap();
        let sources = Sources {
            policy: file,
            module: None,
        };
        let watch = watch(Arc::new(reloader), sources, DEFAULT_DEBOUNCE).unwrap();
        assert!(!watch.directories().is_empty());
    }

    /// A release directory swapped behind a symlink (`current -> releases/N`, as
    /// Capistrano deploys) is a change that arrived whole, and the new release's
    /// directory is watched from then on: an audit's swap went unseen, and so did every
    /// later change in the new release.
    #[test]
    fn file_watch_follows_a_swapped_release_directory() {
        let a = policy("a", &["partner.example"], "");
        let (dir, _slots, reloader) = setup(&a);
        let reloader = Arc::new(reloader);
        let app = dir.path().join("app");
        for r in ["releases/1", "releases/2"] {
            std::fs::create_dir_all(app.join(r)).unwrap();
        }
        std::fs::write(app.join("releases/1/policy.toml"), &a).unwrap();
        std::os::unix::fs::symlink("releases/1", app.join("current")).unwrap();
        let sources = Sources {
            policy: app.join("current/policy.toml"),
            module: None,
        };
        let _watch = watch(reloader.clone(), sources, DEFAULT_DEBOUNCE).unwrap();
        let b = policy("b", &["partner.example", "b.example"], "");
        let (vb, _) = prepare(b.as_bytes()).unwrap();
        std::fs::write(app.join("releases/2/policy.toml"), &b).unwrap();
        std::os::unix::fs::symlink("releases/2", app.join("current.new")).unwrap();
        std::fs::rename(app.join("current.new"), app.join("current")).unwrap();
        wait_until("the new release", || reloader.version() == vb.version);
        let c = policy("c", &["partner.example", "c.example"], "");
        let (vc, _) = prepare(c.as_bytes()).unwrap();
        std::fs::write(app.join("releases/2/.policy.toml.tmp"), &c).unwrap();
        std::fs::rename(
            app.join("releases/2/.policy.toml.tmp"),
            app.join("releases/2/policy.toml"),
        )
        .unwrap();
        wait_until("a change in the new release", || {
            reloader.version() == vc.version
        });
    }

    /// `GET /policy` does not wait for a change in progress (an audit's status request
    /// timed out while a gigabyte candidate compiled), and shows each change once made.
    #[test]
    fn status_answers_while_a_change_holds_the_pipeline() {
        let (_dir, _slots, reloader) = setup(&policy("a", &["partner.example"], ""));
        let reloader = Arc::new(reloader);
        let v1 = reloader.version();
        let held = reloader.lock();
        let (tx, rx) = std::sync::mpsc::channel();
        let r = reloader.clone();
        std::thread::spawn(move || tx.send(r.status().active.version).unwrap());
        // Generous: only a deadlock fails this.
        let seen = rx.recv_timeout(Duration::from_secs(30));
        drop(held);
        assert_eq!(seen.as_deref(), Ok(v1.as_str()));
        let b = policy("b", &["partner.example", "b.example"], "");
        let applied = reloader.apply(&Who::Cli, Candidate::policy(b)).unwrap();
        let status = reloader.status();
        assert_eq!(status.active.version, applied.new_version);
        assert_eq!(status.activations, 1);
        assert_eq!(status.history.len(), 2);
    }

    #[test]
    fn admin_api_needs_the_token_and_reports_outcomes() {
        let (dir, _slots, reloader) = setup(&policy("a", &["partner.example"], ""));
        let b = policy("b", &["partner.example", "b.example"], "");
        let req = |method, path, auth, body: &'static [u8]| ApiRequest {
            method,
            path,
            authorization: auth,
            who: Some("dora"),
            body,
        };
        let b: &'static [u8] = Box::leak(b.into_bytes().into_boxed_slice());
        let tok = Some("Bearer s3cret");
        // No token configured: refused. Wrong or missing token: 401.
        assert_eq!(
            handle_api(&reloader, None, req("POST", "/policy", tok, b)).status,
            403
        );
        let r = handle_api(&reloader, Some("s3cret"), req("POST", "/policy", None, b));
        assert_eq!(r.status, 401);
        let bad = Some("Bearer s3creT");
        let r = handle_api(&reloader, Some("s3cret"), req("POST", "/policy", bad, b));
        assert_eq!(r.status, 401);
        assert_eq!(reloader.status().activations, 0);
        // Reading without the token: the short form.
        let r = handle_api(&reloader, Some("s3cret"), req("GET", "/policy", None, b""));
        assert_eq!(r.status, 200);
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["version"], v["active"]["version"]);
        assert!(v.get("history").is_none(), "{v}");
        let r = handle_api(&reloader, Some("s3cret"), req("GET", "/policy", tok, b""));
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert!(v.get("history").is_some(), "{v}");

        // The scheme is case-insensitive.
        let lower = Some("bearer s3cret");
        let r = handle_api(&reloader, Some("s3cret"), req("POST", "/policy", lower, b));
        assert_eq!(r.status, 200, "{}", r.body);
        let r = handle_api(
            &reloader,
            Some("s3cret"),
            req("POST", "/policy", tok, b"x = ["),
        );
        assert_eq!(r.status, 422, "{}", r.body);
        let r = handle_api(
            &reloader,
            Some("s3cret"),
            req("POST", "/policy/rollback", tok, b""),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let r = handle_api(
            &reloader,
            Some("s3cret"),
            req("POST", "/policy/rollback", tok, b""),
        );
        assert_eq!(r.status, 409, "{}", r.body);
        let r = handle_api(
            &reloader,
            Some("s3cret"),
            req("DELETE", "/policy/shadow", tok, b""),
        );
        assert_eq!(r.status, 404, "{}", r.body);
        let r = handle_api(&reloader, Some("s3cret"), req("PUT", "/policy", tok, b""));
        assert_eq!(r.status, 405);
        let lines = audit_lines(&dir);
        assert_eq!(lines[1]["who"], "admin:dora");
        assert_eq!(
            lines.len(),
            4,
            "start, activate, reject, rollback: {lines:?}"
        );
    }

    #[tokio::test]
    async fn sighup_reloads_the_files() {
        let a = policy("a", &["partner.example"], "");
        let (dir, _slots, reloader) = setup(&a);
        let reloader = Arc::new(reloader);
        let file = dir.path().join("policy.toml");
        std::fs::write(&file, policy("b", &["partner.example", "b.example"], "")).unwrap();
        let (expected, _) = prepare(&std::fs::read(&file).unwrap()).unwrap();
        // Our own handler first: from here on SIGHUP cannot kill the test process.
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(sighup(
            reloader.clone(),
            Sources {
                policy: file.clone(),
                module: None,
            },
            hup,
            async {
                let _ = stopped.await;
            },
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        while reloader.version() != expected.version {
            assert!(Instant::now() < deadline, "SIGHUP did not reload");
            let ok = std::process::Command::new("kill")
                .args(["-HUP", &std::process::id().to_string()])
                .status()
                .unwrap()
                .success();
            assert!(ok);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = stop.send(());
        task.await.unwrap();
        let lines = audit_lines(&dir);
        assert_eq!(lines[1]["who"], "sighup");
        assert_eq!(lines[1]["action"], "activate");
    }
}
