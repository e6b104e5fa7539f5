//! The audit log of policy changes: append-only JSON lines, hash-chained so that a
//! changed, removed, reordered or inserted line shows.
//!
//! # Core concepts
//!
//! - One line per event: activation, rejection (with every reason), shadow start/stop,
//!   rollback and the version loaded at start-up. Fields: `seq` (1, 2, ...), `time`
//!   (RFC 3339, UTC), `who` (`admin:<identity>`, `file watch`, `sighup`, `cli`,
//!   `startup`), `action`, `old_version`, `new_version`, `summary` (what changed, from
//!   [`summarize`]), `reasons`, `prev_hash`, `hash`.
//! - `hash` is the SHA-256 (hex) of the line's canonical JSON without the `hash` field:
//!   compact, object keys sorted at every level. `prev_hash` is the previous line's
//!   `hash`; the first line's is 64 zeros ([`GENESIS`]).
//! - [`AuditLog::append`] writes one line and fsyncs before returning: an acknowledged
//!   change is on disk.
//! - [`verify`] walks the chain and names the first broken line. Cutting lines off the
//!   end keeps a valid chain; compare the head ([`AuditLog::head`], shown by
//!   `GET /policy`) with [`verify`]'s count to see that.
//!
//! # Example
//!
//! ```
//! use altroute::audit::{AuditLog, Entry, verify};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("audit.jsonl");
//! let mut log = AuditLog::open(&path).unwrap();
//! log.append(Entry::new("cli", "activate").versions(Some("sha256:aa"), Some("sha256:bb")))
//!     .unwrap();
//! assert_eq!(verify(&path).unwrap(), 1);
//! ```

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use altroute_policy::Policy;

/// `prev_hash` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A problem with the audit log at `path`: `line` is 1-based (0: the file as a whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit log {}{}: {what}", path.display(), LineNo(*line))]
pub struct AuditError {
    /// The file.
    pub path: PathBuf,
    /// The first line that is wrong (0: the file itself could not be read or written).
    pub line: usize,
    /// What is wrong with it.
    pub what: String,
}

/// `, line N`, or nothing for line 0 (the file as a whole).
struct LineNo(usize);

impl std::fmt::Display for LineNo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0 => Ok(()),
            n => write!(f, ", line {n}"),
        }
    }
}

impl AuditError {
    fn file(path: &Path, e: &std::io::Error) -> AuditError {
        AuditError {
            path: path.to_path_buf(),
            line: 0,
            what: e.to_string(),
        }
    }

    fn line(path: &Path, line: usize, what: impl Into<String>) -> AuditError {
        AuditError {
            path: path.to_path_buf(),
            line,
            what: what.into(),
        }
    }
}

/// One event to record. `seq`, `time` and the hashes are filled in by [`AuditLog::append`].
#[derive(Debug, Clone)]
pub struct Entry {
    /// `admin:<identity>`, `file watch`, `sighup`, `cli`, `startup` or `audit`.
    pub who: String,
    /// `activate`, `reject`, `rollback`, `shadow-start`, `shadow-stop`, `shadow-reject`,
    /// `start`; `repair` (who: `audit`) when [`AuditLog::open`] cut off a torn line,
    /// `continue` (who: `audit`) when [`AuditLog::append`] found the file moved away.
    pub action: String,
    /// The version serving before the event.
    pub old_version: Option<String>,
    /// The candidate's version (for a rejection: the one refused, when it got that far).
    pub new_version: Option<String>,
    /// What changed (see [`summarize`]); `{}` when nothing is known.
    pub summary: Value,
    /// Why a candidate was refused; empty otherwise.
    pub reasons: Vec<String>,
}

impl Entry {
    /// An event without versions, summary or reasons.
    pub fn new(who: impl Into<String>, action: impl Into<String>) -> Entry {
        Entry {
            who: who.into(),
            action: action.into(),
            old_version: None,
            new_version: None,
            summary: Value::Object(Map::new()),
            reasons: Vec::new(),
        }
    }

    /// Sets the old and new versions.
    pub fn versions(mut self, old: Option<&str>, new: Option<&str>) -> Entry {
        self.old_version = old.map(str::to_string);
        self.new_version = new.map(str::to_string);
        self
    }

    /// Sets the summary.
    pub fn summary(mut self, summary: Value) -> Entry {
        self.summary = summary;
        self
    }

    /// Sets the reasons.
    pub fn reasons(mut self, reasons: Vec<String>) -> Entry {
        self.reasons = reasons;
        self
    }
}

/// What [`AuditLog::append`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The line's sequence number.
    pub seq: u64,
    /// The line's hash.
    pub hash: String,
    /// Set when the file had been moved, deleted, replaced or truncated: what happened. A
    /// `continue` line was written at the path first (see [`AuditLog::append`]).
    pub reopened: Option<String>,
}

/// The audit log, open for appending. Not shared: wrap it in a mutex.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    seq: u64,
    last_hash: String,
    /// The file's length after our last write: a shorter file was truncated under us.
    len: u64,
}

impl AuditLog {
    /// Opens (creating it and its directory if needed) the log at `path` and continues its
    /// chain from the last line. A log whose chain is broken is still appended to (the
    /// break stays visible to [`verify`]); a last line that is not JSON is an error.
    ///
    /// Bytes after the last newline are a write that never completed (a crash, a full
    /// disk): every line is one write followed by an fsync before the change is reported,
    /// so no change was acknowledged with them. They are cut off (with a warning) and a
    /// `repair` line records where and how many bytes.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            crate::files::create_private_dir_all(parent)
                .map_err(|e| AuditError::file(parent, &e))?;
        }
        let mut bytes = match crate::files::read_regular(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(AuditError::file(path, &e)),
        };
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let torn = bytes.len() - complete;
        if torn > 0 {
            let cut = |e: std::io::Error| AuditError::file(path, &e);
            let f =
                crate::files::open_regular(path, OpenOptions::new().write(true)).map_err(cut)?;
            f.set_len(complete as u64)
                .and_then(|()| f.sync_all())
                .map_err(cut)?;
            bytes.truncate(complete);
            tracing::warn!(
                path = %path.display(),
                offset = complete,
                bytes = torn,
                "audit log: cut off a torn last line (an interrupted write)"
            );
        }
        let (mut seq, mut last_hash) = (0, GENESIS.to_string());
        let pieces: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
        if let Some((index, last)) = pieces.iter().enumerate().rev().find(|(_, l)| !l.is_empty()) {
            let bad = |what: String| AuditError::line(path, index + 1, what);
            let value: Value =
                serde_json::from_slice(last).map_err(|e| bad(format!("not JSON: {e}")))?;
            seq = value
                .get("seq")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad("no seq".into()))?;
            last_hash = value
                .get("hash")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("no hash".into()))?
                .to_string();
        }
        let file = crate::files::open_regular(path, OpenOptions::new().create(true).append(true))
            .map_err(|e| AuditError::file(path, &e))?;
        // A new file's directory entry must be durable too.
        if seq == 0
            && let Some(parent) = path.parent()
            && let Ok(dir) = File::open(if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            })
        {
            let _ = dir.sync_all();
        }
        let len = file
            .metadata()
            .map_err(|e| AuditError::file(path, &e))?
            .len();
        let mut log = AuditLog {
            path: path.to_path_buf(),
            file,
            seq,
            last_hash,
            len,
        };
        if torn > 0 {
            log.write_line(
                Entry::new("audit", "repair")
                    .summary(json!({ "torn_line": { "offset": complete, "bytes": torn } })),
            )?;
        }
        Ok(log)
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last line's sequence number (0: empty) and hash ([`GENESIS`]: empty).
    pub fn head(&self) -> (u64, &str) {
        (self.seq, &self.last_hash)
    }

    /// Appends one line and fsyncs it; logs the new head (seq and hash) at info level, so
    /// that it can be kept elsewhere.
    ///
    /// First it checks that the path still names the open file with all it held. If the
    /// file was moved away (logrotate), deleted, replaced or truncated, the line would go
    /// where nobody looks: instead the file at the path is opened (created if need be) and
    /// the chain continues there from the last head, the first line being a `continue`
    /// (who: `audit`) whose `prev_hash` and `seq` follow the last line written before.
    /// [`Appended::reopened`] says what happened; a warning is logged.
    pub fn append(&mut self, entry: Entry) -> Result<Appended, AuditError> {
        let reopened = self.follow_path()?;
        if let Some(why) = &reopened {
            let (seq, hash) = (self.seq, self.last_hash.clone());
            self.write_line(Entry::new("audit", "continue").summary(json!({
                "why": why,
                "continues": { "seq": seq, "hash": hash },
            })))?;
        }
        let mut appended = self.write_line(entry)?;
        appended.reopened = reopened;
        Ok(appended)
    }

    /// `None` if the path still names the open file, at least as long as we left it;
    /// otherwise opens the file at the path and says what had happened.
    fn follow_path(&mut self) -> Result<Option<String>, AuditError> {
        use std::os::unix::fs::MetadataExt as _;
        let open = self
            .file
            .metadata()
            .map_err(|e| AuditError::file(&self.path, &e))?;
        let why = match std::fs::metadata(&self.path) {
            Ok(m) if m.dev() == open.dev() && m.ino() == open.ino() => {
                if open.len() >= self.len {
                    return Ok(None);
                }
                format!(
                    "the file was truncated to {} bytes (after seq {} it held {})",
                    open.len(),
                    self.seq,
                    self.len
                )
            }
            Ok(_) => "the path names another file (the log was moved away or replaced)".into(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                "the file was moved away or deleted".into()
            }
            Err(e) => return Err(AuditError::file(&self.path, &e)),
        };
        let file =
            crate::files::open_regular(&self.path, OpenOptions::new().create(true).append(true))
                .map_err(|e| AuditError::file(&self.path, &e))?;
        if let Some(parent) = self.path.parent()
            && let Ok(dir) = File::open(if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            })
        {
            let _ = dir.sync_all();
        }
        self.len = file
            .metadata()
            .map_err(|e| AuditError::file(&self.path, &e))?
            .len();
        self.file = file;
        tracing::warn!(
            path = %self.path.display(),
            seq = self.seq,
            hash = %self.last_hash,
            "audit log: {why}; the chain continues in the file at the path"
        );
        Ok(Some(why))
    }

    /// Writes one line to the open file and fsyncs it.
    fn write_line(&mut self, entry: Entry) -> Result<Appended, AuditError> {
        let seq = self.seq + 1;
        let mut line = json!({
            "seq": seq,
            "time": rfc3339(SystemTime::now()),
            "who": entry.who,
            "action": entry.action,
            "old_version": entry.old_version,
            "new_version": entry.new_version,
            "summary": entry.summary,
            "reasons": entry.reasons,
            "prev_hash": self.last_hash,
        });
        let hash = line_hash(&line);
        if let Value::Object(map) = &mut line {
            map.insert("hash".into(), Value::String(hash.clone()));
        }
        let mut text = canonical(&line);
        text.push('\n');
        let line_no = usize::try_from(seq).unwrap_or(usize::MAX);
        let before = self
            .file
            .metadata()
            .map_err(|e| AuditError::line(&self.path, line_no, e.to_string()))?
            .len();
        // One write call per line: O_APPEND keeps a line in one piece.
        let written = self
            .file
            .write_all(text.as_bytes())
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // A line that is not acknowledged must not stay, not even in part: the next
            // line would follow a torn one, and `verify` would call that tampering.
            let undone = self
                .file
                .set_len(before)
                .and_then(|()| self.file.sync_data());
            let what = match undone {
                Ok(()) => format!("{e} (nothing written)"),
                Err(u) => format!("{e}; cutting the partial line off failed too: {u}"),
            };
            return Err(AuditError::line(&self.path, line_no, what));
        }
        self.seq = seq;
        self.last_hash = hash.clone();
        self.len = before + text.len() as u64;
        tracing::info!(
            path = %self.path.display(),
            seq,
            hash = %hash,
            action = %entry_action(&line),
            "audit log head"
        );
        Ok(Appended {
            seq,
            hash,
            reopened: None,
        })
    }
}

fn entry_action(line: &Value) -> &str {
    line.get("action").and_then(Value::as_str).unwrap_or("")
}

/// What [`verify_chain`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The number of entries.
    pub entries: usize,
    /// When the file starts with a `continue` line (the log was rotated or deleted under
    /// the relay): the seq and hash of the last line before, in the earlier file.
    pub continues: Option<(u64, String)>,
}

/// Checks the whole chain of the log at `path`; returns the number of entries.
///
/// Detects a changed line (its hash no longer matches), a removed, reordered or inserted
/// line (`prev_hash` or `seq` no longer follow), a line not in canonical form. Each error
/// names the first bad line. See [`verify_chain`].
pub fn verify(path: &Path) -> Result<usize, AuditError> {
    verify_chain(path).map(|c| c.entries)
}

/// [`verify`], also saying what an earlier file the log continues: only the first line
/// may be a `continue` (who: `audit`), whose `prev_hash` and `seq` follow the earlier
/// file's last line instead of [`GENESIS`] and 1.
pub fn verify_chain(path: &Path) -> Result<Chain, AuditError> {
    let text = std::fs::read_to_string(path).map_err(|e| AuditError::file(path, &e))?;
    let mut prev = GENESIS.to_string();
    let mut count = 0usize;
    let mut next_seq = 1u64;
    let mut continues = None;
    for (index, line) in text.split('\n').enumerate() {
        let number = index + 1;
        if line.is_empty() {
            // Only the final newline may leave an empty piece.
            if index + 1 == text.split('\n').count() {
                break;
            }
            return Err(AuditError::line(path, number, "empty line"));
        }
        let bad = |what: String| AuditError::line(path, number, what);
        let mut value: Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        // What was hashed is the canonical form; any other spelling of it (a key twice,
        // of which the parser keeps one) could show a reader something else.
        if canonical(&value) != line {
            return Err(bad(
                "not in canonical form (compact, keys sorted, each key once)".into(),
            ));
        }
        let Value::Object(map) = &mut value else {
            return Err(bad("not a JSON object".into()));
        };
        let Some(Value::String(hash)) = map.remove("hash") else {
            return Err(bad("no hash".into()));
        };
        let computed = line_hash(&Value::Object(map.clone()));
        if computed != hash {
            return Err(bad(format!(
                "content changed: hash is {hash}, the content hashes to {computed}"
            )));
        }
        if count == 0
            && map.get("action").and_then(Value::as_str) == Some("continue")
            && map.get("who").and_then(Value::as_str) == Some("audit")
            && let (Some(p), Some(s)) = (
                map.get("prev_hash").and_then(Value::as_str),
                map.get("seq").and_then(Value::as_u64),
            )
            && s > 1
        {
            prev = p.to_string();
            next_seq = s;
            continues = Some((s - 1, prev.clone()));
        }
        match map.get("prev_hash").and_then(Value::as_str) {
            Some(p) if p == prev => {}
            Some(p) => {
                return Err(bad(format!(
                    "chain broken: prev_hash {p} but the previous line's hash is {prev} \
                     (a line was removed, inserted or reordered)"
                )));
            }
            None => return Err(bad("no prev_hash".into())),
        }
        let expected_seq = next_seq;
        match map.get("seq").and_then(Value::as_u64) {
            Some(s) if s == expected_seq => {}
            other => {
                return Err(bad(format!(
                    "seq {other:?} where {expected_seq} was expected"
                )));
            }
        }
        prev = hash;
        count += 1;
        next_seq += 1;
    }
    Ok(Chain {
        entries: count,
        continues,
    })
}

/// `altroute audit verify FILE`: prints the result; returns the exit code (0 ok, 1 broken,
/// 2 the file cannot be read).
pub fn verify_command(path: &Path) -> i32 {
    match verify_chain(path) {
        Ok(Chain {
            entries,
            continues: None,
        }) => {
            println!("ok: {entries} entries, chain intact");
            0
        }
        Ok(Chain {
            entries,
            continues: Some((seq, hash)),
        }) => {
            println!(
                "ok: {entries} entries, chain intact, continuing an earlier file after seq \
                 {seq} (hash {hash})"
            );
            0
        }
        Err(e) if e.line == 0 => {
            eprintln!("altroute: cannot read {}: {}", path.display(), e.what);
            2
        }
        Err(e) => {
            println!("broken: {e}");
            1
        }
    }
}

/// `altroute audit ...`.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of an audit log: prints "ok: N entries, chain intact" or the
    /// first broken line (exit status 1); exit status 2 if it cannot be read.
    Verify {
        /// The audit log (JSON lines).
        file: PathBuf,
    },
}

/// Runs an `altroute audit` command; returns the exit status.
pub fn run(cmd: AuditCommand) -> anyhow::Result<i32> {
    match cmd {
        AuditCommand::Verify { file } => Ok(verify_command(&file)),
    }
}

/// What changed from `old` to `new`: hosts, rules (TLS compliance), routes and org units
/// added, removed and changed (by name), the settings that changed, and the number of
/// embedded tests. Empty categories are left out.
pub fn summarize(old: &Policy, new: &Policy) -> Value {
    let mut out = Map::new();
    let hosts = diff(
        old.hosts.iter().map(|(k, v)| (k.clone(), v)),
        new.hosts.iter().map(|(k, v)| (k.clone(), v)),
    );
    let rules = diff(
        old.compliance.iter().map(|r| (r.name.clone(), r)),
        new.compliance.iter().map(|r| (r.name.clone(), r)),
    );
    let routes = diff(
        old.routes.iter().map(|r| (r.name.clone(), r)),
        new.routes.iter().map(|r| (r.name.clone(), r)),
    );
    let units = diff(
        old.org_units.iter().map(|u| (u.path.clone(), u)),
        new.org_units.iter().map(|u| (u.path.clone(), u)),
    );
    for (key, d) in [
        ("hosts", hosts),
        ("rules", rules),
        ("routes", routes),
        ("org_units", units),
    ] {
        if let Some(v) = d {
            out.insert(key.into(), v);
        }
    }
    let mut settings = Vec::new();
    if old.name != new.name {
        settings.push("name");
    }
    if old.alternate != new.alternate {
        settings.push("alternate_secure_route");
    }
    if old.on_tls_unavailable != new.on_tls_unavailable {
        settings.push("on_tls_unavailable");
    }
    if old.mta_sts != new.mta_sts {
        settings.push("mta_sts");
    }
    if old.tls_required_no != new.tls_required_no {
        settings.push("tls_required_no");
    }
    if old.recipient_delimiter != new.recipient_delimiter {
        settings.push("recipient_delimiter");
    }
    if !settings.is_empty() {
        out.insert("settings".into(), json!(settings));
    }
    if old.tests != new.tests {
        out.insert(
            "tests".into(),
            json!({ "old": old.tests.len(), "new": new.tests.len() }),
        );
    }
    Value::Object(out)
}

/// Added, removed and changed names between two keyed collections; `None` if equal.
fn diff<'a, T: PartialEq + 'a>(
    old: impl Iterator<Item = (String, &'a T)>,
    new: impl Iterator<Item = (String, &'a T)>,
) -> Option<Value> {
    let old: std::collections::BTreeMap<String, &T> = old.collect();
    let new: std::collections::BTreeMap<String, &T> = new.collect();
    let added: Vec<&String> = new.keys().filter(|k| !old.contains_key(*k)).collect();
    let removed: Vec<&String> = old.keys().filter(|k| !new.contains_key(*k)).collect();
    let changed: Vec<&String> = new
        .iter()
        .filter(|(k, v)| old.get(*k).is_some_and(|o| o != *v))
        .map(|(k, _)| k)
        .collect();
    if added.is_empty() && removed.is_empty() && changed.is_empty() {
        return None;
    }
    let mut m = Map::new();
    for (key, list) in [("added", added), ("removed", removed), ("changed", changed)] {
        if !list.is_empty() {
            m.insert(key.into(), json!(list));
        }
    }
    Some(Value::Object(m))
}

/// SHA-256 (hex) of the canonical JSON of `value` (which must not hold `hash`).
fn line_hash(value: &Value) -> String {
    let digest = Sha256::digest(canonical(value).as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in digest.iter() {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// Compact JSON with object keys sorted at every level, whatever order serde_json's map
/// keeps (its `preserve_order` feature may be on through another crate).
pub fn canonical(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                // Serializing a string cannot fail.
                out.push_str(&serde_json::to_string(key).unwrap_or_default());
                out.push(':');
                if let Some(v) = map.get(*key) {
                    write_canonical(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-25T12:13:46.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, day) = crate::civil::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;

    fn log_with(n: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/audit.jsonl");
        let mut log = AuditLog::open(&path).unwrap();
        for i in 0..n {
            log.append(
                Entry::new(format!("admin:user{i}"), "activate")
                    .versions(Some(&format!("v{i}")), Some(&format!("v{}", i + 1)))
                    .summary(json!({"rules": {"added": [format!("r{i}")]}})),
            )
            .unwrap();
        }
        (dir, path)
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_827_696_789); // leap day 2000
        assert_eq!(rfc3339(t), "2000-02-29T12:34:56.789Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_798_761_599);
        assert_eq!(rfc3339(t), "2026-12-31T23:59:59.000Z");
    }

    #[test]
    fn chain_of_fields_and_hashes() {
        let (_dir, path) = log_with(3);
        let ls = lines(&path);
        assert_eq!(ls.len(), 3);
        let first: Value = serde_json::from_str(&ls[0]).unwrap();
        assert_eq!(first["seq"], 1);
        assert_eq!(first["prev_hash"], GENESIS);
        assert_eq!(first["who"], "admin:user0");
        assert_eq!(first["old_version"], "v0");
        assert!(first["time"].as_str().unwrap().ends_with('Z'));
        let second: Value = serde_json::from_str(&ls[1]).unwrap();
        assert_eq!(second["prev_hash"], first["hash"]);
        // The hash is the SHA-256 of the line without it, recomputed independently.
        let mut without = first.as_object().unwrap().clone();
        without.remove("hash");
        let digest = Sha256::digest(canonical(&Value::Object(without)).as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(first["hash"], hex.as_str());
        assert_eq!(verify(&path).unwrap(), 3);
    }

    #[test]
    fn reopen_continues_the_chain() {
        let (_dir, path) = log_with(2);
        let mut log = AuditLog::open(&path).unwrap();
        assert_eq!(log.head().0, 2);
        let a = log.append(Entry::new("sighup", "rollback")).unwrap();
        assert_eq!(a.seq, 3);
        assert_eq!(verify(&path).unwrap(), 3);
    }

    #[test]
    fn detects_a_changed_line() {
        let (_dir, path) = log_with(4);
        let mut ls = lines(&path);
        ls[1] = ls[1].replace("admin:user1", "admin:mallory");
        write_lines(&path, &ls);
        let e = verify(&path).unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e.what.contains("content changed"), "{e}");
    }

    #[test]
    fn detects_a_changed_line_with_its_hash_recomputed() {
        // Forging one line's hash breaks the next line's prev_hash.
        let (_dir, path) = log_with(3);
        let mut ls = lines(&path);
        let mut v: Value = serde_json::from_str(&ls[0]).unwrap();
        let map = v.as_object_mut().unwrap();
        map.insert("who".into(), json!("admin:mallory"));
        map.remove("hash");
        let h = line_hash(&Value::Object(map.clone()));
        map.insert("hash".into(), json!(h));
        ls[0] = canonical(&v);
        write_lines(&path, &ls);
        let e = verify(&path).unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e.what.contains("chain broken"), "{e}");
    }

    #[test]
    fn detects_removed_reordered_and_inserted_lines() {
        let (_dir, path) = log_with(4);
        let ls = lines(&path);

        let mut removed = ls.clone();
        removed.remove(1);
        write_lines(&path, &removed);
        assert_eq!(verify(&path).unwrap_err().line, 2);

        let mut reordered = ls.clone();
        reordered.swap(1, 2);
        write_lines(&path, &reordered);
        assert_eq!(verify(&path).unwrap_err().line, 2);

        let mut inserted = ls.clone();
        inserted.insert(2, ls[1].clone());
        write_lines(&path, &inserted);
        assert_eq!(verify(&path).unwrap_err().line, 3);

        let mut first_gone = ls.clone();
        first_gone.remove(0);
        write_lines(&path, &first_gone);
        assert_eq!(verify(&path).unwrap_err().line, 1);

        write_lines(&path, &ls);
        assert_eq!(verify(&path).unwrap(), 4);
    }

    #[test]
    fn a_line_not_in_canonical_form_is_refused() {
        let (_dir, path) = log_with(3);
        let ls = lines(&path);
        // A duplicate key: the parser keeps the last one, which the hash covers; a reader
        // (or grep) sees the first.
        let mut dup = ls.clone();
        dup[1] = ls[1].replace(r#""who":"#, r#""who":"admin:mallory","who":"#);
        assert_ne!(dup[1], ls[1]);
        write_lines(&path, &dup);
        let e = verify(&path).unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e.what.contains("canonical form"), "{e}");
        // Whitespace is not canonical either.
        let mut spaced = ls.clone();
        spaced[2] = ls[2].replacen(',', ", ", 1);
        write_lines(&path, &spaced);
        assert_eq!(verify(&path).unwrap_err().line, 3);
        write_lines(&path, &ls);
        assert_eq!(verify(&path).unwrap(), 3);
    }

    #[test]
    fn a_moved_deleted_or_truncated_log_continues_at_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let rotated = dir.path().join("audit.jsonl.1");
        let mut log = AuditLog::open(&path).unwrap();
        log.append(Entry::new("startup", "start")).unwrap();
        let a = log.append(Entry::new("cli", "activate")).unwrap();
        assert_eq!(a.reopened, None);

        // logrotate: mv, no signal to the relay.
        std::fs::rename(&path, &rotated).unwrap();
        let b = log.append(Entry::new("cli", "rollback")).unwrap();
        assert_eq!(b.seq, 4, "seq 3 is the continue line");
        assert!(b.reopened.unwrap().contains("moved away"));
        assert_eq!(
            verify(&rotated).unwrap(),
            2,
            "the rotated file is left as it was"
        );
        let ls = lines(&path);
        let first: Value = serde_json::from_str(&ls[0]).unwrap();
        assert_eq!(first["action"], "continue");
        assert_eq!(first["prev_hash"], a.hash.as_str());
        assert_eq!(
            first["summary"]["continues"],
            json!({"seq": 2, "hash": a.hash})
        );
        let chain = verify_chain(&path).unwrap();
        assert_eq!(chain.entries, 2);
        assert_eq!(chain.continues, Some((2, a.hash.clone())));

        // rm: the same.
        std::fs::remove_file(&path).unwrap();
        let c = log.append(Entry::new("cli", "activate")).unwrap();
        assert_eq!(c.seq, 6);
        assert!(c.reopened.is_some());
        assert_eq!(verify_chain(&path).unwrap().continues, Some((4, b.hash)));

        // copytruncate: the same file, emptied.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        let d = log.append(Entry::new("cli", "activate")).unwrap();
        assert!(d.reopened.unwrap().contains("truncated"));
        assert_eq!(verify_chain(&path).unwrap().continues, Some((6, c.hash)));
        let e = log.append(Entry::new("cli", "activate")).unwrap();
        assert_eq!(e.reopened, None);
        assert_eq!(verify(&path).unwrap(), 3);

        // A continue line anywhere but first is a break like any other.
        let mut ls = lines(&path);
        let mut old = lines(&rotated);
        old.append(&mut ls);
        write_lines(&path, &old);
        assert_eq!(verify(&path).unwrap_err().line, 3);
    }

    #[test]
    fn garbage_is_reported_with_its_line() {
        let (_dir, path) = log_with(2);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("not json\n");
        std::fs::write(&path, text).unwrap();
        let e = verify(&path).unwrap_err();
        assert_eq!(e.line, 3);
        let e = AuditLog::open(&path).unwrap_err();
        assert_eq!(e.line, 3);
        let shown = e.to_string();
        assert!(shown.contains(&path.display().to_string()), "{shown}");
        assert!(shown.contains("line 3: not JSON"), "{shown}");
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_the_chain_continues() {
        let (_dir, path) = log_with(2);
        let intact = std::fs::read(&path).unwrap();
        // An interrupted write: part of a line, ending inside a two-byte UTF-8 character.
        let mut torn = intact.clone();
        torn.extend_from_slice(b"{\"action\":\"activate\",\"who\":\"admin:jos\xc3");
        std::fs::write(&path, &torn).unwrap();

        let mut log = AuditLog::open(&path).unwrap();
        assert_eq!(log.head().0, 3, "the repair line follows line 2");
        let ls = lines(&path);
        assert_eq!(ls.len(), 3);
        assert!(std::fs::read(&path).unwrap().starts_with(&intact));
        let repair: Value = serde_json::from_str(&ls[2]).unwrap();
        assert_eq!(repair["action"], "repair");
        assert_eq!(repair["who"], "audit");
        assert_eq!(
            repair["summary"]["torn_line"],
            json!({ "offset": intact.len(), "bytes": torn.len() - intact.len() })
        );
        log.append(Entry::new("startup", "start")).unwrap();
        assert_eq!(verify(&path).unwrap(), 4);
    }

    #[test]
    fn a_failed_append_leaves_the_file_as_it_was() {
        let fs = altroute_lab::Tmpfs::mount("1m");
        let path = fs.path().join("audit.jsonl");
        let mut log = AuditLog::open(&path).unwrap();
        // Lines longer than a page: on a full disk the kernel still fills the rest of the
        // file's last page (a short write) before it says ENOSPC, leaving a torn line.
        let big = || Entry::new("cli", "activate").summary(json!({ "pad": "x".repeat(6000) }));
        log.append(big()).unwrap();
        let before = std::fs::read(&path).unwrap();
        assert_ne!(before.len() % 4096, 0, "the last page must have room left");

        let filler = fs.fill();

        let e = log.append(big()).unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), before, "no torn line left");
        assert_eq!(log.head().0, 1);

        std::fs::remove_file(&filler).unwrap();
        assert_eq!(log.append(big()).unwrap().seq, 2);
        assert_eq!(verify(&path).unwrap(), 2);
    }

    #[test]
    fn summary_names_what_changed() {
        let base = r#"
[[hosts]]
name = "gw"
address = "gw.example.net"

[[hosts]]
name = "old"
address = "old.example.net"

[[tls_compliance]]
name = "partners"
domains = ["partner.example"]

[[routes]]
name = "sub"
domains = ["sub.example"]
host = "gw"
"#;
        let changed = r#"
[[hosts]]
name = "gw"
address = "gw2.example.net"

[[hosts]]
name = "new"
address = "new.example.net"

[[tls_compliance]]
name = "partners"
domains = ["partner.example"]

[[tls_compliance]]
name = "banks"
domains = ["bank.example"]
"#;
        let a = altroute_policy::compile(base).unwrap().policy;
        let b = altroute_policy::compile(changed).unwrap().policy;
        let s = summarize(&a, &b);
        assert_eq!(s["hosts"]["added"], json!(["new"]));
        assert_eq!(s["hosts"]["removed"], json!(["old"]));
        assert_eq!(s["hosts"]["changed"], json!(["gw"]));
        assert_eq!(s["rules"], json!({"added": ["banks"]}));
        assert_eq!(s["routes"], json!({"removed": ["sub"]}));
        assert_eq!(summarize(&a, &a), json!({}));
    }
}
