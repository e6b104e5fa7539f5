//! Outbound delivery: workers take due messages from the spool and deliver them, asking
//! the policy module where each recipient goes and whether the connection found is good
//! enough.
//!
//! # Core concepts
//!
//! - A scheduler loop ([`start`]) wakes on [`Spool::changed`], at [`Spool::next_wakeup`]
//!   (looked at at least every [`DeliverySettings::poll_interval`]) and when a worker ends;
//!   it claims due messages ([`Spool::claim_due`]) up to the number of free workers. At
//!   start and every minute it also removes finished messages left on disk
//!   ([`Spool::finished`]: a crash before their removal, a removal that failed).
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
//! - Never delete what may be someone's mail: a message found corrupt
//!   ([`altroute_queue::Error::Corrupt`]) fails its open recipients with a DSN and is
//!   moved to the spool's `corrupt/` ([`Spool::set_aside`]); a finished message is
//!   removed only once its content has been read back.
//!
//! # Layout
//!
//! `mod.rs` (settings, scheduler, per-message bookkeeping), `attempt.rs` (one domain's
//! delivery attempt), `resolve.rs` (MX/A/AAAA), `dsn.rs` (RFC 3464), `metrics.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
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

use altroute_policy::pattern::canonical_domain;
use altroute_queue::{MessageId, QueueEntry, RecipientState, Spool};

use crate::policy_engine::PolicyEngine;

mod attempt;
pub mod dsn;
pub mod floor;
pub mod metrics;
pub mod resolve;
mod standards;

pub use attempt::Outcome;
pub(crate) use attempt::{delivery_address, question_address};
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
    /// Wait for the reply to the end of the message. Defaults to 10 min (RFC 5321
    /// §4.5.3.2.6).
    pub data_done_timeout: Duration,
    /// Timeout of one SMTP command. Defaults to 5 min (RFC 5321 §4.5.3.2 allows more for
    /// some commands; the client applies it to every reply but the one to the end of the
    /// data ([`Settings::data_done_timeout`]), and to each 64 KiB write of the message
    /// data, RFC 5321 §4.5.3.2.5). Also the longest wait for one of a host's
    /// `per_destination` connection slots.
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
            data_done_timeout: Duration::from_secs(600),
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
            data_done_timeout: d.data_done_timeout,
            command_timeout: config.server.command_timeout,
            mta_sts: config.mta_sts.settings(&config.spool.dir),
            tlsrpt_dir: config
                .tlsrpt
                .settings(&config.spool.dir, &config.server.hostname)
                .map(|t| t.dir),
            // As configured: a wildcard address (0.0.0.0, ::) stands for every local
            // address on its port (`attempt::is_listening_at`). Filtering it out once let
            // an audit's extension loop mail through the relay 50 times.
            listen: config.server.listen.clone(),
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
    /// The module whose plan this recipient follows: `standard` or an extension's name
    /// (an extension may choose the hop and leave the verdict there to the standard
    /// module, whose rule is then the one above).
    pub planned_by: String,
    /// The module that chose the plan's route (next hop): `standard` or an extension.
    pub routed_by: String,
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
    /// Recipients accepted by the next hop whose `Delivered` could not be written to the
    /// spool (message, recipient index, the hop): on disk they are still open, so this
    /// is what keeps this process from sending them again. Recorded at the message's next
    /// attempt; lost in a restart, which at worst sends them once more.
    unrecorded: Mutex<HashMap<MessageId, BTreeMap<usize, String>>>,
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

    /// Like [`stopped`](Self::stopped), but not past `deadline`: the attempts still
    /// running then are aborted (an attempt waits up to the command timeout per reply,
    /// minutes). An aborted attempt records nothing for the recipients it had not
    /// recorded yet, so they are attempted again at the next start; one the next hop
    /// accepted just before may then get a second copy (at least once, never lost).
    /// Returns whether everything drained before the deadline.
    pub async fn stopped_by(mut self, deadline: tokio::time::Instant) -> bool {
        if tokio::time::timeout_at(deadline, &mut self.task)
            .await
            .is_ok()
        {
            return true;
        }
        // Dropping the scheduler drops its `JoinSet`, which aborts every attempt.
        self.task.abort();
        let _ = self.task.await;
        false
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
        unrecorded: Mutex::new(HashMap::new()),
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

/// How often the scheduler removes finished messages still on disk. Defaults to 1 min.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

async fn schedule(
    ctx: Arc<Ctx>,
    kick: Arc<Notify>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let workers = Arc::new(Semaphore::new(ctx.settings.workers.max(1)));
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    // At start: what a crash or a failed removal of the last run left behind.
    let mut next_sweep = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_sweep {
            sweep_finished(&ctx).await;
            next_sweep = tokio::time::Instant::now() + SWEEP_INTERVAL;
        }
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
    // Results that could not be written to the spool (a full disk, an I/O error). Their
    // recipients still look due on disk: the message is held back below.
    let (sent, mut unrecorded) = record_sent(ctx, &entry).await;
    // A message that cannot be read for a reason that may pass (an I/O error: EIO,
    // EMFILE) is deferred like a failed attempt, so that it waits for the retry schedule
    // (released at once, it was claimed again at once, for ever) and, if it stays
    // unreadable, expires with a DSN. A corrupt one will not heal: it is kept aside now.
    // Off the async threads: up to the size limit to read and checksum.
    let read = {
        let (spool, id) = (ctx.spool.clone(), id.clone());
        tokio::task::spawn_blocking(move || spool.read_message(&id))
            .await
            .unwrap_or_else(|e| {
                Err(altroute_queue::Error::io(
                    "reading the message",
                    std::io::Error::other(e.to_string()),
                ))
            })
    };
    let (message, unreadable) = match read {
        Ok(m) => (m, None),
        Err(altroute_queue::Error::Corrupt { reason, .. }) => {
            keep_aside(ctx, &entry, &sent, unrecorded, &reason).await;
            ctx.spool.release(&id);
            return;
        }
        Err(e) => {
            tracing::error!(queue_id = %id, error = %e, "cannot read queued message");
            let reason = format!("451 4.3.0 the queued message cannot be read: {e}");
            (Vec::new(), Some(reason))
        }
    };
    let now = ctx.spool.clock().now();
    let mut by_domain: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for i in entry.due_recipients(now) {
        if sent.contains(&i) {
            continue;
        }
        let Some(rcpt) = entry.envelope.rcpt_to.get(i) else {
            continue;
        };
        // The domain as it is delivered to: its A-label (UTS 46), lower-cased, without a
        // root dot. Every step of the attempt (MTA-STS, MX lookup, host names, TLS
        // reports) takes this one spelling: `bob@bücher.example` or a full-width dot
        // (`sts。example`) once skipped the MTA-STS lookup, which took only ASCII, while
        // the resolver converted the name and found the real MX.
        let domain = rcpt
            .rsplit_once('@')
            .map(|(_, d)| canonical_domain(d).to_ascii_lowercase())
            .unwrap_or_default();
        by_domain.entry(domain).or_default().push(i);
    }
    // Bounces and expiries are final: they are recorded only once the DSN that reports
    // them is on disk, so that a failed store (a full disk) or a crash in between never
    // leaves a final recipient whose sender was not told. The worst case is a second DSN
    // (the recipient bounces again at its next attempt), never none.
    let mut finals: Vec<Final> = Vec::new();
    let mut relayed: Vec<dsn::Relayed> = Vec::new();
    // Recipients whose plan in this run required no TLS: a failure notice may return the
    // message whole (`RET=FULL`) only if every recipient is one.
    let mut open = std::collections::BTreeSet::new();
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
            // Not a valid IDN (the server refuses such domains; this is mail spooled
            // before it did): it has no A-label to look up, now or later.
            None if !domain.is_ascii() => indices
                .iter()
                .map(|&i| {
                    let reason = format!(
                        "550 5.1.2 {}: not a valid internationalized domain name",
                        altroute_smtp::address::for_header(&domain)
                    );
                    (i, Outcome::Bounced { reason })
                })
                .collect(),
            None => {
                tracing::Instrument::instrument(
                    attempt::deliver_domain(ctx, &entry, &message, &domain, &indices, &mut open),
                    span,
                )
                .await
            }
        };
        for (i, outcome) in outcomes {
            let rcpt = entry.envelope.rcpt_to.get(i).map_or("", String::as_str);
            let attempts = entry.recipients.get(i).map_or(0, |r| r.attempts());
            if let Outcome::Delivered {
                via, relayed: true, ..
            } = &outcome
                && entry.envelope.dsn_of(i).notify.on_success()
            {
                relayed.push(dsn::Relayed {
                    index: i,
                    recipient: rcpt.to_owned(),
                    via: via.clone(),
                });
            }
            let recorded = match outcome {
                Outcome::Delivered {
                    recorded: true,
                    route,
                    ..
                } => {
                    ctx.metrics.delivered(&route);
                    Ok(())
                }
                Outcome::Delivered { via, route, .. } => {
                    ctx.metrics.delivered(&route);
                    let recorded = ctx.spool.delivered(&id, i, &via).await;
                    if recorded.is_err() {
                        lock(&ctx.unrecorded)
                            .entry(id.clone())
                            .or_default()
                            .insert(i, via);
                    }
                    recorded
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
                unrecorded += 1;
                tracing::error!(queue_id = %id, recipient = %rcpt, error = %e, "cannot record delivery result");
            }
        }
    }
    // The body (and the header fields but Message-ID and Date) go back only if no
    // recipient of the message needed TLS: it is the
    // whole message's (an audit's bounce of an opportunistic recipient returned the body
    // meant for a TLS-only one). A recipient not planned in this run counts as needing it.
    let all_open = (0..entry.envelope.rcpt_to.len()).all(|i| open.contains(&i));
    for f in &mut finals {
        f.failure.confidential = !all_open;
    }
    unrecorded += record_finals(ctx, &entry, &message, finals).await.0;
    report_relayed(ctx, &entry, &message, &relayed, !all_open).await;
    hold_back(ctx, &id, unrecorded);
    // Removed while still claimed, so that the sweep ([`sweep_finished`]) cannot race it.
    // A message this attempt could not read is read again first (see `remove_finished`).
    if ctx.spool.entry(&id).is_some_and(|e| e.is_finished()) {
        remove_finished(ctx, &id, unreadable.is_none()).await;
    }
    ctx.spool.release(&id);
}

/// When `unrecorded` results of message `id` could not be written: released as it is,
/// the message would be claimed again at once (its recipients are still due on disk)
/// and attempted again in a tight loop, a delivered one sent again each time. It waits
/// one retry interval instead; delivered recipients are kept in `Ctx::unrecorded` and
/// not sent again meanwhile.
fn hold_back(ctx: &Ctx, id: &MessageId, unrecorded: u64) {
    if unrecorded == 0 {
        return;
    }
    let wait = ctx.spool.schedule().delay(1);
    let until = ctx.spool.clock().now().saturating_add(wait.as_secs());
    ctx.spool.hold(id, until);
    ctx.metrics.unrecorded.inc_by(unrecorded);
    tracing::warn!(
        queue_id = %id,
        results = unrecorded,
        retry_in_secs = wait.as_secs(),
        "delivery results not recorded; the message is held back until the next retry"
    );
}

/// A claimed message whose content is corrupt (`why`: what [`Spool::read_message`]
/// found). Waiting will not repair it, and it must not be deleted either: deferred until
/// it expired, it was then removed, with a DSN that did not say why. Its open recipients
/// (except those `sent` already) fail now, with a DSN that says the message was kept
/// aside for the operator (without its content, which cannot be trusted), and the file
/// goes to `corrupt/`. As with every failure the DSN is stored first: if it cannot be,
/// the recipients are deferred and the next attempt tries again.
async fn keep_aside(
    ctx: &Ctx,
    entry: &QueueEntry,
    sent: &BTreeSet<usize>,
    mut unrecorded: u64,
    why: &str,
) {
    let id = &entry.id;
    tracing::error!(queue_id = %id, reason = why, "queued message is corrupt; keeping it aside for the operator");
    let reason = format!(
        "554 5.3.0 the queued message was found corrupt ({why}) and kept aside for the operator"
    );
    let finals: Vec<Final> = entry
        .recipients
        .iter()
        .enumerate()
        .filter(|(i, state)| !state.is_final() && !sent.contains(i))
        .filter_map(|(i, state)| {
            let rcpt = entry.envelope.rcpt_to.get(i)?;
            Some(Final::new(i, rcpt, reason.clone(), false, state.attempts()))
        })
        .collect();
    ctx.metrics.bounces.inc_by(finals.len() as u64);
    let (failed, notified) = record_finals(ctx, entry, &[], finals).await;
    unrecorded += failed;
    if notified {
        match ctx.spool.set_aside(id, why).await {
            Ok(_) => {
                lock(&ctx.unrecorded).remove(id);
                ctx.metrics.unrecorded.inc_by(unrecorded);
                return;
            }
            // Its recipients are final (or held back below): the sweep of finished
            // messages tries again (`remove_finished`).
            Err(e) => {
                tracing::error!(queue_id = %id, error = %e, "cannot move the corrupt message to corrupt/; it stays in the queue");
            }
        }
    }
    hold_back(ctx, id, unrecorded);
}

/// Records the recipients of `entry` that an earlier attempt of this process delivered
/// but could not record (`Ctx::unrecorded`). Returns their indices, which must not be
/// sent again, recorded now or not, and how many still could not be recorded.
async fn record_sent(ctx: &Ctx, entry: &QueueEntry) -> (BTreeSet<usize>, u64) {
    let Some(pending) = lock(&ctx.unrecorded).remove(&entry.id) else {
        return (BTreeSet::new(), 0);
    };
    let sent: BTreeSet<usize> = pending.keys().copied().collect();
    let mut left = BTreeMap::new();
    for (i, via) in pending {
        // Final meanwhile (an operator bounce): nothing left to record.
        if entry.recipients.get(i).is_none_or(RecipientState::is_final) {
            continue;
        }
        match ctx.spool.delivered(&entry.id, i, &via).await {
            Ok(()) => {
                tracing::info!(queue_id = %entry.id, recipient = i, via, "earlier delivery recorded");
            }
            Err(e) => {
                tracing::error!(queue_id = %entry.id, recipient = i, error = %e, "cannot record delivery result");
                left.insert(i, via);
            }
        }
    }
    let failed = left.len() as u64;
    if !left.is_empty() {
        lock(&ctx.unrecorded).insert(entry.id.clone(), left);
    }
    (sent, failed)
}

/// Removes the finished messages still in the queue: a crash between the last final
/// record and the removal, or a removal that failed, leaves them there, and nothing else
/// would ever claim them (no recipient is due). Safe to remove: a recipient is recorded
/// final only once its DSN is stored.
async fn sweep_finished(ctx: &Ctx) {
    let mut removed = 0;
    for id in ctx.spool.finished() {
        // Claimed, so that an operator action on the message cannot race the removal.
        if ctx.spool.claim(&id).is_err() {
            continue;
        }
        removed += u32::from(remove_finished(ctx, &id, false).await);
        ctx.spool.release(&id);
    }
    if removed > 0 {
        tracing::info!(
            messages = removed,
            "removed finished messages left in the queue"
        );
    }
    // Marks of messages removed meanwhile (an operator bounce) are of no use any more.
    lock(&ctx.unrecorded).retain(|id, _| ctx.spool.entry(id).is_some());
}

/// Removes a finished message (every recipient final, any DSN queued); false (logged)
/// when it stays in the queue. Never a file whose content could not be read: unless
/// `read` (this attempt has just read it), the message is read back first. A corrupt
/// one goes to `corrupt/` instead ([`Spool::set_aside`], true: it left the queue); one
/// that fails to read for another reason (EIO, EMFILE) stays until a later sweep reads
/// it.
async fn remove_finished(ctx: &Ctx, id: &MessageId, read: bool) -> bool {
    if !read {
        let spool = ctx.spool.clone();
        let owned = id.clone();
        let read_back = tokio::task::spawn_blocking(move || spool.read_message(&owned))
            .await
            .unwrap_or_else(|e| {
                Err(altroute_queue::Error::Internal(format!(
                    "reading the message back: {e}"
                )))
            });
        match read_back {
            Ok(_) => {}
            // Its file is gone already: nothing on disk to keep, only the index to clean.
            Err(altroute_queue::Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(altroute_queue::Error::Corrupt { reason, .. }) => {
                return match ctx.spool.set_aside(id, &reason).await {
                    Ok(_) => {
                        lock(&ctx.unrecorded).remove(id);
                        true
                    }
                    Err(e) => {
                        tracing::error!(queue_id = %id, error = %e, "cannot move a corrupt finished message to corrupt/");
                        false
                    }
                };
            }
            Err(e) => {
                tracing::warn!(queue_id = %id, error = %e, "finished message kept: its content cannot be read back");
                return false;
            }
        }
    }
    match ctx.spool.remove(id).await {
        Ok(()) => {
            lock(&ctx.unrecorded).remove(id);
            true
        }
        Err(e) => {
            tracing::warn!(queue_id = %id, error = %e, "cannot remove finished message");
            false
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
                index,
                recipient: recipient.to_owned(),
                reason,
                expired,
                confidential: true,
            },
            attempts,
            recorded: false,
        }
    }
}

/// Queues the success notice (`Action: relayed`) for recipients handed to next hops
/// without DSN whose sender asked for one (`NOTIFY=SUCCESS`). Best effort: the
/// deliveries are recorded whatever happens here, and a notice that cannot be queued is
/// logged.
async fn report_relayed(
    ctx: &Ctx,
    entry: &QueueEntry,
    message: &[u8],
    relayed: &[dsn::Relayed],
    confidential: bool,
) {
    let Some((env, body)) = dsn::build_relayed(
        &ctx.settings.hostname,
        &entry.envelope,
        message,
        relayed,
        confidential,
        ctx.spool.clock().now(),
        entry.id.as_str(),
    ) else {
        return;
    };
    match ctx.spool.store(env, body).await {
        Ok(dsn_id) => {
            ctx.metrics.dsns.inc();
            tracing::info!(queue_id = %entry.id, dsn = %dsn_id, recipients = relayed.len(), "success notice (relayed) queued to the sender");
        }
        Err(e) => {
            tracing::error!(queue_id = %entry.id, error = %e, "cannot queue the success notice (relayed)");
        }
    }
}

/// Queues the DSN for `finals`, then records them as bounced or expired. If the DSN
/// cannot be queued, they are deferred instead (the reason says why) and fail again,
/// with a new DSN, at their next attempt. Returns how many results could not be
/// recorded, and whether the sender was told (the DSN is queued, or none was due).
async fn record_finals(
    ctx: &Ctx,
    entry: &QueueEntry,
    message: &[u8],
    finals: Vec<Final>,
) -> (u64, bool) {
    let mut unrecorded = 0;
    if finals.is_empty() {
        return (unrecorded, true);
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
        // The null sender gets no DSN (RFC 5321 §4.5.5): nothing to wait for. Such a
        // message (a notice) is gone now: said at warn level, with why.
        None => {
            if entry.envelope.mail_from.is_empty() {
                for f in &failures {
                    tracing::warn!(queue_id = %id, recipient = %f.recipient, reason = %f.reason, "a message with the null sender (a delivery notice) failed for good and is discarded: no notice goes back for a notice");
                }
            }
            Ok(None)
        }
        Some((env, body)) => ctx.spool.store(env, body).await.map(Some),
    };
    let notified = stored.is_ok();
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
                    unrecorded += 1;
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
                    unrecorded += 1;
                    tracing::error!(queue_id = %id, recipient = %f.failure.recipient, error = %e, "cannot record delivery result");
                }
            }
        }
    }
    (unrecorded, notified)
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
///
/// As in delivery, the DSN is stored before the bounces are recorded: if it cannot be
/// (a full disk), nothing is bounced and the error is returned, so the operator can try
/// again; a crash in between can at worst send a second DSN, never none.
pub async fn operator_bounce(
    spool: &Spool,
    reporting_mta: &str,
    id: &altroute_queue::MessageId,
    reason: &str,
) -> Result<OperatorBounce, altroute_queue::Error> {
    let entry = spool.claim(id)?;
    let result = async {
        let message = spool.read_message(id)?;
        // Claimed, so these are the recipients `bounce_open` will bounce.
        let open: Vec<usize> = (0..entry.recipients.len())
            .filter(|&i| !entry.recipients[i].is_final())
            .collect();
        let failures: Vec<dsn::Failure> = open
            .iter()
            .filter_map(|&i| entry.envelope.rcpt_to.get(i).map(|r| (i, r)))
            .map(|(index, rcpt)| dsn::Failure {
                index,
                recipient: rcpt.clone(),
                reason: reason.to_string(),
                expired: false,
                // Not asked of the policy here: only the headers go back.
                confidential: true,
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
            let stored = spool.store(env, body).await?;
            // Held back until the bounce is recorded: an audit's bounce whose record did
            // not fit on a full disk failed, yet its notice went out, for mail that was
            // then delivered (or bounced again, with a second notice).
            if spool.claim(&stored).is_err() {
                tracing::warn!(queue_id = %id, dsn = %stored, "the operator bounce's notice was taken for delivery at once");
            }
            dsn_id = Some(stored);
        }
        let bounced = match spool.bounce_open(id, reason).await {
            Ok(bounced) => bounced,
            Err(e) => {
                if let Some(dsn) = &dsn_id {
                    match spool.remove(dsn).await {
                        Ok(()) => tracing::error!(queue_id = %id, %dsn, error = %e, "the operator bounce could not be recorded; its notice is withdrawn"),
                        Err(r) => tracing::error!(queue_id = %id, %dsn, error = %e, remove_error = %r, "the operator bounce could not be recorded, nor its notice withdrawn"),
                    }
                    spool.release(dsn);
                }
                return Err(e);
            }
        };
        if let Some(dsn) = &dsn_id {
            spool.release(dsn);
        }
        let dsn_id = dsn_id.map(|d| d.to_string());
        if bounced != open {
            // Cannot happen while the message is claimed; worth a trace if it does.
            tracing::warn!(queue_id = %id, ?open, ?bounced, "the recipients bounced are not those the DSN reports");
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
    let mut report = match result {
        Ok(report) => report,
        Err(e) => {
            spool.release(id);
            return Err(e);
        }
    };
    // Removed while still claimed, so that delivery's sweep of finished messages cannot
    // race it.
    let removed = if spool.entry(id).is_some_and(|e| e.is_finished()) {
        spool.remove(id).await.map(|()| true)
    } else {
        Ok(false)
    };
    spool.release(id);
    report.removed = removed?;
    Ok(report)
}
