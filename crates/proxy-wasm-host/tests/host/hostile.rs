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
