//! Torn and partial files, as a crash at the wrong moment leaves them.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::sync::Arc;

use altroute_queue::{ManualClock, MessageId, RecipientState};

use crate::{T0, envelope, message, open};

fn append(path: &std::path::Path, bytes: &[u8]) {
    let mut f = OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

#[tokio::test]
async fn torn_files_are_recovered_without_losing_committed_data() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let (a, b, c, sizes) = {
        let spool = open(dir.path(), &clock);
        let a = spool.store(envelope(2), message("a", 3000)).await.unwrap();
        let b = spool.store(envelope(2), message("b", 5000)).await.unwrap();
        let c = spool.store(envelope(1), message("c", 100)).await.unwrap();
        spool.delivered(&a, 0, "mx-a").await.unwrap();
        spool.defer(&b, 1, "451 later").await.unwrap();
        let sizes: Vec<u64> = [&a, &b, &c]
            .iter()
            .map(|id| fs::metadata(spool.message_path(id)).unwrap().len())
            .collect();
        (a, b, c, sizes)
    };
    let msg_dir = dir.path().join("msg");

    // a: a state record cut in the middle of its header.
    append(&msg_dir.join(a.as_str()), &[0x20, 0x00, 0x00]);
    // b: a whole frame whose checksum does not match (a torn sector inside it).
    let payload = br#"S[{"r":1,"s":"Pending"}]"#;
    let mut bad = Vec::new();
    bad.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bad.extend_from_slice(&0xdead_beefu32.to_le_bytes());
    bad.extend_from_slice(payload);
    append(&msg_dir.join(b.as_str()), &bad);
    // A store that crashed before its rename: a truncated temp file.
    let full = fs::read(msg_dir.join(c.as_str())).unwrap();
    fs::write(
        dir.path().join("tmp").join("06553f1000000001deadbee"),
        &full[..full.len() / 2],
    )
    .unwrap();
    // A message file cut short (cannot happen through the spool, e.g. a bad disk):
    // it must be set aside, not crash recovery nor vanish.
    let cut_id = MessageId::parse("06553f1000000002deadbee").unwrap();
    fs::write(msg_dir.join(cut_id.as_str()), &full[..60]).unwrap();
    // A file that is not ours.
    fs::write(msg_dir.join("README"), b"hello").unwrap();

    let spool = open(dir.path(), &clock);
    let r = spool.recovery();
    assert_eq!(r.messages, 3, "{r:?}");
    assert_eq!(r.temp_files_removed, 1, "{r:?}");
    assert_eq!(r.torn_tails_truncated, 2, "{r:?}");
    assert_eq!(r.corrupt_moved, 1, "{r:?}");
    assert!(dir.path().join("corrupt").join(cut_id.as_str()).exists());
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    for (id, size) in [&a, &b, &c].iter().zip(&sizes) {
        assert_eq!(
            fs::metadata(spool.message_path(id)).unwrap().len(),
            *size,
            "torn tail of {id} cut back to the last good record"
        );
    }
    assert!(matches!(
        spool.entry(&a).unwrap().recipients[0],
        RecipientState::Delivered { .. }
    ));
    assert!(matches!(
        spool.entry(&b).unwrap().recipients[1],
        RecipientState::Deferred { attempts: 1, .. }
    ));
    assert_eq!(spool.read_message(&a).unwrap(), message("a", 3000));
    assert_eq!(spool.read_message(&b).unwrap(), message("b", 5000));

    // Records appended after recovery are found after the next reopen.
    spool.delivered(&a, 1, "mx-a2").await.unwrap();
    spool.delivered(&b, 0, "mx-b").await.unwrap();
    drop(spool);
    let spool = open(dir.path(), &clock);
    assert_eq!(spool.recovery().torn_tails_truncated, 0);
    assert!(spool.entry(&a).unwrap().is_finished());
    assert!(matches!(
        spool.entry(&b).unwrap().recipients[0],
        RecipientState::Delivered { .. }
    ));
}

#[tokio::test]
async fn corrupted_body_is_reported_not_returned() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let spool = open(dir.path(), &clock);
    let id = spool
        .store(envelope(1), message("flip", 2000))
        .await
        .unwrap();
    let path = spool.message_path(&id);
    let mut bytes = fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x01;
    fs::write(&path, bytes).unwrap();
    assert!(matches!(
        spool.read_message(&id),
        Err(altroute_queue::Error::Corrupt { .. })
    ));
}
