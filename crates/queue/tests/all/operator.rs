//! Operator actions (`altroute queue bounce`): a claimed message is not handed to
//! delivery, a message in flight cannot be claimed, and `bounce_open` names exactly the
//! recipients it bounced.
//! A hold (results that could not be recorded) keeps a due message from being claimed.

use std::sync::Arc;

use altroute_queue::{Clock, Error, ManualClock, MessageId, RecipientState};

use crate::{T0, envelope, message, open};

#[tokio::test]
async fn claim_bounce_release() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let spool = open(dir.path(), &clock);
    assert_eq!(spool.stats().oldest_received_at, None);
    let id = spool.store(envelope(3), message("op", 10)).await.unwrap();
    clock.advance(std::time::Duration::from_secs(60));
    spool.delivered(&id, 1, "mx.test").await.unwrap();

    // An operator claim keeps delivery away, and a second claim is refused.
    let entry = spool.claim(&id).unwrap();
    assert_eq!(entry.id, id);
    assert!(spool.is_in_flight(&id));
    assert!(spool.claim_due(clock.now(), 10).is_empty());
    assert!(matches!(spool.claim(&id), Err(Error::InFlight(_))));

    // Only the open recipients (0 and 2) are bounced, in one record.
    let bounced = spool
        .bounce_open(&id, "550 5.0.0 by operator")
        .await
        .unwrap();
    assert_eq!(bounced, vec![0, 2]);
    let entry = spool.entry(&id).unwrap();
    assert!(matches!(
        entry.recipients[1],
        RecipientState::Delivered { .. }
    ));
    assert_eq!(
        entry.recipients[2],
        RecipientState::Bounced {
            at: T0 + 60,
            reason: "550 5.0.0 by operator".into()
        }
    );
    // Nothing left to bounce the second time.
    assert!(spool.bounce_open(&id, "again").await.unwrap().is_empty());
    spool.release(&id);
    assert!(!spool.is_in_flight(&id));
    assert_eq!(spool.finished(), vec![id.clone()]);

    // A claim on a message that is being delivered is refused.
    let other = spool.store(envelope(1), message("busy", 10)).await.unwrap();
    // The oldest message is still the first one.
    assert_eq!(spool.stats().oldest_received_at, Some(T0));
    assert_eq!(spool.claim_due(clock.now(), 10)[0].id, other);
    assert!(matches!(spool.claim(&other), Err(Error::InFlight(_))));

    // Unknown ids are NotFound.
    let unknown = MessageId::parse("00000000000000000000000").unwrap();
    assert!(matches!(spool.claim(&unknown), Err(Error::NotFound(_))));
    assert!(matches!(
        spool.bounce_open(&unknown, "x").await,
        Err(Error::NotFound(_))
    ));
}

/// A held message is not due before the end of its hold, whatever its recipients say,
/// and the scheduler's wake-up time follows the hold; `retry_now` lifts it.
#[tokio::test]
async fn a_hold_keeps_a_due_message_from_being_claimed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let spool = open(dir.path(), &clock);
    let id = spool.store(envelope(1), message("held", 10)).await.unwrap();
    assert_eq!(spool.next_wakeup(), Some(0));

    spool.hold(&id, T0 + 300);
    assert!(spool.due(T0).is_empty());
    assert!(spool.claim_due(T0 + 299, 10).is_empty());
    assert_eq!(spool.next_wakeup(), Some(T0 + 300));
    assert_eq!(spool.claim_due(T0 + 300, 10)[0].id, id);
    spool.release(&id);

    spool.hold(&id, T0 + 600);
    assert_eq!(
        spool
            .retry_now(&altroute_queue::Selector::All)
            .await
            .unwrap(),
        0
    );
    assert_eq!(spool.due(T0)[0].id, id);
}
