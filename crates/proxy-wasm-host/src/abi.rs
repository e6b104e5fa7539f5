//! The `env.proxy_*` host functions and the per-instance state they work on.
//!
//! Every pointer the guest hands over is bounds-checked; every size is a u32 (wasm32) and
//! clamped. Memory handed to the guest comes from its own allocator (`proxy_on_memory_allocate`,
//! else `malloc`), which re-enters the guest and may grow memory, so the memory view is
//! taken again after each allocation.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Linker, Memory, ResourceLimiter, TypedFunc};

use crate::error::HostAbort;
use crate::metrics::{BAD_ARGUMENT, NOT_FOUND, OK, Registry};
use crate::properties::{ConnectionInfo, PropertyProvider, builtin};

const EMPTY: u32 = 7;
const CAS_MISMATCH: u32 = 8;
const INTERNAL_FAILURE: u32 = 10;

/// Longest log line kept; longer ones are truncated (not an error).
const MAX_LOG_BYTES: usize = 64 * 1024;
/// Most properties a guest may set in one context.
const MAX_SET_PROPERTIES: usize = 1024;
/// Most shared data entries per host, and most queued items per queue.
const MAX_SHARED_ENTRIES: usize = 100_000;
const MAX_QUEUE_ITEMS: usize = 10_000;
/// Most queues one VM id may register, and the longest queue name. Registering cannot
/// fail in the SDKs (the Rust SDK panics on any status but OK), so going past these ends
/// the call with `Error::Limit`; they are per VM id so that no plugin can use them up
/// for another.
const MAX_QUEUES_PER_VM: usize = 1024;
const MAX_QUEUE_NAME_BYTES: usize = 1024;
/// What a header or filter state entry costs the host besides its key and value bytes:
/// the `(String, Vec<u8>)` in the map (48 bytes on 64-bit targets). Counted in the
/// `max_map_bytes` limits so that entries with an empty key and value are not free.
pub(crate) const ENTRY_OVERHEAD: usize = std::mem::size_of::<(String, Vec<u8>)>();
/// The same for a shared data entry (its key with the VM id, value and CAS) and a queued
/// item, counted in `max_shared_bytes` besides their bytes.
const SHARED_ENTRY_OVERHEAD: usize =
    std::mem::size_of::<SharedKey>() + std::mem::size_of::<(Vec<u8>, u32)>();
const QUEUE_ITEM_OVERHEAD: usize = std::mem::size_of::<Vec<u8>>();
/// Most spare header entries an instance keeps for reuse.
const MAX_SPARE: usize = 256;
/// Largest allocation (key and value capacity) a spare entry may keep: a header map's
/// limit counts lengths, and a guest that set 256 values to 900 KB and then to "" had the
/// host keep 230 MB per instance for reuse.
const MAX_SPARE_ENTRY: usize = 4096;
/// What a buffer (request body, stream data) keeps of its allocation between contexts.
const KEEP_BUFFER: usize = 64 << 10;

/// Most bytes of guest log lines per context (a request, a stream, or the load).
const MAX_LOG_PER_CONTEXT: usize = 256 << 10;

/// A guest's log line with its control characters escaped (`\n` as `\u{a}`): a line
/// break in a message made a line of its own in the relay's log, and an audit's module
/// forged an `altroute::decision` line so.
fn printable(msg: &str) -> std::borrow::Cow<'_, str> {
    if !msg.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(msg);
    }
    let mut out = String::with_capacity(msg.len() + 8);
    for c in msg.chars() {
        if c.is_control() {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Header map type numbers of the ABI.
const MAP_RESPONSE_TRAILERS: u32 = 3;
/// The highest log level of the ABI (critical).
const LOG_CRITICAL: u32 = 5;

pub(crate) type HeaderMap = Vec<(String, Vec<u8>)>;

/// (VM id, key) of a shared data entry or queue name.
type SharedKey = (String, Vec<u8>);

/// Host-wide state shared by all plugins: shared data and queues (namespaced by VM id).
pub(crate) struct HostShared {
    store: Mutex<SharedStore>,
    /// `HostConfig::max_shared_bytes`.
    max_bytes: usize,
}

impl HostShared {
    pub(crate) fn new(max_bytes: usize) -> HostShared {
        HostShared {
            store: Mutex::new(SharedStore::default()),
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SharedStore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct SharedStore {
    data: HashMap<SharedKey, (Vec<u8>, u32)>,
    queues: Queues,
    /// What `data` and the queued items hold: their bytes plus the per-entry overheads.
    /// Kept up to date by every set, enqueue and dequeue (never summed).
    bytes: usize,
}

#[derive(Default)]
struct Queues {
    by_name: HashMap<SharedKey, u32>,
    items: HashMap<u32, VecDeque<Vec<u8>>>,
    next: u32,
}

/// What every instance of one plugin shares.
pub(crate) struct PluginShared {
    pub name: String,
    pub root_id: String,
    pub vm_id: String,
    pub plugin_config: Vec<u8>,
    pub vm_config: Vec<u8>,
    pub metrics: Registry,
    pub provider: Option<Arc<dyn PropertyProvider>>,
    pub host: Arc<HostShared>,
    pub max_map_bytes: usize,
    pub max_buffer_bytes: usize,
}

/// A local response the guest asked for (`proxy_send_local_response`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    /// HTTP status code.
    pub status: u32,
    /// Response body.
    pub body: Vec<u8>,
    /// Response headers, keys lower-cased.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The `details` string (Envoy's response code details).
    pub details: String,
}

/// Limits the guest's memory and tables; remembers that a limit was hit so the caller
/// gets [`Error::MemoryLimit`](crate::Error::MemoryLimit) even if the guest survives a
/// failed `memory.grow`.
pub(crate) struct Limiter {
    pub memory_cap: usize,
    pub table_cap: usize,
    pub hit: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table_cap {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }

    fn memories(&self) -> usize {
        1
    }
}

/// Per-instance state (the wasmtime store data).
pub(crate) struct State {
    pub plugin: Arc<PluginShared>,
    /// The host's count of epoch ticks ([`crate::host::HostInner::epoch`])...
    pub epoch: Arc<AtomicU64>,
    /// ...and the tick at which the running call is over its deadline (set with the
    /// store's own epoch deadline).
    pub deadline_epoch: u64,
    /// Bytes of log lines in the current context ([`MAX_LOG_PER_CONTEXT`]).
    pub log_bytes: usize,
    pub memory: Option<Memory>,
    /// The guest allocator. Host functions take it out for the call (they cannot borrow
    /// it from the store while calling it) and put it back.
    pub alloc: Option<TypedFunc<u32, u32>>,
    pub limiter: Limiter,
    /// Header maps 0..=3: request headers, request trailers, response headers, response trailers.
    pub maps: [HeaderMap; 4],
    pub request_body: Vec<u8>,
    /// The data buffer of the callback running (`0` request body in
    /// `proxy_on_request_body`, `2`/`3` in `proxy_on_downstream_data`/`_upstream_data`):
    /// as in Envoy, only that one is read (others read empty) and written (others are
    /// BAD_ARGUMENT). A module once read the request body in `on_request_headers`.
    pub data_buffer: Option<u32>,
    /// `on_request_headers` let the headers go on (Continue): as in Envoy, the request
    /// headers (map 0 and the `request.*` properties) are gone for later callbacks.
    pub headers_gone: bool,
    /// The context is ending (`on_log`, `on_done`, `on_delete`): as in Envoy, nothing can
    /// change the request any more (header writes BAD_ARGUMENT, a local response dropped,
    /// filter state NOT_FOUND). An audit's `on_done` turned a request that had gone on
    /// into a local response.
    pub finished: bool,
    pub downstream: Vec<u8>,
    pub upstream: Vec<u8>,
    pub local_response: Option<LocalResponse>,
    pub filter_state: Vec<(String, Vec<u8>)>,
    /// What `filter_state` holds (paths, values and [`ENTRY_OVERHEAD`] each), kept up to
    /// date by each `set_envoy_filter_state`: capped at `max_map_bytes` per context.
    pub filter_state_bytes: usize,
    pub route_cache_cleared: bool,
    pub set_properties: Vec<(Vec<u8>, Vec<u8>)>,
    pub conn: Option<ConnectionInfo>,
    pub in_http: bool,
    pub tick_period_ms: u32,
    pub close_downstream: bool,
    pub close_upstream: bool,
    /// `proxy_close_stream` on the request or response of an HTTP context.
    pub reset_stream: bool,
    pub effective_context: u32,
    /// Header entries of finished contexts, kept for reuse: filling a map (request
    /// headers in, headers the guest adds) then reuses their allocations instead of
    /// allocating a key and a value per header on every request.
    pub spare: Vec<(String, Vec<u8>)>,
    /// The byte size of each header map (keys, values and [`ENTRY_OVERHEAD`] per entry)
    /// when known: set when the embedder fills the request map, kept up to date by add
    /// and remove, summed again after a replace or a set of all pairs, and forgotten
    /// (`None`) when the map is recycled. A module adds its decision headers one by one;
    /// summing the whole map after each add cost more than the add itself. Debug builds
    /// check it against the full sum on every add.
    pub map_bytes_known: [Option<usize>; 4],
}

impl State {
    pub(crate) fn new(
        plugin: Arc<PluginShared>,
        epoch: Arc<AtomicU64>,
        memory_cap: usize,
        table_cap: usize,
    ) -> State {
        State {
            plugin,
            epoch,
            deadline_epoch: u64::MAX,
            log_bytes: 0,
            memory: None,
            alloc: None,
            limiter: Limiter {
                memory_cap,
                table_cap,
                hit: false,
            },
            maps: Default::default(),
            request_body: Vec::new(),
            data_buffer: None,
            headers_gone: false,
            finished: false,
            downstream: Vec::new(),
            upstream: Vec::new(),
            local_response: None,
            filter_state: Vec::new(),
            filter_state_bytes: 0,
            route_cache_cleared: false,
            set_properties: Vec::new(),
            conn: None,
            in_http: false,
            tick_period_ms: 0,
            close_downstream: false,
            close_upstream: false,
            reset_stream: false,
            effective_context: 0,
            spare: Vec::new(),
            map_bytes_known: [None; 4],
        }
    }

    /// A header entry holding `key` (ASCII lower-cased, as Envoy stores names) and
    /// `value`, reusing a spare entry's allocations when there is one.
    pub(crate) fn entry(&mut self, key: &[u8], value: &[u8]) -> (String, Vec<u8>) {
        let (mut k, mut v) = self.spare.pop().unwrap_or_default();
        k.clear();
        match std::str::from_utf8(key) {
            Ok(key) => k.push_str(key),
            Err(_) => k.push_str(&String::from_utf8_lossy(key)),
        }
        k.make_ascii_lowercase();
        v.clear();
        v.extend_from_slice(value);
        (k, v)
    }

    /// [`State::entry`] for a key that is already text (the embedder's headers).
    pub(crate) fn entry_str(&mut self, key: &str, value: &[u8]) -> (String, Vec<u8>) {
        let (mut k, mut v) = self.spare.pop().unwrap_or_default();
        k.clear();
        k.push_str(key);
        k.make_ascii_lowercase();
        v.clear();
        v.extend_from_slice(value);
        (k, v)
    }

    /// Keeps a header entry for reuse, unless there are enough or it holds a large
    /// allocation ([`MAX_SPARE`], [`MAX_SPARE_ENTRY`]): what the host keeps for a guest
    /// stays bounded whatever the guest did with its maps.
    pub(crate) fn keep_spare(&mut self, e: (String, Vec<u8>)) {
        if self.spare.len() < MAX_SPARE && e.0.capacity() + e.1.capacity() <= MAX_SPARE_ENTRY {
            self.spare.push(e);
        }
    }

    /// Empties map `i`, keeping its entries for reuse ([`State::keep_spare`]).
    pub(crate) fn recycle_map(&mut self, i: usize) {
        let mut map = std::mem::take(&mut self.maps[i]);
        for e in map.drain(..) {
            self.keep_spare(e);
        }
        // The map's own allocation: a guest that once built a huge map does not pin it.
        if map.capacity() <= MAX_SPARE {
            self.maps[i] = map;
        }
        self.map_bytes_known[i] = None;
    }

    /// Arms the deadline of a call: `ticks` epoch ticks from now, as
    /// `Store::set_epoch_deadline` counts them.
    pub(crate) fn arm(&mut self, ticks: u64) {
        self.deadline_epoch = self.epoch.load(Ordering::Relaxed).saturating_add(ticks);
    }

    /// Whether the running call is past its deadline.
    pub(crate) fn over_deadline(&self) -> bool {
        self.epoch.load(Ordering::Relaxed) >= self.deadline_epoch
    }

    /// Forgets everything about the previous context; keeps the allocations for reuse.
    pub(crate) fn reset_context(&mut self) {
        for i in 0..self.maps.len() {
            self.recycle_map(i);
        }
        for buf in [
            &mut self.request_body,
            &mut self.downstream,
            &mut self.upstream,
        ] {
            buf.clear();
            buf.shrink_to(KEEP_BUFFER);
        }
        self.local_response = None;
        self.data_buffer = None;
        self.headers_gone = false;
        self.finished = false;
        self.log_bytes = 0;
        self.filter_state.clear();
        self.filter_state_bytes = 0;
        self.route_cache_cleared = false;
        self.set_properties.clear();
        self.conn = None;
        self.in_http = false;
        self.close_downstream = false;
        self.close_upstream = false;
        self.reset_stream = false;
    }
}

type Res<T> = wasmtime::Result<T>;

fn guest(msg: impl Into<String>) -> wasmtime::Error {
    wasmtime::Error::new(HostAbort::Guest(msg.into()))
}

fn limit(msg: impl Into<String>) -> wasmtime::Error {
    wasmtime::Error::new(HostAbort::Limit(msg.into()))
}

/// The guest's memory, for a host function about to read or write it. Every host call
/// that moves bytes comes through here, so this is where the call's deadline is checked:
/// Wasmtime checks it only in guest code, and a module that calls an expensive host
/// function thousands of times without a loop (8 MiB buffers, each about a millisecond)
/// once ran for minutes on a 20 ms deadline.
fn memory(caller: &mut Caller<'_, State>) -> Res<Memory> {
    if caller.data().over_deadline() {
        return Err(wasmtime::Error::new(HostAbort::Deadline));
    }
    if let Some(m) = caller.data().memory {
        return Ok(m);
    }
    match caller.get_export("memory") {
        Some(wasmtime::Extern::Memory(m)) => {
            caller.data_mut().memory = Some(m);
            Ok(m)
        }
        _ => Err(guest("module exports no memory")),
    }
}

fn range(mem_len: usize, ptr: u32, len: u32, what: &str) -> Res<std::ops::Range<usize>> {
    let start = ptr as usize;
    let end = start
        .checked_add(len as usize)
        .filter(|&e| e <= mem_len)
        .ok_or_else(|| {
            guest(format!(
                "{what}: {len} bytes at {ptr:#x} are outside guest memory ({mem_len} bytes)"
            ))
        })?;
    Ok(start..end)
}

/// Copies guest bytes out.
fn read(caller: &mut Caller<'_, State>, ptr: u32, len: u32, what: &str) -> Res<Vec<u8>> {
    let mem = memory(caller)?;
    let data = mem.data(&*caller);
    let r = range(data.len(), ptr, len, what)?;
    Ok(data[r].to_vec())
}

fn write(caller: &mut Caller<'_, State>, ptr: u32, bytes: &[u8], what: &str) -> Res<()> {
    let mem = memory(caller)?;
    let data = mem.data_mut(&mut *caller);
    let len = u32::try_from(bytes.len()).map_err(|_| guest("value larger than 4 GiB"))?;
    let r = range(data.len(), ptr, len, what)?;
    data[r].copy_from_slice(bytes);
    Ok(())
}

fn write_u32(caller: &mut Caller<'_, State>, ptr: u32, v: u32) -> Res<()> {
    write(caller, ptr, &v.to_le_bytes(), "return pointer")
}

/// Stores a returned block's pointer and size at the guest's two return slots, in a
/// view of memory the caller already holds (one memory lookup per host call instead of
/// one per slot: this is on the path of every header and buffer read).
fn put_ptr_size(data: &mut [u8], ret_ptr: u32, ptr: u32, ret_size: u32, size: u32) -> Res<()> {
    let r = range(data.len(), ret_ptr, 4, "return pointer")?;
    data[r].copy_from_slice(&ptr.to_le_bytes());
    let r = range(data.len(), ret_size, 4, "return pointer")?;
    data[r].copy_from_slice(&size.to_le_bytes());
    Ok(())
}

/// Asks the guest allocator for `len` bytes; the caller checks the block's bounds.
fn alloc(caller: &mut Caller<'_, State>, len: usize) -> Res<u32> {
    let len32 = u32::try_from(len).map_err(|_| limit("value larger than 4 GiB"))?;
    // Taken out of the state for the call and put back after it (no reference count to
    // touch on every read). A guest allocator that calls back into a host call needing
    // the allocator finds none and gets a clear error instead of recursing.
    let f =
        caller.data_mut().alloc.take().ok_or_else(|| {
            guest("no guest allocator (none exported, or it re-entered the host)")
        })?;
    let r = f.call(&mut *caller, len32);
    caller.data_mut().alloc = Some(f);
    let ptr = r?;
    if ptr == 0 && len > 0 {
        return Err(guest(format!("allocator returned null for {len} bytes")));
    }
    // Bounds: every caller takes the memory view after this call (it may have grown) and
    // checks the block's range in the view it writes through.
    Ok(ptr)
}

/// Hands `bytes` to the guest: allocate, copy, store pointer and size at the return slots.
/// Nothing (an empty value) is handed over as Envoy does: a null pointer and size 0, no
/// allocation (the Rust SDK reads a null property or shared value as absent, and a
/// zero-size block from `malloc` would leak in its `Vec`).
fn give(caller: &mut Caller<'_, State>, bytes: &[u8], ret_ptr: u32, ret_size: u32) -> Res<()> {
    if bytes.is_empty() {
        let mem = memory(caller)?;
        return put_ptr_size(mem.data_mut(&mut *caller), ret_ptr, 0, ret_size, 0);
    }
    let ptr = alloc(caller, bytes.len())?;
    let mem = memory(caller)?;
    let data = mem.data_mut(&mut *caller);
    let r = range(data.len(), ptr, bytes.len() as u32, "allocated block")?;
    data[r].copy_from_slice(bytes);
    put_ptr_size(data, ret_ptr, ptr, ret_size, bytes.len() as u32)
}

/// What one header entry counts against `max_map_bytes`.
pub(crate) fn entry_bytes(key: &str, value: &[u8]) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

fn map_bytes(map: &HeaderMap) -> usize {
    map.iter().map(|(k, v)| entry_bytes(k, v)).sum()
}

/// Serialises a header map in the ABI wire format: u32 count, (u32 key len, u32 value
/// len) per pair, then each key and value followed by NUL.
pub(crate) fn serialize_map(map: &HeaderMap, out: &mut Vec<u8>) {
    out.clear();
    out.resize(serialized_map_len(map), 0);
    serialize_map_into(map, out);
}

/// Length of [`serialize_map`]'s output.
pub(crate) fn serialized_map_len(map: &HeaderMap) -> usize {
    4 + map
        .iter()
        .map(|(k, v)| 8 + k.len() + v.len() + 2)
        .sum::<usize>()
}

/// [`serialize_map`] into a block of exactly [`serialized_map_len`] bytes.
fn serialize_map_into(map: &HeaderMap, out: &mut [u8]) {
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        out[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(&(map.len() as u32).to_le_bytes());
    for (k, v) in map {
        put(&(k.len() as u32).to_le_bytes());
        put(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in map {
        put(k.as_bytes());
        put(&[0]);
        put(v);
        put(&[0]);
    }
}

/// Parses the wire format; keys are lower-cased as Envoy does.
pub(crate) fn deserialize_map(bytes: &[u8]) -> Result<HeaderMap, String> {
    let mut out = Vec::new();
    parse_map(bytes, |key, value| {
        out.push((
            String::from_utf8_lossy(key).to_ascii_lowercase(),
            value.to_vec(),
        ));
    })?;
    Ok(out)
}

/// Walks a serialized header map, handing each (name, value) to `f` in order; an error
/// when the map does not fit in `bytes` (whatever `f` saw before stays seen).
pub(crate) fn parse_map(bytes: &[u8], mut f: impl FnMut(&[u8], &[u8])) -> Result<(), String> {
    let u32_at = |at: usize| -> Result<usize, String> {
        bytes
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(|b: [u8; 4]| u32::from_le_bytes(b) as usize)
            .ok_or_else(|| "header map truncated".to_string())
    };
    if bytes.is_empty() {
        return Ok(());
    }
    let n = u32_at(0)?;
    let mut data = n
        .checked_mul(8)
        .and_then(|x| x.checked_add(4))
        .filter(|&x| x <= bytes.len())
        .ok_or_else(|| format!("header map claims {n} pairs in {} bytes", bytes.len()))?;
    for i in 0..n {
        let klen = u32_at(4 + i * 8)?;
        let vlen = u32_at(8 + i * 8)?;
        let key = bytes
            .get(data..data + klen)
            .ok_or("header key out of range")?;
        data += klen + 1;
        let value = bytes
            .get(data..data + vlen)
            .ok_or("header value out of range")?;
        data += vlen + 1;
        if data > bytes.len() {
            return Err("header map missing NUL terminators".into());
        }
        f(key, value);
    }
    Ok(())
}

/// Adds entry `e` where Envoy's header map puts it: a pseudo-header (`:name`) after the
/// pseudo-headers at the front, any other header at the end.
fn insert_as_envoy(map: &mut HeaderMap, e: (String, Vec<u8>)) {
    if e.0.starts_with(':') {
        let at = map.iter().take_while(|(k, _)| k.starts_with(':')).count();
        map.insert(at, e);
    } else {
        map.push(e);
    }
}

fn map_index(map_type: u32) -> Option<usize> {
    (map_type <= MAP_RESPONSE_TRAILERS).then_some(map_type as usize)
}

/// The map a write goes to, if it exists: as in Envoy, the header maps exist only in an
/// HTTP context (a root or stream context has none), and gRPC metadata and callout
/// response maps never exist here (no callouts). A write to a map that does not exist is
/// answered BAD_ARGUMENT, as Envoy does.
fn map_writable(st: &State, map_type: u32) -> Option<usize> {
    match map_type {
        _ if st.finished => None,
        0 if st.headers_gone => None,
        0..=MAP_RESPONSE_TRAILERS if st.in_http => Some(map_type as usize),
        _ => None,
    }
}

/// The map a read goes to: [`map_index`], without the request headers once they are gone
/// ([`State::headers_gone`]).
fn map_readable(st: &State, map_type: u32) -> Option<usize> {
    map_index(map_type).filter(|&i| !(i == 0 && st.headers_gone))
}

/// Checks map `idx` against the size limit after a change other than an add (which uses
/// [`check_map_size_after_add`]); the size is summed again and remembered.
fn check_map_size(st: &mut State, idx: usize) -> Res<()> {
    let size = map_bytes(&st.maps[idx]);
    st.map_bytes_known[idx] = Some(size);
    check_size(st, idx, size)
}

/// Checks map `idx` after one entry of `added` bytes was pushed: from the remembered size
/// when there is one (no pass over the map).
fn check_map_size_after_add(st: &mut State, idx: usize, added: usize) -> Res<()> {
    let size = match st.map_bytes_known[idx] {
        Some(before) => before + added,
        None => map_bytes(&st.maps[idx]),
    };
    debug_assert_eq!(
        size,
        map_bytes(&st.maps[idx]),
        "remembered size of map {idx}"
    );
    st.map_bytes_known[idx] = Some(size);
    check_size(st, idx, size)
}

fn check_size(st: &State, idx: usize, size: usize) -> Res<()> {
    if size > st.plugin.max_map_bytes {
        return Err(limit(format!(
            "header map {idx} grew to {size} bytes (limit {} bytes)",
            st.plugin.max_map_bytes
        )));
    }
    Ok(())
}

/// The buffer `t` reads, `Err(status)` when there is none: as Envoy, a data buffer
/// outside its callback and the foreign-function call data (8) read empty, and a type
/// past the ABI's is a bad argument.
fn buffer(st: &State, t: u32) -> Result<&[u8], u32> {
    match t {
        0 | 2 | 3 if st.data_buffer != Some(t) => Ok(&[]),
        0 => Ok(&st.request_body),
        1 | 8 => Ok(&[]),
        2 => Ok(&st.downstream),
        3 => Ok(&st.upstream),
        6 => Ok(&st.plugin.vm_config),
        7 => Ok(&st.plugin.plugin_config),
        4 | 5 => Err(NOT_FOUND),
        _ => Err(BAD_ARGUMENT),
    }
}

/// The buffer `t` writes: only the data buffer of the running callback.
fn buffer_mut(st: &mut State, t: u32) -> Option<&mut Vec<u8>> {
    match t {
        _ if st.data_buffer != Some(t) => None,
        0 => Some(&mut st.request_body),
        2 => Some(&mut st.downstream),
        3 => Some(&mut st.upstream),
        _ => None,
    }
}

/// Parses Envoy's `SetEnvoyFilterStateArguments { string path = 1; string value = 2;
/// LifeSpan span = 3; }`, skipping unknown fields.
pub(crate) fn parse_filter_state_args(b: &[u8]) -> Option<(String, Vec<u8>)> {
    fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*at)?;
            *at += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let (mut path, mut value) = (None, Vec::new());
    let mut at = 0;
    while at < b.len() {
        let key = varint(b, &mut at)?;
        match key & 7 {
            0 => {
                varint(b, &mut at)?;
            }
            1 => at = at.checked_add(8)?,
            2 => {
                let len = usize::try_from(varint(b, &mut at)?).ok()?;
                let field = b.get(at..at.checked_add(len)?)?;
                at += len;
                match key >> 3 {
                    1 => path = Some(String::from_utf8(field.to_vec()).ok()?),
                    2 => value = field.to_vec(),
                    _ => {}
                }
            }
            5 => at = at.checked_add(4)?,
            _ => return None,
        }
    }
    if at > b.len() {
        return None;
    }
    // No path is an empty one, which names nothing (NOT_FOUND, as in Envoy).
    Some((path.unwrap_or_default(), value))
}

fn lookup_property(st: &State, raw: &[u8]) -> Option<Vec<u8>> {
    // One trailing NUL is taken as Envoy takes it (the SDKs send none).
    let raw = raw.strip_suffix(b"\0").unwrap_or(raw);
    if let Some((_, v)) = st.set_properties.iter().find(|(k, _)| k == raw) {
        return Some(v.clone());
    }
    let text = std::str::from_utf8(raw).ok()?;
    let path: Vec<&str> = text.split('\0').collect();
    let headers = (st.in_http && !st.headers_gone).then_some(st.maps[0].as_slice());
    let p = &st.plugin;
    builtin(
        &path,
        &p.name,
        &p.root_id,
        &p.vm_id,
        st.conn.as_ref(),
        headers,
    )
    .or_else(|| p.provider.as_ref()?.property(&path))
}

/// Every `env` function this host defines.
pub(crate) const ABI_FUNCTIONS: &[&str] = &[
    "proxy_log",
    "proxy_get_log_level",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_add_header_map_value",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_send_local_response",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_get_status",
    "proxy_set_effective_context",
    "proxy_call_foreign_function",
    "proxy_done",
    "proxy_define_metric",
    "proxy_get_metric",
    "proxy_record_metric",
    "proxy_increment_metric",
];

/// Defines every `env.proxy_*` function on the linker.
pub(crate) fn define(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut c: Caller<'_, State>, level: u32, ptr: u32, len: u32| -> Res<u32> {
            // As Envoy: a level above critical is refused before the message is read.
            if level > LOG_CRITICAL {
                return Ok(BAD_ARGUMENT);
            }
            let len = len.min(MAX_LOG_BYTES as u32);
            // A budget per context: past it lines are dropped (one warning says so). An
            // audit's extension wrote 3.7 MB of log per question, each call within its
            // deadline. Counted in what is written, after escaping (a NUL is written as
            // five characters: an audit's NUL lines made 1.3 MB of each 256 KiB budget),
            // and each line cut to MAX_LOG_BYTES so.
            if c.data().log_bytes >= MAX_LOG_PER_CONTEXT {
                return Ok(OK);
            }
            let msg = read(&mut c, ptr, len, "log message")?;
            let msg = String::from_utf8_lossy(&msg);
            let msg = printable(&msg);
            let msg: std::borrow::Cow<'_, str> = if msg.len() > MAX_LOG_BYTES {
                let mut end = MAX_LOG_BYTES;
                while !msg.is_char_boundary(end) {
                    end -= 1;
                }
                std::borrow::Cow::Owned(format!("{}…", &msg[..end]))
            } else {
                msg
            };
            let st = c.data_mut();
            st.log_bytes += msg.len();
            if st.log_bytes >= MAX_LOG_PER_CONTEXT {
                tracing::warn!(
                    target: "proxy_wasm_guest",
                    plugin = st.plugin.name.as_str(),
                    "over {MAX_LOG_PER_CONTEXT} bytes of log in one context: further lines dropped"
                );
            }
            let plugin = c.data().plugin.name.as_str();
            match level {
                0 => tracing::trace!(target: "proxy_wasm_guest", plugin, "{msg}"),
                1 => tracing::debug!(target: "proxy_wasm_guest", plugin, "{msg}"),
                2 => tracing::info!(target: "proxy_wasm_guest", plugin, "{msg}"),
                3 => tracing::warn!(target: "proxy_wasm_guest", plugin, "{msg}"),
                _ => tracing::error!(target: "proxy_wasm_guest", plugin, "{msg}"),
            }
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: Caller<'_, State>, ret: u32| -> Res<u32> {
            use tracing::level_filters::LevelFilter;
            let level = match LevelFilter::current() {
                LevelFilter::TRACE => 0,
                LevelFilter::DEBUG => 1,
                LevelFilter::INFO => 2,
                LevelFilter::WARN => 3,
                LevelFilter::ERROR => 4,
                _ => 5,
            };
            write_u32(&mut c, ret, level)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: Caller<'_, State>, ret: u32| -> Res<u32> {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            write(&mut c, ret, &now.to_le_bytes(), "return pointer")?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: Caller<'_, State>, period: u32| -> u32 {
            c.data_mut().tick_period_ms = period;
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: Caller<'_, State>,
         t: u32,
         start: u32,
         max: u32,
         ret_ptr: u32,
         ret_size: u32|
         -> Res<u32> {
            let buf = match buffer(c.data(), t) {
                Ok(b) => b,
                Err(status) => return Ok(status),
            };
            let start = start as usize;
            let end = start.saturating_add(max as usize).min(buf.len());
            let len = end.saturating_sub(start);
            if len == 0 {
                // As Envoy: nothing to copy (an empty buffer, a start at or past its end,
                // or max 0) is OK with a null pointer and size 0, and no allocation. The
                // Rust SDK reads a null pointer as `None`.
                let mem = memory(&mut c)?;
                put_ptr_size(mem.data_mut(&mut c), ret_ptr, 0, ret_size, 0)?;
                return Ok(OK);
            }
            let ptr = alloc(&mut c, len)?;
            let mem = memory(&mut c)?;
            let (data, st) = mem.data_and_store_mut(&mut c);
            let r = range(data.len(), ptr, len as u32, "allocated block")?;
            // The guest's allocator may have replaced the buffer (proxy_set_buffer_bytes
            // needs no allocation): take it again, and refuse if the range is gone.
            let Some(src) = buffer(st, t).ok().and_then(|b| b.get(start..end)) else {
                return Err(guest("buffer changed during allocation"));
            };
            data[r].copy_from_slice(src);
            put_ptr_size(data, ret_ptr, ptr, ret_size, len as u32)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: Caller<'_, State>, t: u32, start: u32, size: u32, ptr: u32, len: u32| -> Res<u32> {
            let new = read(&mut c, ptr, len, "buffer data")?;
            let max = c.data().plugin.max_buffer_bytes;
            let Some(buf) = buffer_mut(c.data_mut(), t) else {
                return Ok(BAD_ARGUMENT);
            };
            // A general splice: covers Envoy's prepend (0,0), replace (0,len) and append (len,_).
            let start = (start as usize).min(buf.len());
            let end = start.saturating_add(size as usize).min(buf.len());
            if buf.len() - (end - start) + new.len() > max {
                return Err(limit(format!("buffer {t} would exceed {max} bytes")));
            }
            buf.splice(start..end, new);
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: Caller<'_, State>, t: u32, ret_ptr: u32, ret_size: u32| -> Res<u32> {
            // Serialised straight into the guest's block: no host-side buffer.
            let i = map_readable(c.data(), t);
            if i.is_none_or(|i| c.data().maps[i].is_empty()) {
                // As Envoy: no map, or an empty one, is a null pointer and size 0.
                let mem = memory(&mut c)?;
                put_ptr_size(mem.data_mut(&mut c), ret_ptr, 0, ret_size, 0)?;
                return Ok(OK);
            }
            let size = i.map_or(4, |i| serialized_map_len(&c.data().maps[i]));
            let ptr = alloc(&mut c, size)?;
            let mem = memory(&mut c)?;
            let (data, st) = mem.data_and_store_mut(&mut c);
            let r = range(data.len(), ptr, size as u32, "allocated block")?;
            let empty = HeaderMap::new();
            let map = i.map_or(&empty, |i| &st.maps[i]);
            // The allocator call cannot change the maps (no host call mutates them from
            // malloc), but check rather than write out of the block.
            if serialized_map_len(map) != size {
                return Err(guest("header map changed during allocation"));
            }
            serialize_map_into(map, &mut data[r]);
            put_ptr_size(data, ret_ptr, ptr, ret_size, size as u32)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: Caller<'_, State>, t: u32, ptr: u32, len: u32| -> Res<u32> {
            let Some(i) = map_writable(c.data(), t) else {
                return Ok(BAD_ARGUMENT);
            };
            let max = c.data().plugin.max_map_bytes;
            if len as usize > max.saturating_mul(2) {
                return Err(limit(format!("header map of {len} bytes")));
            }
            // Parsed in place from guest memory into recycled entries: a module that
            // answers with one call here costs no copy of the block and no allocation for
            // a warm instance.
            let mem = memory(&mut c)?;
            let (data, st) = mem.data_and_store_mut(&mut c);
            let raw = &data[range(data.len(), ptr, len, "header map")?];
            st.recycle_map(i);
            let mut map = std::mem::take(&mut st.maps[i]);
            // Counted while parsing, and no entry stored past the limit: a block of empty
            // pairs (10 bytes each on the wire) must not make the host allocate an entry
            // for each before the check.
            let mut size = 0usize;
            let parsed = parse_map(raw, |key, value| {
                size = size.saturating_add(key.len() + value.len() + ENTRY_OVERHEAD);
                if size <= max {
                    let e = st.entry(key, value);
                    map.push(e);
                }
            });
            // Pseudo-headers first, each group in its order, as Envoy's map keeps them.
            map.sort_by_key(|(k, _)| !k.starts_with(':'));
            st.maps[i] = map;
            parsed.map_err(guest)?;
            if size > max {
                return Err(limit(format!(
                    "header map {i} of {size} bytes (limit {max} bytes)"
                )));
            }
            check_map_size(c.data_mut(), i)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: Caller<'_, State>,
         t: u32,
         kptr: u32,
         klen: u32,
         ret_ptr: u32,
         ret_size: u32|
         -> Res<u32> {
            let Some(i) = map_index(t) else {
                return Ok(NOT_FOUND);
            };
            if map_readable(c.data(), t).is_none() {
                return Ok(BAD_ARGUMENT);
            }
            let mem = memory(&mut c)?;
            let (data, st) = mem.data_and_store_mut(&mut c);
            let key = &data[range(data.len(), kptr, klen, "header name")?];
            let Some(pos) = st.maps[i]
                .iter()
                .position(|(k, _)| k.as_bytes().eq_ignore_ascii_case(key))
            else {
                return Ok(NOT_FOUND);
            };
            let len = st.maps[i][pos].1.len();
            if len == 0 {
                // As Envoy: an empty value is a null pointer and size 0.
                put_ptr_size(data, ret_ptr, 0, ret_size, 0)?;
                return Ok(OK);
            }
            let ptr = alloc(&mut c, len)?;
            let (data, st) = mem.data_and_store_mut(&mut c);
            let r = range(data.len(), ptr, len as u32, "allocated block")?;
            // The map cannot change during the allocator call (no host call mutates maps
            // from malloc), but look the entry up again rather than trust the index blindly.
            let Some((_, value)) = st.maps[i].get(pos) else {
                return Err(guest("header map changed during allocation"));
            };
            if value.len() != len {
                return Err(guest("header map changed during allocation"));
            }
            data[r].copy_from_slice(value);
            put_ptr_size(data, ret_ptr, ptr, ret_size, len as u32)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: Caller<'_, State>, t: u32, kptr: u32, klen: u32| -> Res<u32> {
            let Some(i) = map_writable(c.data(), t) else {
                return Ok(BAD_ARGUMENT);
            };
            let mem = memory(&mut c)?;
            let (data, st) = mem.data_and_store_mut(&mut c);
            let key = &data[range(data.len(), kptr, klen, "header name")?];
            // In one pass (removing one by one was quadratic in the duplicates).
            let mut map = std::mem::take(&mut st.maps[i]);
            for gone in map.extract_if(.., |(k, _)| k.as_bytes().eq_ignore_ascii_case(key)) {
                if let Some(size) = &mut st.map_bytes_known[i] {
                    *size -= entry_bytes(&gone.0, &gone.1);
                }
                st.keep_spare(gone);
            }
            st.maps[i] = map;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: Caller<'_, State>,
         t: u32,
         kptr: u32,
         klen: u32,
         vptr: u32,
         vlen: u32|
         -> Res<u32> {
            let Some(i) = map_writable(c.data(), t) else {
                return Ok(BAD_ARGUMENT);
            };
            if (vlen as usize) > c.data().plugin.max_map_bytes {
                return Err(limit(format!("header value of {vlen} bytes")));
            }
            // As Envoy's `setCopy`: every entry of the name goes, and the new one is added
            // where an add puts it (the end, or the end of the pseudo-headers).
            let mem = memory(&mut c)?;
            let (data, st) = mem.data_and_store_mut(&mut c);
            let key = &data[range(data.len(), kptr, klen, "header name")?];
            let value = &data[range(data.len(), vptr, vlen, "header value")?];
            let mut map = std::mem::take(&mut st.maps[i]);
            for gone in map.extract_if(.., |(k, _)| k.as_bytes().eq_ignore_ascii_case(key)) {
                st.keep_spare(gone);
            }
            let e = st.entry(key, value);
            insert_as_envoy(&mut map, e);
            st.maps[i] = map;
            check_map_size(c.data_mut(), i)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: Caller<'_, State>,
         t: u32,
         kptr: u32,
         klen: u32,
         vptr: u32,
         vlen: u32|
         -> Res<u32> {
            let Some(i) = map_writable(c.data(), t) else {
                return Ok(BAD_ARGUMENT);
            };
            if (klen as usize).saturating_add(vlen as usize) > c.data().plugin.max_map_bytes {
                return Err(limit(format!(
                    "header of {} bytes",
                    klen as u64 + vlen as u64
                )));
            }
            let mem = memory(&mut c)?;
            let (data, st) = mem.data_and_store_mut(&mut c);
            let key = &data[range(data.len(), kptr, klen, "header name")?];
            let value = &data[range(data.len(), vptr, vlen, "header value")?];
            let e = st.entry(key, value);
            let added = entry_bytes(&e.0, &e.1);
            insert_as_envoy(&mut st.maps[i], e);
            check_map_size_after_add(c.data_mut(), i, added)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: Caller<'_, State>, pptr: u32, plen: u32, ret_ptr: u32, ret_size: u32| -> Res<u32> {
            let raw = read(&mut c, pptr, plen, "property path")?;
            match lookup_property(c.data(), &raw) {
                Some(v) => {
                    give(&mut c, &v, ret_ptr, ret_size)?;
                    Ok(OK)
                }
                None => Ok(NOT_FOUND),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: Caller<'_, State>, pptr: u32, plen: u32, vptr: u32, vlen: u32| -> Res<u32> {
            let mut path = read(&mut c, pptr, plen, "property path")?;
            // One trailing NUL is no part of the path, as for a read.
            if path.last() == Some(&0) {
                path.pop();
            }
            let value = read(&mut c, vptr, vlen, "property value")?;
            let max = c.data().plugin.max_map_bytes;
            let st = c.data_mut();
            if let Some(slot) = st.set_properties.iter_mut().find(|(k, _)| *k == path) {
                slot.1 = value;
            } else {
                if st.set_properties.len() >= MAX_SET_PROPERTIES {
                    return Err(limit("too many properties set"));
                }
                st.set_properties.push((path, value));
            }
            let size: usize = st
                .set_properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum();
            if size > max {
                return Err(limit(format!("properties set grew to {size} bytes")));
            }
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: Caller<'_, State>,
         kptr: u32,
         klen: u32,
         ret_ptr: u32,
         ret_size: u32,
         ret_cas: u32|
         -> Res<u32> {
            let key = read(&mut c, kptr, klen, "shared data key")?;
            let found = {
                let p = &c.data().plugin;
                let store = p.host.lock();
                store.data.get(&(p.vm_id.clone(), key)).cloned()
            };
            let Some((value, cas)) = found else {
                return Ok(NOT_FOUND);
            };
            give(&mut c, &value, ret_ptr, ret_size)?;
            write_u32(&mut c, ret_cas, cas)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: Caller<'_, State>,
         kptr: u32,
         klen: u32,
         vptr: u32,
         vlen: u32,
         cas: u32|
         -> Res<u32> {
            let key = read(&mut c, kptr, klen, "shared data key")?;
            let p = &c.data().plugin;
            if vlen as usize > p.max_buffer_bytes {
                return Err(limit(format!("shared data value of {vlen} bytes")));
            }
            let value = read(&mut c, vptr, vlen, "shared data value")?;
            let p = &c.data().plugin;
            let max = p.host.max_bytes;
            let mut store = p.host.lock();
            let SharedStore { data, bytes, .. } = &mut *store;
            // The store is shared by every plugin on the host, so a full one is not this
            // plugin's fault: the write is refused with CAS_MISMATCH, the one refusal the
            // Rust SDK returns as an error instead of panicking (Envoy has no limit).
            // A write that does not grow the store always goes through.
            let full = |after: usize| after > max;
            let key = (p.vm_id.clone(), key);
            match data.get_mut(&key) {
                Some(entry) => {
                    if cas != 0 && cas != entry.1 {
                        return Ok(CAS_MISMATCH);
                    }
                    let after = *bytes - entry.0.len() + value.len();
                    if value.len() > entry.0.len() && full(after) {
                        return Ok(CAS_MISMATCH);
                    }
                    // CAS values are never 0: 0 means "no CAS" in the ABI.
                    entry.1 = entry.1.wrapping_add(1).max(1);
                    entry.0 = value;
                    *bytes = after;
                }
                None => {
                    let after =
                        *bytes + key.0.len() + key.1.len() + value.len() + SHARED_ENTRY_OVERHEAD;
                    if data.len() >= MAX_SHARED_ENTRIES || full(after) {
                        return Ok(CAS_MISMATCH);
                    }
                    data.insert(key, (value, 1));
                    *bytes = after;
                }
            }
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: Caller<'_, State>, nptr: u32, nlen: u32, ret: u32| -> Res<u32> {
            if nlen as usize > MAX_QUEUE_NAME_BYTES {
                return Err(limit(format!("queue name of {nlen} bytes")));
            }
            let name = read(&mut c, nptr, nlen, "queue name")?;
            let id = {
                let p = &c.data().plugin;
                let mut store = p.host.lock();
                let q = &mut store.queues;
                let key = (p.vm_id.clone(), name);
                match q.by_name.get(&key) {
                    Some(&id) => id,
                    None => {
                        // Counted per VM id: registering is rare (start, configure).
                        let mine = q.by_name.keys().filter(|(vm, _)| *vm == key.0).count();
                        if mine >= MAX_QUEUES_PER_VM {
                            return Err(limit(format!(
                                "more than {MAX_QUEUES_PER_VM} shared queues"
                            )));
                        }
                        q.next = q.next.wrapping_add(1).max(1);
                        let id = q.next;
                        q.by_name.insert(key, id);
                        q.items.insert(id, VecDeque::new());
                        id
                    }
                }
            };
            write_u32(&mut c, ret, id)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: Caller<'_, State>,
         vptr: u32,
         vlen: u32,
         nptr: u32,
         nlen: u32,
         ret: u32|
         -> Res<u32> {
            let vm = String::from_utf8_lossy(&read(&mut c, vptr, vlen, "vm id")?).into_owned();
            let name = read(&mut c, nptr, nlen, "queue name")?;
            let id = {
                let p = &c.data().plugin;
                let vm = if vm.is_empty() { p.vm_id.clone() } else { vm };
                let store = p.host.lock();
                store.queues.by_name.get(&(vm, name)).copied()
            };
            match id {
                Some(id) => {
                    write_u32(&mut c, ret, id)?;
                    Ok(OK)
                }
                None => Ok(NOT_FOUND),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: Caller<'_, State>, id: u32, vptr: u32, vlen: u32| -> Res<u32> {
            if vlen as usize > c.data().plugin.max_buffer_bytes {
                return Err(limit(format!("queue item of {vlen} bytes")));
            }
            let value = read(&mut c, vptr, vlen, "queue item")?;
            let p = &c.data().plugin;
            let max = p.host.max_bytes;
            let mut store = p.host.lock();
            let SharedStore { queues, bytes, .. } = &mut *store;
            let Some(items) = queues.items.get_mut(&id) else {
                return Ok(NOT_FOUND);
            };
            // The SDK accepts only OK or NOT_FOUND here. A full queue (in items, or in the
            // bytes the host's shared store may hold) drops its oldest items; an item that
            // does not fit even in the emptied queue is dropped itself.
            let cost = value.len() + QUEUE_ITEM_OVERHEAD;
            while items.len() >= MAX_QUEUE_ITEMS || (*bytes + cost > max && !items.is_empty()) {
                if let Some(old) = items.pop_front() {
                    *bytes -= old.len() + QUEUE_ITEM_OVERHEAD;
                }
            }
            if *bytes + cost > max {
                tracing::debug!(plugin = %p.name, queue = id, "shared store full: queue item dropped");
                return Ok(OK);
            }
            items.push_back(value);
            *bytes += cost;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: Caller<'_, State>, id: u32, ret_ptr: u32, ret_size: u32| -> Res<u32> {
            let item = {
                let p = &c.data().plugin;
                let mut store = p.host.lock();
                let SharedStore { queues, bytes, .. } = &mut *store;
                let Some(items) = queues.items.get_mut(&id) else {
                    return Ok(NOT_FOUND);
                };
                let item = items.pop_front();
                if let Some(item) = &item {
                    *bytes -= item.len() + QUEUE_ITEM_OVERHEAD;
                }
                item
            };
            let Some(item) = item else { return Ok(EMPTY) };
            give(&mut c, &item, ret_ptr, ret_size)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_continue_stream",
        |_c: Caller<'_, State>, _t: u32| -> u32 {
            // Calls are synchronous here: there is never a paused stream to resume.
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_close_stream",
        |mut c: Caller<'_, State>, t: u32| -> u32 {
            // As Envoy: the request (0) and response (1) are an HTTP context's, the
            // downstream (2) and upstream (3) connections a stream context's; a type that
            // does not apply to the current context does nothing.
            let st = c.data_mut();
            match t {
                0 | 1 => st.reset_stream |= st.in_http,
                2 => st.close_downstream |= !st.in_http,
                3 => st.close_upstream |= !st.in_http,
                _ => return BAD_ARGUMENT,
            }
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: Caller<'_, State>,
         status: u32,
         dptr: u32,
         dlen: u32,
         bptr: u32,
         blen: u32,
         hptr: u32,
         hlen: u32,
         _grpc: i32|
         -> Res<u32> {
            let max = c.data().plugin.max_buffer_bytes;
            if blen as usize > max || hlen as usize > max {
                return Err(limit("local response too large"));
            }
            let details =
                String::from_utf8_lossy(&read(&mut c, dptr, dlen, "details")?).into_owned();
            let body = read(&mut c, bptr, blen, "local response body")?;
            let headers = deserialize_map(&read(&mut c, hptr, hlen, "local response headers")?)
                .map_err(guest)?;
            // As Envoy: the first local response of a context is the one sent; a later
            // one is answered OK and dropped.
            if c.data().local_response.is_some() || c.data().finished {
                return Ok(OK);
            }
            c.data_mut().local_response = Some(LocalResponse {
                status,
                body,
                headers,
                details,
            });
            Ok(OK)
        },
    )?;
    // Callouts are not offered: the SDKs turn INTERNAL_FAILURE / NOT_FOUND into `Err`.
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |_c: Caller<'_, State>,
         _a: u32,
         _b: u32,
         _d: u32,
         _e: u32,
         _f: u32,
         _g: u32,
         _h: u32,
         _i: u32,
         _j: u32,
         _k: u32|
         -> u32 { INTERNAL_FAILURE },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_call",
        |_c: Caller<'_, State>,
         _a: u32,
         _b: u32,
         _d: u32,
         _e: u32,
         _f: u32,
         _g: u32,
         _h: u32,
         _i: u32,
         _j: u32,
         _k: u32,
         _l: u32,
         _m: u32|
         -> u32 { INTERNAL_FAILURE },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_stream",
        |_c: Caller<'_, State>,
         _a: u32,
         _b: u32,
         _d: u32,
         _e: u32,
         _f: u32,
         _g: u32,
         _h: u32,
         _i: u32,
         _j: u32|
         -> u32 { INTERNAL_FAILURE },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_send",
        |_c: Caller<'_, State>, _a: u32, _b: u32, _d: u32, _e: u32| -> u32 { NOT_FOUND },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_cancel",
        |_c: Caller<'_, State>, _a: u32| -> u32 { NOT_FOUND },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_close",
        |_c: Caller<'_, State>, _a: u32| -> u32 { NOT_FOUND },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: Caller<'_, State>, code: u32, ret_ptr: u32, ret_size: u32| -> Res<u32> {
            write_u32(&mut c, code, 0)?;
            write_u32(&mut c, ret_ptr, 0)?;
            write_u32(&mut c, ret_size, 0)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: Caller<'_, State>, id: u32| -> u32 {
            c.data_mut().effective_context = id;
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut c: Caller<'_, State>,
         nptr: u32,
         nlen: u32,
         aptr: u32,
         alen: u32,
         ret_ptr: u32,
         ret_size: u32|
         -> Res<u32> {
            // The name is matched in guest memory, not copied out: `clear_route_cache`
            // comes with every routing question.
            enum Foreign {
                SetFilterState,
                ClearRouteCache,
            }
            let mem = memory(&mut c)?;
            let data = mem.data(&c);
            let which = match &data[range(data.len(), nptr, nlen, "function name")?] {
                b"set_envoy_filter_state" => Foreign::SetFilterState,
                b"clear_route_cache" => Foreign::ClearRouteCache,
                _ => return Ok(NOT_FOUND),
            };
            match which {
                Foreign::SetFilterState => {
                    let max = c.data().plugin.max_map_bytes;
                    if alen as usize > max {
                        return Err(limit("filter state argument too large"));
                    }
                    let args = read(&mut c, aptr, alen, "function arguments")?;
                    let Some((path, value)) = parse_filter_state_args(&args) else {
                        return Ok(BAD_ARGUMENT);
                    };
                    if path.is_empty() || c.data().finished {
                        return Ok(NOT_FOUND);
                    }
                    // All of one context's filter state counts against the limit, so that
                    // many distinct paths cannot grow it without bound.
                    let st = c.data_mut();
                    let slot = st.filter_state.iter().position(|(k, _)| *k == path);
                    let after = match slot {
                        Some(i) => st.filter_state_bytes - st.filter_state[i].1.len() + value.len(),
                        None => st.filter_state_bytes + entry_bytes(&path, &value),
                    };
                    if after > max {
                        return Err(limit(format!(
                            "filter state grew to {after} bytes (limit {max} bytes)"
                        )));
                    }
                    st.filter_state_bytes = after;
                    match slot {
                        Some(i) => st.filter_state[i].1 = value,
                        None => st.filter_state.push((path, value)),
                    }
                }
                Foreign::ClearRouteCache => c.data_mut().route_cache_cleared = true,
            }
            write_u32(&mut c, ret_ptr, 0)?;
            write_u32(&mut c, ret_size, 0)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap("env", "proxy_done", |_c: Caller<'_, State>| -> u32 { OK })?;
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: Caller<'_, State>, kind: u32, nptr: u32, nlen: u32, ret: u32| -> Res<u32> {
            let name = String::from_utf8_lossy(&read(&mut c, nptr, nlen.min(4096), "metric name")?)
                .into_owned();
            match c.data().plugin.metrics.define(kind, &name) {
                Ok(id) => {
                    write_u32(&mut c, ret, id)?;
                    Ok(OK)
                }
                Err(status) => Ok(status),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: Caller<'_, State>, id: u32, ret: u32| -> Res<u32> {
            match c.data().plugin.metrics.get(id) {
                Ok(v) => {
                    write(&mut c, ret, &v.to_le_bytes(), "return pointer")?;
                    Ok(OK)
                }
                Err(status) => Ok(status),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |c: Caller<'_, State>, id: u32, value: u64| -> u32 {
            c.data().plugin.metrics.record(id, value)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |c: Caller<'_, State>, id: u32, offset: i64| -> u32 {
            c.data().plugin.metrics.increment(id, offset)
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn state() -> State {
        let plugin = Arc::new(PluginShared {
            name: "t".into(),
            root_id: String::new(),
            vm_id: String::new(),
            plugin_config: Vec::new(),
            vm_config: Vec::new(),
            metrics: Default::default(),
            provider: None,
            host: Arc::new(HostShared::new(1 << 20)),
            max_map_bytes: 1 << 20,
            max_buffer_bytes: 16 << 20,
        });
        State::new(plugin, Arc::new(AtomicU64::new(0)), 64 << 20, 10_000)
    }

    /// What the host keeps of a guest's maps and buffers between contexts is bounded
    /// whatever the guest did: an audit's module made one instance hold 950 MB through
    /// spare header entries (large values set, then emptied or removed).
    #[test]
    fn what_the_host_keeps_for_reuse_is_bounded() {
        let mut st = state();
        for round in 0..3 {
            for i in 0..1000 {
                let big = vec![b'x'; 900_000];
                let mut e = st.entry(format!("h{i}").as_bytes(), &big);
                e.1.clear();
                if i % 2 == 0 {
                    st.maps[0].push(e);
                } else {
                    st.keep_spare(e);
                }
                let small = st.entry(b"s", b"v");
                st.maps[1].push(small);
            }
            st.request_body.resize(8 << 20, 0);
            st.downstream.resize(8 << 20, 0);
            st.reset_context();
            let kept: usize = st
                .spare
                .iter()
                .map(|(k, v)| k.capacity() + v.capacity())
                .sum();
            assert!(st.spare.len() <= MAX_SPARE, "round {round}");
            assert!(kept <= MAX_SPARE * MAX_SPARE_ENTRY, "round {round}: {kept}");
            assert!(
                st.maps
                    .iter()
                    .all(|m| m.is_empty() && m.capacity() <= MAX_SPARE)
            );
            assert!(st.request_body.capacity() <= KEEP_BUFFER);
            assert!(st.downstream.capacity() <= KEEP_BUFFER);
        }
        // Small entries are still reused.
        assert!(!st.spare.is_empty());
    }

    #[test]
    fn guest_log_lines_stay_one_line() {
        assert_eq!(printable("plain text"), "plain text");
        assert_eq!(
            printable("a\n2026-12-07T07:00:00Z  INFO altroute::decision: x\r\u{1b}[2J"),
            "a\\u{a}2026-12-07T07:00:00Z  INFO altroute::decision: x\\u{d}\\u{1b}[2J"
        );
    }

    #[test]
    fn map_wire_format_round_trips() {
        let map: HeaderMap = vec![("a".into(), b"1".to_vec()), ("bc".into(), Vec::new())];
        let mut out = Vec::new();
        serialize_map(&map, &mut out);
        assert_eq!(
            out,
            b"\x02\0\0\0\x01\0\0\0\x01\0\0\0\x02\0\0\0\0\0\0\0a\x001\0bc\0\0"
        );
        assert_eq!(deserialize_map(&out).unwrap(), map);
        let mut direct = vec![0xaa; serialized_map_len(&map)];
        serialize_map_into(&map, &mut direct);
        assert_eq!(direct, out);
        assert!(deserialize_map(&out[..out.len() - 3]).is_err());
        assert!(deserialize_map(b"\xff\xff\xff\xff").is_err());
    }

    #[test]
    fn filter_state_arguments_parse() {
        let args = b"\x0a\x17envoy.tcp_proxy.cluster\x12\x03abc\x18\x01";
        let (path, value) = parse_filter_state_args(args).unwrap();
        assert_eq!(path, "envoy.tcp_proxy.cluster");
        assert_eq!(value, b"abc");
        assert!(parse_filter_state_args(b"\x0a\x50short").is_none());
    }
}
