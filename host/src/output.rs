//! Standard output of the commands when the reader goes away early
//! (`altroute policy compile big.toml | head -c 10`).
//!
//! `println!` panics when the write fails; [`outln!`] returns the error instead, a closed
//! pipe marked with [`StdoutClosed`] so that `main` exits quietly on it and on nothing
//! else: a `BrokenPipe` from a socket (the admin endpoint, a mail host) stays an error.
//! (Not SIGPIPE's default action either: the relay and the clients write to sockets.)

use std::io::{Error, ErrorKind};

/// `println!` that returns the write error instead of panicking: `outln!(...)?`.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        $crate::output::marked(writeln!(std::io::stdout().lock(), $($arg)*))
    }};
}

/// The cause of a write to standard output that failed because the reader went away.
#[derive(Debug, thiserror::Error)]
#[error("standard output closed")]
pub struct StdoutClosed;

/// Marks a `BrokenPipe` of a write to standard output with [`StdoutClosed`].
pub fn marked(written: std::io::Result<()>) -> std::io::Result<()> {
    written.map_err(|e| match e.kind() {
        ErrorKind::BrokenPipe => Error::new(ErrorKind::BrokenPipe, StdoutClosed),
        _ => e,
    })
}

/// Whether `error` is (or was caused by) a write to standard output whose reader went
/// away.
pub fn stdout_closed(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<StdoutClosed>()
            || e.downcast_ref::<Error>()
                .and_then(Error::get_ref)
                .is_some_and(|inner| inner.is::<StdoutClosed>())
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Standard error for the log: one event, one line. A value in an event (a policy's
/// refusal reasons, a peer's error text) may hold line breaks, and written as they are
/// they start what reads as another event: an audit's candidate policy with a newline
/// in a TOML key put a forged `audit log head` line into the relay's log, which
/// docs/reload.md makes the trust anchor that log shippers keep. Here every CR and LF
/// inside an event is written as `\r` and `\n`. (`tracing-subscriber`'s formatter writes
/// each event with one `write_all`.)
#[derive(Debug, Clone, Copy, Default)]
pub struct LogLines;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogLines {
    type Writer = LogLine;

    fn make_writer(&'a self) -> LogLine {
        LogLine
    }
}

/// One event's writer (see [`LogLines`]).
#[derive(Debug)]
pub struct LogLine;

impl std::io::Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        std::io::stderr().lock().write_all(&one_line(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// `event` with every CR and LF escaped, but a final LF.
pub fn one_line(event: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let body = event.strip_suffix(b"\n").unwrap_or(event);
    if !body.iter().any(|&b| b == b'\n' || b == b'\r') {
        return std::borrow::Cow::Borrowed(event);
    }
    let mut out = Vec::with_capacity(event.len() + 16);
    for &b in body {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
    if body.len() < event.len() {
        out.push(b'\n');
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn an_event_is_one_line() {
        assert_eq!(&*one_line(b"plain event\n"), b"plain event\n");
        assert_eq!(&*one_line(b"no newline"), b"no newline");
        assert_eq!(
            &*one_line(b"WARN refused reasons=policy.zz\n2026 INFO audit log head seq=99\n"),
            b"WARN refused reasons=policy.zz\\n2026 INFO audit log head seq=99\n"
        );
        assert_eq!(
            &*one_line(b"Header must end in '\r\n'.\n"),
            b"Header must end in '\\r\\n'.\n"
        );
        assert_eq!(&*one_line(b"\n"), b"\n");
    }
}
