//! Command-line behaviour shared by the commands: error messages, exit codes, output into
//! a pipe that closes early.

use std::io::Read as _;
use std::process::{Command, Stdio};

use crate::support::altroute;

#[test]
fn an_unreadable_configuration_is_reported_once() {
    for args in [
        &["serve", "-c", "/nonexistent/altroute.toml"][..],
        &["queue", "-c", "/nonexistent/altroute.toml", "list"][..],
    ] {
        let (code, _, err) = altroute(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains("cannot read /nonexistent/altroute.toml: No such file or directory"),
            "{args:?}: {err}"
        );
        assert_eq!(err.matches("No such file").count(), 1, "{args:?}: {err}");
        assert_eq!(
            err.matches("/nonexistent/altroute.toml").count(),
            1,
            "{args:?}: {err}"
        );
    }
}

#[test]
fn output_into_a_pipe_closed_early_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.toml");
    let mut src = String::from("[[hosts]]\nname = \"gw\"\naddress = \"gw.example.net\"\n");
    for r in 0..20_000 {
        src += &format!("[[tls_compliance]]\nname = \"r{r}\"\ndomains = [\"d{r}.example\"]\n");
    }
    std::fs::write(&big, src).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_altroute"))
        .args(["policy", "compile"])
        .arg(&big)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `| head -c 10`: far less than the JSON (megabytes, more than a pipe holds), so the
    // rest is written into a closed pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut head = [0u8; 10];
    stdout.read_exact(&mut head).unwrap();
    drop(stdout);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(&head, b"{\"format\":");
    assert_eq!(status.code(), Some(0), "{err}");
    assert_eq!(err, "");
}

#[test]
fn audit_verify_of_a_missing_file_is_an_error_not_a_broken_chain() {
    let (code, out, err) = altroute(&["audit", "verify", "/nonexistent/audit.jsonl"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("cannot read /nonexistent/audit.jsonl: No such file"),
        "{err}"
    );
    assert!(!out.contains("broken"), "{out}");
}

#[test]
fn a_malformed_queue_id_is_refused_with_exit_code_1() {
    for args in [
        &["queue", "--admin", "http://127.0.0.1:9", "show", "ab-cd"][..],
        &["queue", "--admin", "http://127.0.0.1:9", "bounce", "../x"][..],
    ] {
        let (code, _, err) = altroute(args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains("invalid queue id"), "{args:?}: {err}");
    }
}
