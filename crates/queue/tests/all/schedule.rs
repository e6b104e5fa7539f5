use std::sync::Arc;
use std::time::Duration;

use altroute_queue::{
    Clock, ManualClock, RecipientState, RetrySchedule, Selector, Spool, SpoolConfig,
};

use crate::{T0, envelope, message, open};

#[test]
fn default_schedule_backs_off_to_one_hour() {
    let s = RetrySchedule::default();
    let delays: Vec<u64> = (1..=7).map(|n| s.delay(n).as_secs()).collect();
    assert_eq!(delays, vec![300, 600, 1200, 2400, 3600, 3600, 3600]);
    assert_eq!(s.lifetime, Duration::from_secs(5 * 86400));
    assert_eq!(s.next_attempt(1, T0, T0 + 10), Some(T0 + 310));
    // The last retry is pulled in to the expiry time; after that, none.
    let end = T0 + 5 * 86400;
    assert_eq!(s.next_attempt(50, T0, end - 100), Some(end));
    assert_eq!(s.next_attempt(50, T0, end), None);
}

#[tokio::test]
async fn deferral_follows_the_manual_clock_until_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let schedule = RetrySchedule::new(
        Duration::from_secs(60),
        3,
        Duration::from_secs(1000),
        Duration::from_secs(4000),
    );
    let spool = Spool::open(dir.path(), SpoolConfig::with_retry(schedule), clock.clone()).unwrap();
    let id = spool
        .store(envelope(2), message("retry", 10))
        .await
        .unwrap();
    assert_eq!(spool.next_wakeup(), Some(0));

    let claimed = spool.claim_due(T0, 10);
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].due_recipients(T0), vec![0, 1]);
    // Claimed messages are not handed out twice.
    assert!(spool.claim_due(T0, 10).is_empty());
    assert!(spool.due(T0).is_empty());
    spool.delivered(&id, 1, "mx").await.unwrap();

    // Attempt times: 60, 180, 540, 1000 (capped) ... until the lifetime (4000 s).
    let mut seen = Vec::new();
    loop {
        let state = spool.defer(&id, 0, "421 busy").await.unwrap();
        spool.release(&id);
        match state {
            RecipientState::Deferred {
                next_attempt,
                attempts,
                ..
            } => {
                seen.push((attempts, next_attempt - clock.now()));
                assert_eq!(spool.next_wakeup(), Some(next_attempt));
                clock.set(next_attempt - 1);
                assert!(spool.due(clock.now()).is_empty(), "not due before its time");
                clock.set(next_attempt);
                assert_eq!(spool.claim_due(clock.now(), 10).len(), 1);
            }
            RecipientState::Expired { attempts, at, .. } => {
                assert_eq!(at, T0 + 4000);
                assert_eq!(attempts, 8);
                break;
            }
            other => panic!("unexpected state {other:?}"),
        }
    }
    // 60, 180, 540, then capped at 1000 until the last one is pulled in to the expiry
    // (T0+3780 + 220 = T0+4000); the attempt at the expiry expires the recipient.
    assert_eq!(
        seen,
        vec![
            (1, 60),
            (2, 180),
            (3, 540),
            (4, 1000),
            (5, 1000),
            (6, 1000),
            (7, 220)
        ]
    );
    assert!(spool.entry(&id).unwrap().is_finished());
    assert_eq!(spool.next_wakeup(), None);
    assert_eq!(spool.stats().expired, 1);
}

#[tokio::test]
async fn forced_retry_makes_deferred_mail_due_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let (a, b) = {
        let spool = open(dir.path(), &clock);
        let a = spool.store(envelope(1), message("a", 10)).await.unwrap();
        let b = spool.store(envelope(1), message("b", 10)).await.unwrap();
        spool.defer(&a, 0, "451").await.unwrap();
        spool.defer(&b, 0, "451").await.unwrap();
        spool.defer(&b, 0, "452").await.unwrap();
        assert!(spool.due(T0 + 10).is_empty());
        clock.advance(Duration::from_secs(10));
        assert_eq!(spool.retry_now(&Selector::One(a.clone())).await.unwrap(), 1);
        let due: Vec<_> = spool.due(clock.now()).into_iter().map(|e| e.id).collect();
        assert_eq!(due, vec![a.clone()]);
        (a, b)
    };
    let spool = open(dir.path(), &clock);
    assert_eq!(spool.due(clock.now()).len(), 1);
    assert_eq!(spool.retry_now(&Selector::All).await.unwrap(), 1);
    assert_eq!(spool.due(clock.now()).len(), 2);
    // Forced retry keeps the attempt count (and so the backoff position).
    assert_eq!(
        spool.entry(&b).unwrap().recipients[0],
        RecipientState::Deferred {
            next_attempt: T0 + 10,
            attempts: 2,
            reason: "452".into()
        }
    );
    let next = spool.defer(&a, 0, "451").await.unwrap();
    assert_eq!(next.attempts(), 2);
    assert_eq!(next.due_at(), Some(T0 + 10 + 600));
}

#[tokio::test]
async fn scheduler_is_woken_by_new_mail() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let spool = open(dir.path(), &clock);
    assert_eq!(spool.next_wakeup(), None);
    let waiter = {
        let spool = spool.clone();
        tokio::spawn(async move {
            spool.changed().await;
            spool.claim_due(T0, 10).len()
        })
    };
    spool.store(envelope(1), message("wake", 10)).await.unwrap();
    assert_eq!(waiter.await.unwrap(), 1);
    let st = spool.stats();
    assert_eq!((st.messages, st.in_flight, st.pending), (1, 1, 1));
}
