//! `chattr +i` for a test's lifetime: nothing can be created in an immutable directory,
//! renamed out of it or written to an immutable file (root included), so tests can make a
//! write fail where they choose. Needs root and a file system with attributes (ext4), as
//! the tests that use it say.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A file or directory made immutable until dropped (also when the test fails).
pub struct Immutable(PathBuf);

impl Immutable {
    /// `chattr +i path`. Panics, saying why, if it cannot: a test of a failing write that
    /// cannot make the write fail must fail, not pass.
    pub fn set(path: &Path) -> Immutable {
        let out = Command::new("chattr")
            .arg("+i")
            .arg(path)
            .output()
            .expect("running chattr(1) (package `e2fsprogs`)");
        assert!(
            out.status.success(),
            "chattr +i failed (this test needs root and a file system with attributes): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Immutable(path.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}
