//! On-disk framing: `[len: u32 LE][crc32: u32 LE][kind: u8][data]`, `len` counting kind + data,
//! the CRC covering kind + data. A torn or garbled frame fails the length or checksum test.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// First bytes of every spool file; the version is in the last digit.
pub(crate) const MAGIC: &[u8; 8] = b"ALTRQ01\n";
/// Size of `len` + `crc`.
pub(crate) const HEADER_LEN: u64 = 8;
/// Largest frame accepted when reading back (1 GiB); anything larger is garbage.
pub(crate) const MAX_FRAME: u32 = 1 << 30;

/// The envelope record (JSON), always the first frame.
pub(crate) const KIND_ENVELOPE: u8 = b'E';
/// The message body, always the second frame.
pub(crate) const KIND_BODY: u8 = b'B';
/// A recipient state update (JSON), appended afterwards.
pub(crate) const KIND_STATE: u8 = b'S';

/// The 9 bytes that precede `data`: header + kind.
pub(crate) fn prefix(kind: u8, data: &[u8]) -> io::Result<[u8; 9]> {
    let len = u32::try_from(data.len() + 1)
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame larger than 1 GiB"))?;
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(data);
    let crc = h.finalize();
    let mut out = [0u8; 9];
    out[..4].copy_from_slice(&len.to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out[8] = kind;
    Ok(out)
}

/// A whole frame in one buffer (for small records).
pub(crate) fn encode(kind: u8, data: &[u8]) -> io::Result<Vec<u8>> {
    let mut v = Vec::with_capacity(data.len() + 9);
    v.extend_from_slice(&prefix(kind, data)?);
    v.extend_from_slice(data);
    Ok(v)
}

/// Header of a frame found in a file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameHeader {
    /// Bytes after the 8-byte header (kind + data).
    pub len: u32,
    pub crc: u32,
}

impl FrameHeader {
    /// Offset just past this frame when it starts at `off`.
    pub fn end(&self, off: u64) -> u64 {
        off + HEADER_LEN + u64::from(self.len)
    }
}

/// Read the frame header at `off`; `None` if it does not fit in `file_len` or is implausible.
pub(crate) fn read_header(file: &File, off: u64, file_len: u64) -> io::Result<Option<FrameHeader>> {
    if off + HEADER_LEN > file_len {
        return Ok(None);
    }
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, off)?;
    let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let crc = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let h = FrameHeader { len, crc };
    if len == 0 || len > MAX_FRAME || h.end(off) > file_len {
        return Ok(None);
    }
    Ok(Some(h))
}

/// Read and check a whole frame at `off`: `Some((kind, data))` or `None` if torn / corrupt.
pub(crate) fn read_frame(
    file: &File,
    off: u64,
    file_len: u64,
) -> io::Result<Option<(FrameHeader, u8, Vec<u8>)>> {
    let Some(h) = read_header(file, off, file_len)? else {
        return Ok(None);
    };
    let mut payload = vec![0u8; h.len as usize];
    file.read_exact_at(&mut payload, off + HEADER_LEN)?;
    if crc32fast::hash(&payload) != h.crc {
        return Ok(None);
    }
    let kind = payload[0];
    payload.remove(0);
    Ok(Some((h, kind, payload)))
}
