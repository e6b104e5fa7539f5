//! Never delete what may be someone's mail: a message whose body fails its checksum is
//! set aside in `corrupt/`, and one entry of `msg/` or `tmp/` that cannot be read (a
//! directory, a move that fails) does not keep the spool from opening. Needs root and
//! e2fsprogs (`chattr +i`) for the move that fails.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use altroute_lab::Immutable;
use altroute_queue::{Error, ManualClock, MessageId};

use crate::{T0, envelope, message, open};

/// Flips one bit of a stored message's `Subject:` (part of the body record): its
/// checksum no longer matches. Returns the file's bytes after the flip.
fn flip_body_bit(path: &Path) -> Vec<u8> {
    let mut bytes = fs::read(path).unwrap();
    let at = bytes.windows(8).position(|w| w == b"Subject:").unwrap();
    bytes[at] ^= 0x01;
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(&bytes[at..=at], at as u64)
        .unwrap();
    bytes
}

#[tokio::test]
async fn a_corrupt_message_is_set_aside_durably_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt");
    let clock = Arc::new(ManualClock::new(T0));
    let spool = open(dir.path(), &clock);
    let a = spool.store(envelope(2), message("a", 2000)).await.unwrap();
    let b = spool.store(envelope(1), message("b", 2000)).await.unwrap();
    let keep = spool
        .store(envelope(1), message("keep", 2000))
        .await
        .unwrap();
    spool.defer(&a, 1, "451 4.3.0 later").await.unwrap();

    let found_a = flip_body_bit(&spool.message_path(&a));
    let found_b = flip_body_bit(&spool.message_path(&b));
    assert!(matches!(spool.read_message(&a), Err(Error::Corrupt { .. })));
    // `corrupt/` has a file of b's name already (set aside by an earlier run).
    fs::write(corrupt.join(b.as_str()), b"an older file").unwrap();

    let dir_fsyncs = spool.stats().dir_fsyncs;
    let path_a = spool
        .set_aside(&a, "message body checksum mismatch")
        .await
        .unwrap();
    assert_eq!(path_a, corrupt.join(a.as_str()));
    assert_eq!(
        spool.stats().dir_fsyncs,
        dir_fsyncs + 2,
        "corrupt/ and msg/ fsynced"
    );
    let path_b = spool
        .set_aside(&b, "message body checksum mismatch")
        .await
        .unwrap();
    assert_eq!(path_b, corrupt.join(format!("{b}.1")));

    // Out of the queue, kept as found.
    assert_eq!(fs::read(&path_a).unwrap(), found_a);
    assert_eq!(fs::read(&path_b).unwrap(), found_b);
    assert_eq!(
        fs::read(corrupt.join(b.as_str())).unwrap(),
        b"an older file"
    );
    assert!(!spool.message_path(&a).exists());
    assert!(!spool.message_path(&b).exists());
    assert!(spool.entry(&a).is_none());
    let listed: Vec<MessageId> = spool.list().into_iter().map(|e| e.id).collect();
    assert_eq!(listed, vec![keep.clone()]);
    assert_eq!(spool.stats().corrupt_moved, 2);
    assert!(matches!(
        spool.defer(&a, 0, "451 again").await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(spool.remove(&a).await, Err(Error::NotFound(_))));
    assert!(matches!(
        spool.set_aside(&a, "twice").await,
        Err(Error::NotFound(_))
    ));

    // A restart finds them where they were put.
    drop(spool);
    let spool = open(dir.path(), &clock);
    let r = spool.recovery();
    assert_eq!((r.messages, r.corrupt_moved), (1, 0), "{r:?}");
    assert!(path_a.exists() && path_b.exists());
    assert_eq!(spool.read_message(&keep).unwrap(), message("keep", 2000));
}

#[tokio::test]
async fn a_message_file_cut_short_reads_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let spool = open(dir.path(), &clock);
    let id = spool
        .store(envelope(1), message("cut", 2000))
        .await
        .unwrap();
    let path = spool.message_path(&id);
    let len = fs::metadata(&path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    match spool.read_message(&id) {
        Err(Error::Corrupt { reason, .. }) => assert!(reason.contains("truncated"), "{reason}"),
        other => panic!("expected corrupt, got {other:?}"),
    }
}

/// The audit's reproduction: a directory named like a message id in `msg/`, and one in
/// `tmp/`, made the relay refuse to start (`Is a directory`). An entry that cannot be
/// read is not known to be corrupt: it is left where it is (moved aside, mail once left
/// the queue without a DSN), counted; a corrupt file goes to `corrupt/`, next to an
/// older one of the same name.
#[tokio::test]
async fn a_directory_in_msg_or_tmp_does_not_stop_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let (a, b) = {
        let spool = open(dir.path(), &clock);
        let a = spool.store(envelope(1), message("a", 500)).await.unwrap();
        let b = spool.store(envelope(2), message("b", 500)).await.unwrap();
        (a, b)
    };
    let msg_dir = dir.path().join("msg");
    let odd = msg_dir.join("000000000000000deadbeef");
    fs::create_dir(&odd).unwrap();
    fs::write(odd.join("inside"), b"kept").unwrap();
    let garbage = msg_dir.join("06553f1000000002deadbee");
    fs::write(&garbage, b"not a spool file").unwrap();
    // corrupt/ has that name already: the garbage goes next to it.
    let corrupt = dir.path().join("corrupt");
    fs::write(corrupt.join("06553f1000000002deadbee"), b"older").unwrap();
    let tmp_dir = dir.path().join("tmp");
    fs::create_dir(tmp_dir.join("x")).unwrap();
    fs::write(tmp_dir.join("06553f1000000001deadbee"), b"half a store").unwrap();

    let spool = open(dir.path(), &clock);
    let r = spool.recovery().clone();
    assert_eq!(r.messages, 2, "{r:?}");
    assert_eq!(r.corrupt_moved, 1, "{r:?}");
    assert_eq!(r.temp_files_removed, 1, "{r:?}");
    assert_eq!(
        r.unreadable_skipped, 2,
        "the directories in msg/ and tmp/: {r:?}"
    );
    assert_eq!(fs::read(odd.join("inside")).unwrap(), b"kept");
    assert_eq!(
        fs::read(corrupt.join("06553f1000000002deadbee.1")).unwrap(),
        b"not a spool file"
    );
    assert_eq!(
        fs::read(corrupt.join("06553f1000000002deadbee")).unwrap(),
        b"older"
    );
    assert!(tmp_dir.join("x").is_dir(), "not ours to remove");
    assert!(!tmp_dir.join("06553f1000000001deadbee").exists());
    assert_eq!(spool.read_message(&a).unwrap(), message("a", 500));
    assert_eq!(spool.read_message(&b).unwrap(), message("b", 500));
    assert_eq!(spool.stats().corrupt_moved, 1);
}

/// When even the move to `corrupt/` fails (here `corrupt/` is immutable), the entry is
/// logged, counted and left where it is; every other message is recovered and the spool
/// works. Once the move can succeed, the next recovery makes it.
#[tokio::test]
async fn an_entry_that_cannot_be_moved_aside_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let a = {
        let spool = open(dir.path(), &clock);
        spool.store(envelope(1), message("a", 500)).await.unwrap()
    };
    let msg_dir = dir.path().join("msg");
    let odd = msg_dir.join("000000000000000deadbeef");
    fs::create_dir(&odd).unwrap();
    let garbage = msg_dir.join("06553f1000000002deadbee");
    fs::write(&garbage, b"not a spool file").unwrap();

    let frozen = Immutable::set(&dir.path().join("corrupt"));
    let spool = open(dir.path(), &clock);
    let r = spool.recovery().clone();
    assert_eq!(r.messages, 1, "{r:?}");
    assert_eq!(r.corrupt_moved, 0, "{r:?}");
    assert_eq!(r.unreadable_skipped, 2, "{r:?}");
    assert!(odd.is_dir());
    assert_eq!(fs::read(&garbage).unwrap(), b"not a spool file");
    assert_eq!(spool.read_message(&a).unwrap(), message("a", 500));
    // The spool works: a store and a state change.
    let b = spool.store(envelope(1), message("b", 500)).await.unwrap();
    spool.delivered(&a, 0, "mx").await.unwrap();
    drop(spool);

    drop(frozen);
    let spool = open(dir.path(), &clock);
    let r = spool.recovery();
    assert_eq!(
        (r.messages, r.corrupt_moved, r.unreadable_skipped),
        (2, 1, 1),
        "{r:?}"
    );
    assert!(
        odd.is_dir() && !garbage.exists(),
        "the directory stays in msg/"
    );
    assert!(spool.entry(&a).unwrap().is_finished());
    assert_eq!(spool.read_message(&b).unwrap(), message("b", 500));
}

/// A damaged body length (here 64 bytes short) made recovery take everything after that
/// offset for a torn tail and cut it off: the end of the body and every state record.
/// Now the body is checked first, and the file goes to `corrupt/` exactly as found.
#[tokio::test]
async fn a_damaged_body_length_is_set_aside_as_found_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let id = {
        let spool = open(dir.path(), &clock);
        let id = spool
            .store(envelope(2), message("len", 2000))
            .await
            .unwrap();
        spool.delivered(&id, 0, "mx").await.unwrap();
        id
    };
    let path = dir.path().join("msg").join(id.as_str());
    let mut bytes = fs::read(&path).unwrap();
    // The body frame follows the magic and the envelope frame.
    let env_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let body_at = 8 + 8 + env_len;
    let len = u32::from_le_bytes(bytes[body_at..body_at + 4].try_into().unwrap());
    bytes[body_at..body_at + 4].copy_from_slice(&(len - 64).to_le_bytes());
    fs::write(&path, &bytes).unwrap();

    let spool = open(dir.path(), &clock);
    let r = spool.recovery().clone();
    assert_eq!(
        (r.messages, r.corrupt_moved, r.torn_tails_truncated),
        (0, 1, 0),
        "{r:?}"
    );
    assert_eq!(
        fs::read(dir.path().join("corrupt").join(id.as_str())).unwrap(),
        bytes,
        "moved as found"
    );
}

/// One damaged byte in a state record with whole records after it is damage, not a torn
/// tail: the record is skipped and the ones after it (a delivery among them) still count.
/// Recovery once cut the file at the damaged record, and an audit's delivered recipient
/// was delivered again.
#[tokio::test]
async fn a_damaged_state_record_in_the_middle_does_not_cut_the_ones_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let (id, size) = {
        let spool = open(dir.path(), &clock);
        let id = spool.store(envelope(2), message("mid", 500)).await.unwrap();
        spool.defer(&id, 1, "451 4.3.0 first").await.unwrap();
        spool.delivered(&id, 0, "mx").await.unwrap();
        spool.defer(&id, 1, "451 4.3.0 later").await.unwrap();
        let size = fs::metadata(spool.message_path(&id)).unwrap().len();
        (id, size)
    };
    let path = dir.path().join("msg").join(id.as_str());
    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.windows(5).position(|w| w == b"first").unwrap();
    bytes[at] ^= 0x01;
    fs::write(&path, &bytes).unwrap();

    let spool = open(dir.path(), &clock);
    let r = spool.recovery().clone();
    assert_eq!(
        (r.messages, r.corrupt_moved, r.torn_tails_truncated),
        (1, 0, 0),
        "{r:?}"
    );
    let entry = spool.entry(&id).unwrap();
    assert!(
        matches!(
            entry.recipients[0],
            altroute_queue::RecipientState::Delivered { .. }
        ),
        "{:?}",
        entry.recipients
    );
    assert!(
        matches!(&entry.recipients[1], altroute_queue::RecipientState::Deferred { reason, .. } if reason.contains("later")),
        "{:?}",
        entry.recipients
    );
    assert_eq!(fs::metadata(&path).unwrap().len(), size, "nothing cut");
}

/// A FIFO named like a message, in `msg/` at start or in a queued message's place:
/// recovery once blocked opening it (the relay never started), and a state write too (the
/// message never finished, nor did shutdown). Now neither blocks: recovery leaves it in
/// `msg/`, counted, and the state write fails at once.
#[tokio::test]
async fn a_fifo_in_msg_blocks_neither_recovery_nor_a_state_write() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let id = {
        let spool = open(dir.path(), &clock);
        spool.store(envelope(1), message("f", 500)).await.unwrap()
    };
    let mkfifo = |p: &Path| {
        assert!(
            std::process::Command::new("mkfifo")
                .arg(p)
                .status()
                .unwrap()
                .success()
        );
    };
    mkfifo(&dir.path().join("msg").join("06553f1000000003deadbee"));
    let spool = open(dir.path(), &clock);
    let r = spool.recovery().clone();
    assert_eq!((r.messages, r.unreadable_skipped), (1, 1), "{r:?}");
    // The queued message's file becomes a FIFO while it is queued.
    let path = spool.message_path(&id);
    fs::remove_file(&path).unwrap();
    mkfifo(&path);
    assert!(spool.read_message(&id).is_err());
    assert!(spool.defer(&id, 0, "451 4.4.1 later").await.is_err());
}
