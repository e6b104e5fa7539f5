//! A locked-down WASI preview1 for modules that import it (only when
//! [`HostConfig::allow_wasi`](crate::HostConfig) is set): no files, no sockets, no
//! environment, no arguments. `fd_write` to stdout/stderr goes to `tracing`; clocks and
//! `random_get` work; `proc_exit` ends the call with an error; every other function
//! answers `ENOSYS` (or `EBADF` for file descriptors).

use std::time::{SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Linker, Module, Val, ValType};

use crate::abi::State;
use crate::error::HostAbort;

/// The WASI preview1 module name.
pub(crate) const MODULE: &str = "wasi_snapshot_preview1";
const ERRNO_BADF: i32 = 8;
const ERRNO_NOSYS: i32 = 52;

fn mem_write(c: &mut Caller<'_, State>, ptr: u32, bytes: &[u8]) -> wasmtime::Result<bool> {
    let Some(wasmtime::Extern::Memory(m)) = c.get_export("memory") else {
        return Ok(false);
    };
    let data = m.data_mut(&mut *c);
    let start = ptr as usize;
    let Some(slot) = start
        .checked_add(bytes.len())
        .and_then(|end| data.get_mut(start..end))
    else {
        return Ok(false);
    };
    slot.copy_from_slice(bytes);
    Ok(true)
}

fn mem_read(c: &mut Caller<'_, State>, ptr: u32, len: u32) -> Option<Vec<u8>> {
    let Some(wasmtime::Extern::Memory(m)) = c.get_export("memory") else {
        return None;
    };
    let data = m.data(&*c);
    let start = ptr as usize;
    data.get(start..start.checked_add(len as usize)?)
        .map(<[u8]>::to_vec)
}

/// A non-cryptographic generator seeded from the std hasher's random keys; enough for
/// hash-map seeds, which is what guests use `random_get` for.
fn random_bytes(out: &mut [u8]) {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    let mut x = h.finish();
    for chunk in out.chunks_mut(8) {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

/// Defines the WASI functions `module` imports on a per-module linker.
pub(crate) fn define(linker: &mut Linker<State>, module: &Module) -> wasmtime::Result<()> {
    for import in module.imports().filter(|i| i.module() == MODULE) {
        let name = import.name().to_string();
        let Some(ty) = import.ty().func().cloned() else {
            continue;
        };
        let results: Vec<ValType> = ty.results().collect();
        let returns_errno = results.len() == 1 && matches!(results[0], ValType::I32);
        match name.as_str() {
            "fd_write" if returns_errno => {
                linker.func_wrap(MODULE, "fd_write", |mut c: Caller<'_, State>, fd: i32, iovs: u32, n: u32, ret: u32| -> wasmtime::Result<i32> {
                    if fd != 1 && fd != 2 {
                        return Ok(ERRNO_BADF);
                    }
                    let mut total = 0u32;
                    let mut text = Vec::new();
                    for i in 0..n.min(64) {
                        let Some(iov) = mem_read(&mut c, iovs.wrapping_add(i * 8), 8) else { return Ok(21) };
                        let ptr = u32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                        let len = u32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]).min(64 * 1024);
                        let Some(bytes) = mem_read(&mut c, ptr, len) else { return Ok(21) };
                        total = total.saturating_add(len);
                        text.extend_from_slice(&bytes);
                    }
                    let plugin = c.data().plugin.name.clone();
                    tracing::info!(target: "proxy_wasm_guest", plugin, fd, "{}", String::from_utf8_lossy(&text).trim_end());
                    mem_write(&mut c, ret, &total.to_le_bytes())?;
                    Ok(0)
                })?;
            }
            "environ_sizes_get" | "args_sizes_get" if returns_errno => {
                linker.func_wrap(
                    MODULE,
                    &name,
                    |mut c: Caller<'_, State>, count: u32, size: u32| -> wasmtime::Result<i32> {
                        mem_write(&mut c, count, &0u32.to_le_bytes())?;
                        mem_write(&mut c, size, &0u32.to_le_bytes())?;
                        Ok(0)
                    },
                )?;
            }
            "environ_get" | "args_get" if returns_errno => {
                linker.func_wrap(
                    MODULE,
                    &name,
                    |_c: Caller<'_, State>, _a: u32, _b: u32| -> i32 { 0 },
                )?;
            }
            "clock_time_get" if returns_errno => {
                linker.func_wrap(
                    MODULE,
                    "clock_time_get",
                    |mut c: Caller<'_, State>,
                     _id: i32,
                     _precision: i64,
                     ret: u32|
                     -> wasmtime::Result<i32> {
                        let now = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map(|d| d.as_nanos() as u64)
                            .unwrap_or(0);
                        mem_write(&mut c, ret, &now.to_le_bytes())?;
                        Ok(0)
                    },
                )?;
            }
            "random_get" if returns_errno => {
                linker.func_wrap(
                    MODULE,
                    "random_get",
                    |mut c: Caller<'_, State>, ptr: u32, len: u32| -> wasmtime::Result<i32> {
                        let mut buf = vec![0u8; len.min(1 << 20) as usize];
                        random_bytes(&mut buf);
                        mem_write(&mut c, ptr, &buf)?;
                        Ok(0)
                    },
                )?;
            }
            "proc_exit" => {
                linker.func_wrap(
                    MODULE,
                    "proc_exit",
                    |_c: Caller<'_, State>, code: i32| -> wasmtime::Result<()> {
                        Err(wasmtime::Error::new(HostAbort::Exit(code)))
                    },
                )?;
            }
            _ => {
                let errno = if name.starts_with("fd_") {
                    ERRNO_BADF
                } else {
                    ERRNO_NOSYS
                };
                let results_len = results.len();
                linker.func_new(MODULE, &name, ty, move |_c, _params, out| {
                    if results_len == 1 && returns_errno {
                        out[0] = Val::I32(errno);
                        return Ok(());
                    }
                    for slot in out.iter_mut() {
                        *slot = Val::I32(0);
                    }
                    Err(wasmtime::Error::new(HostAbort::Guest(
                        "unsupported WASI function".into(),
                    )))
                })?;
            }
        }
    }
    Ok(())
}
