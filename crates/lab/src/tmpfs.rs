//! A small tmpfs for disk-full tests: mounted in a temporary directory, unmounted on drop
//! (also when the test fails). Needs root (CAP_SYS_ADMIN), as the tests that use it say.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted for a test.
pub struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount(8)'s syntax: `1m`, `2m`). Panics, saying why, if it
    /// cannot: a disk-full test that cannot fill a disk must fail, not pass.
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).expect("the mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("run mount(8) (package `mount`)");
        assert!(
            out.status.success(),
            "mounting a tmpfs failed (this test needs root / CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { path, _dir: dir }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fills the filesystem with one file until the kernel says ENOSPC; returns the file,
    /// whose removal gives the space back.
    pub fn fill(&self) -> PathBuf {
        let path = self.path.join("filler");
        let mut f = std::fs::File::create(&path).expect("the filler file");
        let chunk = vec![0x5a_u8; 64 * 1024];
        loop {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}
