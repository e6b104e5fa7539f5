//! A SIGKILL cannot show a missing fsync (the page cache survives the process), so this
//! test watches the system calls with strace(1) instead: every `ACK` must be written only
//! after its file was fdatasynced, renamed into `msg/`, and `msg/` was fsynced after that
//! rename; every `DELIVERED` only after an fdatasync of that message's file.

use std::collections::HashMap;
use std::process::Command;

/// One completed system call: when it started and ended (trace line numbers).
#[derive(Debug, Clone)]
struct Call {
    name: String,
    args: String,
    ok: bool,
    start: usize,
    end: usize,
}

/// Pair `<unfinished ...>` / `<... resumed>` lines of `strace -f` output into calls.
fn parse(trace: &str) -> Vec<Call> {
    let mut open: HashMap<String, (String, String, usize)> = HashMap::new();
    let mut calls = Vec::new();
    for (n, line) in trace.lines().enumerate() {
        let Some((pid, rest)) = line.trim_start().split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(resumed) = rest.strip_prefix("<... ") {
            let Some((name, tail)) = resumed.split_once(" resumed>") else {
                continue;
            };
            if let Some((_, args, start)) = open.remove(pid) {
                calls.push(Call {
                    name: name.to_owned(),
                    args: format!("{args}{tail}"),
                    ok: !tail.contains("= -1"),
                    start,
                    end: n,
                });
            }
        } else if let Some((name, args)) = rest.split_once('(') {
            if let Some(args) = args.strip_suffix(" <unfinished ...>") {
                open.insert(pid.to_owned(), (name.to_owned(), args.to_owned(), n));
            } else {
                calls.push(Call {
                    name: name.to_owned(),
                    args: args.to_owned(),
                    ok: !args.contains("= -1"),
                    start: n,
                    end: n,
                });
            }
        }
    }
    calls
}

#[test]
fn acknowledgements_follow_file_and_directory_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let trace_path = dir.path().join("trace");
    let spool = dir.path().join("spool");
    let out = Command::new("strace")
        .args(["-f", "-y", "-qq", "-s", "256", "-o"])
        .arg(&trace_path)
        .args([
            "-e",
            "trace=fdatasync,fsync,rename,renameat,renameat2,write",
        ])
        .arg(env!("CARGO_BIN_EXE_altroute-queue-crash-writer"))
        .arg(&spool)
        .args(["8", "300"])
        .output()
        .expect("strace is needed for this test: apt-get install -y strace");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trace = std::fs::read_to_string(&trace_path).unwrap();
    let calls = parse(&trace);
    let msg_dir = format!("{}/msg>", spool.display());

    let mut synced: HashMap<String, usize> = HashMap::new(); // id -> end of first fdatasync
    let mut renamed: HashMap<String, (usize, usize)> = HashMap::new(); // id -> rename start, end
    let mut dir_syncs = Vec::new(); // (start, end)
    let mut acks = Vec::new(); // (id, start)
    let mut delivered = Vec::new();
    let mut record_syncs: HashMap<String, Vec<(usize, usize)>> = HashMap::new();
    for c in calls.iter().filter(|c| c.ok) {
        if c.name == "fdatasync" {
            let path = c.args.split(['<', '>']).nth(1).unwrap_or_default();
            let id = path.rsplit('/').next().unwrap_or_default().to_owned();
            if path.contains("/msg/") {
                record_syncs
                    .entry(id.clone())
                    .or_default()
                    .push((c.start, c.end));
            }
            synced.entry(id).or_insert(c.end);
        } else if c.name.starts_with("rename") {
            if let Some(dst) = c.args.split('"').nth(3) {
                let id = dst.rsplit('/').next().unwrap_or_default().to_owned();
                renamed.insert(id, (c.start, c.end));
            }
        } else if c.name == "fsync" && c.args.contains(&msg_dir) {
            dir_syncs.push((c.start, c.end));
        } else if c.name == "write" && c.args.starts_with("1<") {
            let text = c.args.split('"').nth(1).unwrap_or_default();
            let words: Vec<&str> = text.trim_end_matches("\\n").split(' ').collect();
            match words.as_slice() {
                ["ACK", id, _] => acks.push((id.to_string(), c.start)),
                ["DELIVERED", id] => delivered.push((id.to_string(), c.start)),
                _ => panic!("unexpected output {text:?}"),
            }
        }
    }
    assert_eq!(acks.len(), 300, "every store acknowledged");
    assert_eq!(delivered.len(), 100);
    let ack_at: HashMap<&str, usize> = acks.iter().map(|(id, at)| (id.as_str(), *at)).collect();
    for (id, ack) in &acks {
        let data = synced[id];
        let (rename_start, rename_end) = renamed[id];
        assert!(
            data < rename_start,
            "{id}: renamed before its data was synced"
        );
        assert!(
            dir_syncs.iter().any(|(s, e)| *s > rename_end && e < ack),
            "{id}: acknowledged without a directory fsync after its rename"
        );
    }
    for (id, at) in &delivered {
        let after = ack_at[id.as_str()];
        assert!(
            record_syncs
                .get(id)
                .is_some_and(|v| v.iter().any(|(s, e)| *s > after && e < at)),
            "{id}: state change acknowledged without an fdatasync of its file"
        );
    }
    println!(
        "300 stores: {} directory fsyncs covered all acknowledgements; 100 state changes each after an fdatasync",
        dir_syncs.len()
    );
}
