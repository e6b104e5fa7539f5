//! Opening the relay's own files (audit log, MTA-STS cache, TLS-RPT results) without
//! blocking: a FIFO put in the place of one once kept the relay from starting (the audit
//! log, the MTA-STS cache) or froze it while running (a TLS-RPT results file opened on
//! an async worker). Each is opened non-blocking and used only if it is a regular file.
//! The spool opens its files the same way; this is its function.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::path::Path;

/// `options` opened non-blocking, only if a regular file: the spool's own
/// ([`altroute_queue::open_regular_with`]).
pub use altroute_queue::open_regular_with as open_regular;

/// `create_dir_all` with mode 0700 for what it creates: the spool's own
/// ([`altroute_queue::create_private_dir_all`]).
pub use altroute_queue::create_private_dir_all;

/// `std::fs::read`, through [`open_regular`].
pub fn read_regular(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_regular(path, OpenOptions::new().read(true))?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("f");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let err = read_regular(&fifo).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = open_regular(&fifo, OpenOptions::new().append(true).create(true)).unwrap_err();
        assert!(
            err.kind() == io::ErrorKind::InvalidInput || err.raw_os_error() == Some(libc::ENXIO),
            "{err}"
        );
        std::fs::write(dir.path().join("r"), b"x").unwrap();
        assert_eq!(read_regular(&dir.path().join("r")).unwrap(), b"x");
    }
}
