//! The proxy-wasm Rust SDK test guest through every face.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proxy_wasm_host::{
    Action, ConnectionInfo, Error, Host, HostConfig, HttpRequest, HttpRequestRef, MetricKind,
    PluginSpec, PropertyProvider,
};

use super::{assert_serves, host, request, testguest};

#[test]
fn http_request_exercises_headers_properties_shared_data_and_ffi() {
    let host = host();
    let plugin = testguest(&host, "cfg-A");
    let mut req = request(&[
        (":path", "/mail"),
        (":method", "POST"),
        ("X-Tg-Replace", "old"),
        ("x-tg-remove", "gone"),
        ("x-other", "\u{00e9}t\u{00e9}"),
    ]);
    req.connection = Some(ConnectionInfo {
        source: Some("192.0.2.7:4242".parse::<SocketAddr>().unwrap()),
        ..ConnectionInfo::default()
    });
    let out = plugin.http_request(&req).unwrap();
    let h = |n: &str| String::from_utf8(out.header(n).unwrap_or_default().to_vec()).unwrap();
    assert_eq!(h("x-tg-header-count"), "5 ok");
    assert_eq!(h("x-tg-config"), "cfg-A");
    assert_eq!(h("x-tg-path"), "/mail");
    assert_eq!(h("x-tg-added"), "1");
    assert_eq!(h("x-tg-replace"), "replaced");
    assert!(out.header("x-tg-remove").is_none());
    assert_eq!(h("x-other"), "\u{00e9}t\u{00e9}");
    assert_eq!(h("x-tg-root-id"), "testguest.http");
    assert_eq!(h("x-tg-source"), "192.0.2.7:4242");
    assert_eq!(h("x-tg-method"), "POST");
    assert_eq!(h("x-tg-property-roundtrip"), "yes");
    assert!(h("x-tg-time").parse::<u64>().unwrap() > 1_600_000_000);
    assert_eq!(h("x-tg-ffi"), "ok");
    assert_eq!(h("x-tg-ffi-unknown"), "not-found");
    assert!(out.route_cache_cleared);
    assert!(out.local_response.is_none());
    assert!(!out.paused);
    let first: u64 = h("x-tg-shared").parse().unwrap();
    assert_eq!(h("x-tg-requests"), "1");

    let out2 = plugin.http_request(&req).unwrap();
    let shared2: u64 = std::str::from_utf8(out2.header("x-tg-shared").unwrap())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        shared2,
        first + 1,
        "shared data CAS counter increments across instances"
    );

    let metrics = plugin.metrics();
    let requests = metrics
        .iter()
        .find(|m| m.name == "testguest.requests")
        .unwrap();
    assert_eq!((requests.kind, requests.value), (MetricKind::Counter, 2));
    let hist = metrics
        .iter()
        .find(|m| m.name == "testguest.request_headers")
        .unwrap();
    assert_eq!(
        (hist.kind, hist.count, hist.value),
        (MetricKind::Histogram, 2, 10)
    );
}

#[test]
fn local_response_and_body_replacement() {
    let host = host();
    let plugin = testguest(&host, "cfg-L");
    let out = plugin
        .http_request(&request(&[(":path", "/"), ("x-tg-local", "451")]))
        .unwrap();
    let local = out.local_response.unwrap();
    assert_eq!(local.status, 451);
    assert_eq!(local.body, b"denied by testguest");
    assert!(
        local
            .headers
            .contains(&("x-tg-config".to_string(), b"cfg-L".to_vec()))
    );

    let mut req = request(&[(":path", "/upload")]);
    req.body = Some(b"mail from: someone".to_vec());
    let out = plugin.http_request(&req).unwrap();
    assert_eq!(out.body.as_deref(), Some(&b"MAIL FROM: SOMEONE"[..]));
    assert_eq!(out.header("x-tg-config"), Some(&b"cfg-L"[..]));
}

#[test]
fn configuration_rejected_by_on_configure_is_a_typed_error() {
    let host = host();
    let err = host
        .load(
            PluginSpec::new(altroute_modules::TESTGUEST, "testguest.http").plugin_config("reject"),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Configure), "{err}");
}

#[test]
fn stream_counts_rewrites_and_sets_filter_state() {
    let host = host();
    let plugin = edge_guest(&host);
    let mut stream = plugin.stream(ConnectionInfo::default()).unwrap();
    assert_eq!(stream.new_connection_action(), Action::Continue);
    assert_eq!(
        stream.filter_state(),
        &[(
            "envoy.tcp_proxy.cluster".to_string(),
            b"cluster-edge".to_vec()
        )]
    );
    let down = stream.downstream(b"AUTH SECRET token\r\n", false).unwrap();
    assert_eq!(down.data, b"AUTH XXXXXX token\r\n");
    assert_eq!(down.action, Action::Continue);
    let up = stream.upstream(b"220 hello there\r\n", false).unwrap();
    assert_eq!(up.data, b"220 HELLO there\r\n");
    let plain = stream.downstream(b"QUIT\r\n", true).unwrap();
    assert_eq!(plain.data, b"QUIT\r\n");
    stream.close().unwrap();
    assert_eq!(stream_bytes(&plugin), 19 + 17 + 6);
}

#[test]
fn ticks_reach_the_root_context() {
    let host = host();
    let loading = std::time::Instant::now();
    let plugin = testguest(&host, "tick");
    assert_eq!(plugin.tick_period(), Some(Duration::from_millis(1000)));
    let early = plugin.tick().unwrap();
    // Checked only when the machine did not pause this thread for the whole period (the
    // period starts inside the load).
    if loading.elapsed() < Duration::from_millis(1000) {
        assert_eq!(early, 0, "period not yet elapsed");
    }
    std::thread::sleep(Duration::from_millis(1100));
    let ticked = plugin.tick().unwrap();
    assert_eq!(ticked, 2, "both warm instances tick");
    let ticks = plugin
        .metrics()
        .into_iter()
        .find(|m| m.name == "testguest.ticks")
        .unwrap();
    assert_eq!(ticks.value, 2);
    assert_serves(&plugin);
}

struct Sni;
impl PropertyProvider for Sni {
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        (path == ["request", "method"]).then(|| b"FROM-PROVIDER".to_vec())
    }
}

#[test]
fn property_provider_answers_what_builtins_do_not() {
    let host = host();
    let plugin = host
        .load(
            PluginSpec::new(altroute_modules::TESTGUEST, "testguest.http")
                .plugin_config("p")
                .properties(Arc::new(Sni)),
        )
        .unwrap();
    // No :method header: the built-in has no answer, the provider does.
    let out = plugin
        .http_request(&HttpRequest {
            ..request(&[(":path", "/")])
        })
        .unwrap();
    assert_eq!(out.header("x-tg-method"), Some(&b"FROM-PROVIDER"[..]));
}

#[test]
fn compiled_artifacts_are_cached_on_disk() {
    use std::os::unix::fs::MetadataExt;

    let dir = tempfile::tempdir().unwrap();
    let config = HostConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        warm_instances: 1,
        ..HostConfig::default()
    };
    let host = Host::new(config.clone()).unwrap();
    let plugin = testguest(&host, "cached");
    assert_serves(&plugin);
    // Written before `load` returned, under a name made of the module's hash.
    let artifacts: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    let artifact = &artifacts[0];
    assert_eq!(artifact.extension().unwrap(), "cwasm");
    assert_eq!(count_files(dir.path()), 1);
    let inode = std::fs::metadata(artifact).unwrap().ino();

    // A fresh host maps the artifact: it serves, and the file was not rewritten (a
    // compile would have renamed a new file into place).
    let second = Host::new(config.clone()).unwrap();
    assert_serves(&testguest(&second, "cached"));
    assert_eq!(std::fs::metadata(artifact).unwrap().ino(), inode);

    // A damaged artifact is refused by Wasmtime: the host compiles and replaces it. (Put
    // in place by rename: `second` still maps the old file, which must not change.)
    let damaged = dir.path().join("damaged");
    std::fs::write(&damaged, b"not an artifact").unwrap();
    std::fs::rename(&damaged, artifact).unwrap();
    let damaged_inode = std::fs::metadata(artifact).unwrap().ino();
    let third = Host::new(config).unwrap();
    assert_serves(&testguest(&third, "cached"));
    let replaced = std::fs::metadata(artifact).unwrap();
    assert_ne!(replaced.ino(), damaged_inode);
    assert!(replaced.len() > 1000);

    // An artifact others may write is never mapped: compiled and replaced instead.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(artifact, std::fs::Permissions::from_mode(0o666)).unwrap();
    let open_inode = std::fs::metadata(artifact).unwrap().ino();
    let fourth = Host::new(config_again(&dir)).unwrap();
    assert_serves(&testguest(&fourth, "cached"));
    let private = std::fs::metadata(artifact).unwrap();
    assert_ne!(
        private.ino(),
        open_inode,
        "a world-writable artifact was mapped"
    );
    assert_eq!(private.mode() & 0o022, 0);
}

fn config_again(dir: &tempfile::TempDir) -> HostConfig {
    HostConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        warm_instances: 1,
        ..HostConfig::default()
    }
}

#[test]
fn borrowed_requests_see_the_same_outcome_and_nothing_of_the_previous_request() {
    let host = host();
    let plugin = testguest(&host, "cfg-B");
    let big = request(&[
        (":path", "/big"),
        ("x-tg-replace", "old"),
        ("x-extra-1", "one"),
        ("x-extra-2", "two"),
        ("x-extra-3", "three"),
    ]);
    let small = request(&[(":path", "/small"), ("x-tg-replace", "old")]);
    for req in [&big, &small, &big, &small] {
        let owned = plugin.http_request(req).unwrap();
        let pairs: Vec<(&str, &[u8])> = req
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        let borrowed = plugin
            .http_request_with(
                HttpRequestRef {
                    headers: &pairs,
                    ..HttpRequestRef::default()
                },
                |view| view.to_outcome(),
            )
            .unwrap();
        // Only counters that tell requests apart may differ.
        let strip = |o: &proxy_wasm_host::HttpOutcome| {
            let mut o = o.clone();
            o.headers
                .retain(|(k, _)| k != "x-tg-shared" && k != "x-tg-requests" && k != "x-tg-time");
            o
        };
        assert_eq!(strip(&owned), strip(&borrowed));
        let extras = borrowed
            .headers
            .iter()
            .filter(|(k, _)| k.starts_with("x-extra"))
            .count();
        let want = if req.headers.len() > 2 { 3 } else { 0 };
        assert_eq!(extras, want, "headers of one request leaked into the next");
        assert_eq!(borrowed.header("x-tg-replace"), Some(&b"replaced"[..]));
    }
}

fn count_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        count_files(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Empty data makes the test guest read an empty buffer (OK with a null pointer, as in
/// Envoy) and increment a counter by 0 (BAD_ARGUMENT, as in Envoy): the Rust SDK takes
/// both (`None`, `Err`) and the guest serves on.
#[test]
fn empty_data_and_zero_increments_pass_through_the_sdk() {
    let host = host();
    let plugin = edge_guest(&host);
    let mut stream = plugin.stream(ConnectionInfo::default()).unwrap();
    assert_eq!(stream.downstream(b"", false).unwrap().data, b"");
    assert_eq!(stream.upstream(b"", false).unwrap().data, b"");
    let down = stream.downstream(b"SECRET", true).unwrap();
    assert_eq!(down.data, b"XXXXXX");
    stream.close().unwrap();
    assert_eq!(stream_bytes(&plugin), 6);

    // An empty request body: read as nothing, replaced by nothing.
    let plugin = testguest(&host, "cfg-E");
    let mut req = request(&[(":path", "/upload")]);
    req.body = Some(Vec::new());
    let out = plugin.http_request(&req).unwrap();
    assert_eq!(out.body.as_deref(), Some(&b""[..]));
    assert_eq!(out.header("x-tg-config"), Some(&b"cfg-E"[..]));
}

/// The test guest's stream root, configured as an edge filter (counts bytes, rewrites
/// `SECRET`, sets filter state).
fn edge_guest(host: &proxy_wasm_host::Host) -> Arc<proxy_wasm_host::Plugin> {
    host.load(
        PluginSpec::new(altroute_modules::TESTGUEST, "testguest.stream")
            .name("testguest")
            .plugin_config("edge"),
    )
    .unwrap()
}

/// The test guest's count of stream bytes seen.
fn stream_bytes(plugin: &proxy_wasm_host::Plugin) -> i64 {
    plugin
        .metrics()
        .into_iter()
        .find(|m| m.name == "testguest.stream_bytes")
        .unwrap()
        .value
}
