//! `altroute serve` from the first instant: signals that arrive while it starts, and the
//! log it writes.

use std::time::{Duration, Instant};

use crate::support::{Relay, RelayConfig, open_spool, signal};

/// Whether process `pid` has a handler for signal number `signo` (SigCgt in
/// /proc/PID/status).
fn catches(pid: u32, signo: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signo - 1)) != 0)
}

#[test]
fn sighup_while_starting_is_applied_once_ready() {
    let mut relay = Relay::spawn(RelayConfig::new());
    let pid = relay.pid();
    // As soon as the relay listens for SIGHUP (a process that does not yet would die),
    // long before it serves: compiling the policy module takes seconds.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !catches(pid, 1) {
        assert!(
            Instant::now() < deadline,
            "no SIGHUP handler:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    signal(pid, "HUP");
    assert!(
        !relay.log().contains("policy module loaded"),
        "the SIGHUP must come while the module compiles:\n{}",
        relay.log()
    );

    relay.wait_ready();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !relay.log().contains("SIGHUP: reloading the policy files") {
        assert!(
            Instant::now() < deadline,
            "the SIGHUP was not applied:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = relay.stop();
    assert!(status.success(), "{status}:\n{}", relay.log());
}

#[test]
fn sigterm_while_starting_stops_the_relay_cleanly() {
    let mut relay = Relay::spawn(RelayConfig::new());
    let pid = relay.pid();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !catches(pid, 15) {
        assert!(
            Instant::now() < deadline,
            "no SIGTERM handler:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    signal(pid, "TERM");
    assert!(
        !relay.log().contains("policy module loaded"),
        "the SIGTERM must come while the module compiles:\n{}",
        relay.log()
    );
    let status = relay.wait();
    assert!(status.success(), "{status}:\n{}", relay.log());
    assert!(relay.log().contains("SIGTERM received"), "{}", relay.log());
}

#[test]
fn the_log_to_a_file_is_plain_key_value_text() {
    let mut relay = Relay::start(RelayConfig::new());
    relay.stop();
    let log = relay.log();
    assert!(!log.contains('\x1b'), "ANSI escapes in a log file:\n{log}");
    assert!(log.contains("policy loaded version=sha256:"), "{log}");
}

/// The audit's reproduction: a directory named like a message id in the spool's `msg/`,
/// or any directory in `tmp/`, made `altroute serve` exit at start (`Is a directory`),
/// so no queued message was delivered. Now both are left where they are (they cannot be
/// read, which is not known corruption), logged and counted, and the relay serves with
/// every other message queued.
#[test]
fn an_unreadable_spool_entry_does_not_stop_the_relay() {
    let mut config = RelayConfig::new();
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    config.spool_dir = Some(spool_dir.clone());
    let queued = {
        let spool = open_spool(&spool_dir);
        let env = altroute_queue::Envelope::new("a@x.test", vec!["b@y.test".into()]);
        let msg = b"From: <a@x.test>\r\nSubject: queued\r\n\r\nbody\r\n".to_vec();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(spool.store(env, msg)).unwrap()
    };
    std::fs::create_dir(spool_dir.join("msg/000000000000000deadbeef")).unwrap();
    std::fs::create_dir(spool_dir.join("tmp/x")).unwrap();

    let mut relay = Relay::start(config);
    let log = relay.log();
    assert!(
        log.contains("spool recovered")
            && log.contains("messages=1")
            && log.contains("corrupt_moved=0")
            && log.contains("unreadable_skipped=2"),
        "{log}"
    );
    assert!(log.contains("000000000000000deadbeef"), "{log}");
    assert!(log.contains("tmp/x"), "{log}");
    assert!(relay.stop().success(), "{}", relay.log());

    assert!(spool_dir.join("msg/000000000000000deadbeef").is_dir());
    assert!(spool_dir.join("tmp/x").is_dir());
    let spool = relay.open_spool();
    assert_eq!(
        spool.list().into_iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![queued]
    );
}
