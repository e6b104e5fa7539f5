//! The SMTP edge filter on the relay's own inbound port: the policy module's stream face
//! run the way Envoy runs it as a network filter before `tcp_proxy`.
//!
//! # Core concepts
//!
//! - `[edge]` in the relay configuration ([`EdgeConfig`]) loads a proxy-wasm module (by
//!   default the built-in standard module with root id `altroute.smtp`, configured with
//!   the relay's compiled policy) into its own [`Host`].
//! - Every connection accepted on an edge listener opens a stream context
//!   ([`Plugin::stream`], i.e. `proxy_on_new_connection`) with the client's and the
//!   listener's addresses. Bytes from the client go through `proxy_on_downstream_data`
//!   before they reach the upstream; bytes from the upstream go through
//!   `proxy_on_upstream_data` before they reach the client. The module may rewrite both
//!   (the standard module replaces a refused `RCPT` by `NOOP` and rewrites its reply).
//! - Connection routing: the upstream is the cluster the module named with
//!   `set_envoy_filter_state("envoy.tcp_proxy.cluster", NAME)` in `on_new_connection`,
//!   or `default_cluster` (default `inbound`). [`INBOUND_CLUSTER`] is the relay's own
//!   SMTP server (an in-process session over a `tokio::io::duplex` pipe, with the real
//!   client address, so the relay's access rules still apply); other names come from
//!   `[edge.clusters]` (`name = "host:port"`, proxied like `tcp_proxy`). A name not in
//!   the table closes the connection (fail closed) and logs it.
//! - Failure policy: fail closed. A trap, deadline, memory limit or "no free instance"
//!   closes the client's connection at once (before the greeting when it happens in
//!   `on_new_connection`), like Envoy's `FAIL_CLOSED`; counted in
//!   `altroute_edge_filter_faults_total{stage}`.
//! - Metrics: the module's own metrics appear in `/metrics` as `altroute_edge_<name>`
//!   (the module's name without a leading `altroute_`), next to
//!   `altroute_edge_connections_total{cluster}` and the fault counter.
//!
//! # Layout
//!
//! [`RawEdge`] (the TOML section) is checked by [`check`] into [`EdgeConfig`];
//! [`Edge::start`] loads the module; [`Edge::handle`] serves one connection (open the
//! stream, pick the upstream, pump both directions through the filter, close).
//!
//! # Example
//!
//! ```toml
//! [edge]
//! listeners = ["127.0.0.1:25"]    # default: every server.listen address
//! [edge.clusters]
//! partners = "127.0.0.1:2526"     # a cluster the module may pick
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use altroute_smtp::{ServerConfig, SessionInfo, serve_session};
use proxy_wasm_host::{
    Action, ConnectionInfo, Host, HostConfig, MetricKind, Plugin, PluginSpec, Stream,
};

use crate::config::Config;
use crate::inbound::Inbound;
use crate::metrics::{Labels, Metrics};

/// The cluster name that means "the relay's own SMTP server".
pub const INBOUND_CLUSTER: &str = "inbound";

/// The stream root of the standard module (SMTP enforcement and connection routing).
pub const DEFAULT_ROOT_ID: &str = "altroute.smtp";

/// The filter state key the module sets to pick the upstream, as in Envoy.
const TCP_PROXY_CLUSTER: &str = "envoy.tcp_proxy.cluster";

/// Bytes read from one side per filter call. 16 KiB, Envoy's default read size.
const READ_CHUNK: usize = 16 * 1024;

/// Most bytes a module may hold back (answering Pause) in one direction: as Envoy's
/// default `per_connection_buffer_limit_bytes`. Past it the session ends as a filter
/// failure; a module that paused for ever once made the relay buffer what the client sent.
const MAX_HELD: usize = 1 << 20;

/// Buffer of the in-process pipe to the relay's SMTP server. 64 KiB.
const PIPE_BYTES: usize = 64 * 1024;

/// `[edge]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawEdge {
    enabled: Option<bool>,
    module: Option<String>,
    root_id: Option<String>,
    configuration: Option<String>,
    configuration_file: Option<String>,
    listeners: Option<Vec<String>>,
    default_cluster: Option<String>,
    clusters: Option<BTreeMap<String, String>>,
    deadline_ms: Option<u64>,
    memory_limit_mb: Option<u64>,
    max_instances: Option<u64>,
    connect_timeout_secs: Option<u64>,
}

/// `[edge]`, validated.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EdgeConfig {
    /// The module. Defaults to none: the built-in standard module
    /// (`altroute_modules::POLICY`).
    pub module: Option<PathBuf>,
    /// The root id. Defaults to `altroute.smtp` ([`DEFAULT_ROOT_ID`]).
    pub root_id: String,
    /// The plugin configuration. Defaults to none: the relay's compiled policy (canonical
    /// JSON), which is what the standard module's stream root expects.
    pub configuration: Option<Vec<u8>>,
    /// Listeners whose connections go through the filter (a subset of `server.listen`).
    /// Defaults to every listener.
    pub listeners: Vec<SocketAddr>,
    /// The upstream when the module picks none. Defaults to `inbound`.
    pub default_cluster: String,
    /// Cluster name to `host:port`. Defaults to empty (only `inbound`).
    pub clusters: BTreeMap<String, String>,
    /// Budget of one filter call. Defaults to 100 ms.
    pub deadline: Duration,
    /// Memory cap of one module instance, MiB. Defaults to 64.
    pub memory_limit_mb: u64,
    /// Module instances; each open connection holds one, so this caps concurrent edge
    /// connections (a connection that finds none waits 100 ms, then is closed). Defaults
    /// to 256.
    pub max_instances: usize,
    /// Connect timeout to a `[edge.clusters]` upstream. Defaults to 10 s.
    pub connect_timeout: Duration,
}

/// Validates `[edge]`; every problem goes to `problems` with its key. `base` resolves
/// relative paths; `listen` is `server.listen`. `None` when the section is absent, has
/// `enabled = false`, or has problems.
pub(crate) fn check(
    raw: Option<RawEdge>,
    base: &Path,
    listen: &[SocketAddr],
    problems: &mut Vec<String>,
) -> Option<EdgeConfig> {
    let raw = raw?;
    let before = problems.len();
    let path = |s: &str| {
        let p = Path::new(s);
        if p.is_absolute() {
            p.to_owned()
        } else {
            base.join(p)
        }
    };
    let file = |key: &str, value: &Option<String>, problems: &mut Vec<String>| {
        let p = path(value.as_deref()?);
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => Some(p),
            Ok(_) => {
                problems.push(format!("edge.{key}: {} is not a regular file", p.display()));
                None
            }
            Err(e) => {
                problems.push(format!("edge.{key}: {}: {e}", p.display()));
                None
            }
        }
    };
    let module = file("module", &raw.module, problems);
    let configuration = match (&raw.configuration, &raw.configuration_file) {
        (Some(_), Some(_)) => {
            problems.push(
                "edge.configuration_file: give edge.configuration or edge.configuration_file, not both"
                    .to_owned(),
            );
            None
        }
        (Some(text), None) => Some(text.clone().into_bytes()),
        (None, Some(_)) => {
            file("configuration_file", &raw.configuration_file, problems).and_then(|p| {
                match std::fs::read(&p) {
                    Ok(b) => Some(b),
                    Err(e) => {
                        problems.push(format!("edge.configuration_file: {}: {e}", p.display()));
                        None
                    }
                }
            })
        }
        (None, None) => None,
    };
    let root_id = raw.root_id.unwrap_or_else(|| DEFAULT_ROOT_ID.to_owned());
    if root_id.is_empty() {
        problems.push("edge.root_id: must not be empty".to_owned());
    }
    let listeners = match raw.listeners {
        None => listen.to_vec(),
        Some(list) => {
            if list.is_empty() {
                problems.push(
                    "edge.listeners: empty; remove [edge] or set enabled = false to turn the filter off"
                        .to_owned(),
                );
            }
            let mut out = Vec::new();
            for (i, s) in list.iter().enumerate() {
                match s.parse::<SocketAddr>() {
                    Ok(a) if listen.contains(&a) => out.push(a),
                    Ok(a) => problems.push(format!(
                        "edge.listeners[{i}]: {a} is not one of server.listen"
                    )),
                    Err(_) => problems.push(format!(
                        "edge.listeners[{i}]: {s:?} is not an address with port"
                    )),
                }
            }
            out
        }
    };
    let clusters = raw.clusters.unwrap_or_default();
    for (name, target) in &clusters {
        if name == INBOUND_CLUSTER {
            problems.push(format!(
                "edge.clusters.{name}: \"{INBOUND_CLUSTER}\" is reserved for the relay's own SMTP server"
            ));
        }
        let port_ok = target.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok {
            problems.push(format!(
                "edge.clusters.{name}: {target:?} is not \"host:port\""
            ));
        }
    }
    let default_cluster = raw
        .default_cluster
        .unwrap_or_else(|| INBOUND_CLUSTER.to_owned());
    if default_cluster != INBOUND_CLUSTER && !clusters.contains_key(&default_cluster) {
        problems.push(format!(
            "edge.default_cluster: {default_cluster:?} is neither \"{INBOUND_CLUSTER}\" nor in [edge.clusters]"
        ));
    }
    let positive = |key: &str, v: Option<u64>, default: u64, problems: &mut Vec<String>| match v {
        Some(0) => {
            problems.push(format!("edge.{key}: must be greater than 0"));
            default
        }
        Some(v) => v,
        None => default,
    };
    let deadline_ms = positive("deadline_ms", raw.deadline_ms, 100, problems);
    let memory_limit_mb = positive("memory_limit_mb", raw.memory_limit_mb, 64, problems);
    let max_instances = positive("max_instances", raw.max_instances, 256, problems);
    let connect_timeout = positive(
        "connect_timeout_secs",
        raw.connect_timeout_secs,
        10,
        problems,
    );
    if problems.len() > before || raw.enabled == Some(false) {
        return None;
    }
    Some(EdgeConfig {
        module,
        root_id,
        configuration,
        listeners,
        default_cluster,
        clusters,
        deadline: Duration::from_millis(deadline_ms),
        memory_limit_mb,
        max_instances: usize::try_from(max_instances).unwrap_or(usize::MAX),
        connect_timeout: Duration::from_secs(connect_timeout),
    })
}

/// The relay's counters about the edge.
#[derive(Debug, Clone, Default)]
struct EdgeMetrics {
    /// Connections by upstream cluster (`unknown` for a name not configured).
    connections: Family<Labels, Counter>,
    /// Module failures by stage (`new_connection`, `data`, `close`).
    faults: Family<Labels, Counter>,
    /// Connections closed because the cluster's upstream could not be reached.
    upstream_failures: Family<Labels, Counter>,
}

fn label(name: &str, value: &str) -> Labels {
    vec![(name.to_owned(), value.to_owned())]
}

/// Exposes the module's metrics at every scrape.
#[derive(Debug)]
struct ModuleMetrics(Arc<ArcSwap<Plugin>>);

/// `altroute_smtp_sessions_total` -> `edge_smtp_sessions` (the registry adds `altroute_`,
/// the encoder `_total` for counters).
fn exposition_name(name: &str, kind: MetricKind) -> String {
    let bare = name.strip_prefix("altroute_").unwrap_or(name);
    let bare = if kind == MetricKind::Counter {
        bare.strip_suffix("_total").unwrap_or(bare)
    } else {
        bare
    };
    let clean: String = bare
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("edge_{clean}")
}

/// The HELP line of a module's metric: its own spelling, printable ASCII only.
/// prometheus-client writes HELP as it is, and an audit's metric name with line breaks
/// added samples of its own (a forged `altroute_safety_floor_violations_total`).
fn help_text(name: &str) -> String {
    let shown: String = name
        .chars()
        .take(MAX_NAME)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    format!("Defined by the edge module as {shown}")
}

/// The relay's own `edge_*` families: a module's metric of the same exposition name is
/// not shown (two families of one name make the whole scrape unparseable).
const RESERVED: &[&str] = &[
    "edge_connections",
    "edge_filter_faults",
    "edge_upstream_failures",
];

/// Most module metrics shown, and the longest name: a module defines what it likes.
const MAX_SHOWN: usize = 1000;
const MAX_NAME: usize = 200;

impl Collector for ModuleMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let mut seen = std::collections::HashSet::new();
        for m in self.0.load().metrics() {
            let name = exposition_name(&m.name, m.kind);
            // Distinct module names can fold into one exposition name (`a.b`, `a_b`); a
            // name is shown once, and never one of the relay's.
            if name.len() > MAX_NAME
                || seen.len() >= MAX_SHOWN
                || RESERVED.contains(&name.as_str())
                || !seen.insert(name.clone())
            {
                continue;
            }
            let help = help_text(&m.name);
            match m.kind {
                MetricKind::Counter => {
                    let c = ConstCounter::new(u64::try_from(m.value).unwrap_or(0));
                    c.encode(encoder.encode_descriptor(&name, &help, None, c.metric_type())?)?;
                }
                // A histogram's sum is shown as a gauge: the host keeps no buckets.
                MetricKind::Gauge | MetricKind::Histogram => {
                    let g = ConstGauge::new(m.value);
                    g.encode(encoder.encode_descriptor(&name, &help, None, g.metric_type())?)?;
                }
            }
        }
        Ok(())
    }
}

/// The loaded edge filter, shared by the accept loops.
pub struct Edge {
    config: EdgeConfig,
    /// The active plugin; replaced when the relay's policy is reloaded (if the filter runs
    /// the relay's policy). A connection keeps the plugin it started with.
    plugin: Arc<ArcSwap<Plugin>>,
    host: Host,
    module: Arc<[u8]>,
    metrics: EdgeMetrics,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Why a connection through the filter ended early.
#[derive(Debug)]
enum Ended {
    /// The module failed (trap, deadline, limit): fail closed.
    Module(String),
    /// The module closed the connection on purpose (a protocol violation it refuses to
    /// follow, e.g. bytes sent after DATA before its reply). Not a fault.
    Closed,
    /// A socket error; the connection is over.
    Io,
}

impl Edge {
    /// Loads the module of `config.edge` (compiling is CPU work: off the async threads)
    /// and registers the edge metrics. `None` when there is no `[edge]`. `policy` is the
    /// relay's active policy (its canonical JSON), the filter's configuration unless it
    /// has one of its own: taken from the reloader, not read from the file again, and
    /// before any source can change it, so that the edge starts on the relay's version
    /// (an audit changed the policy while the edge compiled, and the edge kept the file's
    /// older one).
    pub async fn start(
        config: &Config,
        metrics: &Metrics,
        policy: String,
    ) -> Result<Option<Arc<Edge>>> {
        let Some(edge) = config.edge.clone() else {
            return Ok(None);
        };
        let loaded = tokio::task::spawn_blocking(move || load(&edge, policy).map(|p| (edge, p)))
            .await
            .context("loading the edge module")??;
        let (
            edge,
            Loaded {
                host,
                module,
                plugin,
            },
        ) = loaded;
        let plugin = Arc::new(ArcSwap::new(plugin));
        let m = EdgeMetrics::default();
        metrics.register(
            "edge_connections",
            "Connections through the edge filter, by upstream cluster",
            m.connections.clone(),
        );
        metrics.register(
            "edge_filter_faults",
            "Edge module failures (trap, deadline, limit, no instance), by stage; the connection was closed",
            m.faults.clone(),
        );
        metrics.register(
            "edge_upstream_failures",
            "Edge connections closed because the cluster's upstream was unreachable",
            m.upstream_failures.clone(),
        );
        metrics.with_registry(|r| r.register_collector(Box::new(ModuleMetrics(plugin.clone()))));
        tracing::info!(
            root_id = %edge.root_id,
            listeners = ?edge.listeners,
            clusters = ?edge.clusters.keys().collect::<Vec<_>>(),
            "edge filter loaded"
        );
        Ok(Some(Arc::new(Edge {
            config: edge,
            plugin,
            host,
            module,
            metrics: m,
            next_id: AtomicU64::new(1),
        })))
    }

    /// Follows the relay's hot reloads when the filter runs the relay's policy (no
    /// `configuration` of its own), as part of each activation's gate: a candidate is
    /// loaded into a new edge plugin (instances proven) before the relay swaps, and a
    /// candidate the edge module refuses is refused as a whole, audited with the edge's
    /// reason, so the edge never serves another version than the relay. After the swap
    /// the new plugin is stored, in order; new connections use it, open ones finish on
    /// the plugin they started with (as Envoy's ECDS does).
    pub fn follow(self: &Arc<Self>, reloader: &crate::reload::Reloader) {
        if self.config.configuration.is_some() {
            return;
        }
        let edge = Arc::downgrade(self);
        reloader.follow(Box::new(move |json: &str, version: &str| {
            let Some(edge) = edge.upgrade() else {
                // The edge is gone (shutting down): nothing to keep in step.
                return Ok(Box::new(|| {}));
            };
            let plugin = edge.prepare(json.as_bytes().to_vec(), version)?;
            let version = version.to_string();
            Ok(Box::new(move || {
                edge.plugin.store(plugin);
                tracing::info!(%version, "edge filter: now on the new policy");
            }))
        }));
    }

    /// A plugin for the candidate `configuration`, instances proven, or why the edge
    /// module refuses it.
    fn prepare(&self, configuration: Vec<u8>, version: &str) -> Result<Arc<Plugin>, String> {
        self.host
            .load(self.spec(configuration).version(version))
            .and_then(|p| p.prove_instances().map(|()| p))
            .map_err(|e| {
                self.fault("reload");
                tracing::error!(%version, error = %e, "edge filter: refuses the candidate policy; it is not activated");
                format!("the edge filter refuses it: {e}")
            })
    }

    fn spec(&self, configuration: Vec<u8>) -> PluginSpec {
        spec(&self.config, self.module.clone(), configuration)
    }

    /// Whether connections accepted on `local` go through the filter.
    pub fn guards(&self, local: SocketAddr) -> bool {
        self.config.listeners.contains(&local)
    }

    fn fault(&self, stage: &str) {
        self.metrics
            .faults
            .get_or_create(&label("stage", stage))
            .inc();
    }

    /// Serves one accepted connection through the filter (see the module docs).
    pub async fn handle(
        &self,
        client: TcpStream,
        info: SessionInfo,
        smtp: Arc<ServerConfig>,
        handler: Arc<Inbound>,
    ) {
        let peer = info.peer;
        let conn = ConnectionInfo {
            source: Some(info.peer),
            destination: Some(info.local),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            ..ConnectionInfo::default()
        };
        // Taking an instance may wait for a free one: off the async threads.
        let plugin = self.plugin.load_full();
        let mut stream = match tokio::task::spawn_blocking(move || plugin.stream(conn)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.fault("new_connection");
                tracing::warn!(%peer, error = %e, "edge filter failed on the new connection; closing it");
                return;
            }
            Err(e) => {
                self.fault("new_connection");
                tracing::error!(%peer, error = %e, "edge filter task failed; closing the connection");
                return;
            }
        };
        let cluster = stream
            .filter_state()
            .iter()
            .rev()
            .find(|(path, _)| path == TCP_PROXY_CLUSTER)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_else(|| self.config.default_cluster.clone());
        // A write to either side may take the SMTP command timeout, no longer: a client
        // that stops reading its replies must not hold the connection once the session
        // behind it has ended.
        let write_wait = smtp.command_timeout;
        let result = if cluster == INBOUND_CLUSTER {
            self.count_connection(&cluster);
            let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
            let session = tokio::spawn(async move {
                match serve_session(theirs, info, smtp, handler).await {
                    Ok(end) => tracing::debug!(%peer, ?end, "session ended"),
                    Err(e) => tracing::debug!(%peer, error = %e, "session failed"),
                }
            });
            let r = pump(&mut stream, client, ours, write_wait).await;
            // The pipe is closed: the session ends at its next read (or already did).
            let _ = session.await;
            r
        } else if let Some(target) = self.config.clusters.get(&cluster) {
            self.count_connection(&cluster);
            let connect = tokio::time::timeout(
                self.config.connect_timeout,
                TcpStream::connect(target.as_str()),
            )
            .await;
            match connect {
                Ok(Ok(up)) => {
                    let _ = up.set_nodelay(true);
                    pump(&mut stream, client, up, write_wait).await
                }
                Ok(Err(e)) => {
                    self.metrics
                        .upstream_failures
                        .get_or_create(&label("cluster", &cluster))
                        .inc();
                    tracing::warn!(%peer, %cluster, %target, error = %e, "edge upstream unreachable; closing the connection");
                    Ok(())
                }
                Err(_) => {
                    self.metrics
                        .upstream_failures
                        .get_or_create(&label("cluster", &cluster))
                        .inc();
                    tracing::warn!(%peer, %cluster, %target, "edge upstream connect timed out; closing the connection");
                    Ok(())
                }
            }
        } else {
            self.count_connection("unknown");
            tracing::warn!(%peer, %cluster, "edge: the module picked a cluster that is not configured; closing the connection");
            Ok(())
        };
        match result {
            Ok(()) | Err(Ended::Io) => {}
            // The module says why in its own log line and metric
            // (`altroute_smtp_sessions_closed_total`); its instance is sound.
            Err(Ended::Closed) => tracing::info!(%peer, "the edge module closed the connection"),
            Err(Ended::Module(e)) => {
                self.fault("data");
                tracing::warn!(%peer, error = %e, "edge filter failed; connection closed");
                // The instance was discarded by the failed call; nothing to close.
                return;
            }
        }
        let closed = tokio::task::spawn_blocking(move || stream.close()).await;
        if let Ok(Err(e)) = closed {
            self.fault("close");
            tracing::warn!(%peer, error = %e, "edge filter failed closing the stream");
        }
    }

    fn count_connection(&self, cluster: &str) {
        self.metrics
            .connections
            .get_or_create(&label("cluster", cluster))
            .inc();
    }
}

/// Compile and configure the edge module.
fn load(edge: &EdgeConfig, policy: String) -> Result<Loaded> {
    let module: Arc<[u8]> = match &edge.module {
        None => Arc::from(altroute_modules::POLICY),
        Some(p) => std::fs::read(p)
            .with_context(|| format!("reading {}", p.display()))?
            .into(),
    };
    let configuration = match &edge.configuration {
        Some(c) => c.clone(),
        None => policy.into_bytes(),
    };
    let host = Host::new(HostConfig {
        deadline: edge.deadline,
        memory_limit: usize::try_from(edge.memory_limit_mb)
            .unwrap_or(usize::MAX >> 20)
            .saturating_mul(1 << 20),
        max_instances: edge.max_instances,
        ..HostConfig::default()
    })
    .context("edge: starting the wasm host")?;
    let plugin = host
        .load(spec(edge, module.clone(), configuration))
        .context("edge: loading and configuring the module")?;
    Ok(Loaded {
        host,
        module,
        plugin,
    })
}

/// A loaded edge module: the host it runs in, its bytes (for reloads) and the plugin.
struct Loaded {
    host: Host,
    module: Arc<[u8]>,
    plugin: Arc<Plugin>,
}

fn spec(edge: &EdgeConfig, module: Arc<[u8]>, configuration: Vec<u8>) -> PluginSpec {
    PluginSpec::new(module, edge.root_id.clone())
        .plugin_config(configuration)
        .name("altroute-edge")
}

/// Moves bytes both ways through the filter until the upstream ends (then the client's
/// connection is closed too, as `tcp_proxy` does) or the module fails. Each write may take
/// `write_wait`: a peer that does not read ends the connection then.
async fn pump<U>(
    stream: &mut Stream,
    client: TcpStream,
    upstream: U,
    write_wait: Duration,
) -> Result<(), Ended>
where
    U: AsyncRead + AsyncWrite + Send + Unpin,
{
    // Both directions run in this task, one at a time; the lock is never contended and
    // is held only for the (synchronous, deadline-bounded) filter call.
    let shared = Mutex::new(stream);
    let (client_rd, client_wr) = client.into_split();
    let (up_rd, up_wr) = tokio::io::split(upstream);
    let down = direction(&shared, client_rd, up_wr, false, write_wait);
    let up = direction(&shared, up_rd, client_wr, true, write_wait);
    tokio::pin!(down, up);
    let mut down_done = false;
    loop {
        tokio::select! {
            r = &mut up => return r,
            r = &mut down, if !down_done => {
                r?;
                down_done = true;
            }
        }
    }
}

/// One direction: read, filter (`upstream` = server-to-client bytes), write. At the end
/// of the input the filter gets `end_of_stream` and the output side is shut down.
async fn direction<R, W>(
    stream: &Mutex<&mut Stream>,
    mut from: R,
    mut to: W,
    upstream: bool,
    write_wait: Duration,
) -> Result<(), Ended>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; READ_CHUNK];
    // Bytes the module held back (it answered Pause): Envoy hands them in again, with
    // what arrives next, at the following call.
    let mut held: Vec<u8> = Vec::new();
    loop {
        // A read error (reset) ends this side like an end of stream.
        let n = from.read(&mut buf).await.unwrap_or(0);
        let end = n == 0;
        let data: &[u8] = if held.is_empty() {
            &buf[..n]
        } else {
            held.extend_from_slice(&buf[..n]);
            &held
        };
        let out = {
            let mut s = stream.lock().unwrap_or_else(|e| e.into_inner());
            if upstream {
                s.upstream(data, end)
            } else {
                s.downstream(data, end)
            }
        }
        .map_err(|e| Ended::Module(e.to_string()))?;
        if out.close_downstream || out.close_upstream {
            return Err(Ended::Closed);
        }
        if out.action == Action::Pause && !end {
            held = out.data;
            if held.len() > MAX_HELD {
                return Err(Ended::Module(format!(
                    "the module held back more than {MAX_HELD} bytes"
                )));
            }
            continue;
        }
        held.clear();
        if !out.data.is_empty() {
            tokio::time::timeout(write_wait, to.write_all(&out.data))
                .await
                .map_err(|_| Ended::Io)?
                .map_err(|_| Ended::Io)?;
        }
        if end {
            let _ = to.shutdown().await;
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn checked(toml_src: &str, listen: &[SocketAddr]) -> (Option<EdgeConfig>, Vec<String>) {
        let raw: RawEdge = toml::from_str(toml_src).unwrap();
        let mut problems = Vec::new();
        let c = check(Some(raw), Path::new("/"), listen, &mut problems);
        (c, problems)
    }

    #[test]
    fn defaults_and_every_problem_at_once() {
        let a: SocketAddr = "127.0.0.1:2525".parse().unwrap();
        let (c, p) = checked("", &[a]);
        let c = c.unwrap();
        assert!(p.is_empty());
        assert_eq!(c.root_id, DEFAULT_ROOT_ID);
        assert_eq!(c.listeners, vec![a]);
        assert_eq!(c.default_cluster, INBOUND_CLUSTER);
        assert_eq!(c.deadline, Duration::from_millis(100));
        assert_eq!(c.max_instances, 256);
        assert!(c.configuration.is_none() && c.module.is_none());

        let (c, p) = checked(
            r#"
            module = "/nonexistent.wasm"
            listeners = ["127.0.0.1:1", "x"]
            default_cluster = "nowhere"
            deadline_ms = 0
            configuration = "{}"
            configuration_file = "/etc/hostname"
            [clusters]
            inbound = "127.0.0.1:25"
            bad = "no-port"
            "#,
            &[a],
        );
        assert!(c.is_none());
        assert_eq!(p.len(), 8, "{p:#?}");
        for key in [
            "edge.module",
            "edge.listeners[0]",
            "edge.listeners[1]",
            "edge.default_cluster",
            "edge.deadline_ms",
            "edge.configuration_file",
            "edge.clusters.inbound",
            "edge.clusters.bad",
        ] {
            assert!(p.iter().any(|l| l.starts_with(key)), "{key}: {p:#?}");
        }
        let (c, p) = checked("enabled = false", &[a]);
        assert!(c.is_none() && p.is_empty());
    }

    #[test]
    fn module_metric_names() {
        assert_eq!(
            exposition_name("altroute_smtp_sessions_total", MetricKind::Counter),
            "edge_smtp_sessions"
        );
        assert_eq!(
            exposition_name("wasm.x-y", MetricKind::Gauge),
            "edge_wasm_x_y"
        );
    }

    #[test]
    fn a_module_metric_name_cannot_write_lines_of_its_own() {
        let help = help_text("pwn\n# TYPE altroute_safety_floor_violations counter\nx 0");
        assert!(!help.contains('\n'), "{help}");
        assert_eq!(
            help,
            "Defined by the edge module as pwn?#?TYPE?altroute_safety_floor_violations?counter?x?0"
        );
        // A module's `connections` would be the relay's own family: not shown.
        let name = exposition_name("connections", MetricKind::Counter);
        assert!(RESERVED.contains(&name.as_str()), "{name}");
    }
}
