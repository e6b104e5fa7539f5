//! Hot swaps under load, and failed candidates.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::time::Duration;

use proxy_wasm_host::{Error, Host, HostConfig, PluginSpec, PolicySlot};

use super::{host, request, testguest};

fn spec(config: &str) -> PluginSpec {
    PluginSpec::new(altroute_modules::TESTGUEST, "testguest.http")
        .name("testguest")
        .plugin_config(config)
        .version(config)
}

#[test]
fn two_hundred_swaps_under_eight_threads_serve_each_request_from_one_version() {
    // The deadline is wall-clock time: with 8 busy threads on a small shared machine and
    // an unoptimised build, a descheduled thread can overrun 100 ms. This test is about
    // swap consistency, so it gives each call a generous budget.
    let host = Host::new(HostConfig {
        deadline: Duration::from_secs(5),
        warm_instances: 2,
        ..HostConfig::default()
    })
    .unwrap();
    let slot = Arc::new(PolicySlot::new(testguest(&host, "v1")));
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..8)
        .map(|i| {
            let (slot, stop, served) = (slot.clone(), stop.clone(), served.clone());
            std::thread::spawn(move || {
                let req = request(&[
                    (":path", "/swap"),
                    (":method", "GET"),
                    ("x-worker", &i.to_string()),
                ]);
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let plugin = slot.current();
                    match plugin.http_request(&req) {
                        Ok(out) => {
                            let config = out.header("x-tg-config").unwrap_or_default();
                            if config != plugin.version().as_bytes() {
                                errors.push(format!(
                                    "plugin {} answered with config {:?}",
                                    plugin.version(),
                                    String::from_utf8_lossy(config)
                                ));
                            }
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                errors
            })
        })
        .collect();
    for i in 0..200 {
        let version = if i % 2 == 0 { "v2" } else { "v1" };
        let old = slot
            .try_swap(&host, spec(version), |candidate| {
                let out = candidate
                    .http_request(&request(&[(":path", "/self-test")]))
                    .map_err(|e| vec![e.to_string()])?;
                if out.header("x-tg-config") == Some(version.as_bytes()) {
                    Ok(())
                } else {
                    Err(vec!["wrong marker".into()])
                }
            })
            .unwrap();
        assert_ne!(old.version(), version);
        assert_eq!(slot.version(), version);
    }
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for w in workers {
        errors.extend(w.join().unwrap());
    }
    let served = served.load(Ordering::Relaxed);
    println!(
        "swap test: 200 swaps, {served} requests served, {} errors",
        errors.len()
    );
    assert!(errors.is_empty(), "{:?}", &errors[..errors.len().min(5)]);
    assert!(served > 0);
}

#[test]
fn a_failed_candidate_leaves_the_active_plugin_serving_and_says_why() {
    let host = host();
    let slot = PolicySlot::new(testguest(&host, "v1"));
    let reasons = slot
        .try_swap(&host, spec("reject"), |_| Ok(()))
        .unwrap_err();
    assert_eq!(reasons.len(), 1);
    assert!(
        reasons[0].contains("rejected its configuration"),
        "{reasons:?}"
    );
    let reasons = slot
        .try_swap(&host, spec("v2"), |_| {
            Err(vec!["case 1 failed".into(), "case 2 failed".into()])
        })
        .unwrap_err();
    assert_eq!(
        reasons,
        vec!["candidate v2: case 1 failed", "candidate v2: case 2 failed"]
    );
    let reasons = slot
        .try_swap(
            &host,
            PluginSpec::new(&b"not wasm"[..], "x").version("bad"),
            |_| Ok(()),
        )
        .unwrap_err();
    assert!(reasons[0].contains("does not compile"), "{reasons:?}");
    assert_eq!(slot.version(), "v1");
    let out = slot
        .current()
        .http_request(&request(&[(":path", "/")]))
        .unwrap();
    assert_eq!(out.header("x-tg-config"), Some(&b"v1"[..]));
    // Loading errors are typed too.
    assert!(matches!(host.load(spec("reject")), Err(Error::Configure)));
}
