//! A full disk: `store` fails (never a false success) and works again once space returns.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use altroute_queue::{Error, ManualClock, MessageId};

use crate::{T0, envelope, message, open};

/// A 1 MiB tmpfs mounted for the test, unmounted on drop (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Tmpfs {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(at)
            .output()
            .expect("running mount(8) (package `mount`)");
        assert!(
            out.status.success(),
            "mounting a tmpfs failed (the disk-full test must run as root with CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

async fn fill(spool: &altroute_queue::Spool, tag: &str) -> (Vec<MessageId>, Error) {
    let mut ok = Vec::new();
    for i in 0..5000 {
        match spool
            .store(envelope(2), message(&format!("{tag}{i}"), 4096))
            .await
        {
            Ok(id) => ok.push(id),
            Err(e) => return (ok, e),
        }
    }
    panic!("a 1 MiB file system never filled up");
}

#[tokio::test]
async fn disk_full_fails_stores_and_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = Tmpfs::mount(dir.path());
    let clock = Arc::new(ManualClock::new(T0));
    let spool = open(&mnt.0, &clock);

    let (mut stored, err) = fill(&spool, "f").await;
    println!("disk full after {} stores: {err}", stored.len());
    assert!(err.is_disk_full(), "expected ENOSPC, got {err:?}");
    assert!(stored.len() > 10);
    for i in 0..5 {
        let r = spool
            .store(envelope(1), message(&format!("more{i}"), 4096))
            .await;
        assert!(r.is_err(), "a store on a full disk must not report success");
    }
    // Failed stores leave nothing behind (no temp files eating space).
    assert_eq!(std::fs::read_dir(mnt.0.join("tmp")).unwrap().count(), 0);

    // State changes on a full disk either succeed durably or fail cleanly.
    let mut state_errors = 0;
    for id in &stored {
        if spool.delivered(id, 0, "mx").await.is_err() {
            state_errors += 1;
        }
    }
    let memory: Vec<_> = stored.iter().map(|id| spool.entry(id).unwrap()).collect();

    // Free space: remove a third of the messages; stores work again, no restart needed.
    let freed: Vec<MessageId> = stored.drain(..stored.len() / 3).collect();
    for id in &freed {
        spool.remove(id).await.unwrap();
    }
    let mut again = Vec::new();
    for i in 0..5 {
        again.push(
            spool
                .store(envelope(1), message(&format!("again{i}"), 4096))
                .await
                .unwrap(),
        );
    }
    for id in &again {
        spool.delivered(id, 0, "mx").await.unwrap();
    }
    println!(
        "{state_errors} state changes refused while full; {} messages freed, stores accepted again",
        freed.len()
    );

    drop(spool);
    let spool = open(&mnt.0, &clock);
    assert_eq!(spool.recovery().corrupt_moved, 0);
    assert_eq!(spool.list().len(), stored.len() + again.len());
    for e in memory.iter().filter(|e| !freed.contains(&e.id)) {
        assert_eq!(
            spool.entry(&e.id).as_ref(),
            Some(e),
            "disk and memory agree"
        );
        assert!(spool.read_message(&e.id).is_ok());
    }
    for id in &again {
        assert!(spool.entry(id).unwrap().recipients[0] != altroute_queue::RecipientState::Pending);
    }
    drop(spool);
}
