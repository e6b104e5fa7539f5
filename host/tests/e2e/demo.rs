//! `altroute demo`, the README's main command, end to end: its own lab (DNS, MX sinks
//! with good, absent and bad TLS, an alternate host) and the real relay on loopback.

use std::process::Command;

#[test]
fn the_demo_handles_every_sample_as_expected() {
    let out = Command::new(env!("CARGO_BIN_EXE_altroute"))
        .arg("demo")
        .output()
        .expect("run altroute demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "altroute demo failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("6 of 6 samples handled as expected"),
        "{stdout}"
    );
    // Clear text never reached the MX without STARTTLS, and each row says why.
    assert!(stdout.contains("none of them with MAIL FROM"), "{stdout}");
    for row in [
        "starttls-not-supported at mx.plain.demo.test",
        "certificate-expired at mx.expired.demo.test",
        "certificate-host-mismatch at mx.wrongname.demo.test",
        "standard:requiretls",
    ] {
        assert!(stdout.contains(row), "missing {row:?}:\n{stdout}");
    }
}
