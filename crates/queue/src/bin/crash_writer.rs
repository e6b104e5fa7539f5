//! Test helper for the crash test (tests/main.rs, module `crash`); not a tool.
//!
//! `altroute-queue-crash-writer SPOOL_DIR TASKS [COUNT]`: opens the spool, then TASKS tasks
//! store messages, forever or until COUNT messages were stored. Each acknowledged store prints `ACK <id> <seq>`; each acknowledged
//! state change prints `DELIVERED <id>`. Lines are flushed at once, so whatever the test
//! reads was acknowledged before the SIGKILL.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use altroute_queue::{Envelope, Spool, SpoolConfig, SystemClock};

/// The message the crash test expects for sequence number `seq` (same code in the test).
fn message(seq: u64) -> Vec<u8> {
    let mut m =
        format!("Message-ID: <{seq}@crash.test>\r\nSubject: crash {seq}\r\n\r\n").into_bytes();
    let n = 200 + (seq as usize * 977) % 8000;
    m.extend((0..n).map(|i| b'a' + ((i as u64 + seq) % 26) as u8));
    m.extend_from_slice(b"\r\n");
    m
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: SPOOL_DIR TASKS")?);
    let tasks: u64 = args.next().ok_or("usage: SPOOL_DIR TASKS")?.parse()?;
    let count: u64 = args
        .next()
        .map(|c| c.parse())
        .transpose()?
        .unwrap_or(u64::MAX);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let spool = Spool::open(&dir, SpoolConfig::default(), Arc::new(SystemClock))?;
        let seq = Arc::new(AtomicU64::new(0));
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let spool = spool.clone();
            let seq = seq.clone();
            handles.push(tokio::spawn(async move {
                loop {
                    let s = seq.fetch_add(1, Ordering::Relaxed);
                    if s >= count {
                        return Ok::<(), altroute_queue::Error>(());
                    }
                    let env = Envelope::new(
                        format!("sender{s}@crash.test"),
                        vec![format!("r{s}@a.test"), format!("r{s}@b.test")],
                    );
                    let id = spool.store(env, message(s)).await?;
                    println_flush(&format!("ACK {id} {s}"));
                    if s.is_multiple_of(3) {
                        spool.delivered(&id, 0, "mx.a.test").await?;
                        println_flush(&format!("DELIVERED {id}"));
                    }
                }
            }));
        }
        for h in handles {
            h.await??;
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}

fn println_flush(line: &str) {
    let mut out = std::io::stdout().lock();
    // A failed write means the test stopped reading; the process is about to be killed.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
