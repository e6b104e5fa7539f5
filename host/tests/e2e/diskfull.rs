//! Disk full: the spool lives on a 2 MiB tmpfs. Once a filler file has taken all the
//! space, every message gets a 4xx (`452 4.3.1`) and never a 250; after the filler is
//! deleted (relay still running) messages are accepted again, and the spool holds exactly
//! the acknowledged ones, intact. And a DSN that cannot be queued leaves its recipient
//! deferred rather than final. Needs root (mount, chattr).

use altroute_lab::{Immutable, Tmpfs};

use crate::support::{Relay, RelayConfig, SmtpConn, message_id, spool_messages, strip_received};

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
    config.spool_dir = Some(fs.path().join("spool"));
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

        let filler = fs.fill();
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

/// A relay in the in-process harness with one message from alice@corp.test to
/// bob@busy.test, whose MX answers 4xx to RCPT: the first attempt has deferred it. Also
/// the lab and the index of the sender's MX, where DSNs arrive.
async fn deferred_at_a_busy_mx() -> (
    crate::inproc::Lab,
    usize,
    crate::inproc::Relay,
    altroute_queue::MessageId,
) {
    use altroute::policy_engine::PolicyEngine;
    use altroute_lab::{FailAt, SinkMode};

    use crate::inproc::{Lab, Relay, Tls, policy};

    let mut lab = Lab::new().await;
    lab.mx(
        "busy.test",
        "mx.busy.test",
        Tls::Valid,
        SinkMode::TempFail(FailAt::Rcpt),
    )
    .await;
    let sender_mx = lab
        .mx("corp.test", "mx.corp.test", Tls::Valid, SinkMode::Accept)
        .await;
    let engine = PolicyEngine::standard(&policy(lab.port, false, "")).unwrap();
    let relay = Relay::start(&lab, engine).await;
    let id = relay
        .send("alice@corp.test", &["bob@busy.test"], false)
        .await;
    relay.settled(&id).await.unwrap();
    (lab, sender_mx, relay, id)
}

/// An expiry whose DSN cannot be queued (the spool cannot take a new message: its
/// `tmp` directory is made immutable) is not made final: the recipient stays deferred
/// and the message queued. Once the spool takes messages again, the next attempt expires
/// it again, and this time the DSN goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dsn_that_cannot_be_queued_leaves_the_recipient_deferred() {
    use altroute_queue::RecipientState;

    use crate::inproc::{Relay, dsn_for};

    let (lab, sender_mx, relay, id) = deferred_at_a_busy_mx().await;
    let deferred = |relay: &Relay| match &relay.spool.entry(&id).unwrap().recipients[0] {
        RecipientState::Deferred {
            reason, attempts, ..
        } => (reason.clone(), *attempts),
        other => panic!("expected deferred, got {other:?}"),
    };
    assert_eq!(deferred(&relay).1, 1);

    // Past the queue lifetime (an hour in this harness), and no room for the DSN.
    let frozen = Immutable::set(&relay.spool.root().join("tmp"));
    let past_lifetime = relay.spool.clock().now() + 2 * 3600;
    relay.attempt_at(&id, past_lifetime, 2).await;
    let (reason, _) = deferred(&relay);
    assert!(reason.contains("the DSN could not be queued"), "{reason}");
    assert_eq!(relay.metrics.dsns.get(), 0);
    assert_eq!(relay.metrics.expirations.get(), 0);
    assert!(lab.sinks[sender_mx].messages().is_empty());

    // Room again: the next attempt expires it, with its DSN.
    drop(frozen);
    let next = relay.spool.entry(&id).unwrap().recipients[0]
        .due_at()
        .unwrap();
    relay.clock.set(next);
    relay.delivery.kick();
    dsn_for(&lab.sinks[sender_mx], "alice@corp.test", "bob@busy.test").await;
    assert!(
        relay.removed(&id).await,
        "the expired message leaves the queue"
    );
    assert_eq!(relay.metrics.expirations.get(), 1);
}

/// A delivery whose result cannot be written (the message file is immutable: every
/// state record fails, as on a full disk) is sent once. The message is held back for a
/// retry interval instead of being claimed again at once (it was re-sent in a tight
/// loop); at its next attempt the recipient is not sent again, only its record is tried
/// again; once the spool can write, the delivery is recorded and the message leaves the
/// queue. One copy reaches the sink in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_that_cannot_be_recorded_is_not_sent_again() {
    use altroute::policy_engine::PolicyEngine;
    use altroute_lab::SinkMode;
    use altroute_queue::{Envelope, RecipientState};

    use crate::inproc::{Lab, Relay, START, Tls, WAIT, policy};

    let mut lab = Lab::new().await;
    let sink = lab
        .mx("dup.test", "mx.dup.test", Tls::Valid, SinkMode::Accept)
        .await;
    let engine = PolicyEngine::standard(&policy(lab.port, false, "")).unwrap();
    let mut queued = None;
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_in(&lab, engine, dir, async |spool| {
        let env = Envelope::new("alice@corp.test", vec!["bob@dup.test".into()]);
        let msg = b"From: <alice@corp.test>\r\nSubject: once\r\n\r\nbody\r\n".to_vec();
        let id = spool.store(env, msg).await.unwrap();
        let frozen = Immutable::set(&spool.message_path(&id));
        queued = Some((id, frozen));
    })
    .await;
    let (id, frozen) = queued.unwrap();
    let unrecorded = async |n: u64| {
        let deadline = tokio::time::Instant::now() + WAIT;
        while relay.metrics.unrecorded.get() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "result {n} of {id} not reported as unrecorded"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };

    lab.sinks[sink].wait_for_messages(1, WAIT).await.unwrap();
    unrecorded(1).await;
    assert!(matches!(
        relay.spool.entry(&id).unwrap().recipients[0],
        RecipientState::Pending
    ));
    // Held back for the first retry interval (a minute in this harness).
    assert!(relay.spool.due(START).is_empty());
    assert_eq!(relay.spool.next_wakeup(), Some(START + 60));

    // The next attempt only tries to record the delivery again: no second session.
    relay.clock.set(START + 60);
    relay.delivery.kick();
    unrecorded(2).await;
    assert_eq!(lab.sinks[sink].sessions().len(), 1);
    assert!(relay.spool.due(START + 60).is_empty());

    // The spool can write again: the delivery is recorded, the message removed.
    drop(frozen);
    relay.clock.set(START + 120);
    relay.delivery.kick();
    assert!(
        relay.removed(&id).await,
        "the delivered message leaves the queue"
    );
    assert_eq!(lab.sinks[sink].sessions().len(), 1);
    assert_eq!(lab.sinks[sink].messages().len(), 1);
    assert_eq!(relay.metrics.unrecorded.get(), 2);
}

/// `queue bounce` stores the DSN before it records the bounce: when the DSN cannot be
/// stored (the spool's `tmp` directory is made immutable), the operator gets the error
/// and the recipient stays open, rather than final with a DSN that never existed. Once
/// the spool takes messages again, the same command bounces it and the sender gets the DSN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_bounce_whose_dsn_cannot_be_stored_bounces_nothing() {
    use altroute::delivery;
    use altroute_queue::RecipientState;

    use crate::inproc::{WAIT, dsn_for};

    let (lab, sender_mx, relay, id) = deferred_at_a_busy_mx().await;
    // The attempt lets go of the message right after recording the deferral; the clock
    // stands still, so nothing claims it again.
    let deadline = tokio::time::Instant::now() + WAIT;
    while relay.spool.is_in_flight(&id) {
        assert!(tokio::time::Instant::now() < deadline, "{id} stays claimed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let reason = "550 5.0.0 bounced by the operator";

    let frozen = Immutable::set(&relay.spool.root().join("tmp"));
    let err = delivery::operator_bounce(&relay.spool, "relay.lab.test", &id, reason)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("writing message"), "{err}");
    let state = relay.spool.entry(&id).unwrap().recipients[0].clone();
    assert!(
        matches!(state, RecipientState::Deferred { .. }),
        "a bounce without its DSN must not be recorded: {state:?}"
    );
    assert!(!relay.spool.is_in_flight(&id));

    drop(frozen);
    let report = delivery::operator_bounce(&relay.spool, "relay.lab.test", &id, reason)
        .await
        .unwrap();
    assert_eq!(report.bounced, vec!["bob@busy.test".to_string()]);
    assert!(report.dsn.is_some() && report.removed, "{report:?}");
    let text = dsn_for(&lab.sinks[sender_mx], "alice@corp.test", "bob@busy.test").await;
    assert!(text.contains(reason), "{text}");
}

/// The audit log on a full filesystem (by default it lives in the spool, which fills
/// first) does not keep the relay from starting: an audit's relay could not restart once
/// its start line no longer fitted, and its acknowledged mail sat undelivered. It starts,
/// serves, and `GET /policy` shows the audit error.
#[test]
fn a_full_disk_under_the_audit_log_does_not_keep_the_relay_from_starting() {
    let fs = Tmpfs::mount("1m");
    let _filler = fs.fill();
    let mut config = RelayConfig::new();
    config.policy_extra = format!(
        "audit_log = {:?}\n",
        fs.path().join("audit.jsonl").display().to_string()
    );
    let mut relay = Relay::start(config);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = SmtpConn::connect(relay.config.smtp, None).await.unwrap();
        let r = c
            .send("a@x.test", &["b@y.test"], &message(1))
            .await
            .unwrap();
        assert_eq!(r.0, 250, "{r:?}");
    });
    let (_, status) = relay.admin_get("/policy");
    assert!(status.contains("No space left on device"), "{status}");
    assert!(
        relay
            .log()
            .contains("cannot write the audit log's start line"),
        "{}",
        relay.log()
    );
    assert!(relay.stop().success(), "{}", relay.log());
}
