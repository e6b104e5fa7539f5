//! SMTP TLS reporting (RFC 8460): every TLS result of direct delivery is recorded per
//! policy domain, and once a day an aggregate JSON report is made for each domain that
//! publishes `_smtp._tls` (`v=TLSRPTv1; rua=…`).
//!
//! # Core concepts
//!
//! - [`Recorder`] appends one JSON line per session result ([`SessionResult`]) to
//!   `<dir>/results-YYYY-MM-DD.jsonl` (UTC day). Appends are single `write` calls on an
//!   `O_APPEND` file, so concurrent workers never interleave lines and a crash loses at
//!   most the line being written.
//! - [`aggregate`] (pure) turns one day's lines into RFC 8460 §4.4 reports: one per
//!   policy domain, one `policies[]` entry per distinct policy (`sts` with its
//!   `policy-string` and `mx-host`, or `no-policy-found`), a `summary` of successful and
//!   failed sessions, and `failure-details[]` grouped by result type and addresses.
//! - [`generate`] looks up `_smtp._tls` for each domain ([`parse_txt`]), writes the
//!   reports to `<dir>/reports/` under the RFC 8460 §5.3 file name
//!   (`submitter!domain!begin!end.json`) and, when `submit` is on, queues a
//!   `multipart/report; report-type="tlsrpt"` message to every `mailto:` rua through the
//!   relay's own spool.
//! - `altroute tlsrpt report --day YYYY-MM-DD -c altroute.toml` runs [`generate`] by hand;
//!   `altroute serve` runs it for the previous day once a day ([`daily`]).
//!
//! # Example
//!
//! ```
//! use altroute::tlsrpt::{aggregate, SessionResult};
//!
//! let ok = SessionResult::new("example.test", "success");
//! let bad = SessionResult { receiving_mx: Some("mx.example.test".into()), ..SessionResult::new("example.test", "starttls-not-supported") };
//! let reports = aggregate("2026-11-24", &[ok, bad], "relay.test", "postmaster@relay.test");
//! let r = &reports["example.test"];
//! assert_eq!(r["policies"][0]["summary"]["total-failure-session-count"], 1);
//! assert_eq!(r["policies"][0]["failure-details"][0]["result-type"], "starttls-not-supported");
//! ```

use crate::civil::{civil_from_days, days_from_civil};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use altroute_queue::{Envelope, Spool};

use crate::delivery::{ResolveFailure, Resolver};

/// `[tlsrpt]` of the relay configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct TlsRptConfig {
    /// Record TLS results and make daily reports. Defaults to true.
    pub enabled: bool,
    /// Results and reports. Defaults to `<spool dir>/tlsrpt`.
    pub dir: Option<PathBuf>,
    /// `organization-name` of the reports. Defaults to `server.hostname`.
    pub organization_name: Option<String>,
    /// `contact-info` of the reports. Defaults to `postmaster@<server.hostname>`.
    pub contact_info: Option<String>,
    /// Also mail the reports to the domains' `mailto:` rua through this relay. Defaults
    /// to false (reports are only written to `<dir>/reports/`).
    pub submit: bool,
    /// Envelope and header sender of mailed reports. Defaults to `contact_info`.
    pub from: Option<String>,
}

impl Default for TlsRptConfig {
    fn default() -> Self {
        TlsRptConfig {
            enabled: true,
            dir: None,
            organization_name: None,
            contact_info: None,
            submit: false,
            from: None,
        }
    }
}

impl TlsRptConfig {
    /// Relative `dir` resolved against `base` (the configuration file's directory).
    pub fn resolved(mut self, base: &Path) -> Self {
        if let Some(d) = &self.dir
            && d.is_relative()
        {
            self.dir = Some(base.join(d));
        }
        self
    }

    /// The settings, or `None` when disabled.
    pub fn settings(&self, spool_dir: &Path, hostname: &str) -> Option<TlsRptSettings> {
        let contact = self
            .contact_info
            .clone()
            .unwrap_or_else(|| format!("postmaster@{hostname}"));
        self.enabled.then(|| TlsRptSettings {
            dir: self.dir.clone().unwrap_or_else(|| spool_dir.join("tlsrpt")),
            organization: self
                .organization_name
                .clone()
                .unwrap_or_else(|| hostname.to_string()),
            from: self.from.clone().unwrap_or_else(|| contact.clone()),
            contact,
            submit: self.submit,
            hostname: hostname.to_string(),
        })
    }
}

/// What recording and reporting need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsRptSettings {
    /// Results (`results-DAY.jsonl`), reports (`reports/`), done markers (`reported/`).
    pub dir: PathBuf,
    /// `organization-name`.
    pub organization: String,
    /// `contact-info`.
    pub contact: String,
    /// Sender of mailed reports.
    pub from: String,
    /// Mail reports to `mailto:` rua.
    pub submit: bool,
    /// Our host name (Message-ID of mailed reports).
    pub hostname: String,
}

/// One TLS session result (or policy fetch failure) for one policy domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionResult {
    /// Unix seconds.
    pub time: u64,
    /// The policy domain (the recipient domain).
    pub domain: String,
    /// `sts` or `no-policy-found`.
    pub policy_type: String,
    /// The policy's lines (`sts` only).
    #[serde(default)]
    pub policy_string: Vec<String>,
    /// The policy's MX patterns (`sts` only).
    #[serde(default)]
    pub mx_host: Vec<String>,
    /// `success`, or an RFC 8460 §4.3 result type.
    pub result: String,
    /// Our address on the connection.
    #[serde(default)]
    pub sending_ip: Option<String>,
    /// The MX host name (or the policy host for fetch failures).
    #[serde(default)]
    pub receiving_mx: Option<String>,
    /// The MX address.
    #[serde(default)]
    pub receiving_ip: Option<String>,
}

impl SessionResult {
    /// A `no-policy-found` result for `domain` at time 0, without addresses.
    pub fn new(domain: &str, result: &str) -> SessionResult {
        SessionResult {
            time: 0,
            domain: domain.to_string(),
            policy_type: "no-policy-found".to_string(),
            policy_string: Vec::new(),
            mx_host: Vec::new(),
            result: result.to_string(),
            sending_ip: None,
            receiving_mx: None,
            receiving_ip: None,
        }
    }
}

/// Appends session results to the day's JSON-lines file.
#[derive(Debug)]
pub struct Recorder {
    dir: PathBuf,
    lock: Mutex<()>,
}

impl Recorder {
    /// Records into `dir` (created on first use).
    pub fn new(dir: PathBuf) -> Recorder {
        Recorder {
            dir,
            lock: Mutex::new(()),
        }
    }

    /// Appends `r` to `results-<day of r.time>.jsonl`. An error is logged, never fatal:
    /// reporting must not hold up mail.
    pub fn record(&self, r: &SessionResult) {
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = self.append(r) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot record a TLS result");
        }
    }

    fn append(&self, r: &SessionResult) -> std::io::Result<()> {
        crate::files::create_private_dir_all(&self.dir)?;
        let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let path = self.dir.join(format!("results-{}.jsonl", day_of(r.time)));
        let mut f = crate::files::open_regular(
            &path,
            std::fs::OpenOptions::new().create(true).append(true),
        )?;
        f.write_all(&line)
    }
}

/// The UTC day (`YYYY-MM-DD`) of a Unix time.
pub fn day_of(t: u64) -> String {
    let (y, m, d) = civil_from_days((t / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The Unix time of the start of a `YYYY-MM-DD` day, or `None` if it is not one.
pub fn parse_day(s: &str) -> Option<u64> {
    let mut parts = s.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i64, u32, u32) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    if !(1..=12).contains(&m) || d == 0 {
        return None;
    }
    let days = days_from_civil(y, m, d);
    // Reject 2026-02-31 and the like: the round trip must agree.
    (civil_from_days(days) == (y, m, d) && days >= 0).then(|| days as u64 * 86_400)
}

/// Reads the results of `day` from `dir` (malformed lines, e.g. one cut by a crash, are
/// skipped with a warning). A day without a file has no results.
pub fn read_day(dir: &Path, day: &str) -> std::io::Result<Vec<SessionResult>> {
    Ok(day_results(dir, day)?.collect())
}

/// The results of `day` one by one, as [`read_day`] reads them, without holding the day
/// in memory: the daily report aggregates as it reads (an audit's day of large results
/// took three times the file's size in memory).
pub fn day_results(
    dir: &Path,
    day: &str,
) -> std::io::Result<Box<dyn Iterator<Item = SessionResult>>> {
    use std::io::BufRead as _;
    let path = dir.join(format!("results-{day}.jsonl"));
    let file = match crate::files::open_regular(&path, std::fs::OpenOptions::new().read(true)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Box::new(std::iter::empty()));
        }
        Err(e) => return Err(e),
    };
    let lines = std::io::BufReader::new(file).split(b'\n');
    Ok(Box::new(lines.enumerate().filter_map(move |(i, line)| {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(file = %path.display(), line = i + 1, error = %e, "stopped reading the TLS results");
                return None;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        match serde_json::from_slice(&line) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(file = %path.display(), line = i + 1, error = %e, "skipping a malformed TLS result");
                None
            }
        }
    })))
}

/// The report id of `domain`'s report for `day`.
pub fn report_id(day: &str, domain: &str, organization: &str) -> String {
    format!("{day}T00:00:00Z!{domain}!{organization}")
}

/// The RFC 8460 §4.4 report of every domain in `results` for `day`, keyed by domain.
/// `results` may be a slice or [`day_results`]: aggregated as they come.
pub fn aggregate<R: std::borrow::Borrow<SessionResult>>(
    day: &str,
    results: impl IntoIterator<Item = R>,
    organization: &str,
    contact: &str,
) -> BTreeMap<String, Value> {
    type PolicyKey = (String, Vec<String>, Vec<String>);
    type FailureKey = (String, Option<String>, Option<String>, Option<String>);
    #[derive(Default)]
    struct Counts {
        success: u64,
        failure: u64,
        details: BTreeMap<FailureKey, u64>,
    }
    let mut by_domain: BTreeMap<String, BTreeMap<PolicyKey, Counts>> = BTreeMap::new();
    for r in results {
        let r = r.borrow();
        let key = (
            r.policy_type.clone(),
            r.policy_string.clone(),
            r.mx_host.clone(),
        );
        let c = by_domain
            .entry(r.domain.to_ascii_lowercase())
            .or_default()
            .entry(key)
            .or_default();
        if r.result == "success" {
            c.success += 1;
        } else {
            c.failure += 1;
            *c.details
                .entry((
                    r.result.clone(),
                    r.sending_ip.clone(),
                    r.receiving_mx.clone(),
                    r.receiving_ip.clone(),
                ))
                .or_default() += 1;
        }
    }
    by_domain
        .into_iter()
        .map(|(domain, policies)| {
            let policies: Vec<Value> = policies
                .into_iter()
                .map(|((policy_type, policy_string, mx_host), c)| {
                    let mut policy = json!({
                        "policy-type": policy_type,
                        "policy-domain": domain,
                    });
                    if policy_type == "sts" {
                        policy["policy-string"] = json!(policy_string);
                        policy["mx-host"] = json!(mx_host);
                    }
                    let details: Vec<Value> = c
                        .details
                        .into_iter()
                        .map(|((result, sending, mx, ip), n)| {
                            let mut d = json!({ "result-type": result, "failed-session-count": n });
                            if let Some(v) = sending {
                                d["sending-mta-ip"] = json!(v);
                            }
                            if let Some(v) = mx {
                                d["receiving-mx-hostname"] = json!(v);
                            }
                            if let Some(v) = ip {
                                d["receiving-ip"] = json!(v);
                            }
                            d
                        })
                        .collect();
                    let mut entry = json!({
                        "policy": policy,
                        "summary": {
                            "total-successful-session-count": c.success,
                            "total-failure-session-count": c.failure,
                        },
                    });
                    if !details.is_empty() {
                        entry["failure-details"] = json!(details);
                    }
                    entry
                })
                .collect();
            let report = json!({
                "organization-name": organization,
                "date-range": {
                    "start-datetime": format!("{day}T00:00:00Z"),
                    "end-datetime": format!("{day}T23:59:59Z"),
                },
                "contact-info": contact,
                "report-id": report_id(day, &domain, organization),
                "policies": policies,
            });
            (domain, report)
        })
        .collect()
}

/// The reporting addresses (`rua`) a domain publishes in its `_smtp._tls` TXT records
/// (RFC 8460 §3), or `None`: not exactly one `v=TLSRPTv1` record, or no usable rua.
pub fn parse_txt(records: &[String]) -> Option<Vec<String>> {
    let ours: Vec<&String> = records
        .iter()
        .filter(|r| {
            r.strip_prefix("v=TLSRPTv1")
                .is_some_and(|rest| rest.trim_start().starts_with(';'))
        })
        .collect();
    let [record] = ours.as_slice() else {
        return None;
    };
    let rua = record.split(';').skip(1).find_map(|f| {
        let (k, v) = f.trim().split_once('=')?;
        (k.trim() == "rua").then(|| v.trim().to_string())
    })?;
    // Each address once, and at most MAX_RUA of them: an audit's record listed 3,000
    // addresses (or one address 1,000 times), and the relay queued a report to each.
    // Compared without regard to case (`r@Q.test` is `r@q.test` to its mail server).
    let mut uris: Vec<String> = Vec::new();
    for uri in rua.split(',').filter_map(|u| usable_rua(u.trim())) {
        if !uris.iter().any(|u| u.eq_ignore_ascii_case(&uri)) {
            uris.push(uri);
        }
        if uris.len() == MAX_RUA {
            break;
        }
    }
    (!uris.is_empty()).then_some(uris)
}

/// A file-name-safe tag of a report address (the first 8 bytes of its SHA-256, in hex).
fn address_tag(addr: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(addr.to_ascii_lowercase().as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reporting URIs used per domain (RFC 8460 sets no limit; published records list one
/// or two). The rest are ignored.
pub const MAX_RUA: usize = 5;

/// A reporting URI as the relay uses it, or `None`. The TXT record is anyone's text (an
/// audit's domain published CR LF in it, forging log lines and writing headers and a
/// body into the report message), so:
/// - `mailto:` (RFC 6068): the address, percent-decoded, without `?…`, must be one plain
///   ASCII mailbox (`pattern::is_mailbox`) with a dot-atom local part and a domain name;
///   it comes back as `mailto:ADDRESS`;
/// - `https://`: printable ASCII without spaces, at most 2048 bytes.
fn usable_rua(uri: &str) -> Option<String> {
    let scheme = uri.get(..8).map(str::to_ascii_lowercase);
    if scheme.as_deref() == Some("https://") {
        return (uri.len() <= 2048 && uri.bytes().all(|b| b.is_ascii_graphic()))
            .then(|| uri.to_string());
    }
    let rest = uri
        .get(7..)
        .filter(|_| uri[..7].eq_ignore_ascii_case("mailto:"))?;
    let encoded = rest.split('?').next().unwrap_or(rest);
    let address = percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .ok()?;
    // A dot-atom local part and a domain name: no quoting, no source route
    // (`@a,@b:rep@x` passed `is_mailbox` and was queued as a recipient no policy could
    // decide on).
    let (local, domain) = address.rsplit_once('@')?;
    (address.is_ascii()
        && address.bytes().all(|b| b.is_ascii_graphic())
        && altroute_smtp::address::is_dot_atom(local)
        && !domain.starts_with('[')
        && altroute_policy::pattern::is_mailbox(&address))
    .then(|| format!("mailto:{address}"))
}

/// One report made by [`generate`].
#[derive(Debug, Clone)]
pub struct Generated {
    /// The policy domain.
    pub domain: String,
    /// The report file written.
    pub path: PathBuf,
    /// The domain's rua.
    pub rua: Vec<String>,
    /// The `mailto:` addresses a report message was queued to.
    pub mailed: Vec<String>,
    /// The report.
    pub report: Value,
}

/// The RFC 8460 §5.3 file name of a report.
pub fn file_name(organization: &str, domain: &str, day_start: u64) -> String {
    format!(
        "{organization}!{domain}!{day_start}!{}.json",
        day_start + 86_399
    )
}

/// Makes `day`'s reports: each domain with results that publishes `_smtp._tls` gets its
/// report written to `<dir>/reports/`, and with `settings.submit` and a spool, mailed to
/// its `mailto:` rua. Domains without a TLSRPT record are skipped (logged).
pub async fn generate(
    settings: &TlsRptSettings,
    resolver: &Resolver,
    day: &str,
    spool: Option<&Spool>,
) -> anyhow::Result<Vec<Generated>> {
    Ok(generate_marked(settings, resolver, day, spool, None)
        .await?
        .0)
}

/// [`generate`], remembering in `done` (a directory, when given) each domain that was
/// handled (its report made, or no TLSRPT record published), and skipping those: a
/// domain whose record could not be looked up (a temporary DNS failure) is left for the
/// next run, and a run that stopped half way (the spool full) does not queue a report
/// twice. Returns the reports made and how many domains are left for the next run.
pub async fn generate_marked(
    settings: &TlsRptSettings,
    resolver: &Resolver,
    day: &str,
    spool: Option<&Spool>,
    done: Option<&Path>,
) -> anyhow::Result<(Vec<Generated>, usize)> {
    let start = parse_day(day).with_context(|| format!("{day:?} is not a YYYY-MM-DD day"))?;
    let results = day_results(&settings.dir, day)
        .with_context(|| format!("reading the TLS results in {}", settings.dir.display()))?;
    let reports = aggregate(day, results, &settings.organization, &settings.contact);
    let out_dir = settings.dir.join("reports");
    let mut out = Vec::new();
    let mut left = 0;
    let mark = |domain: &str| -> anyhow::Result<()> {
        if let Some(done) = done {
            crate::files::create_private_dir_all(done)
                .and_then(|()| {
                    crate::files::open_regular(
                        &done.join(domain),
                        std::fs::OpenOptions::new().write(true).create(true),
                    )
                })
                .with_context(|| format!("marking {domain}'s report as made"))?;
        }
        Ok(())
    };
    for (domain, report) in reports {
        if !crate::mta_sts::is_host_name(&domain) {
            // Also keeps the report's file name inside the reports directory.
            tracing::warn!(%domain, "not a host name: no report");
            continue;
        }
        if done.is_some_and(|d| d.join(&domain).exists()) {
            continue;
        }
        let rua = match resolver.txt(&format!("_smtp._tls.{domain}")).await {
            Ok(records) => parse_txt(&records),
            Err(ResolveFailure::Permanent(_)) => None,
            Err(ResolveFailure::Temporary(e)) => {
                tracing::warn!(%domain, error = %e, "TLSRPT lookup failed; tried again at the next run");
                left += 1;
                continue;
            }
        };
        let Some(rua) = rua else {
            tracing::info!(%domain, "no TLSRPT record: no report");
            mark(&domain)?;
            continue;
        };
        crate::files::create_private_dir_all(&out_dir)
            .with_context(|| format!("creating {}", out_dir.display()))?;
        let path = out_dir.join(file_name(&settings.organization, &domain, start));
        let body = serde_json::to_vec_pretty(&report)?;
        crate::files::open_regular(
            &path,
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true),
        )
        .and_then(|mut f| std::io::Write::write_all(&mut f, &body))
        .with_context(|| format!("writing {}", path.display()))?;
        let mut mailed = Vec::new();
        for uri in &rua {
            let Some(addr) = uri
                .get(7..)
                .filter(|_| uri[..7].eq_ignore_ascii_case("mailto:"))
            else {
                tracing::warn!(%domain, rua = ?uri, "HTTPS report submission is not implemented; report kept on disk");
                continue;
            };
            // `parse_txt` kept only `mailto:` and one plain mailbox.
            let addr = addr.to_string();
            if let (true, Some(spool)) = (settings.submit, spool) {
                // Marked per address too: a crash (or a full spool) between two of a
                // domain's addresses queued the first ones again at the next run.
                // `#` is in no host name: no domain's own marker can have this name.
                let queued = format!("{domain}#to-{}", address_tag(&addr));
                if done.is_some_and(|d| d.join(&queued).exists()) {
                    mailed.push(addr);
                    continue;
                }
                let now = spool.clock().now();
                let (env, msg) = report_message(settings, &domain, &addr, start, &report, now)?;
                let id = spool
                    .store(env, msg)
                    .await
                    .with_context(|| format!("queueing the report for {domain} to {addr}"))?;
                tracing::info!(%domain, to = %addr, %id, "TLS report queued");
                mark(&queued)?;
                mailed.push(addr);
            }
        }
        tracing::info!(%domain, file = %path.display(), "TLS report written");
        mark(&domain)?;
        out.push(Generated {
            domain,
            path,
            rua,
            mailed,
            report,
        });
    }
    Ok((out, left))
}

/// The report as a message (RFC 8460 §5.3): `multipart/report; report-type="tlsrpt"`
/// with a human-readable part and the JSON as `application/tlsrpt+json` (base64).
pub fn report_message(
    settings: &TlsRptSettings,
    domain: &str,
    to: &str,
    day_start: u64,
    report: &Value,
    now: u64,
) -> anyhow::Result<(Envelope, Vec<u8>)> {
    let id = report["report-id"].as_str().unwrap_or_default().to_string();
    let json = serde_json::to_vec(report)?;
    let boundary = format!("tlsrpt-{now}-{}", day_start / 86_400);
    let org = &settings.organization;
    let mut m = String::new();
    m.push_str(&format!("From: <{}>\r\n", settings.from));
    m.push_str(&format!("To: <{to}>\r\n"));
    m.push_str(&format!(
        "Date: {}\r\n",
        crate::delivery::dsn::rfc5322_date(now)
    ));
    m.push_str(&format!(
        "Subject: Report Domain: {domain} Submitter: {org} Report-ID: <{id}>\r\n"
    ));
    m.push_str(&format!("TLS-Report-Domain: {domain}\r\n"));
    m.push_str(&format!("TLS-Report-Submitter: {org}\r\n"));
    m.push_str(&format!(
        "Message-ID: <tlsrpt.{}.{domain}.{now}@{}>\r\n",
        day_start / 86_400,
        settings.hostname
    ));
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str(&format!(
        "Content-Type: multipart/report; report-type=\"tlsrpt\"; boundary=\"{boundary}\"\r\n\r\n"
    ));
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ));
    m.push_str(&format!(
        "This is an aggregate TLS report (RFC 8460) from {org} for {domain}, {}.\r\n\r\n",
        day_of(day_start)
    ));
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: application/tlsrpt+json\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"{}\"\r\n\r\n",
        file_name(org, domain, day_start)
    ));
    let b64 = base64(&json);
    for chunk in b64.as_bytes().chunks(76) {
        m.push_str(&String::from_utf8_lossy(chunk));
        m.push_str("\r\n");
    }
    m.push_str(&format!("--{boundary}--\r\n"));
    Ok((
        Envelope::new(settings.from.clone(), vec![to.to_string()]),
        m.into_bytes(),
    ))
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One run of [`daily`] for `day`: makes the reports not made yet, unless the marker
/// `<dir>/reported/<day>` says all were. Each domain handled is marked in
/// `<dir>/reported/<day>.domains/`; the day is marked once none is left. Returns whether
/// the day is done. (A temporary DNS failure once lost a domain's report for good: the
/// day was marked done all the same.)
pub async fn daily_run(
    settings: &TlsRptSettings,
    resolver: &Resolver,
    spool: &Spool,
    day: &str,
) -> bool {
    let reported = settings.dir.join("reported");
    let marker = reported.join(day);
    if marker.exists() {
        return true;
    }
    let domains = reported.join(format!("{day}.domains"));
    match generate_marked(settings, resolver, day, Some(spool), Some(&domains)).await {
        Ok((made, 0)) => {
            tracing::info!(%day, reports = made.len(), "daily TLS reports made");
            let done = crate::files::create_private_dir_all(&reported)
                .and_then(|()| std::fs::write(&marker, b""));
            if let Err(e) = done {
                tracing::warn!(error = %e, "cannot mark the TLS reports as made");
            }
            true
        }
        Ok((made, left)) => {
            tracing::info!(%day, reports = made.len(), left, "daily TLS reports made; the rest at the next run");
            false
        }
        Err(e) => {
            tracing::warn!(%day, error = %e, "daily TLS reports failed");
            false
        }
    }
}

/// Once a day (looked at hourly), makes the previous UTC day's reports unless a marker
/// in `<dir>/reported/` says they were made. Runs until `shutdown` resolves.
pub async fn daily(
    settings: TlsRptSettings,
    resolver: Resolver,
    spool: Spool,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let now = spool.clock().now();
        let yesterday = day_of(now.saturating_sub(86_400));
        daily_run(&settings, &resolver, &spool, &yesterday).await;
        // Hourly: a day boundary is noticed within the hour, and a clock change too.
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}

/// `altroute tlsrpt …`.
#[derive(Debug, clap::Subcommand)]
pub enum TlsRptCommand {
    /// Make the aggregate reports of one day: `altroute tlsrpt report --day 2026-11-24 -c altroute.toml`.
    Report(ReportArgs),
}

/// Arguments of `altroute tlsrpt report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The UTC day, `YYYY-MM-DD`.
    #[arg(long)]
    pub day: String,
    /// The relay configuration.
    #[arg(short, long)]
    pub config: PathBuf,
    /// Also queue report messages (needs the relay stopped: the spool is locked while it
    /// runs; the running relay mails its reports itself when `tlsrpt.submit` is on).
    #[arg(long)]
    pub submit: bool,
}

/// Runs a `tlsrpt` subcommand; prints one line per report written.
pub fn run(cmd: TlsRptCommand) -> anyhow::Result<i32> {
    let TlsRptCommand::Report(args) = cmd;
    let config = crate::config::Config::load(&args.config)?;
    let Some(mut settings) = config
        .tlsrpt
        .settings(&config.spool.dir, &config.server.hostname)
    else {
        anyhow::bail!("tlsrpt.enabled is false in {}", args.config.display());
    };
    settings.submit = args.submit;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let resolver = Resolver::new(config.delivery.resolver)?;
        let spool = if args.submit {
            Some(Spool::open(
                &config.spool.dir,
                altroute_queue::SpoolConfig::default(),
                Arc::new(altroute_queue::SystemClock),
            )?)
        } else {
            None
        };
        let made = generate(&settings, &resolver, &args.day, spool.as_ref()).await?;
        for g in &made {
            let (ok, failed) = g.report["policies"]
                .as_array()
                .map(|ps| {
                    ps.iter().fold((0, 0), |(a, b), p| {
                        (
                            a + p["summary"]["total-successful-session-count"]
                                .as_u64()
                                .unwrap_or(0),
                            b + p["summary"]["total-failure-session-count"]
                                .as_u64()
                                .unwrap_or(0),
                        )
                    })
                })
                .unwrap_or((0, 0));
            println!(
                "{}\t{} successful, {} failed\t{}{}",
                g.domain,
                ok,
                failed,
                g.path.display(),
                if g.mailed.is_empty() {
                    String::new()
                } else {
                    format!("\tmailed to {}", g.mailed.join(", "))
                }
            );
        }
        if made.is_empty() {
            println!(
                "no report for {} (no results, or no domain publishes _smtp._tls)",
                args.day
            );
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Each reporting address once, and at most [`MAX_RUA`]: an audit's record listed
    /// 3,000 addresses (or one 1,000 times) and got a report queued to each.
    #[test]
    fn reporting_addresses_are_few_and_unique() {
        let many: Vec<String> = (0..3000).map(|i| format!("mailto:r{i}@q.test")).collect();
        let record = format!("v=TLSRPTv1; rua={}", many.join(","));
        let uris = parse_txt(&[record]).unwrap();
        assert_eq!(uris, many[..MAX_RUA].to_vec());
        let record = format!(
            "v=TLSRPTv1; rua={}",
            vec!["mailto:v@q.test"; 1000].join(",")
        );
        assert_eq!(parse_txt(&[record]).unwrap(), ["mailto:v@q.test"]);
        // Case does not make another address.
        let record = "v=TLSRPTv1; rua=mailto:v@q.test,MAILTO:v@q.test,mailto:v@Q.test,mailto:V@q.TEST,mailto:%76@q.test";
        assert_eq!(parse_txt(&[record.into()]).unwrap(), ["mailto:v@q.test"]);
    }

    #[test]
    fn days() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(1_750_000_000), "2025-06-15");
        assert_eq!(parse_day("2025-06-15"), Some(1_749_945_600));
        assert_eq!(
            parse_day("2024-02-29").map(day_of).as_deref(),
            Some("2024-02-29")
        );
        assert_eq!(parse_day("2025-02-29"), None);
        assert_eq!(parse_day("2025-13-01"), None);
        assert_eq!(parse_day("25-01-01"), None);
        assert_eq!(parse_day("2025-01-01x"), None);
        for t in [0u64, 951_782_400, 1_709_164_800, 4_102_444_800] {
            assert_eq!(parse_day(&day_of(t)), Some(t - t % 86_400));
        }
    }

    #[test]
    fn txt_records() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_txt(&s(&[
                "v=TLSRPTv1; rua=mailto:tls@example.com,https://r.example.com/tlsrpt"
            ])),
            Some(vec![
                "mailto:tls@example.com".to_string(),
                "https://r.example.com/tlsrpt".to_string()
            ])
        );
        assert_eq!(parse_txt(&s(&["v=TLSRPTv1;rua=ftp://x"])), None);
        assert_eq!(
            parse_txt(&s(&[
                "v=TLSRPTv1; rua=mailto:a@x",
                "v=TLSRPTv1; rua=mailto:b@x"
            ])),
            None
        );
        assert_eq!(parse_txt(&s(&["v=spf1 -all"])), None);
        assert_eq!(
            parse_txt(&s(&["v=spf1 -all", "v=TLSRPTv1; rua=mailto:a@x"])),
            Some(vec!["mailto:a@x".to_string()])
        );
    }

    /// A TXT record is anyone's text: an audit's domain published CR LF in its rua and
    /// forged log lines, and wrote headers and a body into the report message.
    #[test]
    fn hostile_reporting_uris_are_not_used() {
        let s = |v: &str| vec![v.to_string()];
        for bad in [
            "v=TLSRPTv1; rua=mailto:rep@ok.test>\r\nX-Injected: yes",
            "v=TLSRPTv1; rua=mailto:rep@ok.test%3E%0D%0AX-Injected:%20yes",
            "v=TLSRPTv1; rua=mailto:a%40b@ok.test",
            "v=TLSRPTv1; rua=mailto:",
            "v=TLSRPTv1; rua=mailto:r\u{e9}p@ok.test",
            "v=TLSRPTv1; rua=https://r.ok.test/\n2026 INFO forged",
            "v=TLSRPTv1; rua=https://r.ok.test/ x",
            "v=TLSRPTv1; rua=mailto:%40evil.test%2C%40x.test%3Arep@ok.test",
            "v=TLSRPTv1; rua=mailto:%22a%20b%22@ok.test",
            "v=TLSRPTv1; rua=mailto:rep@[127.0.0.1]",
        ] {
            assert_eq!(parse_txt(&s(bad)), None, "{bad:?}");
        }
        assert_eq!(
            parse_txt(&s("v=TLSRPTv1; rua=MAILTO:tls%2Brpt@ok.test?subject=hi")),
            Some(vec!["mailto:tls+rpt@ok.test".to_string()])
        );
    }

    #[test]
    fn aggregate_counts_and_groups() {
        let sts = |result: &str, mx: &str| SessionResult {
            policy_type: "sts".into(),
            policy_string: vec!["version: STSv1".into(), "mode: testing".into()],
            mx_host: vec!["*.a.test".into()],
            receiving_mx: Some(mx.into()),
            receiving_ip: Some("192.0.2.1".into()),
            sending_ip: Some("192.0.2.9".into()),
            ..SessionResult::new("A.test", result)
        };
        let results = vec![
            sts("success", "mx.a.test"),
            sts("success", "mx.a.test"),
            sts("starttls-not-supported", "mx.a.test"),
            sts("starttls-not-supported", "mx.a.test"),
            sts("certificate-expired", "mx.a.test"),
            SessionResult::new("b.test", "success"),
        ];
        let reports = aggregate("2025-06-15", &results, "org", "c@org");
        assert_eq!(reports.len(), 2);
        let a = &reports["a.test"];
        assert_eq!(a["date-range"]["start-datetime"], "2025-06-15T00:00:00Z");
        let p = &a["policies"][0];
        assert_eq!(p["policy"]["policy-type"], "sts");
        assert_eq!(p["policy"]["mx-host"][0], "*.a.test");
        assert_eq!(p["summary"]["total-successful-session-count"], 2);
        assert_eq!(p["summary"]["total-failure-session-count"], 3);
        let details = p["failure-details"].as_array().unwrap();
        assert_eq!(details.len(), 2);
        let starttls = details
            .iter()
            .find(|d| d["result-type"] == "starttls-not-supported")
            .unwrap();
        assert_eq!(starttls["failed-session-count"], 2);
        assert_eq!(starttls["sending-mta-ip"], "192.0.2.9");
        let b = &reports["b.test"]["policies"][0];
        assert_eq!(b["policy"]["policy-type"], "no-policy-found");
        assert!(b["policy"].get("policy-string").is_none());
        assert!(b.get("failure-details").is_none());
    }

    #[test]
    fn recorder_appends_per_day_and_skips_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let rec = Recorder::new(dir.path().to_path_buf());
        let mut r = SessionResult::new("a.test", "success");
        r.time = 1_750_000_000;
        rec.record(&r);
        rec.record(&r);
        r.time += 86_400;
        rec.record(&r);
        let path = dir.path().join("results-2025-06-15.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"time\": 17").unwrap();
        assert_eq!(read_day(dir.path(), "2025-06-15").unwrap().len(), 2);
        assert_eq!(read_day(dir.path(), "2025-06-16").unwrap().len(), 1);
        assert!(read_day(dir.path(), "2025-06-17").unwrap().is_empty());
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }
}
