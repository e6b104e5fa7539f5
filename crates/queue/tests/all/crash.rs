//! SIGKILL a process that is storing messages, 20 times, and check that every
//! acknowledged message and state change is there after each restart.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use altroute_queue::{ManualClock, MessageId, RecipientState};

use crate::{T0, open};

/// Same as `message` in src/bin/crash_writer.rs.
fn expected_message(seq: u64) -> Vec<u8> {
    let mut m =
        format!("Message-ID: <{seq}@crash.test>\r\nSubject: crash {seq}\r\n\r\n").into_bytes();
    let n = 200 + (seq as usize * 977) % 8000;
    m.extend((0..n).map(|i| b'a' + ((i as u64 + seq) % 26) as u8));
    m.extend_from_slice(b"\r\n");
    m
}

#[test]
fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    // id -> (seq, delivered acknowledged)
    let mut acked: HashMap<MessageId, (u64, bool)> = HashMap::new();
    let mut torn_total = 0;
    let mut temp_total = 0;
    for round in 0..20 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_altroute-queue-crash-writer"))
            .arg(dir.path())
            .arg("8")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let reader = {
            let lines = lines.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(stdout);
                let mut line = String::new();
                // Only complete lines count: a line cut by the kill was never fully printed.
                while r.read_line(&mut line).unwrap_or(0) > 0 {
                    if line.ends_with('\n') {
                        lines.lock().unwrap().push(line.trim_end().to_owned());
                    }
                    line.clear();
                }
            })
        };
        // Wait for the writer to be busy, then kill it at a random moment.
        while lines.lock().unwrap().is_empty() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "crash writer exited early"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(fastrand::u64(0..150)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();

        let lines = std::mem::take(&mut *lines.lock().unwrap());
        let mut stores = 0;
        for l in &lines {
            let parts: Vec<&str> = l.split(' ').collect();
            match parts.as_slice() {
                ["ACK", id, seq] => {
                    stores += 1;
                    acked.insert(MessageId::parse(id).unwrap(), (seq.parse().unwrap(), false));
                }
                ["DELIVERED", id] => {
                    acked.get_mut(&MessageId::parse(id).unwrap()).unwrap().1 = true;
                }
                _ => panic!("unexpected line from the crash writer: {l:?}"),
            }
        }

        let spool = open(dir.path(), &clock);
        torn_total += spool.recovery().torn_tails_truncated;
        temp_total += spool.recovery().temp_files_removed;
        assert_eq!(spool.recovery().corrupt_moved, 0);
        for (id, (seq, delivered)) in &acked {
            let e = spool
                .entry(id)
                .unwrap_or_else(|| panic!("round {round}: acknowledged {id} lost"));
            assert_eq!(e.envelope.mail_from, format!("sender{seq}@crash.test"));
            assert_eq!(e.message_id, Some(format!("<{seq}@crash.test>")));
            assert_eq!(spool.read_message(id).unwrap(), expected_message(*seq));
            if *delivered {
                assert!(
                    matches!(e.recipients[0], RecipientState::Delivered { .. }),
                    "round {round}: acknowledged delivery of {id} lost"
                );
            }
            assert_eq!(e.recipients[1], RecipientState::Pending);
        }
        println!(
            "round {round}: {stores} acknowledged this round, {} in total, spool holds {}",
            acked.len(),
            spool.list().len()
        );
    }
    println!(
        "20 SIGKILLs: {} acknowledged messages all intact; recovery removed {temp_total} temp files, cut {torn_total} torn tails",
        acked.len()
    );
}
