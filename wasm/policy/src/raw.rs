//! The request headers in one host call, parsed in place.
//!
//! `proxy_wasm::hostcalls::get_map_bytes` copies every name into a `String` and every
//! value into a `Vec`: two allocations per header, on every routing question, which cost
//! more in this module than the decision itself. Here the serialized map the host hands
//! over is kept as one block and the pairs borrow from it. The SDK has no borrowing
//! variant, so this declares the ABI import itself; it is the only unsafe code in the
//! module.
#![allow(unsafe_code)]

unsafe extern "C" {
    /// proxy-wasm ABI 0.2.1: writes a pointer to a block the host allocated with this
    /// module's `malloc` export, and its size. Same import as the SDK's.
    fn proxy_get_header_map_pairs(map_type: u32, data: *mut *mut u8, size: *mut usize) -> u32;
}

/// `MapType::HttpRequestHeaders`.
const HTTP_REQUEST_HEADERS: u32 = 0;

/// A serialized header map: `u32` count, then `(u32 name length, u32 value length)` per
/// pair, then each name and each value followed by a NUL byte.
pub(crate) struct HeaderBlock(Vec<u8>);

impl HeaderBlock {
    /// The request headers, or `None` when the host refuses (any status but OK).
    pub(crate) fn request() -> Option<HeaderBlock> {
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: the host writes through two valid pointers to locals.
        let status =
            unsafe { proxy_get_header_map_pairs(HTTP_REQUEST_HEADERS, &mut data, &mut size) };
        if status != 0 {
            return None;
        }
        if data.is_null() {
            return Some(HeaderBlock(Vec::new()));
        }
        // SAFETY: as the ABI requires, the host obtained `data` from this module's
        // `malloc` export, which the proxy-wasm SDK implements as a leaked
        // `Vec::<u8>::with_capacity(size)`: a live allocation of exactly `size` bytes from
        // the global allocator, handed to us. This is how the SDK itself takes it back.
        Some(HeaderBlock(unsafe {
            Vec::from_raw_parts(data, size, size)
        }))
    }

    /// The (name, value) pairs, borrowed from the block; `None` when the block is
    /// malformed.
    pub(crate) fn pairs(&self) -> Option<Vec<(&[u8], &[u8])>> {
        let b = self.0.as_slice();
        if b.is_empty() {
            return Some(Vec::new());
        }
        let u32_at = |at: usize| -> Option<usize> {
            let w = b.get(at..at + 4)?;
            Some(u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize)
        };
        let count = u32_at(0)?;
        // Each pair needs at least 8 bytes of sizes and 2 NULs: a count the block cannot
        // hold is refused before anything is reserved for it.
        if count > b.len() / 10 {
            return None;
        }
        let mut pairs = Vec::with_capacity(count);
        let mut data = 4 + count * 8;
        for i in 0..count {
            let (klen, vlen) = (u32_at(4 + i * 8)?, u32_at(8 + i * 8)?);
            let key = b.get(data..data.checked_add(klen)?)?;
            data += klen + 1;
            let value = b.get(data..data.checked_add(vlen)?)?;
            data += vlen + 1;
            pairs.push((key, value));
        }
        Some(pairs)
    }
}
