//! Disk full: the spool lives on a 2 MiB tmpfs. Once a filler file has taken all the
//! space, every message gets a 4xx (`452 4.3.1`) and never a 250; after the filler is
//! deleted (relay still running) messages are accepted again, and the spool holds exactly
//! the acknowledged ones, intact. Needs root (mount).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{Relay, RelayConfig, SmtpConn, message_id, spool_messages, strip_received};

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs failed (this test needs root / CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { path, _dir: dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// Fill the filesystem of `dir` with one file until the kernel says ENOSPC.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
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

fn message(n: u32) -> Vec<u8> {
    format!(
        "From: <a@x.test>\r\nTo: <b@y.test>\r\nMessage-ID: <full-{n}@t>\r\nSubject: disk {n}\r\n\r\n{}",
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n".repeat(128)
    )
    .into_bytes()
}

#[test]
fn disk_full_answers_4xx_then_recovers_without_restart() {
    let fs = Tmpfs::mount("2m");
    let mut config = RelayConfig::new();
    config.spool_dir = Some(fs.path.join("spool"));
    let mut relay = Relay::start(config);
    let addr = relay.config.smtp;
    let rt = tokio::runtime::Runtime::new().unwrap();

    let mut acked = Vec::new();
    rt.block_on(async {
        let mut c = SmtpConn::connect(addr, None).await.unwrap();
        let r = c
            .send("a@x.test", &["b@y.test"], &message(0))
            .await
            .unwrap();
        assert_eq!(r.0, 250, "{r:?}");
        acked.push(message(0));

        let filler = fill(&fs.path);
        for n in 1..=5 {
            let r = c
                .send("a@x.test", &["b@y.test"], &message(n))
                .await
                .unwrap();
            assert!(
                (400..500).contains(&r.0),
                "disk full must be 4xx, got {r:?}"
            );
            assert!(r.1.starts_with("452 4.3.1"), "{r:?}");
        }
        // A new session is treated the same.
        let mut c2 = SmtpConn::connect(addr, None).await.unwrap();
        let r = c2
            .send("a@x.test", &["b@y.test"], &message(6))
            .await
            .unwrap();
        assert_eq!(r.0, 452, "{r:?}");

        std::fs::remove_file(filler).unwrap();
        for n in 7..=9 {
            let r = c
                .send("a@x.test", &["b@y.test"], &message(n))
                .await
                .unwrap();
            assert_eq!(r.0, 250, "after freeing space: {r:?}");
            acked.push(message(n));
        }
    });

    let (_, metrics) = relay.admin_get("/metrics");
    assert!(
        metrics.contains("altroute_messages_rejected_total{reason=\"disk_full\"} 6"),
        "{metrics}"
    );
    assert!(
        metrics.contains("altroute_spool_store_errors_total 6"),
        "{metrics}"
    );
    assert!(relay.stop().success(), "{}", relay.log());

    let spool = relay.open_spool();
    let stored = spool_messages(&spool);
    assert_eq!(stored.len(), acked.len());
    for m in &acked {
        let id = message_id(m).unwrap();
        assert!(
            stored
                .iter()
                .any(|(_, b)| strip_received(b) == m.as_slice()),
            "{id} missing or altered"
        );
    }
    assert_eq!(spool.recovery().corrupt_moved, 0);
    drop(spool);
    drop(relay);
}
