//! What one HTTP context costs in the proxy-wasm host, part by part: WAT modules that
//! make some of the host calls a routing question makes, and nothing else, run through
//! `Plugin::http_request_with` with the request headers the relay sends for the bench's
//! verdict (`bench/decision.sh`). The differences between rows give the cost of a
//! stored header, of the header block read, and of each decision header added one by
//! one or all at once (`proxy_set_header_map_pairs`, which replaces the whole map).
//!
//! `bash bench/host-costs.sh` runs it in release mode and prints a Markdown table.

use std::hint::black_box;
use std::time::{Duration, Instant};

use altroute_policy::{
    CertStatus, Hop, Query, Starttls, TlsVersion, compile, contract, decide, fixtures,
};
use proxy_wasm_host::{Host, HostConfig, HttpRequestRef, PluginSpec};

const WARMUP: usize = 20_000;
const SAMPLES: usize = 100_000;
const ROUNDS: usize = 3;

/// A module whose `proxy_on_request_headers` runs `body`; its data segment holds `data`
/// at offset 1024.
fn module(data: &[u8], body: &str) -> Vec<u8> {
    let imports = r#"(import "env" "proxy_get_header_map_pairs" (func $pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))"#;
    let text = altroute_tests::http_wat_module(imports, data, "", "", body);
    wat::parse_str(text).expect("the module compiles")
}

/// The proxy-wasm header map wire format (u32 count, u32 lengths, NUL-terminated text).
fn serialize(pairs: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        for part in [k.as_bytes(), v] {
            out.extend_from_slice(part);
            out.push(0);
        }
    }
    out
}

fn main() {
    let compiled = compile(fixtures::TABLE[0].1).expect("table policy compiles");
    let verdict = Query::plan("alice@corp.example", "bob@partner.example").verdict(
        Hop::Direct,
        "mx.partner.example",
        Starttls::Absent,
        TlsVersion::None,
        CertStatus::None,
    );
    // The request headers the relay sends for this question (`policy_engine::ask`).
    let mut buf = String::new();
    let (headers, n) = altroute::policy_engine::request_headers(&verdict, &mut buf);
    let request = &headers[..n];
    // The decision headers the standard module adds for it.
    let decision = decide(&compiled.policy, &verdict);
    let mut decided: Vec<(String, Vec<u8>)> = Vec::new();
    let mut value_buf = String::new();
    contract::for_each_decision_header(&decision, &mut value_buf, |name, value| {
        decided.push((name.to_string(), value.as_bytes().to_vec()));
    });

    // Data segment: each decision header's name and value, then the whole map (request
    // and decision headers) serialized for `proxy_set_header_map_pairs`.
    let mut data = Vec::new();
    let mut adds = String::new();
    for (name, value) in &decided {
        let (n, v) = (1024 + data.len(), 1024 + data.len() + name.len());
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(value);
        adds.push_str(&format!(
            "(drop (call $add (i32.const 0) (i32.const {n}) (i32.const {}) (i32.const {v}) (i32.const {})))\n",
            name.len(),
            value.len()
        ));
    }
    let mut whole: Vec<(&str, &[u8])> = request.to_vec();
    whole.extend(decided.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
    let block = serialize(&whole);
    let block_at = 1024 + data.len();
    data.extend_from_slice(&block);

    let read = "(drop (call $pairs (i32.const 0) (i32.const 16) (i32.const 20)))\n";
    let set = format!(
        "(drop (call $set_pairs (i32.const 0) (i32.const {block_at}) (i32.const {})))",
        block.len()
    );
    let k = decided.len();
    let rows: Vec<(String, bool, String)> = vec![
        (
            "bare context, no request headers".into(),
            false,
            String::new(),
        ),
        (
            format!("bare context, {} request headers", request.len()),
            true,
            String::new(),
        ),
        ("+ the header block read".into(), true, read.into()),
        (
            format!("+ {k} decision headers, one add each"),
            true,
            format!("{read}{adds}"),
        ),
        (
            format!(
                "+ {k} decision headers, one set of all {} pairs",
                whole.len()
            ),
            true,
            format!("{read}{set}"),
        ),
        (
            format!("+ {} decision headers, one add each", 2 * k),
            true,
            format!("{read}{adds}{adds}"),
        ),
    ];

    let host = Host::new(HostConfig::default()).expect("host");
    let plugins: Vec<_> = rows
        .iter()
        .map(|(_, _, body)| {
            host.load(PluginSpec::new(module(&data, body), "costs"))
                .expect("the module loads")
        })
        .collect();
    // The set-all row must leave exactly the map the add row leaves.
    let after = |p: &proxy_wasm_host::Plugin| {
        let req = HttpRequestRef {
            headers: request,
            ..HttpRequestRef::default()
        };
        p.http_request_with(req, |v| v.headers.to_vec())
            .expect("a context")
    };
    assert_eq!(
        after(&plugins[3]),
        after(&plugins[4]),
        "add and set leave the same map"
    );

    let mut p50 = vec![Vec::new(); rows.len()];
    for _ in 0..ROUNDS {
        for (i, ((_, with_headers, _), plugin)) in rows.iter().zip(&plugins).enumerate() {
            let headers: &[(&str, &[u8])] = if *with_headers { request } else { &[] };
            let req = HttpRequestRef {
                headers,
                ..HttpRequestRef::default()
            };
            let one = || {
                plugin
                    .http_request_with(req, |v| black_box(v.headers.len()))
                    .expect("a context");
            };
            for _ in 0..WARMUP {
                one();
            }
            let mut t: Vec<Duration> = (0..SAMPLES)
                .map(|_| {
                    let start = Instant::now();
                    one();
                    start.elapsed()
                })
                .collect();
            t.sort();
            p50[i].push(t[SAMPLES / 2]);
        }
    }
    println!("| one HTTP context (p50, ns) | round 1 | round 2 | round 3 |");
    println!("|---|---|---|---|");
    for ((name, _, _), runs) in rows.iter().zip(&p50) {
        let cells: Vec<String> = runs.iter().map(|d| d.as_nanos().to_string()).collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
}
