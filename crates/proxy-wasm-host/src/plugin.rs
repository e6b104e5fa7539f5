//! [`Plugin`]: one loaded module + configuration, with its pool of ready instances; HTTP
//! requests and streams run through it.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use wasmtime::{InstancePre, Store, Trap, TypedFunc, WasmParams, WasmResults};

use crate::abi::{self, LocalResponse, PluginShared, State};
use crate::error::{Error, HostAbort};
use crate::host::HostInner;
use crate::metrics::{Metric, Registry};
use crate::properties::{ConnectionInfo, PropertyProvider};

/// Root context id of every instance; child contexts count up from 2.
const ROOT_CONTEXT: u32 = 1;
/// Faults in a row after which rebuilding an instance waits (backoff).
const FREE_REBUILDS: u32 = 3;
/// Longest wait between rebuilds of a plugin that keeps faulting.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What to load: the module, its configuration and its identity.
#[derive(Clone)]
pub struct PluginSpec {
    /// The `.wasm` bytes.
    pub module: Arc<[u8]>,
    /// Handed to `proxy_on_configure` (buffer type PluginConfiguration).
    pub plugin_config: Vec<u8>,
    /// Handed to `proxy_on_vm_start` (buffer type VmConfiguration).
    pub vm_config: Vec<u8>,
    /// The root id (`plugin_root_id` property) that selects the module's root context.
    pub root_id: String,
    /// Plugin name (`plugin_name` property); also the VM id that scopes shared data and
    /// queues, so successive versions of one plugin share them.
    pub name: String,
    /// A version label the embedder chooses (reported by [`Plugin::version`]).
    pub version: String,
    /// Answers properties the built-ins do not know. Defaults to none.
    pub properties: Option<Arc<dyn PropertyProvider>>,
}

impl PluginSpec {
    /// A spec with empty configurations, name `root_id` and version `"0"`.
    pub fn new(module: impl Into<Arc<[u8]>>, root_id: impl Into<String>) -> PluginSpec {
        let root_id = root_id.into();
        PluginSpec {
            module: module.into(),
            plugin_config: Vec::new(),
            vm_config: Vec::new(),
            name: root_id.clone(),
            root_id,
            version: "0".into(),
            properties: None,
        }
    }

    /// Sets the plugin configuration.
    pub fn plugin_config(mut self, config: impl Into<Vec<u8>>) -> Self {
        self.plugin_config = config.into();
        self
    }

    /// Sets the VM configuration.
    pub fn vm_config(mut self, config: impl Into<Vec<u8>>) -> Self {
        self.vm_config = config.into();
        self
    }

    /// Sets the version label.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Sets the plugin name (and VM id).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the property provider.
    pub fn properties(mut self, provider: Arc<dyn PropertyProvider>) -> Self {
        self.properties = Some(provider);
        self
    }
}

/// An HTTP request to run through a plugin.
#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    /// Request headers, pseudo-headers (`:method`, `:path`, `:authority`) included. Keys
    /// are lower-cased on the way in, as Envoy does.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body, delivered in one `proxy_on_request_body` call with end_of_stream; `None`
    /// means headers-only (end_of_stream on the headers).
    pub body: Option<Vec<u8>>,
    /// The downstream connection, for `source.*` / `destination.*` properties.
    pub connection: Option<ConnectionInfo>,
}

/// An HTTP request borrowed from the caller, for [`Plugin::http_request_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpRequestRef<'a> {
    /// Request headers, pseudo-headers included. Keys are lower-cased on the way in.
    pub headers: &'a [(&'a str, &'a [u8])],
    /// The body (`None`: headers-only), as in [`HttpRequest::body`].
    pub body: Option<&'a [u8]>,
    /// The downstream connection, for `source.*` / `destination.*` properties.
    pub connection: Option<&'a ConnectionInfo>,
}

/// What a plugin did with an HTTP request, borrowed from the instance that ran it (see
/// [`Plugin::http_request_with`]); the fields mean what they mean in [`HttpOutcome`].
#[derive(Debug, Clone, Copy)]
pub struct HttpView<'a> {
    /// The request headers after the plugin's changes.
    pub headers: &'a [(String, Vec<u8>)],
    /// The body after the plugin's changes (`None` when the request had none).
    pub body: Option<&'a [u8]>,
    /// Set when the plugin answered locally.
    pub local_response: Option<&'a LocalResponse>,
    /// `set_envoy_filter_state` calls: (path, value), last value per path.
    pub filter_state: &'a [(String, Vec<u8>)],
    /// The plugin called the foreign function `clear_route_cache`.
    pub route_cache_cleared: bool,
    /// A header or body callback returned Pause without a local response.
    pub paused: bool,
    /// The plugin reset the request (`proxy_close_stream` on the request or response, the
    /// SDKs' `reset_http_request`): Envoy would reset the stream, so the request must not
    /// be treated as allowed.
    pub reset: bool,
}

impl<'a> HttpView<'a> {
    /// The first value of header `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// An owned copy.
    pub fn to_outcome(&self) -> HttpOutcome {
        HttpOutcome {
            headers: self.headers.to_vec(),
            body: self.body.map(<[u8]>::to_vec),
            local_response: self.local_response.cloned(),
            filter_state: self.filter_state.to_vec(),
            route_cache_cleared: self.route_cache_cleared,
            paused: self.paused,
            reset: self.reset,
        }
    }
}

/// What a plugin did with an HTTP request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpOutcome {
    /// The request headers after the plugin's changes.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body after the plugin's changes (`None` when the request had none).
    pub body: Option<Vec<u8>>,
    /// Set when the plugin answered locally (`proxy_send_local_response`).
    pub local_response: Option<LocalResponse>,
    /// `set_envoy_filter_state` calls: (path, value), last value per path.
    pub filter_state: Vec<(String, Vec<u8>)>,
    /// The plugin called the foreign function `clear_route_cache`.
    pub route_cache_cleared: bool,
    /// A header or body callback returned Pause without a local response. Envoy would
    /// hold the request; here everything was already delivered, so it is only reported.
    pub paused: bool,
    /// The plugin reset the request (`proxy_close_stream` on the request or response, the
    /// SDKs' `reset_http_request`): Envoy would reset the stream, so the request must not
    /// be treated as allowed.
    pub reset: bool,
}

impl HttpOutcome {
    /// The first value of header `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

/// `Continue` or `Pause`, as a stream callback returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Let the data through.
    Continue,
    /// Hold the data (the embedder decides what that means for its protocol).
    Pause,
}

impl Action {
    fn from_raw(v: u32) -> Action {
        if v == 1 {
            Action::Pause
        } else {
            Action::Continue
        }
    }
}

/// Result of one stream data event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamOutput {
    /// The bytes the plugin left in the buffer (possibly rewritten).
    pub data: Vec<u8>,
    /// The callback's answer.
    pub action: Action,
    /// The plugin asked to close the downstream connection (`proxy_close_stream`).
    pub close_downstream: bool,
    /// The plugin asked to close the upstream connection.
    pub close_upstream: bool,
}

struct Callbacks {
    context_create: TypedFunc<(u32, u32), ()>,
    vm_start: Option<TypedFunc<(u32, u32), u32>>,
    configure: Option<TypedFunc<(u32, u32), u32>>,
    request_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    request_body: Option<TypedFunc<(u32, u32, u32), u32>>,
    done: Option<TypedFunc<u32, u32>>,
    log: Option<TypedFunc<u32, ()>>,
    delete: Option<TypedFunc<u32, ()>>,
    tick: Option<TypedFunc<u32, ()>>,
    new_connection: Option<TypedFunc<u32, u32>>,
    downstream_data: Option<TypedFunc<(u32, u32, u32), u32>>,
    upstream_data: Option<TypedFunc<(u32, u32, u32), u32>>,
    downstream_close: Option<TypedFunc<(u32, u32), ()>>,
    upstream_close: Option<TypedFunc<(u32, u32), ()>>,
}

/// One configured instance: a store, its callbacks and its context counter.
pub(crate) struct Instance {
    store: Store<State>,
    /// Shared so a call site can hold the callbacks while borrowing the store: cloning a
    /// `TypedFunc` clones its registered type (reference counts in the engine's type
    /// registry), which showed up per call in profiles.
    cb: Arc<Callbacks>,
    next_context: u32,
    last_tick: Instant,
    deadline_ticks: u64,
}

fn classify(e: wasmtime::Error, callback: &'static str, st: &State) -> Error {
    if st.limiter.hit {
        return Error::MemoryLimit {
            callback,
            limit: st.limiter.memory_cap,
        };
    }
    if let Some(abort) = e.downcast_ref::<HostAbort>() {
        return match abort {
            HostAbort::Limit(what) => Error::Limit {
                callback,
                what: what.clone(),
            },
            HostAbort::Guest(reason) => Error::Guest {
                callback,
                reason: reason.clone(),
            },
            HostAbort::Exit(_) => Error::Trap {
                callback,
                message: abort.to_string(),
            },
            HostAbort::Deadline => Error::Deadline { callback },
        };
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Error::Deadline { callback },
        _ => Error::Trap {
            callback,
            message: format!("{e:#}"),
        },
    }
}

impl Instance {
    fn call<P: WasmParams, R: WasmResults>(
        &mut self,
        name: &'static str,
        f: &TypedFunc<P, R>,
        params: P,
    ) -> Result<R, Error> {
        let r = f.call(&mut self.store, params);
        let st = self.store.data();
        match r {
            Ok(_) if st.limiter.hit => Err(Error::MemoryLimit {
                callback: name,
                limit: st.limiter.memory_cap,
            }),
            // Over its deadline in its last host calls, with no guest code after them to
            // trap: the call ran too long all the same.
            Ok(_) if st.over_deadline() => Err(Error::Deadline { callback: name }),
            Ok(v) => Ok(v),
            Err(e) => Err(classify(e, name, st)),
        }
    }

    fn new(
        host: &HostInner,
        pre: &InstancePre<State>,
        shared: &Arc<PluginShared>,
    ) -> Result<Instance, Error> {
        let cfg = &host.config;
        let mut store = Store::new(
            &host.engine,
            State::new(
                shared.clone(),
                host.epoch.clone(),
                cfg.memory_limit,
                cfg.table_limit,
            ),
        );
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        // Making the instance ready has its own budget; each request arms the call deadline.
        store.set_epoch_deadline(host.load_deadline_ticks);
        store.data_mut().arm(host.load_deadline_ticks);
        let instance = match pre.instantiate(&mut store) {
            Ok(i) => i,
            Err(e) => return Err(classify(e, "instantiate", store.data())),
        };
        let memory = instance.get_memory(&mut store, "memory");
        let alloc = instance
            .get_typed_func::<u32, u32>(&mut store, "proxy_on_memory_allocate")
            .or_else(|_| instance.get_typed_func::<u32, u32>(&mut store, "malloc"))
            .map_err(|e| Error::Link(format!("allocator export: {e:#}")))?;
        store.data_mut().memory = memory;
        store.data_mut().alloc = Some(alloc);
        macro_rules! opt {
            ($name:literal) => {
                match instance.get_func(&mut store, $name) {
                    Some(f) => Some(
                        f.typed(&store)
                            .map_err(|e| Error::Link(format!("{}: {e:#}", $name)))?,
                    ),
                    None => None,
                }
            };
        }
        let context_create = opt!("proxy_on_context_create")
            .ok_or_else(|| Error::Link("module exports no proxy_on_context_create".into()))?;
        let cb = Callbacks {
            context_create,
            vm_start: opt!("proxy_on_vm_start"),
            configure: opt!("proxy_on_configure"),
            request_headers: opt!("proxy_on_request_headers"),
            request_body: opt!("proxy_on_request_body"),
            done: opt!("proxy_on_done"),
            log: opt!("proxy_on_log"),
            delete: opt!("proxy_on_delete"),
            tick: opt!("proxy_on_tick"),
            new_connection: opt!("proxy_on_new_connection"),
            downstream_data: opt!("proxy_on_downstream_data"),
            upstream_data: opt!("proxy_on_upstream_data"),
            downstream_close: opt!("proxy_on_downstream_connection_close"),
            upstream_close: opt!("proxy_on_upstream_connection_close"),
        };
        let initialize: Option<TypedFunc<(), ()>> = opt!("_initialize");
        let mut inst = Instance {
            store,
            cb: Arc::new(cb),
            next_context: ROOT_CONTEXT + 1,
            last_tick: Instant::now(),
            deadline_ticks: host.deadline_ticks,
        };
        // The SDK registers its roots in `_initialize` (its `main!`): it must run first.
        if let Some(f) = initialize {
            inst.call("_initialize", &f, ())?;
        }
        let cb = Arc::clone(&inst.cb);
        inst.call(
            "proxy_on_context_create",
            &cb.context_create,
            (ROOT_CONTEXT, 0),
        )?;
        if let Some(f) = &cb.vm_start {
            let size = shared.vm_config.len() as u32;
            if inst.call("proxy_on_vm_start", f, (ROOT_CONTEXT, size))? == 0 {
                return Err(Error::VmStart);
            }
        }
        if let Some(f) = &cb.configure {
            let size = shared.plugin_config.len() as u32;
            if inst.call("proxy_on_configure", f, (ROOT_CONTEXT, size))? == 0 {
                return Err(Error::Configure);
            }
        }
        Ok(inst)
    }

    fn context_id(&mut self) -> u32 {
        let id = self.next_context;
        // Ids stay unique among live contexts: one context at a time per instance (HTTP),
        // or one stream holding the instance. Skip 0 (none) and 1 (root) on wrap.
        self.next_context = self.next_context.checked_add(1).unwrap_or(ROOT_CONTEXT + 1);
        id
    }

    fn arm(&mut self) {
        self.store.set_epoch_deadline(self.deadline_ticks);
        self.store.data_mut().arm(self.deadline_ticks);
    }

    /// on_log, on_done, on_delete: the end of a context, in Envoy's order (seen by an
    /// audit with the same module in Envoy 1.40: log first; this said done first).
    fn finish(&mut self, id: u32) -> Result<(), Error> {
        let cb = Arc::clone(&self.cb);
        if let Some(f) = &cb.log {
            self.call("proxy_on_log", f, id)?;
        }
        if let Some(f) = &cb.done {
            self.call("proxy_on_done", f, id)?;
        }
        if let Some(f) = &cb.delete {
            self.call("proxy_on_delete", f, id)?;
        }
        Ok(())
    }

    /// Runs one HTTP context; the outcome stays in the store until the next context
    /// (read it with [`Instance::view`]). Returns whether a callback paused.
    fn http(&mut self, req: HttpRequestRef<'_>) -> Result<bool, Error> {
        self.arm();
        let st = self.store.data_mut();
        st.reset_context();
        st.in_http = true;
        st.conn = req.connection.cloned();
        let mut bytes = 0;
        for (k, v) in req.headers {
            let e = st.entry_str(k, v);
            bytes += abi::entry_bytes(&e.0, &e.1);
            st.maps[0].push(e);
        }
        st.map_bytes_known[0] = Some(bytes);
        let id = self.context_id();
        let cb = Arc::clone(&self.cb);
        self.call(
            "proxy_on_context_create",
            &cb.context_create,
            (id, ROOT_CONTEXT),
        )?;
        let mut paused = false;
        if let Some(f) = &cb.request_headers {
            let n = self.store.data().maps[0].len() as u32;
            let eos = u32::from(req.body.is_none());
            paused |= self.call("proxy_on_request_headers", f, (id, n, eos))? == 1;
        }
        // Gone on (as Envoy, for a later callback), unless held.
        self.store.data_mut().headers_gone = !paused;
        // The body arrives after the headers, as in Envoy: not readable in
        // `on_request_headers`, readable and writable in `on_request_body` only.
        if let Some(body) = req.body {
            self.store.data_mut().request_body.extend_from_slice(body);
        }
        if let (Some(body), Some(f)) = (req.body, &cb.request_body)
            && self.store.data().local_response.is_none()
        {
            let len = body.len().min(u32::MAX as usize) as u32;
            self.store.data_mut().data_buffer = Some(0);
            let called = self.call("proxy_on_request_body", f, (id, len, 1));
            self.store.data_mut().data_buffer = None;
            paused |= called? == 1;
        }
        self.store.data_mut().finished = true;
        self.finish(id)?;
        Ok(paused)
    }

    /// The outcome of the context [`Instance::http`] just ran, borrowed from the store.
    fn view(&self, has_body: bool, paused: bool) -> HttpView<'_> {
        let st = self.store.data();
        HttpView {
            headers: &st.maps[0],
            body: has_body.then_some(st.request_body.as_slice()),
            local_response: st.local_response.as_ref(),
            filter_state: &st.filter_state,
            route_cache_cleared: st.route_cache_cleared,
            paused: paused && st.local_response.is_none(),
            reset: st.reset_stream,
        }
    }

    fn tick(&mut self) -> Result<(), Error> {
        self.last_tick = Instant::now();
        let cb = Arc::clone(&self.cb);
        if let Some(f) = &cb.tick {
            self.arm();
            self.call("proxy_on_tick", f, ROOT_CONTEXT)?;
        }
        Ok(())
    }

    fn tick_due(&self, now: Instant) -> bool {
        let period = self.store.data().tick_period_ms;
        period > 0 && now.duration_since(self.last_tick) >= Duration::from_millis(u64::from(period))
    }
}

struct PoolState {
    idle: Vec<Instance>,
    live: usize,
    /// Callers blocked in `take`: `put` signals the condition variable only when there
    /// are some (a futex wake per request otherwise: a system call on the hot path).
    waiting: usize,
    faults: u32,
    retry_at: Option<Instant>,
}

pub(crate) struct PluginInner {
    host: Arc<HostInner>,
    pre: InstancePre<State>,
    shared: Arc<PluginShared>,
    pool: Mutex<PoolState>,
    freed: Condvar,
}

/// A loaded, configured plugin with a pool of ready instances. Share it as `Arc<Plugin>`.
pub struct Plugin {
    inner: Arc<PluginInner>,
    version: String,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.inner.shared.name)
            .field("root_id", &self.inner.shared.root_id)
            .field("version", &self.version)
            .finish()
    }
}

impl PluginInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn build(&self) -> Result<Instance, Error> {
        Instance::new(&self.host, &self.pre, &self.shared)
    }

    fn take(&self) -> Result<Instance, Error> {
        let mut pool = self.lock();
        // The clock is read only when the pool has no idle instance: the common case (an
        // idle instance) costs no clock read.
        let mut deadline = None;
        loop {
            if let Some(inst) = pool.idle.pop() {
                return Ok(inst);
            }
            let give_up =
                *deadline.get_or_insert_with(|| Instant::now() + self.host.config.acquire_timeout);
            if pool.live < self.host.config.max_instances {
                if let Some(at) = pool.retry_at {
                    let now = Instant::now();
                    if at > now {
                        return Err(Error::Unavailable(format!(
                            "rebuilding instances after {} faults in a row; next try in {:?}",
                            pool.faults,
                            at - now
                        )));
                    }
                }
                pool.live += 1;
                drop(pool);
                // Cold path: the pool was empty (warm-up too small for the load, or
                // instances lost to faults).
                tracing::debug!(plugin = %self.shared.name, "instantiating on demand");
                return self.build().inspect_err(|_| self.fault(None));
            }
            let now = Instant::now();
            if now >= give_up {
                return Err(Error::Unavailable(format!(
                    "all {} instances busy",
                    self.host.config.max_instances
                )));
            }
            pool.waiting += 1;
            pool = self
                .freed
                .wait_timeout(pool, give_up - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            pool.waiting -= 1;
        }
    }

    fn put(&self, inst: Instance) {
        let mut pool = self.lock();
        pool.faults = 0;
        pool.retry_at = None;
        pool.idle.push(inst);
        let waiting = pool.waiting > 0;
        drop(pool);
        if waiting {
            self.freed.notify_one();
        }
    }

    /// Drops a faulted instance (its guest state cannot be trusted: a trap leaves the SDK's
    /// context table borrowed) and rebuilds one, with backoff when faults repeat.
    fn fault(&self, inst: Option<Instance>) {
        drop(inst);
        let mut pool = self.lock();
        pool.live -= 1;
        pool.faults = pool.faults.saturating_add(1);
        let faults = pool.faults;
        if faults > FREE_REBUILDS {
            let backoff = Duration::from_millis(10)
                .saturating_mul(1 << (faults - FREE_REBUILDS).min(10))
                .min(MAX_BACKOFF);
            pool.retry_at = Some(Instant::now() + backoff);
            tracing::warn!(plugin = %self.shared.name, faults, ?backoff, "instance discarded; backing off");
            drop(pool);
            self.freed.notify_one();
            return;
        }
        pool.live += 1;
        drop(pool);
        match self.build() {
            Ok(inst) => {
                let mut pool = self.lock();
                pool.idle.push(inst);
            }
            Err(e) => {
                tracing::warn!(plugin = %self.shared.name, error = %e, "rebuilding instance failed");
                let mut pool = self.lock();
                pool.live -= 1;
                pool.faults = pool.faults.saturating_add(1);
                pool.retry_at = Some(Instant::now() + Duration::from_millis(10));
            }
        }
        self.freed.notify_one();
    }

    fn run<R>(&self, f: impl FnOnce(&mut Instance) -> Result<R, Error>) -> Result<R, Error> {
        let mut inst = self.take()?;
        match f(&mut inst) {
            Ok(r) => {
                self.put(inst);
                Ok(r)
            }
            Err(e) if e.is_guest_fault() => {
                tracing::warn!(plugin = %self.shared.name, error = %e, "guest fault; instance discarded");
                self.fault(Some(inst));
                Err(e)
            }
            Err(e) => {
                self.put(inst);
                Err(e)
            }
        }
    }
}

/// Fills the pool of a new plugin up to `warm` instances, unless requests already did or
/// the plugin was dropped meanwhile.
fn warm_up(plugin: &std::sync::Weak<PluginInner>, warm: usize) {
    loop {
        let Some(inner) = plugin.upgrade() else {
            return;
        };
        {
            let mut pool = inner.lock();
            if pool.live >= warm {
                return;
            }
            pool.live += 1;
        }
        match inner.build() {
            Ok(inst) => inner.put(inst),
            Err(e) => {
                tracing::warn!(plugin = %inner.shared.name, error = %e, "warming an instance failed");
                inner.lock().live -= 1;
                return;
            }
        }
    }
}

impl Plugin {
    pub(crate) fn new(
        host: Arc<HostInner>,
        pre: InstancePre<State>,
        spec: PluginSpec,
    ) -> Result<Plugin, Error> {
        let shared = Arc::new(PluginShared {
            vm_id: spec.name.clone(),
            name: spec.name,
            root_id: spec.root_id,
            plugin_config: spec.plugin_config,
            vm_config: spec.vm_config,
            metrics: Registry::default(),
            provider: spec.properties,
            host: host.shared.clone(),
            max_map_bytes: host.config.max_map_bytes,
            max_buffer_bytes: host.config.max_buffer_bytes,
        });
        let warm = host
            .config
            .warm_instances
            .clamp(1, host.config.max_instances.max(1));
        // One instance before returning: it proves the module configures (on_configure
        // returned true) and serves at once. The others are made on a background thread,
        // so the plugin is ready after one instantiate + configure, not `warm` of them.
        let idle = vec![Instance::new(&host, &pre, &shared)?];
        let plugin = Plugin {
            inner: Arc::new(PluginInner {
                host,
                pre,
                shared,
                pool: Mutex::new(PoolState {
                    live: idle.len(),
                    idle,
                    waiting: 0,
                    faults: 0,
                    retry_at: None,
                }),
                freed: Condvar::new(),
            }),
            version: spec.version,
        };
        if warm > 1 {
            let weak = Arc::downgrade(&plugin.inner);
            let spawned = std::thread::Builder::new()
                .name("proxy-wasm-warm".into())
                .spawn(move || warm_up(&weak, warm));
            if let Err(e) = spawned {
                // Not fatal: requests instantiate on demand instead.
                tracing::warn!(error = %e, "could not start the warm-up thread");
            }
        }
        Ok(plugin)
    }

    /// Makes the plugin's warm instances (`warm_instances`, at least 2) now, on this
    /// thread, and fails if one does not configure. A plugin is ready after its first
    /// instance ([`Host::load`](crate::Host::load)); a candidate about to replace a
    /// serving plugin ([`crate::PolicySlot::try_swap`]) must also show that it
    /// configures again: a module whose `on_configure` succeeded once only (it kept a
    /// mark in shared data) passed the gate, and every instance rebuilt after a fault then
    /// failed, deferring all mail.
    pub fn prove_instances(&self) -> Result<(), Error> {
        let inner = &self.inner;
        let want = inner
            .host
            .config
            .warm_instances
            .clamp(2, inner.host.config.max_instances.max(2));
        loop {
            {
                let mut pool = inner.lock();
                if pool.live >= want {
                    return Ok(());
                }
                pool.live += 1;
            }
            match inner.build() {
                Ok(inst) => inner.put(inst),
                Err(e) => {
                    inner.lock().live -= 1;
                    return Err(e);
                }
            }
        }
    }

    /// The version label from the [`PluginSpec`].
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The plugin configuration from the [`PluginSpec`] (what `proxy_on_configure` read):
    /// a host that must know what the module was configured with reads it here, from the
    /// same snapshot that answers.
    pub fn plugin_config(&self) -> &[u8] {
        &self.inner.shared.plugin_config
    }

    /// The plugin name (and VM id).
    pub fn name(&self) -> &str {
        &self.inner.shared.name
    }

    /// The root id.
    pub fn root_id(&self) -> &str {
        &self.inner.shared.root_id
    }

    /// Runs one HTTP request through a fresh HTTP context: context create, request
    /// headers, request body (if any, unless a local response was sent), log, done,
    /// delete. Never compiles or instantiates unless the pool ran dry.
    pub fn http_request(&self, req: &HttpRequest) -> Result<HttpOutcome, Error> {
        let headers: Vec<(&str, &[u8])> = req
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        let borrowed = HttpRequestRef {
            headers: &headers,
            body: req.body.as_deref(),
            connection: req.connection.as_ref(),
        };
        self.http_request_with(borrowed, |view| view.to_outcome())
    }

    /// [`Plugin::http_request`] without copies: the request is borrowed, and `read` sees
    /// the outcome in place (headers, local response...) while the instance is still
    /// held, then the instance goes back to the pool. Header storage is reused from one
    /// request to the next, so a warm call allocates nothing on the host side.
    pub fn http_request_with<R>(
        &self,
        req: HttpRequestRef<'_>,
        read: impl FnOnce(&HttpView<'_>) -> R,
    ) -> Result<R, Error> {
        self.inner.run(|inst| {
            let paused = inst.http(req)?;
            let r = read(&inst.view(req.body.is_some(), paused));
            // Idle instances hold no request data (a tick reading `request.*`
            // properties sees none); the entries stay allocated for the next request.
            inst.store.data_mut().reset_context();
            Ok(r)
        })
    }

    /// Opens a stream context (`proxy_on_new_connection`). The stream holds one instance
    /// until it is closed or dropped.
    pub fn stream(&self, conn: ConnectionInfo) -> Result<Stream, Error> {
        let mut inst = self.inner.take()?;
        let opened = (|| {
            inst.arm();
            let st = inst.store.data_mut();
            st.reset_context();
            st.conn = Some(conn);
            let id = inst.context_id();
            let cb = Arc::clone(&inst.cb);
            inst.call(
                "proxy_on_context_create",
                &cb.context_create,
                (id, ROOT_CONTEXT),
            )?;
            let action = match &cb.new_connection {
                Some(f) => Action::from_raw(inst.call("proxy_on_new_connection", f, id)?),
                None => Action::Continue,
            };
            Ok::<_, Error>((id, action))
        })();
        match opened {
            Ok((id, action)) => Ok(Stream {
                plugin: self.inner.clone(),
                inst: Some(inst),
                id,
                action,
            }),
            Err(e) => {
                self.inner.fault(Some(inst));
                Err(e)
            }
        }
    }

    /// Snapshot of the metrics the guest defined.
    pub fn metrics(&self) -> Vec<Metric> {
        self.inner.shared.metrics.snapshot()
    }

    /// The tick period the guest asked for (`proxy_set_tick_period_milliseconds`) on its
    /// most recently configured idle instance, if any.
    pub fn tick_period(&self) -> Option<Duration> {
        let pool = self.inner.lock();
        pool.idle
            .iter()
            .map(|i| i.store.data().tick_period_ms)
            .find(|&p| p > 0)
            .map(|p| Duration::from_millis(u64::from(p)))
    }

    /// Calls `proxy_on_tick` on every idle instance whose tick period has elapsed; call
    /// it from a timer (e.g. every [`Plugin::tick_period`]). Returns how many ticked.
    /// Each instance has its own root context, as each Envoy worker has its own VM.
    pub fn tick(&self) -> Result<usize, Error> {
        let mut ticked = 0;
        let mut seen = 0;
        loop {
            let now = Instant::now();
            let mut pool = self.inner.lock();
            let Some(pos) = pool.idle.iter().position(|i| i.tick_due(now)) else {
                break;
            };
            let mut inst = pool.idle.swap_remove(pos);
            drop(pool);
            seen += 1;
            match inst.tick() {
                Ok(()) => {
                    ticked += 1;
                    self.inner.put(inst);
                }
                Err(e) => {
                    self.inner.fault(Some(inst));
                    return Err(e);
                }
            }
            if seen > self.inner.host.config.max_instances {
                break;
            }
        }
        Ok(ticked)
    }
}

/// A stream context (network filter) bound to one instance until closed.
pub struct Stream {
    plugin: Arc<PluginInner>,
    inst: Option<Instance>,
    id: u32,
    action: Action,
}

impl Stream {
    /// What `proxy_on_new_connection` answered.
    pub fn new_connection_action(&self) -> Action {
        self.action
    }

    /// `set_envoy_filter_state` calls made so far on this stream: (path, value).
    pub fn filter_state(&self) -> &[(String, Vec<u8>)] {
        self.inst
            .as_ref()
            .map(|i| i.store.data().filter_state.as_slice())
            .unwrap_or(&[])
    }

    fn data(&mut self, upstream: bool, data: &[u8], end: bool) -> Result<StreamOutput, Error> {
        let inst = self.inst.as_mut().ok_or(Error::StreamClosed)?;
        inst.arm();
        let st = inst.store.data_mut();
        st.close_downstream = false;
        st.close_upstream = false;
        let buf = if upstream {
            &mut st.upstream
        } else {
            &mut st.downstream
        };
        buf.clear();
        buf.extend_from_slice(data);
        let cb = Arc::clone(&inst.cb);
        let (f, name) = if upstream {
            (&cb.upstream_data, "proxy_on_upstream_data")
        } else {
            (&cb.downstream_data, "proxy_on_downstream_data")
        };
        let len = data.len().min(u32::MAX as usize) as u32;
        inst.store.data_mut().data_buffer = Some(if upstream { 3 } else { 2 });
        let called = f
            .as_ref()
            .map(|f| inst.call(name, f, (self.id, len, u32::from(end))));
        inst.store.data_mut().data_buffer = None;
        let action = match called {
            Some(called) => match called {
                Ok(a) => Action::from_raw(a),
                Err(e) => {
                    self.plugin.fault(self.inst.take());
                    return Err(e);
                }
            },
            None => Action::Continue,
        };
        let st = inst.store.data_mut();
        let buf = if upstream {
            &mut st.upstream
        } else {
            &mut st.downstream
        };
        Ok(StreamOutput {
            data: std::mem::take(buf),
            action,
            close_downstream: st.close_downstream,
            close_upstream: st.close_upstream,
        })
    }

    /// Bytes from the client: `proxy_on_downstream_data`. Returns what to send upstream.
    pub fn downstream(&mut self, data: &[u8], end_of_stream: bool) -> Result<StreamOutput, Error> {
        self.data(false, data, end_of_stream)
    }

    /// Bytes from the server: `proxy_on_upstream_data`. Returns what to send to the client.
    pub fn upstream(&mut self, data: &[u8], end_of_stream: bool) -> Result<StreamOutput, Error> {
        self.data(true, data, end_of_stream)
    }

    /// Ends the stream: downstream close, upstream close, log, done, delete; the instance
    /// goes back to the pool.
    pub fn close(mut self) -> Result<(), Error> {
        self.close_inner()
    }

    fn close_inner(&mut self) -> Result<(), Error> {
        let Some(mut inst) = self.inst.take() else {
            return Ok(());
        };
        inst.arm();
        let id = self.id;
        let cb = Arc::clone(&inst.cb);
        let r = (|| {
            if let Some(f) = &cb.downstream_close {
                inst.call("proxy_on_downstream_connection_close", f, (id, 1))?;
            }
            if let Some(f) = &cb.upstream_close {
                inst.call("proxy_on_upstream_connection_close", f, (id, 2))?;
            }
            inst.finish(id)
        })();
        match r {
            Ok(()) => {
                inst.store.data_mut().reset_context();
                self.plugin.put(inst);
                Ok(())
            }
            Err(e) => {
                self.plugin.fault(Some(inst));
                Err(e)
            }
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Err(e) = self.close_inner() {
            tracing::warn!(error = %e, "closing stream on drop failed");
        }
    }
}
