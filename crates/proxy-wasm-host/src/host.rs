//! [`Host`]: the Wasmtime engine, the linker with the ABI, the module cache and the epoch
//! ticker.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use wasmtime::{Config, Engine, InstancePre, Linker, Module};

use crate::abi::{self, HostShared, State};
use crate::error::Error;
use crate::plugin::{Plugin, PluginSpec};
use crate::wasi;

/// Sandbox and pool settings. `HostConfig::default()` states every default.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Wall-clock budget of one embedder call (one HTTP request through all its callbacks,
    /// one stream event, a tick). Enforced with Wasmtime epochs. Defaults to 100 ms.
    pub deadline: Duration,
    /// Wall-clock budget of making an instance ready: instantiate, `_initialize`, the root
    /// context, `on_vm_start` and `on_configure`. Off the request path, and a module may
    /// parse a large configuration there (a policy of 100,000 patterns takes about 80 ms in
    /// the standard module; Envoy sets no limit on it). Never shorter than `deadline`.
    /// Defaults to 1 s.
    pub load_deadline: Duration,
    /// Period of the epoch ticker thread; the deadline is enforced to about one period.
    /// Defaults to 5 ms.
    pub epoch_tick: Duration,
    /// Cap on one instance's linear memory, in bytes. Defaults to 64 MiB.
    pub memory_limit: usize,
    /// Cap on the elements of one table. Defaults to 100 000.
    pub table_limit: usize,
    /// Most instances of one plugin (idle + busy). Defaults to 64.
    pub max_instances: usize,
    /// Instances kept ready (instantiated and configured) when a plugin is loaded, so
    /// that requests never instantiate. [`Host::load`] makes the first one itself and
    /// returns; the others are made on a background thread (a request that finds none
    /// idle meanwhile instantiates one). Defaults to the number of CPUs (at least 2).
    pub warm_instances: usize,
    /// How long a call waits for a free instance when all `max_instances` are busy.
    /// Defaults to 100 ms.
    pub acquire_timeout: Duration,
    /// Directory for compiled artifacts (`<BLAKE3 of the module>-<engine key>.cwasm`,
    /// made with `Module::serialize`, mapped back with `Module::deserialize_file`). `None`
    /// (the default) caches in memory only. The host runs the native code in these files
    /// as it finds them: the directory must be writable only by the embedder, and a file
    /// in it must never be edited in place (replace it by rename, or delete it).
    /// A file or directory that is a symlink, belongs to another user or is writable by
    /// group or others is not mapped (the module is compiled instead, with a warning).
    pub cache_dir: Option<PathBuf>,
    /// Give modules that import WASI a locked-down preview1 (no files, sockets,
    /// environment). Defaults to false: such modules are refused at load.
    pub allow_wasi: bool,
    /// Cap on one header map, on the properties set in one context and on the filter
    /// state (`set_envoy_filter_state`) of one context: the sum of key and value lengths,
    /// plus 48 bytes per header or filter state entry for what the host keeps for it (so
    /// that empty entries are not free). Defaults to 1 MiB.
    pub max_map_bytes: usize,
    /// Cap on one buffer the guest writes (body, stream data, local response, shared
    /// data value, queue item). Defaults to 16 MiB.
    pub max_buffer_bytes: usize,
    /// Cap on what shared data and shared queues hold, for all plugins on the host
    /// together: keys, values and queued items, plus the host's own bytes per entry (80
    /// per shared data entry, 24 per queued item). Past it, a `proxy_set_shared_data`
    /// that would grow the store answers CAS_MISMATCH (the only refusal the Rust SDK does
    /// not panic on) and a queue drops its oldest items, then the new one. Defaults to
    /// 64 MiB.
    pub max_shared_bytes: usize,
}

impl Default for HostConfig {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        HostConfig {
            deadline: Duration::from_millis(100),
            load_deadline: Duration::from_secs(1),
            epoch_tick: Duration::from_millis(5),
            memory_limit: 64 << 20,
            table_limit: 100_000,
            max_instances: 64,
            warm_instances: cpus.max(2),
            acquire_timeout: Duration::from_millis(100),
            cache_dir: None,
            allow_wasi: false,
            max_map_bytes: 1 << 20,
            max_buffer_bytes: 16 << 20,
            max_shared_bytes: 64 << 20,
        }
    }
}

/// Owns the engine and what all plugins share. Cheap to clone.
#[derive(Clone)]
pub struct Host {
    pub(crate) inner: Arc<HostInner>,
}

pub(crate) struct HostInner {
    pub engine: Engine,
    linker: Linker<State>,
    pub config: HostConfig,
    /// Modules by BLAKE3 hash of their bytes: linked, or compiled and refused.
    modules: Mutex<HashMap<[u8; 32], Prepared>>,
    /// The hash of each module allocation loaded while it is alive: loading the same
    /// `Arc` again (a new policy for the same module, the relay's usual reload) finds its
    /// hash here instead of hashing the module again. An entry whose allocation was
    /// dropped is removed at the next load (until then its `Weak` keeps the memory).
    hashed: Mutex<Vec<HashedModule>>,
    pub shared: Arc<HostShared>,
    stop: Arc<AtomicBool>,
    /// The engine's epoch as the ticker thread counts it. Wasmtime checks a deadline only
    /// in guest code (at function entry and loop back-edges); host functions compare
    /// this with the call's deadline ([`crate::abi::State::over_deadline`]), so a module
    /// that spends its time in host calls without a loop is stopped too.
    pub epoch: Arc<AtomicU64>,
    /// Epoch ticks that make up one deadline...
    pub deadline_ticks: u64,
    /// ...and the load deadline.
    pub load_deadline_ticks: u64,
    /// Identifies the engine settings in artifact file names.
    engine_key: u64,
}

/// A module allocation and the BLAKE3 hash of its bytes.
type HashedModule = (Weak<[u8]>, [u8; 32]);

/// A module in the host's memory: linked once it passed the checks; compiled only when it
/// did not (loaded again, it is refused again without a compile).
#[derive(Clone)]
enum Prepared {
    Linked(InstancePre<State>),
    Refused(Module),
}

impl Drop for HostInner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Host {
    /// Builds the engine and starts the epoch ticker thread (stopped when the host and
    /// every plugin are dropped).
    pub fn new(config: HostConfig) -> Result<Host, Error> {
        let mut wc = Config::new();
        wc.epoch_interruption(true);
        // No `.eh_frame` for the guest's code: registering it with the system unwinder is
        // part of every artifact load, and without it a plugin was ready sooner (median of
        // eight alternated runs of 60 loads each: 0.90 against 0.97 ms; BENCHMARKS.md,
        // decision latency). Wasmtime's own traps and wasm backtraces do not use it (they
        // walk frame pointers), and a panic in a host function is caught at the host
        // call, so nothing unwinds through guest frames. What is lost: native backtraces
        // (a debugger's, `perf --call-graph=dwarf`) stop at guest frames.
        wc.native_unwind_info(false);
        // Profiling aid: with PROXY_WASM_PERFMAP set, Wasmtime writes /tmp/perf-<pid>.map
        // so that `perf report` names guest functions (how docs/proxy-wasm-host.md's
        // profile was taken). Off by default.
        if std::env::var_os("PROXY_WASM_PERFMAP").is_some() {
            wc.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        if let Some(dir) = &config.cache_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Engine(format!("cache dir {}: {e}", dir.display())))?;
        }
        let engine = Engine::new(&wc).map_err(|e| Error::Engine(e.to_string()))?;
        // Artifacts are only valid for the engine settings and Wasmtime build that made
        // them: that goes into the file name (Wasmtime also checks on load).
        let engine_key = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut h);
            h.finish()
        };
        let mut linker = Linker::new(&engine);
        abi::define(&mut linker).map_err(|e| Error::Engine(e.to_string()))?;
        let tick = config.epoch_tick.max(Duration::from_millis(1));
        let ticks = |d: Duration| d.as_nanos().div_ceil(tick.as_nanos()) as u64 + 1;
        let (deadline_ticks, load_deadline_ticks) = (
            ticks(config.deadline),
            ticks(config.load_deadline.max(config.deadline)),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let epoch = Arc::new(AtomicU64::new(0));
        {
            let engine = engine.clone();
            let stop = stop.clone();
            let epoch = epoch.clone();
            std::thread::Builder::new()
                .name("proxy-wasm-epoch".into())
                .spawn(move || {
                    // The epoch follows the clock, not the number of wake-ups: on a busy
                    // machine a sleep of one tick can take several, and a deadline counted
                    // in wake-ups let a guest run twice its time (a 1.2 s loop passed a
                    // 600 ms load deadline under the full test suite's load).
                    let start = std::time::Instant::now();
                    let mut ticked: u128 = 0;
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        let due = start.elapsed().as_nanos() / tick.as_nanos();
                        while ticked < due {
                            engine.increment_epoch();
                            epoch.fetch_add(1, Ordering::Relaxed);
                            ticked += 1;
                        }
                    }
                })
                .map_err(|e| Error::Engine(format!("epoch thread: {e}")))?;
        }
        let shared = Arc::new(HostShared::new(config.max_shared_bytes));
        Ok(Host {
            inner: Arc::new(HostInner {
                engine,
                linker,
                config,
                modules: Mutex::new(HashMap::new()),
                hashed: Mutex::new(Vec::new()),
                shared,
                stop,
                epoch,
                deadline_ticks,
                load_deadline_ticks,
                engine_key,
            }),
        })
    }

    /// The settings this host runs with.
    pub fn config(&self) -> &HostConfig {
        &self.inner.config
    }

    /// Compiles (or finds in the cache), links, instantiates and configures a plugin, and
    /// fills its pool with [`HostConfig::warm_instances`] ready instances.
    pub fn load(&self, spec: PluginSpec) -> Result<Arc<Plugin>, Error> {
        let pre = self.inner.prepare(&spec.module)?;
        Plugin::new(self.inner.clone(), pre, spec).map(Arc::new)
    }
}

impl HostInner {
    /// The BLAKE3 hash of `bytes` (not SHA-256: for a 400 KB module SHA-256 took 0.3 ms
    /// of the 1 ms a plugin may take to be ready): 0.05–0.07 ms for the 460 KB policy
    /// module on this machine, about a sixth of a reload on a running host (BENCHMARKS.md,
    /// decision latency), so an allocation already hashed is not hashed again. A live `Weak` at
    /// the same address is the same allocation, and its bytes cannot have changed:
    /// `Arc::get_mut` refuses while a `Weak` exists.
    fn hash_of(&self, bytes: &Arc<[u8]>) -> [u8; 32] {
        let same = |w: &Weak<[u8]>| std::ptr::eq(w.as_ptr(), Arc::as_ptr(bytes));
        {
            let mut hashed = self.hashed.lock().unwrap_or_else(|e| e.into_inner());
            hashed.retain(|(w, _)| w.strong_count() > 0);
            if let Some((_, hash)) = hashed.iter().find(|(w, _)| same(w)) {
                return *hash;
            }
        }
        // Hashing outside the lock: other loads are not held up.
        let hash: [u8; 32] = blake3::hash(bytes).into();
        self.hashed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((Arc::downgrade(bytes), hash));
        hash
    }

    /// The module with this hash from the on-disk artifact cache, or compiled (and then
    /// stored there).
    fn compile(&self, hash: &[u8; 32], bytes: &[u8]) -> Result<Module, Error> {
        Ok(match self.artifact_path(hash) {
            Some(path) => match self.load_artifact(&path) {
                Some(m) => m,
                None => {
                    let m = self.compile_bytes(bytes)?;
                    self.store_artifact(&m, &path);
                    m
                }
            },
            None => self.compile_bytes(bytes)?,
        })
    }

    fn compile_bytes(&self, bytes: &[u8]) -> Result<Module, Error> {
        Module::new(&self.engine, bytes).map_err(|e| Error::Compile(format!("{e:#}")))
    }

    /// `<cache_dir>/<BLAKE3 of the module>-<engine key>.cwasm`.
    fn artifact_path(&self, hash: &[u8; 32]) -> Option<PathBuf> {
        let dir = self.config.cache_dir.as_ref()?;
        let mut name = String::with_capacity(64 + 22);
        for b in hash {
            name.push_str(&format!("{b:02x}"));
        }
        name.push_str(&format!("-{:016x}.cwasm", self.engine_key));
        Some(dir.join(name))
    }

    /// Maps a compiled artifact from the cache; `None` (compile instead) if it is absent
    /// or Wasmtime refuses it.
    fn load_artifact(&self, path: &Path) -> Option<Module> {
        if !path.exists() {
            return None;
        }
        if let Err(why) = artifact_is_private(path) {
            tracing::warn!(path = %path.display(), why, "cached artifact not trusted; compiling");
            return None;
        }
        // SAFETY: `Module::deserialize_file` maps the file and runs the native code in it
        // without verifying it. The file is one this host wrote with `Module::serialize`
        // (named by the BLAKE3 hash of the module and the engine settings, written to a
        // temporary name and renamed into place, so never seen half-written and never
        // changed in place); Wasmtime checks its header and engine compatibility. The
        // cache directory must be writable only by the embedder, and files in it must be
        // replaced by rename, never edited in place (a mapped file truncated under a
        // running host faults it): documented on `HostConfig::cache_dir`. Mapping rather
        // than reading and copying: 0.2 ms instead of 1.2 ms for the policy module here.
        #[allow(unsafe_code)]
        let loaded = unsafe { Module::deserialize_file(&self.engine, path) };
        match loaded {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cached artifact refused; compiling");
                None
            }
        }
    }

    /// Writes `module`'s artifact (best effort: a failure only costs a compile later).
    fn store_artifact(&self, module: &Module, path: &Path) {
        let write = || -> std::io::Result<()> {
            let bytes = module.serialize().map_err(std::io::Error::other)?;
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %path.display(), error = %e, "writing the compiled artifact failed");
        }
    }

    /// The module compiled, its imports and exports checked, and linked: once per module
    /// content on this host.
    pub(crate) fn prepare(&self, bytes: &Arc<[u8]>) -> Result<InstancePre<State>, Error> {
        let hash = self.hash_of(bytes);
        let known = self
            .modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&hash)
            .cloned();
        let module = match known {
            Some(Prepared::Linked(pre)) => return Ok(pre),
            Some(Prepared::Refused(module)) => module,
            // Compiling outside the lock: other loads and the request path are not blocked.
            None => self.compile(&hash, bytes)?,
        };
        let linked = self.link(module.clone());
        let prepared = match &linked {
            Ok(pre) => Prepared::Linked(pre.clone()),
            Err(_) => Prepared::Refused(module),
        };
        self.modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hash, prepared);
        linked
    }

    /// Checks what `module` imports and exports, and links it.
    fn link(&self, module: Module) -> Result<InstancePre<State>, Error> {
        let mut problems = Vec::new();
        let mut wants_wasi = Vec::new();
        for import in module.imports() {
            match import.module() {
                "env" if abi::ABI_FUNCTIONS.contains(&import.name()) => {}
                wasi::MODULE => wants_wasi.push(import.name().to_string()),
                m => problems.push(format!("{m}.{}", import.name())),
            }
        }
        if !problems.is_empty() {
            return Err(Error::Link(format!(
                "module imports functions this proxy-wasm 0.2.1 host does not provide: {}",
                problems.join(", ")
            )));
        }
        let exports: Vec<&str> = module.exports().map(|e| e.name()).collect();
        if !exports
            .iter()
            .any(|e| e.starts_with("proxy_abi_version_0_2_"))
        {
            return Err(Error::Link(
                "module exports no proxy_abi_version_0_2_x: not a proxy-wasm 0.2 module".into(),
            ));
        }
        if !exports.contains(&"memory") {
            return Err(Error::Link("module exports no memory".into()));
        }
        if !exports
            .iter()
            .any(|e| *e == "malloc" || *e == "proxy_on_memory_allocate")
        {
            return Err(Error::Link(
                "module exports neither proxy_on_memory_allocate nor malloc".into(),
            ));
        }
        let linker = if wants_wasi.is_empty() {
            std::borrow::Cow::Borrowed(&self.linker)
        } else if !self.config.allow_wasi {
            return Err(Error::Link(format!(
                "module imports WASI ({}); WASI is disabled (HostConfig::allow_wasi = false): \
                 build the module for wasm32-unknown-unknown",
                wants_wasi.join(", ")
            )));
        } else {
            let mut l = self.linker.clone();
            wasi::define(&mut l, &module).map_err(|e| Error::Link(format!("{e:#}")))?;
            std::borrow::Cow::Owned(l)
        };
        linker
            .instantiate_pre(&module)
            .map_err(|e| Error::Link(format!("{e:#}")))
    }
}

/// The artifact and its directory must belong to this process's user and be writable by
/// nobody else: native code is mapped from it without verification.
#[cfg(unix)]
fn artifact_is_private(path: &Path) -> Result<(), &'static str> {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    let check = |p: &Path| -> Result<(), &'static str> {
        let m = std::fs::symlink_metadata(p).map_err(|_| "cannot stat")?;
        if m.file_type().is_symlink() {
            return Err("is a symlink");
        }
        if me.is_some_and(|uid| uid != m.uid()) {
            return Err("owned by another user");
        }
        if m.mode() & 0o022 != 0 {
            return Err("writable by group or others");
        }
        Ok(())
    };
    check(path)?;
    match path.parent() {
        Some(dir) => check(dir),
        None => Ok(()),
    }
}

#[cfg(not(unix))]
fn artifact_is_private(_path: &Path) -> Result<(), &'static str> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash of a module allocation is remembered while the allocation lives, and
    /// never taken for another allocation's, even one at the same address.
    #[test]
    fn a_module_allocation_is_hashed_once_and_never_mistaken_for_another() {
        let host = Host::new(HostConfig::default()).expect("host");
        let inner = &host.inner;
        let entries = || inner.hashed.lock().expect("not poisoned").len();

        let a: Arc<[u8]> = vec![1u8; 4096].into();
        let hash_a = inner.hash_of(&a);
        assert_eq!(hash_a, *blake3::hash(&a).as_bytes());
        // Again, and through a clone of the `Arc`: found, not hashed and added again.
        assert_eq!(inner.hash_of(&a.clone()), hash_a);
        assert_eq!(entries(), 1);
        // Equal bytes in another allocation: hashed on their own, same hash.
        let a2: Arc<[u8]> = vec![1u8; 4096].into();
        assert_eq!(inner.hash_of(&a2), hash_a);
        assert_eq!(entries(), 2);

        // Dropped allocations are forgotten; new bytes of the same size, which the
        // allocator may well place at a freed address, get their own hash.
        let freed = Arc::as_ptr(&a) as *const u8 as usize;
        drop(a);
        drop(a2);
        let mut reused = false;
        for i in 0..64u8 {
            let b: Arc<[u8]> = vec![i.wrapping_add(2); 4096].into();
            reused |= Arc::as_ptr(&b) as *const u8 as usize == freed;
            assert_eq!(inner.hash_of(&b), *blake3::hash(&b).as_bytes(), "round {i}");
            assert_eq!(entries(), 1, "round {i}: only the live allocation is kept");
        }
        // Not required for the checks above, but it shows they met the case they are for.
        eprintln!("a freed address was reused: {reused}");
    }
}
