//! The DATA reader: finds the end of data, removes dot-stuffing and checks
//! the message, in bounded memory.
//!
//! Own implementation rather than smtp-proto's `DataReceiver`, because that
//! one buffers the whole message without a limit and neither reports bare
//! CR / bare LF nor over-long text lines, all of which we must reject.
//!
//! Rules (documented choices):
//! - The only end of data is `CRLF . CRLF` (the CRLF that ended the `DATA`
//!   command counts as the first one, so `.\r\n` right away is an empty
//!   message). `\n.\n`, `\r.\r`, `\r.\n`, `\n.\r`, `\n.\r\n`, `\r\n.\n`,
//!   `\r.\r\n`, `\r\n.\r`, and variants with NUL never end the data.
//! - A bare CR or bare LF anywhere rejects the message with
//!   `550 5.6.11` once the real end of data has been read (no smuggling:
//!   whatever follows a would-be terminator is still message data).
//! - A text line over 1000 octets including CRLF (RFC 5321 4.5.3.1.6)
//!   rejects the message with `500 5.5.6 Line too long`, again after the
//!   end of data.
//! - More than `max_size` octets (after unstuffing) rejects it with
//!   `552 5.3.4`; the buffer is dropped as soon as the limit is passed, so
//!   memory stays bounded by `max_size`.
//! - Precedence when several apply: size, then bare CR/LF, then line length.

use crate::reply::Reply;

/// Longest text line in octets including CRLF (RFC 5321 4.5.3.1.6).
pub const MAX_TEXT_LINE: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line (after CRLF).
    LineStart,
    /// Inside a line.
    Text,
    /// Inside a line, last byte was CR (held back).
    Cr,
    /// A line started with `.`; the dot is held back.
    Dot,
    /// A line started with `.` then CR.
    DotCr,
    /// `CRLF . CRLF` seen.
    Done,
}

/// Why a message read by [`DataReader`] is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// Larger than the size limit.
    #[error("message exceeds the size limit")]
    TooBig,
    /// Contains a CR not followed by LF or an LF not preceded by CR.
    #[error("bare CR or LF in message data")]
    BareCrLf,
    /// A text line over 1000 octets.
    #[error("text line too long")]
    LineTooLong,
}

impl DataError {
    /// The reply the server sends for this rejection.
    pub fn reply(self) -> Reply {
        match self {
            DataError::TooBig => Reply::new(552, (5, 3, 4), "Message too big for system"),
            DataError::BareCrLf => {
                Reply::new(550, (5, 6, 11), "Bare CR or LF not allowed in message data")
            }
            DataError::LineTooLong => Reply::new(500, (5, 5, 6), "Line too long"),
        }
    }
}

/// Incremental DATA reader. Pure: fed with byte slices.
#[derive(Debug)]
pub struct DataReader {
    state: State,
    out: Vec<u8>,
    max_size: usize,
    /// Octets of the current line as received, excluding CRLF.
    line_len: usize,
    /// Unstuffed octets seen, counted even after the buffer was dropped.
    size: u64,
    bare: bool,
    long_line: bool,
}

impl DataReader {
    /// A reader accepting at most `max_size` octets of (unstuffed) message.
    pub fn new(max_size: usize) -> Self {
        Self {
            state: State::LineStart,
            out: Vec::with_capacity(max_size.min(64 * 1024)),
            max_size,
            line_len: 0,
            size: 0,
            bare: false,
            long_line: false,
        }
    }

    /// True once `CRLF . CRLF` has been consumed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Octets currently buffered (bounded by the size limit).
    pub fn buffered(&self) -> usize {
        self.out.len()
    }

    /// Consume bytes up to and including the end-of-data marker. Returns the
    /// number of bytes consumed; if [`is_done`](Self::is_done) is then true,
    /// the bytes after that count belong to the command stream.
    pub fn feed(&mut self, input: &[u8]) -> usize {
        for (i, &b) in input.iter().enumerate() {
            if self.state == State::Done {
                return i;
            }
            self.step(b);
        }
        input.len()
    }

    /// The message (unstuffed, CRLF line ends) or the reason to reject it.
    pub fn finish(self) -> Result<Vec<u8>, DataError> {
        if self.size > self.max_size as u64 {
            Err(DataError::TooBig)
        } else if self.bare {
            Err(DataError::BareCrLf)
        } else if self.long_line {
            Err(DataError::LineTooLong)
        } else {
            Ok(self.out)
        }
    }

    fn step(&mut self, b: u8) {
        match self.state {
            State::Done => {}
            State::LineStart => {
                if b == b'.' {
                    // The line's length is counted without this dot: it is either
                    // stuffing (RFC 5321 4.5.3.1.6: the 1000-octet limit does not count
                    // the dot duplicated for transparency) or the end of the data. A
                    // legal 998-octet line starting with "." was refused as too long.
                    self.line_len = 0;
                    self.state = State::Dot;
                } else {
                    self.text(b);
                }
            }
            State::Dot => {
                if b == b'\r' {
                    self.state = State::DotCr;
                } else {
                    // Dot-stuffed line: the leading dot is dropped.
                    self.text(b);
                }
            }
            State::DotCr => {
                if b == b'\n' {
                    self.state = State::Done;
                } else {
                    // "." CR <not LF>: a bare CR on a dot line. The dot was
                    // stuffing; keep the CR as data and go on.
                    self.bare = true;
                    self.emit(b'\r');
                    self.line_len += 1;
                    self.state = State::Text;
                    self.text(b);
                }
            }
            State::Text => self.text(b),
            State::Cr => {
                if b == b'\n' {
                    self.emit(b'\r');
                    self.emit(b'\n');
                    self.line_len = 0;
                    self.state = State::LineStart;
                } else {
                    self.bare = true;
                    self.emit(b'\r');
                    self.line_len += 1;
                    self.state = State::Text;
                    self.text(b);
                }
            }
        }
    }

    /// A byte inside a line (not a held-back CR).
    fn text(&mut self, b: u8) {
        match b {
            b'\r' => self.state = State::Cr,
            b'\n' => {
                // Bare LF: data, never a line start, so "\n.\n" and friends
                // cannot end the message.
                self.bare = true;
                self.emit(b'\n');
                self.line_len += 1;
                self.state = State::Text;
            }
            _ => {
                self.emit(b);
                self.line_len += 1;
                self.state = State::Text;
            }
        }
        if self.line_len + 2 > MAX_TEXT_LINE {
            self.long_line = true;
        }
    }

    fn emit(&mut self, b: u8) {
        self.size += 1;
        if self.size > self.max_size as u64 || self.bare || self.long_line {
            // Rejected anyway: keep memory bounded, keep counting.
            if !self.out.is_empty() {
                self.out = Vec::new();
            }
            return;
        }
        self.out.push(b);
    }
}

/// Dot-stuff a message for transmission (client side) and append the
/// end-of-data marker. Lines are expected to end in CRLF; a message not
/// ending in CRLF gets one so the marker stays on its own line.
pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 64 + 5);
    let mut at_line_start = true;
    for &b in message {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !message.is_empty() && !message.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn read(input: &[u8], max: usize) -> (Option<usize>, Result<Vec<u8>, DataError>) {
        let mut r = DataReader::new(max);
        let n = r.feed(input);
        let done = r.is_done().then_some(n);
        (done, r.finish())
    }

    #[test]
    fn unstuffs_and_stops_at_marker() {
        let (n, msg) = read(b"a\r\n..b\r\n.c\r\n\r\n.\r\nQUIT\r\n", 100);
        assert_eq!(n, Some(17));
        assert_eq!(msg.unwrap(), b"a\r\n.b\r\nc\r\n\r\n");
        let (n, msg) = read(b".\r\n", 100);
        assert_eq!(n, Some(3));
        assert_eq!(msg.unwrap(), b"");
    }

    #[test]
    fn smuggling_never_ends_data() {
        // (sequence, rejected as bare CR/LF)
        for (seq, bare) in [
            (&b"\n.\n"[..], true),
            (b"\r.\r", true),
            (b"\r.\n", true),
            (b"\n.\r", true),
            (b"\n.\r\n", true),
            (b"\r\n.\n", true),
            (b"\r.\r\n", true),
            (b"\r\n.\r", true),
            (b"\r\n\0.\r\n", false),
            (b"\r\n.\0\r\n", false),
            (b"\r\0\n.\r\n", true),
            (b"\n\0.\r\n", true),
        ] {
            let mut input = b"x".to_vec();
            input.extend_from_slice(seq);
            input.extend_from_slice(b"MAIL FROM:<a@b>\r\n");
            let mut r = DataReader::new(1000);
            assert_eq!(r.feed(&input), input.len(), "{seq:?}");
            assert!(!r.is_done(), "{seq:?} ended data");
            r.feed(b"\r\n.\r\n");
            assert!(r.is_done());
            let res = r.finish();
            if bare {
                assert_eq!(res, Err(DataError::BareCrLf), "{seq:?}");
            } else {
                assert!(res.is_ok(), "{seq:?}");
            }
        }
    }

    #[test]
    fn limits() {
        let (_, msg) = read(b"0123456789\r\n.\r\n", 5);
        assert_eq!(msg, Err(DataError::TooBig));
        let mut long = vec![b'a'; 998];
        long.extend_from_slice(b"\r\n.\r\n");
        assert!(read(&long, 10_000).1.is_ok());
        let mut long = vec![b'a'; 999];
        long.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(read(&long, 10_000).1, Err(DataError::LineTooLong));
        // A line that starts with "." is one octet longer on the wire: the stuffing dot
        // does not count. 998 octets of dots are legal, 999 are not.
        for (dots, ok) in [(998, true), (999, false)] {
            let mut wire = vec![b'.'; dots + 1];
            wire.extend_from_slice(b"\r\n.\r\n");
            let (n, msg) = read(&wire, 10_000);
            assert_eq!(n, Some(wire.len()), "{dots}");
            if ok {
                assert_eq!(msg.unwrap(), [vec![b'.'; dots], b"\r\n".to_vec()].concat());
            } else {
                assert_eq!(msg, Err(DataError::LineTooLong), "{dots}");
            }
        }
    }

    #[test]
    fn stuffing_round_trip() {
        let msg = b"a\r\n.\r\n..x\r\n";
        let wire = dot_stuff(msg);
        assert_eq!(wire, b"a\r\n..\r\n...x\r\n.\r\n");
        let (n, got) = read(&wire, 100);
        assert_eq!(n, Some(wire.len()));
        assert_eq!(got.unwrap(), msg);
    }
}
