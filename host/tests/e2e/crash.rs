//! Crash test: 8 connections submit at full speed, each message with a unique Message-ID;
//! the relay is killed with SIGKILL 20 times at random moments and restarted. Every
//! Message-ID acknowledged with 250 must be in the spool afterwards. Duplicates (a message
//! stored but not acknowledged because the kill came between the fsync and the 250, then
//! resent) are counted and printed, not failed: that is the at-least-once contract.
//! And a message a crash left finished on disk (its recipients final, its file not
//! removed yet) is removed when delivery starts again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{Relay, RelayConfig, SmtpConn, message_id, spool_messages, strip_received};

const CONNECTIONS: usize = 8;
const KILLS: usize = 20;

/// How long a submitter waits for the greeting or for a transaction's replies before it
/// gives the connection up, as a real client does (RFC 5321 4.5.3.2 asks for minutes; the
/// relay answers in milliseconds here, or in seconds while it starts). Without it, a
/// connection whose server side vanished unannounced waited forever: a kill can catch a
/// connection in its handshake, and the relay's RST to it is a loopback packet that a
/// busy machine may drop (its backlog overflows: /proc/net/softnet_stat counts them).
/// The client saw SYN-ACK, sent its ACK and waited for a greeting that no process would
/// send (`ss` showed it ESTABLISHED with one segment in, and no peer socket).
const REPLY_WAIT: Duration = Duration::from_secs(15);

#[derive(Default)]
struct Tally {
    acked: Mutex<HashSet<String>>,
    sent: AtomicU64,
    failed_connections: AtomicU64,
    /// Connections given up after [`REPLY_WAIT`] without a reply.
    silent_connections: AtomicU64,
}

/// What one submitter is doing, for the report when it does not stop.
type Stage = Arc<Mutex<String>>;

async fn submitter(
    n: usize,
    addr: std::net::SocketAddr,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    stage: Stage,
) {
    let mut seq = 0u64;
    let set = |s: String| *stage.lock().unwrap() = s;
    while !stop.load(Ordering::Relaxed) {
        set("connecting (greeting, EHLO)".into());
        let mut conn = match tokio::time::timeout(REPLY_WAIT, SmtpConn::connect(addr, None)).await {
            Ok(Ok(c)) => c,
            Err(_) => {
                tally.silent_connections.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(Err(_)) => {
                tally.failed_connections.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        while !stop.load(Ordering::Relaxed) {
            // Like a real client, a message that did not get 250 is sent again (same
            // Message-ID): a kill between the fsync and the 250 then shows as a duplicate.
            let mid = format!("<c{n}-{}@crash.test>", seq + 1);
            let msg = format!(
                "From: <a@x.test>\r\nTo: <b@y.test>\r\nMessage-ID: {mid}\r\nSubject: crash {n}\r\n\r\n{}\r\n",
                "body line\r\n".repeat(40)
            );
            tally.sent.fetch_add(1, Ordering::Relaxed);
            set(format!("sending {mid} from {:?}", conn.local_addr()));
            let sent = conn.send("a@x.test", &["b@y.test"], msg.as_bytes());
            match tokio::time::timeout(REPLY_WAIT, sent).await {
                Ok(Ok((250, _))) => {
                    tally.acked.lock().unwrap().insert(mid);
                    seq += 1;
                }
                // 4xx (e.g. a store cut short) or anything else: not acknowledged.
                Ok(Ok(_)) => {}
                Ok(Err(_)) => break,
                Err(_) => {
                    tally.silent_connections.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

#[test]
fn nothing_acknowledged_is_lost_across_20_kill_9() {
    let mut relay = Relay::start(RelayConfig::new());
    let addr = relay.config.smtp;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stages: Vec<Stage> = (0..CONNECTIONS).map(|_| Stage::default()).collect();
    let handles: Vec<_> = (0..CONNECTIONS)
        .map(|n| {
            let stage = stages[n].clone();
            rt.spawn(submitter(n, addr, tally.clone(), stop.clone(), stage))
        })
        .collect();

    for _ in 0..KILLS {
        // Random moment: 50..400 ms of full-speed submission.
        std::thread::sleep(Duration::from_millis(50 + fastrand_ms(350)));
        relay.kill();
        relay.restart();
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for (n, h) in handles.into_iter().enumerate() {
            // Each submitter is at most one REPLY_WAIT away from seeing `stop`.
            tokio::time::timeout(REPLY_WAIT * 4, h)
                .await
                .unwrap_or_else(|_| panic!("{}", stuck_report(&relay, n, &stages)))
                .expect("a submitter panicked");
        }
    });
    assert!(relay.stop().success(), "{}", relay.log());

    let spool = relay.open_spool();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for (_, body) in spool_messages(&spool) {
        let mid = message_id(strip_received(&body)).expect("Message-ID in stored message");
        *counts.entry(mid).or_default() += 1;
    }
    let acked = tally.acked.lock().unwrap();
    let lost: Vec<_> = acked.iter().filter(|m| !counts.contains_key(*m)).collect();
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    let stored_unacked = counts.keys().filter(|m| !acked.contains(*m)).count();
    println!(
        "crash test: {KILLS} kills, {} sent, {} acknowledged, {} distinct stored, {} lost, {} duplicates, {} stored without 250, {} failed connects, {} connections given up without a reply",
        tally.sent.load(Ordering::Relaxed),
        acked.len(),
        counts.len(),
        lost.len(),
        duplicates,
        stored_unacked,
        tally.failed_connections.load(Ordering::Relaxed),
        tally.silent_connections.load(Ordering::Relaxed),
    );
    assert!(
        acked.len() > 100,
        "too few acknowledged to mean anything: {}",
        acked.len()
    );
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    let recovery = spool.recovery();
    println!("crash test: recovery at final open: {recovery:?}");
}

/// Everything that may tell why submitter `n` did not stop: what each submitter was
/// doing, the relay's sockets, its threads' stacks and the end of its log.
fn stuck_report(relay: &Relay, n: usize, stages: &[Stage]) -> String {
    use std::process::Command;
    let run = |cmd: &mut Command| {
        cmd.output().map_or_else(
            |e| format!("({e})"),
            |o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            },
        )
    };
    let doing: Vec<String> = stages
        .iter()
        .enumerate()
        .map(|(i, s)| format!("  submitter {i}: {}", s.lock().unwrap()))
        .collect();
    let port = relay.config.smtp.port();
    let sockets = run(Command::new("ss").args([
        "-tanoip",
        &format!("( sport = :{port} or dport = :{port} )"),
    ]));
    let stacks = run(Command::new("gdb").args([
        "-batch",
        "-p",
        &relay.pid().to_string(),
        "-ex",
        "thread apply all bt 12",
    ]));
    let log = relay.log();
    let tail: Vec<&str> = log.lines().rev().take(60).collect();
    format!(
        "submitter {n} did not stop within {:?}\nwhat the submitters were doing:\n{}\nsockets:\n{sockets}\nrelay threads:\n{stacks}\nthe relay's log ends:\n{}",
        REPLY_WAIT * 4,
        doing.join("\n"),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// A pseudo-random number of milliseconds below `max` (no extra dependency needed:
/// the clock's nanoseconds are random enough for picking kill moments).
fn fastrand_ms(max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    u64::from(nanos) % max
}

/// A crash after the last recipient of a message was recorded final but before the
/// message file was removed leaves a finished message on disk, which no attempt ever
/// claims again (nothing is due). Delivery removes it when it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_message_left_by_a_crash_is_removed_at_start() {
    use altroute::policy_engine::PolicyEngine;
    use altroute_queue::{Envelope, ManualClock, Spool};

    use crate::inproc::{Lab, Relay, START, policy};

    let lab = Lab::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (finished, open) = {
        let clock = Arc::new(ManualClock::new(START));
        let spool = Spool::open(dir.path(), Relay::spool_config(), clock).unwrap();
        let msg = b"From: <alice@corp.test>\r\nSubject: left\r\n\r\nbody\r\n";
        let rcpts = vec!["bob@ok.test".to_string(), "carol@gone.test".to_string()];
        let finished = spool
            .store(Envelope::new("alice@corp.test", rcpts), msg.to_vec())
            .await
            .unwrap();
        // What an attempt records right before it removes the message; the crash comes
        // in between.
        spool.delivered(&finished, 0, "mx.ok.test").await.unwrap();
        spool
            .bounce(&finished, 1, "550 5.1.1 no such user")
            .await
            .unwrap();
        // And one that is not finished, which must stay.
        let open = spool
            .store(
                Envelope::new("alice@corp.test", vec!["dan@later.test".into()]),
                msg.to_vec(),
            )
            .await
            .unwrap();
        spool.defer(&open, 0, "451 4.3.0 later").await.unwrap();
        (finished, open)
    };

    let engine = PolicyEngine::standard(&policy(lab.port, false, "")).unwrap();
    let relay = Relay::start_in(&lab, engine, dir, async |_| {}).await;
    assert!(
        relay.removed(&finished).await,
        "the finished message stays in the queue"
    );
    assert!(!relay.spool.message_path(&finished).exists());
    assert!(relay.spool.entry(&open).is_some());
}

/// The removal at start reads a finished message back first: never delete what may be
/// someone's mail. One whose body fails its checksum (a crash between its DSN and the
/// move to `corrupt/`, or a bad disk) is moved to `corrupt/`; one that cannot be read for
/// another reason (its file replaced by a symbolic link to itself: ELOOP) stays where it
/// is; a readable one is removed as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_message_left_by_a_crash_is_removed_only_once_read_back() {
    use altroute::policy_engine::PolicyEngine;
    use altroute_queue::{Envelope, ManualClock, MessageId, Spool};

    use crate::inproc::{Lab, Relay, START, policy};

    let lab = Lab::new().await;
    let dir = tempfile::tempdir().unwrap();
    // The sweep goes through them in id order, one after the other: once the last one
    // (`readable`) is removed, it has been through the other two.
    let [unreadable, corrupt, readable]: [MessageId; 3] = {
        let clock = Arc::new(ManualClock::new(START));
        let spool = Spool::open(dir.path(), Relay::spool_config(), clock).unwrap();
        let mut ids = Vec::new();
        for n in 0..3 {
            let msg = format!("From: <alice@corp.test>\r\nSubject: {n}\r\n\r\nbody\r\n");
            let env = Envelope::new("alice@corp.test", vec!["bob@gone.test".into()]);
            let id = spool.store(env, msg.into_bytes()).await.unwrap();
            spool
                .bounce(&id, 0, "550 5.1.1 no such user")
                .await
                .unwrap();
            ids.push(id);
        }
        ids.sort();
        ids.try_into().unwrap()
    };
    let msg_dir = dir.path().join("msg");
    let corrupt_path = msg_dir.join(corrupt.as_str());
    let mut found = std::fs::read(&corrupt_path).unwrap();
    let at = found.windows(8).position(|w| w == b"Subject:").unwrap();
    found[at] ^= 0x01;
    std::fs::write(&corrupt_path, &found).unwrap();
    let unreadable_path = msg_dir.join(unreadable.as_str());
    let saved = dir.path().join("saved");

    let engine = PolicyEngine::standard(&policy(lab.port, false, "")).unwrap();
    // After recovery (which would set an unopenable file aside itself), before delivery.
    let relay = Relay::start_in(&lab, engine, dir, async |_| {
        std::fs::rename(&unreadable_path, &saved).unwrap();
        std::os::unix::fs::symlink(&unreadable_path, &unreadable_path).unwrap();
    })
    .await;
    assert!(relay.removed(&readable).await, "a readable one is removed");
    assert!(
        relay.spool.entry(&corrupt).is_none(),
        "the corrupt one leaves the queue"
    );
    let kept = relay.spool.root().join("corrupt").join(corrupt.as_str());
    assert_eq!(std::fs::read(&kept).unwrap(), found, "kept in corrupt/");
    assert!(!corrupt_path.exists());
    assert!(
        relay
            .spool
            .entry(&unreadable)
            .is_some_and(|e| e.is_finished()),
        "the unreadable one stays queued"
    );
    assert!(std::fs::symlink_metadata(&unreadable_path).is_ok());
    assert!(saved.exists());
    assert_eq!(relay.spool.stats().corrupt_moved, 1);
}
