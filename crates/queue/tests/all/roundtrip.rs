use std::sync::Arc;

use altroute_queue::{Envelope, Error, ManualClock, RecipientState, Selector};

use crate::{T0, envelope, message, open};

#[tokio::test]
async fn store_reopen_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let mut env = envelope(3);
    env.requiretls = true;
    env.received_from = Some("192.0.2.7 client.example".into());
    env.env_id = Some("ENV-1".into());
    let body = message("round", 4096);
    let id = {
        let spool = open(dir.path(), &clock);
        let id = spool.store(env.clone(), body.clone()).await.unwrap();
        let e = spool.entry(&id).unwrap();
        assert_eq!(e.message_id.as_deref(), Some("<round@test>"));
        assert_eq!(e.recipients, vec![RecipientState::Pending; 3]);
        id
    };
    let spool = open(dir.path(), &clock);
    assert_eq!(spool.recovery().messages, 1);
    let e = spool.entry(&id).unwrap();
    let mut expected = env;
    expected.received_at = T0;
    assert_eq!(e.envelope, expected);
    assert_eq!(e.size, body.len() as u64);
    assert_eq!(e.message_id.as_deref(), Some("<round@test>"));
    assert_eq!(e.expires_at, T0 + 5 * 24 * 3600);
    assert_eq!(spool.read_message(&id).unwrap(), body);
    assert_eq!(spool.list().len(), 1);
}

#[tokio::test]
async fn recipient_states_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let id = {
        let spool = open(dir.path(), &clock);
        let id = spool
            .store(envelope(4), message("states", 100))
            .await
            .unwrap();
        spool.delivered(&id, 0, "mx1.example.net").await.unwrap();
        spool
            .defer(&id, 1, "451 4.7.5 STARTTLS failed")
            .await
            .unwrap();
        spool
            .bounce(&id, 2, "550 5.1.1 no such user")
            .await
            .unwrap();
        // A final recipient cannot be changed by the delivery verbs.
        assert!(matches!(
            spool.defer(&id, 0, "x").await,
            Err(Error::AlreadyFinal { index: 0, .. })
        ));
        assert!(matches!(
            spool.delivered(&id, 9, "x").await,
            Err(Error::NoSuchRecipient { index: 9, .. })
        ));
        id
    };
    let spool = open(dir.path(), &clock);
    let r = spool.entry(&id).unwrap().recipients;
    assert_eq!(
        r[0],
        RecipientState::Delivered {
            at: T0,
            via: "mx1.example.net".into()
        }
    );
    assert_eq!(
        r[1],
        RecipientState::Deferred {
            next_attempt: T0 + 300,
            attempts: 1,
            reason: "451 4.7.5 STARTTLS failed".into()
        }
    );
    assert_eq!(
        r[2],
        RecipientState::Bounced {
            at: T0,
            reason: "550 5.1.1 no such user".into()
        }
    );
    assert_eq!(r[3], RecipientState::Pending);
    let s = spool.stats();
    assert_eq!(
        (s.messages, s.pending, s.deferred, s.delivered, s.bounced),
        (1, 1, 1, 1, 1)
    );

    // Forced bounce finishes the message; remove deletes it durably.
    assert_eq!(
        spool
            .bounce_now(&Selector::One(id.clone()), "by operator")
            .await
            .unwrap(),
        2
    );
    assert_eq!(spool.finished(), vec![id.clone()]);
    spool.remove(&id).await.unwrap();
    assert!(spool.entry(&id).is_none());
    assert!(!spool.message_path(&id).exists());
    assert!(matches!(spool.remove(&id).await, Err(Error::NotFound(_))));
    drop(spool);
    let spool = open(dir.path(), &clock);
    assert!(spool.list().is_empty());
    assert_eq!(spool.clock().now(), T0);
}

#[tokio::test]
async fn rejects_empty_envelope_and_second_opener() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let spool = open(dir.path(), &clock);
    let err = spool
        .store(Envelope::new("a@b", vec![]), b"x".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoRecipients));
    assert_eq!(spool.stats().store_errors, 1);
    let second = altroute_queue::Spool::open(dir.path(), Default::default(), clock.clone());
    assert!(matches!(second, Err(Error::Locked(_))));
}

/// Messages are for the relay's eyes only, whatever the umask: an audit read every
/// queued message as `nobody` (files 0644, directories 0755). A new spool's directories
/// are 0700 and its files 0600; a spool made before has its message directories made
/// private when it opens.
#[tokio::test]
async fn messages_are_private_to_the_relay() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    let clock = Arc::new(ManualClock::new(T0));
    let id = {
        let spool = open(&root, &clock);
        spool
            .store(envelope(1), message("private", 100))
            .await
            .unwrap()
    };
    assert_eq!(mode(&root), 0o700);
    for sub in ["msg", "tmp", "corrupt"] {
        assert_eq!(mode(&root.join(sub)), 0o700, "{sub}");
    }
    assert_eq!(mode(&root.join("msg").join(id.as_str())), 0o600);
    assert_eq!(mode(&root.join("lock")), 0o600);

    // A spool of an older version: world-readable directories.
    for sub in ["msg", "tmp", "corrupt"] {
        let d = root.join(sub);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let spool = open(&root, &clock);
    for sub in ["msg", "tmp", "corrupt"] {
        assert_eq!(mode(&root.join(sub)), 0o700, "{sub} after reopening");
    }
    assert!(spool.entry(&id).is_some());
}
