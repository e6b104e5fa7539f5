//! `altroute policy check | test | compile | explain` as an admin runs them.

use crate::support::altroute;

fn examples() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/policies")
}

/// `altroute policy compile` of the hosted-suite example into `dir`: the JSON file.
fn compiled_example(dir: &std::path::Path) -> std::path::PathBuf {
    let json = dir.join("policy.json");
    let src = examples().join("hosted-suite.toml");
    let (code, _, err) = altroute(&[
        "policy",
        "compile",
        src.to_str().expect("utf-8"),
        "-o",
        json.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "{err}");
    json
}

#[test]
fn check_lists_three_mistakes_with_locations_and_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        r#"[policy]
name = "three mistakes"

[[hosts]]
name = "relay"
address = "relay.example.net"
requre_tls = true

[alternate_secure_route]
host = "nowhere"

[[tls_compliance]]
name = "partners"
domains = ["bad..domain"]
"#,
    )
    .expect("write");
    let (code, _out, err) = altroute(&["policy", "check", file.to_str().expect("utf-8 path")]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("line 7: unknown field `requre_tls`"), "{err}");
    assert!(
        err.contains("line 9, alternate_secure_route: unknown host \"nowhere\""),
        "{err}"
    );
    assert!(
        err.contains("line 12, tls_compliance[0] \"partners\": bad domain"),
        "{err}"
    );
    assert!(err.contains("3 problems found"), "{err}");
}

#[test]
fn test_prints_pass_and_fail_per_test() {
    let ok = examples().join("hosted-suite.toml");
    let (code, out, err) = altroute(&["policy", "test", ok.to_str().expect("utf-8 path")]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("pass  ")).count(),
        6,
        "{out}"
    );
    assert!(out.contains("6 tests, 6 passed, 0 failed"), "{out}");

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("failing.toml");
    let src = std::fs::read_to_string(&ok).expect("read").replace(
        "expect = { route = \"direct\", rule = \"tls_compliance:law-firm\" }",
        "expect = { route = \"alternate\" }",
    );
    std::fs::write(&file, src).expect("write");
    let (code, out, _) = altroute(&["policy", "test", file.to_str().expect("utf-8 path")]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL  law firm accepts a CA-signed certificate for another name: expected route alternate, got direct"), "{out}");
    assert!(out.contains("6 tests, 5 passed, 1 failed"), "{out}");
}

#[test]
fn compile_then_explain_from_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = compiled_example(dir.path());
    let (code, out, err) = altroute(&[
        "policy",
        "explain",
        json.to_str().expect("utf-8"),
        "--phase",
        "verdict",
        "--sender",
        "alice@corp.example",
        "--recipient",
        "bob@partner.example",
        "--starttls",
        "absent",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("tls_compliance rule \"partners\""), "{out}");
    assert!(out.contains("x-altroute-route: alternate"), "{out}");
    assert!(out.contains("x-altroute-host: secure-relay"), "{out}");
    assert!(
        out.contains("x-altroute-result: starttls-not-supported"),
        "{out}"
    );
}

#[test]
fn check_and_test_read_compiled_json_like_serve_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = compiled_example(dir.path());
    let json = json.to_str().expect("utf-8");

    let (code, out, err) = altroute(&["policy", "check", json]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(": ok, policy \"hosted-suite\" version sha256:"),
        "{out}"
    );

    let (code, out, err) = altroute(&["policy", "test", json]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("6 tests, 6 passed, 0 failed"), "{out}");

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"format\": 1}").expect("write");
    let bad = bad.to_str().expect("utf-8");
    for cmd in ["check", "test"] {
        let (code, out, err) = altroute(&["policy", cmd, bad]);
        assert_eq!(code, 1, "{cmd}: {out}{err}");
        assert!(err.contains("compiled policy is not valid"), "{cmd}: {err}");
        assert!(err.contains("1 problem found"), "{cmd}: {err}");
    }
}
