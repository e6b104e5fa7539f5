//! The relay configuration file (`altroute serve -c altroute.toml`).
//!
//! [`Config::load`] reads and validates the whole file and reports every problem at once
//! (unknown keys with their path, unparsable addresses and networks, missing or unreadable
//! files, inconsistent settings), the way `altroute policy check` does. Relative paths are
//! resolved against the directory of the configuration file. Every key and its default is
//! documented in `docs/relay.md`; the defaults are also stated on each field below.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read. (The cause is the error's source, not repeated in
    /// its message: `{:#}` and anyhow's chain print it once.)
    #[error("cannot read {path}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but has problems; all of them are listed.
    #[error("{path}: {} problem{} found:\n  {}", problems.len(), if problems.len() == 1 { "" } else { "s" }, problems.join("\n  "))]
    Invalid {
        /// The configuration file.
        path: PathBuf,
        /// One line per problem, each naming the key.
        problems: Vec<String>,
    },
}

/// The validated relay configuration.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Where the configuration was read from (relative paths were resolved against its
    /// directory).
    pub path: PathBuf,
    /// `[server]`: the inbound ESMTP listener.
    pub server: Server,
    /// `[relay]`: who may relay.
    pub relay: Relay,
    /// `[spool]`.
    pub spool: SpoolSection,
    /// `[delivery]`: outbound delivery (used by `crate::delivery`).
    pub delivery: Delivery,
    /// `[policy]`.
    pub policy: PolicySection,
    /// `[admin]`: the admin HTTP endpoint.
    pub admin: Admin,
    /// `[edge]`: the policy module's SMTP stream face on inbound listeners (`crate::edge`).
    /// Defaults to none (no filter).
    pub edge: Option<crate::edge::EdgeConfig>,
    /// `[[extension]]`: policy extensions chained after the standard module
    /// (`crate::extensions`, docs/extensions.md). Defaults to none.
    pub extensions: Vec<crate::extensions::ExtensionConfig>,
    /// `[mta_sts]`: MTA-STS for outbound delivery (`crate::mta_sts`).
    pub mta_sts: crate::mta_sts::MtaStsConfig,
    /// `[tlsrpt]`: TLS reporting (`crate::tlsrpt`).
    pub tlsrpt: crate::tlsrpt::TlsRptConfig,
}

/// `[server]`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Server {
    /// Name in the greeting, EHLO reply and `Received:`. Defaults to the system host name.
    pub hostname: String,
    /// Addresses to listen on. Defaults to `["127.0.0.1:25"]`.
    pub listen: Vec<SocketAddr>,
    /// Largest message in octets. Defaults to 35 MiB.
    pub max_message_size: usize,
    /// Recipients per message. Defaults to 100.
    pub max_recipients: usize,
    /// `Received:` fields a message may already carry; more is refused as a mail loop
    /// (`554 5.4.6`, as Postfix's `hopcount_limit`). Defaults to 50.
    pub max_hops: usize,
    /// Wait for each command. Defaults to 300 s.
    pub command_timeout: Duration,
    /// Wait for each block of DATA. Defaults to 180 s.
    pub data_timeout: Duration,
    /// Whole session. Defaults to 1800 s.
    pub session_timeout: Duration,
    /// Concurrent SMTP sessions; further clients wait in the kernel's accept queue.
    /// Defaults to 1000.
    pub max_sessions: usize,
    /// Concurrent sessions from one client address outside `relay.allow_networks`;
    /// more get `421 4.7.0`. Defaults to 50 (Postfix's
    /// `smtpd_client_connection_count_limit`, which also exempts its own networks).
    pub max_sessions_per_client: usize,
    /// How long shutdown waits for sessions in progress. Defaults to 30 s.
    pub shutdown_grace: Duration,
    /// Certificate chain (PEM). Defaults to none: no STARTTLS offered.
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// The TLS configuration built from `tls_cert`, `tls_key` and `relay.client_ca`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Trusted proxies (Envoy, HAProxy): a connection from one of these networks must start
    /// with a PROXY protocol header (v1 or v2), whose source address becomes the client's
    /// (`crate::proxy_protocol`). Defaults to empty: no PROXY protocol.
    pub proxy_protocol_from: Vec<IpNet>,
}

/// `[relay]`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Relay {
    /// Client networks that may relay. Defaults to loopback only
    /// (`["127.0.0.0/8", "::1/128"]`).
    pub allow_networks: Vec<IpNet>,
    /// Client certificates issued by this CA may relay. Defaults to none.
    pub client_ca: Option<PathBuf>,
    /// SMTP AUTH (over TLS only) users: lines `user:sha256hex(password)`. Defaults to none.
    pub users_file: Option<PathBuf>,
    /// The users read from `users_file`: (user, SHA-256 of the password).
    pub users: Vec<(String, [u8; 32])>,
    /// Where mail to `postmaster` (RFC 5321 §4.5.1, the only mailbox without a domain)
    /// goes: the relay has no mailboxes of its own. Without it, `RCPT TO:<postmaster>` is
    /// refused (`550 5.1.1`) rather than accepted and never delivered.
    pub postmaster: Option<String>,
}

/// `[spool]`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SpoolSection {
    /// Spool directory. Defaults to `/var/spool/altroute`.
    pub dir: PathBuf,
}

/// `[delivery]`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Delivery {
    /// Start the delivery workers. Defaults to true; false keeps every message queued
    /// (benchmarks, tests of the inbound side, a relay being drained by another node).
    pub enabled: bool,
    /// DNS server for MX/A/AAAA. Defaults to none: the system resolver.
    pub resolver: Option<SocketAddr>,
    /// Port used to reach MX hosts. Defaults to 25.
    pub smtp_port: u16,
    /// EHLO name. Defaults to `server.hostname`.
    pub helo: String,
    /// Extra trusted roots (PEM) added to webpki-roots. Defaults to none.
    pub ca_file: Option<PathBuf>,
    /// Delivery workers. Defaults to 8.
    pub workers: usize,
    /// Concurrent connections per destination host. Defaults to 4.
    pub per_destination: usize,
    /// Addresses tried per hop of a delivery attempt. Defaults to 5.
    pub mx_address_limit: usize,
    /// SMTP sessions per hop of a delivery attempt. Defaults to 2.
    pub mx_session_limit: usize,
    /// Connect timeout. Defaults to 30 s.
    pub connect_timeout: Duration,
    /// Wait for the reply to the end of the message. Defaults to 600 s (RFC 5321
    /// §4.5.3.2.6; Postfix's `smtp_data_done_timeout`).
    pub data_done_timeout: Duration,
    /// First retry delay. Defaults to 300 s.
    pub retry_initial: Duration,
    /// Longest retry delay. Defaults to 3600 s.
    pub retry_max: Duration,
    /// Queue lifetime. Defaults to 432000 s (5 days).
    pub queue_lifetime: Duration,
}

/// `[policy]`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PolicySection {
    /// The policy, TOML or compiled JSON. Required.
    pub file: PathBuf,
    /// The policy module. Defaults to none: the built-in standard module.
    pub module: Option<PathBuf>,
    /// Deadline per decision. Defaults to 100 ms.
    pub deadline: Duration,
    /// Memory cap of a module instance in MiB. Defaults to 64.
    pub memory_limit_mb: u64,
    /// The audit log of policy changes (JSON lines). Defaults to `<spool dir>/audit.jsonl`.
    pub audit_log: PathBuf,
    /// Policy versions kept for rollback, the active one included. Defaults to 10.
    pub history: usize,
    /// Watch the policy (and module) file and reload on change. Defaults to true.
    pub watch: bool,
}

/// `[admin]`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Admin {
    /// Admin HTTP address. Defaults to `127.0.0.1:8025`; a non-loopback address needs a token.
    pub listen: SocketAddr,
    /// Bearer token for state-changing calls. Defaults to none.
    pub token: Option<String>,
}

// The file as written. Numbers are typed (a type error is reported by the TOML parser with
// its location); addresses, networks and paths are strings checked below so that every bad
// one is reported, not just the first.

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawFile {
    server: RawServer,
    relay: RawRelay,
    spool: RawSpool,
    delivery: RawDelivery,
    policy: RawPolicy,
    admin: RawAdmin,
    edge: Option<crate::edge::RawEdge>,
    extension: Vec<crate::extensions::RawExtension>,
    mta_sts: crate::mta_sts::MtaStsConfig,
    tlsrpt: crate::tlsrpt::TlsRptConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawServer {
    hostname: Option<String>,
    listen: Option<Vec<String>>,
    max_message_size: Option<u64>,
    max_recipients: Option<u64>,
    max_hops: Option<u64>,
    command_timeout_secs: Option<u64>,
    data_timeout_secs: Option<u64>,
    session_timeout_secs: Option<u64>,
    max_sessions: Option<u64>,
    max_sessions_per_client: Option<u64>,
    shutdown_grace_secs: Option<u64>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    proxy_protocol_from: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawRelay {
    allow_networks: Option<Vec<String>>,
    client_ca: Option<String>,
    users_file: Option<String>,
    postmaster: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawSpool {
    dir: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawDelivery {
    enabled: Option<bool>,
    resolver: Option<String>,
    smtp_port: Option<u16>,
    helo: Option<String>,
    ca_file: Option<String>,
    workers: Option<u64>,
    per_destination: Option<u64>,
    mx_address_limit: Option<u64>,
    mx_session_limit: Option<u64>,
    connect_timeout_secs: Option<u64>,
    data_done_timeout_secs: Option<u64>,
    retry_initial_secs: Option<u64>,
    retry_max_secs: Option<u64>,
    queue_lifetime_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawPolicy {
    file: Option<String>,
    module: Option<String>,
    deadline_ms: Option<u64>,
    memory_limit_mb: Option<u64>,
    audit_log: Option<String>,
    history: Option<u64>,
    watch: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawAdmin {
    listen: Option<String>,
    token: Option<String>,
}

/// Collects problems while validating.
struct Check<'a> {
    base: &'a Path,
    problems: Vec<String>,
}

impl Check<'_> {
    fn problem(&mut self, msg: String) {
        self.problems.push(msg);
    }

    fn path(&self, s: &str) -> PathBuf {
        let p = Path::new(s);
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
    }

    /// A file that must exist and be readable.
    fn file(&mut self, key: &str, value: Option<&String>) -> Option<PathBuf> {
        let path = self.path(value?);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Some(path),
            Ok(_) => {
                self.problem(format!("{key}: {} is not a regular file", path.display()));
                None
            }
            Err(e) => {
                self.problem(format!("{key}: {}: {e}", path.display()));
                None
            }
        }
    }

    fn addr(&mut self, key: &str, s: &str) -> Option<SocketAddr> {
        match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(format!(
                    "{key}: {s:?} is not an address with port (e.g. \"127.0.0.1:25\" or \"[::1]:25\")"
                ));
                None
            }
        }
    }

    /// A list of networks in CIDR notation (a bare address means that one host). A
    /// catch-all network (`0.0.0.0/0`, `::/0`) is a problem: `catch_all` says why.
    fn networks(&mut self, key: &str, list: &[String], catch_all: &str) -> Vec<IpNet> {
        let mut out = Vec::new();
        for (i, n) in list.iter().enumerate() {
            let parsed = n
                .parse::<IpNet>()
                .or_else(|_| n.parse::<IpAddr>().map(IpNet::from));
            // Like a catch-all, and refused too: a network with host bits (`10.9.9.9/1`,
            // a typo for one host, let an audit's client anywhere in 0.0.0.0/1 relay),
            // and one wider than a /8 (IPv6: a /16), such as `0.0.0.0/1` and
            // `128.0.0.0/1` together.
            let wide = |net: &IpNet| match net {
                IpNet::V4(n) => n.prefix_len() < 8,
                // The unique local range fc00::/7 is one network.
                IpNet::V6(n) => n.prefix_len() < 7,
            };
            match parsed {
                Ok(net) if net.prefix_len() == 0 => {
                    self.problem(format!("{key}: {net} {catch_all}"));
                }
                Ok(net) if net.trunc() != net => self.problem(if wide(&net) {
                    format!(
                        "{key}[{i}]: {n:?} has host bits set: write the one host ({:?})",
                        net.addr().to_string()
                    )
                } else {
                    format!(
                        "{key}[{i}]: {n:?} has host bits set: write the network ({:?}) or the one host ({:?})",
                        net.trunc().to_string(),
                        net.addr().to_string()
                    )
                }),
                Ok(net) if wide(&net) => self.problem(format!(
                    "{key}[{i}]: {net} is wider than a /8 (IPv6: a /7), refused like a catch-all, which {catch_all}"
                )),
                Ok(net) => out.push(net),
                Err(_) => self.problem(format!(
                    "{key}[{i}]: {n:?} is not a network in CIDR notation (e.g. \"192.0.2.0/24\")"
                )),
            }
        }
        out
    }

    fn positive(&mut self, key: &str, v: Option<u64>, default: u64) -> u64 {
        match v {
            Some(0) => {
                self.problem(format!("{key}: must be greater than 0"));
                default
            }
            Some(v) => v,
            None => default,
        }
    }
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

fn as_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

impl Config {
    /// Read and validate `path`; every problem is listed in [`ConfigError::Invalid`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Config::parse(&src, path, base).map_err(|problems| ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }

    /// Validate configuration text; `base` resolves relative paths. Returns every problem.
    pub fn parse(src: &str, path: &Path, base: &Path) -> Result<Config, Vec<String>> {
        let mut problems = Vec::new();
        // Every value of the wrong type, not only the first; the checks below then run on
        // the rest (a value set aside falls back to its default).
        let shape = altroute_policy::toml_errors::deserialize::<RawFile>(src);
        for e in &shape.errors {
            problems.push(e.to_string().trim().replace('\n', "\n    "));
        }
        for key in &shape.unknown {
            problems.push(format!("{key}: unknown key"));
        }
        let Some(raw) = shape.value else {
            return Err(problems);
        };
        let mut c = Check { base, problems };

        // [server]
        let s = raw.server;
        let hostname = s.hostname.unwrap_or_else(system_hostname);
        if hostname.is_empty() || hostname.contains(char::is_whitespace) {
            c.problem(format!("server.hostname: {hostname:?} is not a host name"));
        }
        let listen_src = s.listen.unwrap_or_else(|| vec!["127.0.0.1:25".to_owned()]);
        if listen_src.is_empty() {
            c.problem("server.listen: at least one address is needed".to_owned());
        }
        let listen: Vec<SocketAddr> = listen_src
            .iter()
            .enumerate()
            .filter_map(|(i, a)| c.addr(&format!("server.listen[{i}]"), a))
            .collect();
        let max_message_size = as_usize(c.positive(
            "server.max_message_size",
            s.max_message_size,
            35 * 1024 * 1024,
        ));
        let max_recipients = as_usize(c.positive("server.max_recipients", s.max_recipients, 100));
        let max_hops = as_usize(c.positive("server.max_hops", s.max_hops, 50));
        let command_timeout =
            c.positive("server.command_timeout_secs", s.command_timeout_secs, 300);
        let data_timeout = c.positive("server.data_timeout_secs", s.data_timeout_secs, 180);
        let session_timeout =
            c.positive("server.session_timeout_secs", s.session_timeout_secs, 1800);
        let max_sessions = c.positive("server.max_sessions", s.max_sessions, 1000);
        // A semaphore holds at most u32::MAX >> 3 permits; far beyond any file-descriptor limit.
        if max_sessions > 1_000_000 {
            c.problem("server.max_sessions: at most 1000000".to_owned());
        }
        let max_sessions_per_client = c.positive(
            "server.max_sessions_per_client",
            s.max_sessions_per_client,
            50,
        );
        let shutdown_grace = s.shutdown_grace_secs.unwrap_or(30);
        let tls_cert = c.file("server.tls_cert", s.tls_cert.as_ref());
        let tls_key = c.file("server.tls_key", s.tls_key.as_ref());
        match (&s.tls_cert, &s.tls_key) {
            (Some(_), None) => c.problem("server.tls_key: needed with server.tls_cert".to_owned()),
            (None, Some(_)) => c.problem("server.tls_cert: needed with server.tls_key".to_owned()),
            _ => {}
        }
        let proxy_protocol_from = c.networks(
            "server.proxy_protocol_from",
            s.proxy_protocol_from.as_deref().unwrap_or_default(),
            "trusts every address: any client could claim any address, and relay",
        );

        // [relay]
        let r = raw.relay;
        let nets_src = r
            .allow_networks
            .unwrap_or_else(|| vec!["127.0.0.0/8".to_owned(), "::1/128".to_owned()]);
        let allow_networks = c.networks(
            "relay.allow_networks",
            &nets_src,
            "allows every address: that is an open relay",
        );
        let client_ca = c.file("relay.client_ca", r.client_ca.as_ref());
        let postmaster = r.postmaster.clone();
        if let Some(p) = &postmaster
            && !(p.is_ascii() && altroute_policy::pattern::is_mailbox(p))
        {
            c.problem(format!(
                "relay.postmaster: {p:?} is not a plain ASCII mailbox (user@domain)"
            ));
        }
        let users_file = c.file("relay.users_file", r.users_file.as_ref());
        if s.tls_cert.is_none() {
            if r.client_ca.is_some() {
                c.problem(
                    "relay.client_ca: client certificates need STARTTLS (set server.tls_cert and server.tls_key)"
                        .to_owned(),
                );
            }
            if r.users_file.is_some() {
                c.problem(
                    "relay.users_file: SMTP AUTH is only offered over TLS (set server.tls_cert and server.tls_key)"
                        .to_owned(),
                );
            }
        }
        let users = match &users_file {
            Some(p) => read_users(p, &mut c),
            None => Vec::new(),
        };
        let tls = match (&tls_cert, &tls_key) {
            (Some(cert), Some(key)) => match build_tls(cert, key, client_ca.as_deref()) {
                Ok(t) => Some(t),
                Err(e) => {
                    c.problem(e);
                    None
                }
            },
            _ => None,
        };

        // [spool]
        let spool_dir = c.path(raw.spool.dir.as_deref().unwrap_or("/var/spool/altroute"));
        if spool_dir.exists() && !spool_dir.is_dir() {
            c.problem(format!(
                "spool.dir: {} exists and is not a directory",
                spool_dir.display()
            ));
        }

        // [delivery]
        let d = raw.delivery;
        let resolver = d
            .resolver
            .as_deref()
            .and_then(|a| c.addr("delivery.resolver", a));
        let ca_file = c.file("delivery.ca_file", d.ca_file.as_ref());
        let smtp_port = d.smtp_port.unwrap_or(25);
        if smtp_port == 0 {
            c.problem("delivery.smtp_port: must be greater than 0".to_owned());
        }
        let workers = as_usize(c.positive("delivery.workers", d.workers, 8));
        let per_destination =
            as_usize(c.positive("delivery.per_destination", d.per_destination, 4));
        let mx_address_limit =
            as_usize(c.positive("delivery.mx_address_limit", d.mx_address_limit, 5));
        let mx_session_limit =
            as_usize(c.positive("delivery.mx_session_limit", d.mx_session_limit, 2));
        let connect_timeout =
            c.positive("delivery.connect_timeout_secs", d.connect_timeout_secs, 30);
        let data_done_timeout = c.positive(
            "delivery.data_done_timeout_secs",
            d.data_done_timeout_secs,
            600,
        );
        let retry_initial = c.positive("delivery.retry_initial_secs", d.retry_initial_secs, 300);
        let retry_max = c.positive("delivery.retry_max_secs", d.retry_max_secs, 3600);
        let queue_lifetime = c.positive(
            "delivery.queue_lifetime_secs",
            d.queue_lifetime_secs,
            432_000,
        );
        if retry_max < retry_initial {
            c.problem(format!(
                "delivery.retry_max_secs: {retry_max} is less than delivery.retry_initial_secs ({retry_initial})"
            ));
        }

        // [policy]
        let p = raw.policy;
        let policy_file = match &p.file {
            Some(_) => c.file("policy.file", p.file.as_ref()),
            None => {
                c.problem("policy.file: required (a policy TOML or compiled JSON)".to_owned());
                None
            }
        };
        let module = c.file("policy.module", p.module.as_ref());
        let deadline_ms = c.positive("policy.deadline_ms", p.deadline_ms, 100);
        let memory_limit_mb = c.positive("policy.memory_limit_mb", p.memory_limit_mb, 64);
        let audit_log = match &p.audit_log {
            Some(path) => c.path(path),
            None => spool_dir.join("audit.jsonl"),
        };
        let history = usize::try_from(c.positive("policy.history", p.history, 10)).unwrap_or(10);

        // [admin]
        let a = raw.admin;
        let admin_listen = c
            .addr(
                "admin.listen",
                a.listen.as_deref().unwrap_or("127.0.0.1:8025"),
            )
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8025)));
        if !admin_listen.ip().is_loopback() && a.token.is_none() {
            c.problem(format!(
                "admin.listen: {admin_listen} is not a loopback address; set admin.token to expose it"
            ));
        }
        if a.token.as_deref().is_some_and(str::is_empty) {
            c.problem("admin.token: must not be empty".to_owned());
        }

        let edge = crate::edge::check(raw.edge, base, &listen, &mut c.problems);
        let extensions = crate::extensions::check(raw.extension, base, &mut c.problems);
        c.problems.extend(raw.mta_sts.problems());

        if !c.problems.is_empty() {
            return Err(c.problems);
        }
        let helo = d.helo.unwrap_or_else(|| hostname.clone());
        Ok(Config {
            path: path.to_owned(),
            server: Server {
                hostname,
                listen,
                max_message_size,
                max_recipients,
                max_hops,
                command_timeout: Duration::from_secs(command_timeout),
                data_timeout: Duration::from_secs(data_timeout),
                session_timeout: Duration::from_secs(session_timeout),
                max_sessions: as_usize(max_sessions),
                max_sessions_per_client: as_usize(max_sessions_per_client),
                shutdown_grace: Duration::from_secs(shutdown_grace),
                tls_cert,
                tls_key,
                tls,
                proxy_protocol_from,
            },
            relay: Relay {
                allow_networks,
                client_ca,
                users_file,
                users,
                postmaster,
            },
            spool: SpoolSection { dir: spool_dir },
            delivery: Delivery {
                enabled: d.enabled.unwrap_or(true),
                resolver,
                smtp_port,
                helo,
                ca_file,
                workers,
                per_destination,
                mx_address_limit,
                mx_session_limit,
                connect_timeout: Duration::from_secs(connect_timeout),
                data_done_timeout: Duration::from_secs(data_done_timeout),
                retry_initial: Duration::from_secs(retry_initial),
                retry_max: Duration::from_secs(retry_max),
                queue_lifetime: Duration::from_secs(queue_lifetime),
            },
            policy: PolicySection {
                // Present: a missing file was reported above and returned early.
                file: policy_file.unwrap_or_default(),
                module,
                deadline: Duration::from_millis(deadline_ms),
                memory_limit_mb,
                audit_log,
                history,
                watch: p.watch.unwrap_or(true),
            },
            admin: Admin {
                listen: admin_listen,
                token: a.token,
            },
            edge,
            extensions,
            mta_sts: raw.mta_sts.resolved(base),
            tlsrpt: raw.tlsrpt.resolved(base),
        })
    }
}

impl Config {
    /// Settings that are valid but probably not meant, one line each naming the keys; the
    /// relay logs them at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for proxy in &self.server.proxy_protocol_from {
            let covered = self
                .relay
                .allow_networks
                .iter()
                .filter(|allowed| {
                    allowed.contains(&proxy.network()) || proxy.contains(&allowed.network())
                })
                .map(ToString::to_string)
                .collect::<Vec<_>>();
            if !covered.is_empty() {
                out.push(format!(
                    "server.proxy_protocol_from: the trusted proxy {proxy} is in relay.allow_networks ({}): \
                     a connection on which the proxy speaks for itself (PROXY UNKNOWN, v2 LOCAL, \
                     e.g. a health check) keeps the proxy's address and may relay; every proxied \
                     client is checked by its own address",
                    covered.join(", ")
                ));
            }
        }
        out
    }
}

/// Whether `ip` is in one of `networks`. An IPv4 client on a dual-stack socket shows up
/// as `::ffff:a.b.c.d` and counts as IPv4.
pub fn in_networks(networks: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    networks.iter().any(|n| n.contains(&ip))
}

/// Parse a users file: `user:sha256hex(password)` per line, `#` comments and blank lines
/// ignored.
fn read_users(path: &Path, c: &mut Check<'_>) -> Vec<(String, [u8; 32])> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            c.problem(format!("relay.users_file: {}: {e}", path.display()));
            return Vec::new();
        }
    };
    let mut users = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // A user name has no white space (`eve :…` once made the user `"eve "`, whom
        // `eve` could not log in as).
        let parsed = line.split_once(':').and_then(|(user, hex)| {
            let hash = decode_hex32(hex.trim())?;
            (!user.is_empty() && !user.contains(char::is_whitespace))
                .then(|| (user.to_owned(), hash))
        });
        match parsed {
            // One line per user: a second one for the same user (a password "rotated" by
            // adding a line) once left both passwords working.
            Some((user, _)) if users.iter().any(|(u, _)| *u == user) => c.problem(format!(
                "relay.users_file: {}:{}: user {user:?} is already defined on an earlier line",
                path.display(),
                n + 1
            )),
            Some(u) => users.push(u),
            None => c.problem(format!(
                "relay.users_file: {}:{}: expected \"user:<sha256 of the password, 64 hex digits>\"",
                path.display(),
                n + 1
            )),
        }
    }
    users
}

fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    // Hex digits only (`from_str_radix` also takes a leading `+`: a typo became a hash).
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        let pair = s.get(2 * i..2 * i + 2)?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// The crypto provider used everywhere in the relay (the workspace builds rustls with ring).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Build the STARTTLS configuration. With a client CA, client certificates are requested;
/// a client without one may still use TLS (and relay by address or AUTH), but a certificate
/// that does not verify aborts the handshake.
fn build_tls(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("server.tls_cert: {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "server.tls_cert: {} holds no certificate",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("server.tls_key: {}: {e}", key.display()))?;
    let provider = crypto_provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("server.tls_cert: {e}"))?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("relay.client_ca: {}: {e}", ca.display()))?;
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("relay.client_ca: {}: {e}", ca.display()))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "relay.client_ca: {} holds no certificate",
                    ca.display()
                ));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("relay.client_ca: {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("server.tls_key: does not match server.tls_cert: {e}"))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(src: &str, dir: &Path) -> Result<Config, Vec<String>> {
        Config::parse(src, &dir.join("altroute.toml"), dir)
    }

    #[test]
    fn defaults_with_only_a_policy() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.toml"), "x").unwrap();
        let c = parse("[policy]\nfile = \"p.toml\"\n", dir.path()).unwrap();
        assert_eq!(c.server.listen, vec!["127.0.0.1:25".parse().unwrap()]);
        assert_eq!(c.server.max_message_size, 35 * 1024 * 1024);
        assert_eq!(c.server.max_sessions, 1000);
        assert_eq!(c.server.max_sessions_per_client, 50);
        assert_eq!(
            c.relay.allow_networks,
            vec![
                "127.0.0.0/8".parse::<IpNet>().unwrap(),
                "::1/128".parse().unwrap()
            ]
        );
        assert_eq!(c.policy.file, dir.path().join("p.toml"));
        assert_eq!(c.admin.listen, "127.0.0.1:8025".parse().unwrap());
        assert!(c.delivery.enabled);
        assert_eq!(c.delivery.data_done_timeout, Duration::from_secs(600));
        assert!(c.server.tls.is_none());
    }

    /// A wildcard listen address reaches delivery's loop check as configured: it was
    /// filtered out, and an audit's extension looped mail through the relay 50 times.
    #[test]
    fn delivery_sees_wildcard_listen_addresses() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.toml"), "x").unwrap();
        let c = parse(
            "[server]\nlisten = [\"0.0.0.0:2525\", \"[::]:2526\"]\n[policy]\nfile = \"p.toml\"\n",
            dir.path(),
        )
        .unwrap();
        let d = crate::delivery::DeliverySettings::from_config(&c);
        assert_eq!(d.listen, c.server.listen);
        assert_eq!(d.listen.len(), 2);
    }

    #[test]
    fn every_problem_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let src = r#"
[server]
listen = ["127.0.0.1", "127.0.0.1:2525"]
lisen = 3
tls_cert = "missing.pem"
[relay]
allow_networks = ["10.0.0.0/33", "0.0.0.0/0", "::1"]
users_file = "users"
postmaster = "postmaster"
[spool]
dri = "/x"
[admin]
listen = "0.0.0.0:8025"
"#;
        let problems = parse(src, dir.path()).unwrap_err();
        let all = problems.join("\n");
        for needle in [
            "server.lisen: unknown key",
            "spool.dri: unknown key",
            "server.listen[0]",
            "server.tls_cert: ",
            "server.tls_key: needed",
            "relay.allow_networks[0]",
            "open relay",
            "relay.users_file",
            "relay.postmaster",
            "policy.file: required",
            "admin.listen",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert!(!all.contains("allow_networks[2]"), "{all}");
    }

    #[test]
    fn proxy_protocol_from_is_checked_like_allow_networks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.toml"), "x").unwrap();
        let c = parse("[policy]\nfile = \"p.toml\"\n", dir.path()).unwrap();
        assert!(c.server.proxy_protocol_from.is_empty(), "off by default");
        assert!(c.warnings().is_empty());

        let src = r#"
[server]
proxy_protocol_from = ["127.0.0.1/32", "10.1.2.3", "10.0.0.0/33", "::/0", "envoy", "10.9.9.9/1", "0.0.0.0/1", "2000::/3", "10.0.0.0/8", "fc00::/7", "10.1.2.3/24"]
[policy]
file = "p.toml"
"#;
        let all = parse(src, dir.path()).unwrap_err().join("\n");
        for needle in [
            "server.proxy_protocol_from[2]: \"10.0.0.0/33\" is not a network",
            "server.proxy_protocol_from[4]: \"envoy\" is not a network",
            "server.proxy_protocol_from: ::/0 trusts every address",
            "server.proxy_protocol_from[5]: \"10.9.9.9/1\" has host bits set: write the one host (\"10.9.9.9\")",
            "server.proxy_protocol_from[6]: 0.0.0.0/1 is wider than a /8",
            "server.proxy_protocol_from[7]: 2000::/3 is wider than a /8 (IPv6: a /7), refused like a catch-all, which trusts every address",
            "server.proxy_protocol_from[10]: \"10.1.2.3/24\" has host bits set: write the network (\"10.1.2.0/24\") or the one host (\"10.1.2.3\")",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert!(!all.contains("proxy_protocol_from[0]"), "{all}");
        assert!(!all.contains("proxy_protocol_from[1]"), "{all}");
        assert!(!all.contains("proxy_protocol_from[8]"), "{all}");
        assert!(!all.contains("proxy_protocol_from[9]"), "{all}");

        // The default allow_networks (loopback) covers a co-located proxy: warned, not refused.
        let src = "[server]\nproxy_protocol_from = [\"127.0.0.1\", \"10.1.2.3\"]\n[policy]\nfile = \"p.toml\"\n";
        let c = parse(src, dir.path()).unwrap();
        assert_eq!(
            c.server.proxy_protocol_from,
            vec![
                "127.0.0.1/32".parse::<IpNet>().unwrap(),
                "10.1.2.3/32".parse().unwrap()
            ]
        );
        let warnings = c.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("server.proxy_protocol_from: the trusted proxy 127.0.0.1/32 is in relay.allow_networks (127.0.0.0/8)"),
            "{warnings:?}"
        );
        let src = "[server]\nproxy_protocol_from = [\"127.0.0.1\"]\n[relay]\nallow_networks = [\"127.0.0.5/32\"]\n[policy]\nfile = \"p.toml\"\n";
        assert!(parse(src, dir.path()).unwrap().warnings().is_empty());
    }

    #[test]
    fn every_value_of_the_wrong_type_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let src = "[server]\nmax_sessions = \"many\"\nlisen = 3\n[spool]\ndir = 5\n";
        let all = parse(src, dir.path()).unwrap_err().join("\n");
        for needle in [
            "line 2, column 16",
            "line 5, column 7",
            "server.lisen: unknown key",
            "policy.file: required",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn toml_syntax_error_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let problems = parse("[server\nx=", dir.path()).unwrap_err();
        assert_eq!(problems.len(), 1);
    }

    #[test]
    fn hex_users() {
        assert!(decode_hex32(&"ab".repeat(32)).is_some());
        assert!(decode_hex32(&"zz".repeat(32)).is_none());
        assert!(decode_hex32("abc").is_none());
        assert!(decode_hex32(&format!("+d{}", "ab".repeat(31))).is_none());
    }

    /// A user defined twice (a password "rotated" by adding a line: both worked) and a
    /// user name with white space (`eve :…` was the user `"eve "`) are problems.
    #[test]
    fn users_file_lines_are_one_user_each() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.toml"), "x").unwrap();
        let hash = "ab".repeat(32);
        std::fs::write(
            dir.path().join("users"),
            format!(
                "carol:{hash}\ncarol:{}\neve :{hash}\nok:{hash}\n",
                "cd".repeat(32)
            ),
        )
        .unwrap();
        let src = "[relay]\nusers_file = \"users\"\n[policy]\nfile = \"p.toml\"\n";
        let all = parse(src, dir.path()).unwrap_err().join("\n");
        assert!(
            all.contains(":2: user \"carol\" is already defined"),
            "{all}"
        );
        assert!(all.contains(":3: expected"), "{all}");
        assert!(!all.contains(":4:"), "{all}");
    }
}
