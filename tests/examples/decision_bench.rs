//! One routing decision (plan + verdict) through the proxy-wasm host versus native
//! `decide()`: p50 / p99 / p99.9, warm and with cold caches, and the time for a plugin to
//! be ready from a cached compiled artifact.
//!
//! `bash bench/decision.sh` runs it in release mode and prints a Markdown table.

use std::hint::black_box;
use std::time::{Duration, Instant};

use altroute_policy::{
    CertStatus, Decision, Hop, Query, Starttls, TlsVersion, compile, decide, fixtures,
};
use proxy_wasm_host::{Host, HostConfig, Plugin, PluginSpec};

const WARMUP: usize = 2_000;
const SAMPLES: usize = 50_000;
const COLD_SAMPLES: usize = 2_000;

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
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

    if std::env::var_os("BENCH_PROFILE").is_some() {
        for _ in 0..300_000 {
            one_wasm();
        }
        return;
    }
    for _ in 0..WARMUP {
        one_wasm();
        one_native();
    }
    let wasm_warm = percentiles(measure(&one_wasm, SAMPLES, None));
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
    let mut buf = vec![0u8; 64 << 20];
    let wasm_cold = percentiles(measure(&one_wasm, COLD_SAMPLES, Some(&mut buf)));
    let native_cold = percentiles(measure(&one_native, COLD_SAMPLES, Some(&mut buf)));

    println!("| one decision (plan + verdict) | p50 µs | p99 µs | p99.9 µs |");
    println!("|---|---|---|---|");
    for (name, (p50, p99, p999)) in [
        ("wasm module via proxy-wasm host, warm", wasm_warm),
        ("native decide(), warm", native_warm),
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
         (20 runs; with its first decision p50 {:.2} ms)",
        first_load.as_millis(),
        ready_p50.as_secs_f64() * 1e3,
        served_p50.as_secs_f64() * 1e3
    );
}
