//! SMTP replies: the [`Reply`] type shared by server and client, and the
//! incremental [`ReplyReader`] the client uses to parse multi-line replies.

use std::fmt;

/// Longest reply line the client accepts, in octets including CRLF. RFC 5321
/// 4.5.3.1.5 sets 512; real servers exceed it, so we allow more but stay bounded.
pub const MAX_REPLY_LINE: usize = 4096;

/// Most lines in one multi-line reply (an EHLO reply has a dozen or so).
pub const MAX_REPLY_LINES: usize = 128;

/// An SMTP reply: a three-digit code, an optional enhanced status code
/// (RFC 3463) and one or more text lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Basic reply code, e.g. 250.
    pub code: u16,
    /// Enhanced status code (class, subject, detail), e.g. `(2, 1, 0)`.
    pub enhanced: Option<(u8, u16, u16)>,
    /// Text lines with the code and enhanced code removed. At least one line
    /// (possibly empty).
    pub text: Vec<String>,
}

impl Reply {
    /// A one-line reply with an enhanced status code.
    pub fn new(code: u16, enhanced: (u8, u16, u16), text: impl Into<String>) -> Self {
        Self {
            code,
            enhanced: Some(enhanced),
            text: vec![text.into()],
        }
    }

    /// `250 2.0.0 OK`.
    pub fn ok() -> Self {
        Self::new(250, (2, 0, 0), "OK")
    }

    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 3xx (e.g. 354 after DATA, 334 during AUTH).
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    /// 4xx: try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx: do not retry.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The wire form, CRLF-terminated, multi-line as needed.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        let lines: &[String] = if self.text.is_empty() {
            &[]
        } else {
            &self.text
        };
        let count = lines.len().max(1);
        for i in 0..count {
            let sep = if i + 1 == count { ' ' } else { '-' };
            let text = lines.get(i).map(String::as_str).unwrap_or("");
            let line = match self.enhanced {
                Some((c, s, d)) => format!("{}{sep}{c}.{s}.{d} {text}\r\n", self.code),
                None => format!("{}{sep}{text}\r\n", self.code),
            };
            // Reply text must not carry CR/LF of its own: that would let an
            // embedder-supplied string forge extra reply lines.
            let line = sanitize_line(&line);
            out.extend_from_slice(line.as_bytes());
        }
        out
    }

    /// Parse the reply lines (without CRLF). Returns `None` if they are not a
    /// well-formed reply (codes differ, bad code, no lines).
    pub fn from_lines(lines: &[&[u8]]) -> Option<Self> {
        let first = lines.first()?;
        let code = parse_code(first)?;
        let mut enhanced = None;
        let mut text = Vec::with_capacity(lines.len());
        for (i, line) in lines.iter().enumerate() {
            if parse_code(line)? != code {
                return None;
            }
            let rest = String::from_utf8_lossy(line.get(4..).unwrap_or(&[])).into_owned();
            let (esc, rest) = split_enhanced(&rest, code);
            if i == 0 {
                enhanced = esc;
            }
            text.push(rest);
        }
        Some(Self {
            code,
            enhanced,
            text,
        })
    }

    /// All text lines joined with a space, for logs and bounce messages.
    pub fn message(&self) -> String {
        self.text.join(" ")
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.enhanced {
            Some((c, s, d)) => write!(f, "{} {c}.{s}.{d} {}", self.code, self.message()),
            None => write!(f, "{} {}", self.code, self.message()),
        }
    }
}

fn sanitize_line(line: &str) -> String {
    let body = line.strip_suffix("\r\n").unwrap_or(line);
    let mut s: String = body.chars().filter(|c| *c != '\r' && *c != '\n').collect();
    s.push_str("\r\n");
    s
}

fn parse_code(line: &[u8]) -> Option<u16> {
    let digits = line.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&digits[0]) {
        return None;
    }
    match line.get(3) {
        None | Some(b' ') | Some(b'-') => {}
        Some(_) => return None,
    }
    Some(
        digits
            .iter()
            .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0')),
    )
}

/// Split `"2.1.0 text"` into the enhanced code and the text. The class must
/// match the reply code's first digit (RFC 3463 section 3).
fn split_enhanced(text: &str, code: u16) -> (Option<(u8, u16, u16)>, String) {
    let (head, rest) = match text.split_once(' ') {
        Some((h, r)) => (h, r),
        None => (text, ""),
    };
    let mut parts = head.split('.');
    let parsed = (|| {
        let c: u8 = parts.next()?.parse().ok()?;
        let s: u16 = parts.next()?.parse().ok()?;
        let d: u16 = parts.next()?.parse().ok()?;
        if parts.next().is_some() || u16::from(c) != code / 100 || s > 999 || d > 999 {
            return None;
        }
        Some((c, s, d))
    })();
    match parsed {
        Some(esc) => (Some(esc), rest.to_string()),
        None => (None, text.to_string()),
    }
}

/// Why a byte stream is not a valid reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyError {
    /// A line exceeded [`MAX_REPLY_LINE`].
    #[error("reply line too long")]
    LineTooLong,
    /// More than [`MAX_REPLY_LINES`] lines.
    #[error("too many reply lines")]
    TooManyLines,
    /// Not `ddd[ -]text`, or the code changed within a multi-line reply.
    #[error("malformed reply: {0:?}")]
    Malformed(String),
}

/// Incremental reply parser: feed bytes, get complete replies. Pure (no I/O),
/// so it can be fuzzed and tested by moving bytes in memory.
#[derive(Debug, Default)]
pub struct ReplyReader {
    line: Vec<u8>,
    lines: Vec<Vec<u8>>,
}

impl ReplyReader {
    /// A reader with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Consume bytes from `input` until one reply is complete. Returns the
    /// number of bytes consumed and the reply if it completed; bytes after
    /// the reply are left for the next call (pipelined replies).
    pub fn feed(&mut self, input: &[u8]) -> Result<(usize, Option<Reply>), ReplyError> {
        for (i, &b) in input.iter().enumerate() {
            if b != b'\n' {
                if self.line.len() >= MAX_REPLY_LINE {
                    return Err(ReplyError::LineTooLong);
                }
                self.line.push(b);
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let last = line.get(3) != Some(&b'-');
            self.lines.push(line);
            if self.lines.len() > MAX_REPLY_LINES {
                return Err(ReplyError::TooManyLines);
            }
            if last {
                let lines = std::mem::take(&mut self.lines);
                let refs: Vec<&[u8]> = lines.iter().map(Vec::as_slice).collect();
                return match Reply::from_lines(&refs) {
                    Some(reply) => Ok((i + 1, Some(reply))),
                    None => Err(ReplyError::Malformed(
                        String::from_utf8_lossy(refs.first().copied().unwrap_or(&[])).into_owned(),
                    )),
                };
            }
        }
        Ok((input.len(), None))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_multiline() {
        let r = Reply {
            code: 250,
            enhanced: None,
            text: vec!["mx.example".into(), "PIPELINING".into(), "SIZE 10".into()],
        };
        let bytes = r.to_bytes();
        assert_eq!(
            bytes,
            b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
        );
        let mut rd = ReplyReader::new();
        let (n, got) = rd.feed(&bytes).unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(got.unwrap(), r);
    }

    #[test]
    fn enhanced_codes() {
        let mut rd = ReplyReader::new();
        let (_, got) = rd.feed(b"550 5.7.1 Relaying denied\r\n").unwrap();
        let got = got.unwrap();
        assert_eq!(got.enhanced, Some((5, 7, 1)));
        assert_eq!(got.text, vec!["Relaying denied".to_string()]);
        // Class mismatch: not an enhanced code.
        let (_, got) = rd.feed(b"250 5.7.1 x\r\n").unwrap();
        assert_eq!(got.unwrap().enhanced, None);
        assert!(rd.feed(b"25x oops\r\n").is_err());
    }

    #[test]
    fn text_cannot_inject_lines() {
        let r = Reply::new(250, (2, 0, 0), "ok\r\n250 forged");
        assert_eq!(r.to_bytes(), b"250 2.0.0 ok250 forged\r\n");
    }
}
