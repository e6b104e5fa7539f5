use altroute_policy::{
    CertStatus, Hop, Policy, Query, Starttls, TlsVersion, compile, decide, fixtures,
};

#[test]
fn every_table_case_passes_natively() {
    let mut cases = 0;
    for (file, toml) in fixtures::TABLE {
        let compiled = compile(toml).unwrap_or_else(|d| {
            panic!(
                "{file} does not compile: {}",
                d.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        for outcome in compiled.policy.run_tests() {
            assert!(
                outcome.passed(),
                "{file}: {}: {:?}",
                outcome.name,
                outcome.mismatches
            );
            assert_eq!(outcome.decision.policy_version, compiled.policy.version);
            assert!(!outcome.decision.rule.is_empty());
            cases += 1;
        }
    }
    assert!(
        cases >= 40,
        "the decision table has {cases} cases, want at least 40"
    );
}

#[test]
fn compiled_json_round_trips_and_keeps_its_version() {
    for (file, toml) in fixtures::TABLE {
        let compiled = compile(toml).unwrap();
        let loaded = Policy::from_json(compiled.json.as_bytes()).unwrap();
        assert_eq!(loaded, compiled.policy, "{file}");
        assert!(loaded.version.starts_with("sha256:"));
    }
}

#[test]
fn version_changes_with_content_and_tampering_is_detected() {
    let (_, toml) = fixtures::TABLE[0];
    let a = compile(toml).unwrap();
    let b = compile(&toml.replace(
        "domains = [\"partner.example\", \"*.bank.example\"]",
        "domains = [\"partner2.example\", \"*.bank.example\"]",
    ))
    .unwrap_err();
    // Changing the domain breaks the embedded tests: the compiler says so.
    assert!(b.iter().any(|d| d.message.contains("test failed")), "{b:?}");
    let c = compile(&toml.replace("name = \"table-suite\"", "name = \"renamed\"")).unwrap();
    assert_ne!(a.policy.version, c.policy.version);
    let tampered = a.json.replace("\"port\":2525", "\"port\":2526");
    assert_ne!(tampered, a.json);
    let err = Policy::from_json(tampered.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
}

/// What the reason says about the certificate seen, for people reading logs and bounces.
#[test]
fn reasons_name_the_certificate_seen_in_plain_words() {
    let policy = compile(fixtures::TABLE[0].1).expect("compiles").policy;
    let plan = Query::plan("alice@corp.example", "bob@partner.example");
    for (cert, words) in [
        (CertStatus::Valid, "TLS 1.3 with a valid certificate meets"),
        (
            CertStatus::Untrusted,
            "TLS 1.3 with an untrusted certificate does not meet",
        ),
        (
            CertStatus::Expired,
            "TLS 1.3 with an expired certificate does not meet",
        ),
        (
            CertStatus::HostnameMismatch,
            "TLS 1.3 with a certificate for another host name does not meet",
        ),
        (
            CertStatus::None,
            "TLS 1.3 without a certificate does not meet",
        ),
    ] {
        let q = plan.clone().verdict(
            Hop::Direct,
            "mx.partner.example",
            Starttls::Offered,
            TlsVersion::V1_3,
            cert,
        );
        let d = decide(&policy, &q);
        assert!(d.reason.starts_with(words), "{cert:?}: {:?}", d.reason);
    }
}
