//! One routing decision (plan + verdict) through the proxy-wasm host versus native
//! `decide()`: p50 / p99 / p99.9, warm and with cold caches, next to the contract floor
//! (see [`floor_module`]), and the time for a plugin to be ready from a cached compiled
//! artifact. A control row (native work as long as a wasm pair, timed in turns with it)
//! shows how much of the p99 and p99.9 is the machine's own.
//!
//! `bash bench/decision.sh` runs it in release mode and prints a Markdown table.

use std::hint::black_box;
use std::time::{Duration, Instant};

use altroute_policy::{
    CertStatus, Decision, Hop, Query, Route, Starttls, TlsVersion, compile, contract, decide,
    fixtures,
};
use proxy_wasm_host::{Host, HostConfig, Plugin, PluginSpec};

const WARMUP: usize = 2_000;
const SAMPLES: usize = 50_000;
const COLD_SAMPLES: usize = 2_000;
const LARGE_SAMPLES: usize = 20_000;

/// p50, p99 and p99.9.
type Percentiles = (Duration, Duration, Duration);

fn percentiles(mut v: Vec<Duration>) -> Percentiles {
    v.sort();
    let at = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    (at(0.50), at(0.99), at(0.999))
}

fn us(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e6)
}

/// Query in, decision out, as the relay asks (`altroute::policy_engine::ask`): encode
/// the facts as headers, run one HTTP context, decode the decision headers.
fn ask(plugin: &Plugin, q: &Query) -> Decision {
    altroute::policy_engine::ask(plugin, q).expect("a decision")
}

/// The contract's floor: a WAT module that makes the host calls the standard module makes
/// for one routing question (the request headers in one `proxy_get_header_map_pairs`, the
/// decision headers added one by one, `clear_route_cache`, the decision counters) and
/// nothing else: it decides nothing and answers the decision `decide()` gave for each of
/// the two queries, held in its data segment. It tells which part of the decision latency
/// the ABI calls, the host and the relay's encoding take, and which part the module's own
/// work (parsing the facts, `decide()`, encoding the decision) takes. It tells the two
/// queries apart by their number of request headers.
fn floor_module(plan: (usize, &Decision), verdict: (usize, &Decision)) -> String {
    let mut data = Vec::<u8>::new();
    let mut at = |bytes: &[u8]| -> (usize, usize) {
        let start = 1024 + data.len();
        data.extend_from_slice(bytes);
        (start, bytes.len())
    };
    let foreign = at(b"clear_route_cache");
    let metric = at(b"floor_decisions_total");
    let mut adds = |d: &Decision| -> String {
        let mut calls = String::new();
        let mut buf = String::new();
        contract::for_each_decision_header(d, &mut buf, |name, value| {
            let (n, nl) = at(name.as_bytes());
            let (v, vl) = at(value.as_bytes());
            calls.push_str(&format!(
                "(drop (call $add (i32.const 0) (i32.const {n}) (i32.const {nl}) (i32.const {v}) (i32.const {vl})))\n"
            ));
        });
        // As the standard module counts: every decision, and reroutes or rejections again.
        let bumps = if matches!(d.route, Route::Alternate | Route::Defer | Route::Bounce) {
            2
        } else {
            1
        };
        for _ in 0..bumps {
            calls.push_str("(drop (call $inc (global.get $metric) (i64.const 1)))\n");
        }
        calls
    };
    let plan_adds = adds(plan.1);
    let verdict_adds = adds(verdict.1);
    let imports = r#"(import "env" "proxy_get_header_map_pairs" (func $pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_call_foreign_function" (func $ff (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $inc (param i32 i64) (result i32)))"#;
    let (m, ml) = metric;
    let configure = format!(
        "(drop (call $define (i32.const 0) (i32.const {m}) (i32.const {ml}) (i32.const 8)))
    (global.set $metric (i32.load (i32.const 8)))"
    );
    let (f, fl) = foreign;
    let (plan_count, verdict_count) = (plan.0, verdict.0);
    let headers = format!(
        "(drop (call $pairs (i32.const 0) (i32.const 16) (i32.const 20)))
    ;; The block starts with its number of headers.
    (local.set $count (i32.load (i32.load (i32.const 16))))
    (if (i32.eq (local.get $count) (i32.const {plan_count}))
      (then {plan_adds}))
    (if (i32.eq (local.get $count) (i32.const {verdict_count}))
      (then {verdict_adds}))
    (drop (call $ff (i32.const {f}) (i32.const {fl}) (i32.const 0) (i32.const 0) (i32.const 24) (i32.const 28)))"
    );
    altroute_tests::http_wat_module(
        imports,
        &data,
        "(global $metric (mut i32) (i32.const 0))",
        &configure,
        &headers,
    )
}

/// How many request headers `ask` sends for `q`: its facts (those not at their default
/// value) and the pseudo-headers.
fn request_header_count(q: &Query) -> usize {
    altroute::policy_engine::request_headers(q, &mut String::new()).1
}

fn main() {
    let compiled = compile(fixtures::TABLE[0].1).expect("table policy compiles");
    let policy = compiled.policy.clone();
    let plan = Query::plan("alice@corp.example", "bob@partner.example");
    let verdict = plan.clone().verdict(
        Hop::Direct,
        "mx.partner.example",
        Starttls::Absent,
        TlsVersion::None,
        CertStatus::None,
    );

    let cache = tempfile::tempdir().expect("tempdir");
    let config = HostConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        ..HostConfig::default()
    };
    let host = Host::new(config.clone()).expect("host");
    let module: Vec<u8> = match std::env::var_os("BENCH_MODULE") {
        Some(p) => std::fs::read(p).expect("module"),
        None => altroute_modules::POLICY.to_vec(),
    };
    let spec = PluginSpec::new(module, "altroute.http")
        .plugin_config(compiled.json.clone().into_bytes())
        .version(compiled.policy.version.clone());
    let t = Instant::now();
    let plugin = host.load(spec.clone()).expect("plugin loads");
    let first_load = t.elapsed();

    // A fresh host (empty in-memory cache) loading from the on-disk artifact cache.
    let mut ready = Vec::new();
    // Each load measured on its own: `load` returns with one configured instance and
    // builds the other warm instances on a background thread, which is given time to
    // finish (untimed) before the next load. `served` adds the first decision.
    let mut served = Vec::new();
    for _ in 0..20 {
        let fresh = Host::new(config.clone()).expect("host");
        let t = Instant::now();
        let p = fresh.load(spec.clone()).expect("plugin loads from cache");
        ready.push(t.elapsed());
        black_box(ask(&p, &plan));
        served.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(50));
        drop(p);
    }
    let (ready_p50, _, _) = percentiles(ready.clone());
    let (served_p50, _, _) = percentiles(served);
    // The same module again on the running host, as a policy reload loads it (the relay
    // hands the active module's bytes back with the new policy): compiled, checked and
    // linked once per host, so this is one instance, `_initialize` and `on_configure`.
    // It loads the same policy again; a new policy of the same size takes the same work.
    let mut reload = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let p = host.load(spec.clone()).expect("plugin loads again");
        reload.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(50));
        drop(p);
    }
    let (reload_p50, _, _) = percentiles(reload);

    let one_wasm = || {
        let a = ask(&plugin, black_box(&plan));
        let b = ask(&plugin, black_box(&verdict));
        black_box((a, b));
    };
    let one_native = || {
        black_box(decide(&policy, black_box(&plan)));
        black_box(decide(&policy, black_box(&verdict)));
    };

    // Sanity: both paths agree on this input.
    assert_eq!(ask(&plugin, &plan), decide(&policy, &plan));
    assert_eq!(ask(&plugin, &verdict), decide(&policy, &verdict));

    let (plan_decision, verdict_decision) = (decide(&policy, &plan), decide(&policy, &verdict));
    let counts = (request_header_count(&plan), request_header_count(&verdict));
    assert_ne!(
        counts.0, counts.1,
        "the floor module tells the queries apart by count"
    );
    let floor_wat = floor_module((counts.0, &plan_decision), (counts.1, &verdict_decision));
    let floor = host
        .load(PluginSpec::new(
            wat::parse_str(&floor_wat).expect("floor module compiles"),
            "floor",
        ))
        .expect("floor module loads");
    // The floor answers exactly what the standard module answers.
    assert_eq!(ask(&floor, &plan), plan_decision);
    assert_eq!(ask(&floor, &verdict), verdict_decision);
    let one_floor = || {
        let a = ask(&floor, black_box(&plan));
        let b = ask(&floor, black_box(&verdict));
        black_box((a, b));
    };

    let measure = |f: &dyn Fn(), n: usize, sweep: Option<&mut Vec<u8>>| -> Vec<Duration> {
        let mut out = Vec::with_capacity(n);
        let mut sweep = sweep;
        for i in 0..n {
            if let Some(buf) = sweep.as_deref_mut() {
                // Evict caches: touch 64 MiB between decisions.
                for j in (0..buf.len()).step_by(64) {
                    buf[j] = buf[j].wrapping_add(i as u8);
                }
                black_box(&buf);
            }
            let t = Instant::now();
            f();
            out.push(t.elapsed());
        }
        out
    };

    // For `perf record`: BENCH_PROFILE=1 loops the standard module, BENCH_PROFILE=floor
    // the contract floor.
    if let Some(which) = std::env::var_os("BENCH_PROFILE") {
        let f: &dyn Fn() = if which == "floor" {
            &one_floor
        } else {
            &one_wasm
        };
        for _ in 0..300_000 {
            f();
        }
        return;
    }
    for _ in 0..WARMUP {
        one_wasm();
        one_native();
        one_floor();
    }
    let wasm_warm = percentiles(measure(&one_wasm, SAMPLES, None));
    let floor_warm = percentiles(measure(&one_floor, SAMPLES, None));
    let native_warm = percentiles(measure(&one_native, SAMPLES, None));
    // Each half alone: one HTTP context, the unit of ../shared/NOTES-proxy-wasm.md's figures.
    let plan_warm = percentiles(measure(
        &|| {
            black_box(ask(&plugin, black_box(&plan)));
        },
        SAMPLES,
        None,
    ));
    let verdict_warm = percentiles(measure(
        &|| {
            black_box(ask(&plugin, black_box(&verdict)));
        },
        SAMPLES,
        None,
    ));
    // The machine's own tail. This VM has phases, from milliseconds to seconds long, in
    // which all code runs up to 1.7 times slower, native code included; they set the
    // p99 and p99.9 rows above. The control is native work as long as one wasm pair
    // (`decide()` repeated), timed in turns with the wasm pair, sample by sample, so the
    // same phases fall on both: where the control's tail matches the module's, the tail
    // is the machine's.
    //
    // How many `decide()` make one wasm pair: a first guess from one `decide()`, then
    // corrected with the repeated work itself (a `decide()` right after a wasm pair runs
    // with colder caches than one in a loop), each timed in turns with the wasm pair.
    let in_turns = |other: &dyn Fn(), n: usize| {
        let (mut a, mut b) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            let t = Instant::now();
            one_wasm();
            a.push(t.elapsed());
            let t = Instant::now();
            other();
            b.push(t.elapsed());
        }
        (percentiles(a), percentiles(b))
    };
    let ratio =
        |(a, b): (Percentiles, Percentiles)| a.0.as_secs_f64() / b.0.as_secs_f64().max(1e-9);
    let first = ratio(in_turns(
        &|| {
            black_box(decide(&policy, black_box(&plan)));
        },
        WARMUP,
    ));
    let guess = (first.round() as usize).max(1);
    let (policy_ref, plan_ref) = (&policy, &plan);
    let repeated = |k: usize| {
        move || {
            for _ in 0..k {
                black_box(decide(policy_ref, black_box(plan_ref)));
            }
        }
    };
    let repeats =
        ((guess as f64 * ratio(in_turns(&repeated(guess), WARMUP))).round() as usize).max(1);
    let (turns_wasm, turns_control) = in_turns(&repeated(repeats), SAMPLES);
    // The same pair of questions against a policy of 10,000 patterns.
    let large_source = fixtures::large(2_000);
    let t = Instant::now();
    let large =
        altroute_policy::compile_without_tests(&large_source).expect("the large policy compiles");
    let large_compile = t.elapsed();
    let large_spec = PluginSpec::new(spec.module.clone(), "altroute.http")
        .plugin_config(large.json.clone().into_bytes())
        .version(large.policy.version.clone());
    let large_plugin = host
        .load(large_spec.clone())
        .expect("the large policy loads");
    // Ready with the large policy: a fresh host, the module from the artifact cache, so
    // the time is the instantiation and `on_configure` parsing the policy.
    let mut large_ready = Vec::new();
    for _ in 0..5 {
        let fresh = Host::new(config.clone()).expect("host");
        let t = Instant::now();
        let p = fresh
            .load(large_spec.clone())
            .expect("the large policy loads");
        large_ready.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(200));
        drop(p);
    }
    let (large_ready_p50, _, _) = percentiles(large_ready);
    let large_plan = Query::plan("alice@unit7.corp.example", "bob@d1500-3.example");
    let large_verdict = large_plan.clone().verdict(
        Hop::Direct,
        "mx.d1500-3.example",
        Starttls::Absent,
        TlsVersion::None,
        CertStatus::None,
    );
    for q in [&large_plan, &large_verdict] {
        let d = decide(&large.policy, q);
        assert_eq!(d.rule, "tls_compliance:r1500", "the question hits a rule");
        assert_eq!(ask(&large_plugin, q), d);
    }
    let large_wasm = percentiles(measure(
        &|| {
            black_box(ask(&large_plugin, black_box(&large_plan)));
            black_box(ask(&large_plugin, black_box(&large_verdict)));
        },
        LARGE_SAMPLES,
        None,
    ));
    let large_native = percentiles(measure(
        &|| {
            black_box(decide(&large.policy, black_box(&large_plan)));
            black_box(decide(&large.policy, black_box(&large_verdict)));
        },
        LARGE_SAMPLES,
        None,
    ));
    let mut buf = vec![0u8; 64 << 20];
    let wasm_cold = percentiles(measure(&one_wasm, COLD_SAMPLES, Some(&mut buf)));
    let native_cold = percentiles(measure(&one_native, COLD_SAMPLES, Some(&mut buf)));

    println!("| one decision (plan + verdict) | p50 µs | p99 µs | p99.9 µs |");
    println!("|---|---|---|---|");
    for (name, (p50, p99, p999)) in [
        ("wasm module via proxy-wasm host, warm", wasm_warm),
        ("native decide(), warm", native_warm),
        (
            "contract floor: same host calls, no decision logic (WAT), warm",
            floor_warm,
        ),
        (
            "plan alone (one HTTP context) via the host, warm",
            plan_warm,
        ),
        (
            "verdict alone (one HTTP context) via the host, warm",
            verdict_warm,
        ),
        ("wasm module via proxy-wasm host, cold caches", wasm_cold),
        ("native decide(), cold caches", native_cold),
        (
            "10,000-pattern policy: wasm module via proxy-wasm host, warm",
            large_wasm,
        ),
        ("10,000-pattern policy: native decide(), warm", large_native),
        (
            "wasm module via proxy-wasm host, warm, in turns with the control below",
            turns_wasm,
        ),
        (
            &format!(
                "control: native decide() x{repeats}, as long as a wasm pair, in turns with it"
            ),
            turns_control,
        ),
    ] {
        println!("| {name} | {} | {} | {} |", us(p50), us(p99), us(p999));
    }
    println!();
    println!(
        "ratio wasm/native p50: warm {:.1}x, cold {:.1}x",
        wasm_warm.0.as_secs_f64() / native_warm.0.as_secs_f64(),
        wasm_cold.0.as_secs_f64() / native_cold.0.as_secs_f64()
    );
    println!(
        "deadline enforcement: on ({} ms per call, epoch tick {} ms)",
        config.deadline.as_millis(),
        config.epoch_tick.as_millis()
    );
    println!(
        "plugin ready: first load (compile) {} ms; from the on-disk artifact cache p50 {:.2} ms \
         (20 runs; with its first decision p50 {:.2} ms); the same module again on the \
         running host (a policy reload) p50 {:.2} ms",
        first_load.as_millis(),
        ready_p50.as_secs_f64() * 1e3,
        served_p50.as_secs_f64() * 1e3,
        reload_p50.as_secs_f64() * 1e3
    );
    println!(
        "10,000-pattern policy ({} KB of JSON): compiled in {:.1} ms; plugin ready from the \
         artifact cache p50 {:.1} ms (5 runs)",
        large.json.len() / 1024,
        large_compile.as_secs_f64() * 1e3,
        large_ready_p50.as_secs_f64() * 1e3
    );
}
