//! Opening the relay's own files (audit log, MTA-STS cache, TLS-RPT results) without
//! blocking: a FIFO put in the place of one once kept the relay from starting (the audit
//! log, the MTA-STS cache) or froze it while running (a TLS-RPT results file opened on
//! an async worker). Each is opened non-blocking and used only if it is a regular file.
//! The spool has its own (`altroute_queue`, which cannot depend on the host).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `options` (read, write, append, create...) opened non-blocking: the file if it is a
/// regular file, else an `InvalidInput` error (`not a regular file`).
pub fn open_regular(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    let file = options.custom_flags(libc::O_NONBLOCK).open(path)?;
    if file.metadata()?.is_file() {
        Ok(file)
    } else {
        // Without the path: every caller names it, as for the other errors of `open`.
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ))
    }
}

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
