//! Hostile modules written in WAT. After each, the host keeps serving the test guest.

use proxy_wasm_host::{ConnectionInfo, Error, Host, HostConfig, PluginSpec};

use super::{assert_serves, host, request, testguest};

/// Callback bodies of the template module; a test overrides some of them.
const CALLBACKS: &[(&str, &str)] = &[
    ("INIT", ""),
    ("CTX", ""),
    ("VMSTART", ""),
    ("CONFIGURE", ""),
    ("HEADERS", ""),
    ("BODY", ""),
    ("DONE", ""),
    ("LOG", ""),
    ("DELETE", ""),
    ("NEWCONN", ""),
    ("DOWN", ""),
    ("UP", ""),
    ("DCLOSE", ""),
    (
        "MALLOC",
        "(local.set $p (global.get $heap)) (global.set $heap (i32.add (global.get $heap) (local.get $n))) (local.get $p)",
    ),
    ("EXTRA_IMPORT", ""),
    ("PAGES", "2"),
];

const TEMPLATE: &str = r#"(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set_pairs (param i32 i32 i32) (result i32)))
  EXTRA_IMPORT
  (memory (export "memory") PAGES)
  (global $heap (mut i32) (i32.const 4096))
  (func (export "malloc") (param $n i32) (result i32) (local $p i32) MALLOC)
  (func (export "_initialize") INIT)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param $id i32) (param $root i32) CTX)
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) VMSTART (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) CONFIGURE (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) HEADERS (i32.const 0))
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32) BODY (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) DONE (i32.const 1))
  (func (export "proxy_on_log") (param i32) LOG)
  (func (export "proxy_on_delete") (param i32) DELETE)
  (func (export "proxy_on_new_connection") (param i32) (result i32) NEWCONN (i32.const 0))
  (func (export "proxy_on_downstream_data") (param i32 i32 i32) (result i32) DOWN (i32.const 0))
  (func (export "proxy_on_upstream_data") (param i32 i32 i32) (result i32) UP (i32.const 0))
  (func (export "proxy_on_downstream_connection_close") (param i32 i32) DCLOSE)
)"#;

fn module(overrides: &[(&str, &str)]) -> Vec<u8> {
    let mut text = TEMPLATE.to_string();
    for (key, default) in CALLBACKS {
        let body = overrides
            .iter()
            .find(|(k, _)| k == key)
            .map_or(*default, |(_, v)| v);
        text = text.replace(key, body);
    }
    wat::parse_str(&text).unwrap()
}

fn load(
    host: &Host,
    overrides: &[(&str, &str)],
) -> Result<std::sync::Arc<proxy_wasm_host::Plugin>, Error> {
    host.load(PluginSpec::new(module(overrides), "hostile").version("hostile"))
}

#[test]
fn the_template_itself_is_well_behaved() {
    let host = host();
    let plugin = load(&host, &[]).unwrap();
    let out = plugin.http_request(&request(&[(":path", "/")])).unwrap();
    assert_eq!(out.header(":path"), Some(&b"/"[..]));
    let mut s = plugin.stream(ConnectionInfo::default()).unwrap();
    assert_eq!(s.downstream(b"abc", false).unwrap().data, b"abc");
    s.close().unwrap();
}

/// A context's log budget (256 KiB) counts what is written, after escaping: a guest's
/// lines of NULs (five characters each once escaped) once wrote 1.3 MB per question.
#[test]
fn the_log_budget_counts_escaped_lines() {
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    let host = host();
    // Twenty lines of 64 KiB of zero bytes (the second page of memory is zeros).
    let plugin = load(
        &host,
        &[
            ("PAGES", "4"),
            (
                "HEADERS",
                "(local.set 0 (i32.const 20)) (loop $l (drop (call $log (i32.const 2) (i32.const 65536) (i32.const 65536))) (local.set 0 (i32.sub (local.get 0) (i32.const 1))) (br_if $l (local.get 0)))",
            ),
        ],
    )
    .unwrap();
    tracing::subscriber::with_default(subscriber, || {
        plugin.http_request(&request(&[(":path", "/")])).unwrap();
    });
    let written = captured.0.lock().unwrap().len();
    assert!(
        written > 64 * 1024 && written < 256 * 1024 + 2048,
        "{written} bytes of log for one context"
    );
}

#[test]
fn header_names_are_stored_lower_cased_as_envoy_stores_them() {
    let host = host();
    // Adds `X-Mixed-Case: v`, `x-lower: w` and `X-Caf\u{e9}: x` (only ASCII letters are
    // lower-cased, as Envoy's `LowerCaseString` does). The names and values go in a data
    // segment, put in the template's extra-import slot (WAT takes it there).
    let adds = "(drop (call $add (i32.const 0) (i32.const 1024) (i32.const 12) (i32.const 1036) (i32.const 1)))
        (drop (call $add (i32.const 0) (i32.const 1037) (i32.const 7) (i32.const 1044) (i32.const 1)))
        (drop (call $add (i32.const 0) (i32.const 1045) (i32.const 7) (i32.const 1052) (i32.const 1)))";
    let plugin = load(
        &host,
        &[
            (
                "EXTRA_IMPORT",
                r#"(data (i32.const 1024) "X-Mixed-Casevx-lowerwX-Caf\c3\a9x")"#,
            ),
            ("HEADERS", adds),
        ],
    )
    .unwrap();
    let out = plugin
        .http_request(&request(&[(":path", "/"), ("X-From-Embedder", "e")]))
        .unwrap();
    let names: Vec<&str> = out.headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            ":path",
            "x-from-embedder",
            "x-mixed-case",
            "x-lower",
            "x-caf\u{e9}"
        ]
    );
}

#[test]
fn infinite_loop_is_stopped_by_the_deadline() {
    // Deadlines the good guest on the same host never nears, even when the machine pauses
    // it: the loop runs into them, the good guest must not.
    let host = Host::new(HostConfig {
        deadline: std::time::Duration::from_millis(500),
        load_deadline: std::time::Duration::from_millis(500),
        warm_instances: 1,
        ..HostConfig::default()
    })
    .unwrap();
    let good = testguest(&host, "good");
    let plugin = load(&host, &[("HEADERS", "(loop $l (br $l))")]).unwrap();
    for _ in 0..2 {
        let err = plugin
            .http_request(&request(&[(":path", "/")]))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Deadline {
                    callback: "proxy_on_request_headers"
                }
            ),
            "{err}"
        );
        assert_serves(&good);
    }
    // A loop at load time fails the load with the same error.
    refused_at_configure(&host, &[("CONFIGURE", "(loop $l (br $l))")], &good);
}

/// Thousands of expensive host calls with no loop between them (each replaces the request
/// body with 8 MiB of guest memory, about a millisecond). Wasmtime checks a deadline only
/// in guest code, at function entry and loop back-edges: without the host's own check
/// such a module ran for minutes on a 20 ms deadline and returned as if nothing was
/// wrong. Here, in a callback with guest code after the calls, in one without (no
/// `on_done`/`on_log`/`on_delete` run after them), and at load.
#[test]
fn host_calls_without_a_loop_are_stopped_by_the_deadline() {
    let host = Host::new(HostConfig {
        deadline: std::time::Duration::from_millis(200),
        load_deadline: std::time::Duration::from_millis(200),
        warm_instances: 1,
        ..HostConfig::default()
    })
    .unwrap();
    let good = testguest(&host, "good");
    // 3000 calls: three seconds or more if nothing stops them.
    let calls = "(drop (call $set_buffer (i32.const 0) (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 8388608)))\n".repeat(3000);
    let import = r#"(import "env" "proxy_set_buffer_bytes" (func $set_buffer (param i32 i32 i32 i32 i32) (result i32)))"#;
    let with = |slot: &'static str| {
        [
            ("EXTRA_IMPORT", import),
            ("PAGES", "129"),
            (slot, calls.as_str()),
        ]
    };
    let body: &[(&str, &str)] = &with("HEADERS");
    let plugin = load(&host, body).unwrap();
    let err = plugin
        .http_request(&proxy_wasm_host::HttpRequest {
            body: Some(b"x".to_vec()),
            ..request(&[(":path", "/")])
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Deadline {
                callback: "proxy_on_request_headers"
            }
        ),
        "{err}"
    );
    assert_serves(&good);
    // The last guest code to run is the stream callback itself, which ends with the calls.
    let plugin = load(&host, &with("NEWCONN")).unwrap();
    let err = plugin.stream(ConnectionInfo::default()).err().unwrap();
    assert!(
        matches!(
            err,
            Error::Deadline {
                callback: "proxy_on_new_connection"
            }
        ),
        "{err}"
    );
    assert_serves(&good);
    refused_at_configure(&host, &with("CONFIGURE"), &good);
}

/// Loading `overrides` on `host` fails with a deadline in `on_configure`, and `good`
/// still serves.
fn refused_at_configure(host: &Host, overrides: &[(&str, &str)], good: &proxy_wasm_host::Plugin) {
    let err = load(host, overrides).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Deadline {
                callback: "proxy_on_configure"
            }
        ),
        "{err}"
    );
    assert_serves(good);
}

/// `on_configure` busy for 1.2 s of the host's clock (a module parsing a large
/// configuration).
const SLOW_CONFIGURE: &[(&str, &str)] = &[
    (
        "EXTRA_IMPORT",
        r#"(import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))"#,
    ),
    (
        "CONFIGURE",
        "(drop (call $now (i32.const 64)))
         (i64.store (i32.const 80) (i64.add (i64.load (i32.const 64)) (i64.const 1200000000)))
         (block $done (loop $l
           (drop (call $now (i32.const 64)))
           (br_if $done (i64.ge_u (i64.load (i32.const 64)) (i64.load (i32.const 80))))
           (br $l)))",
    ),
];

#[test]
fn loading_has_its_own_deadline() {
    let config = |load_ms| HostConfig {
        deadline: std::time::Duration::from_millis(500),
        load_deadline: std::time::Duration::from_millis(load_ms),
        warm_instances: 1,
        ..HostConfig::default()
    };
    // Longer than a call may take, within the load deadline: the plugin loads and serves
    // with the call deadline.
    let host = Host::new(config(5_000)).unwrap();
    let plugin = load(&host, SLOW_CONFIGURE).unwrap();
    plugin.http_request(&request(&[(":path", "/")])).unwrap();
    // Past the load deadline: refused like a loop.
    let host = Host::new(config(600)).unwrap();
    let good = testguest(&host, "good");
    refused_at_configure(&host, SLOW_CONFIGURE, &good);
}

#[test]
fn memory_grow_bomb_is_stopped_at_the_cap() {
    let host = Host::new(HostConfig {
        memory_limit: 8 << 20,
        warm_instances: 1,
        ..HostConfig::default()
    })
    .unwrap();
    let good = testguest(&host, "good");
    // Grows until memory.grow fails, then returns normally: still a limit hit.
    let polite = "(block $done (loop $l (br_if $done (i32.eq (memory.grow (i32.const 16)) (i32.const -1))) (br $l)))";
    let plugin = load(&host, &[("HEADERS", polite)]).unwrap();
    let err = plugin
        .http_request(&request(&[(":path", "/")]))
        .unwrap_err();
    assert!(
        matches!(err, Error::MemoryLimit { limit, .. } if limit == 8 << 20),
        "{err}"
    );
    assert_serves(&good);
    // Grows and traps on failure, like an allocator abort.
    let rude = "(loop $l (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1)) (then unreachable)) (br $l))";
    let plugin = load(&host, &[("BODY", rude)]).unwrap();
    let mut req = request(&[(":path", "/")]);
    req.body = Some(b"x".to_vec());
    let err = plugin.http_request(&req).unwrap_err();
    assert!(
        matches!(
            err,
            Error::MemoryLimit {
                callback: "proxy_on_request_body",
                ..
            }
        ),
        "{err}"
    );
    assert_serves(&good);
    // A module whose initial memory exceeds the cap does not load.
    let err = load(&host, &[("PAGES", "1000")]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::MemoryLimit {
                callback: "instantiate",
                ..
            }
        ),
        "{err}"
    );
    assert_serves(&good);
}

#[test]
fn unreachable_in_each_load_callback_fails_the_load() {
    let host = host();
    let good = testguest(&host, "good");
    for (slot, callback) in [
        ("INIT", "_initialize"),
        ("CTX", "proxy_on_context_create"),
        ("VMSTART", "proxy_on_vm_start"),
        ("CONFIGURE", "proxy_on_configure"),
    ] {
        let err = load(&host, &[(slot, "unreachable")]).unwrap_err();
        match err {
            Error::Trap {
                callback: c,
                message,
            } => {
                assert_eq!(c, callback);
                assert!(message.contains("unreachable"), "{message}");
            }
            other => panic!("{slot}: {other}"),
        }
        assert_serves(&good);
    }
}

#[test]
fn unreachable_in_each_request_callback_is_a_trap_and_the_instance_is_rebuilt() {
    let host = host();
    let good = testguest(&host, "good");
    for (slot, body, callback) in [
        (
            "CTX",
            "(if (local.get $root) (then unreachable))",
            "proxy_on_context_create",
        ),
        ("HEADERS", "unreachable", "proxy_on_request_headers"),
        ("BODY", "unreachable", "proxy_on_request_body"),
        ("DONE", "unreachable", "proxy_on_done"),
        ("LOG", "unreachable", "proxy_on_log"),
        ("DELETE", "unreachable", "proxy_on_delete"),
    ] {
        let plugin = load(&host, &[(slot, body)]).unwrap();
        let mut req = request(&[(":path", "/")]);
        req.body = Some(b"body".to_vec());
        // Twice: the second call runs on a rebuilt instance and traps the same way.
        for _ in 0..2 {
            let err = plugin.http_request(&req).unwrap_err();
            assert!(
                matches!(&err, Error::Trap { callback: c, .. } if *c == callback),
                "{slot}: {err}"
            );
            assert!(err.is_guest_fault());
            assert_serves(&good);
        }
    }
}

#[test]
fn unreachable_in_each_stream_callback_is_a_trap() {
    let host = host();
    let good = testguest(&host, "good");
    for (slot, callback) in [
        ("NEWCONN", "proxy_on_new_connection"),
        ("DOWN", "proxy_on_downstream_data"),
        ("UP", "proxy_on_upstream_data"),
        ("DCLOSE", "proxy_on_downstream_connection_close"),
    ] {
        let plugin = load(&host, &[(slot, "unreachable")]).unwrap();
        let result = plugin.stream(ConnectionInfo::default()).and_then(|mut s| {
            s.downstream(b"a", false)?;
            s.upstream(b"b", false)?;
            s.close()
        });
        let err = result.unwrap_err();
        assert!(
            matches!(&err, Error::Trap { callback: c, .. } if *c == callback),
            "{slot}: {err}"
        );
        assert_serves(&good);
        // The plugin still opens streams (the instance was rebuilt); the module that traps
        // in `on_new_connection` traps there again, on the rebuilt instance.
        match plugin.stream(ConnectionInfo::default()) {
            Ok(stream) if slot != "NEWCONN" => drop(stream),
            Err(Error::Trap { callback: c, .. }) if slot == "NEWCONN" && c == callback => {}
            Ok(_) => panic!("{slot}: opened a stream"),
            Err(e) => panic!("{slot}: {e}"),
        }
    }
}

#[test]
fn malloc_returning_out_of_bounds_pointers_is_an_abi_error() {
    let host = host();
    let good = testguest(&host, "good");
    let get_pairs = "(drop (call $pairs (i32.const 0) (i32.const 100) (i32.const 104)))";
    for malloc in [
        "(i32.const -16)",
        // Straddles the end of memory.
        "(i32.sub (i32.mul (memory.size) (i32.const 65536)) (i32.const 2))",
        "(i32.const 0)",
    ] {
        let plugin = load(&host, &[("MALLOC", malloc), ("HEADERS", get_pairs)]).unwrap();
        let err = plugin
            .http_request(&request(&[(":path", "/a-long-enough-path")]))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Guest {
                    callback: "proxy_on_request_headers",
                    ..
                }
            ),
            "{malloc}: {err}"
        );
        assert_serves(&good);
    }
}

#[test]
fn a_buffer_emptied_by_the_guests_allocator_is_an_abi_error() {
    // The allocator that `proxy_get_buffer_bytes` calls empties the very buffer being read
    // (`proxy_set_buffer_bytes` needs no allocation): the host must notice, not index a
    // range that is gone.
    let host = host();
    let good = testguest(&host, "good");
    let plugin = load(
        &host,
        &[
            (
                "EXTRA_IMPORT",
                r#"(import "env" "proxy_get_buffer_bytes" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $set (param i32 i32 i32 i32 i32) (result i32)))"#,
            ),
            (
                "MALLOC",
                "(drop (call $set (i32.const 2) (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 0)))
                 (local.set $p (global.get $heap)) (global.set $heap (i32.add (global.get $heap) (local.get $n))) (local.get $p)",
            ),
            (
                "DOWN",
                "(drop (call $get (i32.const 2) (i32.const 0) (local.get 1) (i32.const 100) (i32.const 104)))",
            ),
        ],
    )
    .unwrap();
    for _ in 0..2 {
        let err = plugin
            .stream(ConnectionInfo::default())
            .and_then(|mut s| s.downstream(b"hello", false).map(|_| ()))
            .unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Guest {
                    callback: "proxy_on_downstream_data",
                    ..
                }
            ),
            "{err}"
        );
        assert_serves(&good);
    }
}

#[test]
fn close_stream_follows_envoys_stream_types() {
    let host = host();
    let close = r#"(import "env" "proxy_close_stream" (func $close (param i32) (result i32)))"#;
    // An unknown type is BAD_ARGUMENT (2); the module traps if it is told anything else.
    let checked = |t: u32| {
        format!(
            "(if (i32.ne (call $close (i32.const 9)) (i32.const 2)) (then unreachable))
             (if (call $close (i32.const {t})) (then unreachable))"
        )
    };
    let (reset_request, reset_response) = (checked(0), checked(1));
    let (close_down, close_up) = (checked(2), checked(3));
    // The request or the response: a reset of the HTTP request, not a connection close.
    for body in [&reset_request, &reset_response] {
        let plugin = load(&host, &[("EXTRA_IMPORT", close), ("HEADERS", body)]).unwrap();
        let outcome = plugin.http_request(&request(&[(":path", "/")])).unwrap();
        assert!(outcome.reset, "{body}");
        // The next request starts clean.
        let plugin = load(&host, &[("EXTRA_IMPORT", close)]).unwrap();
        assert!(
            !plugin
                .http_request(&request(&[(":path", "/")]))
                .unwrap()
                .reset
        );
    }
    // The connections of a stream context; the request types do nothing there.
    for (body, down, up) in [
        (&close_down, true, false),
        (&close_up, false, true),
        (&reset_request, false, false),
    ] {
        let plugin = load(&host, &[("EXTRA_IMPORT", close), ("DOWN", body)]).unwrap();
        let mut stream = plugin.stream(ConnectionInfo::default()).unwrap();
        let out = stream.downstream(b"x", false).unwrap();
        assert_eq!(
            (out.close_downstream, out.close_upstream),
            (down, up),
            "{body}"
        );
    }
    // The connection types in an HTTP context: nothing to close.
    let plugin = load(&host, &[("EXTRA_IMPORT", close), ("HEADERS", &close_down)]).unwrap();
    assert!(
        !plugin
            .http_request(&request(&[(":path", "/")]))
            .unwrap()
            .reset
    );
}

/// A request through `plugin` ends with the header-map limit, in the headers callback.
fn assert_header_limit(plugin: &proxy_wasm_host::Plugin) {
    let err = plugin
        .http_request(&request(&[(":path", "/")]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Limit {
                callback: "proxy_on_request_headers",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_hundred_mib_of_headers_hits_the_header_limit() {
    let host = host();
    let good = testguest(&host, "good");
    // 100 x add_header_map_value with a 1 MiB value (the same bytes each time).
    let bomb = "(local $i i32) (loop $l
        (drop (call $add (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 1048576)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $l (i32.lt_u (local.get $i) (i32.const 100))))";
    let plugin = load(&host, &[("HEADERS", bomb), ("PAGES", "17")]).unwrap();
    assert_header_limit(&plugin);
    assert_serves(&good);
    // set_header_map_pairs claiming 100 MiB.
    let claim = "(drop (call $set_pairs (i32.const 0) (i32.const 0) (i32.const 104857600)))";
    let plugin = load(&host, &[("HEADERS", claim)]).unwrap();
    let err = plugin
        .http_request(&request(&[(":path", "/")]))
        .unwrap_err();
    assert!(err.is_guest_fault(), "{err}");
    assert_serves(&good);
}

/// The header limit counts the whole map, kept up to date as headers come and go: headers
/// added in pieces hit it together, and a removed header gives its room back.
#[test]
fn header_limit_counts_the_whole_map_and_removed_headers_free_their_room() {
    let host = host();
    let good = testguest(&host, "good");
    // Names "a" and "b" at 0 and 1; values are 600 KiB of memory from 16: two of them pass
    // the 1 MiB limit of the map, one at a time does not.
    let extra = r#"(import "env" "proxy_remove_header_map_value" (func $remove (param i32 i32 i32) (result i32)))
        (data (i32.const 0) "ab")"#;
    let add = |name: u32| {
        format!(
            "(drop (call $add (i32.const 0) (i32.const {name}) (i32.const 1) (i32.const 16) (i32.const 614400)))"
        )
    };
    let remove = "(drop (call $remove (i32.const 0) (i32.const 0) (i32.const 1)))";
    // Add "a", remove it, five times over: 3 MiB added in all, never more than 600 KiB held.
    let churn = [add(0), remove.to_string()].concat().repeat(5) + &add(0);
    let plugin = load(
        &host,
        &[
            ("EXTRA_IMPORT", extra),
            ("HEADERS", &churn),
            ("PAGES", "17"),
        ],
    )
    .unwrap();
    let out = plugin.http_request(&request(&[(":path", "/")])).unwrap();
    assert_eq!(out.header("a").map(<[u8]>::len), Some(614400));
    assert_serves(&good);
    // "a" and "b" together: 1.2 MiB in the map.
    let both = add(0) + &add(1);
    let plugin = load(
        &host,
        &[("EXTRA_IMPORT", extra), ("HEADERS", &both), ("PAGES", "17")],
    )
    .unwrap();
    assert_header_limit(&plugin);
    assert_serves(&good);
}

#[test]
fn unknown_import_is_refused_at_load_with_a_clear_error() {
    let host = host();
    let good = testguest(&host, "good");
    let extra = r#"(import "env" "proxy_open_socket" (func $sock (param i32) (result i32)))"#;
    let err = load(&host, &[("EXTRA_IMPORT", extra)]).unwrap_err();
    match &err {
        Error::Link(msg) => assert!(msg.contains("env.proxy_open_socket"), "{msg}"),
        other => panic!("{other}"),
    }
    assert_serves(&good);
}

#[test]
fn wasi_is_refused_by_default_and_locked_down_when_allowed() {
    let extra = r#"(import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "path_open" (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))"#;
    let host = host();
    let err = load(&host, &[("EXTRA_IMPORT", extra)]).unwrap_err();
    assert!(
        matches!(&err, Error::Link(m) if m.contains("WASI") && m.contains("fd_write")),
        "{err}"
    );

    let host = Host::new(HostConfig {
        allow_wasi: true,
        warm_instances: 1,
        ..HostConfig::default()
    })
    .unwrap();
    // path_open answers an errno (not success); the module adds it as a header value byte.
    let headers = "(i32.store8 (i32.const 200) (i32.add (i32.const 48) (i32.rem_u (call $open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 300)) (i32.const 10))))
        (i32.store (i32.const 210) (i32.const 200)) (i32.store (i32.const 214) (i32.const 1))
        (drop (call $w (i32.const 1) (i32.const 210) (i32.const 1) (i32.const 220)))
        (drop (call $add (i32.const 0) (i32.const 200) (i32.const 1) (i32.const 200) (i32.const 1)))";
    let plugin = load(&host, &[("EXTRA_IMPORT", extra), ("HEADERS", headers)]).unwrap();
    let out = plugin.http_request(&request(&[(":path", "/")])).unwrap();
    // ENOSYS = 52 -> 52 % 10 = 2 -> "2".
    assert_eq!(out.header("2"), Some(&b"2"[..]));
}

/// Imports and data for `set_envoy_filter_state`: the name at 900, and at 1024 Envoy's
/// `SetEnvoyFilterStateArguments` with the 4-byte path `path` (its last byte at 1029)
/// and a 64 KiB value (the zeros that follow in memory): 65,546 bytes in all.
const FILTER_STATE: &str = r#"(import "env" "proxy_call_foreign_function" (func $ffi (param i32 i32 i32 i32 i32 i32) (result i32)))
    (data (i32.const 900) "set_envoy_filter_state")
    (data (i32.const 1024) "\0a\04path\12\80\80\04")"#;

/// 20 calls of `set_envoy_filter_state` with a 64 KiB value, each to a new path when
/// `distinct`, else all to the same path; traps on any status but OK.
fn filter_state_calls(distinct: bool) -> String {
    let path = if distinct {
        "(i32.store8 (i32.const 1029) (i32.add (i32.const 65) (local.get $i)))"
    } else {
        ""
    };
    format!(
        "(local $i i32) (loop $l {path}
            (if (call $ffi (i32.const 900) (i32.const 22) (i32.const 1024) (i32.const 65546) (i32.const 100) (i32.const 104))
                (then unreachable))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br_if $l (i32.lt_u (local.get $i) (i32.const 20))))"
    )
}

#[test]
fn filter_state_of_a_context_is_capped_across_paths() {
    let host = host();
    let good = testguest(&host, "good");
    // 20 paths of 64 KiB each: past the 1 MiB limit of one context's filter state (each
    // argument alone is well within it).
    let many = filter_state_calls(true);
    let plugin = load(
        &host,
        &[
            ("EXTRA_IMPORT", FILTER_STATE),
            ("HEADERS", &many),
            ("PAGES", "2"),
        ],
    )
    .unwrap();
    assert_header_limit(&plugin);
    assert_serves(&good);
    // The same path set 20 times holds one value: within the limit.
    let same = filter_state_calls(false);
    let plugin = load(
        &host,
        &[
            ("EXTRA_IMPORT", FILTER_STATE),
            ("HEADERS", &same),
            ("PAGES", "2"),
        ],
    )
    .unwrap();
    for _ in 0..2 {
        let out = plugin.http_request(&request(&[(":path", "/")])).unwrap();
        assert_eq!(out.filter_state.len(), 1);
        assert_eq!(out.filter_state[0].0, "path");
        assert_eq!(out.filter_state[0].1.len(), 65536);
    }
    // In a stream context the filter state lives as long as the stream: the limit holds
    // across data events. Ten paths per event, named after the size of the data.
    let ten = many.replace("(i32.const 20)", "(i32.const 10)").replace(
        "(i32.add (i32.const 65) (local.get $i))",
        "(i32.add (i32.add (i32.const 65) (local.get $i)) (i32.mul (local.get 1) (i32.const 10)))",
    );
    let plugin = load(
        &host,
        &[
            ("EXTRA_IMPORT", FILTER_STATE),
            ("DOWN", &ten),
            ("PAGES", "2"),
        ],
    )
    .unwrap();
    let mut stream = plugin.stream(ConnectionInfo::default()).unwrap();
    stream.downstream(b"a", false).unwrap();
    assert_eq!(stream.filter_state().len(), 10);
    // The same ten paths again: their values are replaced, nothing grows.
    stream.downstream(b"b", false).unwrap();
    assert_eq!(stream.filter_state().len(), 10);
    // Ten more paths would hold 1.3 MiB.
    let err = stream.downstream(b"cc", false).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Limit {
                callback: "proxy_on_downstream_data",
                ..
            }
        ),
        "{err}"
    );
    assert_serves(&good);
}

#[test]
fn empty_header_entries_count_toward_the_map_limit() {
    // A 64 KiB map: room for about 1,300 entries of 48 bytes. (Small, because debug
    // builds check the remembered map size against a full sum at every add.)
    let host = Host::new(HostConfig {
        max_map_bytes: 64 << 10,
        warm_instances: 1,
        ..HostConfig::default()
    })
    .unwrap();
    let good = testguest(&host, "good");
    // `n` headers with an empty name and value: no bytes of their own, but each one an
    // entry the host keeps.
    let adds = |n: u32| {
        format!(
            "(local $i i32) (loop $l
                (if (call $add (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
                    (then unreachable))
                (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (br_if $l (i32.lt_u (local.get $i) (i32.const {n}))))"
        )
    };
    // 1,000 fit.
    let plugin = load(&host, &[("HEADERS", &adds(1_000))]).unwrap();
    let out = plugin.http_request(&request(&[(":path", "/")])).unwrap();
    assert_eq!(out.headers.len(), 1_001);
    // 2,000 do not.
    let plugin = load(&host, &[("HEADERS", &adds(2_000))]).unwrap();
    assert_header_limit(&plugin);
    assert_serves(&good);
    // Nor do 2,000 empty pairs given at once (20 KB on the wire, within the size that
    // `proxy_set_header_map_pairs` accepts): count 2,000, then zeros.
    let set = "(i32.store (i32.const 8192) (i32.const 2000))
        (if (call $set_pairs (i32.const 0) (i32.const 8192) (i32.const 20004)) (then unreachable))";
    let plugin = load(&host, &[("HEADERS", set)]).unwrap();
    assert_header_limit(&plugin);
    assert_serves(&good);
    // 1,000 do.
    let set = set
        .replace("(i32.const 2000)", "(i32.const 1000)")
        .replace("(i32.const 20004)", "(i32.const 10004)");
    let plugin = load(&host, &[("HEADERS", &set)]).unwrap();
    let out = plugin.http_request(&request(&[(":path", "/")])).unwrap();
    assert_eq!(out.headers.len(), 1_000);
}

#[test]
fn header_writes_outside_an_http_context_are_bad_argument_as_in_envoy() {
    let host = host();
    let extra = r#"(import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))
        (import "env" "proxy_remove_header_map_value" (func $remove (param i32 i32 i32) (result i32)))
        (data (i32.const 0) "kv")"#;
    // Every write to map `t` answers `status`; the module traps on any other answer.
    let writes = |t: u32, status: u32| {
        format!(
            "(if (i32.ne (call $add (i32.const {t}) (i32.const 0) (i32.const 1) (i32.const 1) (i32.const 1)) (i32.const {status})) (then unreachable))
             (if (i32.ne (call $replace (i32.const {t}) (i32.const 0) (i32.const 1) (i32.const 1) (i32.const 1)) (i32.const {status})) (then unreachable))
             (if (i32.ne (call $remove (i32.const {t}) (i32.const 0) (i32.const 1)) (i32.const {status})) (then unreachable))
             (if (i32.ne (call $set_pairs (i32.const {t}) (i32.const 0) (i32.const 0)) (i32.const {status})) (then unreachable))"
        )
    };
    // A stream context and the root context (on_configure) have no header maps.
    let (in_stream, in_root) = (writes(0, 2), writes(0, 2));
    let plugin = load(
        &host,
        &[
            ("EXTRA_IMPORT", extra),
            ("DOWN", &in_stream),
            ("CONFIGURE", &in_root),
        ],
    )
    .unwrap();
    let mut stream = plugin.stream(ConnectionInfo::default()).unwrap();
    assert_eq!(stream.downstream(b"x", false).unwrap().data, b"x");
    stream.close().unwrap();
    // An HTTP context has the request map, not the callout or gRPC maps (5).
    let in_http = writes(0, 0) + &writes(5, 2);
    let plugin = load(&host, &[("EXTRA_IMPORT", extra), ("HEADERS", &in_http)]).unwrap();
    let out = plugin.http_request(&request(&[(":path", "/")])).unwrap();
    // The last write to map 0 set it to no pairs.
    assert!(out.headers.is_empty(), "{:?}", out.headers);
}

#[test]
fn a_full_shared_store_refuses_new_data_with_cas_mismatch_not_a_trap() {
    let host = Host::new(HostConfig {
        max_shared_bytes: 64 << 10,
        warm_instances: 1,
        ..HostConfig::default()
    })
    .unwrap();
    // The test guest keeps a counter in shared data ("tg-counter", bumped with CAS).
    let guest = testguest(&host, "good");
    let shared = |plugin: &proxy_wasm_host::Plugin| {
        let out = plugin.http_request(&request(&[(":path", "/")])).unwrap();
        String::from_utf8(out.header("x-tg-shared").unwrap().to_vec()).unwrap()
    };
    assert_eq!(shared(&guest), "1");
    // Another plugin sets new keys (4 bytes, empty values) until the store refuses one
    // with CAS_MISMATCH (8); any other answer, or no refusal at all, traps.
    let fill = "(local $i i32) (local $s i32)
        (block $full
            (loop $l
                (i32.store (i32.const 1024) (local.get $i))
                (local.set $s (call $sset (i32.const 1024) (i32.const 4) (i32.const 2048) (i32.const 0) (i32.const 0)))
                (br_if $full (i32.eq (local.get $s) (i32.const 8)))
                (if (local.get $s) (then unreachable))
                (local.set $i (i32.add (local.get $i) (i32.const 1)))
                (br_if $l (i32.lt_u (local.get $i) (i32.const 100000))))
            unreachable)
        ;; Full: a write that does not grow the store still goes through...
        (i32.store (i32.const 1024) (i32.const 0))
        (if (call $sset (i32.const 1024) (i32.const 4) (i32.const 2048) (i32.const 0) (i32.const 0)) (then unreachable))
        ;; ...one that grows it does not.
        (if (i32.ne (call $sset (i32.const 1024) (i32.const 4) (i32.const 2048) (i32.const 1024) (i32.const 0)) (i32.const 8)) (then unreachable))";
    let extra = r#"(import "env" "proxy_set_shared_data" (func $sset (param i32 i32 i32 i32 i32) (result i32)))"#;
    let filler = load(&host, &[("EXTRA_IMPORT", extra), ("HEADERS", fill)]).unwrap();
    filler.http_request(&request(&[(":path", "/")])).unwrap();
    // The guest's own key is updated in place (same size): it goes on counting.
    assert_eq!(shared(&guest), "2");
    // A plugin with another VM id needs a new key: refused, and the Rust SDK hands the
    // guest an error (it panics on anything but OK and CAS_MISMATCH); the guest serves.
    let other = host
        .load(
            PluginSpec::new(altroute_modules::TESTGUEST, "testguest.http")
                .name("other")
                .plugin_config("other")
                .version("other"),
        )
        .unwrap();
    assert_eq!(shared(&other), "failed");
    assert_serves(&other);
}

const QUEUES: &str = r#"(import "env" "proxy_register_shared_queue" (func $register (param i32 i32 i32) (result i32)))
    (import "env" "proxy_enqueue_shared_queue" (func $enqueue (param i32 i32 i32) (result i32)))
    (import "env" "proxy_dequeue_shared_queue" (func $dequeue (param i32 i32 i32) (result i32)))
    (data (i32.const 900) "qnf")"#;

#[test]
fn shared_queues_are_capped_in_number_item_size_and_bytes() {
    // 1,025 queues for one VM id: one too many.
    let register = "(local $i i32) (loop $l
            (i32.store (i32.const 1024) (local.get $i))
            (if (call $register (i32.const 1024) (i32.const 4) (i32.const 96)) (then unreachable))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br_if $l (i32.lt_u (local.get $i) (i32.const 1025))))";
    let host = host();
    let good = testguest(&host, "good");
    let plugin = load(&host, &[("EXTRA_IMPORT", QUEUES), ("HEADERS", register)]).unwrap();
    assert_header_limit(&plugin);
    // 1,024 are allowed (registered again: the same queues, nothing new).
    let plugin = load(
        &host,
        &[
            ("EXTRA_IMPORT", QUEUES),
            ("HEADERS", &register.replace("1025", "1024")),
        ],
    )
    .unwrap();
    plugin.http_request(&request(&[(":path", "/")])).unwrap();
    assert_serves(&good);

    // An item larger than a buffer may be.
    let host = Host::new(HostConfig {
        max_buffer_bytes: 4096,
        warm_instances: 1,
        ..HostConfig::default()
    })
    .unwrap();
    let good = testguest(&host, "good");
    let big =
        "(if (call $register (i32.const 900) (i32.const 1) (i32.const 96)) (then unreachable))
        (drop (call $enqueue (i32.load (i32.const 96)) (i32.const 8192) (i32.const 8192)))";
    let plugin = load(&host, &[("EXTRA_IMPORT", QUEUES), ("HEADERS", big)]).unwrap();
    assert_header_limit(&plugin);
    assert_serves(&good);

    // Queued items count in the shared store's bytes: 100 items of 1 KiB (numbered in
    // their first 4 bytes) into a 16 KiB store keep the newest that fit. The module
    // dequeues them all and reports how many (header "n") and the first one's number
    // ("f"). Then an item larger than the whole store is dropped (OK, queue stays empty).
    let host = Host::new(HostConfig {
        max_shared_bytes: 16 << 10,
        warm_instances: 1,
        ..HostConfig::default()
    })
    .unwrap();
    let fill = "(local $i i32) (local $q i32) (local $s i32) (local $n i32) (local $first i32)
        (if (call $register (i32.const 900) (i32.const 1) (i32.const 96)) (then unreachable))
        (local.set $q (i32.load (i32.const 96)))
        (loop $l
            (i32.store (i32.const 1024) (local.get $i))
            (if (call $enqueue (local.get $q) (i32.const 1024) (i32.const 1024)) (then unreachable))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br_if $l (i32.lt_u (local.get $i) (i32.const 100))))
        (local.set $first (i32.const -1))
        (block $empty (loop $d
            (local.set $s (call $dequeue (local.get $q) (i32.const 100) (i32.const 104)))
            (br_if $empty (i32.eq (local.get $s) (i32.const 7)))
            (if (local.get $s) (then unreachable))
            (if (i32.eq (local.get $first) (i32.const -1))
                (then (local.set $first (i32.load (i32.load (i32.const 100))))))
            (local.set $n (i32.add (local.get $n) (i32.const 1)))
            (br $d)))
        (if (call $enqueue (local.get $q) (i32.const 2048) (i32.const 32768)) (then unreachable))
        (if (i32.ne (call $dequeue (local.get $q) (i32.const 100) (i32.const 104)) (i32.const 7)) (then unreachable))
        (i32.store (i32.const 200) (local.get $n))
        (i32.store (i32.const 204) (local.get $first))
        (drop (call $add (i32.const 0) (i32.const 901) (i32.const 1) (i32.const 200) (i32.const 4)))
        (drop (call $add (i32.const 0) (i32.const 902) (i32.const 1) (i32.const 204) (i32.const 4)))";
    let plugin = load(
        &host,
        &[("EXTRA_IMPORT", QUEUES), ("HEADERS", fill), ("PAGES", "4")],
    )
    .unwrap();
    let out = plugin.http_request(&request(&[(":path", "/")])).unwrap();
    let number = |name: &str| u32::from_le_bytes(out.header(name).unwrap().try_into().unwrap());
    let (n, first) = (number("n"), number("f"));
    assert!(n > 0 && n < 16, "{n} items kept in a 16 KiB store");
    assert_eq!(first + n, 100, "the newest items are kept");
}

#[test]
fn log_levels_above_critical_are_bad_argument() {
    let host = host();
    // Level 6 is refused before the message is read (as in Envoy: even a bad pointer
    // gets BAD_ARGUMENT); critical (5) is logged.
    let body = "(if (i32.ne (call $log (i32.const 6) (i32.const 0) (i32.const 1)) (i32.const 2)) (then unreachable))
        (if (i32.ne (call $log (i32.const 7) (i32.const -16) (i32.const 100)) (i32.const 2)) (then unreachable))
        (if (call $log (i32.const 5) (i32.const 0) (i32.const 1)) (then unreachable))";
    let plugin = load(&host, &[("HEADERS", body)]).unwrap();
    plugin.http_request(&request(&[(":path", "/")])).unwrap();
}

#[test]
fn counters_take_only_positive_increments_as_in_envoy() {
    let host = host();
    let extra = r#"(import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
        (import "env" "proxy_increment_metric" (func $inc (param i32 i64) (result i32)))
        (data (i32.const 900) "cg")"#;
    // Counter "c": 0 and -1 are BAD_ARGUMENT (2), 3 is OK. Gauge "g": -2 is OK.
    let body = "(if (call $define (i32.const 0) (i32.const 900) (i32.const 1) (i32.const 96)) (then unreachable))
        (if (call $define (i32.const 1) (i32.const 901) (i32.const 1) (i32.const 92)) (then unreachable))
        (if (i32.ne (call $inc (i32.load (i32.const 96)) (i64.const 0)) (i32.const 2)) (then unreachable))
        (if (i32.ne (call $inc (i32.load (i32.const 96)) (i64.const -1)) (i32.const 2)) (then unreachable))
        (if (call $inc (i32.load (i32.const 96)) (i64.const 3)) (then unreachable))
        (if (call $inc (i32.load (i32.const 92)) (i64.const -2)) (then unreachable))";
    let plugin = load(&host, &[("EXTRA_IMPORT", extra), ("HEADERS", body)]).unwrap();
    plugin.http_request(&request(&[(":path", "/")])).unwrap();
    let metrics = plugin.metrics();
    let value = |name: &str| metrics.iter().find(|m| m.name == name).unwrap().value;
    assert_eq!((value("c"), value("g")), (3, -2));
}

#[test]
fn nothing_to_read_from_a_buffer_is_ok_with_a_null_pointer() {
    let host = host();
    let extra = r#"(import "env" "proxy_get_buffer_bytes" (func $get (param i32 i32 i32 i32 i32) (result i32)))"#;
    // Reads buffer `t` from `start`, at most `max`: must answer OK (0) and write pointer 0
    // and size 0 over the 0xffffffff put in the return slots.
    let empty = |t: u32, start: &str, max: &str| {
        format!(
            "(i32.store (i32.const 100) (i32.const -1)) (i32.store (i32.const 104) (i32.const -1))
             (if (call $get (i32.const {t}) {start} {max} (i32.const 100) (i32.const 104)) (then unreachable))
             (if (i32.or (i32.load (i32.const 100)) (i32.load (i32.const 104))) (then unreachable))"
        )
    };
    // The data's size is parameter 1: from its end, past it, or with max 0. The
    // allocator must not be called for nothing.
    let down = [
        empty(2, "(local.get 1)", "(i32.const 10)"),
        empty(2, "(i32.add (local.get 1) (i32.const 5))", "(i32.const 10)"),
        empty(2, "(i32.const 0)", "(i32.const 0)"),
        // No plugin configuration: the Rust SDK asks with max = u32::MAX.
        empty(7, "(i32.const 0)", "(i32.const -1)"),
    ]
    .concat();
    let body = empty(0, "(i32.const 0)", "(local.get 1)");
    let plugin = load(
        &host,
        &[
            ("EXTRA_IMPORT", extra),
            ("MALLOC", "unreachable"),
            ("DOWN", &down),
            ("BODY", &body),
        ],
    )
    .unwrap();
    let mut stream = plugin.stream(ConnectionInfo::default()).unwrap();
    for data in [&b""[..], b"abc"] {
        assert_eq!(stream.downstream(data, false).unwrap().data, data);
    }
    stream.close().unwrap();
    let mut req = request(&[(":path", "/")]);
    req.body = Some(Vec::new());
    assert_eq!(
        plugin.http_request(&req).unwrap().body.as_deref(),
        Some(&b""[..])
    );
}

/// A candidate whose `on_configure` succeeds once only (it leaves a mark in shared data
/// and refuses when it finds one) is refused by the swap gate, which configures every
/// warm instance: it once passed on its first instance, and every instance rebuilt after
/// a fault failed to configure, so all mail was deferred with nothing reported.
#[test]
fn a_candidate_that_configures_only_once_is_refused() {
    let host = host();
    let slot = proxy_wasm_host::PolicySlot::new(testguest(&host, "v1"));
    let once = [
        (
            "EXTRA_IMPORT",
            r#"(import "env" "proxy_get_shared_data" (func $get (param i32 i32 i32 i32 i32) (result i32)))
               (import "env" "proxy_set_shared_data" (func $set (param i32 i32 i32 i32 i32) (result i32)))
               (data (i32.const 2000) "once")"#,
        ),
        (
            "CONFIGURE",
            "(if (i32.eqz (call $get (i32.const 2000) (i32.const 4) (i32.const 2100) (i32.const 2104) (i32.const 2108)))
               (then (return (i32.const 0))))
             (drop (call $set (i32.const 2000) (i32.const 4) (i32.const 2000) (i32.const 4) (i32.const 0)))",
        ),
    ];
    let spec = PluginSpec::new(module(&once), "once").version("once");
    let reasons = slot.try_swap(&host, spec, |_| Ok(())).unwrap_err();
    assert!(
        reasons.iter().any(|r| r.contains("another instance")),
        "{reasons:?}"
    );
    assert_eq!(slot.version(), "v1");
    assert_serves(&slot.current());
}

/// Differences from Envoy 1.40 that an audit found by running the same WAT probes in both
/// (each check here traps on a difference, or its result is compared below).
mod as_envoy {
    use super::*;

    const IMPORTS: &str = r#"
  (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $value (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_record_metric" (func $record (param i32 i64) (result i32)))
  (import "env" "proxy_get_metric" (func $getm (param i32 i32) (result i32)))
  (import "env" "proxy_call_foreign_function" (func $ffi (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_property" (func $setp (param i32 i32 i32 i32) (result i32)))
  (global $order (mut i32) (i32.const 0))
  (data (i32.const 200) "request\00headers\00x-dup")
  (data (i32.const 240) "request\00headers\00x-empty")
  (data (i32.const 280) "x-empty")
  (data (i32.const 300) "x-got")
  (data (i32.const 320) "FIRSTSECONDc")
  (data (i32.const 340) "x-dup")
  (data (i32.const 360) ":zz")
  (data (i32.const 380) "hits")
  (data (i32.const 400) "request\00path")
  (data (i32.const 420) "set_envoy_filter_state")
  (data (i32.const 450) "\0a\03abc\12\01v")
  (data (i32.const 470) "t2\00")
  (data (i32.const 480) "connection\00requested_server_name")
  (data (i32.const 520) "\02\00\00\00\03\00\00\00\01\00\00\00\05\00\00\00\01\00\00\00x-a\001\00:path\00/\00")
"#;

    /// `(call …)` must answer `status`.
    fn expect(status: u32, call: &str) -> String {
        format!("(if (i32.ne {call} (i32.const {status})) (then unreachable))")
    }

    #[test]
    fn a_repeated_header_reads_joined_and_an_empty_value_is_a_null_pointer() {
        let host = host();
        let headers = [
            // x-got: what `request.headers.x-dup` read (a,b joined, as Envoy's).
            expect(
                0,
                "(call $prop (i32.const 200) (i32.const 21) (i32.const 100) (i32.const 104))",
            ),
            expect(
                0,
                "(call $add (i32.const 0) (i32.const 300) (i32.const 5) (i32.load (i32.const 100)) (i32.load (i32.const 104)))",
            ),
            // An empty value: OK, null pointer, size 0, as a property and as a header
            // value (the allocator would trap).
            "(i32.store (i32.const 100) (i32.const -1)) (i32.store (i32.const 104) (i32.const -1))"
                .into(),
            "(global.set $heap (i32.const 0))".into(),
            expect(
                0,
                "(call $prop (i32.const 240) (i32.const 23) (i32.const 100) (i32.const 104))",
            ),
            "(if (i32.or (i32.load (i32.const 100)) (i32.load (i32.const 104))) (then unreachable))"
                .into(),
            "(i32.store (i32.const 100) (i32.const -1)) (i32.store (i32.const 104) (i32.const -1))"
                .into(),
            expect(
                0,
                "(call $value (i32.const 0) (i32.const 280) (i32.const 7) (i32.const 100) (i32.const 104))",
            ),
            "(if (i32.or (i32.load (i32.const 100)) (i32.load (i32.const 104))) (then unreachable))"
                .into(),
            "(global.set $heap (i32.const 8192))".into(),
        ]
        .concat();
        let malloc = "(if (i32.eqz (global.get $heap)) (then unreachable)) \
                      (local.set $p (global.get $heap)) \
                      (global.set $heap (i32.add (global.get $heap) (local.get $n))) (local.get $p)";
        let plugin = load(
            &host,
            &[
                ("EXTRA_IMPORT", IMPORTS),
                ("HEADERS", &headers),
                ("MALLOC", malloc),
            ],
        )
        .unwrap();
        let out = plugin
            .http_request(&request(&[
                (":path", "/"),
                ("x-dup", "a"),
                ("x-empty", ""),
                ("x-dup", "b"),
            ]))
            .unwrap();
        assert_eq!(out.header("x-got"), Some(&b"a,b"[..]));
    }

    #[test]
    fn the_first_local_response_is_the_one_sent() {
        let host = host();
        let headers = [
            expect(
                0,
                "(call $local (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 320) (i32.const 5) (i32.const 0) (i32.const 0) (i32.const 0))",
            ),
            expect(
                0,
                "(call $local (i32.const 200) (i32.const 0) (i32.const 0) (i32.const 325) (i32.const 6) (i32.const 0) (i32.const 0) (i32.const 0))",
            ),
        ]
        .concat();
        let plugin = load(&host, &[("EXTRA_IMPORT", IMPORTS), ("HEADERS", &headers)]).unwrap();
        let local = plugin
            .http_request(&request(&[(":path", "/")]))
            .unwrap()
            .local_response
            .unwrap();
        assert_eq!((local.status, &local.body[..]), (403, &b"FIRST"[..]));
    }

    #[test]
    fn the_body_is_read_and_written_in_on_request_body_only() {
        let host = host();
        // In on_request_headers: the body reads empty (null pointer) and cannot be set.
        let headers = [
            "(i32.store (i32.const 100) (i32.const -1))".into(),
            expect(
                0,
                "(call $get (i32.const 0) (i32.const 0) (i32.const 100) (i32.const 100) (i32.const 104))",
            ),
            "(if (i32.load (i32.const 100)) (then unreachable))".into(),
            expect(
                2,
                "(call $set (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 320) (i32.const 5))",
            ),
        ]
        .concat();
        // In on_request_body: prepended.
        let body = expect(
            0,
            "(call $set (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 320) (i32.const 5))",
        );
        // In on_downstream_data: the upstream buffer cannot be set.
        let down = expect(
            2,
            "(call $set (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 320) (i32.const 5))",
        );
        let plugin = load(
            &host,
            &[
                ("EXTRA_IMPORT", IMPORTS),
                ("HEADERS", &headers),
                ("BODY", &body),
                ("DOWN", &down),
            ],
        )
        .unwrap();
        let mut req = request(&[(":path", "/")]);
        req.body = Some(b"-body".to_vec());
        let out = plugin.http_request(&req).unwrap();
        assert_eq!(out.body.as_deref(), Some(&b"FIRST-body"[..]));
        let mut stream = plugin.stream(ConnectionInfo::default()).unwrap();
        assert_eq!(stream.downstream(b"abc", false).unwrap().data, b"abc");
        stream.close().unwrap();
    }

    #[test]
    fn replaced_and_pseudo_headers_go_where_envoy_puts_them() {
        let host = host();
        let headers = [
            expect(
                0,
                "(call $replace (i32.const 0) (i32.const 340) (i32.const 5) (i32.const 331) (i32.const 1))",
            ),
            expect(
                0,
                "(call $add (i32.const 0) (i32.const 360) (i32.const 3) (i32.const 331) (i32.const 1))",
            ),
        ]
        .concat();
        let plugin = load(&host, &[("EXTRA_IMPORT", IMPORTS), ("HEADERS", &headers)]).unwrap();
        let out = plugin
            .http_request(&request(&[
                (":path", "/"),
                ("x-dup", "a"),
                ("x-other", "o"),
                ("x-dup", "b"),
            ]))
            .unwrap();
        let names: Vec<(&str, &[u8])> = out
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        assert_eq!(
            names,
            [
                (":path", &b"/"[..]),
                (":zz", b"c"),
                ("x-other", b"o"),
                ("x-dup", b"c")
            ]
        );
    }

    /// Once `on_request_headers` let them go on, the request headers are gone (Envoy:
    /// BAD_ARGUMENT to reads and writes, an empty map, `request.*` NOT_FOUND); once the
    /// context ends (`on_log` first, then `on_done`), nothing changes the request: header
    /// writes are BAD_ARGUMENT, filter state NOT_FOUND, a local response is dropped.
    #[test]
    fn headers_go_with_continue_and_nothing_changes_once_the_context_ends() {
        let host = host();
        let body = [
            expect(
                2,
                "(call $value (i32.const 0) (i32.const 300) (i32.const 5) (i32.const 100) (i32.const 104))",
            ),
            expect(
                2,
                "(call $add (i32.const 0) (i32.const 300) (i32.const 5) (i32.const 331) (i32.const 1))",
            ),
            expect(
                1,
                "(call $prop (i32.const 400) (i32.const 12) (i32.const 100) (i32.const 104))",
            ),
            "(i32.store (i32.const 100) (i32.const -1))".into(),
            expect(0, "(call $pairs (i32.const 0) (i32.const 100) (i32.const 104))"),
            "(if (i32.load (i32.const 100)) (then unreachable))".into(),
        ]
        .concat();
        let log = [
            "(global.set $order (i32.const 1))".into(),
            expect(
                2,
                "(call $add (i32.const 2) (i32.const 300) (i32.const 5) (i32.const 331) (i32.const 1))",
            ),
            expect(
                1,
                "(call $ffi (i32.const 420) (i32.const 22) (i32.const 450) (i32.const 8) (i32.const 100) (i32.const 104))",
            ),
        ]
        .concat();
        let done = [
            "(if (i32.ne (global.get $order) (i32.const 1)) (then unreachable))".into(),
            expect(
                0,
                "(call $local (i32.const 502) (i32.const 0) (i32.const 0) (i32.const 320) (i32.const 5) (i32.const 0) (i32.const 0) (i32.const 0))",
            ),
        ]
        .concat();
        let plugin = load(
            &host,
            &[
                ("EXTRA_IMPORT", IMPORTS),
                ("BODY", &body),
                ("LOG", &log),
                ("DONE", &done),
            ],
        )
        .unwrap();
        let mut req = request(&[(":path", "/"), ("x-got", "1")]);
        req.body = Some(b"b".to_vec());
        let out = plugin.http_request(&req).unwrap();
        assert!(out.local_response.is_none(), "{:?}", out.local_response);
        assert!(out.filter_state.is_empty());
        assert_eq!(out.header("x-got"), Some(&b"1"[..]));
    }

    /// An empty map reads as a null pointer; pairs set put the pseudo-headers first; a
    /// trailing NUL is no part of a property path, set or read; no SNI reads empty.
    #[test]
    fn empty_maps_set_pairs_property_paths_and_sni_read_as_in_envoy() {
        let host = host();
        let headers = [
            "(i32.store (i32.const 100) (i32.const -1))".into(),
            expect(0, "(call $pairs (i32.const 2) (i32.const 100) (i32.const 104))"),
            "(if (i32.or (i32.load (i32.const 100)) (i32.load (i32.const 104))) (then unreachable))"
                .into(),
            expect(0, "(call $set_pairs (i32.const 0) (i32.const 520) (i32.const 34))"),
            // Set as `t2\0`, read as `t2`: the value is put in a header to compare.
            expect(
                0,
                "(call $setp (i32.const 470) (i32.const 3) (i32.const 331) (i32.const 1))",
            ),
            expect(
                0,
                "(call $prop (i32.const 470) (i32.const 2) (i32.const 100) (i32.const 104))",
            ),
            expect(
                0,
                "(call $add (i32.const 0) (i32.const 300) (i32.const 5) (i32.load (i32.const 100)) (i32.load (i32.const 104)))",
            ),
        ]
        .concat();
        let newconn = [
            "(i32.store (i32.const 100) (i32.const -1))".into(),
            expect(
                0,
                "(call $prop (i32.const 480) (i32.const 32) (i32.const 100) (i32.const 104))",
            ),
            "(if (i32.or (i32.load (i32.const 100)) (i32.load (i32.const 104))) (then unreachable))"
                .into(),
        ]
        .concat();
        let plugin = load(
            &host,
            &[
                ("EXTRA_IMPORT", IMPORTS),
                ("HEADERS", &headers),
                ("NEWCONN", &newconn),
            ],
        )
        .unwrap();
        let out = plugin.http_request(&request(&[(":path", "/x")])).unwrap();
        let names: Vec<(&str, &[u8])> = out
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        assert_eq!(
            names,
            [(":path", &b"/"[..]), ("x-a", b"1"), ("x-got", b"c")]
        );
        let mut stream = plugin.stream(ConnectionInfo::default()).unwrap();
        assert_eq!(stream.downstream(b"abc", false).unwrap().data, b"abc");
        stream.close().unwrap();
    }

    #[test]
    fn a_counter_wraps_as_envoy_s_and_is_never_exported_negative() {
        let host = host();
        let headers = [
            expect(
                0,
                "(call $define (i32.const 0) (i32.const 380) (i32.const 4) (i32.const 100))",
            ),
            expect(
                0,
                "(call $record (i32.load (i32.const 100)) (i64.const -1))",
            ),
            // An id never defined is a bad argument.
            expect(2, "(call $record (i32.const 77) (i64.const 1))"),
            expect(2, "(call $getm (i32.const 77) (i32.const 104))"),
        ]
        .concat();
        let plugin = load(&host, &[("EXTRA_IMPORT", IMPORTS), ("HEADERS", &headers)]).unwrap();
        plugin.http_request(&request(&[(":path", "/")])).unwrap();
        let hits = plugin
            .metrics()
            .into_iter()
            .find(|m| m.name == "hits")
            .unwrap();
        assert_eq!(hits.value, i64::MAX);
    }
}
