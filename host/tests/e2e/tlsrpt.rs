//! TLS reporting acceptance test (issue 9): real deliveries are recorded, the daily
//! report is made by `altroute tlsrpt report` (the binary) and by the library with
//! submission, and checked against the RFC 8460 §4.4 schema and the sessions that
//! happened. The mailed report goes out through the relay itself to the lab MX of the
//! `rua` domain.

use std::collections::BTreeSet;
use std::net::IpAddr;

use altroute::delivery::Resolver;
use altroute::tlsrpt::{TlsRptSettings, day_of, file_name, generate, parse_day};
use altroute_lab::HttpResponse;
use serde_json::Value;

use super::mta_sts::{Relay, START, Tls, WAIT, World, policy, sts_policy};

/// Checks the field names and types of an RFC 8460 §4.4 report; returns the problems.
fn schema_problems(r: &Value) -> Vec<String> {
    let mut p = Vec::new();
    let mut need = |ok: bool, what: &str| {
        if !ok {
            p.push(what.to_string());
        }
    };
    let top: BTreeSet<&str> = r
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    need(
        top == BTreeSet::from([
            "organization-name",
            "date-range",
            "contact-info",
            "report-id",
            "policies",
        ]),
        &format!("top-level fields {top:?}"),
    );
    need(
        r["organization-name"].is_string(),
        "organization-name: string",
    );
    need(r["contact-info"].is_string(), "contact-info: string");
    need(r["report-id"].is_string(), "report-id: string");
    for k in ["start-datetime", "end-datetime"] {
        let v = r["date-range"][k].as_str().unwrap_or_default();
        // RFC 3339 date-time in UTC: YYYY-MM-DDTHH:MM:SSZ.
        need(
            v.len() == 20
                && v.as_bytes()[10] == b'T'
                && v.ends_with('Z')
                && parse_day(&v[..10]).is_some(),
            &format!("date-range.{k}: RFC 3339 date-time, got {v:?}"),
        );
    }
    let Some(policies) = r["policies"].as_array() else {
        p.push("policies: array".into());
        return p;
    };
    need(!policies.is_empty(), "policies: not empty");
    for e in policies {
        let pol = &e["policy"];
        let t = pol["policy-type"].as_str().unwrap_or_default();
        need(
            ["sts", "tlsa", "no-policy-found"].contains(&t),
            &format!("policy-type {t:?}"),
        );
        need(pol["policy-domain"].is_string(), "policy-domain: string");
        for k in ["policy-string", "mx-host"] {
            need(
                pol.get(k).is_none()
                    || pol[k]
                        .as_array()
                        .is_some_and(|a| a.iter().all(Value::is_string)),
                &format!("{k}: array of strings"),
            );
        }
        if t == "sts" {
            need(pol.get("policy-string").is_some(), "sts: policy-string");
        }
        let ok = e["summary"]["total-successful-session-count"].as_u64();
        let failed = e["summary"]["total-failure-session-count"].as_u64();
        need(ok.is_some() && failed.is_some(), "summary: two integers");
        let details = e.get("failure-details").and_then(Value::as_array);
        let mut sum = 0;
        for d in details.into_iter().flatten() {
            let rt = d["result-type"].as_str().unwrap_or_default();
            need(
                [
                    "starttls-not-supported",
                    "certificate-host-mismatch",
                    "certificate-expired",
                    "certificate-not-trusted",
                    "validation-failure",
                    "tlsa-invalid",
                    "dnssec-invalid",
                    "dane-required",
                    "sts-policy-fetch-error",
                    "sts-policy-invalid",
                    "sts-webpki-invalid",
                ]
                .contains(&rt),
                &format!("result-type {rt:?}"),
            );
            for k in ["sending-mta-ip", "receiving-ip"] {
                need(
                    d.get(k).is_none()
                        || d[k].as_str().is_some_and(|s| s.parse::<IpAddr>().is_ok()),
                    &format!("{k}: IP address"),
                );
            }
            need(
                d.get("receiving-mx-hostname").is_none() || d["receiving-mx-hostname"].is_string(),
                "receiving-mx-hostname: string",
            );
            let n = d["failed-session-count"].as_u64();
            need(n.is_some(), "failed-session-count: integer");
            sum += n.unwrap_or(0);
        }
        need(
            Some(sum) == failed,
            &format!("failure-details add up to {sum}, summary says {failed:?}"),
        );
    }
    p
}

fn b64decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let clean: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::new();
    for q in clean.chunks(4) {
        let pad = q.iter().filter(|&&c| c == b'=').count();
        let n = q
            .iter()
            .map(|&c| if c == b'=' { 0 } else { val(c) })
            .fold(0u32, |a, v| (a << 6) | v);
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_report_follows_the_rfc_schema_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = World::new().await;
    let _alt = w.sink("alt.lab.test", Tls::Valid).await;
    let reports_mx = w
        .mx("reports.test", 10, "mx.reports.test", Tls::Valid)
        .await;
    // A testing policy over an MX without STARTTLS: delivered, reported as failures.
    let rpt_mx = w.mx("rpt.test", 10, "mx.rpt.test", Tls::None).await;
    w.sts(
        "rpt.test",
        "1",
        HttpResponse::text(&sts_policy("testing", &["mx.rpt.test"])),
        None,
    )
    .await;
    w.dns
        .add_txt(
            "_smtp._tls.rpt.test",
            "v=TLSRPTv1; rua=mailto:tls-reports@reports.test",
        )
        .await
        .unwrap();
    // No MTA-STS, verified TLS: successes.
    w.mx("ok.test", 10, "mx.ok.test", Tls::Valid).await;
    w.dns
        .add_txt(
            "_smtp._tls.ok.test",
            "v=TLSRPTv1; rua=mailto:tls@reports.test,https://reports.test/tlsrpt",
        )
        .await
        .unwrap();
    // Results but no TLSRPT record: no report.
    w.mx("quiet.test", 10, "mx.quiet.test", Tls::Valid).await;

    let relay = Relay::start(&w, dir.path(), &dir.path().join("cache")).await;
    for to in ["a@rpt.test", "b@rpt.test", "c@ok.test", "d@quiet.test"] {
        let id = relay.send(to).await;
        assert_eq!(relay.settled(&id).await, None, "{to}: delivered");
    }
    assert_eq!(w.sinks[rpt_mx].messages().len(), 2);
    let day = day_of(START);
    let start = parse_day(&day).unwrap();

    // The command line, as an operator runs it.
    let policy_file = dir.path().join("policy.toml");
    std::fs::write(&policy_file, policy(w.smtp_port)).unwrap();
    let config = dir.path().join("altroute.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nhostname = \"relay.lab.test\"\n\n[spool]\ndir = {:?}\n\n[delivery]\nresolver = \"{}\"\n\n[policy]\nfile = {:?}\n\n[tlsrpt]\ndir = {:?}\ncontact_info = \"tls-admin@lab.test\"\n",
            dir.path().join("cli-spool"),
            w.dns.addr(),
            policy_file,
            relay.tlsrpt_dir,
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_altroute"))
        .args(["tlsrpt", "report", "--day", &day, "-c"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "altroute tlsrpt report failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("rpt.test\t0 successful, 2 failed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok.test\t1 successful, 0 failed"),
        "{stdout}"
    );
    assert!(!stdout.contains("quiet.test"), "{stdout}");

    let reports_dir = relay.tlsrpt_dir.join("reports");
    let mut names: Vec<String> = std::fs::read_dir(&reports_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            format!("relay.lab.test!ok.test!{start}!{}.json", start + 86_399),
            format!("relay.lab.test!rpt.test!{start}!{}.json", start + 86_399),
        ]
    );
    let read = |domain: &str| -> Value {
        serde_json::from_slice(
            &std::fs::read(reports_dir.join(file_name("relay.lab.test", domain, start))).unwrap(),
        )
        .unwrap()
    };
    let rpt = read("rpt.test");
    let ok = read("ok.test");
    for r in [&rpt, &ok] {
        let problems = schema_problems(r);
        assert!(problems.is_empty(), "schema: {problems:?}\n{r:#}");
        assert_eq!(r["organization-name"], "relay.lab.test");
        assert_eq!(r["contact-info"], "tls-admin@lab.test");
        assert_eq!(
            r["date-range"]["start-datetime"],
            format!("{day}T00:00:00Z")
        );
        assert_eq!(r["date-range"]["end-datetime"], format!("{day}T23:59:59Z"));
        assert_eq!(r["policies"].as_array().unwrap().len(), 1);
    }
    let p = &rpt["policies"][0];
    assert_eq!(p["policy"]["policy-type"], "sts");
    assert_eq!(p["policy"]["policy-domain"], "rpt.test");
    assert_eq!(p["policy"]["mx-host"], serde_json::json!(["mx.rpt.test"]));
    assert_eq!(
        p["policy"]["policy-string"],
        serde_json::json!([
            "version: STSv1",
            "mode: testing",
            "mx: mx.rpt.test",
            "max_age: 86400"
        ])
    );
    assert_eq!(p["summary"]["total-successful-session-count"], 0);
    assert_eq!(p["summary"]["total-failure-session-count"], 2);
    let d = &p["failure-details"][0];
    assert_eq!(d["result-type"], "starttls-not-supported");
    assert_eq!(d["failed-session-count"], 2);
    assert_eq!(d["receiving-mx-hostname"], "mx.rpt.test");
    assert_eq!(
        d["receiving-ip"],
        w.sinks[rpt_mx].addr().ip().to_string().as_str()
    );
    let p = &ok["policies"][0];
    assert_eq!(p["policy"]["policy-type"], "no-policy-found");
    assert_eq!(p["summary"]["total-successful-session-count"], 1);
    assert_eq!(p["summary"]["total-failure-session-count"], 0);
    assert!(p.get("failure-details").is_none());

    // Submission by mail through the relay itself.
    let settings = TlsRptSettings {
        dir: relay.tlsrpt_dir.clone(),
        organization: "relay.lab.test".into(),
        contact: "tls-admin@lab.test".into(),
        from: "tls-admin@lab.test".into(),
        submit: true,
        hostname: "relay.lab.test".into(),
    };
    let resolver = Resolver::new(Some(w.dns.addr())).unwrap();
    let made = generate(&settings, &resolver, &day, Some(&relay.spool))
        .await
        .unwrap();
    assert_eq!(made.len(), 2);
    let mailed = w.sinks[reports_mx]
        .wait_for_messages(2, WAIT)
        .await
        .unwrap();
    let m = mailed
        .iter()
        .find(|m| m.rcpt_to == vec!["tls-reports@reports.test".to_string()])
        .expect("the rpt.test report at its rua");
    assert_eq!(m.mail_from, "tls-admin@lab.test");
    let text = String::from_utf8_lossy(&m.data).replace("\r\n", "\n");
    assert!(text.contains("TLS-Report-Domain: rpt.test\n"), "{text}");
    assert!(text.contains("TLS-Report-Submitter: relay.lab.test\n"));
    assert!(
        text.contains("Subject: Report Domain: rpt.test Submitter: relay.lab.test Report-ID: <")
    );
    assert!(text.contains("Content-Type: multipart/report; report-type=\"tlsrpt\""));
    let part = text
        .split("Content-Type: application/tlsrpt+json")
        .nth(1)
        .expect("the JSON part");
    let body = part
        .split("\n\n")
        .nth(1)
        .unwrap()
        .split("--")
        .next()
        .unwrap();
    let decoded: Value = serde_json::from_slice(&b64decode(body)).unwrap();
    assert_eq!(decoded, rpt, "the mailed report is the written one");
    // The https: rua of ok.test is not submitted to (not implemented): only mail went out.
    assert!(
        mailed
            .iter()
            .any(|m| m.rcpt_to == vec!["tls@reports.test".to_string()])
    );
}

/// A domain whose TLSRPT record cannot be looked up (SERVFAIL) is tried again at the next
/// run, and the day is marked done only once every domain was handled; a domain already
/// reported is not reported twice. A temporary DNS failure once lost that day's report
/// for good (the day was marked done all the same).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_whose_record_could_not_be_looked_up_is_made_at_the_next_run() {
    use altroute::tlsrpt::{Recorder, SessionResult, daily_run};
    use altroute_queue::{ManualClock, Spool, SpoolConfig};
    use hickory_resolver::proto::rr::RecordType;

    let w = World::new().await;
    let dir = tempfile::tempdir().unwrap();
    let day = day_of(START);
    let recorder = Recorder::new(dir.path().join("tlsrpt"));
    for domain in ["a.test", "b.test"] {
        recorder.record(&SessionResult {
            time: START,
            ..SessionResult::new(domain, "success")
        });
    }
    w.dns
        .add_txt("_smtp._tls.a.test", "v=TLSRPTv1; rua=mailto:tls@a.test")
        .await
        .unwrap();
    w.dns.fail("_smtp._tls.b.test", RecordType::TXT).unwrap();
    let settings = TlsRptSettings {
        dir: dir.path().join("tlsrpt"),
        organization: "relay.lab.test".into(),
        contact: "tls-admin@lab.test".into(),
        from: "tls-admin@lab.test".into(),
        submit: true,
        hostname: "relay.lab.test".into(),
    };
    let clock = std::sync::Arc::new(ManualClock::new(START + 86_400));
    let spool = Spool::open(&dir.path().join("spool"), SpoolConfig::default(), clock).unwrap();
    let resolver = Resolver::new(Some(w.dns.addr())).unwrap();
    let rcpts = |spool: &Spool| -> Vec<String> {
        let mut r: Vec<String> = spool
            .list()
            .into_iter()
            .flat_map(|e| e.envelope.rcpt_to)
            .collect();
        r.sort();
        r
    };

    assert!(!daily_run(&settings, &resolver, &spool, &day).await);
    assert_eq!(rcpts(&spool), ["tls@a.test"]);
    assert!(!settings.dir.join("reported").join(&day).exists());
    // A crash after a.test's report was queued, before a.test was marked done: its
    // address is marked, so the report is not queued again.
    let domains = settings.dir.join("reported").join(format!("{day}.domains"));
    // The address's marker has a name no domain can have (an audit's domain named like
    // another domain's address marker had its report skipped).
    let mut names: Vec<String> = std::fs::read_dir(&domains)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(names[0], "a.test");
    assert!(names[1].starts_with("a.test#to-"), "{names:?}");
    std::fs::remove_file(domains.join("a.test")).unwrap();
    assert!(!daily_run(&settings, &resolver, &spool, &day).await);
    assert_eq!(rcpts(&spool), ["tls@a.test"], "queued again after a crash");

    w.dns.heal("_smtp._tls.b.test", RecordType::TXT).unwrap();
    w.dns
        .add_txt("_smtp._tls.b.test", "v=TLSRPTv1; rua=mailto:tls@b.test")
        .await
        .unwrap();
    assert!(daily_run(&settings, &resolver, &spool, &day).await);
    assert_eq!(
        rcpts(&spool),
        ["tls@a.test", "tls@b.test"],
        "a.test reported twice?"
    );
    assert!(settings.dir.join("reported").join(&day).exists());
    assert!(daily_run(&settings, &resolver, &spool, &day).await);
    assert_eq!(rcpts(&spool).len(), 2);
}

/// A session for mail to a Unicode domain is recorded under the domain's A-label, with the
/// MTA-STS policy that was applied to it: the report is made for that domain. The results
/// were once filed under the Unicode name, without the policy (the cache is keyed by
/// A-label), and the daily report skipped that name as "not a host name": those sessions
/// were never reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_for_a_unicode_domain_are_filed_under_its_a_label() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = World::new().await;
    let _alt = w.sink("alt.lab.test", Tls::Valid).await;
    let mx = w
        .mx("xn--bcher-kva.test", 10, "mx.xn--bcher-kva.test", Tls::None)
        .await;
    w.sts(
        "xn--bcher-kva.test",
        "1",
        HttpResponse::text(&sts_policy("testing", &["mx.xn--bcher-kva.test"])),
        None,
    )
    .await;
    let relay = Relay::start(&w, dir.path(), &dir.path().join("cache")).await;
    let env = altroute_queue::Envelope::new("alice@corp.test", vec!["a@bücher.test".into()]);
    let id = relay
        .spool
        .store(env, b"Subject: idn\r\n\r\nbody\r\n".to_vec())
        .await
        .unwrap();
    assert_eq!(relay.settled(&id).await, None, "delivered");
    assert_eq!(w.sinks[mx].messages().len(), 1);
    let sessions: Vec<_> = relay
        .results()
        .into_iter()
        .filter(|r| r.receiving_mx.as_deref() == Some("mx.xn--bcher-kva.test"))
        .collect();
    assert_eq!(sessions.len(), 1, "{:#?}", relay.results());
    let r = &sessions[0];
    assert_eq!(r.domain, "xn--bcher-kva.test");
    assert_eq!(r.policy_type, "sts", "the policy that applied: {r:#?}");
    assert_eq!(r.result, "starttls-not-supported");
    assert_eq!(r.mx_host, vec!["mx.xn--bcher-kva.test".to_string()]);
}
