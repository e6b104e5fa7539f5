//! Integration tests of the spool against the real filesystem (real fsync), one module per topic.
#![allow(clippy::unwrap_used)]

mod concurrency;
mod corrupt;
mod crash;
mod diskfull;
mod operator;
mod recovery;
mod roundtrip;
mod schedule;
mod syscalls;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use altroute_queue::{Envelope, Error, ManualClock, Spool, SpoolConfig};

/// 2023-11-14T22:13:20Z, a fixed start for manual clocks.
pub const T0: u64 = 1_700_000_000;

/// Opens the spool in `dir`, waiting up to 5 s while it is locked.
///
/// A spool dropped just before was seen still locked once in CI
/// (`concurrency::hundreds_of_…` got `Locked`). The likely cause: the lock is a `flock` on
/// the open file, and a process that another test of this binary spawns at that instant
/// holds a copy of every descriptor until it execs (they are close-on-exec, but not
/// closed before). A spool that stays locked still fails the test.
pub fn open(dir: &Path, clock: &Arc<ManualClock>) -> Spool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Spool::open(dir, SpoolConfig::default(), clock.clone()) {
            Err(Error::Locked(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            opened => return opened.unwrap(),
        }
    }
}

pub fn envelope(n: usize) -> Envelope {
    Envelope::new(
        "sender@example.org",
        (0..n).map(|i| format!("rcpt{i}@example.net")).collect(),
    )
}

/// A message of about `size` bytes with a Message-ID header.
pub fn message(tag: &str, size: usize) -> Vec<u8> {
    let mut m = format!("Message-ID: <{tag}@test>\r\nSubject: {tag}\r\n\r\n").into_bytes();
    m.extend((0..size).map(|i| b'A' + (i % 26) as u8));
    m.extend_from_slice(b"\r\n");
    m
}
