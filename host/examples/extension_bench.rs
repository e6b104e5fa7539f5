//! Decision latency of "other sessions" while one policy extension misbehaves
//! (bench/extensions.sh). Not a test: it prints numbers, it asserts nothing.
//!
//! One engine: the standard module, the finance-secure example and a hostile extension
//! scoped to `*.victim.test`. A measuring thread asks plan questions for other mail
//! (through the whole chain) and records each latency; meanwhile `HOSTILE` threads ask
//! questions about victim mail. Scenarios: the hostile extension well behaved (baseline),
//! an infinite loop with the default cool-down, and the same loop with the cool-down
//! disabled (every victim question burns its full deadline).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use altroute::extensions::{ExtensionConfig, ModuleSource};
use altroute::policy_engine::PolicyEngine;
use altroute_policy::Query;
use altroute_policy::pattern::Pattern;

const POLICY: &str = r#"
[[hosts]]
name = "secure-relay"
address = "relay.example.net"

[alternate_secure_route]
host = "secure-relay"

[[tls_compliance]]
name = "partners"
domains = ["*.strict.test"]
"#;

const FINANCE: &str = r#"{"senders": ["finance.corp.test"], "host": {"name": "finance-relay", "addresses": ["relay.example.net"]}}"#;

fn hostile_wat(body: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (func (export "malloc") (param $n i32) (result i32) (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "_initialize"))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) {body} (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_delete") (param i32)))"#
    ))
    .unwrap()
}

fn engine(hostile_body: &str, cooldown: bool, dir: &std::path::Path) -> PolicyEngine {
    let path = dir.join(format!("hostile-{}.wasm", hostile_body.len()));
    std::fs::write(&path, hostile_wat(hostile_body)).unwrap();
    let mut hostile = ExtensionConfig::new("hostile", ModuleSource::File(path), "");
    hostile.recipients = vec![Pattern::parse("*.victim.test").unwrap()];
    if !cooldown {
        hostile.max_consecutive_faults = u32::MAX;
    }
    let finance = ExtensionConfig::new(
        "finance-secure",
        ModuleSource::Builtin("finance-secure".into()),
        FINANCE,
    );
    PolicyEngine::standard(POLICY)
        .unwrap()
        .with_extensions(&[finance, hostile])
        .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// p50 and p99 of `n` other-mail questions while `hostile` threads ask victim questions.
fn measure(engine: Arc<PolicyEngine>, n: usize, hostile: usize) -> (Duration, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for t in 0..hostile {
        let (engine, stop) = (engine.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let q = Query::plan("alice@corp.test", &format!("v{t}@x.victim.test"));
            while !stop.load(Ordering::Relaxed) {
                let _ = engine.answer(&q);
            }
        }));
    }
    let queries = [
        Query::plan("alice@corp.test", "bob@open.test"),
        Query::plan("cfo@finance.corp.test", "bob@open.test"),
        Query::plan("alice@corp.test", "bob@x.strict.test"),
    ];
    for q in &queries {
        let _ = engine.answer(q);
    }
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let q = &queries[i % queries.len()];
        let t = Instant::now();
        std::hint::black_box(engine.answer(q));
        samples.push(t.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    samples.sort();
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let hostile_threads = 1;
    let dir = tempfile::tempdir().unwrap();
    let scenarios = [
        (
            "baseline: hostile extension idle (returns at once)",
            "",
            true,
        ),
        (
            "infinite loop, default cool-down (5 faults, 30 s)",
            "(loop $l (br $l))",
            true,
        ),
        (
            "infinite loop, cool-down disabled",
            "(loop $l (br $l))",
            false,
        ),
    ];
    println!("| scenario | other mail p50 | other mail p99 | p99 / baseline |");
    println!("|---|---|---|---|");
    let mut base = None;
    for (name, body, cooldown) in scenarios {
        let engine = Arc::new(engine(body, cooldown, dir.path()));
        let (p50, p99) = measure(engine, n, hostile_threads);
        let b = *base.get_or_insert(p99);
        println!(
            "| {name} | {:.1} µs | {:.1} µs | {:.2}× |",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            p99.as_secs_f64() / b.as_secs_f64()
        );
    }
    println!(
        "({n} questions per scenario through standard + finance-secure + hostile; {hostile_threads} thread(s) asking victim questions meanwhile)"
    );
}
