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
