//! `altroute serve`: the relay daemon.
//!
//! [`run`] opens the spool (recovering it), checks the policy, binds every SMTP listener
//! and the admin endpoint, and serves until its `shutdown` future completes. A semaphore
//! caps concurrent sessions (`server.max_sessions`): at the cap the accept loops wait and
//! new clients queue in the kernel's backlog. Shutdown stops accepting at once, lets
//! sessions and delivery attempts in progress finish for up to `server.shutdown_grace`
//! (one deadline for both; attempts still running then are aborted), then returns; every
//! message that got a `250` was already durable (the spool syncs before `store` returns),
//! and a session cut off at the deadline never got one for the message it was sending.
//! [`command`] wraps it for the CLI: SIGTERM and SIGINT start the shutdown.
//!
//! A connection from a trusted proxy (`server.proxy_protocol_from`) first gives its PROXY
//! header (`crate::proxy_protocol`), before the edge filter or the SMTP session sees a
//! byte; its source address is the session's peer from then on.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use ipnet::IpNet;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use altroute_queue::{RetrySchedule, Spool, SpoolConfig, SystemClock};
use altroute_smtp::{ServerConfig, SessionInfo, serve_session};

use crate::admin::{self, AdminState, PolicyVersion};
use crate::config::{Config, ConfigError};
use crate::inbound::Inbound;
use crate::metrics::Metrics;
use crate::proxy_protocol::{self, Origin};

/// Arguments of `altroute serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The relay configuration (TOML; see docs/relay.md).
    #[arg(short, long, default_value = "/etc/altroute/altroute.toml")]
    pub config: PathBuf,
}

/// `altroute serve`: load the configuration (listing every problem and returning exit
/// code 1 if there are any), then run until SIGTERM or SIGINT. Returns the exit code.
pub fn command(args: ServeArgs) -> Result<i32> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("altroute")
        .build()
        .context("starting the tokio runtime")?;
    // First thing: starting takes seconds (spool recovery, compiling the module), and
    // until a process listens for them SIGHUP and SIGTERM end it. From here on they wait
    // in these streams: a SIGHUP is applied once the reloader is ready, a SIGTERM stops
    // the relay as soon as it serves.
    let (hup, shutdown) = {
        let _runtime = runtime.enter();
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("listening for SIGHUP")?;
        (hup, shutdown_signal())
    };
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e @ ConfigError::Invalid { .. }) => {
            eprintln!("altroute: {e}");
            return Ok(1);
        }
        Err(e) => return Err(e.into()),
    };
    // A policy that does not compile is a configuration problem like the others: status
    // 1, and nothing created yet (the spool was opened, or made, first).
    let policy = match crate::policy_cmd::load_policy(&config.policy.file) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("altroute: {e:#}");
            return Ok(1);
        }
    };
    runtime.block_on(run_loaded(config, policy, shutdown, hup))?;
    Ok(0)
}

/// Listens for SIGTERM and SIGINT from the call on (inside a tokio runtime); the future
/// completes on the first one.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    async fn first(signal: std::io::Result<tokio::signal::unix::Signal>, name: &str) {
        match signal {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for {name}");
                std::future::pending::<()>().await;
            }
        }
    }
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        tokio::select! {
            _ = first(term, "SIGTERM") => tracing::info!("SIGTERM received, shutting down"),
            _ = first(int, "SIGINT") => tracing::info!("SIGINT received, shutting down"),
        }
    }
}

/// Completes once `stop` turns true (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    // An error means the sender was dropped: nobody can stop us any more, so stop now.
    let _ = stop.wait_for(|s| *s).await;
}

/// The SMTP server settings from `[server]`.
pub fn smtp_config(config: &Config) -> ServerConfig {
    let mut smtp = ServerConfig::new(config.server.hostname.clone());
    smtp.max_message_size = config.server.max_message_size;
    smtp.max_recipients = config.server.max_recipients;
    smtp.command_timeout = config.server.command_timeout;
    smtp.data_timeout = config.server.data_timeout;
    smtp.session_timeout = config.server.session_timeout;
    smtp.tls = config.server.tls.clone();
    smtp.auth = smtp.tls.is_some() && !config.relay.users.is_empty();
    smtp
}

/// Run the relay until `shutdown` completes, then drain (see the module docs). SIGHUP
/// reloads the policy files.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("listening for SIGHUP")?;
    run_with_hup(config, shutdown, hup).await
}

/// [`run`], reloading on each SIGHUP that `hup` receives: created early (see [`command`]),
/// it keeps one that came while the relay was starting, applied once it is ready.
pub async fn run_with_hup(
    config: Config,
    shutdown: impl Future<Output = ()>,
    hup: tokio::signal::unix::Signal,
) -> Result<()> {
    // A policy that does not compile is an error at start, not at the first delivery.
    let policy = crate::policy_cmd::load_policy(&config.policy.file)?;
    run_loaded(config, policy, shutdown, hup).await
}

/// [`run_with_hup`] with the policy file already compiled.
async fn run_loaded(
    config: Config,
    policy: altroute_policy::Policy,
    shutdown: impl Future<Output = ()>,
    hup: tokio::signal::unix::Signal,
) -> Result<()> {
    let retry = RetrySchedule::new(
        config.delivery.retry_initial,
        2,
        config.delivery.retry_max,
        config.delivery.queue_lifetime,
    );
    let spool_dir = config.spool.dir.clone();
    let spool = tokio::task::spawn_blocking(move || {
        Spool::open(
            &spool_dir,
            SpoolConfig::with_retry(retry),
            Arc::new(SystemClock),
        )
    })
    .await
    .context("opening the spool")?
    .with_context(|| format!("opening the spool {}", config.spool.dir.display()))?;

    let version = policy.version.clone();
    tracing::info!(version = %version, file = %config.policy.file.display(), "policy loaded");
    // (The admin endpoint reports the engine's live version: see DELIVERY below.)

    let metrics = Arc::new(Metrics::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }

    let mut listeners = Vec::new();
    for addr in &config.server.listen {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        listeners.push(l);
    }
    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin endpoint: listening on {}", config.admin.listen))?;

    // DELIVERY: start delivery workers here
    // The policy engine (wasm module + compiled policy; compiling the module is CPU work,
    // so off the async threads) and the delivery workers, which stop with the listeners.
    let section = config.policy.clone();
    let extensions = config.extensions.clone();
    let engine = Arc::new(
        tokio::task::spawn_blocking(move || {
            // EXTENSIONS: `[[extension]]` chained after the standard module.
            crate::policy_engine::PolicyEngine::from_config(&section)?.with_extensions(&extensions)
        })
        .await
        .context("loading the policy module")?
        .context("loading the policy module")?,
    );
    metrics.with_registry(|r| engine.extension_metrics().register(r));
    let policy_version: PolicyVersion = {
        let engine = engine.clone();
        Arc::new(move || engine.version())
    };
    // RELOAD: hot reload of the policy (admin API, file watch, SIGHUP), audited.
    let reloader = Arc::new(
        crate::reload::Reloader::new(
            engine.clone(),
            policy,
            engine.module(),
            crate::reload::ReloadSettings {
                history: config.policy.history,
                ..crate::reload::ReloadSettings::new(&config.policy.audit_log)
            },
        )
        .context("policy reload (audit log)")?,
    );
    // EDGE: the module's SMTP stream face on the inbound listeners (`[edge]`), on the
    // reloader's active policy and following it, before any source (file watch, SIGHUP,
    // admin API) can change the policy.
    let edge = crate::edge::Edge::start(&config, &metrics, reloader.active_json()).await?;
    if let Some(edge) = &edge {
        edge.follow(&reloader);
    }
    // A candidate policy whose recipient delimiter a shipped extension does not share
    // is refused (`extensions::delimiter_conflicts`), as at start.
    if !config.extensions.is_empty() {
        let extensions = config.extensions.clone();
        reloader.follow(Box::new(move |json: &str, _version: &str| {
            let delimiter = serde_json::from_str::<serde_json::Value>(json)
                .ok()
                .and_then(|v| v.get("recipient_delimiter")?.as_str().map(str::to_string))
                .unwrap_or_default();
            let conflicts = crate::extensions::delimiter_conflicts(&extensions, &delimiter);
            if conflicts.is_empty() {
                Ok(Box::new(|| {}) as crate::reload::Commit)
            } else {
                Err(conflicts.join("; "))
            }
        }));
    }
    let sources = crate::reload::Sources {
        policy: config.policy.file.clone(),
        module: config.policy.module.clone(),
    };
    // Dropped at the end of `run`: stops watching.
    let _file_watch = if config.policy.watch {
        Some(
            crate::reload::watch(
                reloader.clone(),
                sources.clone(),
                crate::reload::DEFAULT_DEBOUNCE,
            )
            .context("watching the policy files")?,
        )
    } else {
        None
    };
    let hup = tokio::spawn(crate::reload::sighup(
        reloader.clone(),
        sources,
        hup,
        stopped(stop_rx.clone()),
    ));
    let delivery = if config.delivery.enabled {
        Some(
            crate::delivery::start_from_config(
                &config,
                spool.clone(),
                engine,
                metrics.clone(),
                stopped(stop_rx.clone()),
            )
            .context("starting delivery")?,
        )
    } else {
        None
    };
    // TLSRPT: the daily aggregate reports (RFC 8460) of the previous UTC day.
    if config.delivery.enabled
        && let Some(t) = config
            .tlsrpt
            .settings(&config.spool.dir, &config.server.hostname)
    {
        let resolver = crate::delivery::Resolver::new(config.delivery.resolver)
            .context("the resolver of TLS reports")?;
        tokio::spawn(crate::tlsrpt::daily(
            t,
            resolver,
            spool.clone(),
            stopped(stop_rx.clone()),
        ));
    }

    let mut tasks = JoinSet::new();
    tasks.spawn(admin::serve(
        admin_listener,
        AdminState {
            metrics: metrics.clone(),
            spool: spool.clone(),
            policy_version,
            reloader: Some(reloader.clone()),
            token: config.admin.token.clone(),
            hostname: config.server.hostname.clone(),
        },
        stopped(stop_rx.clone()),
    ));

    let smtp = Arc::new(smtp_config(&config));
    let handler = Arc::new(Inbound::new(&config, spool.clone(), metrics.clone()));
    let max_sessions = config.server.max_sessions;
    let sessions = Arc::new(Semaphore::new(max_sessions));
    let proxies: Arc<[IpNet]> = config.server.proxy_protocol_from.clone().into();
    // What sessions can run at once: `max_sessions` in all; on the listeners the edge
    // filter guards, each also holds one of its module instances.
    let edge_capacity = config
        .edge
        .as_ref()
        .map_or(max_sessions, |e| max_sessions.min(e.max_instances));
    let clients = Arc::new(Clients {
        limit: config.server.max_sessions_per_client,
        outside_limit: outside_limit(max_sessions),
        outside_edge_limit: outside_limit(edge_capacity),
        exempt: config.relay.allow_networks.clone().into(),
        counts: Mutex::new(Counts::default()),
    });
    if !proxies.is_empty() {
        tracing::info!(from = ?proxies, "a PROXY protocol header is required from these proxies");
    }
    for listener in listeners {
        let local = listener.local_addr().context("listener address")?;
        tracing::info!(%local, "accepting SMTP");
        let front = Front {
            smtp: smtp.clone(),
            handler: handler.clone(),
            metrics: metrics.clone(),
            edge: edge.clone().filter(|e| e.guards(local)),
            proxies: proxies.clone(),
            clients: clients.clone(),
        };
        tasks.spawn(accept_loop(
            listener,
            sessions.clone(),
            stop_rx.clone(),
            front,
        ));
    }

    shutdown.await;
    tracing::info!("shutting down: no new sessions");
    // Accept loops and the admin endpoint end; their listeners close when they return.
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    let _ = hup.await;
    // Sessions and delivery attempts in flight share one grace period: a delivery attempt
    // can wait minutes for a slow MX (the command timeout, per reply), and the process
    // must still exit within `shutdown_grace`. An attempt cut off records nothing more and
    // is retried at the next start.
    let grace = config.server.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    let drain_delivery = async {
        if let Some(delivery) = delivery
            && !delivery.stopped_by(deadline).await
        {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "delivery attempts still running after the grace period; aborted (retried at the next start)"
            );
        }
    };
    let all = u32::try_from(max_sessions).unwrap_or(u32::MAX);
    let drain_sessions = async {
        match tokio::time::timeout_at(deadline, sessions.acquire_many(all)).await {
            Ok(_) => tracing::info!("all sessions finished"),
            Err(_) => tracing::warn!(
                active = max_sessions - sessions.available_permits(),
                grace_secs = grace.as_secs(),
                "sessions still active after the grace period; closing them"
            ),
        }
    };
    tokio::join!(drain_delivery, drain_sessions);
    // Every acknowledged message was synced before its 250; nothing else is buffered.
    let stats = spool.stats();
    tracing::info!(
        queued = stats.messages,
        stored = stats.stored,
        store_errors = stats.store_errors,
        "stopped"
    );
    Ok(())
}

/// What the sessions of one listener share.
#[derive(Clone)]
struct Front {
    smtp: Arc<ServerConfig>,
    handler: Arc<Inbound>,
    metrics: Arc<Metrics>,
    /// The edge filter, when it guards this listener.
    edge: Option<Arc<crate::edge::Edge>>,
    /// `server.proxy_protocol_from`.
    proxies: Arc<[IpNet]>,
    /// Sessions per client address (`server.max_sessions_per_client`).
    clients: Arc<Clients>,
}

/// Sessions per client address, for `server.max_sessions_per_client`: without a cap, one
/// host could take every `max_sessions` slot (an audit's three clients that never read
/// their replies locked a relay's allowed clients out). The relay's own clients
/// (`relay.allow_networks`) are exempt, as Postfix exempts `$mynetworks`, and a fifth of
/// what the relay can serve at once is kept for them ([`outside_limit`]).
struct Clients {
    limit: usize,
    /// Sessions of clients outside `relay.allow_networks`, all together...
    outside_limit: usize,
    /// ...and those of them on listeners the edge filter guards.
    outside_edge_limit: usize,
    exempt: Arc<[IpNet]>,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    per_address: HashMap<IpAddr, usize>,
    outside: usize,
    outside_edge: usize,
}

/// How many of `capacity` sessions (`server.max_sessions`, or the edge filter's
/// `max_instances` when lower) clients outside `relay.allow_networks` may hold together:
/// all but a fifth (at least one kept, and at least one for them). An audit's six outside addresses, 50 idle sessions each
/// (under the per-address limit), took all 256 edge instances, and every allowed client
/// was closed without a greeting until they left; without the edge, seven addresses
/// took a 20-session relay.
fn outside_limit(capacity: usize) -> usize {
    capacity.saturating_sub((capacity / 5).max(1)).max(1)
}

/// Why [`Clients::enter`] refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Full {
    /// The client address has `max_sessions_per_client` sessions.
    Address,
    /// Outside clients hold their share of the sessions ([`outside_limit`]).
    Outside,
}

/// One session counted against its client address, until dropped.
struct ClientSlot {
    clients: Arc<Clients>,
    ip: IpAddr,
    guarded: bool,
}

impl Clients {
    /// Refused when `ip` has `limit` sessions already, or when outside clients hold
    /// their share; otherwise its slot, which is `None` for an exempt address (not
    /// counted). IPv4-mapped IPv6 addresses count as their IPv4 address.
    /// `guarded`: the session is on a listener the edge filter guards.
    fn enter(self: &Arc<Self>, ip: IpAddr, guarded: bool) -> Result<Option<ClientSlot>, Full> {
        let ip = ip.to_canonical();
        if crate::config::in_networks(&self.exempt, ip) {
            return Ok(None);
        }
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.outside >= self.outside_limit
            || guarded && counts.outside_edge >= self.outside_edge_limit
        {
            return Err(Full::Outside);
        }
        let n = counts.per_address.entry(ip).or_insert(0);
        if *n >= self.limit {
            return Err(Full::Address);
        }
        *n += 1;
        counts.outside += 1;
        if guarded {
            counts.outside_edge += 1;
        }
        Ok(Some(ClientSlot {
            clients: self.clone(),
            ip,
            guarded,
        }))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self
            .clients
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let counts = &mut *counts;
        if let Some(n) = counts.per_address.get_mut(&self.ip) {
            *n -= 1;
            counts.outside -= 1;
            if self.guarded {
                counts.outside_edge -= 1;
            }
            if *n == 0 {
                counts.per_address.remove(&self.ip);
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    sessions: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    front: Front,
) {
    let stop_fut = stopped(stop);
    tokio::pin!(stop_fut);
    loop {
        let permit = tokio::select! {
            _ = &mut stop_fut => return,
            p = sessions.clone().acquire_owned() => match p {
                Ok(p) => p,
                // Closed only if we closed it, which we never do.
                Err(_) => return,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut stop_fut => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically EMFILE: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let local = match stream.local_addr() {
            Ok(l) => l,
            Err(_) => continue,
        };
        // Replies are written whole; Nagle would only delay them.
        let _ = stream.set_nodelay(true);
        let front = front.clone();
        tokio::spawn(async move {
            // The permit is held while the PROXY header is awaited too.
            front.session(stream, peer, local).await;
            drop(permit);
        });
    }
}

impl Front {
    /// One accepted connection: the PROXY header if `peer` is a trusted proxy, then the
    /// SMTP session (through the edge filter when it guards the listener).
    async fn session(self, mut stream: TcpStream, peer: SocketAddr, local: SocketAddr) {
        let peer = if proxy_protocol::trusted(&self.proxies, peer.ip()) {
            match proxy_protocol::read_header(&mut stream, proxy_protocol::HEADER_TIMEOUT).await {
                Ok(Origin::Client { source, .. }) => {
                    tracing::debug!(proxy = %peer, client = %source, "PROXY header");
                    source
                }
                Ok(Origin::Proxy) => {
                    tracing::debug!(proxy = %peer, "PROXY header without a client address; the proxy's own is kept");
                    peer
                }
                Err(e) => {
                    self.metrics.proxy_protocol_error(e.reason());
                    tracing::warn!(proxy = %peer, error = %e, "no valid PROXY header from a trusted proxy; connection closed");
                    return;
                }
            }
        } else {
            peer
        };
        let _slot = match self.clients.enter(peer.ip(), self.edge.is_some()) {
            Ok(slot) => slot,
            Err(full) => {
                let reply = match full {
                    Full::Address => {
                        self.metrics.sessions_refused_per_client.inc();
                        tracing::info!(client = %peer, limit = self.clients.limit, "too many sessions from one client address; refused with 421");
                        format!(
                            "421 4.7.0 {} Too many connections from your address\r\n",
                            self.smtp.hostname
                        )
                    }
                    Full::Outside => {
                        self.metrics.sessions_refused_outside.inc();
                        tracing::info!(client = %peer, limit = self.clients.outside_limit, "clients outside relay.allow_networks hold their share of the sessions; refused with 421");
                        format!(
                            "421 4.7.0 {} Too many connections, try again later\r\n",
                            self.smtp.hostname
                        )
                    }
                };
                // Best effort, bounded: the client may not read.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                    stream.write_all(reply.as_bytes()).await?;
                    stream.shutdown().await
                })
                .await;
                return;
            }
        };
        let Front {
            smtp,
            handler,
            metrics,
            edge,
            ..
        } = self;
        metrics.sessions.inc();
        metrics.sessions_active.inc();
        let info = SessionInfo::new(peer, local);
        if let Some(edge) = edge {
            edge.handle(stream, info, smtp, handler).await;
        } else {
            match serve_session(stream, info, smtp, handler).await {
                Ok(end) => tracing::debug!(%peer, ?end, "session ended"),
                Err(e) => tracing::debug!(%peer, error = %e, "session failed"),
            }
        }
        metrics.sessions_active.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::outside_limit;

    /// Outside clients get all but a fifth of what the relay can serve at once, and at
    /// least one session is kept for the relay's own clients whenever there are two.
    #[test]
    fn outside_clients_leave_a_fifth() {
        assert_eq!(outside_limit(1000), 800);
        assert_eq!(outside_limit(256), 205);
        assert_eq!(outside_limit(5), 4);
        assert_eq!(outside_limit(4), 3);
        assert_eq!(outside_limit(2), 1);
        assert_eq!(outside_limit(1), 1);
    }
}
