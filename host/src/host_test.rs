//! `altroute host test NAME`: the "test TLS connection" button of hosted mail suites.
//!
//! Connects to a mail server exactly as delivery does (same resolver, EHLO name, trusted
//! roots, [`RecordingVerifier`]) and reports what it saw and what the policy would do:
//!
//! - NAME is a host of the policy (`[[hosts]]` name): its addresses (or their MX hosts
//!   with `mx_lookup`), its port, and the TLS the policy requires of it;
//! - `HOST:PORT`: that host (A/AAAA, or an IP literal) on that port;
//! - anything else is a mail domain: its MX hosts (implicit MX when none) on
//!   `[delivery].smtp_port`, as delivery would.
//!
//! The first reachable address is tested: greeting, EHLO, whether STARTTLS is offered,
//! the TLS version and cipher suite, the certificate chain (subject, issuer, SANs,
//! validity of each certificate), trust, expiry and host-name match; then the policy is
//! asked the plan and the verdict questions for a recipient at the domain
//! (`postmaster@DOMAIN` unless `--recipient`), with the facts observed.
//!
//! Exit codes: 0 nothing wrong; 1 problems found (unreachable, no STARTTLS, TLS failed,
//! certificate not valid, the policy would not deliver over this connection); 2 the test
//! itself could not run (configuration, policy module). `--json` prints one JSON object
//! (fields in docs/operations.md).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls_pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use tokio::net::TcpStream;

use altroute_policy::{
    CertStatus, Decision, Hop, MtaSts, Query, Starttls, TlsRequirement, TlsVersion,
};
use altroute_smtp::{CertResult, Client, ClientConfig, RecordingVerifier};

use crate::config::Config;
use crate::delivery::{Candidate, ResolveFailure, Resolver, trust_roots};
use crate::policy_engine::PolicyEngine;

/// A certificate expiring sooner than this is reported as a warning. Defaults to 14 days.
const EXPIRY_WARNING_DAYS: i64 = 14;

/// The longest wait for one SMTP reply during the test (the relay's own
/// `server.command_timeout` is meant for delivery and is usually minutes).
const MAX_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// `altroute host test ...`.
#[derive(Debug, clap::Subcommand)]
pub enum HostCommand {
    /// Connect to a policy host, a mail domain or HOST:PORT as the relay would and report
    /// STARTTLS, TLS version, cipher, certificate chain and what the policy would decide.
    Test(HostTestArgs),
}

/// Arguments of `altroute host test`.
#[derive(Debug, clap::Args)]
pub struct HostTestArgs {
    /// A host named in the policy, a mail domain, or HOST:PORT.
    pub name: String,
    /// The relay configuration (resolver, CA file, EHLO name, policy).
    #[arg(short, long, default_value = "/etc/altroute/altroute.toml")]
    pub config: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Recipient of the policy question. Defaults to postmaster@DOMAIN.
    #[arg(long)]
    pub recipient: Option<String>,
    /// Sender of the policy question. Defaults to postmaster@[server].hostname.
    #[arg(long)]
    pub sender: Option<String>,
}

/// What NAME turned out to be.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    PolicyHost,
    HostPort,
    Domain,
}

/// One certificate of the chain, end entity first.
#[derive(Debug, Clone, Serialize)]
pub struct CertInfo {
    /// Subject distinguished name.
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// DNS names and IP addresses of the subjectAltName extension.
    pub sans: Vec<String>,
    /// Serial number (hex).
    pub serial: String,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

/// The certificate findings.
#[derive(Debug, Clone, Serialize)]
struct CertReport {
    /// The verifier's verdict, as delivery records it: valid, untrusted, expired,
    /// hostname-mismatch, or `invalid: ...`.
    verdict: String,
    /// The policy's view of it (`x-altroute-cert`).
    status: String,
    /// Chains to a trusted root (`null` when the verdict does not tell: expired, invalid).
    trusted: Option<bool>,
    /// The end-entity certificate is outside its validity period now.
    expired: bool,
    /// Whole days until the end-entity certificate expires (negative: since it expired).
    days_left: Option<i64>,
    /// A SAN of the end-entity certificate matches the host name connected to.
    hostname_match: bool,
    chain: Vec<CertInfo>,
}

/// The TLS findings.
#[derive(Debug, Clone, Serialize)]
struct TlsReport {
    /// `1.2`, `1.3`, or `none` when the handshake failed.
    version: String,
    cipher: Option<String>,
    /// Why the handshake failed, if it did.
    error: Option<String>,
}

/// The MTA-STS findings (RFC 8461), fetched fresh (the relay's cache is not read).
#[derive(Debug, Clone, Serialize)]
struct StsReport {
    /// `enforce`, `testing` or `none` (the fact the policy module gets).
    mode: String,
    /// The policy's MX patterns.
    mx: Vec<String>,
    max_age: Option<u64>,
    /// A policy that could not be fetched: RFC 8460 result type and detail.
    failure: Option<String>,
    /// The host connected to matches the patterns (`null` without a policy or host).
    mx_match: Option<bool>,
}

/// What the policy would decide.
#[derive(Debug, Clone, Serialize)]
struct PolicyReport {
    version: String,
    sender: String,
    recipient: String,
    /// The hop this connection is for the policy (direct, host, alternate).
    hop: String,
    /// The plan for the recipient (`null` for a policy host tested without `--recipient`).
    plan: Option<Decision>,
    /// The verdict with the facts observed (`null` when nothing was reached or not asked).
    verdict: Option<Decision>,
    /// For a policy host: the TLS it requires, and whether this connection meets it.
    host_requirement: Option<TlsRequirement>,
    host_requirement_met: Option<bool>,
    /// The mail would go out over this connection (the verdict proceeds on this hop and
    /// the connection meets its TLS requirement).
    delivers_here: bool,
}

/// The whole report (`--json` prints it as is).
#[derive(Debug, Clone, Serialize)]
struct Report {
    target: String,
    kind: Kind,
    port: u16,
    /// Hosts to try, in order, with their addresses.
    candidates: Vec<CandidateReport>,
    /// Connection errors before the tested connection (or of every candidate).
    connect_errors: Vec<String>,
    /// The host and address tested.
    host: Option<String>,
    address: Option<String>,
    greeting: Option<String>,
    ehlo_hostname: Option<String>,
    /// `offered` or `absent` (`null` when nothing answered).
    starttls: Option<String>,
    requiretls_offered: Option<bool>,
    /// The domain's MTA-STS policy (domains only, when `[mta_sts]` is enabled).
    mta_sts: Option<StsReport>,
    tls: Option<TlsReport>,
    certificate: Option<CertReport>,
    policy: Option<PolicyReport>,
    problems: Vec<String>,
    warnings: Vec<String>,
    /// `ok` or `problems`.
    status: String,
}

#[derive(Debug, Clone, Serialize)]
struct CandidateReport {
    name: String,
    preference: u16,
    addresses: Vec<String>,
}

/// `altroute host ...`: returns the exit code (see the module docs).
pub fn run(command: HostCommand) -> Result<i32> {
    match command {
        HostCommand::Test(args) => test_command(args),
    }
}

fn test_command(args: HostTestArgs) -> Result<i32> {
    let config = Config::load(&args.config)?;
    let policy = crate::policy_cmd::load_policy(&config.policy.file)?;
    let engine = PolicyEngine::from_config(&config.policy).context("loading the policy module")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let report = runtime.block_on(test(&args, &config, &policy, &engine))?;
    if args.json {
        crate::outln!("{}", serde_json::to_string(&report)?)?;
    } else {
        print_text(&report)?;
    }
    Ok(if report.problems.is_empty() { 0 } else { 1 })
}

/// What to connect to.
struct Target {
    kind: Kind,
    hop: Hop,
    /// The domain of the policy question.
    domain: String,
    port: u16,
    requirement: Option<TlsRequirement>,
}

fn target(name: &str, config: &Config, policy: &altroute_policy::Policy) -> Target {
    if let Some(host) = policy.hosts.get(name) {
        let hop = if policy.alternate.as_deref() == Some(name) {
            Hop::Alternate
        } else {
            Hop::Host
        };
        return Target {
            kind: Kind::PolicyHost,
            hop,
            domain: host.addresses.first().cloned().unwrap_or_default(),
            port: host.port,
            requirement: Some(host.tls),
        };
    }
    // HOST:PORT (an IPv6 literal needs brackets: [::1]:25).
    if let Some((host, port)) = name.rsplit_once(':')
        && let Ok(port) = port.parse::<u16>()
    {
        return Target {
            kind: Kind::HostPort,
            hop: Hop::Direct,
            domain: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            requirement: None,
        };
    }
    Target {
        kind: Kind::Domain,
        hop: Hop::Direct,
        domain: name.trim_end_matches('.').to_ascii_lowercase(),
        port: config.delivery.smtp_port,
        requirement: None,
    }
}

async fn candidates(
    resolver: &Resolver,
    name: &str,
    t: &Target,
    policy: &altroute_policy::Policy,
) -> Result<Vec<Candidate>, ResolveFailure> {
    match t.kind {
        Kind::PolicyHost => match policy.hosts.get(name) {
            Some(host) => resolver.host_target(&host.target(name)).await,
            None => Err(ResolveFailure::Permanent(format!("no host {name}"))),
        },
        Kind::HostPort => {
            if let Ok(ip) = t.domain.parse::<IpAddr>() {
                return Ok(vec![Candidate {
                    name: t.domain.clone(),
                    preference: 0,
                    from_mx: false,
                    addrs: vec![ip],
                    unresolved: None,
                }]);
            }
            // With the failure of an address family, if any (reported below).
            Ok(vec![resolver.candidate(&t.domain).await?])
        }
        Kind::Domain => resolver.mail_hosts(&t.domain).await,
    }
}

async fn test(
    args: &HostTestArgs,
    config: &Config,
    policy: &altroute_policy::Policy,
    engine: &PolicyEngine,
) -> Result<Report> {
    let t = target(&args.name, config, policy);
    let mut report = Report {
        target: args.name.clone(),
        kind: t.kind.clone(),
        port: t.port,
        candidates: Vec::new(),
        connect_errors: Vec::new(),
        host: None,
        address: None,
        greeting: None,
        ehlo_hostname: None,
        starttls: None,
        requiretls_offered: None,
        mta_sts: None,
        tls: None,
        certificate: None,
        policy: None,
        problems: Vec::new(),
        warnings: Vec::new(),
        status: String::new(),
    };
    let resolver = Resolver::new(config.delivery.resolver)?;
    let roots = Arc::new(trust_roots(config.delivery.ca_file.as_deref())?);
    let found = match candidates(&resolver, &args.name, &t, policy).await {
        Ok(c) => c,
        Err(ResolveFailure::Permanent(why) | ResolveFailure::Temporary(why)) => {
            report.problems.push(format!("DNS: {why}"));
            Vec::new()
        }
    };
    for why in found.iter().filter_map(|c| c.unresolved.as_ref()) {
        report.problems.push(format!("DNS: {why}"));
    }
    report.candidates = found
        .iter()
        .map(|c| CandidateReport {
            name: c.name.clone(),
            preference: c.preference,
            addresses: c.addrs.iter().map(IpAddr::to_string).collect(),
        })
        .collect();

    let mut client_config = ClientConfig::new(config.delivery.helo.clone());
    client_config.command_timeout = config.server.command_timeout.min(MAX_COMMAND_TIMEOUT);
    // Facts for the verdict; stay "none" when nothing was reached.
    let (mut starttls, mut tls, mut cert) = (Starttls::Absent, TlsVersion::None, CertStatus::None);
    let mut connected_host = None;
    'hosts: for cand in &found {
        for &ip in &cand.addrs {
            let addr = SocketAddr::new(ip, t.port);
            let client = match connect(addr, &client_config, config).await {
                Ok(c) => c,
                Err(e) => {
                    report
                        .connect_errors
                        .push(format!("{} [{addr}]: {e}", cand.name));
                    continue;
                }
            };
            report.host = Some(cand.name.clone());
            report.address = Some(addr.to_string());
            connected_host = Some(cand.name.clone());
            (starttls, tls, cert) = probe(client, &cand.name, roots.clone(), &mut report).await;
            break 'hosts;
        }
    }
    if connected_host.is_none() && !found.is_empty() {
        report
            .problems
            .push("no address of any candidate host accepted an SMTP session".to_string());
    }

    // The policy's questions, with what was observed. For a policy host without
    // `--recipient` there is no domain to ask about: its own TLS requirement decides.
    let sender = args
        .sender
        .clone()
        .unwrap_or_else(|| format!("postmaster@{}", config.server.hostname));
    let recipient = args
        .recipient
        .clone()
        .unwrap_or_else(|| format!("postmaster@{}", t.domain));
    let ask = !matches!(t.kind, Kind::PolicyHost) || args.recipient.is_some();
    let mut query = Query::plan(&sender, &recipient);
    if matches!(t.kind, Kind::Domain)
        && let Some(settings) = config.mta_sts.settings(&config.spool.dir)
    {
        let sts = mta_sts(
            settings,
            &resolver,
            roots,
            &t.domain,
            connected_host.as_deref(),
        )
        .await;
        if let Some(report_sts) = sts {
            if report_sts.mode == "enforce" && report_sts.mx_match == Some(false) {
                report.problems.push(format!(
                    "{} is not an MX host allowed by the domain's MTA-STS enforce policy",
                    connected_host.as_deref().unwrap_or("-")
                ));
            }
            query.mta_sts = match report_sts.mode.as_str() {
                "enforce" => MtaSts::Enforce,
                "testing" => MtaSts::Testing,
                _ => MtaSts::None,
            };
            report.mta_sts = Some(report_sts);
        }
    }
    let plan = ask.then(|| engine.decide(&query));
    let verdict = match (&plan, &connected_host) {
        (Some(_), Some(host)) => {
            Some(engine.decide(&query.clone().verdict(t.hop, host, starttls, tls, cert)))
        }
        _ => None,
    };
    let host_requirement_met = connected_host
        .as_ref()
        .and(t.requirement)
        .map(|r| r.met_by(tls, cert));
    // Mail for this recipient goes elsewhere (a static route or the alternate host
    // already at plan time): the tested server is not on its path.
    let elsewhere = plan
        .as_ref()
        .and_then(|p| p.route.hop())
        .is_some_and(|h| h != t.hop);
    let delivers_here = connected_host.is_some()
        && host_requirement_met != Some(false)
        && verdict
            .as_ref()
            .is_none_or(|d| d.proceeds_on(t.hop) && d.tls.met_by(tls, cert));
    if elsewhere && let Some(p) = &plan {
        report.warnings.push(format!(
            "the policy routes {recipient} via {} {} (rule {}) at plan time: this server is not used for it",
            p.route,
            p.host.as_ref().map(|h| h.name.as_str()).unwrap_or("-"),
            p.rule
        ));
    } else if let Some(d) = &verdict
        && !delivers_here
    {
        report.problems.push(format!(
            "the policy would not deliver over this connection: route {} (rule {}): {}",
            d.route, d.rule, d.reason
        ));
    }
    if host_requirement_met == Some(false)
        && let Some(r) = t.requirement
    {
        report.problems.push(format!(
            "the connection does not meet the host's requirement (TLS required {}, verify {}, min {})",
            r.required, r.verify, r.min
        ));
    }
    report.policy = Some(PolicyReport {
        version: engine.version(),
        sender,
        recipient,
        hop: t.hop.to_string(),
        plan,
        verdict,
        host_requirement: t.requirement,
        host_requirement_met,
        delivers_here,
    });
    report.status = if report.problems.is_empty() {
        "ok"
    } else {
        "problems"
    }
    .to_string();
    Ok(report)
}

/// Looks up the domain's MTA-STS policy as delivery does, without the disk cache.
async fn mta_sts(
    settings: crate::mta_sts::MtaStsSettings,
    resolver: &Resolver,
    roots: Arc<rustls::RootCertStore>,
    domain: &str,
    host: Option<&str>,
) -> Option<StsReport> {
    let settings = crate::mta_sts::MtaStsSettings {
        cache_dir: None,
        ..settings
    };
    let sts = match crate::mta_sts::MtaSts::new(settings, resolver.clone(), roots) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            return Some(StsReport {
                mode: "none".into(),
                mx: Vec::new(),
                max_age: None,
                failure: Some(format!("MTA-STS client: {e}")),
                mx_match: None,
            });
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let found = sts.lookup(domain, now).await;
    let policy = found.policy.as_ref().map(|p| &p.policy);
    Some(StsReport {
        mode: found.fact().to_string(),
        mx: policy.map(|p| p.mx.clone()).unwrap_or_default(),
        max_age: policy.map(|p| p.max_age),
        failure: found
            .failure
            .as_ref()
            .map(|f| format!("{}: {}", f.result_type, f.detail)),
        mx_match: policy.zip(host).map(|(p, h)| p.matches(h)),
    })
}

async fn connect(
    addr: SocketAddr,
    client_config: &ClientConfig,
    config: &Config,
) -> Result<Client<TcpStream>, String> {
    let stream = tokio::time::timeout(config.delivery.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| "connection timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Client::connect(stream, client_config.clone())
        .await
        .map_err(|e| e.to_string())
}

/// EHLO facts, STARTTLS, certificate analysis; fills `report`, returns the facts.
async fn probe(
    mut client: Client<TcpStream>,
    name: &str,
    roots: Arc<rustls::RootCertStore>,
    report: &mut Report,
) -> (Starttls, TlsVersion, CertStatus) {
    report.greeting = Some(client.greeting().to_string().trim().to_string());
    report.ehlo_hostname = Some(client.capabilities().hostname.clone());
    if !client.capabilities().starttls {
        report.starttls = Some("absent".into());
        report
            .problems
            .push(format!("{name} does not offer STARTTLS"));
        let _ = client.quit().await;
        return (Starttls::Absent, TlsVersion::None, CertStatus::None);
    }
    report.starttls = Some("offered".into());
    let attempt = async {
        let server_name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
        let verifier = RecordingVerifier::new(roots).map_err(|e| e.to_string())?;
        let tls_config = verifier.client_config().map_err(|e| e.to_string())?;
        let outcome = client
            .starttls(Arc::new(tls_config), server_name)
            .await
            .map_err(|e| e.to_string());
        Ok::<_, String>((outcome, verifier.result()))
    };
    let (outcome, verdict) = match attempt.await {
        Ok(pair) => pair,
        Err(e) => (Err(e), None),
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            report.tls = Some(TlsReport {
                version: "none".into(),
                cipher: None,
                error: Some(e.clone()),
            });
            report.problems.push(format!("TLS handshake failed: {e}"));
            return (Starttls::Offered, TlsVersion::None, CertStatus::None);
        }
    };
    let version = match outcome.version {
        Some(rustls::ProtocolVersion::TLSv1_3) => TlsVersion::V1_3,
        Some(rustls::ProtocolVersion::TLSv1_2) => TlsVersion::V1_2,
        _ => TlsVersion::None,
    };
    report.tls = Some(TlsReport {
        version: version.to_string(),
        cipher: outcome.cipher.map(|c| format!("{c:?}")),
        error: None,
    });
    report.requiretls_offered = Some(client.capabilities().requiretls);
    let (status, verdict_text, trusted) = match verdict {
        Some(CertResult::Valid) => (CertStatus::Valid, "valid".to_string(), Some(true)),
        Some(CertResult::Expired) => (CertStatus::Expired, "expired".to_string(), None),
        Some(CertResult::HostnameMismatch) => (
            CertStatus::HostnameMismatch,
            "hostname-mismatch".to_string(),
            Some(true),
        ),
        Some(CertResult::Untrusted) => {
            (CertStatus::Untrusted, "untrusted".to_string(), Some(false))
        }
        Some(other) => (CertStatus::Untrusted, format!("invalid: {other:?}"), None),
        None => (CertStatus::Untrusted, "not verified".to_string(), None),
    };
    let chain: Vec<CertInfo> = outcome
        .peer_certificates
        .iter()
        .filter_map(|der| match cert_info(der) {
            Ok(info) => Some(info),
            Err(e) => {
                report
                    .warnings
                    .push(format!("a certificate could not be parsed: {e}"));
                None
            }
        })
        .collect();
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
    .unwrap_or(i64::MAX);
    let leaf = chain.first();
    let expired = leaf.is_some_and(|c| now > c.not_after || now < c.not_before);
    let days_left = leaf.map(|c| (c.not_after - now).div_euclid(86_400));
    let hostname_match = leaf.is_some_and(|c| c.sans.iter().any(|san| name_matches(san, name)));
    match status {
        CertStatus::Valid => {}
        CertStatus::Expired => report
            .problems
            .push("the certificate is expired (or not yet valid)".into()),
        CertStatus::HostnameMismatch => report
            .problems
            .push(format!("the certificate is not valid for {name}")),
        _ => report.problems.push(format!(
            "the certificate is not trusted ({verdict_text}) by the relay's roots"
        )),
    }
    if let Some(days) = days_left
        && (0..EXPIRY_WARNING_DAYS).contains(&days)
    {
        report
            .warnings
            .push(format!("the certificate expires in {days} day(s)"));
    }
    report.certificate = Some(CertReport {
        verdict: verdict_text,
        status: status.to_string(),
        trusted,
        expired,
        days_left,
        hostname_match,
        chain,
    });
    let _ = client.quit().await;
    (Starttls::Offered, version, status)
}

/// Subject, issuer, SANs and validity of a DER certificate.
pub fn cert_info(der: &CertificateDer<'_>) -> Result<CertInfo, String> {
    use x509_parser::extensions::GeneralName;

    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| e.to_string())?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(d) => sans.push((*d).to_string()),
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        sans.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        sans,
        serial: cert.raw_serial_as_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// RFC 6125 matching of a SAN against the host name: exact (case-insensitive), or a
/// `*.` wildcard standing for exactly one left-most label.
fn name_matches(san: &str, host: &str) -> bool {
    let (san, host) = (
        san.trim_end_matches('.').to_ascii_lowercase(),
        host.trim_end_matches('.').to_ascii_lowercase(),
    );
    if let Some(rest) = san.strip_prefix("*.") {
        return host
            .split_once('.')
            .is_some_and(|(first, tail)| !first.is_empty() && tail == rest);
    }
    san == host
}

fn print_text(r: &Report) -> std::io::Result<()> {
    let time = |ts: i64| crate::queue_cmd::utc(u64::try_from(ts).unwrap_or(0));
    crate::outln!("target:     {} ({:?}), port {}", r.target, r.kind, r.port)?;
    for c in &r.candidates {
        crate::outln!(
            "candidate:  {} (preference {}) {}",
            c.name,
            c.preference,
            c.addresses.join(", ")
        )?;
    }
    for e in &r.connect_errors {
        crate::outln!("connect:    failed: {e}")?;
    }
    if let (Some(host), Some(addr)) = (&r.host, &r.address) {
        crate::outln!("connected:  {host} [{addr}]")?;
    }
    if let Some(g) = &r.greeting {
        crate::outln!("greeting:   {g}")?;
    }
    if let Some(s) = &r.starttls {
        crate::outln!("STARTTLS:   {s}")?;
    }
    if let Some(m) = &r.mta_sts {
        crate::outln!(
            "MTA-STS:    {}{}{}",
            m.mode,
            if m.mx.is_empty() {
                String::new()
            } else {
                format!(" (mx: {})", m.mx.join(", "))
            },
            match m.mx_match {
                Some(true) => ", connected host allowed",
                Some(false) => ", connected host NOT allowed",
                None => "",
            }
        )?;
        if let Some(f) = &m.failure {
            crate::outln!("            fetch failed: {f}")?;
        }
    }
    if let Some(t) = &r.tls {
        match &t.error {
            Some(e) => crate::outln!("TLS:        handshake failed: {e}")?,
            None => crate::outln!(
                "TLS:        version {}, cipher {}",
                t.version,
                t.cipher.as_deref().unwrap_or("-")
            )?,
        }
    }
    if let Some(c) = &r.certificate {
        let trusted = match c.trusted {
            Some(true) => "yes",
            Some(false) => "no",
            None => "unknown",
        };
        crate::outln!(
            "certificate: {} (trusted: {trusted}, expired: {}, host name matches: {}, days left: {})",
            c.verdict,
            if c.expired { "yes" } else { "no" },
            if c.hostname_match { "yes" } else { "no" },
            c.days_left.map_or("-".to_string(), |d| d.to_string()),
        )?;
        for (i, cert) in c.chain.iter().enumerate() {
            crate::outln!("  [{i}] subject:   {}", cert.subject)?;
            crate::outln!("      issuer:    {}", cert.issuer)?;
            if !cert.sans.is_empty() {
                crate::outln!("      SANs:      {}", cert.sans.join(", "))?;
            }
            crate::outln!(
                "      validity:  {} .. {}",
                time(cert.not_before),
                time(cert.not_after)
            )?;
        }
    }
    if let Some(p) = &r.policy {
        crate::outln!(
            "policy:     version {} for {} -> {} (hop {})",
            p.version,
            p.sender,
            p.recipient,
            p.hop
        )?;
        if let Some(plan) = &p.plan {
            crate::outln!(
                "  plan:     route {}{} (rule {}), TLS required {} (verify {}, min {})",
                plan.route,
                plan.host
                    .as_ref()
                    .map(|h| format!(" via {}", h.name))
                    .unwrap_or_default(),
                plan.rule,
                plan.tls.required,
                plan.tls.verify,
                plan.tls.min
            )?;
        }
        match &p.verdict {
            Some(v) => crate::outln!(
                "  verdict:  route {}{} (rule {}, result {}): {}",
                v.route,
                v.host
                    .as_ref()
                    .map(|h| format!(" via {}", h.name))
                    .unwrap_or_default(),
                v.rule,
                v.result,
                v.reason
            )?,
            None => crate::outln!("  verdict:  -")?,
        }
        if let (Some(req), Some(met)) = (p.host_requirement, p.host_requirement_met) {
            crate::outln!(
                "  host requires TLS {} (verify {}, min {}): {}",
                req.required,
                req.verify,
                req.min,
                if met { "met" } else { "NOT met" }
            )?;
        }
        crate::outln!(
            "  delivers over this connection: {}",
            if p.delivers_here { "yes" } else { "no" }
        )?;
    }
    for w in &r.warnings {
        crate::outln!("warning:    {w}")?;
    }
    for p in &r.problems {
        crate::outln!("problem:    {p}")?;
    }
    crate::outln!("status:     {}", r.status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matching() {
        assert!(name_matches("mx.example.test", "MX.example.test."));
        assert!(name_matches("*.example.test", "mx.example.test"));
        assert!(!name_matches("*.example.test", "a.mx.example.test"));
        assert!(!name_matches("*.example.test", "example.test"));
        assert!(!name_matches("someone-else.test", "mx.example.test"));
    }
}
