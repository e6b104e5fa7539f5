//! Message identity.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use crate::{Error, Timestamp};

/// Length of a message id: 9 hex digits of seconds, 6 of counter, 8 of randomness.
const ID_LEN: usize = 23;

/// A queue id, e.g. `0692580a1000007c3f9a21b`: time (seconds, hex) + per-process counter +
/// 32 random bits. Lowercase hex only, so it is safe as a file name and sorts by arrival.
///
/// Uniqueness: within a process the (second, counter) pair never repeats before 2^24 ids
/// per second; across restarts inside the same second the random part separates them
/// (and `store` refuses an id already in the queue).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MessageId(String);

impl MessageId {
    /// Parse an id typed by an operator (`altroute queue retry ID`).
    pub fn parse(s: &str) -> Result<MessageId, Error> {
        let ok = s.len() == ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(MessageId(s.to_owned()))
        } else {
            Err(Error::InvalidId(s.to_owned()))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for MessageId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        MessageId::parse(&s)
    }
}

impl From<MessageId> for String {
    fn from(id: MessageId) -> String {
        id.0
    }
}

/// Generates ids; one per spool.
#[derive(Debug)]
pub(crate) struct IdGen {
    counter: AtomicU32,
}

impl IdGen {
    pub(crate) fn new() -> Self {
        // Start at a random counter so two processes started in the same second diverge
        // in the counter as well as in the random suffix.
        IdGen {
            counter: AtomicU32::new(fastrand::u32(..)),
        }
    }

    pub(crate) fn next(&self, now: Timestamp) -> MessageId {
        let n = self.counter.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
        let secs = now & 0xf_ffff_ffff;
        MessageId(format!("{secs:09x}{n:06x}{:08x}", fastrand::u32(..)))
    }
}

/// The `Message-ID` header of a message, if any (first header block only, unfolded).
pub(crate) fn header_message_id(message: &[u8]) -> Option<String> {
    // Headers are at the top; 64 KiB is far more than any sane header block.
    let head = &message[..message.len().min(64 * 1024)];
    let mut lines = head.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return None;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if !line[..colon]
            .trim_ascii()
            .eq_ignore_ascii_case(b"message-id")
        {
            continue;
        }
        let mut value = line[colon + 1..].to_vec();
        // Continuation lines start with white space (RFC 5322 folding).
        while let Some(next) = lines.peek() {
            if next.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                let next = next.strip_suffix(b"\r").unwrap_or(next);
                value.extend_from_slice(next);
                lines.next();
            } else {
                break;
            }
        }
        let v = String::from_utf8_lossy(value.trim_ascii()).into_owned();
        return (!v.is_empty()).then_some(v);
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ids_are_unique_and_parse_back() {
        let g = IdGen::new();
        let a = g.next(1_700_000_000);
        let b = g.next(1_700_000_000);
        assert_ne!(a, b);
        assert_eq!(MessageId::parse(a.as_str()).unwrap(), a);
        assert!(MessageId::parse("../../etc/passwd").is_err());
        assert!(MessageId::parse("0692580A1000007C3F9A21B").is_err());
    }

    #[test]
    fn message_id_header() {
        let m = b"From: a@b\r\nMessage-Id:\r\n  <x@y>\r\nSubject: s\r\n\r\nMessage-ID: <no>\r\n";
        assert_eq!(header_message_id(m).as_deref(), Some("<x@y>"));
        assert_eq!(header_message_id(b"Subject: s\n\nMessage-ID: <b>\n"), None);
        assert_eq!(
            header_message_id(b"message-id: <a@b>\n\nbody").as_deref(),
            Some("<a@b>")
        );
    }
}
