//! MTA-STS (RFC 8461) for outbound delivery: discover a domain's policy, fetch it over
//! HTTPS, cache it, and say which MX hosts may be used and whether TLS is enforced.
//!
//! # Core concepts
//!
//! - Discovery: the TXT record `_mta-sts.<domain>` (`v=STSv1; id=…`), asked through the
//!   relay's resolver ([`parse_txt`]).
//! - Fetch: `https://mta-sts.<domain>/.well-known/mta-sts.txt` over rustls, trusting the
//!   delivery roots (webpki roots plus `delivery.ca_file`). No redirects (RFC 8461 §3.3),
//!   body at most 64 KiB, `text/plain`, one timeout for connect and fetch.
//! - Policy: [`StsPolicy`] ([`parse_policy`]): version, mode, MX patterns (`*.` matches
//!   one label, [`mx_matches`]), `max_age` (capped at 31557600 s).
//! - Cache: in memory and as one JSON file per domain under the cache directory, so a
//!   restart keeps the policies. A cached policy is used until `fetched + max_age`; it is
//!   refreshed in the background when the TXT `id` changes or half its lifetime is gone.
//! - Failure (RFC 8461 §5.1): a fetch that fails uses an unexpired cached policy if there
//!   is one, else delivery goes on as if there were no policy; the failure is returned in
//!   [`StsLookup::failure`] for TLS reporting (`sts-policy-fetch-error`,
//!   `sts-policy-invalid`, `sts-webpki-invalid`).
//!
//! The delivery code turns a lookup into the `mta_sts` fact of the policy query (the
//! standard policy then requires verified TLS for `enforce`) and, for `enforce`, drops MX
//! hosts that do not match the policy ([`StsLookup::restrict`]).
//!
//! # Example
//!
//! ```
//! use altroute::mta_sts::{Mode, mx_matches, parse_policy, parse_txt};
//!
//! let policy = parse_policy("version: STSv1\nmode: enforce\nmx: *.example.net\nmax_age: 86400\n").unwrap();
//! assert_eq!(policy.mode, Mode::Enforce);
//! assert!(policy.matches("mx1.example.net"));
//! assert!(!mx_matches("*.example.net", "a.b.example.net"));
//! assert_eq!(parse_txt(&["v=STSv1; id=20240101T000000".to_string()]), Some("20240101T000000".to_string()));
//! ```

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::delivery::{Candidate, ResolveFailure, Resolver};

/// Largest `max_age` honoured, in seconds (RFC 8461 §3.2: about one year).
pub const MAX_AGE_LIMIT: u64 = 31_557_600;

/// MX patterns kept from a policy; more are ignored, so an `enforce` policy that lists
/// more refuses the MX hosts only the later ones would match (it never lets one more
/// through). An audit's 1,600-pattern policy was copied into every TLS result line
/// (130 KB each, megabytes per message).
pub const MAX_MX_PATTERNS: usize = 64;

/// The shortest time between two refreshes of one domain's cached policy (seconds).
pub const REFRESH_INTERVAL: u64 = 300;

/// How often (seconds) a lookup also sweeps the cache: the expired policies of every
/// domain leave memory and disk, and refresh times older than [`REFRESH_INTERVAL`] are
/// forgotten. Without it, the policies of domains no mail went to again stayed on disk
/// and were loaded at every start, for good.
pub const SWEEP_INTERVAL: u64 = 3600;

/// Largest policy body fetched (RFC 8461 §3.3 suggests 64 KiB).
pub const MAX_POLICY_SIZE: usize = 64 * 1024;

/// The path of the policy on the policy host (RFC 8461 §3.2).
pub const WELL_KNOWN: &str = "/.well-known/mta-sts.txt";

/// `[mta_sts]` of the relay configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct MtaStsConfig {
    /// Look up and apply MTA-STS policies for direct delivery. Defaults to true.
    pub enabled: bool,
    /// Where fetched policies are kept across restarts. Defaults to `<spool dir>/mta-sts`.
    pub cache_dir: Option<PathBuf>,
    /// TCP port of the policy host. Defaults to 443. A lab/test knob: RFC 8461 fixes 443;
    /// the end-to-end tests point it at a loopback HTTPS server.
    pub https_port: u16,
    /// Timeout of one policy fetch, connect to end of body. Defaults to 20 s.
    pub fetch_timeout_secs: u64,
}

impl Default for MtaStsConfig {
    fn default() -> Self {
        MtaStsConfig {
            enabled: true,
            cache_dir: None,
            https_port: 443,
            fetch_timeout_secs: 20,
        }
    }
}

impl MtaStsConfig {
    /// Relative `cache_dir` resolved against `base` (the configuration file's directory).
    pub fn resolved(mut self, base: &Path) -> Self {
        if let Some(d) = &self.cache_dir
            && d.is_relative()
        {
            self.cache_dir = Some(base.join(d));
        }
        self
    }

    /// Problems with the values, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.https_port == 0 {
            out.push("mta_sts.https_port: must be greater than 0".to_string());
        }
        if self.fetch_timeout_secs == 0 {
            out.push("mta_sts.fetch_timeout_secs: must be greater than 0".to_string());
        }
        out
    }

    /// The delivery settings, or `None` when disabled.
    pub fn settings(&self, spool_dir: &Path) -> Option<MtaStsSettings> {
        self.enabled.then(|| MtaStsSettings {
            cache_dir: Some(
                self.cache_dir
                    .clone()
                    .unwrap_or_else(|| spool_dir.join("mta-sts")),
            ),
            https_port: self.https_port,
            fetch_timeout: Duration::from_secs(self.fetch_timeout_secs),
        })
    }
}

/// What delivery needs to apply MTA-STS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtaStsSettings {
    /// Disk cache; `None` keeps policies in memory only.
    pub cache_dir: Option<PathBuf>,
    /// Port of the policy host. Defaults to 443 (test knob).
    pub https_port: u16,
    /// Connect + fetch timeout. Defaults to 20 s.
    pub fetch_timeout: Duration,
}

impl Default for MtaStsSettings {
    fn default() -> Self {
        MtaStsSettings {
            cache_dir: None,
            https_port: 443,
            fetch_timeout: Duration::from_secs(20),
        }
    }
}

/// The `mode` of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deliver only to matching MX hosts over verified TLS.
    Enforce,
    /// Deliver as usual, report what would have failed.
    Testing,
    /// The domain withdrew its policy.
    None,
}

impl Mode {
    /// The fact for the policy query.
    pub fn fact(self) -> altroute_policy::MtaSts {
        match self {
            Mode::Enforce => altroute_policy::MtaSts::Enforce,
            Mode::Testing => altroute_policy::MtaSts::Testing,
            Mode::None => altroute_policy::MtaSts::None,
        }
    }
}

/// A parsed policy (RFC 8461 §3.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StsPolicy {
    /// The mode.
    pub mode: Mode,
    /// MX patterns: host names, or `*.` followed by a domain (one label).
    pub mx: Vec<String>,
    /// Seconds the policy may be cached (capped at [`MAX_AGE_LIMIT`]).
    pub max_age: u64,
}

impl StsPolicy {
    /// Whether `host` matches one of the MX patterns.
    pub fn matches(&self, host: &str) -> bool {
        self.mx.iter().any(|p| mx_matches(p, host))
    }
}

/// Parses a policy body. Lines are `key: value` (CRLF or LF); unknown keys are ignored;
/// for keys other than `mx` the first occurrence counts.
pub fn parse_policy(text: &str) -> Result<StsPolicy, String> {
    let mut version = None;
    let mut mode = None;
    let mut max_age = None;
    let mut mx = Vec::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(format!("line {line:?} is not \"key: value\""));
        };
        let key = key.trim();
        let value = value.trim();
        match key {
            "version" => {
                version.get_or_insert(value);
            }
            "mode" => {
                mode.get_or_insert(value);
            }
            "max_age" => {
                max_age.get_or_insert(value);
            }
            "mx" if mx.len() < MAX_MX_PATTERNS => mx.push(value.to_ascii_lowercase()),
            _ => {}
        }
    }
    match version {
        Some("STSv1") => {}
        Some(v) => return Err(format!("version {v:?} is not STSv1")),
        None => return Err("no version".to_string()),
    }
    let mode = match mode {
        Some("enforce") => Mode::Enforce,
        Some("testing") => Mode::Testing,
        Some("none") => Mode::None,
        Some(m) => return Err(format!("mode {m:?} is not enforce, testing or none")),
        None => return Err("no mode".to_string()),
    };
    let max_age = match max_age {
        Some(v) if !v.is_empty() && v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit()) => v
            .parse::<u64>()
            .map_err(|e| format!("max_age {v:?}: {e}"))?
            .min(MAX_AGE_LIMIT),
        Some(v) => return Err(format!("max_age {v:?} is not 1 to 10 digits")),
        None => return Err("no max_age".to_string()),
    };
    for p in &mx {
        let name = p.strip_prefix("*.").unwrap_or(p);
        if name.is_empty()
            || name.contains('*')
            || !name
                .split('.')
                .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            return Err(format!("mx {p:?} is not a host name or *.domain pattern"));
        }
    }
    if mx.is_empty() && mode != Mode::None {
        return Err("no mx pattern".to_string());
    }
    Ok(StsPolicy { mode, mx, max_age })
}

/// Whether `name` is a DNS host name: dot-separated labels of letters, digits and `-`
/// (so it is also safe as a file name).
pub fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Whether MX host `host` matches `pattern` (RFC 8461 §4.1): equal, or `*.rest` where the
/// host is one label followed by `rest`. Case-insensitive; trailing dots are ignored.
pub fn mx_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(rest) => host
            .split_once('.')
            .is_some_and(|(label, tail)| !label.is_empty() && tail == rest),
        None => pattern == host,
    }
}

/// The policy id published by a domain's `_mta-sts` TXT records (RFC 8461 §3.1), or
/// `None`: no record starts with `v=STSv1`, there are several (the RFC says to assume no
/// policy then), or the record is malformed.
pub fn parse_txt(records: &[String]) -> Option<String> {
    let sts: Vec<&String> = records
        .iter()
        .filter(|r| {
            r.strip_prefix("v=STSv1").is_some_and(|rest| {
                rest.trim_start().is_empty() || rest.trim_start().starts_with(';')
            })
        })
        .collect();
    let [record] = sts.as_slice() else {
        return None;
    };
    let mut id = None;
    for field in record.split(';').skip(1) {
        let field = field.trim();
        if field.is_empty() {
            continue;
        }
        let (k, v) = field.split_once('=')?;
        if k.trim() == "id" && id.is_none() {
            id = Some(v.trim().to_string());
        }
    }
    let id = id?;
    (!id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then_some(id)
}

/// A policy as cached (and as stored on disk, one JSON file per domain).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedPolicy {
    /// The policy domain.
    pub domain: String,
    /// The TXT `id` it was fetched for.
    pub id: String,
    /// The policy body as fetched (for TLS reports' `policy-string`).
    pub text: String,
    /// When it was fetched (Unix seconds).
    pub fetched: u64,
    /// The parsed policy.
    pub policy: StsPolicy,
}

impl CachedPolicy {
    /// When it stops being usable (Unix seconds).
    pub fn expires(&self) -> u64 {
        self.fetched.saturating_add(self.policy.max_age)
    }

    /// The lines of the policy, as TLS reports want them (`policy-string`): the lines of
    /// the keys RFC 8461 defines, and only the `mx` lines that are used
    /// ([`MAX_MX_PATTERNS`]). Lines of other keys (which the RFC says to ignore) are
    /// left out: a policy padded with them was copied into every TLS result.
    pub fn lines(&self) -> Vec<String> {
        let mut mx = 0;
        // The first of each of the others, as `parse_policy` reads them (an audit padded
        // a policy with 4,680 `mode` lines).
        let mut seen: Vec<&str> = Vec::new();
        self.text
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| {
                let key = l.split_once(':').map(|(k, _)| k.trim());
                match key {
                    Some(k @ ("version" | "mode" | "max_age")) => {
                        let first = !seen.contains(&k);
                        seen.push(k);
                        first
                    }
                    Some("mx") => {
                        mx += 1;
                        mx <= MAX_MX_PATTERNS
                    }
                    _ => false,
                }
            })
            .map(str::to_string)
            .collect()
    }
}

/// Why a policy could not be had, with its RFC 8460 result type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchFailure {
    /// `sts-policy-fetch-error`, `sts-policy-invalid` or `sts-webpki-invalid`.
    pub result_type: &'static str,
    /// What went wrong.
    pub detail: String,
}

impl FetchFailure {
    fn fetch(detail: impl Into<String>) -> Self {
        FetchFailure {
            result_type: "sts-policy-fetch-error",
            detail: detail.into(),
        }
    }
}

/// The MTA-STS state of one domain for one delivery attempt.
#[derive(Debug, Clone, Default)]
pub struct StsLookup {
    /// The policy that applies (fresh or cached and unexpired).
    pub policy: Option<Arc<CachedPolicy>>,
    /// A fetch that failed during this lookup (reported even when a cached policy applies).
    pub failure: Option<FetchFailure>,
}

impl StsLookup {
    /// The fact for the policy query.
    pub fn fact(&self) -> altroute_policy::MtaSts {
        self.policy
            .as_ref()
            .map_or(altroute_policy::MtaSts::None, |p| p.policy.mode.fact())
    }

    /// The MX hosts that may be used, and the names of those dropped. Only `enforce`
    /// drops anything; `testing` keeps every host (mismatches are reported).
    pub fn restrict(&self, candidates: Vec<Candidate>) -> (Vec<Candidate>, Vec<String>) {
        match &self.policy {
            Some(p) if p.policy.mode == Mode::Enforce => {
                let (keep, drop): (Vec<_>, Vec<_>) = candidates
                    .into_iter()
                    .partition(|c| p.policy.matches(&c.name));
                (keep, drop.into_iter().map(|c| c.name).collect())
            }
            _ => (candidates, Vec::new()),
        }
    }
}

/// The shared result of one first fetch of a domain's policy.
type FetchGate = tokio::sync::Mutex<Option<Result<Arc<CachedPolicy>, FetchFailure>>>;

/// Policies of the domains mail went to: lookup, fetch, cache.
pub struct MtaSts {
    settings: MtaStsSettings,
    resolver: Resolver,
    tls: Arc<rustls::ClientConfig>,
    cache: Mutex<HashMap<String, Arc<CachedPolicy>>>,
    refreshing: Mutex<HashSet<String>>,
    /// When a refresh of each domain was last started (memory only): at most one per
    /// [`REFRESH_INTERVAL`].
    refreshed: Mutex<HashMap<String, u64>>,
    /// One first fetch per domain at a time: a burst of mail to a new domain fetches once.
    fetching: Mutex<HashMap<String, Arc<FetchGate>>>,
    /// When the cache was last swept (plus one; 0: never).
    swept: AtomicU64,
}

impl std::fmt::Debug for MtaSts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MtaSts")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MtaSts {
    /// Policies fetched through `resolver`, trusting `roots`; the disk cache (if any) is
    /// loaded now (unreadable or malformed files are skipped with a warning).
    pub fn new(
        settings: MtaStsSettings,
        resolver: Resolver,
        roots: Arc<RootCertStore>,
    ) -> Result<MtaSts, String> {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut cache = HashMap::new();
        if let Some(dir) = &settings.cache_dir
            && let Ok(entries) = std::fs::read_dir(dir)
        {
            for e in entries.flatten() {
                let path = e.path();
                if path.extension().is_none_or(|x| x != "json") {
                    continue;
                }
                match crate::files::read_regular(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|b| {
                        serde_json::from_slice::<CachedPolicy>(&b).map_err(|e| e.to_string())
                    }) {
                    Ok(p) => {
                        cache.insert(p.domain.clone(), Arc::new(p));
                    }
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "skipping MTA-STS cache file")
                    }
                }
            }
        }
        Ok(MtaSts {
            settings,
            resolver,
            tls: Arc::new(tls),
            cache: Mutex::new(cache),
            refreshing: Mutex::new(HashSet::new()),
            refreshed: Mutex::new(HashMap::new()),
            fetching: Mutex::new(HashMap::new()),
            swept: AtomicU64::new(0),
        })
    }

    /// Removes the expired policies (memory and files) and the refresh times that no
    /// longer hold back a refresh, at most once per [`SWEEP_INTERVAL`]. Returns the
    /// domains whose policy was removed.
    pub fn sweep(&self, now: u64) -> Vec<String> {
        let last = self.swept.load(Ordering::Relaxed);
        if last != 0 && now < (last - 1).saturating_add(SWEEP_INTERVAL) {
            return Vec::new();
        }
        if self
            .swept
            .compare_exchange(
                last,
                now.saturating_add(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return Vec::new();
        }
        // The files go under the lock too: a refresh that stored a new policy for one of
        // these domains meanwhile must not lose its file.
        let expired: Vec<String> = {
            let mut cache = lock(&self.cache);
            let expired: Vec<String> = cache
                .iter()
                .filter(|(_, p)| now >= p.expires())
                .map(|(d, _)| d.clone())
                .collect();
            for d in &expired {
                cache.remove(d);
                if let Some(dir) = &self.settings.cache_dir
                    && is_host_name(d)
                {
                    let _ = std::fs::remove_file(dir.join(format!("{d}.json")));
                }
            }
            expired
        };
        lock(&self.refreshed).retain(|_, t| now < t.saturating_add(REFRESH_INTERVAL));
        if !expired.is_empty() {
            tracing::info!(
                count = expired.len(),
                "MTA-STS: expired policies removed from the cache"
            );
        }
        expired
    }

    /// The cached policy of `domain` if it has not expired at `now`. An expired one is
    /// no policy any more (RFC 8461 §5.1): it leaves the cache and its file is removed
    /// (an audit's 150 one-off domains stayed in memory and on disk for good).
    pub fn cached(&self, domain: &str, now: u64) -> Option<Arc<CachedPolicy>> {
        let key = domain.to_ascii_lowercase();
        let mut cache = lock(&self.cache);
        let p = cache.get(&key)?;
        if now < p.expires() {
            return Some(p.clone());
        }
        cache.remove(&key);
        if let Some(dir) = &self.settings.cache_dir
            && is_host_name(&key)
        {
            let _ = std::fs::remove_file(dir.join(format!("{key}.json")));
        }
        None
    }

    /// The policy that applies to `domain` at `now` (RFC 8461 §3.3, §5.1). Fetches when
    /// the domain publishes a policy that is not cached; refreshes in the background when
    /// the cached one's id changed or half its lifetime is gone.
    pub async fn lookup(self: &Arc<Self>, domain: &str, now: u64) -> StsLookup {
        // The caller gives the A-label; a Unicode name is converted here too, so that no
        // spelling of a domain can skip its policy.
        self.sweep(now);
        let domain = altroute_policy::pattern::canonical_domain(domain).to_ascii_lowercase();
        if !is_host_name(&domain) {
            // Not a DNS host name (an address literal, or bytes that could escape the
            // cache directory): no policy can apply.
            return StsLookup::default();
        }
        let id = match self.resolver.txt(&format!("_mta-sts.{domain}")).await {
            Ok(records) => parse_txt(&records),
            Err(ResolveFailure::Permanent(_)) => None,
            Err(ResolveFailure::Temporary(e)) => {
                tracing::debug!(%domain, error = %e, "MTA-STS TXT lookup failed");
                None
            }
        };
        let cached = self.cached(&domain, now);
        match (cached, id) {
            (Some(c), Some(id)) => {
                if c.id != id || now >= c.fetched.saturating_add(c.policy.max_age / 2) {
                    self.refresh_in_background(&domain, id, now);
                }
                StsLookup {
                    policy: Some(c),
                    failure: None,
                }
            }
            // No record (or DNS trouble) but an unexpired policy: keep using it (§5.1).
            (Some(c), None) => StsLookup {
                policy: Some(c),
                failure: None,
            },
            (None, Some(id)) => match self.first_fetch(&domain, &id, now).await {
                Ok(p) => StsLookup {
                    policy: Some(p),
                    failure: None,
                },
                Err(failure) => {
                    tracing::warn!(%domain, result = failure.result_type, error = %failure.detail, "MTA-STS policy not available: delivering as if there were none");
                    StsLookup {
                        policy: None,
                        failure: Some(failure),
                    }
                }
            },
            (None, None) => StsLookup::default(),
        }
    }

    /// Fetches a policy not cached yet. Callers for the same domain that arrive while a
    /// fetch runs wait for it and share its result (success or failure), so a burst of
    /// mail to a new domain, or to one whose policy host is down, costs one fetch.
    async fn first_fetch(
        &self,
        domain: &str,
        id: &str,
        now: u64,
    ) -> Result<Arc<CachedPolicy>, FetchFailure> {
        let gate = lock(&self.fetching)
            .entry(domain.to_string())
            .or_default()
            .clone();
        let mut slot = gate.lock().await;
        if let Some(shared) = slot.as_ref() {
            return shared.clone();
        }
        let result = self.fetch_and_store(domain, id, now).await;
        *slot = Some(result.clone());
        drop(slot);
        // Later arrivals start afresh (a failure is retried at their attempt).
        let mut fetching = lock(&self.fetching);
        if fetching.get(domain).is_some_and(|g| Arc::ptr_eq(g, &gate)) {
            fetching.remove(domain);
        }
        result
    }

    fn refresh_in_background(self: &Arc<Self>, domain: &str, id: String, now: u64) {
        {
            // A domain whose `id` changes on every query (or whose policy host keeps
            // failing) is fetched once per interval, not once per message (an audit's
            // rotating id cost a fetch and a cache file fsync per message).
            let mut refreshed = lock(&self.refreshed);
            if refreshed
                .get(domain)
                .is_some_and(|t| now < t.saturating_add(REFRESH_INTERVAL))
            {
                return;
            }
            if !lock(&self.refreshing).insert(domain.to_string()) {
                return;
            }
            refreshed.insert(domain.to_string(), now);
        }
        let this = self.clone();
        let domain = domain.to_string();
        tokio::spawn(async move {
            if let Err(f) = this.fetch_and_store(&domain, &id, now).await {
                tracing::warn!(%domain, result = f.result_type, error = %f.detail, "MTA-STS refresh failed; the cached policy stays");
            }
            lock(&this.refreshing).remove(&domain);
        });
    }

    async fn fetch_and_store(
        &self,
        domain: &str,
        id: &str,
        now: u64,
    ) -> Result<Arc<CachedPolicy>, FetchFailure> {
        let text = self.fetch(domain).await?;
        let policy = parse_policy(&text).map_err(|e| FetchFailure {
            result_type: "sts-policy-invalid",
            detail: e,
        })?;
        let cached = Arc::new(CachedPolicy {
            domain: domain.to_string(),
            id: id.to_string(),
            text,
            fetched: now,
            policy,
        });
        // File and memory change together, under the lock: a sweep or an expiry that
        // removes the domain's old policy cannot take the new one's file with it.
        let mut cache = lock(&self.cache);
        if let Some(dir) = &self.settings.cache_dir
            && let Err(e) = store(dir, &cached)
        {
            tracing::warn!(%domain, dir = %dir.display(), error = %e, "cannot write the MTA-STS cache");
        }
        cache.insert(domain.to_string(), cached.clone());
        drop(cache);
        tracing::info!(%domain, id, mode = ?cached.policy.mode, max_age = cached.policy.max_age, "MTA-STS policy fetched");
        Ok(cached)
    }

    /// Fetches the policy body of `domain` (no parsing).
    pub async fn fetch(&self, domain: &str) -> Result<String, FetchFailure> {
        let host = format!("mta-sts.{domain}");
        tokio::time::timeout(self.settings.fetch_timeout, self.fetch_inner(&host))
            .await
            .map_err(|_| FetchFailure::fetch(format!("{host}: timed out")))?
    }

    async fn fetch_inner(&self, host: &str) -> Result<String, FetchFailure> {
        let addrs = self.resolver.addresses(host).await.map_err(
            |(ResolveFailure::Permanent(e) | ResolveFailure::Temporary(e))| FetchFailure::fetch(e),
        )?;
        let mut last = String::from("no address");
        let mut tcp = None;
        for ip in addrs {
            match TcpStream::connect((ip, self.settings.https_port)).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = format!("{ip}:{}: {e}", self.settings.https_port),
            }
        }
        let tcp = tcp.ok_or_else(|| FetchFailure::fetch(format!("{host}: {last}")))?;
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| FetchFailure::fetch(format!("{host}: {e}")))?;
        let tls = TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| {
                let cert = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
                FetchFailure {
                    result_type: if cert {
                        "sts-webpki-invalid"
                    } else {
                        "sts-policy-fetch-error"
                    },
                    detail: format!("{host}: TLS: {e}"),
                }
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| FetchFailure::fetch(format!("{host}: HTTP: {e}")))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let result = async {
            let request = hyper::Request::get(WELL_KNOWN)
                .header(hyper::header::HOST, host)
                .header(hyper::header::USER_AGENT, "altroute")
                .body(Empty::<Bytes>::new())
                .map_err(|e| FetchFailure::fetch(e.to_string()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| FetchFailure::fetch(format!("{host}: HTTP: {e}")))?;
            let status = response.status();
            if status.is_redirection() {
                return Err(FetchFailure::fetch(format!(
                    "{host}: HTTP {status}: redirects are not followed (RFC 8461 §3.3)"
                )));
            }
            if status != hyper::StatusCode::OK {
                return Err(FetchFailure::fetch(format!("{host}: HTTP {status}")));
            }
            let media = response
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| {
                    v.split(';')
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .to_ascii_lowercase()
                });
            if media.as_deref() != Some("text/plain") {
                return Err(FetchFailure::fetch(format!(
                    "{host}: content type {} is not text/plain",
                    media.as_deref().unwrap_or("(none)")
                )));
            }
            let body = Limited::new(response.into_body(), MAX_POLICY_SIZE)
                .collect()
                .await
                .map_err(|e| {
                    FetchFailure::fetch(format!(
                        "{host}: body: {e} (at most {MAX_POLICY_SIZE} octets)"
                    ))
                })?
                .to_bytes();
            String::from_utf8(body.to_vec()).map_err(|_| FetchFailure {
                result_type: "sts-policy-invalid",
                detail: format!("{host}: the policy is not UTF-8"),
            })
        }
        .await;
        driver.abort();
        result
    }
}

/// Writes `p` to `dir/<domain>.json` (temp file, fsync, rename).
fn store(dir: &Path, p: &CachedPolicy) -> std::io::Result<()> {
    use std::io::Write;
    crate::files::create_private_dir_all(dir)?;
    let json = serde_json::to_vec_pretty(p).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!(".{}.json.tmp", p.domain));
    let mut f = crate::files::open_regular(
        &tmp,
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true),
    )?;
    f.write_all(&json)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(format!("{}.json", p.domain)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A policy's size in what the relay keeps of it is bounded: at most
    /// [`MAX_MX_PATTERNS`] patterns, and only the RFC's keys in `policy-string`. An
    /// audit's policy of 1,600 `mx` lines was copied whole into every TLS result line.
    #[test]
    fn a_long_policy_is_kept_short() {
        let mut text = "version: STSv1\nmode: enforce\nmax_age: 86400\n".to_string();
        for i in 0..1600 {
            text.push_str(&format!(
                "mx: h{i}.example.test\npadding{i}: {}\n",
                "x".repeat(30)
            ));
            text.push_str("mode: enforce\nmax_age: 1\n");
        }
        let policy = parse_policy(&text).unwrap();
        assert_eq!(policy.mx.len(), MAX_MX_PATTERNS);
        assert!(policy.matches("h63.example.test"));
        assert!(
            !policy.matches("h64.example.test"),
            "a pattern past the cap"
        );
        let cached = CachedPolicy {
            domain: "big.test".into(),
            id: "1".into(),
            text,
            fetched: 0,
            policy,
        };
        let lines = cached.lines();
        assert_eq!(lines.len(), 3 + MAX_MX_PATTERNS);
        assert!(lines.iter().all(|l| !l.starts_with("padding")));
    }

    #[test]
    fn policy_parses() {
        let p = parse_policy(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(
            p.mx,
            ["mail.example.com", "*.example.net", "backupmx.example.com"]
        );
        assert_eq!(p.max_age, 604800);
        // LF only, unknown keys, a repeated key: the first counts.
        let p = parse_policy(
            "version: STSv1\nmode: testing\nmode: enforce\nfoo: bar\nmx: a.test\nmax_age: 99999999999\n",
        );
        assert!(p.is_err(), "11 digits of max_age are refused");
        let p = parse_policy("version: STSv1\nmode: testing\nmode: enforce\nfoo: bar\nmx: a.test\nmax_age: 9999999999\n").unwrap();
        assert_eq!(p.mode, Mode::Testing);
        assert_eq!(p.max_age, MAX_AGE_LIMIT, "capped");
        // mode none needs no mx.
        assert_eq!(
            parse_policy("version: STSv1\nmode: none\nmax_age: 10\n")
                .unwrap()
                .mode,
            Mode::None
        );
    }

    #[test]
    fn bad_policies_are_refused() {
        for (text, why) in [
            ("mode: enforce\nmx: a.test\nmax_age: 1\n", "no version"),
            (
                "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
                "version",
            ),
            (
                "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
                "mode",
            ),
            ("version: STSv1\nmode: enforce\nmax_age: 1\n", "mx"),
            ("version: STSv1\nmode: enforce\nmx: a.test\n", "max_age"),
            (
                "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
                "max_age",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: *.*.test\nmax_age: 1\n",
                "mx",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 1\n",
                "mx",
            ),
            ("<html>hello</html>\n", "key: value"),
        ] {
            let e = parse_policy(text).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }

    #[test]
    fn patterns_match_one_label() {
        assert!(mx_matches("mail.example.com", "MAIL.example.com."));
        assert!(mx_matches("*.example.net", "mx1.example.net"));
        assert!(!mx_matches("*.example.net", "example.net"));
        assert!(!mx_matches("*.example.net", "a.mx1.example.net"));
        assert!(!mx_matches("*.example.net", "mx1.example.net.evil.test"));
        assert!(!mx_matches("mail.example.com", "mail2.example.com"));
        assert!(is_host_name("mx-1.example.com"));
        for bad in ["", "a..b", "../etc", "a/b.test", "[192.0.2.1]", "a b.test"] {
            assert!(!is_host_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn txt_records() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_txt(&s(&["v=STSv1; id=20160831085700Z;"])),
            Some("20160831085700Z".into())
        );
        assert_eq!(
            parse_txt(&s(&["spf1 nonsense", "v=STSv1;id=abc ; ext=1"])),
            Some("abc".into())
        );
        // Several STSv1 records: no policy (RFC 8461 §3.1).
        assert_eq!(parse_txt(&s(&["v=STSv1; id=a", "v=STSv1; id=b"])), None);
        assert_eq!(parse_txt(&s(&["v=STSv1; id=has-dash"])), None);
        assert_eq!(parse_txt(&s(&["v=STSv1;"])), None);
        assert_eq!(parse_txt(&s(&["v=STSv10; id=a"])), None);
        assert_eq!(
            parse_txt(&s(&[&format!("v=STSv1; id={}", "a".repeat(33))])),
            None
        );
        assert_eq!(parse_txt(&[]), None);
    }

    fn cand(name: &str) -> Candidate {
        Candidate {
            name: name.to_string(),
            preference: 10,
            from_mx: true,
            addrs: vec![],
            unresolved: None,
        }
    }

    #[test]
    fn enforce_restricts_testing_does_not() {
        let mk = |mode| StsLookup {
            policy: Some(Arc::new(CachedPolicy {
                domain: "d.test".into(),
                id: "1".into(),
                text: String::new(),
                fetched: 0,
                policy: StsPolicy {
                    mode,
                    mx: vec!["*.d.test".into()],
                    max_age: 10,
                },
            })),
            failure: None,
        };
        let (keep, dropped) =
            mk(Mode::Enforce).restrict(vec![cand("evil.test"), cand("mx.d.test")]);
        assert_eq!(keep, vec![cand("mx.d.test")]);
        assert_eq!(dropped, vec!["evil.test".to_string()]);
        let (keep, dropped) =
            mk(Mode::Testing).restrict(vec![cand("evil.test"), cand("mx.d.test")]);
        assert_eq!(keep.len(), 2);
        assert!(dropped.is_empty());
        assert_eq!(mk(Mode::Enforce).fact(), altroute_policy::MtaSts::Enforce);
        assert_eq!(StsLookup::default().fact(), altroute_policy::MtaSts::None);
    }

    /// The expired policies of domains no mail goes to again leave memory and disk at the
    /// next lookup of any domain (once per sweep interval); unexpired ones stay. They once
    /// stayed on disk, and were loaded at every start, for good.
    #[tokio::test]
    async fn lookups_sweep_the_expired_policies_of_other_domains() {
        let dir = tempfile::tempdir().unwrap();
        let policy = |domain: &str, max_age: u64| {
            let text =
                format!("version: STSv1\nmode: enforce\nmx: mx.{domain}\nmax_age: {max_age}\n");
            CachedPolicy {
                domain: domain.into(),
                id: "1".into(),
                policy: parse_policy(&text).unwrap(),
                text,
                fetched: 100,
            }
        };
        for p in [
            policy("gone.test", 50),
            policy("kept.test", 5000),
            policy("later.test", 500),
        ] {
            store(dir.path(), &p).unwrap();
        }
        let sts = Arc::new(
            MtaSts::new(
                MtaStsSettings {
                    cache_dir: Some(dir.path().to_path_buf()),
                    ..MtaStsSettings::default()
                },
                Resolver::new(Some("127.0.0.1:9".parse().unwrap())).unwrap(),
                Arc::new(RootCertStore::empty()),
            )
            .unwrap(),
        );
        let files = || {
            let mut names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        // An address literal: no DNS query, but a lookup all the same.
        let none = sts.lookup("[192.0.2.1]", 200).await;
        assert!(none.policy.is_none());
        assert_eq!(files(), ["kept.test.json", "later.test.json"]);
        assert!(sts.cached("kept.test", 200).is_some());
        // later.test expires at 600; the next sweep is due an interval after the first.
        let _ = sts.lookup("[192.0.2.1]", 700).await;
        assert_eq!(
            files(),
            ["kept.test.json", "later.test.json"],
            "swept again too soon"
        );
        let _ = sts.lookup("[192.0.2.1]", 200 + SWEEP_INTERVAL).await;
        assert_eq!(files(), ["kept.test.json"]);
        assert_eq!(lock(&sts.cache).len(), 1);
    }

    /// An expired policy leaves the cache and the disk when it is next looked at.
    #[tokio::test]
    async fn an_expired_policy_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let p = CachedPolicy {
            domain: "d.test".into(),
            id: "1".into(),
            text: "version: STSv1\nmode: testing\nmx: mx.d.test\nmax_age: 50\n".into(),
            fetched: 100,
            policy: parse_policy("version: STSv1\nmode: testing\nmx: mx.d.test\nmax_age: 50\n")
                .unwrap(),
        };
        store(dir.path(), &p).unwrap();
        let file = dir.path().join("d.test.json");
        assert!(file.exists());
        let sts = MtaSts::new(
            MtaStsSettings {
                cache_dir: Some(dir.path().to_path_buf()),
                ..MtaStsSettings::default()
            },
            Resolver::new(Some("127.0.0.1:9".parse().unwrap())).unwrap(),
            Arc::new(RootCertStore::empty()),
        )
        .unwrap();
        assert!(sts.cached("D.test", 149).is_some());
        assert!(sts.cached("d.test", 150).is_none());
        assert!(!file.exists(), "the expired policy's file stays");
        assert!(sts.cached("d.test", 120).is_none(), "still in memory");
    }

    #[test]
    fn expiry() {
        let p = CachedPolicy {
            domain: "d.test".into(),
            id: "1".into(),
            text: "version: STSv1\r\nmode: testing\r\n\r\n".into(),
            fetched: 100,
            policy: StsPolicy {
                mode: Mode::Testing,
                mx: vec![],
                max_age: 50,
            },
        };
        assert_eq!(p.expires(), 150);
        assert_eq!(p.lines(), ["version: STSv1", "mode: testing"]);
    }
}
