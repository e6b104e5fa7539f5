//! Outbound delivery: workers take due messages from the spool and deliver them, asking
//! the policy module where each recipient goes and whether the connection found is good
//! enough.
//!
//! # Core concepts
//!
//! - A scheduler loop ([`start`]) wakes on [`Spool::changed`], at [`Spool::next_wakeup`]
//!   (looked at at least every [`DeliverySettings::poll_interval`]) and when a worker ends;
//!   it claims due messages ([`Spool::claim_due`]) up to the number of free workers.
//! - A worker groups the due recipients of a message by domain and runs one attempt per
//!   domain (`attempt.rs`): plan through the engine, resolve (`resolve.rs`), connect to the
//!   MX hosts in preference order, EHLO, STARTTLS with a recording verifier, verdict through
//!   the engine, then send, reroute to the alternate secure host in the same attempt,
//!   defer or bounce.
//! - A safety floor outside the module: mail that requires TLS (REQUIRETLS, or the
//!   decision's own requirement) is never sent over a connection that does not meet it,
//!   whatever the module answered.
//! - Bounces and expired recipients get a DSN (`dsn.rs`) queued to the sender with the
//!   null sender.
//!
//! # Layout
//!
//! `mod.rs` (settings, scheduler, per-message bookkeeping), `attempt.rs` (one domain's
//! delivery attempt), `resolve.rs` (MX/A/AAAA), `dsn.rs` (RFC 3464), `metrics.rs`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::{Notify, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use altroute_queue::{QueueEntry, RecipientState, Spool};

use crate::policy_engine::PolicyEngine;

mod attempt;
pub mod dsn;
pub mod floor;
pub mod metrics;
pub mod resolve;
mod standards;

pub use attempt::Outcome;
pub use metrics::DeliveryMetrics;
pub use resolve::{Candidate, ResolveFailure, Resolver};

/// Errors of setting up delivery.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryError {
    /// The DNS resolver could not be built.
    #[error("DNS resolver: {0}")]
    Resolver(String),
    /// The extra trusted roots could not be read.
    #[error("CA file {path}: {why}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// What delivery needs from the configuration (`[delivery]`, `[server].hostname`).
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// Our name in DSNs (`Reporting-MTA`). Defaults to "altroute.localdomain".
    pub hostname: String,
    /// EHLO name. Defaults to `hostname`.
    pub helo: String,
    /// DNS server for MX/A/AAAA; `None` (the default) uses the system resolver.
    pub resolver: Option<SocketAddr>,
    /// Port used to reach MX hosts. Defaults to 25.
    pub smtp_port: u16,
    /// Extra trusted roots (PEM) added to webpki-roots. Defaults to none.
    pub ca_file: Option<PathBuf>,
    /// Messages delivered at the same time. Defaults to 8.
    pub workers: usize,
    /// Concurrent connections per destination host. Defaults to 4.
    pub per_destination: usize,
    /// TCP connect timeout. Defaults to 30 s.
    pub connect_timeout: Duration,
    /// Timeout of one SMTP command. Defaults to 5 min (RFC 5321 §4.5.3.2 allows more for
    /// some commands; the client applies it to every reply).
    pub command_timeout: Duration,
    /// Longest time the scheduler sleeps without looking at the queue. Defaults to 1 s,
    /// so that an injected clock that jumps forward is noticed.
    pub poll_interval: Duration,
    /// MTA-STS (RFC 8461) for direct delivery. Defaults to none (off); the relay's
    /// configuration turns it on (`[mta_sts]`, see `crate::mta_sts`).
    pub mta_sts: Option<crate::mta_sts::MtaStsSettings>,
    /// Where TLS results are recorded for reports (RFC 8460, `crate::tlsrpt`). Defaults
    /// to none (not recorded).
    pub tlsrpt_dir: Option<PathBuf>,
    /// The relay's own SMTP listen addresses: a next-hop address equal to one of them is
    /// never connected to (mail loop). Defaults to none.
    pub listen: Vec<SocketAddr>,
    /// Addresses tried per hop of an attempt (MX hosts' addresses in order); the rest
    /// waits for the next attempt. Defaults to 5 (Postfix's `smtp_mx_address_limit`).
    pub mx_address_limit: usize,
    /// SMTP sessions (connections that got as far as EHLO) per hop of an attempt.
    /// Defaults to 2 (Postfix's `smtp_mx_session_limit`).
    pub mx_session_limit: usize,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            hostname: "altroute.localdomain".to_string(),
            helo: "altroute.localdomain".to_string(),
            resolver: None,
            smtp_port: 25,
            ca_file: None,
            workers: 8,
            per_destination: 4,
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            poll_interval: Duration::from_secs(1),
            mta_sts: None,
            tlsrpt_dir: None,
            listen: Vec::new(),
            mx_address_limit: 5,
            mx_session_limit: 2,
        }
    }
}

impl DeliverySettings {
    /// The settings of the relay's configuration (`[delivery]`, `[server].hostname`).
    pub fn from_config(config: &crate::config::Config) -> DeliverySettings {
        let d = &config.delivery;
        DeliverySettings {
            hostname: config.server.hostname.clone(),
            helo: d.helo.clone(),
            resolver: d.resolver,
            smtp_port: d.smtp_port,
            ca_file: d.ca_file.clone(),
            workers: d.workers,
            per_destination: d.per_destination,
            mx_address_limit: d.mx_address_limit,
            mx_session_limit: d.mx_session_limit,
            connect_timeout: d.connect_timeout,
            command_timeout: config.server.command_timeout,
            mta_sts: config.mta_sts.settings(&config.spool.dir),
            tlsrpt_dir: config
                .tlsrpt
                .settings(&config.spool.dir, &config.server.hostname)
                .map(|t| t.dir),
            // An unspecified address (0.0.0.0) matches no next hop; the hop count catches
            // a loop through it (`server.max_hops`).
            listen: config
                .server
                .listen
                .iter()
                .copied()
                .filter(|a| !a.ip().is_unspecified())
                .collect(),
            ..DeliverySettings::default()
        }
    }
}

/// One recipient decision as the journal keeps it (the log line's fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionRecord {
    /// The recipient.
    pub recipient: String,
    /// The decided route (`direct`, `host`, `alternate`, `defer`, `bounce`).
    pub route: String,
    /// The hop connected to when deciding (`-` for a plan).
    pub hop: String,
    /// The host connected to (`-` if none).
    pub host: String,
    /// TLS version on that connection.
    pub tls: String,
    /// Certificate status on that connection.
    pub cert: String,
    /// TLS-RPT style result type.
    pub result: String,
    /// The rule that decided.
    pub rule: String,
    /// The policy version that decided.
    pub policy_version: String,
    /// What happened: delivered, deferred, bounced, rerouted, or next-host (this host
    /// refused it for its TLS; the next one was asked).
    pub outcome: String,
}

/// The most recent decisions, in order (bounded: oldest dropped first).
#[derive(Debug, Default)]
pub struct Journal {
    records: Mutex<std::collections::VecDeque<DecisionRecord>>,
}

impl Journal {
    /// Records kept. Defaults to 1000.
    pub const CAPACITY: usize = 1000;

    pub(crate) fn push(&self, record: DecisionRecord) {
        let mut r = self
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if r.len() >= Self::CAPACITY {
            r.pop_front();
        }
        r.push_back(record);
    }

    /// A copy of the records, oldest first.
    pub fn records(&self) -> Vec<DecisionRecord> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}

/// Everything a worker uses.
pub(crate) struct Ctx {
    pub settings: DeliverySettings,
    pub spool: Spool,
    pub engine: Arc<PolicyEngine>,
    pub metrics: DeliveryMetrics,
    pub resolver: Resolver,
    pub roots: Arc<RootCertStore>,
    pub journal: Arc<Journal>,
    /// MTA-STS policies (when enabled).
    pub mta_sts: Option<Arc<crate::mta_sts::MtaSts>>,
    /// TLS results for reports (when enabled).
    pub tlsrpt: Option<Arc<crate::tlsrpt::Recorder>>,
    destinations: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Ctx {
    /// The concurrency limit of one destination host.
    pub fn destination(&self, host: &str) -> Arc<Semaphore> {
        let mut map = self
            .destinations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry(host.to_ascii_lowercase())
            .or_insert_with(|| Arc::new(Semaphore::new(self.settings.per_destination.max(1))))
            .clone()
    }
}

/// webpki-roots plus the PEM certificates of `ca_file`.
pub fn trust_roots(ca_file: Option<&std::path::Path>) -> Result<RootCertStore, DeliveryError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        let err = |why: String| DeliveryError::CaFile {
            path: path.to_path_buf(),
            why,
        };
        let mut n = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| err(e.to_string()))? {
            let cert = cert.map_err(|e| err(e.to_string()))?;
            roots.add(cert).map_err(|e| err(e.to_string()))?;
            n += 1;
        }
        if n == 0 {
            return Err(err("no certificate in the file".to_string()));
        }
    }
    Ok(roots)
}

/// A running delivery engine.
pub struct Delivery {
    kick: Arc<Notify>,
    journal: Arc<Journal>,
    task: JoinHandle<()>,
    metrics: DeliveryMetrics,
}

impl Delivery {
    /// Look at the queue now (after a retry, a clock change in tests).
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// The most recent recipient decisions.
    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    /// The delivery counters.
    pub fn metrics(&self) -> &DeliveryMetrics {
        &self.metrics
    }

    /// Waits until the scheduler has stopped (after shutdown) and in-flight work drained.
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

/// Starts the scheduler and its workers on the current tokio runtime. They stop taking
/// new work when `shutdown` resolves and finish the attempts in flight.
pub fn start(
    settings: DeliverySettings,
    spool: Spool,
    engine: Arc<PolicyEngine>,
    metrics: DeliveryMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Delivery, DeliveryError> {
    let resolver = Resolver::new(settings.resolver)?;
    let roots = Arc::new(trust_roots(settings.ca_file.as_deref())?);
    let journal = Arc::new(Journal::default());
    let mta_sts = match &settings.mta_sts {
        Some(s) => Some(Arc::new(
            crate::mta_sts::MtaSts::new(s.clone(), resolver.clone(), roots.clone())
                .map_err(DeliveryError::Resolver)?,
        )),
        None => None,
    };
    let tlsrpt = settings
        .tlsrpt_dir
        .clone()
        .map(|d| Arc::new(crate::tlsrpt::Recorder::new(d)));
    let ctx = Arc::new(Ctx {
        mta_sts,
        tlsrpt,
        settings,
        spool,
        engine,
        metrics: metrics.clone(),
        resolver,
        roots,
        journal: journal.clone(),
        destinations: Mutex::new(HashMap::new()),
    });
    let kick = Arc::new(Notify::new());
    let task = tokio::spawn(schedule(ctx, kick.clone(), shutdown));
    Ok(Delivery {
        kick,
        journal,
        task,
        metrics,
    })
}

/// [`start`] from the relay's configuration, with the delivery counters registered in
/// the relay's metrics registry.
pub fn start_from_config(
    config: &crate::config::Config,
    spool: Spool,
    engine: Arc<PolicyEngine>,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Delivery, DeliveryError> {
    let counters = DeliveryMetrics::new();
    metrics.with_registry(|r| counters.register(r));
    start(
        DeliverySettings::from_config(config),
        spool,
        engine,
        counters,
        shutdown,
    )
}

async fn schedule(
    ctx: Arc<Ctx>,
    kick: Arc<Notify>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let workers = Arc::new(Semaphore::new(ctx.settings.workers.max(1)));
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let now = ctx.spool.clock().now();
        let free = workers.available_permits();
        if free > 0 {
            for entry in ctx.spool.claim_due(now, free) {
                let Ok(permit) = workers.clone().try_acquire_owned() else {
                    // Cannot happen (we claimed at most `free`); give the message back.
                    ctx.spool.release(&entry.id);
                    continue;
                };
                let ctx = ctx.clone();
                tasks.spawn(async move {
                    let _permit = permit;
                    process(&ctx, entry).await;
                });
            }
        }
        let wait = match ctx.spool.next_wakeup() {
            Some(t) if t > now => Duration::from_secs(t - now).min(ctx.settings.poll_interval),
            _ => ctx.settings.poll_interval,
        };
        tokio::select! {
            _ = &mut shutdown => break,
            _ = ctx.spool.changed() => {}
            _ = kick.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            Some(_) = tasks.join_next() => {}
        }
    }
    tracing::info!(
        in_flight = tasks.len(),
        "delivery stopping; draining attempts in flight"
    );
    while tasks.join_next().await.is_some() {}
}

/// Delivers the due recipients of one claimed message and records the results.
async fn process(ctx: &Ctx, entry: QueueEntry) {
    let id = entry.id.clone();
    // A message that cannot be read (a failed checksum, an I/O error) is deferred like a
    // failed attempt, so that it waits for the retry schedule (released at once, it was
    // claimed again at once, for ever) and, if it stays unreadable, expires with a DSN.
    let (message, unreadable) = match ctx.spool.read_message(&id) {
        Ok(m) => (m, None),
        Err(e) => {
            tracing::error!(queue_id = %id, error = %e, "cannot read queued message");
            let reason = format!("451 4.3.0 the queued message cannot be read: {e}");
            (Vec::new(), Some(reason))
        }
    };
    let now = ctx.spool.clock().now();
    let mut by_domain: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for i in entry.due_recipients(now) {
        let Some(rcpt) = entry.envelope.rcpt_to.get(i) else {
            continue;
        };
        let domain = rcpt
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default();
        by_domain.entry(domain).or_default().push(i);
    }
    // Bounces and expiries are final: they are recorded only once the DSN that reports
    // them is on disk, so that a failed store (a full disk) or a crash in between never
    // leaves a final recipient whose sender was not told. The worst case is a second DSN
    // (the recipient bounces again at its next attempt), never none.
    let mut finals: Vec<Final> = Vec::new();
    for (domain, indices) in by_domain {
        // Every log line of the attempt carries the queue id and the domain (span fields).
        let span = tracing::info_span!("delivery", queue_id = %id, domain = %domain);
        let outcomes = match &unreadable {
            Some(reason) => indices
                .iter()
                .map(|&i| {
                    let reason = reason.clone();
                    (i, Outcome::Deferred { reason })
                })
                .collect(),
            None => {
                tracing::Instrument::instrument(
                    attempt::deliver_domain(ctx, &entry, &message, &domain, &indices),
                    span,
                )
                .await
            }
        };
        for (i, outcome) in outcomes {
            let rcpt = entry.envelope.rcpt_to.get(i).map_or("", String::as_str);
            let attempts = entry.recipients.get(i).map_or(0, |r| r.attempts());
            let recorded = match outcome {
                Outcome::Delivered { via, route } => {
                    ctx.metrics.delivered(&route);
                    ctx.spool.delivered(&id, i, &via).await.map(|_| ())
                }
                Outcome::Deferred { reason } => {
                    ctx.metrics.deferrals.inc();
                    let schedule = ctx.spool.schedule();
                    let now = ctx.spool.clock().now();
                    if schedule
                        .next_attempt(attempts + 1, entry.envelope.received_at, now)
                        .is_none()
                    {
                        // Its queue lifetime is used up: it expires with the DSN.
                        finals.push(Final::new(i, rcpt, reason, true, attempts));
                        Ok(())
                    } else {
                        match ctx.spool.defer(&id, i, &reason).await {
                            // The lifetime ran out between the check and the write.
                            Ok(RecipientState::Expired { .. }) => {
                                ctx.metrics.expirations.inc();
                                let mut f = Final::new(i, rcpt, reason, true, attempts);
                                f.recorded = true;
                                finals.push(f);
                                Ok(())
                            }
                            Ok(_) => Ok(()),
                            Err(e) => Err(e),
                        }
                    }
                }
                Outcome::Bounced { reason } => {
                    ctx.metrics.bounces.inc();
                    finals.push(Final::new(i, rcpt, reason, false, attempts));
                    Ok(())
                }
            };
            if let Err(e) = recorded {
                tracing::error!(queue_id = %id, recipient = %rcpt, error = %e, "cannot record delivery result");
            }
        }
    }
    record_finals(ctx, &entry, &message, finals).await;
    ctx.spool.release(&id);
    if ctx.spool.entry(&id).is_some_and(|e| e.is_finished())
        && let Err(e) = ctx.spool.remove(&id).await
    {
        tracing::warn!(queue_id = %id, error = %e, "cannot remove finished message");
    }
}

/// A recipient that bounced or expired in this run, waiting for its DSN.
struct Final {
    index: usize,
    failure: dsn::Failure,
    /// Attempts before this run.
    attempts: u32,
    /// Already recorded as final (it expired in [`Spool::defer`] itself).
    recorded: bool,
}

impl Final {
    fn new(index: usize, recipient: &str, reason: String, expired: bool, attempts: u32) -> Final {
        Final {
            index,
            failure: dsn::Failure {
                recipient: recipient.to_owned(),
                reason,
                expired,
            },
            attempts,
            recorded: false,
        }
    }
}

/// Queues the DSN for `finals`, then records them as bounced or expired. If the DSN
/// cannot be queued, they are deferred instead (the reason says why) and fail again,
/// with a new DSN, at their next attempt.
async fn record_finals(ctx: &Ctx, entry: &QueueEntry, message: &[u8], finals: Vec<Final>) {
    if finals.is_empty() {
        return;
    }
    let id = &entry.id;
    let failures: Vec<dsn::Failure> = finals.iter().map(|f| f.failure.clone()).collect();
    let built = dsn::build(
        &ctx.settings.hostname,
        &entry.envelope,
        message,
        &failures,
        ctx.spool.clock().now(),
        id.as_str(),
    );
    let stored = match built {
        // The null sender gets no DSN (RFC 5321 §4.5.5): nothing to wait for.
        None => Ok(None),
        Some((env, body)) => ctx.spool.store(env, body).await.map(Some),
    };
    match stored {
        Ok(dsn_id) => {
            if let Some(dsn_id) = dsn_id {
                ctx.metrics.dsns.inc();
                tracing::info!(queue_id = %id, dsn = %dsn_id, recipients = failures.len(), "DSN queued to the sender");
            }
            for f in finals.into_iter().filter(|f| !f.recorded) {
                let recorded = if f.failure.expired {
                    ctx.metrics.expirations.inc();
                    ctx.spool
                        .defer(id, f.index, &f.failure.reason)
                        .await
                        .map(|_| ())
                } else {
                    ctx.spool.bounce(id, f.index, &f.failure.reason).await
                };
                if let Err(e) = recorded {
                    tracing::error!(queue_id = %id, recipient = %f.failure.recipient, error = %e, "cannot record delivery result");
                }
            }
        }
        Err(e) => {
            tracing::error!(queue_id = %id, error = %e, "cannot queue DSN: the failed recipients stay deferred");
            let now = ctx.spool.clock().now();
            let retry = ctx.spool.schedule().delay(1).as_secs();
            for f in finals {
                let state = RecipientState::Deferred {
                    next_attempt: now.saturating_add(retry),
                    attempts: f.attempts.saturating_add(1),
                    reason: format!(
                        "{} (not final yet: the DSN could not be queued: {e})",
                        f.failure.reason
                    ),
                };
                if let Err(e) = ctx.spool.set_recipient(id, f.index, state).await {
                    tracing::error!(queue_id = %id, recipient = %f.failure.recipient, error = %e, "cannot record delivery result");
                }
            }
        }
    }
}

/// What [`operator_bounce`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OperatorBounce {
    /// The recipients bounced (those that were not final yet).
    pub bounced: Vec<String>,
    /// The DSN queued to the sender, if one was (none for the null sender or when
    /// nothing was left to bounce).
    pub dsn: Option<String>,
    /// The message was removed from the queue (all its recipients are final now).
    pub removed: bool,
}

/// `altroute queue bounce ID`: bounces every open recipient of one message, queues the
/// DSN (RFC 3464, the same path as delivery's bounces) and removes the finished message.
/// The message is claimed for the whole operation, so a delivery attempt cannot race it:
/// a message being delivered right now is [`altroute_queue::Error::InFlight`].
pub async fn operator_bounce(
    spool: &Spool,
    reporting_mta: &str,
    id: &altroute_queue::MessageId,
    reason: &str,
) -> Result<OperatorBounce, altroute_queue::Error> {
    let entry = spool.claim(id)?;
    let result = async {
        let message = spool.read_message(id)?;
        let indices = spool.bounce_open(id, reason).await?;
        let failures: Vec<dsn::Failure> = indices
            .iter()
            .filter_map(|&i| entry.envelope.rcpt_to.get(i))
            .map(|rcpt| dsn::Failure {
                recipient: rcpt.clone(),
                reason: reason.to_string(),
                expired: false,
            })
            .collect();
        let mut dsn_id = None;
        if let Some((env, body)) = dsn::build(
            reporting_mta,
            &entry.envelope,
            &message,
            &failures,
            spool.clock().now(),
            id.as_str(),
        ) {
            dsn_id = Some(spool.store(env, body).await?.to_string());
        }
        tracing::info!(
            queue_id = %id,
            recipients = failures.len(),
            dsn = dsn_id.as_deref().unwrap_or("-"),
            reason,
            "bounced by the operator"
        );
        Ok::<_, altroute_queue::Error>(OperatorBounce {
            bounced: failures.into_iter().map(|f| f.recipient).collect(),
            dsn: dsn_id,
            removed: false,
        })
    }
    .await;
    spool.release(id);
    let mut report = result?;
    if spool.entry(id).is_some_and(|e| e.is_finished()) {
        spool.remove(id).await?;
        report.removed = true;
    }
    Ok(report)
}
