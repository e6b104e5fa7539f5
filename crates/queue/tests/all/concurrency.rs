use std::sync::Arc;

use altroute_queue::ManualClock;

use crate::{T0, envelope, message, open};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundreds_of_concurrent_stores_are_durable_and_group_committed() {
    const N: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let spool = open(dir.path(), &clock);
    let mut tasks = Vec::new();
    for i in 0..N {
        let spool = spool.clone();
        tasks.push(tokio::spawn(async move {
            let id = spool
                .store(envelope(1 + i % 3), message(&format!("c{i}"), 4096))
                .await
                .unwrap();
            (i, id)
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    let stats = spool.stats();
    println!(
        "{N} concurrent stores: {} file fsyncs, {} directory fsyncs in {} group commits, largest batch {}",
        stats.file_fsyncs, stats.dir_fsyncs, stats.commit_batches, stats.max_batch
    );
    assert_eq!(stats.stored, N as u64);
    assert_eq!(stats.messages, N as u64);
    assert_eq!(stats.file_fsyncs, N as u64);
    assert!(
        stats.dir_fsyncs < N as u64 && stats.max_batch > 1,
        "stores must share directory fsyncs: {stats:?}"
    );
    let mut unique: Vec<_> = ids.iter().map(|(_, id)| id.clone()).collect();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), N, "ids are unique");

    drop(spool);
    let spool = open(dir.path(), &clock);
    assert_eq!(spool.recovery().messages, N as u64);
    for (i, id) in ids {
        let e = spool.entry(&id).unwrap();
        assert_eq!(e.recipients.len(), 1 + i % 3);
        assert_eq!(e.message_id, Some(format!("<c{i}@test>")));
        assert_eq!(
            spool.read_message(&id).unwrap(),
            message(&format!("c{i}"), 4096)
        );
    }
}
