//! The decision table through the compiled module in altroute's proxy-wasm host: every
//! case gives exactly the decision native `decide()` gives, header for header.

use std::sync::Arc;

use altroute_policy::contract::{self, decode_decision, encode_decision, encode_query, lookup};
use altroute_policy::{Route, compare, compile, decide, fixtures};
use proxy_wasm_host::{Host, HostConfig, HttpOutcome, HttpRequest, Plugin, PluginSpec};

fn load(host: &Host, json: &str) -> Result<Arc<Plugin>, proxy_wasm_host::Error> {
    host.load(
        PluginSpec::new(altroute_modules::POLICY, "altroute.http")
            .plugin_config(json.as_bytes().to_vec())
            .version("table"),
    )
}

fn request(headers: Vec<(&str, String)>) -> HttpRequest {
    let mut h: Vec<(String, Vec<u8>)> = vec![
        (":method".into(), b"POST".to_vec()),
        (":path".into(), b"/route".to_vec()),
        (":authority".into(), b"altroute".to_vec()),
    ];
    h.extend(
        headers
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_bytes())),
    );
    HttpRequest {
        headers: h,
        ..Default::default()
    }
}

fn decision_pairs(out: &HttpOutcome) -> Vec<(String, Vec<u8>)> {
    out.headers
        .iter()
        .filter(|(k, _)| contract::DECISION_HEADERS.contains(&k.as_str()))
        .cloned()
        .collect()
}

#[test]
fn every_table_case_decides_the_same_in_the_module() {
    let host = Host::new(HostConfig::default()).expect("host");
    let mut cases = 0;
    for (file, toml) in fixtures::TABLE {
        let compiled = compile(toml).unwrap_or_else(|d| panic!("{file}: {d:?}"));
        let plugin = load(&host, &compiled.json).unwrap_or_else(|e| panic!("{file}: {e}"));
        for t in &compiled.policy.tests {
            let native = decide(&compiled.policy, &t.query);
            let out = plugin
                .http_request(&request(encode_query(&t.query)))
                .unwrap_or_else(|e| panic!("{file}: {}: {e}", t.name));
            let got_pairs = decision_pairs(&out);
            let want_pairs: Vec<(String, Vec<u8>)> = encode_decision(&native)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.into_bytes()))
                .collect();
            assert_eq!(
                got_pairs, want_pairs,
                "{file}: {}: decision headers differ",
                t.name
            );
            let decoded = decode_decision(lookup(&out.headers)).expect("decodable decision");
            assert_eq!(decoded, native, "{file}: {}", t.name);
            assert!(
                compare(&t.expect, &decoded).is_empty(),
                "{file}: {}",
                t.name
            );
            assert!(
                out.route_cache_cleared,
                "the module must ask Envoy to re-route"
            );
            match native.route {
                Route::Defer | Route::Bounce => {
                    let local = out
                        .local_response
                        .as_ref()
                        .expect("a local response for a rejection");
                    let want_status = if native.route == Route::Defer {
                        contract::DEFER_STATUS
                    } else {
                        contract::BOUNCE_STATUS
                    };
                    assert_eq!(local.status, want_status);
                    assert_eq!(
                        Some(String::from_utf8_lossy(&local.body).into_owned()),
                        native.reply
                    );
                }
                _ => assert!(out.local_response.is_none(), "{file}: {}", t.name),
            }
            cases += 1;
        }
    }
    assert!(cases >= 40, "only {cases} cases");
}

#[test]
fn garbage_facts_defer_and_spoofed_decisions_are_replaced() {
    let host = Host::new(HostConfig::default()).expect("host");
    let compiled = compile(fixtures::TABLE[0].1).expect("policy");
    let plugin = load(&host, &compiled.json).expect("plugin");
    let garbage: Vec<Vec<(&str, String)>> = vec![
        vec![],
        vec![("x-altroute-phase", "verdict".into())],
        vec![
            ("x-altroute-phase", "plan".into()),
            ("x-altroute-recipient", "no-at".into()),
        ],
        vec![
            ("x-altroute-phase", "verdict".into()),
            ("x-altroute-recipient", "b@partner.example".into()),
            ("x-altroute-tls", "1.1".into()),
        ],
        vec![
            ("x-altroute-phase", "plan".into()),
            ("x-altroute-recipient", "b@partner.example".into()),
            ("x-altroute-attempt", "many".into()),
        ],
    ];
    for facts in garbage {
        let out = plugin
            .http_request(&request(facts.clone()))
            .expect("no trap on garbage");
        let d = decode_decision(lookup(&out.headers)).expect("a decision");
        assert_eq!(d.route, Route::Defer, "{facts:?}");
        assert_eq!(d.rule, "fault");
        assert_eq!(d.policy_version, compiled.policy.version);
    }
    // Non-UTF-8 bytes in a fact must not panic the guest either.
    let mut req = request(vec![("x-altroute-phase", "plan".into())]);
    req.headers
        .push(("x-altroute-recipient".into(), vec![0xff, 0xfe, b'@', 0x80]));
    let out = plugin.http_request(&req).expect("no trap on invalid UTF-8");
    assert_eq!(out.header(contract::ROUTE), Some(&b"defer"[..]));

    // A request that arrives with a decision already set gets the module's own decision.
    let mut facts = encode_query(&altroute_policy::Query::plan(
        "a@corp.example",
        "b@partner.example",
    ));
    // The module adds its headers once the request's are removed: a spoofed header sent
    // twice, or in capitals, must not survive next to the module's own.
    facts.push((contract::ROUTE, "direct".into()));
    facts.push((contract::TLS_REQUIRED, "no".into()));
    facts.push(("X-Altroute-Tls-Required", "no".into()));
    facts.push((contract::REASON, "forged".into()));
    let out = plugin.http_request(&request(facts)).expect("request");
    let routes: Vec<_> = out
        .headers
        .iter()
        .filter(|(k, _)| k == contract::TLS_REQUIRED)
        .collect();
    assert_eq!(routes.len(), 1, "{:?}", out.headers);
    assert_eq!(routes[0].1, b"yes");
    for name in contract::DECISION_HEADERS {
        let n = out.headers.iter().filter(|(k, _)| k == name).count();
        assert!(n <= 1, "{name} appears {n} times: {:?}", out.headers);
    }
    assert_ne!(out.header(contract::REASON), Some(&b"forged"[..]));
    // The plugin still serves correctly afterwards.
    let d = decode_decision(lookup(
        &plugin
            .http_request(&request(encode_query(&altroute_policy::Query::plan(
                "a@x.example",
                "b@partner.example",
            ))))
            .expect("request")
            .headers,
    ))
    .expect("decision");
    assert_eq!(d.rule, "tls_compliance:partners");
}

#[test]
fn invalid_policies_are_refused_at_configure() {
    let host = Host::new(HostConfig::default()).expect("host");
    let compiled = compile(fixtures::TABLE[0].1).expect("policy");
    let tampered = compiled.json.replace("\"port\":2525", "\"port\":2526");
    for (what, config) in [
        ("empty", String::new()),
        ("not json", "{not json".to_string()),
        ("tampered content", tampered),
        ("toml instead of json", fixtures::TABLE[0].1.to_string()),
    ] {
        let err = match load(&host, &config) {
            Ok(_) => panic!("{what}: a bad policy was accepted"),
            Err(e) => e,
        };
        assert!(
            err.to_string().to_lowercase().contains("configur"),
            "{what}: {err}"
        );
    }
}
